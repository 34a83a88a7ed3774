//! Figures, not checks: the server's memory and latency under large pages,
//! a large bootstrap and stalled bootstraps. Every test is ignored; run them
//! by hand, one at a time, in release mode:
//!
//! ```sh
//! DELTASYNC_TEST_POSTGRES=postgres://postgres@127.0.0.1:5432/test \
//!   cargo test --release -p deltasync-cli --test memory_figures -- --ignored --nocapture --test-threads=1
//! ```
//!
//! The server's RSS is sampled every 20 ms from /proc while each scenario runs.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SECRET: &str = "memory-figures-secret";
const ENTITY_BYTES: usize = 250 * 1024;

fn store_name(backend: &Backend) -> &'static str {
    if backend.is_postgres() { "postgres" } else { "sqlite" }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Samples a process's RSS every 20 ms on a thread of its own, keeping the peak.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                let mut samples = 0;
                while !stop.load(Ordering::SeqCst) {
                    peak.fetch_max(rss_kib(pid), Ordering::SeqCst);
                    samples += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                samples
            })
        };
        Sampler { stop, peak, thread: Some(thread) }
    }

    /// Stops sampling: the peak in KiB and the number of samples.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        let samples = self.thread.take().unwrap().join().unwrap();
        (self.peak.load(Ordering::SeqCst), samples)
    }
}

