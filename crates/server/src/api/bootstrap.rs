//! `GET /v1/bootstrap`: the whole current state as NDJSON, from one snapshot.
//!
//! A bootstrap holds a database snapshot while it streams, so how many run at
//! once is bounded: `max_bootstraps_per_user` for one user (more answer 429),
//! `max_bootstraps` in all (more answer 503), both with `Retry-After`. A
//! bootstrap whose client stops reading is abandoned after `write_timeout_secs`
//! (see [`crate::store::chunks`]) and its slot freed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use deltasync_protocol::UserId;
use deltasync_protocol::wire::{BootstrapEnd, BootstrapHeader};
use futures_util::StreamExt;

use super::query::Query;
use super::{ApiError, AppState, AuthUser, parse_device};
use crate::config::Limits;
use crate::refusals::RefusalCounter;
use crate::store::DeviceTouch;

/// How long a client refused for too many bootstraps is told to wait.
const RETRY_AFTER_SECS: u64 = 5;

/// The bootstraps streaming now, in all and per user.
#[derive(Default)]
pub struct BootstrapSlots {
    taken: Mutex<Taken>,
}

#[derive(Default)]
struct Taken {
    total: usize,
    per_user: HashMap<UserId, usize>,
    refused_per_user: RefusalCounter,
    refused_total: RefusalCounter,
}

/// One streaming bootstrap's place; freed when dropped (the stream ended or was dropped).
pub struct BootstrapSlot {
    slots: Arc<AppState>,
    user: UserId,
}

impl BootstrapSlots {
    /// Takes a slot for `user`, or refuses with the limit that is reached.
    fn take(app: &Arc<AppState>, user: &UserId, limits: &Limits) -> Result<BootstrapSlot, ApiError> {
        let mut taken = app.bootstraps.taken.lock().expect("bootstrap slots lock");
        let Taken { total, per_user, refused_per_user, refused_total } = &mut *taken;
        let mine = per_user.get(user).copied().unwrap_or(0);
        if mine >= limits.max_bootstraps_per_user {
            if let Some(refused) = refused_per_user.count() {
                tracing::warn!(
                    last_user = %user,
                    refused,
                    max_bootstraps_per_user = limits.max_bootstraps_per_user,
                    "bootstraps refused: a user's cap reached"
                );
            }
            return Err(ApiError::RateLimited {
                message: format!(
                    "this user already has {mine} bootstraps streaming (max_bootstraps_per_user is {}); finish or close one, then retry",
                    limits.max_bootstraps_per_user
                ),
                retry_after_secs: RETRY_AFTER_SECS,
            });
        }
        if *total >= limits.max_bootstraps {
            if let Some(refused) = refused_total.count() {
                tracing::warn!(
                    refused,
                    max_bootstraps = limits.max_bootstraps,
                    "bootstraps refused: the server's cap reached"
                );
            }
            return Err(ApiError::Unavailable(format!(
                "the server is streaming {total} bootstraps, its maximum (max_bootstraps); retry later"
            )));
        }
        *total += 1;
        per_user.insert(user.clone(), mine + 1);
        Ok(BootstrapSlot { slots: app.clone(), user: user.clone() })
    }
}

impl Drop for BootstrapSlot {
    fn drop(&mut self) {
        let mut taken = self.slots.bootstraps.taken.lock().expect("bootstrap slots lock");
        let Taken { total, per_user, .. } = &mut *taken;
        *total -= 1;
        if let Some(n) = per_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                per_user.remove(&self.user);
            }
        }
    }
}

/// Handles a bootstrap.
pub async fn bootstrap(
    State(app): State<Arc<AppState>>,
    AuthUser(user): AuthUser,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Query::parse(raw.as_deref())?;
    let device = q.str("device_id").map(parse_device).transpose()?;
    let slot = BootstrapSlots::take(&app, &user, &app.config.limits)?;
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
    _slot: BootstrapSlot,
}

impl<S> CountingStream<S> {
    fn new(inner: S, slot: BootstrapSlot) -> Self {
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
