//! Bootstraps are capped (`max_bootstraps_per_user` → 429, `max_bootstraps`
//! over all users → 503, both with `Retry-After`), and a bootstrap whose client
//! stops reading is abandoned after `write_timeout_secs`: its slot and its
//! database snapshot are released (on PostgreSQL no connection stays "idle in
//! transaction" on the bootstrap query). While readers stall, other users are
//! served as usual. A client that disconnects frees its slot at once.
//!
//! The stalled readers are raw sockets with a 4 KiB receive buffer (so that
//! the kernel does not take the stream off the server's hands by autotuning a
//! large buffer) that read the answer's head and a few KiB, then nothing more.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SECRET: &str = "stalled-readers-secret";
/// The write deadline of the main test.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the tests wait for something the server must do by itself.
const WAIT_AT_MOST: Duration = Duration::from_secs(15);
/// The liveness bound of requests served while readers stall.
const LIVENESS: Duration = Duration::from_secs(5);
/// Bytes of one seeded entity's data.
const ENTITY_BYTES: usize = 250 * 1024;

fn start(backend: &Backend, config: &str) -> Server {
    Server::start_with(
        backend,
        Options { config: Some(config.into()), jwt_secret: Some(SECRET.into()), ..Options::default() },
    )
}

fn addr(server: &Server) -> String {
    server.url.trim_start_matches("http://").to_owned()
}

