//! `GET /healthz`: whether this instance can read and write its database.
//!
//! A read (`SELECT 1`) runs on every call. Writes are probed with a commit
//! that changes nothing, at most once per [`PROBE_EVERY`], so a load balancer
//! polling often costs at most one small commit a second; between probes the
//! last verdict stands. Answers 200 `{"status":"ok"}`, or 503
//! `{"error":"unavailable","status":"degraded"}` while writes fail (a full
//! disk, a read-only database), or 503 `unavailable` when reads fail.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{ApiError, AppState};

/// How often writes are probed at most.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The last write probe: when it ran and what it found.
#[derive(Default)]
pub struct WriteProbe {
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl WriteProbe {
    /// The verdict on writes, probing again when the last probe is older than [`PROBE_EVERY`].
    async fn verdict(&self, app: &AppState) -> Result<(), String> {
        // Holding the lock across the probe makes concurrent calls share one probe.
        let mut last = self.last.lock().await;
        if let Some((at, verdict)) = &*last
            && at.elapsed() < PROBE_EVERY
        {
            return verdict.clone();
        }
        let verdict = app.store.write_probe().await.map_err(|e| e.to_string());
        if let Err(e) = &verdict {
            tracing::warn!(error = %e, "health: writes fail");
        }
        *last = Some((Instant::now(), verdict.clone()));
        verdict
    }
}

/// Handles a health check.
pub async fn healthz(State(app): State<Arc<AppState>>) -> Response {
    if let Err(e) = app.store.health().await {
        return ApiError::from(e).into_response();
    }
    match app.health.verdict(&app).await {
        Ok(()) => Json(serde_json::json!({"status": "ok"})).into_response(),
        Err(e) => {
            let body = serde_json::json!({
                "error": "unavailable",
                "status": "degraded",
                "message": format!("reads work but writes fail: {e}"),
            });
            let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(PROBE_EVERY.as_secs().max(1)));
            response
        }
    }
}
