//! `GET /v1/live?device_id=D`: a WebSocket on which the server sends the
//! dataset's head, `{"cursor", "state_hash", "state_digest"}`, at once and
//! then whenever it moves, so a device syncs within milliseconds of another
//! device's push (docs/protocol.md, "Live updates"). It carries no changes:
//! the client syncs or pulls as it would anyway.
//!
//! - The token comes in `Authorization`, or, since browsers cannot set
//!   headers on a WebSocket, as the subprotocol `bearer.<token>`. The server
//!   selects the subprotocol `deltasync.live` when offered, else the bearer one.
//! - One user holds at most `max_live_per_user` connections; past it the
//!   upgrade is answered `429 rate_limited` with `Retry-After`.
//! - A live socket stays the connection it came on: it keeps that
//!   connection's place under `max_connections` and its write timeout.
//! - The server pings every `live_ping_secs` and closes a peer that answers
//!   nothing for two of them; it closes every socket at shutdown.
//! - Across instances on PostgreSQL, heads arrive through the store's
//!   NOTIFY listener, as for long polls.
//! - A head that moves is read from the store once for all of a user's
//!   sockets ([`LiveHeads`]), not once per socket: 10,000 sockets of one
//!   user cost one read per push.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use deltasync_protocol::UserId;
use deltasync_protocol::wire::LiveHead;
use tokio::time::{Instant, MissedTickBehavior};

use super::query::Query;
use super::slots::{Caps, Refusal, Slot};
use super::{ApiError, AppState, parse_device};
use crate::batch::DatasetHead;
use crate::net::ConnectionHold;
use crate::store::{DeviceTouch, Store, StoreError};

/// The subprotocol a client offers to say it speaks this endpoint.
pub const LIVE_PROTOCOL: &str = "deltasync.live";
/// The prefix of the subprotocol that carries the token.
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";
/// The largest message the server reads from a live client (it expects only pongs).
const MAX_CLIENT_MESSAGE: usize = 4 * 1024;
/// A socket's read buffer (tungstenite's default is 128 KiB, which 10,000
/// idle sockets would hold for nothing).
const READ_BUFFER: usize = 4 * 1024;
/// The most a socket queues for a client that does not read; past it a send
/// fails and the socket closes (a head is ~170 bytes).
const MAX_WRITE_BUFFER: usize = 64 * 1024;
/// How long a client refused for too many live connections is told to wait.
const RETRY_AFTER_SECS: u64 = 30;

/// The newest head read for each user with live sockets, shared by those
/// sockets.
#[derive(Default)]
pub struct LiveHeads {
    users: Mutex<HashMap<UserId, Weak<SharedHead>>>,
}

/// One user's newest head read.
#[derive(Default)]
struct SharedHead {
    newest: tokio::sync::Mutex<Option<DatasetHead>>,
}

/// A socket's share of its user's head; the user's entry goes with the last share.
struct HeadShare {
    heads: Arc<LiveHeads>,
    user: UserId,
    shared: Arc<SharedHead>,
}

impl LiveHeads {
    /// A share of `user`'s head for one more socket.
    fn share(self: &Arc<Self>, user: &UserId) -> HeadShare {
        let mut users = self.users.lock().expect("live heads lock");
        let shared = match users.get(user).and_then(Weak::upgrade) {
            Some(shared) => shared,
            None => {
                let shared = Arc::new(SharedHead::default());
                users.insert(user.clone(), Arc::downgrade(&shared));
                shared
            }
        };
        HeadShare { heads: self.clone(), user: user.clone(), shared }
    }

    /// How many users have live sockets.
    pub fn users(&self) -> usize {
        self.users.lock().expect("live heads lock").len()
    }
}

impl HeadShare {
    /// The user's head at `seq` or newer: read from the store by the first
    /// socket that asks after it moved (or always, when `fresh`), and taken
    /// from that read by the others.
    async fn at_least(&self, store: &dyn Store, seq: u64, fresh: bool) -> Result<DatasetHead, StoreError> {
        let mut newest = self.shared.newest.lock().await;
        if !fresh
            && let Some(head) = newest.as_ref()
            && head.seq >= seq
        {
            return Ok(*head);
        }
        let head = store.head(&self.user).await?;
        *newest = Some(head);
        Ok(head)
    }
}

impl Drop for HeadShare {
    fn drop(&mut self) {
        let mut users = self.heads.users.lock().expect("live heads lock");
        // Under the lock, no other socket can take a share meanwhile: one
        // strong count left is this share's own.
        if Arc::strong_count(&self.shared) == 1 {
            users.remove(&self.user);
        }
    }
}

/// The subprotocols a client offered.
fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// The user, from `Authorization` or else from a `bearer.<token>` subprotocol.
async fn authenticate(app: &AppState, headers: &HeaderMap, offered: &[String]) -> Result<UserId, ApiError> {
    let from_protocol =
        offered.iter().find_map(|p| p.strip_prefix(BEARER_PROTOCOL_PREFIX)).map(|token| format!("Bearer {token}"));
    let authorization =
        headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()).or(from_protocol.as_deref().map(str::as_bytes));
    Ok(super::authenticate(app, authorization).await?)
}

