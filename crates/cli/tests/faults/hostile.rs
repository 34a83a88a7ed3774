//! A hostile client: one user who holds the server's connections in every
//! stalled way it can, over and over, while other users sync. Kinds:
//!
//! - a request header that never ends (one more byte every second);
//! - a request body trickled at one byte a second under a large `Content-Length`;
//! - a bootstrap of a large dataset it never reads (on a small receive buffer),
//!   so the server's writes block;
//! - many connections that send nothing at all.
//!
//! Each kind reconnects as soon as the server closes it, and counts how often
//! the server did close it and after how long.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::chaos::Outages;
use super::proxy::FaultProxy;

/// How many connections of each kind the hostile client keeps open.
#[derive(Debug, Clone, Copy)]
pub struct HostileShape {
    /// Connections sending an endless header.
    pub headers: usize,
    /// Connections trickling a body.
    pub bodies: usize,
    /// Bootstraps never read.
    pub bootstraps: usize,
    /// How long a bootstrap is left unread before the hostile client looks at what is left.
    pub bootstrap_hold: Duration,
    /// Connections that send nothing.
    pub idle: usize,
}

/// What the hostile client saw of one kind of connection.
#[derive(Debug, Clone, Default)]
pub struct KindStats {
    /// Connections opened.
    pub opened: u64,
    /// Connections the server closed (or answered and closed) by itself.
    pub closed_by_server: u64,
    /// Connections that ended because the server was killed or its database restarted.
    pub closed_by_outage: u64,
    /// How long each connection lived: closed by the server itself, or still open
    /// when the hostile client stopped (outages left out).
    pub held: Vec<Duration>,
}

/// What the hostile client saw, per kind.
#[derive(Debug, Clone, Default)]
pub struct HostileStats {
    /// Endless headers.
    pub headers: KindStats,
    /// Trickled bodies.
    pub bodies: KindStats,
    /// Unread bootstraps.
    pub bootstraps: KindStats,
    /// Bootstraps refused with 429 (over the per-user cap) instead of served.
    pub bootstraps_refused: u64,
    /// Bytes of bootstrap the hostile client read after the server had closed an unread one.
    pub bootstrap_bytes_after_close: Vec<u64>,
    /// Silent connections.
    pub idle: KindStats,
}

/// A running hostile client; [`Hostile::stop`] ends it.
pub struct Hostile {
    ctx: Ctx,
    shape: HostileShape,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Which [`KindStats`] of [`HostileStats`] a task updates.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Header,
    Body,
    Bootstrap,
    Idle,
}

impl KindStats {
    /// The longest a connection of this kind lived.
    pub fn longest(&self) -> Duration {
        self.held.iter().max().copied().unwrap_or_default()
    }

    /// `opened, closed by the server, closed by an outage, longest lived`, for the summary.
    pub fn summary(&self) -> String {
        format!(
            "{} opened, {} closed by the server, {} by an outage, longest lived {:.1?}",
            self.opened,
            self.closed_by_server,
            self.closed_by_outage,
            self.longest()
        )
    }
}

impl HostileStats {
    fn kind(&mut self, kind: Kind) -> &mut KindStats {
        match kind {
            Kind::Header => &mut self.headers,
            Kind::Body => &mut self.bodies,
            Kind::Bootstrap => &mut self.bootstraps,
            Kind::Idle => &mut self.idle,
        }
    }
}

/// What a hostile task needs: where to connect, how to authenticate, and when to stop.
#[derive(Clone)]
struct Ctx {
    target: Arc<FaultProxy>,
    token: String,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<HostileStats>>,
    outages: Outages,
    bootstrap_hold: Duration,
    /// Bumped to replace the bootstrap holders by fresh ones.
    bootstrap_generation: Arc<AtomicU64>,
}

/// How a hostile connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The server closed it (or answered and closed).
    Closed,
    /// The hostile client stopped while it was still open.
    Stopped,
}

impl Ctx {
    fn record(&self, kind: Kind, f: impl FnOnce(&mut KindStats)) {
        f(self.stats.lock().unwrap().kind(kind));
    }

