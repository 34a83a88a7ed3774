//! `GET /v1/pull`: the changes after a cursor, optionally waiting for them.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::response::Response;
use deltasync_protocol::UserId;
use deltasync_protocol::wire::{DEFAULT_PULL_LIMIT, MAX_PULL_LIMIT, MAX_WAIT_SECS};

use super::changes::{json_response, write_changes, write_page_tail};
use super::query::Query;
use super::slots::{Caps, Slot};
use super::{ApiError, AppState, AuthUser, parse_device};
use crate::store::{ChangePage, DatasetHead, DeviceTouch, PageLimit, PageOutcome};

/// The 410 answer for a cursor outside `horizon..=head`.
pub fn reset_required(cursor: u64, head: &DatasetHead) -> ApiError {
    ApiError::ResetRequired(format!(
        "cursor {cursor} is outside this dataset's log (horizon {}, head {}); bootstrap again with GET /v1/bootstrap",
        head.horizon, head.seq
    ))
}

/// When a user's waiting polls are at `max_waiting_polls`, how long to wait before another.
const WAITING_POLL_RETRY_SECS: u64 = 5;

/// Takes a place for one more waiting poll of `user`, or refuses it with
/// `429 rate_limited` past `max_waiting_polls`.
fn take_waiting_poll(app: &AppState, user: &UserId) -> Result<Slot, ApiError> {
    let cap = app.config.rate.max_waiting_polls;
    let caps = Caps { what: "waiting polls", per_user: (cap, "max_waiting_polls"), total: None };
    app.waiting_polls.take(user, caps).map_err(|_| ApiError::RateLimited {
        message: format!(
            "this user already has {cap} long polls waiting ([limits] max_waiting_polls); \
             one poll per device is enough, or pull without wait"
        ),
        retry_after_secs: WAITING_POLL_RETRY_SECS,
    })
}

/// A page of at most `rows` changes within the configured `max_page_bytes`.
pub fn page_limit(app: &AppState, rows: u64) -> PageLimit {
    PageLimit { rows, bytes: app.config.limits.max_page_bytes as u64 }
}

/// Reads a page, waiting up to `wait` for a change when there is none yet.
pub async fn page_or_wait(
    app: &AppState,
    user: &UserId,
    cursor: u64,
    limit: u64,
    wait: Duration,
) -> Result<ChangePage, ApiError> {
    let mut heads = app.store.subscribe(user);
    let mut shutdown = app.shutdown.clone();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        heads.borrow_and_update();
        let page = match app.store.changes_since(user, cursor, page_limit(app, limit)).await? {
            PageOutcome::Page(p) => p,
            PageOutcome::ResetRequired { head } => return Err(reset_required(cursor, &head)),
        };
        if !page.changes.is_empty() || wait.is_zero() || *shutdown.borrow() {
            return Ok(page);
        }
        tokio::select! {
            changed = heads.changed() => if changed.is_err() { return Ok(page) },
            _ = shutdown.changed() => return Ok(page),
            _ = tokio::time::sleep_until(deadline) => return Ok(page),
        }
    }
}

/// Handles a pull.
pub async fn pull(
    State(app): State<Arc<AppState>>,
    AuthUser(user): AuthUser,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Query::parse(raw.as_deref())?;
    let device =
        parse_device(q.str("device_id").ok_or_else(|| ApiError::invalid("query parameter device_id is required"))?)?;
    let cursor = q.u64("cursor", 0)?;
    let limit = q.limit("limit", DEFAULT_PULL_LIMIT, MAX_PULL_LIMIT)?;
    let wait = Duration::from_secs(q.u64("wait", 0)?.min(MAX_WAIT_SECS));
    let _waiting = if wait.is_zero() { None } else { Some(take_waiting_poll(&app, &user)?) };
    let page = page_or_wait(&app, &user, cursor, limit, wait).await;
    let now = app.clock.now_ms();
    let given = page.as_ref().ok().map(|p| p.cursor);
    app.store.touch_device(DeviceTouch::new(&user, &device, given, now)).await?;
    let page = page?;
    let mut out = Vec::with_capacity(64 + page.changes.iter().map(|(_, j)| j.len() + 1).sum::<usize>() + 256);
    out.push(b'{');
    write_changes(&mut out, &page, |_| false);
    write_page_tail(&mut out, &page, now);
    Ok(json_response(out))
}
