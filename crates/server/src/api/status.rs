//! `GET /v1/status`: the dataset head, policies and devices.

use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use deltasync_protocol::wire::StatusResponse;

use super::query::Query;
use super::{ApiError, AppState, AuthUser, parse_device};
use crate::store::DeviceTouch;

/// Handles a status request.
pub async fn status(
    State(app): State<Arc<AppState>>,
    AuthUser(user): AuthUser,
    RawQuery(raw): RawQuery,
) -> Result<Json<StatusResponse>, ApiError> {
    let q = Query::parse(raw.as_deref())?;
    let now = app.clock.now_ms();
    if let Some(device) = q.str("device_id").map(parse_device).transpose()? {
        app.store.touch_device(DeviceTouch::new(&user, &device, None, now)).await?;
    }
    let status = app.store.status(&user).await?;
    Ok(Json(StatusResponse {
        user_id: user.into_string(),
        head: status.head.seq,
        state_hash: status.head.state_hash,
        state_digest: status.head.state_digest,
        horizon: status.head.horizon,
        policies: app.config.policies.clone(),
        devices: status.devices,
        server_time: now,
    }))
}