    /// Records how a connection opened at `opened` ended: a close during an
    /// outage of server 0 is the outage's doing, not the server's protections.
    fn ended(&self, kind: Kind, opened: Instant, end: End) {
        let lived = opened.elapsed();
        let outage = self.outages.overlaps(0, opened, Instant::now(), Duration::from_millis(500));
        self.record(kind, |s| match (end, outage) {
            (End::Closed, true) => s.closed_by_outage += 1,
            (End::Closed, false) => {
                s.closed_by_server += 1;
                s.held.push(lived);
            }
            (End::Stopped, _) => s.held.push(lived),
        });
    }

    /// A connection to the server behind `target` (not through the proxy, so the
    /// server itself is what holds or closes it), with a small receive buffer.
    async fn connect(&self) -> Option<TcpStream> {
        let addr: SocketAddr = self.target.target();
        let socket = TcpSocket::new_v4().ok()?;
        socket.set_recv_buffer_size(4096).ok()?;
        tokio::time::timeout(Duration::from_secs(5), socket.connect(addr)).await.ok()?.ok()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

impl Hostile {
    /// Starts the hostile client against the server behind `target` (following it across
    /// restarts), as the user whose token is `token`.
    pub fn start(target: Arc<FaultProxy>, token: String, shape: HostileShape, outages: Outages) -> Hostile {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hostile")
            .enable_all()
            .build()
            .expect("start the hostile client's runtime");
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(HostileStats::default()));
        let ctx = Ctx {
            target,
            token,
            stop: stop.clone(),
            stats: stats.clone(),
            outages,
            bootstrap_hold: shape.bootstrap_hold,
            bootstrap_generation: Arc::new(AtomicU64::new(0)),
        };
        for _ in 0..shape.headers {
            runtime.spawn(endless_header(ctx.clone()));
        }
        for _ in 0..shape.bodies {
            runtime.spawn(trickled_body(ctx.clone()));
        }
        for _ in 0..shape.bootstraps {
            runtime.spawn(unread_bootstrap(ctx.clone(), 0));
        }
        for _ in 0..shape.idle {
            runtime.spawn(silent(ctx.clone()));
        }
        Hostile { ctx, shape, runtime: Some(runtime) }
    }

    /// Replaces the bootstrap holders by fresh ones, whose first hold starts now
    /// (e.g. once the server is no longer being killed).
    pub fn restart_bootstraps(&self) {
        let generation = self.ctx.bootstrap_generation.fetch_add(1, Ordering::SeqCst) + 1;
        let runtime = self.runtime.as_ref().expect("running");
        for _ in 0..self.shape.bootstraps {
            runtime.spawn(unread_bootstrap(self.ctx.clone(), generation));
        }
    }

    /// Stops every connection and returns what was seen.
    pub fn stop(mut self) -> HostileStats {
        self.ctx.stop.store(true, Ordering::SeqCst);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        self.ctx.stats.lock().unwrap().clone()
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.ctx.stop.store(true, Ordering::SeqCst);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Sends `first`, then one byte of `drip` every second until the server closes the
/// connection or answers; records how long it was held.
async fn drip_until_closed(ctx: &Ctx, kind: Kind, first: &[u8], drip: u8) {
    let Some(mut stream) = ctx.connect().await else { return sleep_a_little().await };
    ctx.record(kind, |s| s.opened += 1);
    let opened = Instant::now();
    if stream.write_all(first).await.is_err() {
        return;
    }
    let mut buf = [0u8; 1024];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let end = loop {
        if ctx.stopped() {
            break End::Stopped;
        }
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                // An answer (408, 400…) or a close: either way the server let go.
                Ok(_) | Err(_) => break End::Closed,
            },
            _ = tick.tick() => {
                if stream.write_all(&[drip]).await.is_err() {
                    break End::Closed;
                }
            }
        }
    };
    ctx.ended(kind, opened, end);
}

async fn sleep_a_little() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

async fn endless_header(ctx: Ctx) {
    let first =
        format!("GET /v1/status HTTP/1.1\r\nHost: deltasync\r\nAuthorization: Bearer {}\r\nX-Slow: ", ctx.token);
    while !ctx.stopped() {
        drip_until_closed(&ctx, Kind::Header, first.as_bytes(), b'a').await;
    }
}

async fn trickled_body(ctx: Ctx) {
    let first = format!(
        "POST /v1/push HTTP/1.1\r\nHost: deltasync\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: 4000000\r\n\r\n{{\"device_id\":\"mallory\",\"changes\":[",
        ctx.token
    );
    while !ctx.stopped() {
        drip_until_closed(&ctx, Kind::Body, first.as_bytes(), b' ').await;
    }
}

/// Asks for a bootstrap and reads nothing for `bootstrap_hold` (longer than the
/// server's write timeout); then reads what is left, to see whether the server abandoned it.
async fn unread_bootstrap(ctx: Ctx, generation: u64) {
    let replaced = || ctx.bootstrap_generation.load(Ordering::SeqCst) != generation;
    while !ctx.stopped() && !replaced() {
        let Some(mut stream) = ctx.connect().await else {
            sleep_a_little().await;
            continue;
        };
        ctx.record(Kind::Bootstrap, |s| s.opened += 1);
        let opened = Instant::now();
        let request = format!(
            "GET /v1/bootstrap?device_id=mallory HTTP/1.1\r\nHost: deltasync\r\nAuthorization: Bearer {}\r\n\r\n",
            ctx.token
        );
        if stream.write_all(request.as_bytes()).await.is_err() {
            continue;
        }
        // The status line comes at once: a refusal is noticed now, not after the hold.
        let mut head = [0u8; 12];
        let answered = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head)).await;
        if !matches!(answered, Ok(Ok(_))) || !head.starts_with(b"HTTP/1.1 ") {
            // No answer (the server went away): not a held bootstrap.
            sleep_a_little().await;
            continue;
        }
        if head.starts_with(b"HTTP/1.1 429") {
            // Over the per-user cap of bootstraps: refused at once, as it should be.
            ctx.stats.lock().unwrap().bootstraps_refused += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if !head.starts_with(b"HTTP/1.1 200") {
            // Another refusal (503 while the store is down): not a held bootstrap.
            sleep_a_little().await;
            continue;
        }
        while opened.elapsed() < ctx.bootstrap_hold && !ctx.stopped() && !replaced() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if ctx.stopped() || replaced() {
            return;
        }
        // Drain: a whole stream ends with its end line; an abandoned one stops short.
        let mut total = head.len() as u64;
        let mut tail = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let drained = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        total += n as u64;
                        tail.extend_from_slice(&buf[..n]);
                        let keep = tail.len().saturating_sub(256);
                        tail.drain(..keep);
                    }
                }
            }
        })
        .await;
        let whole = String::from_utf8_lossy(&tail).contains("\"end\":true");
        if drained.is_ok() && !whole {
            ctx.stats.lock().unwrap().bootstrap_bytes_after_close.push(total);
            ctx.ended(Kind::Bootstrap, opened, End::Closed);
        }
    }
}