/// Pushes `n` entities of 250 KiB for the user of `token`, 20 per push.
async fn seed(server: &Server, token: &str, n: usize) {
    let c = client();
    let base = now_ms() - 60_000;
    for start in (0..n).step_by(20) {
        let changes: Vec<Value> = (start..n.min(start + 20))
            .map(|i| {
                let id = random_uuid();
                upsert(
                    &random_uuid(),
                    "docs",
                    &id,
                    document(i as u64, ENTITY_BYTES),
                    &hlc(base + i as u64, 0, "seeder"),
                )
            })
            .collect();
        let r = c
            .post(format!("{}/v1/push", server.url))
            .bearer_auth(token)
            .json(&json!({"device_id": "seeder", "changes": changes}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert_eq!(status, 200, "seeding push: {body}");
    }
}

/// A bootstrap that reads the answer's head and a few KiB of its body, then
/// stops reading (while the socket stays open).
struct Stalled {
    stream: TcpStream,
}

impl Stalled {
    async fn open(server: &Server, token: &str, device: &str) -> Stalled {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(addr(server).parse().unwrap()).await.unwrap();
        let request = format!(
            "GET /v1/bootstrap?device_id={device} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let head_end = got.windows(4).position(|w| w == b"\r\n\r\n");
            if let Some(end) = head_end {
                let head = String::from_utf8_lossy(&got[..end]).into_owned();
                assert!(head.starts_with("HTTP/1.1 200"), "a bootstrap for {device} was not served: {head}");
                if got.len() - end >= 8192 {
                    break;
                }
            }
            match tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await {
                Err(_) => panic!("a bootstrap for {device} sent only {} bytes in 10 s", got.len()),
                Ok(Ok(0)) | Ok(Err(_)) => {
                    panic!(
                        "a bootstrap for {device} closed after {} bytes: {}",
                        got.len(),
                        String::from_utf8_lossy(&got)
                    )
                }
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
        }
        Stalled { stream }
    }

    /// Reads until the server closes the connection (or `limit` passes):
    /// whether it closed, and whether what was left held the end line.
    async fn read_to_close(&mut self, limit: Duration) -> (bool, bool) {
        let deadline = Instant::now() + limit;
        let mut buf = vec![0u8; 65536];
        let mut tail: Vec<u8> = Vec::new();
        let mut ended = false;
        loop {
            match tokio::time::timeout_at(deadline.into(), self.stream.read(&mut buf)).await {
                Err(_) => return (false, ended),
                Ok(Ok(0)) | Ok(Err(_)) => return (true, ended),
                Ok(Ok(n)) => {
                    tail.extend_from_slice(&buf[..n]);
                    ended |= tail.windows(11).any(|w| w == b"\"end\":true");
                    let keep = tail.len().saturating_sub(16);
                    tail.drain(..keep);
                }
            }
        }
    }
}

/// A bootstrap over reqwest: status, `Retry-After` and, when refused, the body.
async fn try_bootstrap(
    c: &reqwest::Client,
    server: &Server,
    token: &str,
    device: &str,
) -> (u16, Option<String>, Value) {
    let r = c
        .get(format!("{}/v1/bootstrap?device_id={device}", server.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("bootstrap for {device}: {e}"));
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap_or("<not text>").to_owned());
    if status == 200 {
        return (status, retry_after, Value::Null);
    }
    let text = r.text().await.unwrap();
    let body =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bootstrap {status} answered non-JSON ({e}): {text}"));
    (status, retry_after, body)
}

/// Checks a refused bootstrap: `status`, the error code and a numeric `Retry-After`.
fn assert_refused(answer: &(u16, Option<String>, Value), status: u16, code: &str, what: &str) {
    let (s, retry_after, body) = answer;
    assert_eq!(*s, status, "{what}: expected {status} {code}, got {s} {body}");
    assert_eq!(body["error"], code, "{what}: {body}");
    let retry = retry_after.as_deref().unwrap_or_else(|| panic!("{what}: {s} without Retry-After: {body}"));
    assert!(retry.trim().parse::<u64>().is_ok_and(|n| n >= 1), "{what}: Retry-After is {retry:?}");
}

/// A whole bootstrap for the user of `token`, retried while refused with 429 or
/// 503 until `deadline`: the number of entity lines of the complete stream.
async fn full_bootstrap(server: &Server, token: &str, device: &str, deadline: Instant) -> usize {
    let c = client();
    loop {
        let r = c
            .get(format!("{}/v1/bootstrap?device_id={device}", server.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("bootstrap for {device}: {e}"));
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_else(|e| panic!("bootstrap for {device} broke: {e}"));
        if status == 200 {
            let lines: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{device}: a bootstrap line ({e})")))
                .collect();
            let end = lines.last().unwrap_or_else(|| panic!("{device}: an empty bootstrap"));
            assert_eq!(end["end"], true, "{device}: the bootstrap stream has no end line");
            let entities = lines.iter().filter(|l| l.get("entity").is_some()).count();
            assert_eq!(end["count"], entities as u64, "{device}: end line {end}");
            return entities;
        }
        assert!(status == 429 || status == 503, "bootstrap for {device}: {status} {text}");
        assert!(
            Instant::now() < deadline,
            "bootstrap for {device} still refused {status} at the deadline: {text} (stalled bootstraps not released?)"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs `request` with the liveness bound; panics with `what` if it fails or hangs.
async fn within(what: &str, request: reqwest::RequestBuilder) -> Value {
    let started = Instant::now();
    let r = match tokio::time::timeout(LIVENESS, request.send()).await {
        Err(_) => panic!("{what} did not answer within {LIVENESS:?} while bootstraps stall"),
        Ok(r) => r.unwrap_or_else(|e| panic!("{what}: {e}")),
    };
    let status = r.status().as_u16();
    let text = match tokio::time::timeout(LIVENESS.saturating_sub(started.elapsed()), r.text()).await {
        Err(_) => panic!("{what}'s body did not arrive within {LIVENESS:?} while bootstraps stall"),
        Ok(t) => t.unwrap(),
    };
    assert_eq!(status, 200, "{what} while bootstraps stall: {text}");
    eprintln!("{what} answered in {:?} while bootstraps stall", started.elapsed());
    serde_json::from_str(&text).unwrap()
}

/// The local ports of the server process's TCP connections to `pg_port`
/// (from /proc: its socket inodes, then the kernel's TCP tables).
fn server_ports_to(pid: u32, pg_port: u16) -> Vec<i32> {
    let mut inodes = HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                let link = link.to_string_lossy().into_owned();
                if let Some(inode) = link.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    inodes.insert(inode.to_owned());
                }
            }
        }
    }
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !inodes.contains(f[9]) {
                continue;
            }
            let port = |a: &str| a.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if port(f[2]) == Some(pg_port) {
                ports.extend(port(f[1]).map(i32::from));
            }
        }
    }
    ports
}

/// Connections of this server process (matched by client port) in this test
/// database that are still in the bootstrap query's transaction: "idle in
/// transaction" on it, or "active" on it (a query whose rows the server has
/// stopped reading stays active). Also returns how many connections to
/// PostgreSQL the server process has.
async fn bootstrap_transactions(base_url: &str, server_pid: u32) -> (i64, usize) {
    let config: tokio_postgres::Config = base_url.parse().unwrap();
    let pg_port = config.get_ports().first().copied().unwrap_or(5432);
    let ports = server_ports_to(server_pid, pg_port);
    let (pg, connection) = tokio_postgres::connect(base_url, tokio_postgres::NoTls).await.unwrap();
    let connection = tokio::spawn(connection);
    let row = pg
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND (state LIKE 'idle in transaction%' OR state = 'active')
               AND query LIKE '%FROM entities WHERE user_id%'
               AND client_port = ANY($1)",
            &[&ports],
        )
        .await
        .unwrap();
    drop(pg);
    let _ = connection.await;
    (row.get(0), ports.len())
}

