//! Faults around `deltasync client`: an answer lost after the server committed
//! the push, client processes killed around their writes, and a tampered local
//! state; nothing is lost, nothing is applied twice, and the damage is detected
//! and healed.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::devices::*;
use common::{Backend, Server, now_ms};
use deltasync_protocol::StateDigest;
use deltasync_protocol::digest::entity_hash;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy in front of a server that forwards every request but, as soon as
/// the server starts answering (it answers only after committing), closes the
/// client's connection without passing a byte of the answer on.
struct AnswerDroppingProxy {
    url: String,
    /// Connections whose answer was dropped.
    dropped: Arc<AtomicUsize>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl AnswerDroppingProxy {
    fn start(server_url: &str) -> AnswerDroppingProxy {
        let target: SocketAddr = server_url.trim_start_matches("http://").trim_end_matches('/').parse().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let dropped = Arc::new(AtomicUsize::new(0));
        let counter = dropped.clone();
        runtime.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(target).await else { return };
                    let (mut client_read, client_write) = client.into_split();
                    let (mut up_read, mut up_write) = upstream.into_split();
                    let forward = tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            match client_read.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if up_write.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        client_read
                    });
                    let mut first = [0u8; 1];
                    let answered = matches!(up_read.read(&mut first).await, Ok(1));
                    // Close the client's side: its read half with the forwarder, its write half here.
                    forward.abort();
                    let _ = forward.await;
                    drop(client_write);
                    if answered {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        AnswerDroppingProxy { url, dropped, runtime: Some(runtime) }
    }
}

