//! Connections: accepting them within a cap, giving each its deadlines, and
//! closing them all within a bounded time at shutdown.
//!
//! - At most `max_connections` are open at once (lowered to fit the process's
//!   open-file limit, which is raised to its hard limit first); past the cap a
//!   new connection is closed at once and the refusal logged, so the
//!   connections already open keep being served.
//! - Each connection has a watchdog ([`activity`]): a header must arrive
//!   within `header_read_timeout`, an idle connection is closed after
//!   `keep_alive_timeout`.
//! - Its socket ([`socket`]) fails a write that makes no progress for
//!   `write_timeout`, so a client that stops reading cannot hold an answer
//!   (and what produces it) forever.
//! - At shutdown the listener closes, every connection is asked to finish its
//!   requests and close, and whatever is still open after `shutdown_grace` is
//!   closed.
//!
//! HTTP/1.1 and HTTP/2 (with prior knowledge) are both served; the protocol is
//! told apart by the connection's first bytes.

pub mod activity;
pub mod socket;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tower_service::Service;

use self::activity::{Activity, IdleDeadlines, InFlight};
use self::socket::WatchedSocket;
use crate::config::Network;
use crate::refusals::RefusalCounter;

/// The largest request header hyper buffers; past it the request is answered 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The most header fields one request may have; past it the request is answered 431.
pub const MAX_HEADER_FIELDS: usize = 100;
/// The most HTTP/2 streams (requests) one connection may have open at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 64;
/// File descriptors kept for the store and the process itself, outside the connection cap.
const RESERVED_FDS: u64 = 256;

/// Raises the open-file soft limit to the hard limit and returns the cap on
/// connections that fits in it.
pub fn connection_cap(configured: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit; keeping max_connections as configured");
            return configured;
        }
    };
    let fitting = limit.saturating_sub(RESERVED_FDS).max(1);
    if (configured as u64) > fitting {
        tracing::warn!(
            max_connections = configured,
            open_file_limit = limit,
            using = fitting,
            "max_connections does not fit in the open-file limit; raise the hard limit (ulimit -Hn) to allow more"
        );
        fitting as usize
    } else {
        configured
    }
}

/// A connection's place under `max_connections`, shared with whatever
/// outlives its HTTP exchange: a live WebSocket holds it (through the
/// request's extensions) until it closes, so upgraded connections count too.
#[derive(Clone)]
pub struct ConnectionHold {
    _permit: Arc<OwnedSemaphorePermit>,
}

/// The per-connection settings.
#[derive(Clone, Copy)]
struct ConnectionSettings {
    idle: IdleDeadlines,
    write_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves, then closes every
/// connection within `network.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    network: &Network,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let cap = connection_cap(network.max_connections);
    let permits = Arc::new(Semaphore::new(cap));
    let settings = ConnectionSettings {
        idle: IdleDeadlines {
            header_read_timeout: network.header_read_timeout,
            keep_alive_timeout: network.keep_alive_timeout,
        },
        write_timeout: network.write_timeout,
    };
    let builder = Arc::new(http_builder());
    let (closing_tx, closing) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut refusals = RefusalCounter::default();
    let mut accept_errors = RefusalCounter::default();
    tracing::debug!(max_connections = cap, "accepting connections");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        if let Some(refused) = refusals.count() {
                            tracing::warn!(
                                max_connections = cap,
                                refused,
                                last_peer = %peer,
                                "connection cap reached: refusing new connections until open ones close"
                            );
                        }
                        drop(stream);
                        continue;
                    };
                    let (app, builder, closing) = (app.clone(), builder.clone(), closing.clone());
                    let hold = ConnectionHold { _permit: Arc::new(permit) };
                    connections.spawn(async move {
                        serve_connection(stream, PeerAddr(peer.ip()), app, &builder, settings, closing, hold).await;
                    });
                }
                Err(e) => {
                    // Out of file descriptors (or another transient failure): back off
                    // briefly instead of spinning, and keep serving open connections.
                    if let Some(failed) = accept_errors.count() {
                        tracing::error!(error = %e, failed, "cannot accept a connection");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let open = connections.len();
    tracing::info!(
        open,
        grace_secs = network.shutdown_grace.as_secs(),
        "no longer accepting; finishing open connections"
    );
    let _ = closing_tx.send(true);
    let deadline = tokio::time::sleep(network.shutdown_grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = connections.join_next() => if next.is_none() { break },
            _ = &mut deadline => {
                let left = connections.len();
                tracing::warn!(
                    connections = left,
                    "shutdown_grace_secs passed: closing the connections still open"
                );
                connections.shutdown().await;
                break;
            }
        }
    }
    Ok(())
}

fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADER_FIELDS)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    builder
}

/// Serves one connection until it ends, its watchdog expires, or shutdown is
/// asked for (then it finishes its requests first).
async fn serve_connection(
    stream: TcpStream,
    peer: PeerAddr,
    app: Router,
    builder: &auto::Builder<TokioExecutor>,
    settings: ConnectionSettings,
    mut closing: watch::Receiver<bool>,
    hold: ConnectionHold,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let socket = WatchedSocket::new(stream, activity.clone(), settings.write_timeout);
    let service = TrackedService { app, activity: activity.clone(), hold, peer };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(socket), service);
    tokio::pin!(connection);
    let mut asked_to_close = *closing.borrow();
    if asked_to_close {
        connection.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            expiry = activity.expired(settings.idle) => {
                tracing::debug!(deadline = expiry.key(), "closing a quiet connection");
                return;
            }
            changed = closing.changed(), if !asked_to_close => {
                asked_to_close = true;
                if changed.is_ok() {
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// The client address of the connection a request came on (a request
/// extension, for limits kept per address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub std::net::IpAddr);

/// The app as hyper calls it, counting each request in flight until its answer is sent.
#[derive(Clone)]
struct TrackedService {
    app: Router,
    activity: Arc<Activity>,
    hold: ConnectionHold,
    peer: PeerAddr,
}

impl hyper::service::Service<hyper::Request<Incoming>> for TrackedService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut request: hyper::Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::start(self.activity.clone());
        request.extensions_mut().insert(self.hold.clone());
        request.extensions_mut().insert(self.peer);
        let mut app = self.app.clone();
        Box::pin(async move {
            let response = app.call(request.map(Body::new)).await?;
            Ok(response.map(|body| TrackedBody { inner: body, _in_flight: in_flight }))
        })
    }
}

/// An answer's body; the request counts as in flight until hyper drops it.
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
