//! A TCP proxy that puts network faults between clients and a server:
//! added latency, connections dropped mid-stream (FIN) or reset (RST, by
//! closing with `SO_LINGER` 0), and partitions that refuse or stall every
//! connection until healed. Its faults are drawn from a seeded generator.
//!
//! ```ignore
//! let proxy = FaultProxy::start(&server.url, seed);
//! proxy.set_mix(FaultMix { latency_ms: (0, 40), drop_per_mille: 50, reset_per_mille: 50 });
//! proxy.partition(Partition::Stall);
//! proxy.heal();
//! proxy.set_target(&restarted_server.url);   // the proxy's own URL stays the same
//! ```

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::rng::Rng;

/// What the proxy does to each new connection, drawn per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultMix {
    /// Each chunk forwarded, either way, waits a random time in this range (ms).
    pub latency_ms: (u64, u64),
    /// Chance, per 1000 connections, that the connection is closed (FIN) after
    /// a random number of bytes, in a random direction.
    pub drop_per_mille: u64,
    /// Chance, per 1000 connections, that the connection is reset (RST) after
    /// a random number of bytes, in a random direction.
    pub reset_per_mille: u64,
}

impl FaultMix {
    /// No faults: a plain forwarder.
    pub fn clean() -> FaultMix {
        FaultMix::default()
    }
}

/// How a partition treats connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partition {
    /// New connections are reset at once; open ones are reset.
    Refuse,
    /// New connections are accepted and never answered; open ones stop
    /// forwarding. All of them are closed when the partition heals.
    Stall,
}

/// What the proxy did, counted since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections closed (FIN) mid-stream by the fault mix.
    pub dropped: u64,
    /// Connections reset (RST) by the fault mix.
    pub reset: u64,
    /// Connections refused, stalled or cut by a partition.
    pub partitioned: u64,
    /// Connections whose server could not be reached.
    pub unreachable: u64,
}

/// The state the proxy's tasks share.
struct Shared {
    target: Mutex<SocketAddr>,
    mix: Mutex<FaultMix>,
    rng: Mutex<Rng>,
    /// The partition in force, if any; connections watch it.
    partition: watch::Sender<Option<Partition>>,
    connections: AtomicU64,
    dropped: AtomicU64,
    reset: AtomicU64,
    partitioned: AtomicU64,
    unreachable: AtomicU64,
}

/// A fault-injecting TCP proxy in front of one server, on its own runtime.
pub struct FaultProxy {
    url: String,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// How one connection ends, decided when it is accepted.
#[derive(Debug, Clone, Copy)]
enum Fate {
    /// Forwarded until either side closes.
    Clean,
    /// Cut after `after` bytes towards the server (`upstream`) or towards the client.
    Cut { upstream: bool, after: u64, reset: bool },
}

/// Why one direction of a connection stopped.
enum PipeEnd {
    /// The sender closed its side; the close was passed on.
    Eof,
    /// The fault budget of bytes was spent.
    Cut,
    /// A read or write failed.
    Failed,
}

impl FaultProxy {
    /// Starts a proxy on a fresh loopback port in front of the server at
    /// `server_url` (`http://HOST:PORT`), with no faults.
    pub fn start(server_url: &str, seed: u64) -> FaultProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .expect("start the proxy's runtime");
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind the proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (partition, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            target: Mutex::new(addr_of(server_url)),
            mix: Mutex::new(FaultMix::clean()),
            rng: Mutex::new(Rng::new(seed)),
            partition,
            connections: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            reset: AtomicU64::new(0),
            partitioned: AtomicU64::new(0),
            unreachable: AtomicU64::new(0),
        });
        let accepting = shared.clone();
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                tokio::spawn(serve(client, accepting.clone()));
            }
        });
        FaultProxy { url, shared, runtime: Some(runtime) }
    }

    /// The proxy's URL, to give to clients.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server address new connections are forwarded to.
    pub fn target(&self) -> SocketAddr {
        *self.shared.target.lock().unwrap()
    }

    /// Forwards new connections to another server URL (e.g. a restarted server's).
    pub fn set_target(&self, server_url: &str) {
        *self.shared.target.lock().unwrap() = addr_of(server_url);
    }

    /// Sets the faults drawn for new connections.
    pub fn set_mix(&self, mix: FaultMix) {
        *self.shared.mix.lock().unwrap() = mix;
    }

    /// Starts a partition: every open and new connection is refused or stalled until [`FaultProxy::heal`].
    pub fn partition(&self, kind: Partition) {
        self.shared.partition.send_replace(Some(kind));
    }

    /// Ends a partition.
    pub fn heal(&self) {
        self.shared.partition.send_replace(None);
    }

    /// Ends every fault: no partition, a clean mix.
    pub fn calm(&self) {
        self.heal();
        self.set_mix(FaultMix::clean());
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        ProxyStats {
            connections: s.connections.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            reset: s.reset.load(Ordering::Relaxed),
            partitioned: s.partitioned.load(Ordering::Relaxed),
            unreachable: s.unreachable.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// `HOST:PORT` of an `http://HOST:PORT` URL.
fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|e| panic!("not an http://IP:PORT URL: {url:?} ({e})"))
}