/// Pushes `n` entities of 250 KiB (random UUID ids) for the user of `token`
/// (none: the default user), 20 per push, from 4 devices at once.
async fn seed(url: &str, token: Option<&str>, n: usize) -> Duration {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..4usize {
        let (url, token) = (url.to_owned(), token.map(str::to_owned));
        tasks.push(tokio::spawn(async move {
            let c = client();
            let device = format!("seeder-{t}");
            let base = now_ms() - 120_000;
            for start in (t * 20..n).step_by(80) {
                let changes: Vec<Value> = (start..n.min(start + 20))
                    .map(|i| {
                        let data = document(i as u64, ENTITY_BYTES);
                        upsert(&random_uuid(), "docs", &random_uuid(), data, &hlc(base + i as u64, 0, &device))
                    })
                    .collect();
                let mut req = c.post(format!("{url}/v1/push")).json(&json!({"device_id": device, "changes": changes}));
                if let Some(token) = &token {
                    req = req.bearer_auth(token);
                }
                let r = req.send().await.unwrap();
                let status = r.status().as_u16();
                assert_eq!(status, 200, "seeding: {}", r.text().await.unwrap());
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    started.elapsed()
}

fn print_table(title: &str, rows: &[(String, String)]) {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("\n{title}");
    println!("{}", "-".repeat(title.len()));
    for (k, v) in rows {
        println!("  {k:<width$}  {v}");
    }
}

store_test!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[ignore = "prints figures; run by hand in release mode"]
    async fn figures_four_concurrent_pulls_of_large_pages
);
async fn figures_four_concurrent_pulls_of_large_pages(backend: &Backend) {
    const N: usize = 400;
    let server = Server::start(backend);
    let seeded = seed(&server.url, None, N).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss_kib();
    let sampler = Sampler::start(server.child.id());
    let started = Instant::now();
    let mut pullers = Vec::new();
    for p in 0..4 {
        let url = server.url.clone();
        pullers.push(tokio::spawn(async move {
            let c = client();
            let (mut cursor, mut pages, mut changes, mut bytes) = (0u64, 0usize, 0usize, 0usize);
            loop {
                let r = c
                    .get(format!("{url}/v1/pull?device_id=puller-{p}&cursor={cursor}&limit=10000"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
                let text = r.text().await.unwrap();
                bytes += text.len();
                let page: Value = serde_json::from_str(&text).unwrap();
                pages += 1;
                changes += page["changes"].as_array().unwrap().len();
                cursor = page["cursor"].as_u64().unwrap();
                if page["has_more"] != true {
                    break;
                }
            }
            (pages, changes, bytes)
        }));
    }
    let mut results = Vec::new();
    for p in pullers {
        results.push(p.await.unwrap());
    }
    let took = started.elapsed();
    let (peak, samples) = sampler.finish();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_kib();
    let (pages, changes, bytes) = results[0];
    print_table(
        &format!(
            "[{}] 4 concurrent pulls at limit=10000 over {N} entities of 250 KiB (max_page_bytes 4 MiB)",
            store_name(backend)
        ),
        &[
            ("seeding".into(), format!("{seeded:.2?}")),
            ("each puller".into(), format!("{pages} pages, {changes} changes, {:.1} MB", bytes as f64 / 1e6)),
            ("all 4 pullers took".into(), format!("{took:.2?}")),
            ("server RSS before".into(), mib(before)),
            (
                "server RSS peak".into(),
                format!("{} (+{}, {samples} samples)", mib(peak), mib(peak.saturating_sub(before))),
            ),
            ("server RSS after".into(), mib(after)),
        ],
    );
    assert!(results.iter().all(|r| r.1 == N), "a puller did not get all {N} changes: {results:?}");
}

store_test!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[ignore = "prints figures; run by hand in release mode"]
    async fn figures_one_bootstrap_of_210_mb_at_full_speed
);
async fn figures_one_bootstrap_of_210_mb_at_full_speed(backend: &Backend) {
    const N: usize = 840;
    let server = Server::start(backend);
    let seeded = seed(&server.url, None, N).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss_kib();
    let sampler = Sampler::start(server.child.id());
    let started = Instant::now();
    let r = client().get(format!("{}/v1/bootstrap?device_id=reader", server.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut r = r;
    let (mut bytes, mut lines, mut tail) = (0usize, 0usize, Vec::new());
    while let Some(chunk) = r.chunk().await.unwrap() {
        bytes += chunk.len();
        lines += chunk.iter().filter(|b| **b == b'\n').count();
        tail.extend_from_slice(&chunk);
        let keep = tail.len().saturating_sub(200);
        tail.drain(..keep);
    }
    let took = started.elapsed();
    let (peak, samples) = sampler.finish();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_kib();
    let ended = String::from_utf8_lossy(&tail).contains("\"end\":true");
    print_table(
        &format!("[{}] one bootstrap of {N} entities of 250 KiB, read at full speed", store_name(backend)),
        &[
            ("seeding".into(), format!("{seeded:.2?}")),
            (
                "bootstrap".into(),
                format!(
                    "{:.1} MB, {lines} lines in {took:.2?} ({:.0} MB/s), end line: {ended}",
                    bytes as f64 / 1e6,
                    bytes as f64 / 1e6 / took.as_secs_f64()
                ),
            ),
            ("server RSS before".into(), mib(before)),
            (
                "server RSS peak".into(),
                format!("{} (+{}, {samples} samples)", mib(peak), mib(peak.saturating_sub(before))),
            ),
            ("server RSS after".into(), mib(after)),
        ],
    );
    assert!(ended, "the bootstrap stream had no end line");
}

/// A bootstrap that reads its head and a few KiB, then stops reading.
async fn stalled_bootstrap(server: &Server, token: &str, device: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr = server.url.trim_start_matches("http://").parse().unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let request =
        format!("GET /v1/bootstrap?device_id={device} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < 8192 {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "a bootstrap closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got[..200]));
    stream
}

/// 50 round trips of a small pull then a small push for the user of `token`:
/// (median, max).
async fn round_trips(url: &str, token: &str, device: &str, from: u64) -> (Duration, Duration) {
    let c = client();
    let mut times = Vec::new();
    let base = now_ms() - 60_000;
    for i in 0..50u64 {
        let started = Instant::now();
        let r = c.get(format!("{url}/v1/pull?device_id={device}&cursor=0")).bearer_auth(token).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.bytes().await.unwrap();
        let change = upsert(&random_uuid(), "notes", "n1", json!({"i": i}), &hlc(base + from + i, 0, device));
        let r = c
            .post(format!("{url}/v1/push"))
            .bearer_auth(token)
            .json(&json!({"device_id": device, "changes": [change]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.bytes().await.unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    (times[times.len() / 2], *times.last().unwrap())
}

store_test!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[ignore = "prints figures; run by hand in release mode"]
    async fn figures_round_trips_while_eight_bootstraps_stall
);
async fn figures_round_trips_while_eight_bootstraps_stall(backend: &Backend) {
    let config = "[server]\nmax_bootstraps = 8\nmax_bootstraps_per_user = 8\nwrite_timeout_secs = 300\n";
    let server = Server::start_with(
        backend,
        Options { config: Some(config.into()), jwt_secret: Some(SECRET.into()), ..Options::default() },
    );
    let (a, b) = (token_for(SECRET, "user-a"), token_for(SECRET, "user-b"));
    let seeded = seed(&server.url, Some(&a), 160).await;
    let (idle_median, idle_max) = round_trips(&server.url, &b, "b1", 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss_kib();
    let sampler = Sampler::start(server.child.id());
    let mut stalled = Vec::new();
    for i in 0..8 {
        stalled.push(stalled_bootstrap(&server, &a, &format!("a-stall-{i}")).await);
    }
    let stalled_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (median, max) = round_trips(&server.url, &b, "b1", 1000).await;
    let held_for = stalled_at.elapsed();
    let (peak, samples) = sampler.finish();
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = server.rss_kib();
    print_table(
        &format!(
            "[{}] user B's pull + push round trip (50 tries) while 8 bootstraps of user A stall",
            store_name(backend)
        ),
        &[
            ("seeding A (160 x 250 KiB)".into(), format!("{seeded:.2?}")),
            ("round trip, no stalls".into(), format!("median {idle_median:.2?}, max {idle_max:.2?}")),
            (
                "round trip, 8 stalled".into(),
                format!("median {median:.2?}, max {max:.2?} (stalled for {held_for:.2?})"),
            ),
            ("server RSS before stalls".into(), mib(before)),
            (
                "server RSS peak".into(),
                format!("{} (+{}, {samples} samples)", mib(peak), mib(peak.saturating_sub(before))),
            ),
            ("server RSS after disconnect".into(), mib(after)),
        ],
    );
}
