//! Compaction end to end, on both stores: `deltasync compact` beside a running
//! server, and the background pass of `deltasync serve`. After a pass the
//! contract holds: the horizon is the highest dropped seq, a cursor below it
//! is answered `410 reset_required`, pages from it verify, bootstrap and the
//! digest are unchanged, appends stay, and a compacted change pushed again is
//! still a duplicate with its seq. A device that returns after it expired
//! heals by bootstrap and keeps (and pushes) what it wrote meanwhile. A
//! database of schema version 1 migrates with every logged change a duplicate.

mod common;

use std::time::{Duration, Instant};

use common::devices::{Device, assert_converged, server_status};
use common::*;
use deltasync_protocol::{StateHash, StoredChange};
use serde_json::{Value, json};

/// A base time one minute in the past, so `t + k` stamps are never ahead of the server.
fn base() -> u64 {
    now_ms() - 60_000
}

fn append(change_id: &str, collection: &str, entity_id: &str, data: Value, hlc: &str) -> Value {
    json!({"change_id": change_id, "collection": collection, "entity_id": entity_id, "op": "append", "data": data, "hlc": hlc})
}

/// Runs `deltasync compact` on `database` with `config` and returns its JSON report.
fn compact(database: &str, config: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("compact.toml");
    std::fs::write(&path, config).unwrap();
    let (status, stdout, stderr) = run_cli(&["compact", "--database", database, "--config", path.to_str().unwrap()]);
    assert!(status.success(), "deltasync compact failed: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("compact printed non-JSON ({e}): {stdout}"))
}

async fn status(c: &reqwest::Client, url: &str) -> Value {
    let (s, body) = get(c, url, "/v1/status").await;
    assert_eq!(s, 200, "status: {body}");
    body
}

/// The bootstrap lines, less the header's `server_time` (the time of the answer).
async fn snapshot(c: &reqwest::Client, url: &str) -> Vec<Value> {
    let mut lines = bootstrap_lines(c, url, "fresh").await;
    lines[0].as_object_mut().unwrap().remove("server_time");
    lines
}

async fn pull(c: &reqwest::Client, url: &str, device: &str, cursor: u64, limit: u64) -> (u16, Value) {
    get(c, url, &format!("/v1/pull?device_id={device}&cursor={cursor}&limit={limit}")).await
}

/// Pushes eight changes from `w` (an append at seq 3), lets `w` pull to the
/// head and `r` to seq 6; returns the state hash at seq 6.
async fn eight_changes_w_at_head_r_at_six(c: &reqwest::Client, url: &str) -> String {
    let t = base();
    let changes = vec![
        upsert("c1", "tasks", "t1", json!({"title": "one"}), &hlc(t + 1, 0, "w")),
        upsert("c2", "tasks", "t2", json!({"title": "two"}), &hlc(t + 2, 0, "w")),
        append("c3", "tasks", "t1", json!({"log": "appended"}), &hlc(t + 3, 0, "w")),
        upsert("c4", "tasks", "t1", json!({"title": "one again"}), &hlc(t + 4, 0, "w")),
        delete("c5", "tasks", "t2", &hlc(t + 5, 0, "w")),
        upsert("c6", "notes", "n1", json!({"text": "six"}), &hlc(t + 6, 0, "w")),
        upsert("c7", "notes", "n2", json!({"text": "seven"}), &hlc(t + 7, 0, "w")),
        upsert("c8", "notes", "n1", json!({"text": "eight"}), &hlc(t + 8, 0, "w")),
    ];
    let answer = push(c, url, "w", changes).await;
    assert_eq!(answer["results"].as_array().unwrap().len(), 8, "{answer}");
    let (s, page) = pull(c, url, "w", 0, 1000).await;
    assert_eq!((s, page["cursor"].as_u64()), (200, Some(8)), "{page}");
    let (s, page) = pull(c, url, "r", 0, 6).await;
    assert_eq!((s, page["cursor"].as_u64()), (200, Some(6)), "{page}");
    page["state_hash"].as_str().unwrap().to_owned()
}

const KEEP_ACTIVE: &str = "[server]\ncompact_after = \"0s\"\ndevice_expiry = \"90d\"\n";

store_test!(#[tokio::test] async fn a_pass_drops_what_every_device_has_and_keeps_the_contract);
async fn a_pass_drops_what_every_device_has_and_keeps_the_contract(backend: &Backend) {
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.as_str());
    let hash_at_six = eight_changes_w_at_head_r_at_six(&c, url).await;
    let before = status(&c, url).await;
    assert_eq!(before["horizon"], 0);
    let lines_before = snapshot(&c, url).await;

    // `fresh` bootstrapped to the head; `r`, at 6, is the lowest active cursor.
    let report = compact(&server.database, KEEP_ACTIVE);
    assert_eq!(
        (&report["datasets"], &report["compacted"], &report["dropped"], &report["horizon"]),
        (&json!(1), &json!(1), &json!(5), &json!(6)),
        "seqs 1..6 go but the append at 3: {report}"
    );

    let after = status(&c, url).await;
    assert_eq!(after["horizon"], 6, "{after}");
    for key in ["head", "state_hash", "state_digest"] {
        assert_eq!(after[key], before[key], "{key}");
    }
    assert_eq!(snapshot(&c, url).await, lines_before, "bootstrap changed");
    assert!(
        lines_before.iter().any(|l| l.to_string().contains("appended")),
        "the append is served by bootstrap: {lines_before:?}"
    );

    // Below the horizon: reset, for pull and for sync (with or without changes).
    for cursor in [0, 5] {
        let (s, body) = pull(&c, url, "r", cursor, 100).await;
        assert_eq!((s, body["error"].as_str()), (410, Some("reset_required")), "pull at {cursor}: {body}");
    }
    let (s, body) = post(&c, url, "/v1/sync", &json!({"device_id": "r", "cursor": 5})).await;
    assert_eq!((s, body["error"].as_str()), (410, Some("reset_required")), "{body}");

    // From the horizon: the page verifies from the hash at 6 (pulled by `v`, so `r` stays at 6).
    let (s, page) = pull(&c, url, "v", 6, 100).await;
    assert_eq!(s, 200, "{page}");
    let served = page["changes"].as_array().unwrap();
    assert_eq!(served.iter().map(|ch| ch["seq"].as_u64().unwrap()).collect::<Vec<_>>(), [7, 8]);
    let mut chain = StateHash::from_hex(&hash_at_six).unwrap();
    for ch in served {
        chain = chain.fold(&serde_json::from_value::<StoredChange>(ch.clone()).unwrap());
    }
    assert_eq!(chain.to_hex(), page["state_hash"].as_str().unwrap());
    assert_eq!(page["state_hash"], before["state_hash"]);

    // Idempotency outlives history: compacted changes are still duplicates, with their seqs.
    let t = base();
    let again = push(
        &c,
        url,
        "w",
        vec![
            upsert("c1", "tasks", "t1", json!({"title": "changed"}), &hlc(t + 1, 0, "w")),
            append("c3", "tasks", "t1", json!({"log": "appended"}), &hlc(t + 3, 0, "w")),
            upsert("c7", "notes", "n2", json!({"text": "seven"}), &hlc(t + 7, 0, "w")),
        ],
    )
    .await;
    let results: Vec<(String, u64)> = again["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["status"].as_str().unwrap().to_owned(), r["seq"].as_u64().unwrap()))
        .collect();
    assert_eq!(results, [("duplicate".to_owned(), 1), ("duplicate".to_owned(), 3), ("duplicate".to_owned(), 7)]);
    assert_eq!(status(&c, url).await["head"], 8, "duplicates changed nothing");

    // Nothing more to drop until `r` moves.
    let again = compact(&server.database, KEEP_ACTIVE);
    assert_eq!((&again["compacted"], &again["dropped"]), (&json!(0), &json!(0)), "{again}");

    // A sync from the horizon answers a compacted change as a duplicate too, and moves `r` to the head.
    let body = json!({"device_id": "r", "cursor": 6, "changes": [upsert("c2", "tasks", "t2", json!({}), &hlc(t + 2, 0, "w"))]});
    let (s, answer) = post(&c, url, "/v1/sync", &body).await;
    assert_eq!(s, 200, "{answer}");
    assert_eq!((&answer["results"][0]["status"], &answer["results"][0]["seq"]), (&json!("duplicate"), &json!(2)));
    assert_eq!(answer["cursor"], 8, "{answer}");

    // Then the rest goes, but never the append.
    let last = compact(&server.database, KEEP_ACTIVE);
    assert_eq!((&last["dropped"], &last["horizon"]), (&json!(2), &json!(8)), "{last}");
    let empty = status(&c, url).await;
    assert_eq!((&empty["head"], &empty["horizon"]), (&json!(8), &json!(8)));
    let (s, page) = pull(&c, url, "r", 8, 100).await;
    assert_eq!((s, &page["state_hash"], &page["changes"]), (200, &before["state_hash"], &json!([])), "{page}");
    assert_eq!(snapshot(&c, url).await, lines_before, "bootstrap changed");
}

store_test!(#[tokio::test] async fn young_changes_and_active_devices_hold_compaction_back);
async fn young_changes_and_active_devices_hold_compaction_back(backend: &Backend) {
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.as_str());
    eight_changes_w_at_head_r_at_six(&c, url).await;
    // Nothing is a day old yet.
    let young = compact(&server.database, "[server]\ncompact_after = \"1d\"\ndevice_expiry = \"0s\"\n");
    assert_eq!((&young["datasets"], &young["dropped"], &young["horizon"]), (&json!(1), &json!(0), &json!(0)));
    // The defaults (30d, 90d) keep everything as well.
    let (s, stdout, stderr) = run_cli(&["compact", "--database", &server.database]);
    assert!(s.success(), "{stderr}");
    assert!(stdout.contains("\"dropped\":0"), "{stdout}");
    // Once `r` (at 6) has expired, nothing holds the log back: all but the append goes.
    std::thread::sleep(Duration::from_millis(5));
    let expired = compact(&server.database, "[server]\ncompact_after = \"0s\"\ndevice_expiry = \"0s\"\n");
    assert_eq!((&expired["dropped"], &expired["horizon"]), (&json!(7), &json!(8)), "{expired}");
    let (s, body) = pull(&c, url, "r", 6, 100).await;
    assert_eq!((s, body["error"].as_str()), (410, Some("reset_required")), "{body}");
}

#[test]
fn compact_explains_itself_and_refuses_bad_durations() {
    let (s, stdout, _) = run_cli(&["compact", "--help"]);
    assert!(s.success());
    for word in ["--database", "--config", "compact_after", "device_expiry", "duplicates", "\"dropped\""] {
        assert!(stdout.contains(word), "--help does not mention {word}: {stdout}");
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[server]\ncompact_after = \"30 days\"\n").unwrap();
    let db = format!("sqlite://{}", dir.path().join("x.db").display());
    let (s, _, stderr) = run_cli(&["compact", "--database", &db, "--config", config.to_str().unwrap()]);
    assert!(!s.success());
    assert!(stderr.contains("compact_after") && stderr.contains("30s, 15m, 24h, 7d"), "{stderr}");
}

/// Polls the server's status until `done` holds (at most 30 s).
fn wait_for_status(url: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let st = server_status(url, None);
        if done(&st) {
            return st;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "waited 30 s for {what}: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

store_test!(#[test] fn a_device_back_after_expiry_heals_by_bootstrap_and_keeps_its_writes);
fn a_device_back_after_expiry_heals_by_bootstrap_and_keeps_its_writes(backend: &Backend) {
    let config = "[server]\ncompact_after = \"0s\"\ndevice_expiry = \"0s\"\ncompact_interval = \"1s\"\n";
    let server =
        Server::start_with(backend, Options { config: Some(config.into()), capture_log: true, ..Options::default() });
    let url = server.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let b = Device::new(dir.path(), "b");
    a.put("tasks", "t1", json!({"title": "base", "done": false}));
    a.put("tasks", "t2", json!({"title": "two"}));
    assert_eq!(a.sync(url)["verified"], true);
    assert_eq!(b.sync(url)["verified"], true);

    // `a` goes quiet and writes offline; `b` goes on.
    a.patch("tasks", "t1", json!({"done": true}));
    a.put("tasks", "t3", json!({"title": "written while away"}));
    b.patch("tasks", "t1", json!({"title": "from b"}));
    b.put("tasks", "t4", json!({"title": "four"}));
    let r = b.sync(url);
    assert_eq!(r["applied"], 2, "{r}");
    let head = r["cursor"].as_u64().unwrap();

    // The background pass drops everything: `a` expired at once.
    wait_for_status(url, "the background pass to reach the head", |st| st["horizon"].as_u64() == Some(head));
    assert!(server.log().contains("compaction pass dropped history"), "{}", server.log());

    // `a` comes back below the horizon: reset, bootstrap, and its writes go out.
    let mut r = a.sync(url);
    assert_eq!(r["healed"], true, "{r}");
    if r["pending"] != 0 {
        r = a.sync(url);
    }
    assert_eq!(r["pending"], 0, "{r}");
    let t1 = a.get("tasks", "t1").unwrap();
    assert_eq!(t1, json!({"title": "from b", "done": true}), "both edits of t1 stand");
    assert_eq!(a.get("tasks", "t3").unwrap(), json!({"title": "written while away"}));
    // `b` may be behind the next horizon by now; it heals the same way if so.
    b.sync(url);
    a.sync(url);
    assert_converged(&[&a, &b], url, None, &[("tasks", None)]);
}

/// `(page_count, freelist_count)` of a SQLite file, WAL included.
fn pages(path: &std::path::Path) -> (i64, i64) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let count = conn.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
    let free = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0)).unwrap();
    (count, free)
}

#[tokio::test]
async fn sqlite_gives_the_freed_pages_back_to_the_file_system() {
    let server = Server::start(&Backend::Sqlite);
    let (c, url) = (client(), server.url.as_str());
    let file = server.sqlite_file().unwrap();
    let t = base();
    let text = "x".repeat(2000);
    for batch in 0..20 {
        let changes = (0..100)
            .map(|i| {
                let n = batch * 100 + i;
                upsert(
                    &format!("c{n}"),
                    "notes",
                    &format!("n{}", n % 10),
                    json!({"text": text, "n": n}),
                    &hlc(t + n, 0, "w"),
                )
            })
            .collect();
        push(&c, url, "w", changes).await;
    }
    let (full, _) = pages(&file);
    let report = compact(&server.database, "[server]\ncompact_after = \"0s\"\ndevice_expiry = \"0s\"\n");
    assert_eq!(report["dropped"], 2000, "{report}");
    let (after, free) = pages(&file);
    assert!(after * 4 < full, "the file kept its pages: {full} before, {after} after");
    assert!(free < 1024, "{free} free pages left after the pass");
    assert_eq!(status(&c, url).await["horizon"], 2000);
}

/// Turns a database at the current schema back into version 1 (no users, no pending
/// tables, no receipts, no `dropped_to`, the unique index on change ids),
/// keeping its log. Entity states still pending are lost with their table:
/// this test looks at receipts only.
fn downgrade_to_version_1(server: &Server) {
    let sql = "DROP TABLE users; DROP TABLE pending_entities; DROP TABLE pending_receipts;
               DROP TABLE receipts; ALTER TABLE datasets DROP COLUMN dropped_to;
               CREATE UNIQUE INDEX changes_by_change_id ON changes (user_id, change_id);
               UPDATE schema_version SET version = 1;";
    match server.sqlite_file() {
        Some(path) => rusqlite::Connection::open(path).unwrap().execute_batch(sql).unwrap(),
        None => pg_execute(&server.database, sql.to_owned()).unwrap(),
    }
}

store_test!(#[tokio::test] async fn migration_2_keeps_every_logged_change_a_duplicate);
async fn migration_2_keeps_every_logged_change_a_duplicate(backend: &Backend) {
    let mut server = Server::start(backend);
    let t = base();
    let changes = vec![
        upsert("c1", "tasks", "t1", json!({"title": "one"}), &hlc(t + 1, 0, "w")),
        upsert("c2", "tasks", "t2", json!({"title": "two"}), &hlc(t + 2, 0, "w")),
    ];
    push(&client(), &server.url, "w", changes.clone()).await;
    server.kill();
    downgrade_to_version_1(&server);
    let (s, out, err) = run_cli(&["migrate", "--database", &server.database]);
    assert!(s.success(), "{err}");
    assert!(out.contains("from version 1 to 4"), "{out}");
    server.restart();
    let (c, url) = (client(), server.url.as_str());
    let again = push(&c, url, "w", changes).await;
    let seqs: Vec<(&str, u64)> = again["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["status"].as_str().unwrap(), r["seq"].as_u64().unwrap()))
        .collect();
    assert_eq!(seqs, [("duplicate", 1), ("duplicate", 2)]);
    // The receipts now answer for compacted changes too.
    let (s, _) = pull(&c, url, "w", 0, 100).await;
    assert_eq!(s, 200);
    let report = compact(&server.database, KEEP_ACTIVE);
    assert_eq!((&report["dropped"], &report["horizon"]), (&json!(2), &json!(2)), "{report}");
    let third = push(&c, url, "w", vec![upsert("c2", "tasks", "t2", json!({}), &hlc(t + 2, 0, "w"))]).await;
    assert_eq!((&third["results"][0]["status"], &third["results"][0]["seq"]), (&json!("duplicate"), &json!(2)));
}

store_test!(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn pushes_and_pulls_go_on_while_a_pass_drops_thousands_of_rows);
async fn pushes_and_pulls_go_on_while_a_pass_drops_thousands_of_rows(backend: &Backend) {
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.clone());
    let t = base();
    // Chain heads by cursor, from every push answer.
    let mut hashes = std::collections::HashMap::new();
    let batch = |n: u64| -> Vec<Value> {
        (0..200)
            .map(|i| {
                let k = n * 200 + i;
                upsert(&format!("c{k}"), "notes", &format!("n{}", k % 50), json!({"k": k}), &hlc(t + k, 0, "w"))
            })
            .collect()
    };
    for n in 0..30 {
        let a = push(&c, &url, "w", batch(n)).await;
        hashes.insert(a["cursor"].as_u64().unwrap(), a["state_hash"].as_str().unwrap().to_owned());
    }
    // `w` (the only device: it pushes and pulls) stands at 6000, so however its
    // requests during the pass fall against the pass's clock, the horizon reaches 6000.
    for cursor in (0..6000).step_by(10_000 / 2) {
        let (s, _) = pull(&c, &url, "w", cursor, 5000).await;
        assert_eq!(s, 200);
    }
    let database = server.database.clone();
    let pass = tokio::task::spawn_blocking(move || {
        compact(&database, "[server]\ncompact_after = \"0s\"\ndevice_expiry = \"0s\"\n")
    });
    let mut n = 30;
    let mut answers = std::collections::BTreeMap::new();
    while !pass.is_finished() || n < 33 {
        let a = push(&c, &url, "w", batch(n)).await;
        hashes.insert(a["cursor"].as_u64().unwrap(), a["state_hash"].as_str().unwrap().to_owned());
        n += 1;
        for cursor in [0, 3000, 5000] {
            let (s, body) = pull(&c, &url, "w", cursor, 50).await;
            assert!(s == 200 || body["error"] == "reset_required", "pull at {cursor} during a pass: {s} {body}");
            *answers.entry(s).or_insert(0) += 1;
        }
    }
    let report = pass.await.unwrap();
    let horizon = report["horizon"].as_u64().unwrap();
    assert!(horizon >= 6000 && report["dropped"].as_u64() == Some(horizon), "{report}");
    assert_eq!(status(&c, &url).await["horizon"], horizon);
    // From the horizon, the rest of the log is there and verifies.
    let mut chain = StateHash::from_hex(&hashes[&horizon]).unwrap();
    let mut cursor = horizon;
    loop {
        let (s, page) = pull(&c, &url, "v", cursor, 10_000).await;
        assert_eq!(s, 200, "{page}");
        for ch in page["changes"].as_array().unwrap() {
            chain = chain.fold(&serde_json::from_value::<StoredChange>(ch.clone()).unwrap());
        }
        assert_eq!(chain.to_hex(), page["state_hash"].as_str().unwrap(), "at {}", page["cursor"]);
        cursor = page["cursor"].as_u64().unwrap();
        if page["has_more"] == false {
            break;
        }
    }
    assert_eq!(cursor, n * 200, "{answers:?}");
}