store_test!(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn bootstrap_caps_and_stalled_readers);
async fn bootstrap_caps_and_stalled_readers(backend: &Backend) {
    let config = format!(
        "[server]\nmax_bootstraps = 3\nmax_bootstraps_per_user = 2\nwrite_timeout_secs = {}\n",
        WRITE_TIMEOUT.as_secs()
    );
    let server = start(backend, &config);
    let (a, b, cu) = (token_for(SECRET, "user-a"), token_for(SECRET, "user-b"), token_for(SECRET, "user-c"));
    // About 40 MB for A, 12 MB for B: far more than any socket buffers of a stalled reader.
    seed(&server, &a, 160).await;
    seed(&server, &b, 48).await;
    let c = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let base = now_ms() - 60_000;
    let first = upsert("c-0", "notes", "n0", json!({"v": 0}), &hlc(base, 0, "c1"));
    let r = c
        .post(format!("{}/v1/push", server.url))
        .bearer_auth(&cu)
        .json(&json!({"device_id": "c1", "changes": [first]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());

    // Two stalled bootstraps for A; a third is refused for A alone.
    let stalled_at = Instant::now();
    let mut a1 = Stalled::open(&server, &a, "a-stall-1").await;
    let mut a2 = Stalled::open(&server, &a, "a-stall-2").await;
    let third = try_bootstrap(&c, &server, &a, "a-third").await;
    assert_refused(&third, 429, "rate_limited", "a third bootstrap for A (max_bootstraps_per_user = 2)");
    // One for B fills the server-wide cap; C is refused with 503.
    let mut b1 = Stalled::open(&server, &b, "b-stall-1").await;
    let refused = try_bootstrap(&c, &server, &cu, "c-boot").await;
    assert_refused(&refused, 503, "unavailable", "a bootstrap for C with 3 of max_bootstraps = 3 streaming");
    let refusals_took = stalled_at.elapsed();

    // C is served as usual meanwhile.
    let url = &server.url;
    let page = within("C's pull", c.get(format!("{url}/v1/pull?device_id=c1&cursor=0")).bearer_auth(&cu)).await;
    assert_eq!(page["changes"].as_array().map(Vec::len), Some(1), "{page}");
    let status = within("C's status", c.get(format!("{url}/v1/status?device_id=c1")).bearer_auth(&cu)).await;
    assert_eq!(status["head"], 1, "{status}");
    let change = upsert("c-1", "notes", "n1", json!({"v": 1}), &hlc(base + 1, 0, "c1"));
    let pushed = within(
        "C's push",
        c.post(format!("{url}/v1/push")).bearer_auth(&cu).json(&json!({"device_id": "c1", "changes": [change]})),
    )
    .await;
    assert_eq!(pushed["results"][0]["status"], "applied", "{pushed}");
    let health = within("/healthz", c.get(format!("{url}/healthz"))).await;
    assert_eq!(health, json!({"status": "ok"}));
    let stalled_for = stalled_at.elapsed();
    eprintln!("refusals checked after {refusals_took:?}, C's requests after {stalled_for:?} of stalling");
    if let Backend::Postgres { base_url } = backend {
        let (held, connections) = bootstrap_transactions(base_url, server.child.id()).await;
        eprintln!("while stalled: {held} of the server's {connections} connections in a bootstrap transaction");
        // Else the check below could not see a leaked transaction.
        assert!(connections > 0, "cannot find the server's connections to PostgreSQL in /proc");
    }

    // After the write deadline the stalled bootstraps are abandoned: A and C bootstrap in full.
    let deadline = stalled_at + WAIT_AT_MOST;
    let a_entities = full_bootstrap(&server, &a, "a-again", deadline).await;
    assert_eq!(a_entities, 160);
    let freed_after = stalled_at.elapsed();
    let c_entities = full_bootstrap(&server, &cu, "c-boot", deadline).await;
    assert_eq!(c_entities, 2);
    eprintln!("A could bootstrap again {freed_after:?} after its readers stalled");
    for (name, s) in [("a-stall-1", &mut a1), ("a-stall-2", &mut a2), ("b-stall-1", &mut b1)] {
        let (closed, ended) = s.read_to_close(Duration::from_secs(5)).await;
        assert!(closed, "{name}: the stalled bootstrap's connection is still open {:?} on", stalled_at.elapsed());
        assert!(!ended, "{name}: the abandoned bootstrap still sent its end line");
    }

    if let Backend::Postgres { base_url } = backend {
        let started = Instant::now();
        loop {
            let (held, _) = bootstrap_transactions(base_url, server.child.id()).await;
            if held == 0 {
                break;
            }
            assert!(
                started.elapsed() < WAIT_AT_MOST,
                "{held} connections of the server are still in a transaction on the bootstrap query \
                 {:?} after the readers stalled",
                stalled_at.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

store_test!(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn a_disconnected_bootstrap_frees_its_slot_at_once);
async fn a_disconnected_bootstrap_frees_its_slot_at_once(backend: &Backend) {
    // A long write deadline: only the disconnect can free the slot within the test.
    let server = start(backend, "[server]\nmax_bootstraps = 3\nmax_bootstraps_per_user = 2\nwrite_timeout_secs = 60\n");
    let a = token_for(SECRET, "user-a");
    seed(&server, &a, 48).await;
    let c = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let first = Stalled::open(&server, &a, "a-stall-1").await;
    let mut second = Stalled::open(&server, &a, "a-stall-2").await;
    assert_refused(&try_bootstrap(&c, &server, &a, "a-third").await, 429, "rate_limited", "a third bootstrap for A");

    drop(first);
    let dropped = Instant::now();
    let freed = loop {
        let answer = try_bootstrap(&c, &server, &a, "a-after-drop").await;
        if answer.0 == 200 {
            break dropped.elapsed();
        }
        assert_refused(&answer, 429, "rate_limited", "a bootstrap for A after one of its two disconnected");
        assert!(
            dropped.elapsed() < Duration::from_secs(2),
            "a disconnected bootstrap still holds its slot {:?} after the client went away",
            dropped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("the slot was free {freed:?} after the disconnect");
    // The answer that got the freed slot was dropped unread: that frees it too.
    let entities = full_bootstrap(&server, &a, "a-full", Instant::now() + Duration::from_secs(2)).await;
    assert_eq!(entities, 48);
    let (closed, _) = second.read_to_close(Duration::from_millis(10)).await;
    assert!(!closed, "the other stalled bootstrap was closed long before its write deadline");
}