/// Handles the upgrade to a live socket.
pub async fn live(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    hold: Option<axum::Extension<ConnectionHold>>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let offered = offered_protocols(&headers);
    let user = authenticate(&app, &headers, &offered).await?;
    let q = Query::parse(raw.as_deref())?;
    let device =
        parse_device(q.str("device_id").ok_or_else(|| ApiError::invalid("query parameter device_id is required"))?)?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::invalid(format!(
            "GET /v1/live is a WebSocket endpoint: send a WebSocket upgrade request (Connection: Upgrade, \
             Upgrade: websocket, Sec-WebSocket-Version: 13) ({e})"
        ))
    })?;
    let limits = &app.config.limits;
    let caps =
        Caps { what: "live connections", per_user: (limits.max_live_per_user, "max_live_per_user"), total: None };
    let slot = app.live.take(&user, caps).map_err(|refusal| {
        let held = match refusal {
            Refusal::PerUser(n) | Refusal::Total(n) => n,
        };
        ApiError::RateLimited {
            message: format!(
                "this user already has {held} live connections open (max_live_per_user is {}); close one, then retry",
                limits.max_live_per_user
            ),
            retry_after_secs: RETRY_AFTER_SECS,
        }
    })?;
    app.store.touch_device(DeviceTouch::new(&user, &device, None, app.clock.now_ms())).await?;
    let chosen = if offered.iter().any(|p| p == LIVE_PROTOCOL) {
        Some(LIVE_PROTOCOL.to_owned())
    } else {
        offered.iter().find(|p| p.starts_with(BEARER_PROTOCOL_PREFIX)).cloned()
    };
    let upgrade = match chosen {
        Some(protocol) => upgrade.protocols([protocol]),
        None => upgrade,
    };
    let hold = hold.map(|axum::Extension(h)| h);
    Ok(upgrade
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .on_upgrade(move |socket| serve_live(socket, app, user, LiveHold { _slot: slot, _connection: hold })))
}

/// What a live socket holds until it closes.
struct LiveHold {
    _slot: Slot,
    _connection: Option<ConnectionHold>,
}

/// Why a live socket ended, for the log.
#[derive(Debug, Clone, Copy)]
enum Ended {
    ClientClosed,
    Dead,
    SendFailed,
    ShuttingDown,
    StoreFailed,
}

/// Sends the head at once and on every move, pings, and ends on close,
/// silence, a failed send or shutdown.
async fn serve_live(mut socket: WebSocket, app: Arc<AppState>, user: UserId, hold: LiveHold) {
    let ended = run(&mut socket, &app, &user).await;
    let close = match ended {
        Ended::ShuttingDown => Some((close_code::AWAY, "the server is shutting down")),
        Ended::Dead => Some((close_code::POLICY, "no answer to pings")),
        Ended::StoreFailed => Some((close_code::ERROR, "the store failed; sync, then reconnect")),
        Ended::ClientClosed | Ended::SendFailed => None,
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame { code, reason: reason.into() };
        let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(Message::Close(Some(frame)))).await;
    }
    tracing::debug!(%user, ?ended, "live connection closed");
    drop(hold);
}

async fn run(socket: &mut WebSocket, app: &AppState, user: &UserId) -> Ended {
    let share = app.live_heads.share(user);
    let mut heads = app.store.subscribe(user);
    let mut shutdown = app.shutdown.clone();
    let every = app.config.network.live_ping_interval;
    let mut ping = tokio::time::interval_at(Instant::now() + every, every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    let mut sent: Option<u64> = None;
    loop {
        if *shutdown.borrow() {
            return Ended::ShuttingDown;
        }
        let seq = *heads.borrow_and_update();
        // The first head is read for this socket: the one it opens on must be current.
        let head = match share.at_least(&*app.store, seq, sent.is_none()).await {
            Ok(head) => head,
            Err(e) => {
                tracing::warn!(%user, error = %e, "live connection: cannot read the head");
                return Ended::StoreFailed;
            }
        };
        if sent != Some(head.seq) {
            let message = LiveHead { cursor: head.seq, state_hash: head.state_hash, state_digest: head.state_digest };
            let text = serde_json::to_string(&message).expect("a head serialises");
            if socket.send(Message::Text(text.into())).await.is_err() {
                return Ended::SendFailed;
            }
            sent = Some(head.seq);
        }
        loop {
            tokio::select! {
                changed = heads.changed() => {
                    if changed.is_err() {
                        return Ended::ShuttingDown;
                    }
                    break;
                }
                _ = shutdown.changed() => return Ended::ShuttingDown,
                message = socket.recv() => match message {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ended::ClientClosed,
                    Some(Ok(_)) => heard = Instant::now(),
                },
                _ = ping.tick() => {
                    if heard.elapsed() >= every * 2 {
                        return Ended::Dead;
                    }
                    if socket.send(Message::Ping(Default::default())).await.is_err() {
                        return Ended::SendFailed;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_head_is_shared_while_one_of_its_sockets_is_open() {
        let heads = Arc::new(LiveHeads::default());
        let (alice, bob) = (UserId::parse("alice").unwrap(), UserId::parse("bob").unwrap());
        let first = heads.share(&alice);
        let second = heads.share(&alice);
        assert!(Arc::ptr_eq(&first.shared, &second.shared), "two sockets of one user share one head");
        let other = heads.share(&bob);
        assert!(!Arc::ptr_eq(&first.shared, &other.shared));
        assert_eq!(heads.users(), 2);
        drop(first);
        assert_eq!(heads.users(), 2, "alice still has a socket");
        drop(second);
        assert_eq!(heads.users(), 1, "alice's entry goes with her last socket");
        drop(other);
        assert_eq!(heads.users(), 0);
    }
}
