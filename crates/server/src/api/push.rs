//! `POST /v1/push`: apply a batch of changes as one transaction.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use deltasync_protocol::wire::PushResponse;

use super::body::read_json;
use super::changes::{as_object, device_of, parse_changes};
use super::{ApiError, AppState, AuthUser};
use crate::store::{PushBatch, PushOutcome};

/// Handles a push.
pub async fn push(
    State(app): State<Arc<AppState>>,
    AuthUser(user): AuthUser,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<PushResponse>, ApiError> {
    let limits = &app.config.limits;
    let body = read_json(&headers, body, limits, &app.config.network).await?;
    let obj = as_object(&body)?;
    let device = device_of(obj)?;
    let changes = parse_changes(obj.get("changes"), limits, true)?;
    let now = app.clock.now_ms();
    let batch =
        PushBatch { user, device, changes, now, max_clock_drift_ms: limits.max_clock_drift_ms, require_cursor: None };
    match app.store.push(batch, app.config.policies.clone()).await? {
        PushOutcome::Committed { results, head } => Ok(Json(PushResponse {
            results: counted(results),
            cursor: head.seq,
            state_hash: head.state_hash,
            state_digest: head.state_digest,
            server_time: now,
        })),
        PushOutcome::ResetRequired { .. } => Err(ApiError::Internal("push without a cursor asked for a reset".into())),
    }
}

/// Counts the results in the metrics, and gives them back.
fn counted(results: Vec<deltasync_protocol::wire::PushResult>) -> Vec<deltasync_protocol::wire::PushResult> {
    crate::telemetry::count_results(&results);
    results
}
