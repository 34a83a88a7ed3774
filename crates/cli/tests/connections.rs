//! Issue 10, point 1, 2 and the 414/431 defect: one client cannot stall the
//! server through its connections. Each test plays the bad client over real
//! sockets against a real `deltasync serve` process: idle connections past the
//! open-file limit and past the connection cap, a header or a body trickled
//! over minutes, answers never read, and requests held open across SIGTERM.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Short deadlines, so that the tests see them pass.
const FAST: &str = "[server]\nheader_read_timeout_secs = 2\nkeep_alive_timeout_secs = 2\nbody_read_timeout_secs = 2\n\
                    body_min_bytes_per_sec = 16384\nwrite_timeout_secs = 2\nshutdown_grace_secs = 3\n";
/// Slack added to every deadline the tests wait for: the machine may be busy.
const SLACK: Duration = Duration::from_secs(4);
/// The 392-byte request of the reproduction.
fn slow_request() -> Vec<u8> {
    let mut r = b"GET /v1/status?device_id=slowloris HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\n".to_vec();
    while r.len() < 390 {
        r.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    r.truncate(390);
    r.extend_from_slice(b"\r\n");
    r
}

fn start(config: &str) -> Server {
    Server::start_with(
        &Backend::Sqlite,
        Options { config: Some(config.into()), capture_log: true, ..Options::default() },
    )
}

fn addr(server: &Server) -> String {
    server.url.trim_start_matches("http://").to_owned()
}

/// `GET /healthz` on a new connection; the time it took, or why it failed.
async fn healthz(server: &Server, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let c = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(limit).build().unwrap();
    match c.get(format!("{}/healthz", server.url)).send().await {
        Ok(r) if r.status() == 200 => Ok(started.elapsed()),
        Ok(r) => Err(format!("status {}", r.status())),
        Err(e) => Err(format!("{e}")),
    }
}

/// Reads until the server closes the connection; the time that took (or `None`
/// after `limit`) and what was read.
async fn wait_closed(stream: &mut TcpStream, limit: Duration) -> (Option<Duration>, Vec<u8>) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Err(_) => return (None, got),
            Ok(Ok(0)) | Ok(Err(_)) => return (Some(started.elapsed()), got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends a raw request and reads the whole answer (the server closes after it).
async fn raw(server: &Server, request: &[u8]) -> (u16, String, Value) {
    let mut s = TcpStream::connect(addr(server)).await.unwrap();
    s.write_all(request).await.unwrap();
    let (closed, got) = wait_closed(&mut s, Duration::from_secs(10)).await;
    assert!(closed.is_some(), "the server kept the connection open after answering");
    parse_answer(&got)
}

/// Status, head and JSON body of a raw HTTP/1.1 answer.
fn parse_answer(got: &[u8]) -> (u16, String, Value) {
    let text = String::from_utf8_lossy(got).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("the body is not JSON ({e}): {text:?}"));
    (status, head.to_ascii_lowercase(), body)
}

fn soft_and_hard_open_files(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_owned();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_owned(), fields[4].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_open_file_limit_never_stall_healthz() {
    // The test process itself needs more than 1,024 descriptors.
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let server = start("[server]\nheader_read_timeout_secs = 3\n");
    let (soft, hard) = soft_and_hard_open_files(server.child.id());
    assert_eq!(soft, hard, "the server did not raise its open-file soft limit to the hard limit");

    let mut idle = Vec::new();
    for _ in 0..1100 {
        idle.push(TcpStream::connect(addr(&server)).await.unwrap());
    }
    // However many connections the limits let in, /healthz is served at once
    // or, if the cap is full, as soon as the idle ones are closed.
    let took = healthz(&server, Duration::from_secs(3) + SLACK).await;
    eprintln!("healthz with 1,100 idle connections open: {took:?} (open-file limit {soft})");
    assert!(took.is_ok(), "healthz failed with 1,100 idle connections open: {took:?}");

    // Every idle connection is closed by the header deadline.
    let started = Instant::now();
    for s in &mut idle {
        let left = (Duration::from_secs(3) + SLACK).saturating_sub(started.elapsed()).max(Duration::from_millis(100));
        let (closed, got) = wait_closed(s, left).await;
        assert!(closed.is_some(), "an idle connection was still open {:?} after it was opened", started.elapsed());
        assert!(got.is_empty(), "an idle connection was sent {got:?}");
    }
    assert!(healthz(&server, SLACK).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_new_connections_are_closed_and_logged() {
    let server = start("[server]\nmax_connections = 20\nheader_read_timeout_secs = 3\n");
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(addr(&server)).await.unwrap());
    }
    // Let the server accept all twenty before knocking again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..10 {
        let mut extra = TcpStream::connect(addr(&server)).await.unwrap();
        let (closed, got) = wait_closed(&mut extra, Duration::from_secs(2)).await;
        assert!(closed.is_some(), "a connection past the cap was kept waiting");
        assert!(got.is_empty());
    }
    assert!(server.log().contains("connection cap reached"), "nothing logged: {}", server.log());
    // The held connections time out, and the server serves again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let took = healthz(&server, SLACK).await;
    assert!(took.is_ok(), "after the idle connections timed out: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_trickled_over_minutes_is_cut_at_the_header_deadline() {
    let server = start(FAST);
    let mut s = TcpStream::connect(addr(&server)).await.unwrap();
    let request = slow_request();
    assert_eq!(request.len(), 392);
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut closed_at = None;
    // One byte every 600 ms: the whole request would take about 4 minutes.
    for byte in &request {
        if s.write_all(&[*byte]).await.is_err() {
            break;
        }
        let (closed, got) = wait_closed(&mut s, Duration::from_millis(600)).await;
        answer.extend(got);
        if closed.is_some() {
            closed_at = Some(started.elapsed());
            break;
        }
    }
    let closed_at = closed_at.expect("the trickled header was read to its end");
    eprintln!("a trickled header was cut after {closed_at:?}");
    assert!(closed_at < Duration::from_secs(2) + SLACK, "cut only after {closed_at:?}");
    assert!(answer.is_empty(), "the trickled request was served: {:?}", String::from_utf8_lossy(&answer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_answered_408_at_the_body_deadline() {
    let server = start(FAST);
    let s = TcpStream::connect(addr(&server)).await.unwrap();
    let (mut read, mut write) = s.into_split();
    let head = "POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 102400\r\n\r\n";
    write.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    // 100 KB at 1 KB every 100 ms: 10 KB/s, below the 16 KiB/s the config asks for.
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if write.write_all(&[b' '; 1024]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), read.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                    break;
                }
            }
        }
    }
    let took = started.elapsed();
    trickle.abort();
    let (status, head, body) = parse_answer(&got);
    eprintln!("a trickled body was answered {status} after {took:?}");
    assert_eq!(status, 408, "{head} {body}");
    assert_eq!(body["error"], "request_timeout");
    assert!(body["message"].as_str().unwrap().contains("body_read_timeout_secs"), "{body}");
    // 2 s plus 1 s per 16 KiB received: about 5 s at 10 KB/s, never the 10 s the body needs.
    assert!(took < Duration::from_secs(7) + SLACK, "answered only after {took:?}");
    assert!(head.contains("connection: close"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_but_long_polls_are_not() {
    let server = start(FAST);
    // An idle keep-alive connection is closed after keep_alive_timeout_secs.
    let mut s = TcpStream::connect(addr(&server)).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let (closed, got) = wait_closed(&mut s, Duration::from_secs(2) + SLACK).await;
    assert!(closed.is_some() && got.is_empty(), "an idle keep-alive connection stayed open");

    // A long poll that outlasts every connection deadline is answered in full.
    let mut s = TcpStream::connect(addr(&server)).await.unwrap();
    let started = Instant::now();
    s.write_all(b"GET /v1/pull?device_id=poller&wait=5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (closed, got) = wait_closed(&mut s, Duration::from_secs(5) + SLACK).await;
    let took = started.elapsed();
    assert!(closed.is_some());
    let (status, _, body) = parse_answer(&got);
    assert_eq!(status, 200, "{body}");
    assert!(took >= Duration::from_secs(4), "the long poll ended early, after {took:?}");
    assert_eq!(body["changes"], json!([]));
}

/// A socket that buffers little, so that a large answer it does not read stalls the server's writes.
async fn small_buffer_connection(server: &Server) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr(server).parse().unwrap()).await.unwrap()
}

/// Pushes about 12 MB of entity data: enough that no socket buffers it all.
async fn push_large_entities(server: &Server) {
    let c = client();
    let big = "x".repeat(200_000);
    for batch in 0..6 {
        let changes: Vec<Value> = (0..10)
            .map(|i| {
                let id = format!("big-{batch}-{i}");
                upsert(&id, "blobs", &id, json!({"body": big}), &hlc(now_ms() - 1000, batch * 10 + i, "loader"))
            })
            .collect();
        let answer = push(&c, &server.url, "loader", changes).await;
        assert_eq!(answer["results"].as_array().unwrap().len(), 10, "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_client_stops_reading_is_abandoned_after_the_write_timeout() {
    let server = start(FAST);
    push_large_entities(&server).await;
    let mut s = small_buffer_connection(&server).await;
    s.write_all(b"GET /v1/bootstrap?device_id=stalled HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    // Read nothing for longer than the write timeout.
    tokio::time::sleep(Duration::from_secs(2) + SLACK).await;
    let (closed, got) = wait_closed(&mut s, Duration::from_secs(10)).await;
    assert!(closed.is_some(), "the stalled answer was never abandoned");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{}", &text[..text.len().min(200)]);
    assert!(got.len() < 12_000_000, "the whole bootstrap ({} bytes) was sent to a client that did not read", got.len());
    assert!(!text.contains("\"end\":true"), "the abandoned bootstrap still ended with its end line");
    // The server is unharmed.
    assert!(healthz(&server, SLACK).await.is_ok());
}

store_test!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_exits_within_the_grace_whatever_clients_hold
);
async fn sigterm_exits_within_the_grace_whatever_clients_hold(backend: &Backend) {
    // Every other deadline is longer than the grace, so that only the grace can end them.
    let config = "[server]\nheader_read_timeout_secs = 60\nkeep_alive_timeout_secs = 60\nbody_read_timeout_secs = 60\n\
                  write_timeout_secs = 60\nshutdown_grace_secs = 3\n";
    let mut server = Server::start_with(backend, Options { config: Some(config.into()), ..Options::default() });
    push_large_entities(&server).await;
    let acked = push(
        &client(),
        &server.url,
        "dev1",
        vec![upsert("last", "tasks", "t1", json!({"done": true}), &hlc(now_ms() - 1000, 0, "dev1"))],
    )
    .await;
    let head = acked["cursor"].as_u64().unwrap();

    let mut header = TcpStream::connect(addr(&server)).await.unwrap();
    header.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Half: ").await.unwrap();
    let mut body = TcpStream::connect(addr(&server)).await.unwrap();
    body.write_all(
        b"POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"device",
    )
    .await
    .unwrap();
    let mut bootstrap = small_buffer_connection(&server).await;
    bootstrap.write_all(b"GET /v1/bootstrap?device_id=stalled HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut idle = TcpStream::connect(addr(&server)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3) + SLACK * 2,
            "still running {:?} after SIGTERM",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = started.elapsed();
    eprintln!(
        "{}: shutdown with four stalled clients took {took:?}",
        if backend.is_postgres() { "postgres" } else { "sqlite" }
    );
    assert!(status.success(), "exit status {status}");
    assert!(took >= Duration::from_secs(2), "the stalled clients cannot have been waited for: {took:?}");
    for s in [&mut header, &mut body, &mut bootstrap, &mut idle] {
        let (closed, _) = wait_closed(s, Duration::from_secs(5)).await;
        assert!(closed.is_some(), "a client connection outlived the server");
    }

    // Acknowledged changes are durable across the shutdown.
    server.restart();
    let (_, status) = get(&client(), &server.url, "/v1/status").await;
    assert_eq!(status["head"], head, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_hyper_cannot_parse_are_answered_with_the_json_error() {
    let server = start(FAST);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("a garbage request line", b"GARBAGE\r\n\r\n".to_vec(), 400),
        (
            "a 10 KB URI",
            format!("GET /v1/pull?device_id=d&x={} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(10_000)).into_bytes(),
            414,
        ),
        (
            "a 100 KB URI",
            format!("GET /v1/pull?x={} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000)).into_bytes(),
            431,
        ),
        (
            "a 70 KB header",
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(70_000)).into_bytes(),
            431,
        ),
        (
            "150 header fields",
            format!(
                "GET /healthz HTTP/1.1\r\nHost: x\r\n{}\r\n",
                (0..150).map(|i| format!("X-{i}: v\r\n")).collect::<String>()
            )
            .into_bytes(),
            431,
        ),
    ];
    for (what, request, expected) in cases {
        let (status, head, body) = raw(&server, &request).await;
        assert_eq!(status, expected, "{what}: {head} {body}");
        assert!(head.contains("content-type: application/json"), "{what}: {head}");
        assert_eq!(body["error"], "invalid_request", "{what}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
    }
    assert!(healthz(&server, SLACK).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_with_prior_knowledge_is_still_served() {
    let server = start(FAST);
    let c = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let r = c.get(format!("{}/healthz", server.url)).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let change = upsert("h2-1", "tasks", "t1", json!({"title": "over h2"}), &hlc(now_ms() - 1000, 0, "h2dev"));
    let r = c
        .post(format!("{}/v1/push", server.url))
        .json(&json!({"device_id": "h2dev", "changes": [change]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["results"][0]["status"], "applied", "{body}");
}