async fn silent(ctx: Ctx) {
    while !ctx.stopped() {
        let Some(mut stream) = ctx.connect().await else {
            sleep_a_little().await;
            continue;
        };
        ctx.record(Kind::Idle, |s| s.opened += 1);
        let opened = Instant::now();
        let mut buf = [0u8; 256];
        let end = tokio::select! {
            _ = stream.read(&mut buf) => End::Closed,
            _ = async { while !ctx.stopped() { tokio::time::sleep(Duration::from_millis(200)).await } } => End::Stopped,
        };
        ctx.ended(Kind::Idle, opened, end);
    }
}

/// Fills the hostile user's dataset with `entities` entities of about 2 KiB each
/// (so that its bootstrap is larger than the socket buffers), pushing straight to `url`.
pub fn seed_dataset(url: &str, token: &str, entities: usize) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = crate::common::client();
        let base = crate::common::now_ms() - 60_000;
        for batch in 0..entities.div_ceil(1000) {
            let changes: Vec<_> = (batch * 1000..((batch + 1) * 1000).min(entities))
                .map(|i| {
                    let hlc = crate::common::hlc(base, i as u32 % 100_000, "mallory");
                    crate::common::upsert(
                        &format!("m-{i}"),
                        "hoard",
                        &format!("e{i}"),
                        json!({"pad": "m".repeat(2048)}),
                        &hlc,
                    )
                })
                .collect();
            let r = c
                .post(format!("{url}/v1/push"))
                .bearer_auth(token)
                .json(&json!({"device_id": "mallory", "changes": changes}))
                .send()
                .await
                .expect("push the hostile user's dataset");
            assert_eq!(r.status().as_u16(), 200, "seeding the hostile user's dataset: {}", r.text().await.unwrap());
        }
    });
}
