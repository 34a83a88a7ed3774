//! `GET /v1/bootstrap`: the whole current state as NDJSON, from one snapshot.
//!
//! A bootstrap holds a database snapshot while it streams, so how many run at
//! once is bounded: `max_bootstraps_per_user` for one user (more answer 429),
//! `max_bootstraps` in all (more answer 503), both with `Retry-After`. A
//! bootstrap whose client stops reading is abandoned after `write_timeout_secs`
//! (see [`crate::store::chunks`]) and its slot freed.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use deltasync_protocol::UserId;
use deltasync_protocol::wire::{BootstrapEnd, BootstrapHeader};
use futures_util::StreamExt;

use super::query::Query;
use super::slots::{Caps, Refusal, Slot};
use super::{ApiError, AppState, AuthUser, parse_device};
use crate::config::Limits;
use crate::store::DeviceTouch;

/// How long a client refused for too many bootstraps is told to wait.
const RETRY_AFTER_SECS: u64 = 5;

/// Takes a bootstrap's place for `user`, or refuses with the limit that is reached.
fn take_slot(app: &Arc<AppState>, user: &UserId, limits: &Limits) -> Result<Slot, ApiError> {
    let caps = Caps {
        what: "bootstraps",
        per_user: (limits.max_bootstraps_per_user, "max_bootstraps_per_user"),
        total: Some((limits.max_bootstraps, "max_bootstraps")),
    };
    app.bootstraps.take(user, caps).map_err(|refusal| match refusal {
        Refusal::PerUser(mine) => ApiError::RateLimited {
            message: format!(
                "this user already has {mine} bootstraps streaming (max_bootstraps_per_user is {}); finish or close one, then retry",
                limits.max_bootstraps_per_user
            ),
            retry_after_secs: RETRY_AFTER_SECS,
        },
        Refusal::Total(total) => ApiError::Unavailable(format!(
            "the server is streaming {total} bootstraps, its maximum (max_bootstraps); retry later"
        )),
    })
}

/// Handles a bootstrap.
pub async fn bootstrap(
    State(app): State<Arc<AppState>>,
    AuthUser(user): AuthUser,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Query::parse(raw.as_deref())?;
    let device = q.str("device_id").map(parse_device).transpose()?;
    let slot = take_slot(&app, &user, &app.config.limits)?;
    let snapshot = app.store.bootstrap(&user, app.config.network.write_timeout).await?;
    let now = app.clock.now_ms();
    if let Some(device) = &device {
        app.store.touch_device(DeviceTouch::new(&user, device, Some(snapshot.head.seq), now)).await?;
    }
    let header_line = BootstrapHeader {
        cursor: snapshot.head.seq,
        state_hash: snapshot.head.state_hash,
        state_digest: snapshot.head.state_digest,
        server_time: now,
        policies: app.config.policies.clone(),
    };
    let mut first = serde_json::to_vec(&header_line).map_err(|e| ApiError::Internal(e.to_string()))?;
    first.push(b'\n');
    let head = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(Bytes::from(first)) });
    let lines = snapshot.lines.map(|chunk| chunk.map_err(|e| std::io::Error::other(e.to_string())));
    let stream = head.chain(CountingStream::new(lines, slot));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response())
}

/// Passes NDJSON chunks through, counting lines, then emits the end line.
/// After an error it stops without an end line, so a client sees the stream is incomplete.
/// It holds the bootstrap's slot until it is dropped.
struct CountingStream<S> {
    inner: S,
    count: u64,
    ended: bool,
    _slot: Slot,
}

impl<S> CountingStream<S> {
    fn new(inner: S, slot: Slot) -> Self {
        CountingStream { inner, count: 0, ended: false, _slot: slot }
    }
}

impl<S> futures_util::Stream for CountingStream<S>
where
    S: futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
{
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(bytes))) => {
                self.count += bytes.iter().filter(|b| **b == b'\n').count() as u64;
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.ended = true;
                let mut line = serde_json::to_vec(&BootstrapEnd { end: true, count: self.count }).expect("serialises");
                line.push(b'\n');
                Poll::Ready(Some(Ok(Bytes::from(line))))
            }
        }
    }
}