impl Drop for AnswerDroppingProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// How many times each change id appears in the server's log.
fn log_counts(url: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for c in server_log(url, None) {
        *counts.entry(c["change_id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    counts
}

store_test!(#[test] fn a_push_whose_answer_is_lost_after_commit_is_retried_and_answered_duplicate);
fn a_push_whose_answer_is_lost_after_commit_is_retried_and_answered_duplicate(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let b = Device::new(dir.path(), "b");
    // A first sync, straight to the server, so A knows the policies.
    a.put("tasks", "t0", json!({"n": 0}));
    a.sync(&server.url);

    let change = a.patch("tasks", "t1", json!({"title": "exactly once"}));
    let change = change.as_str().unwrap().to_owned();
    let proxy = AnswerDroppingProxy::start(&server.url);
    let err = a.sync_fails(&proxy.url);
    assert_eq!(err["error"], "unreachable", "{err}");
    assert!(proxy.dropped.load(Ordering::SeqCst) >= 1, "the server never answered through the proxy");

    // The server committed it; the client does not know and keeps it.
    assert_eq!(log_counts(&server.url).get(&change), Some(&1), "the push was not committed before the answer");
    let st = a.status();
    assert_eq!((st["pending"].clone(), st["failed"].clone(), st["cursor"].clone()), (json!(1), json!(0), json!(1)));
    let exported = a.export_pending();
    assert_eq!(exported.len(), 1, "{exported:?}");
    assert_eq!((exported[0]["change_id"].as_str(), exported[0]["state"].as_str()), (Some(&*change), Some("pending")));
    assert_eq!(a.get("tasks", "t1"), Some(json!({"title": "exactly once"})));
    // Still lost through the proxy on a second try.
    assert_eq!(a.sync_fails(&proxy.url)["error"], "unreachable");
    drop(proxy);

    let r = a.sync(&server.url);
    assert_eq!(r["duplicate"], 1, "{r}");
    assert_eq!(r["applied"], 0, "{r}");
    assert_eq!(r["pushed"], 1, "{r}");
    assert_eq!(r["pending"], 0, "{r}");
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["healed"], false, "{r}");
    assert_eq!(r["cursor"], 2, "{r}");

    let (status, body) = http_get(&server.url, "/v1/pull?device_id=x&cursor=0&limit=1000", None);
    assert_eq!(status, 200, "{body}");
    let hits: Vec<&Value> = body["changes"].as_array().unwrap().iter().filter(|c| c["change_id"] == change).collect();
    assert_eq!(hits.len(), 1, "{body}");
    assert_eq!(body["changes"].as_array().unwrap().len(), 2, "{body}");
    assert_eq!(hits[0]["data"], json!({"title": "exactly once"}));

    let r = b.sync(&server.url);
    assert_eq!(r["pulled"], 2, "{r}");
    assert_eq!(b.get("tasks", "t1"), Some(json!({"title": "exactly once"})));
    assert_converged(&[&a, &b], &server.url, None, &[("tasks", None)]);
}

/// A tiny deterministic generator (xorshift), seeded and printed for reruns.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

store_test!(#[test] fn client_processes_killed_around_a_write_lose_nothing_acknowledged_and_half_write_nothing);
fn client_processes_killed_around_a_write_lose_nothing_acknowledged_and_half_write_nothing(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let b = Device::new(dir.path(), "b");
    a.put("k", "init", json!({"i": -1}));
    a.sync(&server.url);

    let seed = std::env::var("KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(now_ms() | 1);
    println!("KILL_SEED={seed}");
    let mut rng = Rng(seed);
    let data = |i: usize| json!({"i": i, "pad": format!("{i}-{}", "p".repeat(300 + i))});
    const ROUNDS: usize = 12;
    const PER_ROUND: usize = 4;
    let mut succeeded: HashMap<usize, String> = HashMap::new();
    let mut killed = 0;
    for round in 0..ROUNDS {
        let started = Instant::now();
        let mut procs = Vec::new();
        for j in 0..PER_ROUND {
            let i = round * PER_ROUND + j;
            let child = a
                .command(None, &["put", "k", &format!("e{i:03}"), &data(i).to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            procs.push((i, Duration::from_millis(rng.next() % 31), child));
        }
        procs.sort_by_key(|p| p.1);
        for (_, delay, child) in procs.iter_mut() {
            if let Some(rest) = delay.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
            let _ = child.kill(); // SIGKILL
        }
        for (i, _, child) in procs {
            let out = child.wait_with_output().unwrap();
            if out.status.success() {
                let id: Value = serde_json::from_slice(&out.stdout).unwrap();
                succeeded.insert(i, id.as_str().unwrap().to_owned());
            } else {
                assert!(out.status.code().is_none(), "e{i:03}: a put failed by itself: {out:?}");
                killed += 1;
            }
        }
    }
    println!("{} puts exited 0, {killed} were killed", succeeded.len());

    // The database is whole, and every outbox row is a whole change.
    let conn = a.sqlite();
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    let mut stmt =
        conn.prepare("SELECT change_id, collection, entity_id, change, status FROM outbox ORDER BY id").unwrap();
    let rows: Vec<(String, String, String, String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    drop(stmt);
    drop(conn);
    let mut in_outbox: HashMap<usize, String> = HashMap::new();
    for (change_id, collection, entity_id, change, status) in &rows {
        let c: Value = serde_json::from_str(change).unwrap_or_else(|e| panic!("outbox row {change_id}: {e}: {change}"));
        assert_eq!(c["change_id"], json!(change_id));
        assert_eq!((collection.as_str(), c["collection"].as_str()), ("k", Some("k")));
        assert_eq!(c["entity_id"], json!(entity_id));
        assert_eq!(c["op"], "upsert");
        assert_eq!(status, "pending");
        let i: usize = entity_id.trim_start_matches('e').parse().unwrap();
        assert_eq!(c["data"], data(i), "{entity_id}: half-written data");
        assert!(in_outbox.insert(i, change_id.clone()).is_none(), "{entity_id} written twice");
    }
    for (i, id) in &succeeded {
        assert_eq!(in_outbox.get(i), Some(id), "e{i:03}: a put that exited 0 is not in the outbox");
    }
    let exported: HashSet<String> =
        a.export_pending().iter().map(|c| c["change_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(exported, in_outbox.values().cloned().collect::<HashSet<_>>());
    assert_eq!(a.status()["pending"], in_outbox.len());
    println!(
        "{} changes in the outbox, {} of them from killed puts",
        in_outbox.len(),
        in_outbox.len() - succeeded.len()
    );

    // The database still takes writes, and one sync delivers everything.
    let last = a.put("k", "after", json!({"ok": true}));
    assert!(last.is_string());
    let r = a.sync(&server.url);
    assert_eq!(r["applied"], in_outbox.len() + 1, "{r}");
    assert_eq!(r["pending"], 0, "{r}");
    b.sync(&server.url);
    for i in 0..ROUNDS * PER_ROUND {
        let got = b.get("k", &format!("e{i:03}"));
        if in_outbox.contains_key(&i) {
            assert_eq!(got, Some(data(i)), "e{i:03} did not reach B");
        } else {
            assert_eq!(got, None, "e{i:03} reached B but was never in A's outbox");
        }
    }
    assert_eq!(b.list("k").as_array().unwrap().len(), in_outbox.len() + 2);
    assert_converged(&[&a, &b], &server.url, None, &[("k", None)]);
}

/// Syncs a corrupted device A that has a pending change: the sync must find the
/// mismatch, heal by re-bootstrapping, push the change, and leave A at the
/// server's hashes; the next sync is clean.
fn heal_and_check(server: &Server, a: &Device, b: &Device, late: &Device, mismatch_word: &str) {
    tick();
    let pending = a.patch("tasks", "t2", json!({"v": "after tamper"}));
    assert!(pending.is_string());
    let out = a.run(Some(&server.url), &["sync"]);
    assert!(out.success(), "{out:?}");
    let r = out.json();
    check_report(&r);
    assert_eq!(r["verified"], false, "{r}");
    assert_eq!(r["healed"], true, "{r}");
    let mismatch = r["mismatch"].as_str().unwrap_or_else(|| panic!("no mismatch in {r}"));
    assert!(mismatch.contains(mismatch_word), "{r}");
    assert!(r["pushed"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["bootstrapped"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["pending"], 0, "{r}");
    assert!(out.stderr.contains("warning"), "the heal is not reported on stderr: {}", out.stderr);

    let server_st = server_status(&server.url, None);
    let st = a.status();
    assert_eq!(st["state_hash"], server_st["state_hash"], "{st} vs {server_st}");
    assert_eq!(st["state_digest"], server_st["state_digest"], "{st} vs {server_st}");
    assert_eq!(st["cursor"], server_st["head"]);
    assert_eq!(r["state_hash"], server_st["state_hash"]);
    assert!(server_log(&server.url, None).iter().any(|c| c["change_id"] == pending), "the pending change was lost");

    let r = a.sync(&server.url);
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["healed"], false, "{r}");
    assert!(r.get("mismatch").is_none_or(Value::is_null), "{r}");

    b.sync(&server.url);
    assert_eq!(b.get("tasks", "t2"), Some(json!({"v": "after tamper"})));

    // The bootstrap kept t3's tombstone: an upsert older than the delete, pulled
    // after the heal, merges on A as on the server (t3 stays deleted, hashes agree).
    let r = late.sync(&server.url);
    assert_eq!(lost_summary(&r), vec![lost("tasks", "t3", "deleted", &["v"])], "{r}");
    let r = a.sync(&server.url);
    assert_eq!(
        (r["pulled"].clone(), r["verified"].clone(), r["healed"].clone()),
        (json!(1), json!(true), json!(false))
    );
    assert_eq!(a.get("tasks", "t3"), None);
    b.sync(&server.url);
    assert_converged(&[a, b, late], &server.url, None, &[("tasks", None)]);
}

/// A and B synced on a few entities (t3 deleted); `late` holds a pending upsert
/// of t3 made before A deleted it.
fn two_synced_devices(server: &Server, dir: &std::path::Path) -> (Device, Device, Device) {
    let a = Device::new(dir, "a");
    let b = Device::new(dir, "b");
    let late = Device::new(dir, "late");
    late.patch("tasks", "t3", json!({"v": "old"}));
    tick();
    a.put("tasks", "t1", json!({"v": 1, "title": "one"}));
    a.put("tasks", "t2", json!({"v": 2}));
    a.delete("tasks", "t3");
    a.sync(&server.url);
    b.patch("tasks", "t4", json!({"v": 4}));
    b.sync(&server.url);
    a.sync(&server.url);
    (a, b, late)
}

store_test!(#[test] fn a_tampered_state_hash_is_detected_and_healed_keeping_pending_changes);
fn a_tampered_state_hash_is_detected_and_healed_keeping_pending_changes(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let (a, b, late) = two_synced_devices(&server, dir.path());
    let good = a.meta("state_hash").unwrap();
    assert!(is_hash(&json!(good)));
    let bad = format!("{}{}", if good.starts_with('0') { "1" } else { "0" }, &good[1..]);
    a.sqlite().execute("UPDATE meta SET value = ?1 WHERE key = 'state_hash'", [&bad]).unwrap();
    assert_eq!(a.status()["state_hash"], json!(bad));
    heal_and_check(&server, &a, &b, &late, "hash");
}

store_test!(#[test] fn tampered_entity_data_with_a_matching_local_digest_is_detected_and_healed);
fn tampered_entity_data_with_a_matching_local_digest_is_detected_and_healed(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let (a, b, late) = two_synced_devices(&server, dir.path());

    // Corrupt t1's data consistently inside A's database: its state, its entity
    // hash and the digest all agree with each other, only not with the server.
    let conn = a.sqlite();
    let (state, old_hash): (String, Vec<u8>) = conn
        .query_row("SELECT state, entity_hash FROM entities WHERE collection = 'tasks' AND entity_id = 't1'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let mut state: Value = serde_json::from_str(&state).unwrap();
    state["data"]["title"] = json!("tampered");
    let data: Map<String, Value> = state["data"].as_object().unwrap().clone();
    let new_hash = entity_hash("tasks", "t1", &data);
    let mut digest: StateDigest = a.meta("state_digest").unwrap().parse().unwrap();
    digest.sub(&old_hash.try_into().unwrap());
    digest.add(&new_hash);
    conn.execute(
        "UPDATE entities SET state = ?1, entity_hash = ?2 WHERE collection = 'tasks' AND entity_id = 't1'",
        rusqlite::params![state.to_string(), new_hash.to_vec()],
    )
    .unwrap();
    conn.execute("UPDATE meta SET value = ?1 WHERE key = 'state_digest'", [digest.to_hex()]).unwrap();
    drop(conn);
    assert_eq!(a.get("tasks", "t1"), Some(json!({"v": 1, "title": "tampered"})));

    heal_and_check(&server, &a, &b, &late, "digest");
    assert_eq!(a.get("tasks", "t1"), Some(json!({"v": 1, "title": "one"})), "the tampered data survived the heal");
}

store_test!(#[test] fn a_tampered_digest_alone_is_detected_and_healed);
fn a_tampered_digest_alone_is_detected_and_healed(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let (a, b, late) = two_synced_devices(&server, dir.path());
    a.sqlite().execute("UPDATE meta SET value = ?1 WHERE key = 'state_digest'", [&"ab".repeat(32)]).unwrap();
    heal_and_check(&server, &a, &b, &late, "digest");
}

store_test!(#[test] fn a_change_stamped_by_a_clock_far_ahead_is_restamped_and_delivered);
fn a_change_stamped_by_a_clock_far_ahead_is_restamped_and_delivered(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let b = Device::new(dir.path(), "b");
    a.put("tasks", "t0", json!({"n": 0}));
    a.sync(&server.url);

    // A's stored clock runs an hour ahead (past the server's 5-minute drift limit).
    let device = a.device_id();
    let ahead = now_ms() + 3_600_000;
    a.sqlite().execute("UPDATE meta SET value = ?1 WHERE key = 'clock'", [common::hlc(ahead, 7, &device)]).unwrap();
    let id = a.patch("tasks", "t1", json!({"title": "from the future"}));
    let exported = a.export_pending();
    assert_eq!(exported[0]["hlc"], json!(common::hlc(ahead, 8, &device)), "{exported:?}");

    let r = a.sync(&server.url);
    assert_eq!(r["restamped"], 1, "{r}");
    assert_eq!(r["applied"], 1, "{r}");
    assert_eq!((r["failed"].clone(), r["conflicts"].clone(), r["pending"].clone()), (json!(0), json!(0), json!(0)));
    let log = server_log(&server.url, None);
    let logged: Vec<&Value> = log.iter().filter(|c| c["change_id"] == id).collect();
    assert_eq!(logged.len(), 1, "{log:?}");
    let physical: u64 = logged[0]["hlc"].as_str().unwrap()[..13].parse().unwrap();
    assert!(physical < now_ms() + 60_000, "the change kept a clock far ahead: {}", logged[0]);
    assert_eq!(logged[0]["data"], json!({"title": "from the future"}));

    // The clock stays corrected for the next write.
    a.patch("tasks", "t1", json!({"title": "now"}));
    let hlc = a.export_pending()[0]["hlc"].as_str().unwrap().to_owned();
    let physical: u64 = hlc[..13].parse().unwrap();
    assert!(physical < now_ms() + 60_000, "the next write is still stamped ahead: {hlc}");
    let r = a.sync(&server.url);
    assert_eq!((r["applied"].clone(), r["restamped"].clone()), (json!(1), json!(0)), "{r}");
    b.sync(&server.url);
    assert_eq!(b.get("tasks", "t1"), Some(json!({"title": "now"})));
    assert_converged(&[&a, &b], &server.url, None, &[("tasks", None)]);
}

store_test!(#[test] fn a_server_that_lost_its_data_makes_the_client_rebootstrap_and_resend_pending_changes);
fn a_server_that_lost_its_data_makes_the_client_rebootstrap_and_resend_pending_changes(backend: &Backend) {
    let mut old = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    a.put("tasks", "t1", json!({"v": 1}));
    a.put("tasks", "t2", json!({"v": 2}));
    a.sync(&old.url);
    old.kill();

    // A new, empty server: A's cursor (2) is above its head (0).
    let server = Server::start(backend);
    a.patch("tasks", "t3", json!({"v": 3}));
    let r = a.sync(&server.url);
    assert_eq!(r["healed"], true, "{r}");
    assert_eq!(r["verified"], true, "a 410 is not a mismatch: {r}");
    // The pending change, and the two the lost server had acknowledged, given back from A's journal.
    assert_eq!((r["applied"].clone(), r["restored"].clone()), (json!(3), json!(2)), "{r}");
    assert_eq!(r["pending"], 0, "{r}");
    assert_eq!(r["cursor"], 3, "{r}");
    let listing = json!([
        {"id": "t1", "data": {"v": 1}},
        {"id": "t2", "data": {"v": 2}},
        {"id": "t3", "data": {"v": 3}},
    ]);
    assert_eq!(a.list("tasks"), listing);
    let b = Device::new(dir.path(), "b");
    b.sync(&server.url);
    assert_converged(&[&a, &b], &server.url, None, &[("tasks", Some(listing))]);
    let r = a.sync(&server.url);
    assert_eq!((r["healed"].clone(), r["verified"].clone()), (json!(false), json!(true)), "{r}");
}

store_test!(#[test] fn concurrent_sync_processes_on_one_database_deliver_each_change_once);
fn concurrent_sync_processes_on_one_database_deliver_each_change_once(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let b = Device::new(dir.path(), "b");
    let mut written = Vec::new();
    for round in 0..3 {
        for i in 0..12 {
            let entity = format!("e{}", (i * 7 + round) % 9);
            let id = match i % 4 {
                3 => json!(a.delete("tasks", &entity)),
                _ => a.patch("tasks", &entity, json!({format!("f{}", i % 3): format!("r{round}-{i}")})),
            };
            if id.is_string() {
                written.push(id.as_str().unwrap().to_owned());
            }
        }
        b.patch("tasks", &format!("e{round}"), json!({"b": round}));
        b.sync(&server.url);
        let procs: Vec<_> = (0..3)
            .map(|_| {
                a.command(Some(&server.url), &["sync"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
            })
            .collect();
        let mut duplicates = 0;
        for p in procs {
            let out = p.wait_with_output().unwrap();
            assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
            let r: Value = serde_json::from_slice(&out.stdout).unwrap();
            check_report(&r);
            assert_eq!(r["verified"], true, "round {round}: {r}");
            assert_eq!(r["failed"], 0, "round {round}: {r}");
            duplicates += r["duplicate"].as_u64().unwrap();
        }
        println!("round {round}: {duplicates} changes were pushed twice and answered duplicate");
        let r = a.sync(&server.url);
        assert_eq!((r["pushed"].clone(), r["pending"].clone()), (json!(0), json!(0)), "round {round}: {r}");
        assert_eq!(r["verified"], true, "round {round}: {r}");
        b.sync(&server.url);
        assert_converged(&[&a, &b], &server.url, None, &[("tasks", None)]);
    }
    let counts = log_counts(&server.url);
    for id in &written {
        assert_eq!(counts.get(id), Some(&1), "change {id} is logged {:?} times", counts.get(id));
    }
}

store_test!(#[test] fn a_lost_answer_under_the_reject_policy_does_not_make_the_next_edit_fail);
/// Under `reject`, an edit made on top of a change whose answer was lost is
/// sent, after the retry is answered duplicate, on the version that change made.
fn a_lost_answer_under_the_reject_policy_does_not_make_the_next_edit_fail(backend: &Backend) {
    let server = Server::start_with(
        backend,
        common::Options { config: Some("[collections.docs]\npolicy = \"reject\"\n".into()), ..Default::default() },
    );
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let b = Device::new(dir.path(), "b");
    a.put("docs", "d1", json!({"title": "v1", "body": "x"}));
    a.sync(&server.url);

    let first = a.patch("docs", "d1", json!({"title": "v2"}));
    let proxy = AnswerDroppingProxy::start(&server.url);
    assert_eq!(a.sync_fails(&proxy.url)["error"], "unreachable");
    drop(proxy);
    assert_eq!(log_counts(&server.url).get(first.as_str().unwrap()), Some(&1));
    let second = a.patch("docs", "d1", json!({"body": "y"}));
    assert_eq!(a.get("docs", "d1"), Some(json!({"title": "v2", "body": "y"})));

    let r = a.sync(&server.url);
    assert_eq!((r["duplicate"].clone(), r["applied"].clone()), (json!(1), json!(1)), "{r}");
    assert_eq!((r["failed"].clone(), r["conflicts"].clone(), r["pending"].clone()), (json!(0), json!(0), json!(0)));
    assert_eq!(a.status()["failed"], 0);
    let counts = log_counts(&server.url);
    assert_eq!((counts.get(first.as_str().unwrap()), counts.get(second.as_str().unwrap())), (Some(&1), Some(&1)));
    b.sync(&server.url);
    let docs = json!([{"id": "d1", "data": {"title": "v2", "body": "y"}}]);
    assert_converged(&[&a, &b], &server.url, None, &[("docs", Some(docs))]);
}

store_test!(#[test] fn an_edit_made_after_pulling_a_value_wins_over_it_even_when_its_writer_clock_ran_ahead);
/// HLCs exist to capture causality: a device that has pulled a value and then
/// overwrites it must stamp its write above the value's HLC, even when the
/// first writer's clock ran ahead (by less than the server's drift limit, so
/// the server accepted its change).
fn an_edit_made_after_pulling_a_value_wins_over_it_even_when_its_writer_clock_ran_ahead(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let b = Device::new(dir.path(), "b");
    a.put("tasks", "t1", json!({"v": "0"}));
    a.sync(&server.url);

    // A's clock runs two minutes ahead: within max_clock_drift_ms (5 minutes).
    let device = a.device_id();
    let ahead = now_ms() + 120_000;
    a.sqlite().execute("UPDATE meta SET value = ?1 WHERE key = 'clock'", [common::hlc(ahead, 0, &device)]).unwrap();
    a.patch("tasks", "t1", json!({"v": "a"}));
    let r = a.sync(&server.url);
    assert_eq!((r["applied"].clone(), r["restamped"].clone()), (json!(1), json!(0)), "{r}");

    // B sees A's value, then replaces it.
    b.sync(&server.url);
    assert_eq!(b.get("tasks", "t1"), Some(json!({"v": "a"})));
    b.patch("tasks", "t1", json!({"v": "b"}));
    let stamped = b.export_pending()[0]["hlc"].as_str().unwrap().to_owned();
    let r = b.sync(&server.url);
    a.sync(&server.url);
    assert_eq!(
        b.get("tasks", "t1"),
        Some(json!({"v": "b"})),
        "B's edit, made after it read A's value, lost to it: B stamped {stamped}, below A's clock set to {}; report {r}",
        common::hlc(ahead, 0, &device)
    );
    assert_eq!(r["conflicts"], 0, "{r}");
}
