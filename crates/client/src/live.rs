//! The live channel (`GET /v1/live`, docs/protocol.md "Live updates"): a
//! WebSocket on which the server sends its head whenever it moves.
//!
//! The socket is opened through the same HTTP client as every other request
//! (its TLS, its proxies, its connect timeout), as an HTTP/1.1 upgrade that
//! this module checks (`Sec-WebSocket-Accept`); tungstenite then speaks the
//! WebSocket protocol on the upgraded connection. A server without the
//! endpoint answers 404, which [`LiveError::Unsupported`] names so that the
//! runner falls back to the long poll. The client pings every
//! [`PING_EVERY`] and gives the socket up when nothing at all arrived for
//! [`SILENCE_LIMIT`], so a server that vanished without closing is noticed.

use std::time::Duration;

use deltasync_engine::transport::LIVE;
use deltasync_engine::{Error, Result, TimeoutKind};
use deltasync_protocol::wire::LiveHead;
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// How often the client pings the server.
pub const PING_EVERY: Duration = Duration::from_secs(20);
/// How long the socket may bring nothing (no head, no pong) before the
/// client gives it up.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(45);
/// The largest message the client reads (a head is ~170 bytes).
const MAX_MESSAGE: usize = 64 * 1024;
/// The subprotocol the client offers.
const PROTOCOL: &str = "deltasync.live";

/// An open live channel.
pub struct LiveSocket {
    ws: WebSocketStream<reqwest::Upgraded>,
    heard: Instant,
    ping: tokio::time::Interval,
    url: String,
}

impl std::fmt::Debug for LiveSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSocket").field("url", &self.url).finish_non_exhaustive()
    }
}

impl LiveSocket {
    /// Finishes the upgrade `response` answered to a request that sent `key`.
    pub(crate) async fn accept(response: reqwest::Response, key: &str, url: String) -> Result<LiveSocket> {
        let accept = response.headers().get("sec-websocket-accept").and_then(|v| v.to_str().ok()).map(str::to_owned);
        if accept.as_deref() != Some(derive_accept_key(key.as_bytes()).as_str()) {
            return Err(Error::Protocol {
                request: LIVE,
                message: format!("the upgrade's Sec-WebSocket-Accept is {accept:?}, not the one the key asks for"),
            });
        }
        let upgraded =
            response.upgrade().await.map_err(|e| Error::Unreachable { url: url.clone(), message: e.to_string() })?;
        let config = WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE)).max_frame_size(Some(MAX_MESSAGE));
        let ws = WebSocketStream::from_raw_socket(upgraded, Role::Client, Some(config)).await;
        let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(LiveSocket { ws, heard: Instant::now(), ping, url })
    }

    /// The headers of the upgrade request, with a fresh key (returned too).
    pub(crate) fn upgrade_headers() -> (Vec<(&'static str, String)>, String) {
        let key = generate_key();
        let headers = vec![
            ("connection", "Upgrade".to_owned()),
            ("upgrade", "websocket".to_owned()),
            ("sec-websocket-version", "13".to_owned()),
            ("sec-websocket-key", key.clone()),
            ("sec-websocket-protocol", PROTOCOL.to_owned()),
        ];
        (headers, key)
    }

    /// The next head the server sends; `None` once the server closed the
    /// socket. Pings the server meanwhile, and fails when the socket stays
    /// silent for [`SILENCE_LIMIT`].
    pub async fn next_head(&mut self) -> Result<Option<LiveHead>> {
        loop {
            let silent_until = self.heard + SILENCE_LIMIT;
            tokio::select! {
                message = self.ws.next() => {
                    self.heard = Instant::now();
                    match message {
                        None | Some(Ok(Message::Close(_))) => return Ok(None),
                        Some(Ok(Message::Text(text))) => {
                            return serde_json::from_str(&text).map(Some).map_err(|e| Error::Protocol {
                                request: LIVE,
                                message: format!("cannot read a live message ({e}): {text}"),
                            });
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(Error::Unreachable { url: self.url.clone(), message: e.to_string() }),
                    }
                }
                _ = self.ping.tick() => {
                    if let Err(e) = self.ws.send(Message::Ping(Default::default())).await {
                        return Err(Error::Unreachable { url: self.url.clone(), message: e.to_string() });
                    }
                }
                _ = tokio::time::sleep_until(silent_until) => {
                    return Err(Error::Timeout { kind: TimeoutKind::Stall, operation: LIVE.to_owned(), after: SILENCE_LIMIT });
                }
            }
        }
    }

    /// Closes the socket (politely, within a second).
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.close(None)).await;
    }
}
