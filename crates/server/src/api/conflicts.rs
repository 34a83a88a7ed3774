//! `GET /v1/conflicts`: conflict records, oldest first, paged by record id.

use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use deltasync_protocol::wire::{ConflictsResponse, DEFAULT_CONFLICTS_LIMIT, MAX_CONFLICTS_LIMIT};

use super::query::Query;
use super::{ApiError, AppState, AuthUser};

/// Handles a conflicts request.
pub async fn conflicts(
    State(app): State<Arc<AppState>>,
    AuthUser(user): AuthUser,
    RawQuery(raw): RawQuery,
) -> Result<Json<ConflictsResponse>, ApiError> {
    let q = Query::parse(raw.as_deref())?;
    // Record ids are stored as signed 64-bit integers: none lies past i64::MAX,
    // so a larger `since` asks for nothing (rather than wrapping to a negative id).
    let since = q.u64("since", 0)?;
    let stored_since = since.min(i64::MAX as u64);
    let limit = q.limit("limit", DEFAULT_CONFLICTS_LIMIT, MAX_CONFLICTS_LIMIT)?;
    let page = app.store.conflicts(&user, stored_since, limit).await?;
    let cursor = page.records.last().map_or(since, |r| r.id);
    Ok(Json(ConflictsResponse { conflicts: page.records, cursor, has_more: page.has_more }))
}