impl Shared {
    /// Draws the fate and latency of a new connection from the current mix.
    fn draw(&self) -> (Fate, (u64, u64)) {
        let mix = *self.mix.lock().unwrap();
        let mut rng = self.rng.lock().unwrap();
        let roll = rng.below(1000);
        let fate = if roll < mix.drop_per_mille + mix.reset_per_mille {
            Fate::Cut { upstream: rng.chance(500), after: rng.below(4096), reset: roll >= mix.drop_per_mille }
        } else {
            Fate::Clean
        };
        (fate, mix.latency_ms)
    }

    /// A delay drawn from `range` (ms).
    fn delay(&self, range: (u64, u64)) -> Duration {
        if range.1 == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(self.rng.lock().unwrap().between(range.0, range.1))
    }
}

/// Waits until a partition is in force and returns its kind.
async fn partitioned(rx: &mut watch::Receiver<Option<Partition>>) -> Partition {
    loop {
        if let Some(kind) = *rx.borrow_and_update() {
            return kind;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Waits until no partition is in force.
async fn healed(rx: &mut watch::Receiver<Option<Partition>>) {
    while rx.borrow_and_update().is_some() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Closes a socket with a TCP reset rather than a FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Serves one client connection.
async fn serve(mut client: TcpStream, shared: Arc<Shared>) {
    shared.connections.fetch_add(1, Ordering::Relaxed);
    let mut rx = shared.partition.subscribe();
    let now = *rx.borrow_and_update();
    if let Some(kind) = now {
        shared.partitioned.fetch_add(1, Ordering::Relaxed);
        match kind {
            Partition::Refuse => reset(client),
            Partition::Stall => {
                healed(&mut rx).await;
                drop(client);
            }
        }
        return;
    }
    let (fate, latency) = shared.draw();
    let target = *shared.target.lock().unwrap();
    let mut upstream = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        _ => {
            shared.unreachable.fetch_add(1, Ordering::Relaxed);
            reset(client);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let (up_budget, down_budget, resets) = match fate {
        Fate::Clean => (None, None, false),
        Fate::Cut { upstream: true, after, reset } => (Some(after), None, reset),
        Fate::Cut { upstream: false, after, reset } => (None, Some(after), reset),
    };
    // The halves borrow both sockets; they are released before the sockets are closed.
    let (cut, partition) = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = upstream.split();
        let mut up = pin!(pipe(&mut client_read, &mut server_write, up_budget, latency, &shared));
        let mut down = pin!(pipe(&mut server_read, &mut client_write, down_budget, latency, &shared));
        let (mut up_done, mut down_done) = (false, false);
        let mut cut = false;
        let mut partition = None;
        while !(up_done && down_done) {
            tokio::select! {
                end = &mut up, if !up_done => match end {
                    PipeEnd::Eof => up_done = true,
                    PipeEnd::Cut => { cut = true; break }
                    PipeEnd::Failed => break,
                },
                end = &mut down, if !down_done => match end {
                    PipeEnd::Eof => down_done = true,
                    PipeEnd::Cut => { cut = true; break }
                    PipeEnd::Failed => break,
                },
                kind = partitioned(&mut rx) => { partition = Some(kind); break }
            }
        }
        (cut, partition)
    };
    match partition {
        Some(Partition::Refuse) => {
            shared.partitioned.fetch_add(1, Ordering::Relaxed);
            reset(client);
            reset(upstream);
        }
        Some(Partition::Stall) => {
            shared.partitioned.fetch_add(1, Ordering::Relaxed);
            healed(&mut rx).await;
        }
        None if cut && resets => {
            shared.reset.fetch_add(1, Ordering::Relaxed);
            reset(client);
            reset(upstream);
        }
        None if cut => {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
        None => {}
    }
}

/// Forwards bytes one way, each chunk after a drawn latency, until the sender
/// closes (passed on as a close of the write side), an error, or `budget`
/// bytes have gone (then only the bytes within the budget are forwarded).
async fn pipe<R, W>(from: &mut R, to: &mut W, budget: Option<u64>, latency: (u64, u64), shared: &Shared) -> PipeEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut left = budget;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return PipeEnd::Eof;
            }
            Ok(n) => n,
            Err(_) => return PipeEnd::Failed,
        };
        let delay = shared.delay(latency);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let (take, spent) = match left {
            Some(l) if (n as u64) >= l => (l as usize, true),
            Some(l) => {
                left = Some(l - n as u64);
                (n, false)
            }
            None => (n, false),
        };
        if to.write_all(&buf[..take]).await.is_err() {
            return PipeEnd::Failed;
        }
        if spent {
            return PipeEnd::Cut;
        }
    }
}
