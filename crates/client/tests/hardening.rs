//! The SDK against servers that misbehave: one that answers a byte a second,
//! one whose bootstrap stalls, one whose answers cannot be parsed, one that
//! gives up reading large bodies (408), and a server restored from a backup.
//!
//! Bounds on time are liveness bounds ("fails within 20 s while the server
//! would take minutes"), never speed measurements.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Devices, Reply, ScriptedServer, TestServer, empty_status, http_answer, json_answer, obj, open_client};
use deltasync_client::{ClientError, ClientOptions, OutboxStatus, TimeoutKind};
use serde_json::json;

/// Well within what a timed-out request must take here, far from what the misbehaving server would take.
const LIVENESS: Duration = Duration::from_secs(20);

fn options(url: &str) -> ClientOptions {
    ClientOptions { server: Some(url.to_owned()), ..Default::default() }
}

/// A server whose every answer is a valid status, written one byte a second (about 4 minutes).
async fn trickling_server() -> ScriptedServer {
    ScriptedServer::start(|_| async {
        Reply::Trickle { bytes: json_answer(&empty_status()), every: Duration::from_secs(1) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_answering_a_byte_a_second_cannot_hold_a_request_past_its_timeout() {
    let server = trickling_server().await;
    let devices = Devices::new();
    let client =
        devices.open_with("A", ClientOptions { request_timeout: Duration::from_secs(2), ..options(&server.url) });
    client.patch("tasks", "t1", obj(json!({"v": 1}))).unwrap();
    let started = Instant::now();
    let err = client.sync().await.unwrap_err();
    assert!(started.elapsed() < LIVENESS, "the sync took {:?}", started.elapsed());
    match &err {
        ClientError::Timeout { kind: TimeoutKind::Request, operation, after } => {
            assert_eq!((operation.as_str(), *after), ("GET /v1/status", Duration::from_secs(2)));
        }
        other => panic!("expected a request timeout, got {other:?}"),
    }
    assert!(err.is_transient());
    assert!(err.to_string().contains("ClientOptions::request_timeout"), "{err}");
    assert_eq!(client.stats().unwrap().pending, 1, "nothing local is lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_sync_stops_at_its_own_deadline() {
    let server = trickling_server().await;
    let devices = Devices::new();
    let client =
        devices.open_with("A", ClientOptions { sync_timeout: Some(Duration::from_secs(2)), ..options(&server.url) });
    client.patch("tasks", "t1", obj(json!({"v": 1}))).unwrap();
    let started = Instant::now();
    let err = client.sync().await.unwrap_err();
    assert!(started.elapsed() < LIVENESS, "the sync took {:?}", started.elapsed());
    assert!(matches!(err, ClientError::Timeout { kind: TimeoutKind::Sync, .. }), "{err:?}");
    let stats = client.stats().unwrap();
    assert_eq!(stats.pending, 1, "nothing local is lost");
    assert_eq!(stats.last_error.map(|e| e.code), Some("timeout".to_owned()));
}

/// A server whose status is fine and whose every sync is told to reset; its
/// bootstrap sends its head, its header line and then `after_header` as one
/// more chunk (none when empty), then nothing while the connection stays open.
async fn bootstrap_then_stall(after_header: Vec<u8>) -> ScriptedServer {
    let after_header = Arc::new(after_header);
    ScriptedServer::start(move |req| {
        let after_header = after_header.clone();
        async move {
            match req.path() {
                "/v1/status" => Reply::Now(json_answer(&empty_status())),
                "/v1/sync" => Reply::Now(http_answer(
                    410,
                    "application/json",
                    br#"{"error":"reset_required","message":"bootstrap again"}"#,
                )),
                _ => {
                    let header = json!({"cursor": 0, "state_hash": "0".repeat(64), "state_digest": "0".repeat(64),
                        "server_time": common::system_ms(), "policies": {"default": "fields", "collections": {}}});
                    let mut head =
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
                            .to_vec();
                    let line = format!("{header}\n");
                    head.extend_from_slice(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes());
                    if !after_header.is_empty() {
                        head.extend_from_slice(format!("{:x}\r\n", after_header.len()).as_bytes());
                        head.extend_from_slice(&after_header);
                        head.extend_from_slice(b"\r\n");
                    }
                    Reply::Stall(head)
                }
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_that_stalls_fails_after_the_stall_timeout() {
    // Status is fine, every sync is told to reset, and the bootstrap sends its
    // head and header line, then nothing.
    let server = bootstrap_then_stall(Vec::new()).await;
    let devices = Devices::new();
    let client =
        devices.open_with("A", ClientOptions { stall_timeout: Duration::from_secs(2), ..options(&server.url) });
    client.patch("tasks", "t1", obj(json!({"v": 1}))).unwrap();
    let started = Instant::now();
    let err = client.sync().await.unwrap_err();
    assert!(started.elapsed() < LIVENESS, "the sync took {:?}", started.elapsed());
    assert!(matches!(err, ClientError::Timeout { kind: TimeoutKind::Stall, .. }), "{err:?}");
    assert!(err.to_string().contains("GET /v1/bootstrap"), "{err}");
    assert_eq!(client.stats().unwrap().pending, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_line_without_end_is_refused_not_held_in_memory() {
    // The bootstrap sends its header, then one line longer than the client
    // reads (MAX_LINE_BYTES, 64 MiB) and never its newline.
    let server = bootstrap_then_stall(vec![b'x'; (65 << 20) + 1]).await;
    let devices = Devices::new();
    let client = devices.open_with("A", options(&server.url));
    client.patch("tasks", "t1", obj(json!({"v": 1}))).unwrap();
    let started = Instant::now();
    let err = client.sync().await.unwrap_err();
    assert!(started.elapsed() < LIVENESS, "the sync took {:?}", started.elapsed());
    assert!(err.to_string().contains("line 2 is longer than 64 MiB"), "{err}");
    assert!(err.to_string().contains("GET /v1/bootstrap"), "{err}");
    assert_eq!(client.stats().unwrap().pending, 1, "nothing local is lost");
}

/// A sync answer whose one pulled change holds data nested `depth` levels
/// deep: more than serde_json parses (128) when `depth` is larger.
fn deep_sync_answer(depth: usize) -> String {
    let change = json!({"seq": 1, "change_id": "deep", "device_id": "other", "collection": "tasks",
        "entity_id": "t9", "op": "upsert", "data": {"x": "DEEP"}, "hlc": "1763800000000-00000-other",
        "server_time": common::system_ms()});
    let answer = json!({"results": [], "changes": [change], "cursor": 1, "has_more": false,
        "state_hash": "0".repeat(64), "state_digest": "0".repeat(64), "server_time": common::system_ms()});
    answer.to_string().replace("\"DEEP\"", &format!("{}{}", "[".repeat(depth), "]".repeat(depth)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_answer_names_the_request_and_stays_visible_until_a_sync_succeeds() {
    let poisoned = ScriptedServer::start(|req| async move {
        match req.path() {
            "/v1/status" => Reply::Now(json_answer(&empty_status())),
            _ => Reply::Now(http_answer(200, "application/json", deep_sync_answer(300).as_bytes())),
        }
    })
    .await;
    let devices = Devices::new();
    let client = devices.open("A", &poisoned.url);
    client.patch("tasks", "t1", obj(json!({"v": 1}))).unwrap();
    assert!(client.stats().unwrap().last_error.is_none());

    let err = client.sync().await.unwrap_err();
    match &err {
        ClientError::Protocol { request, message } => {
            assert_eq!(*request, "POST /v1/sync");
            assert!(message.contains("recursion limit"), "{message}");
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert!(!err.is_transient());
    let first = client.stats().unwrap();
    let last = first.last_error.clone().expect("the error is kept");
    assert_eq!(last.code, "protocol");
    assert!(last.message.contains("POST /v1/sync") && last.message.contains("recursion limit"), "{last:?}");
    assert_eq!((first.failing_since, first.failed_syncs), (Some(last.at), 1));

    tokio::time::sleep(Duration::from_millis(5)).await;
    client.sync().await.unwrap_err();
    let second = client.stats().unwrap();
    assert_eq!(second.failed_syncs, 2);
    assert_eq!(second.failing_since, first.failing_since, "still failing since the first failure");
    assert!(second.last_error.unwrap().at > last.at);
    drop(client);

    // Kept across restarts, and cleared by the next sync that succeeds.
    let mut server = TestServer::start().await;
    let client = devices.open("A", &server.url);
    assert_eq!(client.stats().unwrap().failed_syncs, 2);
    let report = client.sync().await.unwrap();
    assert_eq!(report.applied, 1);
    let healthy = client.stats().unwrap();
    assert_eq!((healthy.last_error, healthy.failing_since, healthy.failed_syncs), (None, None, 0));
    server.stop().await;
}

/// A proxy in front of `target` that answers `408 request_timeout` to every
/// sync whose body is larger than `max_body` bytes, as a server does when a
/// body takes too long to arrive, and forwards everything else.
async fn impatient_proxy(target: String, max_body: usize, refused: Arc<AtomicUsize>) -> ScriptedServer {
    let http = reqwest::Client::new();
    ScriptedServer::start(move |req| {
        let (http, target, refused) = (http.clone(), target.clone(), refused.clone());
        async move {
            if req.path() == "/v1/sync" && req.body.len() > max_body {
                refused.fetch_add(1, Ordering::SeqCst);
                let body = br#"{"error":"request_timeout","message":"the request body did not arrive in time"}"#;
                return Reply::Now(http_answer(408, "application/json", body));
            }
            let method = reqwest::Method::from_bytes(req.method.as_bytes()).unwrap();
            let resp = http
                .request(method, format!("{target}{}", req.target))
                .header("content-type", "application/json")
                .body(req.body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
            Reply::Now(http_answer(status, &content_type, &resp.bytes().await.unwrap()))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_408_halves_the_batch_and_every_change_still_goes() {
    let mut server = TestServer::start().await;
    let refused = Arc::new(AtomicUsize::new(0));
    // Room for about four changes per request.
    let proxy = impatient_proxy(server.url.clone(), 1200, refused.clone()).await;
    let devices = Devices::new();
    let client = devices.open("A", &proxy.url);
    for i in 0..20 {
        client.patch("tasks", &format!("t{i:02}"), obj(json!({"title": format!("task number {i}")}))).unwrap();
    }
    let report = client.sync().await.unwrap();
    assert_eq!((report.applied, report.pending, report.failed), (20, 0, 0), "{report:?}");
    assert!(refused.load(Ordering::SeqCst) >= 2, "the proxy never refused a body");
    assert_eq!(server.head().await, 20);
    assert!(client.outbox().unwrap().iter().all(|e| e.retries == 0), "a 408 counts no refusal");

    // A single change too large for the proxy: the sync fails as transient, the change waits.
    let big = "x".repeat(4000);
    client.patch("tasks", "big", obj(json!({"body": big}))).unwrap();
    let err = client.sync().await.unwrap_err();
    assert!(matches!(err, ClientError::Server { status: 408, .. }) && err.is_transient(), "{err:?}");
    let entries = client.outbox().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!((entries[0].status, entries[0].retries), (OutboxStatus::Pending, 0));
    server.stop().await;
}

/// The ids of the server's log, each with how often it appears.
async fn log_counts(server: &TestServer) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    for c in server.log().await {
        *counts.entry(c["change_id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_that_finds_the_server_restored_puts_the_lost_changes_back() {
    let mut server = TestServer::start().await;
    let devices = Devices::new();
    let client = devices.open("A", &server.url);
    let mut ids = Vec::new();
    for i in 0..2 {
        ids.push(client.patch("tasks", &format!("before{i}"), obj(json!({"v": i}))).unwrap().unwrap());
    }
    client.sync().await.unwrap();
    server.stop().await;
    let backup = tempfile::tempdir().unwrap();
    server.back_up_to(backup.path());
    server.restart().await;

    let mut after = Vec::new();
    after.push(client.patch("tasks", "after0", obj(json!({"v": 10}))).unwrap().unwrap());
    after.push(client.delete("tasks", "before0").unwrap());
    after.push(client.append("log", "l1", json!({"op": "opaque"})).unwrap());
    assert_eq!(client.sync().await.unwrap().applied, 3);
    assert_eq!(client.stats().unwrap().journal, 5);
    server.stop().await;
    server.restore_from(backup.path());
    server.restart().await;
    assert_eq!(server.head().await, 2, "the restore lost the last three changes");

    // The long poll meets a 410 (the device's cursor is past the head), heals,
    // and finds three journaled changes missing: they are pending again, in reads at once.
    assert!(client.wait_for_changes(Duration::from_secs(1)).await.unwrap());
    let pending: Vec<_> = client.outbox().unwrap().into_iter().map(|e| (e.change.change_id, e.requeued)).collect();
    assert_eq!(pending, after.iter().map(|id| (id.clone(), true)).collect::<Vec<_>>());
    assert_eq!(client.get("tasks", "before0").unwrap(), None);
    assert_eq!(client.get("tasks", "after0").unwrap().unwrap().data, obj(json!({"v": 10})));

    let report = client.sync().await.unwrap();
    assert_eq!((report.applied, report.restored, report.duplicate), (3, 3, 0), "{report:?}");
    assert!(report.lost.is_empty(), "{report:?}");
    let counts = log_counts(&server).await;
    for id in ids.iter().chain(&after) {
        assert_eq!(counts.get(id.as_str()), Some(&1), "{id} in {counts:?}");
    }
    let (header, _) = server.snapshot().await;
    let stats = client.stats().unwrap();
    assert_eq!((stats.cursor, stats.state_digest), (header.cursor, header.state_digest));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_keeps_only_its_newest_entries() {
    let mut server = TestServer::start().await;
    let devices = Devices::new();
    let client = devices.open_with("A", ClientOptions { journal_limit: 2, ..options(&server.url) });
    client.sync().await.unwrap();
    server.stop().await;
    let backup = tempfile::tempdir().unwrap();
    server.back_up_to(backup.path());
    server.restart().await;
    let ids: Vec<_> =
        (0..3).map(|i| client.patch("tasks", &format!("t{i}"), obj(json!({"v": i}))).unwrap().unwrap()).collect();
    client.sync().await.unwrap();
    assert_eq!(client.stats().unwrap().journal, 2);
    server.stop().await;
    server.restore_from(backup.path());
    server.restart().await;

    let report = client.sync().await.unwrap();
    assert!(report.healed, "{report:?}");
    assert_eq!(report.restored, 2, "only the two newest were kept: {report:?}");
    let counts = log_counts(&server).await;
    assert_eq!((counts.get(ids[0].as_str()), counts.get(ids[2].as_str())), (None, Some(&1)));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heal_without_a_restore_resends_nothing_from_the_journal() {
    let mut server = TestServer::start().await;
    let devices = Devices::new();
    let client = devices.open("A", &server.url);
    for i in 0..30 {
        client.patch("tasks", &format!("t{i}"), obj(json!({"v": i}))).unwrap();
    }
    client.sync().await.unwrap();
    assert_eq!(client.stats().unwrap().journal, 30);
    drop(client);
    // Damage the local chain head: the next sync finds a mismatch and heals.
    let conn = rusqlite::Connection::open(devices.path("A")).unwrap();
    conn.execute("UPDATE meta SET value = ?1 WHERE key = 'state_hash'", ["1".repeat(64)]).unwrap();
    drop(conn);

    let client = devices.open("A", &server.url);
    let report = client.sync().await.unwrap();
    assert!(report.healed && !report.verified, "{report:?}");
    assert_eq!((report.pushed, report.restored), (0, 0), "the journal was sent again: {report:?}");
    assert_eq!(client.stats().unwrap().journal, 30, "the journal is kept");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_file_at_the_database_path_is_refused_not_made_a_new_device() {
    let devices = Devices::new();
    std::fs::write(devices.path("A"), b"").unwrap();
    let err = deltasync_client::Client::open(devices.path("A"), ClientOptions::default()).err().unwrap();
    assert!(matches!(err, ClientError::NotADatabase { .. }), "{err:?}");
    assert_eq!(std::fs::metadata(devices.path("A")).unwrap().len(), 0, "the file is left as it was");
    let fresh = open_client(&devices.path("B"), ClientOptions::default());
    assert!(fresh.device_id().as_str().starts_with("dev-"));
}
