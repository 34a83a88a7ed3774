//! `POST /v1/sync`: push then pull in one round trip, leaving out what was just pushed.

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use deltasync_protocol::wire::{DEFAULT_PULL_LIMIT, MAX_PULL_LIMIT, PushResult};
use serde_json::Value;

use super::body::read_json;
use super::changes::{as_object, device_of, json_response, parse_changes, write_changes, write_page_tail};
use super::pull::{page_limit, reset_required};
use super::query::check_limit;
use super::{ApiError, AppState, AuthUser};
use crate::store::{DeviceTouch, PageOutcome, PushBatch, PushOutcome};

fn body_u64(v: Option<&Value>, name: &str, default: u64) -> Result<u64, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(v),
            // An integer literal past u64 is above every maximum: clamped like any large value.
            None if n.as_str().bytes().all(|b| b.is_ascii_digit()) => Ok(u64::MAX),
            None => Err(ApiError::invalid(format!("member `{name}` must be a non-negative integer"))),
        },
        Some(_) => Err(ApiError::invalid(format!("member `{name}` must be a non-negative integer"))),
    }
}

/// Handles a sync.
pub async fn sync(
    State(app): State<Arc<AppState>>,
    AuthUser(user): AuthUser,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let limits = &app.config.limits;
    let body = read_json(&headers, body, limits, &app.config.network).await?;
    let obj = as_object(&body)?;
    let device = device_of(obj)?;
    let cursor = body_u64(obj.get("cursor"), "cursor", 0)?;
    let limit = check_limit("limit", body_u64(obj.get("limit"), "limit", DEFAULT_PULL_LIMIT)?, MAX_PULL_LIMIT)?;
    let changes = parse_changes(obj.get("changes"), limits, false)?;
    let now = app.clock.now_ms();
    let mut results: Vec<PushResult> = Vec::new();
    if !changes.is_empty() {
        let batch = PushBatch {
            user: user.clone(),
            device: device.clone(),
            changes,
            now,
            max_clock_drift_ms: limits.max_clock_drift_ms,
            require_cursor: Some(cursor),
        };
        match app.store.push(batch, app.config.policies.clone()).await? {
            PushOutcome::Committed { results: r, .. } => {
                crate::telemetry::count_results(&r);
                results = r;
            }
            PushOutcome::ResetRequired { head } => {
                app.store.touch_device(DeviceTouch::new(&user, &device, None, now)).await?;
                return Err(reset_required(cursor, &head));
            }
        }
    }
    let page = match app.store.changes_since(&user, cursor, page_limit(&app, limit)).await? {
        PageOutcome::Page(p) => p,
        PageOutcome::ResetRequired { head } => {
            app.store.touch_device(DeviceTouch::new(&user, &device, None, now)).await?;
            return Err(reset_required(cursor, &head));
        }
    };
    app.store.touch_device(DeviceTouch::new(&user, &device, Some(page.cursor), now)).await?;
    let pushed: HashSet<u64> = results.iter().filter_map(|r| r.seq).collect();
    let mut out = Vec::with_capacity(256 + page.changes.iter().map(|(_, j)| j.len() + 1).sum::<usize>());
    out.extend_from_slice(b"{\"results\":");
    serde_json::to_writer(&mut out, &results).map_err(|e| ApiError::Internal(e.to_string()))?;
    out.push(b',');
    write_changes(&mut out, &page, |seq| pushed.contains(&seq));
    write_page_tail(&mut out, &page, now);
    Ok(json_response(out))
}
