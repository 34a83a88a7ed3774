//! Changes the server refuses: retried a bounded number of times, then set
//! aside as failed without blocking the rest of the outbox; clock skew
//! re-stamped within the same sync; `version_mismatch` kept as failed; and a
//! 10,000-change sync.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::{Devices, FakeClock, TestServer, config, listing, obj, system_ms};
use deltasync_client::backoff::MAX_RETRIES;
use deltasync_client::{Client, ClientError, OutboxEntry, OutboxStatus};
use deltasync_protocol::ConflictReason;
use serde_json::{Value, json};

/// Longer than any refusal backoff (its cap is 300 s).
const BACKOFF_PASSED_MS: u64 = 301_000;

fn entry<'a>(outbox: &'a [OutboxEntry], change_id: &str) -> &'a OutboxEntry {
    outbox
        .iter()
        .find(|e| e.change.change_id.as_str() == change_id)
        .unwrap_or_else(|| panic!("{change_id} is not in the outbox: {outbox:?}"))
}

fn logged_ids(log: &[Value]) -> Vec<String> {
    log.iter().map(|c| c["change_id"].as_str().unwrap().to_owned()).collect()
}

fn hlc_ms(hlc: &str) -> u64 {
    hlc[..13].parse().unwrap()
}

/// Writes the scenario of the oversized change: good1, big (refused), good2
/// (another entity), good3 (big's entity). Returns their change ids.
fn write_big_scenario(client: &Client) -> [String; 4] {
    let good1 = client.patch("tasks", "g1", obj(json!({"v": 1}))).unwrap().unwrap();
    let big = client.patch("tasks", "big", obj(json!({"blob": "x".repeat(200)}))).unwrap().unwrap();
    let good2 = client.patch("tasks", "g2", obj(json!({"v": 2}))).unwrap().unwrap();
    let good3 = client.patch("tasks", "big", obj(json!({"v": 3}))).unwrap().unwrap();
    [good1, big, good2, good3].map(|id| id.as_str().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_change_is_retried_then_failed_while_the_outbox_keeps_moving() {
    let clock = FakeClock::at_system_time();
    let mut server =
        TestServer::start_with(config("[server]\nmax_data_bytes = 64\n"), Some(clock.server_clock())).await;

    // The server refuses the request whole with 413, naming the offending change's index.
    let hlc = format!("{:013}-00000-probe", system_ms());
    let small = json!({"change_id": "p1", "collection": "probe", "entity_id": "e", "op": "upsert", "data": {"v": 1}, "hlc": hlc});
    let large = json!({"change_id": "p2", "collection": "probe", "entity_id": "e", "op": "upsert", "data": {"blob": "x".repeat(200)}, "hlc": hlc});
    let (code, body) = server.post("/v1/push", &json!({"device_id": "probe", "changes": [small, large]})).await;
    assert_eq!(code, 413, "{body}");
    assert_eq!(body["error"], "payload_too_large");
    assert!(body["message"].as_str().unwrap().contains("max_data_bytes is 64"), "{body}");
    assert_eq!(body["details"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body["details"][0]["index"], 1, "{body}");
    assert_eq!(body["details"][0]["change_id"], "p2", "{body}");
    assert_eq!(server.head().await, 0, "a refused request changes nothing");

    let devices = Devices::new();
    let client = devices.open_clocked("phone", &server.url, clock.wall(0));
    let [good1, big, good2, good3] = write_big_scenario(&client);
    // Pending changes show in reads, the refused-to-be one included (for now).
    let view = client.get("tasks", "big").unwrap().unwrap();
    assert_eq!(view.data["v"], 3);
    assert_eq!(view.data["blob"].as_str().unwrap().len(), 200);

    // First sync: good1 and good2 go through at once; big is refused (retry 1)
    // and good3 waits behind it (same entity, order kept).
    let r = client.sync().await.unwrap();
    assert_eq!((r.pushed, r.failed), (2, 0), "{r:?}");
    assert_eq!(r.pending, 2, "big and good3 still pending: {r:?}");
    assert!(r.verified);
    assert_eq!(logged_ids(&server.log().await), [good1.clone(), good2.clone()]);
    let outbox = client.outbox().unwrap();
    assert_eq!(outbox.len(), 2, "{outbox:?}");
    let e = entry(&outbox, &big);
    assert_eq!((e.status, e.retries), (OutboxStatus::Pending, 1));
    let err = e.last_error.as_deref().expect("last_error is kept");
    assert!(err.contains("max_data_bytes"), "last_error names the limit: {err}");
    let e = entry(&outbox, &good3);
    assert_eq!((e.status, e.retries, e.seq), (OutboxStatus::Pending, 0, None));

    // A network failure is not a refusal: retries do not move.
    server.stop().await;
    clock.advance(BACKOFF_PASSED_MS);
    let err = client.sync_scheduled().await.unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
    assert!(err.is_transient());
    let e = client.outbox().unwrap();
    assert_eq!(entry(&e, &big).retries, 1, "a dead server does not count as a refusal");
    assert_eq!(entry(&e, &good3).retries, 0);
    server.restart().await;

    // Each scheduled sync past the backoff is one more refusal; good3 keeps waiting.
    for expected_retries in 2..MAX_RETRIES {
        clock.advance(BACKOFF_PASSED_MS);
        let r = client.sync_scheduled().await.unwrap();
        assert_eq!((r.pushed, r.failed, r.pending), (0, 0, 2), "{r:?}");
        let outbox = client.outbox().unwrap();
        let e = entry(&outbox, &big);
        assert_eq!((e.status, e.retries), (OutboxStatus::Pending, expected_retries), "{e:?}");
        assert!(e.last_error.as_deref().unwrap().contains("max_data_bytes"));
        assert_eq!(entry(&outbox, &good3).status, OutboxStatus::Pending);
        assert_eq!(server.head().await, 2);
    }

    // The fifth refusal sets big aside as failed, and good3 goes through in the same sync.
    clock.advance(BACKOFF_PASSED_MS);
    let r = client.sync_scheduled().await.unwrap();
    assert_eq!((r.failed, r.pushed, r.pending), (1, 1, 0), "{r:?}");
    assert!(r.conflicts >= 1, "{r:?}");
    assert_eq!(logged_ids(&server.log().await), [good1, good2, good3]);
    let st = client.stats().unwrap();
    assert_eq!((st.pending, st.failed), (0, 1));
    let exported = client.export_pending().unwrap();
    assert_eq!(exported.len(), 1, "{exported:?}");
    assert_eq!(exported[0]["change_id"], big.as_str());
    assert_eq!(exported[0]["state"], "failed");
    assert_eq!(exported[0]["op"], "upsert");
    assert!(exported[0]["last_error"].as_str().unwrap().contains("max_data_bytes"), "{}", exported[0]);

    // A failed change is no longer applied to reads.
    assert_eq!(client.get("tasks", "big").unwrap().unwrap().data, obj(json!({"v": 3})));
    let (_, entities) = server.snapshot().await;
    assert_eq!(common::server_listing(&entities, "tasks"), listing(&client, "tasks"));

    // Later syncs do not send it again, and keep it.
    let r = client.sync().await.unwrap();
    assert_eq!((r.pushed, r.failed, r.pending), (0, 0, 0), "{r:?}");
    assert_eq!(client.stats().unwrap().failed, 1);
    assert_eq!(server.head().await, 3);
    server.stop().await;
}

/// After the last refusal, the failed entry's `retries` ("how many times the
/// server refused it") should say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_change_counts_every_refusal() {
    let clock = FakeClock::at_system_time();
    let mut server =
        TestServer::start_with(config("[server]\nmax_data_bytes = 64\n"), Some(clock.server_clock())).await;
    let devices = Devices::new();
    let client = devices.open_clocked("phone", &server.url, clock.wall(0));
    let [_, big, _, _] = write_big_scenario(&client);
    for _ in 0..MAX_RETRIES {
        clock.advance(BACKOFF_PASSED_MS);
        client.sync_scheduled().await.unwrap();
    }
    let outbox = client.outbox().unwrap();
    let e = entry(&outbox, &big);
    assert_eq!(e.status, OutboxStatus::Failed);
    let last_error = e.last_error.clone().unwrap();
    assert!(last_error.contains(&format!("refused {MAX_RETRIES} times")), "{last_error}");
    let exported = client.export_pending().unwrap();
    assert_eq!(
        (e.retries, exported[0]["retries"].as_u64()),
        (MAX_RETRIES, Some(u64::from(MAX_RETRIES))),
        "the server refused it {MAX_RETRIES} times (last_error: {last_error:?}), but the failed entry records {} retries",
        e.retries
    );
    server.stop().await;
}

/// A sync the user asks for gives refused changes a fresh start (seed 003:
/// "manual sync resets retry logic"): their count goes back to 0 before the
/// attempt, so a refusal in it leaves 1, and it is not set aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_sync_resets_the_retry_count_of_refused_changes() {
    let clock = FakeClock::at_system_time();
    let mut server =
        TestServer::start_with(config("[server]\nmax_data_bytes = 64\n"), Some(clock.server_clock())).await;
    let devices = Devices::new();
    let client = devices.open_clocked("phone", &server.url, clock.wall(0));
    let [_, big, _, _] = write_big_scenario(&client);
    for _ in 1..MAX_RETRIES {
        clock.advance(BACKOFF_PASSED_MS);
        client.sync_scheduled().await.unwrap();
    }
    assert_eq!(entry(&client.outbox().unwrap(), &big).retries, MAX_RETRIES - 1);

    // No wait for the backoff: the manual sync sends it at once, counting from 0.
    let r = client.sync().await.unwrap();
    assert_eq!(r.failed, 0, "one refusal after a reset does not set it aside: {r:?}");
    let e = entry(&client.outbox().unwrap(), &big).clone();
    assert_eq!((e.status, e.retries), (OutboxStatus::Pending, 1), "{e:?}");
    assert!(e.next_attempt_at > clock.now(), "the new refusal backs off again: {e:?}");
    server.stop().await;
}

/// A wall clock that reads the system clock plus an adjustable offset.
fn skewed_clock(offset: Arc<AtomicI64>) -> Arc<dyn Fn() -> u64 + Send + Sync> {
    Arc::new(move || system_ms().saturating_add_signed(offset.load(Ordering::SeqCst)))
}

async fn assert_restamped_within_drift(server: &TestServer, client: &Client) {
    let r = client.sync().await.unwrap();
    assert!(r.restamped >= 1, "{r:?}");
    assert_eq!((r.pushed, r.failed, r.pending), (1, 0, 0), "{r:?}");
    assert!(r.verified);
    let status = server.status().await;
    let log = server.log().await;
    let last = log.last().unwrap();
    let ms = hlc_ms(last["hlc"].as_str().unwrap());
    let server_time = last["server_time"].as_u64().unwrap();
    assert!(ms <= server_time + 300_000, "the stored hlc {} is ahead of the server's time {server_time}", last["hlc"]);
    assert!(
        ms + 300_000 >= status.server_time,
        "the stored hlc {} is far behind the server's time {}",
        last["hlc"],
        status.server_time
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_stamped_by_a_clock_an_hour_ahead_is_restamped_and_applied_in_the_same_sync() {
    let mut server = TestServer::start().await;
    let devices = Devices::new();

    // A new device whose clock runs an hour ahead from the start.
    let ahead = Arc::new(AtomicI64::new(3_600_000));
    let fast = devices.open_clocked("fast", &server.url, skewed_clock(ahead.clone()));
    fast.patch("tasks", "t1", obj(json!({"title": "from the future"}))).unwrap();
    let stamped = fast.outbox().unwrap()[0].change.hlc.physical_ms();
    assert!(stamped > system_ms() + 3_000_000, "written with the fast clock");
    assert_restamped_within_drift(&server, &fast).await;
    assert_eq!(server.head().await, 1);

    // Once corrected, its next write is not refused at all.
    fast.patch("tasks", "t1", obj(json!({"title": "now"}))).unwrap();
    let r = fast.sync().await.unwrap();
    assert_eq!((r.pushed, r.restamped, r.failed), (1, 0, 0), "{r:?}");

    // A device that synced normally, then whose clock jumps an hour ahead.
    let jump = Arc::new(AtomicI64::new(0));
    let jumpy = devices.open_clocked("jumpy", &server.url, skewed_clock(jump.clone()));
    jumpy.sync().await.unwrap();
    jump.store(3_600_000, Ordering::SeqCst);
    jumpy.patch("tasks", "t2", obj(json!({"title": "jumped"}))).unwrap();
    assert_restamped_within_drift(&server, &jumpy).await;

    // Both devices and the server agree.
    fast.sync().await.unwrap();
    jumpy.sync().await.unwrap();
    let status = server.status().await;
    for c in [&fast, &jumpy] {
        assert_eq!(c.get("tasks", "t1").unwrap().unwrap().data["title"], "now");
        assert_eq!(c.get("tasks", "t2").unwrap().unwrap().data["title"], "jumped");
        let st = c.stats().unwrap();
        assert_eq!((st.cursor, st.pending, st.failed), (status.head, 0, 0));
        assert_eq!(st.state_digest, status.state_digest);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_mismatch_under_reject_is_kept_as_failed_and_the_rest_proceeds() {
    let mut server = TestServer::start_with(config("[collections.docs]\npolicy = \"reject\"\n"), None).await;
    let devices = Devices::new();
    let a = devices.open("A", &server.url);
    let b = devices.open("B", &server.url);

    a.put("docs", "d1", obj(json!({"v": 1}))).unwrap();
    assert_eq!(a.sync().await.unwrap().pushed, 1);
    b.sync().await.unwrap();
    assert_eq!(b.get("docs", "d1").unwrap().unwrap().version, 1);

    // A edits d1 (version 2) while B, offline, edits the version it saw (1).
    a.patch("docs", "d1", obj(json!({"v": 2}))).unwrap();
    let r = a.sync().await.unwrap();
    assert_eq!((r.pushed, r.failed), (1, 0), "{r:?}");
    let stale = b.patch("docs", "d1", obj(json!({"v": "b"}))).unwrap().unwrap();
    b.patch("docs", "d2", obj(json!({"v": 1}))).unwrap();
    b.patch("tasks", "t1", obj(json!({"done": true}))).unwrap();
    assert_eq!(b.get("docs", "d1").unwrap().unwrap().data, obj(json!({"v": "b"})), "optimistic view");

    let r = b.sync().await.unwrap();
    assert_eq!((r.pushed, r.failed, r.pending), (2, 1, 0), "{r:?}");
    assert!(r.verified);
    assert_eq!(r.lost.len(), 1, "{r:?}");
    let lost = &r.lost[0];
    assert_eq!(lost.change_id, stale.as_str());
    assert_eq!(lost.conflict.as_ref().unwrap().reason, ConflictReason::VersionMismatch);
    assert_eq!(lost.conflict.as_ref().unwrap().fields, None);
    let current = lost.conflict.as_ref().unwrap().current.as_ref().expect("current entity");
    assert_eq!(current["data"], json!({"v": 2}));
    assert_eq!(current["version"], 2);

    // Kept as failed with its conflict; not applied to reads.
    let st = b.stats().unwrap();
    assert_eq!((st.pending, st.failed), (0, 1));
    let exported = b.export_pending().unwrap();
    assert_eq!(exported.len(), 1);
    assert_eq!(exported[0]["change_id"], stale.as_str());
    assert_eq!(exported[0]["state"], "failed");
    assert_eq!(exported[0]["conflict"]["reason"], "version_mismatch");
    assert_eq!(exported[0]["conflict"]["current"]["data"], json!({"v": 2}));
    assert_eq!(b.get("docs", "d1").unwrap().unwrap().data, obj(json!({"v": 2})));
    assert_eq!(b.get("docs", "d2").unwrap().unwrap().data, obj(json!({"v": 1})));
    assert_eq!(b.get("tasks", "t1").unwrap().unwrap().data, obj(json!({"done": true})));

    // The server logged the others, not the stale one, and recorded the conflict.
    let log = server.log().await;
    assert_eq!(log.len(), 4);
    assert!(!logged_ids(&log).contains(&stale.as_str().to_owned()));
    let (_, conflicts) = server.get("/v1/conflicts").await;
    assert_eq!(conflicts["conflicts"][0]["reason"], "version_mismatch");
    assert_eq!(conflicts["conflicts"][0]["change_id"], stale.as_str());

    // The failed change stays across syncs and is never re-sent.
    let r = b.sync().await.unwrap();
    assert_eq!((r.pushed, r.failed), (0, 0), "{r:?}");
    assert_eq!(b.stats().unwrap().failed, 1);
    a.sync().await.unwrap();
    assert_eq!(listing(&a, "docs"), listing(&b, "docs"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_offline_changes_sync_and_reach_another_device() {
    const N: u64 = 10_000;
    let mut server = TestServer::start().await;
    let devices = Devices::new();
    let a = devices.open("A", &server.url);
    let b = devices.open("B", &server.url);

    let started = Instant::now();
    let mut lap = Instant::now();
    for i in 0..N {
        a.patch("bulk", &format!("e{}", i % 100), obj(json!({"n": i}))).unwrap().expect("a change");
        if (i + 1) % 2_000 == 0 {
            eprintln!("offline writes {}..{} took {:?}", i + 1 - 2_000, i + 1, lap.elapsed());
            lap = Instant::now();
        }
    }
    eprintln!("10,000 offline writes took {:?}", started.elapsed());
    assert_eq!(a.stats().unwrap().pending, N);

    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(600), a.sync()).await.expect("sync finishes").unwrap();
    let push_time = started.elapsed();
    eprintln!("sync of 10,000 changes (push) took {push_time:?}: {} pushed", r.pushed);
    assert_eq!((r.pushed, r.applied, r.failed, r.pending), (N, N, 0, 0), "{r:?}");
    assert!(r.verified);
    assert_eq!(server.head().await, N);

    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(600), b.sync()).await.expect("sync finishes").unwrap();
    eprintln!("sync of 10,000 changes (pull on a second device) took {:?}", started.elapsed());
    assert_eq!(r.pulled, N, "{r:?}");
    assert!(r.verified);

    let status = server.status().await;
    let expected: Vec<(String, serde_json::Map<String, Value>)> = {
        let mut v: Vec<_> = (0..100).map(|k| (format!("e{k}"), obj(json!({"n": N - 100 + k})))).collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    for c in [&a, &b] {
        assert_eq!(listing(c, "bulk"), expected);
        let st = c.stats().unwrap();
        assert_eq!((st.cursor, st.pending, st.failed), (N, 0, 0));
        assert_eq!(st.state_hash, status.state_hash);
        assert_eq!(st.state_digest, status.state_digest);
    }
    server.stop().await;
}

/// Limits that refuse a whole request (no `details`) are not a refusal of any
/// change: the client splits its batches until they fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_over_the_servers_request_limits_are_split_not_counted_as_refusals() {
    for (toml, what) in
        [("[server]\nmax_batch = 7\n", "max_batch"), ("[server]\nmax_body_bytes = 3000\n", "max_body_bytes")]
    {
        let mut server = TestServer::start_with(config(toml), None).await;
        let devices = Devices::new();
        let client = devices.open("A", &server.url);
        for i in 0..60 {
            client.patch("tasks", &format!("t{i}"), obj(json!({"title": format!("task number {i}")}))).unwrap();
        }
        let r = client.sync().await.unwrap_or_else(|e| panic!("{what}: sync failed: {e}"));
        assert_eq!((r.pushed, r.failed, r.pending), (60, 0, 0), "{what}: {r:?}");
        assert_eq!(server.head().await, 60, "{what}");
        assert!(client.outbox().unwrap().is_empty(), "{what}");
        server.stop().await;
    }
}
