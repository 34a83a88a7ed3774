//! End-to-end checks of every endpoint and rule of protocol §3–§6 over a real socket.

mod common;

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use deltasync_protocol::{StateDigest, StateHash, StoredChange};
use serde_json::{Value, json};

const ZERO64: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn cfg(toml: &str) -> Options {
    Options { config: Some(toml.to_owned()), ..Options::default() }
}

fn is_hex64(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// A base time one minute in the past, so `t + k` stamps are never ahead of the server.
fn base() -> u64 {
    now_ms() - 60_000
}

async fn status(c: &reqwest::Client, url: &str) -> Value {
    let (s, body) = get(c, url, "/v1/status").await;
    assert_eq!(s, 200, "status: {body}");
    body
}

async fn head(c: &reqwest::Client, url: &str) -> u64 {
    status(c, url).await["head"].as_u64().unwrap()
}

fn find_entity(lines: &[Value], collection: &str, id: &str) -> Option<Value> {
    lines
        .iter()
        .filter_map(|l| l.get("entity"))
        .find(|e| e["collection"] == collection && e["entity_id"] == id)
        .cloned()
}

fn entity(lines: &[Value], collection: &str, id: &str) -> Value {
    find_entity(lines, collection, id).unwrap_or_else(|| panic!("no entity line for {collection}/{id}: {lines:?}"))
}

async fn all_conflicts(c: &reqwest::Client, url: &str) -> Vec<Value> {
    let (s, body) = get(c, url, "/v1/conflicts?limit=1000").await;
    assert_eq!(s, 200, "{body}");
    body["conflicts"].as_array().unwrap().clone()
}

fn sorted(v: &Value) -> Vec<String> {
    let mut names: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

fn names(list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| (*s).to_owned()).collect();
    v.sort();
    v
}

/// Sends a request; returns (status, Content-Type, body text).
async fn send(req: reqwest::RequestBuilder) -> (u16, String, String) {
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let ct = r.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    (status, ct, r.text().await.unwrap())
}

/// Asserts a §8 error answer and returns its body.
fn assert_error(answer: (u16, String, String), status: u16, code: &str) -> Value {
    let (s, ct, text) = answer;
    assert_eq!(s, status, "expected {status} {code}, got {s}: {text}");
    assert!(ct.starts_with("application/json"), "error Content-Type is {ct:?}: {text}");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text}"));
    assert_eq!(body["error"], code, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "error without a message: {body}");
    body
}

fn append(change_id: &str, collection: &str, entity_id: &str, data: Value, hlc: &str) -> Value {
    json!({"change_id": change_id, "collection": collection, "entity_id": entity_id, "op": "append", "data": data, "hlc": hlc})
}

fn with_base(mut change: Value, base_version: u64) -> Value {
    change["base_version"] = json!(base_version);
    change
}

// ---------------------------------------------------------------- push basics

store_test!(#[tokio::test] async fn push_results_in_order_gapless_seqs_and_duplicates);
async fn push_results_in_order_gapless_seqs_and_duplicates(backend: &Backend) {
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    let a = push(
        &c,
        url,
        "dev-a",
        vec![
            upsert("c1", "tasks", "t1", json!({"title": "one"}), &hlc(t + 1, 0, "dev-a")),
            upsert("c2", "tasks", "t2", json!({"title": "two"}), &hlc(t + 2, 0, "dev-a")),
            delete("c3", "tasks", "t3", &hlc(t + 3, 0, "dev-a")),
        ],
    )
    .await;
    let results = a["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["change_id"], format!("c{}", i + 1));
        assert_eq!(r["status"], "applied");
        assert_eq!(r["seq"], i as u64 + 1);
        assert!(r.get("conflict").is_none_or(Value::is_null), "{r}");
    }
    assert_eq!(a["cursor"], 3);
    assert!(is_hex64(&a["state_hash"]) && a["state_hash"] != ZERO64, "{a}");
    assert!(is_hex64(&a["state_digest"]) && a["state_digest"] != ZERO64, "{a}");
    assert!(a["server_time"].as_u64().is_some_and(|s| s.abs_diff(now_ms()) < 60_000), "{a}");

    // A retried change_id is a duplicate with its first seq whatever its content; the same id
    // twice in one batch is applied once.
    let b = push(
        &c,
        url,
        "dev-b",
        vec![
            upsert("c4", "tasks", "t4", json!({"title": "four"}), &hlc(t + 4, 0, "dev-b")),
            upsert("c1", "other", "zz", json!({"title": "changed"}), &hlc(t + 5, 0, "dev-b")),
            append("c5", "tasks", "t5", json!([1]), &hlc(t + 6, 0, "dev-b")),
            delete("c5", "tasks", "t1", &hlc(t + 7, 0, "dev-b")),
            upsert("c2", "tasks", "t2", json!({"title": "again"}), &hlc(t + 8, 0, "dev-b")),
        ],
    )
    .await;
    let want = [
        ("c4", "applied", 4),
        ("c1", "duplicate", 1),
        ("c5", "applied", 5),
        ("c5", "duplicate", 5),
        ("c2", "duplicate", 2),
    ];
    let results = b["results"].as_array().unwrap();
    assert_eq!(results.len(), want.len(), "{b}");
    for (r, (id, st, seq)) in results.iter().zip(want) {
        assert_eq!(r["change_id"], id, "{b}");
        assert_eq!(r["status"], st, "{b}");
        assert_eq!(r["seq"], seq, "{b}");
    }
    assert_eq!(b["cursor"], 5);
    let s = status(&c, url).await;
    assert_eq!(s["head"], 5);
    assert_eq!(s["state_hash"], b["state_hash"]);
    assert_eq!(s["state_digest"], b["state_digest"]);

    // The log holds 1..5 without gaps and the duplicates changed nothing.
    let (st, page) = get(&c, url, "/v1/pull?device_id=reader&cursor=0").await;
    assert_eq!(st, 200);
    let seqs: Vec<u64> = page["changes"].as_array().unwrap().iter().map(|c| c["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert_eq!(page["changes"][0]["data"], json!({"title": "one"}));
    assert_eq!(page["changes"][0]["collection"], "tasks");
    assert_eq!(page["changes"][0]["device_id"], "dev-a");
    assert_eq!(page["changes"][3]["device_id"], "dev-b");
    let lines = bootstrap_lines(&c, url, "reader").await;
    assert_eq!(entity(&lines, "tasks", "t1")["data"], json!({"title": "one"}));
    assert_eq!(entity(&lines, "tasks", "t2")["data"], json!({"title": "two"}));
    assert!(find_entity(&lines, "other", "zz").is_none());

    // A push answer's cursor is the head, also for an empty push.
    let e = push(&c, url, "dev-c", vec![]).await;
    assert_eq!(e["results"], json!([]));
    assert_eq!(e["cursor"], 5);
    assert_eq!(e["state_hash"], s["state_hash"]);
}

store_test!(#[tokio::test] async fn concurrent_pushes_get_gapless_seqs_and_one_winner_per_change_id);
async fn concurrent_pushes_get_gapless_seqs_and_one_winner_per_change_id(backend: &Backend) {
    let server = Server::start(backend);
    let url = server.url.clone();
    let t = base();
    let mut tasks = Vec::new();
    for d in 0..16u64 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut got = Vec::new();
            for i in 0..8u64 {
                let dev = format!("dev{d}");
                let changes = vec![
                    upsert(&format!("{dev}-{i}"), "tasks", &format!("e{i}"), json!({"d": d}), &hlc(t + i, 0, &dev)),
                    // Every device also sends the same shared change ids.
                    upsert(&format!("shared-{i}"), "tasks", "s", json!({"d": d}), &hlc(t + i, 1, &dev)),
                ];
                let a = push(&c, &url, &dev, changes).await;
                for r in a["results"].as_array().unwrap() {
                    got.push((
                        r["change_id"].as_str().unwrap().to_owned(),
                        r["status"].as_str().unwrap().to_owned(),
                        r["seq"].as_u64().unwrap(),
                    ));
                }
            }
            got
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.extend(task.await.unwrap());
    }
    let c = client();
    let (_, page) = get(&c, &url, "/v1/pull?device_id=r&limit=10000").await;
    let log = page["changes"].as_array().unwrap();
    assert_eq!(log.len(), 16 * 8 + 8, "each shared id is applied once");
    for (i, ch) in log.iter().enumerate() {
        assert_eq!(ch["seq"], i as u64 + 1, "gap in the log");
    }
    for (id, status, seq) in &results {
        let logged = &log[*seq as usize - 1];
        assert_eq!(logged["change_id"], id.as_str(), "result seq {seq} of {id} ({status}) is another change");
    }
    for i in 0..8 {
        let id = format!("shared-{i}");
        let applied = results.iter().filter(|(c, s, _)| *c == id && s == "applied").count();
        assert_eq!(applied, 1, "{id} applied {applied} times");
    }
}

store_test!(#[tokio::test] async fn stored_changes_carry_every_member_and_the_hashes_chain);
async fn stored_changes_carry_every_member_and_the_hashes_chain(backend: &Backend) {
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    let mut hashes = vec![(ZERO64.to_owned(), ZERO64.to_owned())];
    let changes = [
        upsert("h1", "tasks", "t1", json!({"a": 1, "b": [1, 2.5, "x"], "c": null}), &hlc(t + 1, 0, "d1")),
        with_base(upsert("h2", "tasks", "t1", json!({"a": 2}), &hlc(t + 2, 0, "d1")), 1),
        append("h3", "tasks", "t1", json!({"op": "inc", "n": 1}), &hlc(t + 3, 0, "d1")),
        delete("h4", "tasks", "t2", &hlc(t + 4, 0, "d1")),
        upsert("h5", "notes", "ünïcødé id", json!({"é": "✓"}), &hlc(t + 5, 7, "d1")),
    ];
    for ch in &changes {
        let a = push(&c, url, "d1", vec![ch.clone()]).await;
        hashes.push((a["state_hash"].as_str().unwrap().to_owned(), a["state_digest"].as_str().unwrap().to_owned()));
    }
    let (_, page) = get(&c, url, "/v1/pull?device_id=d2&cursor=0").await;
    let served = page["changes"].as_array().unwrap();
    assert_eq!(served.len(), changes.len());
    let mut chain = StateHash::ZERO;
    for (i, (sent, got)) in changes.iter().zip(served).enumerate() {
        assert_eq!(got["seq"], i as u64 + 1);
        assert_eq!(got["device_id"], "d1");
        assert!(got["server_time"].as_u64().is_some_and(|s| s.abs_diff(now_ms()) < 60_000), "{got}");
        for member in ["change_id", "collection", "entity_id", "op", "hlc"] {
            assert_eq!(got[member], sent[member], "{member} of {got}");
        }
        assert_eq!(got.get("data").cloned().unwrap_or(Value::Null), sent.get("data").cloned().unwrap_or(Value::Null));
        assert_eq!(got.get("base_version"), sent.get("base_version"), "{got}");
        let stored: StoredChange = serde_json::from_value(got.clone()).unwrap();
        chain = chain.fold(&stored);
        assert_eq!(chain.to_hex(), hashes[i + 1].0, "state_hash after seq {}", i + 1);
    }
    // Pages answer the hashes at the cursor they return.
    for cursor in 0..changes.len() {
        let (_, p) = get(&c, url, &format!("/v1/pull?device_id=d2&cursor={cursor}&limit=1")).await;
        assert_eq!(p["cursor"], cursor as u64 + 1);
        assert_eq!(p["state_hash"], hashes[cursor + 1].0, "pull at {cursor}");
        assert_eq!(p["state_digest"], hashes[cursor + 1].1, "pull at {cursor}");
    }
    let (_, p) = get(&c, url, "/v1/pull?device_id=d2&cursor=2").await;
    assert_eq!(p["state_hash"], hashes[5].0);
    // The digest is the sum of the live entities' hashes.
    let lines = bootstrap_lines(&c, url, "d2").await;
    let mut digest = StateDigest::ZERO;
    for e in lines.iter().filter_map(|l| l.get("entity")) {
        if e["deleted"] == false {
            let h = deltasync_protocol::digest::entity_hash(
                e["collection"].as_str().unwrap(),
                e["entity_id"].as_str().unwrap(),
                e["data"].as_object().unwrap(),
            );
            digest.add(&h);
        }
    }
    assert_eq!(digest.to_hex(), hashes[5].1);
    assert_eq!(lines[0]["state_digest"], hashes[5].1);
    assert_eq!(lines[0]["state_hash"], hashes[5].0);
}

store_test!(#[tokio::test] async fn a_refused_change_id_is_not_reserved);
async fn a_refused_change_id_is_not_reserved(backend: &Backend) {
    let server = Server::start_with(backend, cfg("[collections.docs]\npolicy = \"reject\"\n"));
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    let a = push(&c, url, "d", vec![with_base(upsert("r1", "docs", "d1", json!({"v": 1}), &hlc(t, 0, "d")), 0)]).await;
    assert_eq!(a["results"][0]["seq"], 1);
    let b =
        push(&c, url, "d", vec![with_base(upsert("r2", "docs", "d1", json!({"v": 2}), &hlc(t + 1, 0, "d")), 0)]).await;
    assert_eq!(b["results"][0]["status"], "rejected");
    assert_eq!(b["results"][0]["conflict"]["reason"], "version_mismatch");
    assert!(b["results"][0].get("seq").is_none_or(Value::is_null), "{b}");
    assert_eq!(b["cursor"], 1);
    let again =
        push(&c, url, "d", vec![with_base(upsert("r2", "docs", "d1", json!({"v": 2}), &hlc(t + 1, 0, "d")), 1)]).await;
    assert_eq!(again["results"][0]["status"], "applied", "{again}");
    assert_eq!(again["results"][0]["seq"], 2);
    // Within one batch too: refused, then the same id with the right version applies.
    let batch = push(
        &c,
        url,
        "d",
        vec![
            with_base(upsert("r3", "docs", "d1", json!({"v": 3}), &hlc(t + 2, 0, "d")), 1),
            with_base(upsert("r3", "docs", "d1", json!({"v": 3}), &hlc(t + 2, 0, "d")), 2),
            with_base(upsert("r4", "docs", "d1", json!({"v": 4}), &hlc(t + 3, 0, "d")), 3),
        ],
    )
    .await;
    let st: Vec<&str> = batch["results"].as_array().unwrap().iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(st, ["rejected", "applied", "applied"], "{batch}");
    assert_eq!(batch["results"][1]["seq"], 3);
    assert_eq!(batch["results"][2]["seq"], 4);
    assert_eq!(head(&c, url).await, 4);
}

// ---------------------------------------------------------------- merge policies

store_test!(#[tokio::test] async fn fields_policy_merges_field_by_field);
async fn fields_policy_merges_field_by_field(backend: &Backend) {
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    let h = |k: u64, d: &str| hlc(t + k, 0, d);
    let r = |a: &Value| a["results"][0].clone();

    let r1 = r(&push(&c, url, "A", vec![upsert("f1", "tasks", "e1", json!({"a": 1, "b": 1}), &h(10, "A"))]).await);
    assert_eq!((r1["status"].as_str(), r1["seq"].as_u64()), (Some("applied"), Some(1)));
    assert!(r1.get("conflict").is_none_or(Value::is_null));
    // An older upsert loses only the fields written later.
    let r2 = r(&push(&c, url, "B", vec![upsert("f2", "tasks", "e1", json!({"a": 2, "c": 2}), &h(5, "B"))]).await);
    assert_eq!(r2["status"], "applied");
    assert_eq!(r2["seq"], 2);
    assert_eq!(r2["conflict"]["reason"], "superseded");
    assert_eq!(sorted(&r2["conflict"]["fields"]), names(&["a"]));
    assert_eq!(r2["conflict"]["current"]["data"], json!({"a": 1, "b": 1, "c": 2}));
    assert_eq!(r2["conflict"]["current"]["version"], 2);
    // A delete older than some fields leaves the entity alive: superseded, naming the survivors.
    let r3 = r(&push(&c, url, "B", vec![delete("f3", "tasks", "e1", &h(7, "B"))]).await);
    assert_eq!(r3["status"], "applied");
    assert_eq!(r3["seq"], 3);
    assert_eq!(r3["conflict"]["reason"], "superseded");
    assert_eq!(sorted(&r3["conflict"]["fields"]), names(&["a", "b"]));
    assert_eq!(r3["conflict"]["current"]["data"], json!({"a": 1, "b": 1}));
    assert_eq!(r3["conflict"]["current"]["deleted"], false);
    // An upsert older than the tombstone loses every field: reason deleted.
    let r4 = r(&push(&c, url, "B", vec![upsert("f4", "tasks", "e1", json!({"c": 3}), &h(6, "B"))]).await);
    assert_eq!(r4["status"], "applied");
    assert_eq!(r4["seq"], 4);
    assert_eq!(r4["conflict"]["reason"], "deleted");
    assert_eq!(sorted(&r4["conflict"]["fields"]), names(&["c"]));
    let r5 = r(&push(&c, url, "A", vec![upsert("f5", "tasks", "e1", json!({"b": 5}), &h(12, "A"))]).await);
    assert!(r5.get("conflict").is_none_or(Value::is_null), "{r5}");

    // A delete of a new entity is a tombstone; older upserts lose to it, newer ones revive it.
    let r6 = r(&push(&c, url, "A", vec![delete("f6", "tasks", "e2", &h(20, "A"))]).await);
    assert!(r6.get("conflict").is_none_or(Value::is_null), "{r6}");
    let r7 = r(&push(&c, url, "B", vec![upsert("f7", "tasks", "e2", json!({"x": 1}), &h(15, "B"))]).await);
    assert_eq!(r7["conflict"]["reason"], "deleted");
    assert_eq!(sorted(&r7["conflict"]["fields"]), names(&["x"]));
    assert_eq!(r7["conflict"]["current"]["deleted"], true);
    assert_eq!(r7["conflict"]["current"]["data"], json!({}));
    let r8 = r(&push(&c, url, "B", vec![upsert("f8", "tasks", "e2", json!({"y": 1}), &h(25, "B"))]).await);
    assert!(r8.get("conflict").is_none_or(Value::is_null), "{r8}");

    push(&c, url, "A", vec![delete("f9", "tasks", "e3", &h(30, "A"))]).await;
    push(&c, url, "A", vec![upsert("f10", "tasks", "e4", json!({"n": null, "o": {"p": [1, 2]}}), &h(31, "A"))]).await;
    push(&c, url, "A", vec![upsert("f11", "tasks", "e4", json!({"o": {"q": 1}}), &h(32, "A"))]).await;
    // Equal HLCs: the later arrival loses.
    push(&c, url, "A", vec![upsert("f12", "tasks", "e5", json!({"k": 1}), &h(40, "A"))]).await;
    let r13 = r(&push(&c, url, "A", vec![upsert("f13", "tasks", "e5", json!({"k": 2}), &h(40, "A"))]).await);
    assert_eq!(r13["conflict"]["reason"], "superseded");
    assert_eq!(sorted(&r13["conflict"]["fields"]), names(&["k"]));

    let lines = bootstrap_lines(&c, url, "reader").await;
    let e1 = entity(&lines, "tasks", "e1");
    assert_eq!(e1["data"], json!({"a": 1, "b": 5}));
    assert_eq!(e1["version"], 5);
    assert_eq!(e1["deleted"], false);
    assert_eq!(e1["meta"], json!({"fields": {"a": h(10, "A"), "b": h(12, "A")}, "t": h(7, "B"), "u": h(12, "A")}));
    let e2 = entity(&lines, "tasks", "e2");
    assert_eq!(e2["data"], json!({"y": 1}));
    assert_eq!(e2["version"], 8);
    assert_eq!(e2["deleted"], false);
    assert_eq!(e2["meta"], json!({"fields": {"y": h(25, "B")}, "t": h(20, "A"), "u": h(25, "B")}));
    let e3 = entity(&lines, "tasks", "e3");
    assert_eq!(e3["data"], json!({}));
    assert_eq!(e3["deleted"], true);
    assert_eq!(e3["version"], 9);
    assert_eq!(e3["meta"], json!({"fields": {}, "t": h(30, "A"), "u": null}));
    let e4 = entity(&lines, "tasks", "e4");
    assert_eq!(e4["data"], json!({"n": null, "o": {"q": 1}}));
    assert_eq!(e4["version"], 11);
    assert_eq!(entity(&lines, "tasks", "e5")["data"], json!({"k": 1}));
    assert_eq!(entity(&lines, "tasks", "e5")["version"], 13);

    // Conflicts were recorded for f2, f3, f4, f7, f13.
    let recs = all_conflicts(&c, url).await;
    let got: Vec<String> = recs.iter().map(|r| r["change_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(got, ["f2", "f3", "f4", "f7", "f13"], "{recs:?}");
}

store_test!(#[tokio::test] async fn fields_policy_state_does_not_depend_on_arrival_order);
async fn fields_policy_state_does_not_depend_on_arrival_order(backend: &Backend) {
    let t = base();
    let h = |k: u64, d: &str| hlc(t + k, 0, d);
    let changes = vec![
        upsert("o1", "tasks", "x", json!({"a": 1, "b": 1}), &h(10, "A")),
        upsert("o2", "tasks", "x", json!({"b": 2, "c": 2}), &h(12, "B")),
        delete("o3", "tasks", "x", &h(11, "C")),
        upsert("o4", "tasks", "x", json!({"a": 4}), &h(9, "B")),
        upsert("o5", "tasks", "y", json!({"a": 5}), &h(20, "A")),
        delete("o6", "tasks", "y", &h(21, "B")),
        upsert("o7", "tasks", "y", json!({"b": 7}), &h(19, "C")),
        delete("o8", "tasks", "z", &h(30, "A")),
        upsert("o9", "tasks", "z", json!({"k": {"n": [1]}}), &h(31, "C")),
        upsert("o10", "tasks", "z", json!({"k": null, "m": 1}), &h(29, "B")),
        delete("o11", "tasks", "z", &h(25, "B")),
    ];
    let orders: Vec<Vec<usize>> =
        vec![(0..changes.len()).collect(), (0..changes.len()).rev().collect(), vec![3, 7, 1, 10, 5, 0, 8, 2, 6, 9, 4]];
    let mut states = Vec::new();
    for (n, order) in orders.iter().enumerate() {
        let server = Server::start(backend);
        let c = client();
        for &i in order {
            push(&c, &server.url, "d", vec![changes[i].clone()]).await;
        }
        let lines = bootstrap_lines(&c, &server.url, "d").await;
        let state: Vec<Value> = lines
            .iter()
            .filter_map(|l| l.get("entity"))
            .map(|e| json!([e["collection"], e["entity_id"], e["data"], e["deleted"], e["meta"]]))
            .collect();
        states.push((n, lines[0]["state_digest"].clone(), state));
    }
    for (n, digest, state) in &states[1..] {
        assert_eq!(state, &states[0].2, "order {n} gave another state");
        assert_eq!(digest, &states[0].1, "order {n} gave another digest");
    }
    let x = &states[0].2[0];
    assert_eq!(x[2], json!({"b": 2, "c": 2}), "{x}");
    assert_eq!(states[0].2[1][3], json!(true), "y is deleted");
    assert_eq!(states[0].2[2][2], json!({"k": {"n": [1]}}), "z");
}

store_test!(#[tokio::test] async fn entity_policy_is_whole_entity_lww);
async fn entity_policy_is_whole_entity_lww(backend: &Backend) {
    let server = Server::start_with(backend, cfg("[collections.notes]\npolicy = \"entity\"\n"));
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    let h = |k: u64| hlc(t + k, 0, "d");
    let one = |ch: Value| {
        let (c, url) = (c.clone(), url.to_owned());
        async move { push(&c, &url, "d", vec![ch]).await["results"][0].clone() }
    };
    let r = one(upsert("n1", "notes", "x", json!({"a": 1, "b": 1}), &h(10))).await;
    assert_eq!(r["status"], "applied");
    // Older upsert: superseded whole, even a field nobody else wrote.
    let r = one(upsert("n2", "notes", "x", json!({"a": 2, "z": 2}), &h(5))).await;
    assert_eq!((r["status"].as_str(), r["seq"].as_u64()), (Some("applied"), Some(2)));
    assert_eq!(r["conflict"]["reason"], "superseded");
    assert_eq!(sorted(&r["conflict"]["fields"]), names(&["a", "z"]));
    assert_eq!(r["conflict"]["current"]["data"], json!({"a": 1, "b": 1}));
    assert_eq!(r["conflict"]["current"]["version"], 2);
    // Newer upsert patches.
    let r = one(upsert("n3", "notes", "x", json!({"c": 3}), &h(20))).await;
    assert!(r.get("conflict").is_none_or(Value::is_null), "{r}");
    // Older delete: superseded, naming the surviving fields.
    let r = one(delete("n4", "notes", "x", &h(15))).await;
    assert_eq!(r["conflict"]["reason"], "superseded");
    assert_eq!(sorted(&r["conflict"]["fields"]), names(&["a", "b", "c"]));
    assert_eq!(r["conflict"]["current"]["deleted"], false);
    // Newer delete applies.
    let r = one(delete("n5", "notes", "x", &h(30))).await;
    assert!(r.get("conflict").is_none_or(Value::is_null), "{r}");
    // Older upsert after the delete: deleted.
    let r = one(upsert("n6", "notes", "x", json!({"w": 1}), &h(25))).await;
    assert_eq!(r["conflict"]["reason"], "deleted");
    assert_eq!(sorted(&r["conflict"]["fields"]), names(&["w"]));
    // Newer upsert revives with only its own fields.
    let r = one(upsert("n7", "notes", "x", json!({"y": 1}), &h(40))).await;
    assert!(r.get("conflict").is_none_or(Value::is_null), "{r}");
    // Equal HLCs: the later arrival loses.
    one(upsert("n8", "notes", "y", json!({"k": 1}), &h(50))).await;
    let r = one(upsert("n9", "notes", "y", json!({"k": 2}), &h(50))).await;
    assert_eq!(r["conflict"]["reason"], "superseded");

    let lines = bootstrap_lines(&c, url, "reader").await;
    let x = entity(&lines, "notes", "x");
    assert_eq!(x["data"], json!({"y": 1}));
    assert_eq!(x["version"], 7);
    assert_eq!(x["deleted"], false);
    assert_eq!(x["meta"], json!({"hlc": h(40)}));
    let y = entity(&lines, "notes", "y");
    assert_eq!(y["data"], json!({"k": 1}));
    assert_eq!(y["version"], 9);
    assert_eq!(y["meta"], json!({"hlc": h(50)}));
    let got: Vec<String> =
        all_conflicts(&c, url).await.iter().map(|r| r["change_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(got, ["n2", "n4", "n6", "n9"]);
}

store_test!(#[tokio::test] async fn server_policy_applies_in_arrival_order_without_conflicts);
async fn server_policy_applies_in_arrival_order_without_conflicts(backend: &Backend) {
    let server = Server::start_with(backend, cfg("[collections.log]\npolicy = \"server\"\n"));
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    let h = |k: u64| hlc(t + k, 0, "d");
    let a = push(
        &c,
        url,
        "d",
        vec![
            upsert("s1", "log", "x", json!({"a": 1}), &h(10)),
            upsert("s2", "log", "x", json!({"a": 2, "b": 2}), &h(5)),
            upsert("s3", "log", "y", json!({"a": 1}), &h(10)),
            delete("s4", "log", "y", &h(1)),
            delete("s5", "log", "z", &h(10)),
            upsert("s6", "log", "z", json!({"c": 1}), &h(0)),
        ],
    )
    .await;
    for (i, r) in a["results"].as_array().unwrap().iter().enumerate() {
        assert_eq!(r["status"], "applied", "{r}");
        assert_eq!(r["seq"], i as u64 + 1);
        assert!(r.get("conflict").is_none_or(Value::is_null), "server policy reported a conflict: {r}");
    }
    let lines = bootstrap_lines(&c, url, "reader").await;
    let x = entity(&lines, "log", "x");
    assert_eq!(x["data"], json!({"a": 2, "b": 2}));
    assert_eq!(x["version"], 2);
    assert_eq!(x["meta"], json!({"hlc": h(5)}));
    let y = entity(&lines, "log", "y");
    assert_eq!((y["deleted"].clone(), y["data"].clone(), y["version"].clone()), (json!(true), json!({}), json!(4)));
    let z = entity(&lines, "log", "z");
    assert_eq!((z["deleted"].clone(), z["data"].clone()), (json!(false), json!({"c": 1})));
    assert_eq!(z["meta"], json!({"hlc": h(0)}));
    assert!(all_conflicts(&c, url).await.is_empty());
}

store_test!(#[tokio::test] async fn reject_policy_checks_base_version);
async fn reject_policy_checks_base_version(backend: &Backend) {
    let server = Server::start_with(backend, cfg("[collections.docs]\npolicy = \"reject\"\n"));
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    let h = |k: u64| hlc(t + k, 0, "d");
    let one = |ch: Value| {
        let (c, url) = (c.clone(), url.to_owned());
        async move { push(&c, &url, "d", vec![ch]).await["results"][0].clone() }
    };
    let rejected = |r: &Value| {
        assert_eq!(r["status"], "rejected", "{r}");
        assert_eq!(r["conflict"]["reason"], "version_mismatch", "{r}");
        assert!(r.get("seq").is_none_or(Value::is_null), "{r}");
        assert!(r["conflict"].get("fields").is_none_or(Value::is_null), "{r}");
    };
    // Missing base_version on a new entity: refused, current null.
    let r = one(upsert("j1", "docs", "d1", json!({"a": 1}), &h(1))).await;
    rejected(&r);
    assert!(r["conflict"].as_object().unwrap().contains_key("current"), "{r}");
    assert_eq!(r["conflict"]["current"], Value::Null);
    // Wrong base_version on a new entity.
    let r = one(with_base(upsert("j1b", "docs", "d1", json!({"a": 1}), &h(1)), 3)).await;
    rejected(&r);
    assert_eq!(r["conflict"]["current"], Value::Null);
    assert_eq!(head(&c, url).await, 0);
    let r = one(with_base(upsert("j2", "docs", "d1", json!({"a": 1}), &h(2)), 0)).await;
    assert_eq!((r["status"].as_str(), r["seq"].as_u64()), (Some("applied"), Some(1)));
    let before = entity(&bootstrap_lines(&c, url, "reader").await, "docs", "d1");
    let r = one(with_base(upsert("j3", "docs", "d1", json!({"b": 1}), &h(3)), 0)).await;
    rejected(&r);
    assert_eq!(r["conflict"]["current"], before, "current must be the unchanged entity");
    assert_eq!(head(&c, url).await, 1);
    let r = one(with_base(upsert("j4", "docs", "d1", json!({"b": 2}), &h(4)), 1)).await;
    assert_eq!(r["seq"], 2);
    // HLCs do not matter under reject: an old stamp with the right version applies.
    let r = one(with_base(upsert("j5", "docs", "d1", json!({"c": 3}), &h(0)), 2)).await;
    assert_eq!((r["status"].as_str(), r["seq"].as_u64()), (Some("applied"), Some(3)), "{r}");
    assert!(r.get("conflict").is_none_or(Value::is_null), "{r}");
    let r = one(with_base(delete("j6", "docs", "d1", &h(6)), 3)).await;
    assert_eq!(r["seq"], 4);
    // A deleted entity keeps the version of its delete.
    let r = one(with_base(upsert("j7", "docs", "d1", json!({"z": 1}), &h(7)), 0)).await;
    rejected(&r);
    assert_eq!(r["conflict"]["current"]["deleted"], true);
    assert_eq!(r["conflict"]["current"]["version"], 4);
    let r = one(with_base(upsert("j8", "docs", "d1", json!({"z": 1}), &h(8)), 4)).await;
    assert_eq!(r["seq"], 5);
    // A delete of a never-seen entity with base_version 0.
    let r = one(with_base(delete("j9", "docs", "d2", &h(9)), 0)).await;
    assert_eq!(r["seq"], 6);
    // An append is never refused, even without base_version.
    let r = one(append("j10", "docs", "d1", json!("opaque"), &h(10))).await;
    assert_eq!((r["status"].as_str(), r["seq"].as_u64()), (Some("applied"), Some(7)));
    // A later change of a batch sees the earlier one's version.
    let a = push(
        &c,
        url,
        "d",
        vec![
            with_base(upsert("j11", "docs", "d3", json!({"v": 1}), &h(11)), 0),
            with_base(upsert("j12", "docs", "d3", json!({"v": 2}), &h(12)), 8),
        ],
    )
    .await;
    assert_eq!(a["results"][0]["seq"], 8);
    assert_eq!(a["results"][1]["seq"], 9, "{a}");

    let lines = bootstrap_lines(&c, url, "reader").await;
    let d1 = entity(&lines, "docs", "d1");
    assert_eq!(d1["data"], json!({"z": 1}));
    assert_eq!(d1["version"], 5);
    assert_eq!(d1["deleted"], false);
    assert_eq!(d1["meta"], json!({"hlc": h(8)}));
    let d2 = entity(&lines, "docs", "d2");
    assert_eq!((d2["deleted"].clone(), d2["version"].clone()), (json!(true), json!(6)));
    assert_eq!(entity(&lines, "docs", "d3")["data"], json!({"v": 2}));
    let recs = all_conflicts(&c, url).await;
    let got: Vec<&str> = recs.iter().map(|r| r["change_id"].as_str().unwrap()).collect();
    assert_eq!(got, ["j1", "j1b", "j3", "j7"]);
    for r in &recs {
        assert_eq!(r["reason"], "version_mismatch");
        assert!(r.get("seq").is_none_or(Value::is_null), "a refused change has no seq: {r}");
    }
    assert_eq!(recs[0]["current"], Value::Null);
    assert_eq!(recs[2]["current"], before);
}

store_test!(#[tokio::test] async fn default_policy_applies_to_unnamed_collections);
async fn default_policy_applies_to_unnamed_collections(backend: &Backend) {
    let server = Server::start_with(
        backend,
        cfg("[server]\ndefault_policy = \"entity\"\n\n[collections.f]\npolicy = \"fields\"\n"),
    );
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    for coll in ["other", "f"] {
        push(&c, url, "d", vec![upsert(&format!("{coll}1"), coll, "x", json!({"a": 1}), &hlc(t + 10, 0, "d"))]).await;
    }
    let e = push(&c, url, "d", vec![upsert("other2", "other", "x", json!({"b": 1}), &hlc(t + 5, 0, "d"))]).await;
    assert_eq!(e["results"][0]["conflict"]["reason"], "superseded", "default_policy entity: {e}");
    let f = push(&c, url, "d", vec![upsert("f2", "f", "x", json!({"b": 1}), &hlc(t + 5, 0, "d"))]).await;
    assert!(f["results"][0].get("conflict").is_none_or(Value::is_null), "{f}");
    let lines = bootstrap_lines(&c, url, "d").await;
    assert_eq!(entity(&lines, "other", "x")["data"], json!({"a": 1}));
    assert_eq!(entity(&lines, "f", "x")["data"], json!({"a": 1, "b": 1}));
    assert_eq!(status(&c, url).await["policies"], json!({"default": "entity", "collections": {"f": "fields"}}));
}

// ---------------------------------------------------------------- append

store_test!(#[tokio::test] async fn append_is_logged_but_never_touches_entity_state);
async fn append_is_logged_but_never_touches_entity_state(backend: &Backend) {
    let server = Server::start_with(backend, cfg("[collections.docs]\npolicy = \"reject\"\n"));
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    push(&c, url, "d", vec![upsert("u1", "tasks", "e", json!({"a": 1}), &hlc(t + 10, 0, "d"))]).await;
    let before = bootstrap_lines(&c, url, "d").await;
    let a = push(
        &c,
        url,
        "d",
        vec![
            append("a1", "tasks", "e", json!({"crdt": [1, 2, 3]}), &hlc(t + 20, 0, "d")),
            append("a2", "tasks", "fresh", json!("text"), &hlc(t + 1, 0, "d")),
            append("a3", "docs", "never", json!(42), &hlc(t + 2, 0, "d")),
            json!({"change_id": "a4", "collection": "tasks", "entity_id": "e", "op": "append", "hlc": hlc(t + 3, 0, "d")}),
        ],
    )
    .await;
    for (i, r) in a["results"].as_array().unwrap().iter().enumerate() {
        assert_eq!(r["status"], "applied", "{r}");
        assert_eq!(r["seq"], i as u64 + 2);
        assert!(r.get("conflict").is_none_or(Value::is_null), "{r}");
    }
    assert_eq!(a["state_digest"], before[0]["state_digest"], "appends add nothing to the digest");
    assert_ne!(a["state_hash"], before[0]["state_hash"], "appends are in the chain");
    let lines = bootstrap_lines(&c, url, "d").await;
    let e = entity(&lines, "tasks", "e");
    assert_eq!(e, entity(&before, "tasks", "e"), "an append changed the entity");
    assert_eq!(e["version"], 1);
    assert!(find_entity(&lines, "tasks", "fresh").is_none());
    assert!(find_entity(&lines, "docs", "never").is_none());
    let appends: Vec<&Value> = lines.iter().filter_map(|l| l.get("change")).collect();
    assert_eq!(appends.len(), 4, "{lines:?}");
    let seqs: Vec<u64> = appends.iter().map(|c| c["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [2, 3, 4, 5]);
    let first = appends[0];
    assert_eq!(first["change_id"], "a1");
    assert_eq!(first["op"], "append");
    assert_eq!(first["device_id"], "d");
    assert_eq!(first["data"], json!({"crdt": [1, 2, 3]}));
    assert_eq!(first["hlc"], hlc(t + 20, 0, "d"));
    assert!(first["server_time"].is_u64());
    assert_eq!(appends[2]["collection"], "docs");
    // Appends are served by pull like any change.
    let (_, page) = get(&c, url, "/v1/pull?device_id=d&cursor=1").await;
    assert_eq!(page["changes"].as_array().unwrap().len(), 4);
    assert_eq!(page["changes"][1]["data"], "text");
}

// ---------------------------------------------------------------- fixed policies

/// Starts `deltasync serve` on `database` (a `--database` URL) with `config` and expects it to exit with a failure.
fn spawn_expect_failure(database: &str, config: &str) -> (ExitStatus, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(&cfg_path, config).unwrap();
    let mut child = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--database", database])
        .arg("--config")
        .arg(&cfg_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "deltasync serve kept running with a changed policy; stdout: {}; stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

store_test!(#[tokio::test] async fn a_collections_policy_is_fixed_once_it_has_changes);
async fn a_collections_policy_is_fixed_once_it_has_changes(backend: &Backend) {
    let first = "[collections.notes]\npolicy = \"entity\"\n\n[collections.refused]\npolicy = \"reject\"\n";
    let mut server = Server::start_with(backend, cfg(first));
    let database = server.database.clone();
    let c = client();
    let t = base();
    let a = push(
        &c,
        &server.url,
        "d",
        vec![
            upsert("p1", "notes", "n", json!({"a": 1}), &hlc(t, 0, "d")),
            upsert("p2", "tasks", "t", json!({"a": 1}), &hlc(t, 0, "d")),
            upsert("p3", "refused", "r", json!({"a": 1}), &hlc(t, 0, "d")),
        ],
    )
    .await;
    assert_eq!(a["results"][2]["status"], "rejected");
    assert!(server.terminate().success());

    let refuses = |config: &str, collection: &str| {
        let (status, _stdout, stderr) = spawn_expect_failure(&database, config);
        assert!(!status.success(), "started with {config:?}");
        assert!(
            stderr.contains(collection),
            "the error must name collection {collection:?} (config {config:?}); stderr: {stderr}"
        );
    };
    // Changing a named collection's policy.
    refuses("[collections.notes]\npolicy = \"fields\"\n", "notes");
    // Dropping its section (it falls back to the default).
    refuses("", "notes");
    // Changing default_policy changes the effective policy of `tasks`.
    refuses("[server]\ndefault_policy = \"server\"\n\n[collections.notes]\npolicy = \"entity\"\n", "tasks");

    // Same effective policies (tasks named explicitly; refused has no changes) start fine.
    let same = "[server]\ndefault_policy = \"server\"\n\n[collections.notes]\npolicy = \"entity\"\n\n\
                [collections.tasks]\npolicy = \"fields\"\n\n[collections.fresh]\npolicy = \"reject\"\n";
    let mut again = Server::start_with(
        backend,
        Options { database: Some(database.clone()), config: Some(same.into()), ..Options::default() },
    );
    let s = status(&c, &again.url).await;
    assert_eq!(s["head"], 2);
    assert!(again.terminate().success());
    // And the unchanged configuration restarts fine.
    let again = Server::start_with(
        backend,
        Options { database: Some(database.clone()), config: Some(first.into()), ..Options::default() },
    );
    assert_eq!(status(&c, &again.url).await["head"], 2);
    drop(server);
}

store_test!(#[tokio::test] async fn a_refused_policy_change_never_announces_listening);
async fn a_refused_policy_change_never_announces_listening(backend: &Backend) {
    // A server that refuses to start must not first print `deltasync listening on …`:
    // scripts and supervisors (and this harness) take that line as "started".
    let mut server = Server::start_with(backend, cfg("[collections.notes]\npolicy = \"entity\"\n"));
    let c = client();
    push(&c, &server.url, "d", vec![upsert("p1", "notes", "n", json!({"a": 1}), &hlc(base(), 0, "d"))]).await;
    assert!(server.terminate().success());
    let (status, stdout, stderr) = spawn_expect_failure(&server.database, "[collections.notes]\npolicy = \"server\"\n");
    assert!(!status.success());
    assert!(stderr.contains("notes"), "{stderr}");
    assert!(!stdout.contains("listening"), "announced listening before refusing to start; stdout: {stdout:?}");
}

// ---------------------------------------------------------------- clock skew

store_test!(#[tokio::test] async fn clock_skew_is_refused_without_consuming_a_seq);
async fn clock_skew_is_refused_without_consuming_a_seq(backend: &Backend) {
    let server = Server::start_with(backend, cfg("[server]\nmax_clock_drift_ms = 1000\n"));
    let (c, url) = (client(), server.url.as_str());
    let now = now_ms();
    let a = push(
        &c,
        url,
        "d",
        vec![
            upsert("k1", "tasks", "x", json!({"a": 1}), &hlc(now + 60_000, 0, "d")),
            upsert("k2", "tasks", "y", json!({"a": 1}), &hlc(now + 500, 0, "d")),
            append("k3", "tasks", "y", json!(1), &hlc(now + 3_600_000, 0, "d")),
        ],
    )
    .await;
    let r = &a["results"];
    assert_eq!(r[0]["status"], "rejected", "{a}");
    assert_eq!(r[0]["conflict"]["reason"], "clock_skew");
    assert!(r[0].get("seq").is_none_or(Value::is_null));
    assert_eq!(r[1]["status"], "applied", "within the drift: {a}");
    assert_eq!(r[1]["seq"], 1);
    assert_eq!(r[2]["status"], "rejected", "appends are checked too: {a}");
    assert_eq!(r[2]["conflict"]["reason"], "clock_skew");
    assert_eq!(a["cursor"], 1);
    assert!(all_conflicts(&c, url).await.is_empty(), "clock_skew must not be recorded");
    // Re-stamped, the same change applies.
    let b = push(&c, url, "d", vec![upsert("k1", "tasks", "x", json!({"a": 1}), &hlc(now_ms(), 0, "d"))]).await;
    assert_eq!(b["results"][0]["status"], "applied", "{b}");
    assert_eq!(b["results"][0]["seq"], 2);
    assert_eq!(head(&c, url).await, 2);
}

// ---------------------------------------------------------------- conflicts endpoint

store_test!(#[tokio::test] async fn conflict_records_hold_the_losing_change_in_full);
async fn conflict_records_hold_the_losing_change_in_full(backend: &Backend) {
    let server = Server::start_with(backend, cfg("[collections.docs]\npolicy = \"reject\"\n"));
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    push(&c, url, "A", vec![upsert("w1", "tasks", "e", json!({"a": 1, "b": 1}), &hlc(t + 10, 0, "A"))]).await;
    let sup = push(&c, url, "B", vec![upsert("l1", "tasks", "e", json!({"a": 2, "c": 3}), &hlc(t + 5, 0, "B"))]).await;
    let del = push(&c, url, "B", vec![delete("l2", "tasks", "e", &hlc(t + 7, 0, "B"))]).await;
    let gone = push(&c, url, "C", vec![upsert("l3", "tasks", "e", json!({"q": [1]}), &hlc(t + 6, 0, "C"))]).await;
    let vm = push(&c, url, "C", vec![with_base(upsert("l4", "docs", "d", json!({"v": 1}), &hlc(t, 0, "C")), 9)]).await;
    let recs = all_conflicts(&c, url).await;
    assert_eq!(recs.len(), 4, "{recs:?}");
    let ids: Vec<u64> = recs.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids must increase: {ids:?}");
    for r in &recs {
        assert!(r["server_time"].as_u64().is_some_and(|s| s.abs_diff(now_ms()) < 60_000), "{r}");
    }

    let r = &recs[0];
    assert_eq!(r["change_id"], "l1");
    assert_eq!(r["device_id"], "B");
    assert_eq!(r["collection"], "tasks");
    assert_eq!(r["entity_id"], "e");
    assert_eq!(r["op"], "upsert");
    assert_eq!(r["data"], json!({"a": 2, "c": 3}));
    assert_eq!(r["hlc"], hlc(t + 5, 0, "B"));
    assert_eq!(r["seq"], 2);
    assert_eq!(r["reason"], "superseded");
    assert_eq!(sorted(&r["fields"]), names(&["a"]));
    assert_eq!(r["current"], sup["results"][0]["conflict"]["current"]);
    assert_eq!(r["current"]["data"], json!({"a": 1, "b": 1, "c": 3}));

    let r = &recs[1];
    assert_eq!((r["change_id"].as_str(), r["op"].as_str(), r["seq"].as_u64()), (Some("l2"), Some("delete"), Some(3)));
    assert_eq!(r["data"], Value::Null);
    assert_eq!(r["reason"], "superseded");
    assert_eq!(sorted(&r["fields"]), names(&["a", "b"]));
    assert_eq!(r["current"], del["results"][0]["conflict"]["current"]);

    let r = &recs[2];
    assert_eq!(
        (r["change_id"].as_str(), r["reason"].as_str(), r["seq"].as_u64()),
        (Some("l3"), Some("deleted"), Some(4))
    );
    assert_eq!(r["device_id"], "C");
    assert_eq!(sorted(&r["fields"]), names(&["q"]));
    assert_eq!(r["data"], json!({"q": [1]}));
    assert_eq!(r["current"], gone["results"][0]["conflict"]["current"]);

    let r = &recs[3];
    assert_eq!((r["change_id"].as_str(), r["reason"].as_str()), (Some("l4"), Some("version_mismatch")));
    assert!(r.get("seq").is_none_or(Value::is_null), "{r}");
    assert!(r.get("fields").is_none_or(Value::is_null), "{r}");
    assert_eq!(r["current"], Value::Null);
    assert_eq!(r["collection"], "docs");
    assert_eq!(r["data"], json!({"v": 1}));
    assert_eq!(vm["results"][0]["conflict"]["current"], Value::Null);

    // Paging by id.
    let mut since = 0;
    let mut seen = Vec::new();
    loop {
        let (s, page) = get(&c, url, &format!("/v1/conflicts?since={since}&limit=3")).await;
        assert_eq!(s, 200);
        let got = page["conflicts"].as_array().unwrap();
        assert!(got.len() <= 3);
        seen.extend(got.iter().map(|r| r["id"].as_u64().unwrap()));
        if got.is_empty() {
            assert_eq!(page["cursor"], since);
        } else {
            assert_eq!(page["cursor"], got.last().unwrap()["id"]);
        }
        since = page["cursor"].as_u64().unwrap();
        if page["has_more"] == false {
            break;
        }
    }
    assert_eq!(seen, ids);
    let (_, first) = get(&c, url, "/v1/conflicts?limit=3").await;
    assert_eq!(first["has_more"], true);
    assert_eq!(first["conflicts"].as_array().unwrap().len(), 3);
    let (_, end) = get(&c, url, &format!("/v1/conflicts?since={}", ids[3])).await;
    assert_eq!(end["conflicts"], json!([]));
    assert_eq!(end["cursor"], ids[3]);
    assert_eq!(end["has_more"], false);
    let (_, mid) = get(&c, url, &format!("/v1/conflicts?since={}&limit=1", ids[1])).await;
    assert_eq!(mid["conflicts"][0]["id"], ids[2]);
    assert_eq!(mid["has_more"], true);
    let (_, far) = get(&c, url, "/v1/conflicts?since=999").await;
    assert_eq!((far["conflicts"].clone(), far["cursor"].clone()), (json!([]), json!(999)));
}

store_test!(#[tokio::test] async fn conflicts_limit_defaults_to_100_and_is_clamped_to_1000);
async fn conflicts_limit_defaults_to_100_and_is_clamped_to_1000(backend: &Backend) {
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    push(&c, url, "w", vec![upsert("win", "tasks", "e", json!({"a": 0}), &hlc(t + 10_000, 0, "w"))]).await;
    for batch in 0..2 {
        let n = if batch == 0 { 1000 } else { 5 };
        let changes = (0..n)
            .map(|i| upsert(&format!("l{batch}-{i}"), "tasks", "e", json!({"a": i}), &hlc(t + i, 0, "l")))
            .collect();
        push(&c, url, "l", changes).await;
    }
    let (_, page) = get(&c, url, "/v1/conflicts").await;
    assert_eq!(page["conflicts"].as_array().unwrap().len(), 100);
    assert_eq!(page["has_more"], true);
    let (_, page) = get(&c, url, "/v1/conflicts?limit=5000").await;
    assert_eq!(page["conflicts"].as_array().unwrap().len(), 1000);
    assert_eq!(page["has_more"], true);
    let last = page["cursor"].as_u64().unwrap();
    let (_, rest) = get(&c, url, &format!("/v1/conflicts?since={last}&limit=1000")).await;
    assert_eq!(rest["conflicts"].as_array().unwrap().len(), 5);
    assert_eq!(rest["has_more"], false);
    let zero = send(c.get(format!("{url}/v1/conflicts?limit=0"))).await;
    assert_error(zero, 400, "invalid_request");
}

store_test!(#[tokio::test] async fn conflicts_since_past_the_largest_id_is_empty_not_wrapped);
async fn conflicts_since_past_the_largest_id_is_empty_not_wrapped(backend: &Backend) {
    // `since` at or above 2^63 fits no stored id: it must not wrap around to a
    // negative number and list the records from the first one.
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    push(&c, url, "w", vec![upsert("win", "tasks", "e", json!({"a": 0}), &hlc(t + 10_000, 0, "w"))]).await;
    let losers = (0..3).map(|i| upsert(&format!("l{i}"), "tasks", "e", json!({"a": i}), &hlc(t + i, 0, "l"))).collect();
    push(&c, url, "l", losers).await;
    assert_eq!(all_conflicts(&c, url).await.len(), 3);
    for since in ["9223372036854775807", "9223372036854775808", "18446744073709551615"] {
        let (s, page) = get(&c, url, &format!("/v1/conflicts?since={since}")).await;
        assert_eq!(s, 200, "since={since}: {page}");
        assert_eq!(page["conflicts"], json!([]), "since={since}: {page}");
        assert_eq!(page["has_more"], false, "since={since}: {page}");
    }
}

// ---------------------------------------------------------------- pull

store_test!(#[tokio::test] async fn pull_pages_in_order_with_cursor_and_has_more);
async fn pull_pages_in_order_with_cursor_and_has_more(backend: &Backend) {
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    let mut hashes = vec![ZERO64.to_owned()];
    for i in 1..=5u64 {
        let a = push(
            &c,
            url,
            "w",
            vec![upsert(&format!("c{i}"), "tasks", &format!("e{i}"), json!({"i": i}), &hlc(t + i, 0, "w"))],
        )
        .await;
        hashes.push(a["state_hash"].as_str().unwrap().to_owned());
    }
    let page = |q: String| {
        let c = c.clone();
        let url = url.to_owned();
        async move {
            let (s, p) = get(&c, &url, &format!("/v1/pull?device_id=r&{q}")).await;
            assert_eq!(s, 200, "{p}");
            let seqs: Vec<u64> = p["changes"].as_array().unwrap().iter().map(|c| c["seq"].as_u64().unwrap()).collect();
            (seqs, p)
        }
    };
    let (seqs, p) = page("cursor=0&limit=2".into()).await;
    assert_eq!(seqs, [1, 2]);
    assert_eq!((p["cursor"].as_u64(), p["has_more"].as_bool()), (Some(2), Some(true)));
    assert_eq!(p["state_hash"], hashes[2]);
    let (seqs, p) = page("cursor=2&limit=2".into()).await;
    assert_eq!(seqs, [3, 4]);
    assert_eq!((p["cursor"].as_u64(), p["has_more"].as_bool()), (Some(4), Some(true)));
    let (seqs, p) = page("cursor=4&limit=2".into()).await;
    assert_eq!(seqs, [5]);
    assert_eq!((p["cursor"].as_u64(), p["has_more"].as_bool()), (Some(5), Some(false)));
    assert_eq!(p["state_hash"], hashes[5]);
    let (seqs, p) = page("cursor=5".into()).await;
    assert!(seqs.is_empty());
    assert_eq!((p["cursor"].as_u64(), p["has_more"].as_bool()), (Some(5), Some(false)));
    assert_eq!(p["state_hash"], hashes[5]);
    assert!(is_hex64(&p["state_digest"]));
    assert!(p["server_time"].is_u64());
    // Defaults: cursor 0, limit 1000; the pushing device gets its own changes too.
    let (s, p) = get(&c, url, "/v1/pull?device_id=w").await;
    assert_eq!(s, 200);
    assert_eq!(p["changes"].as_array().unwrap().len(), 5);
    assert_eq!(p["cursor"], 5);
    assert_eq!(p["changes"][0]["data"], json!({"i": 1}));
    // Empty dataset.
    let empty = Server::start(backend);
    let (_, p) = get(&c, &empty.url, "/v1/pull?device_id=r").await;
    assert_eq!(p["changes"], json!([]));
    assert_eq!((p["cursor"].as_u64(), p["has_more"].as_bool()), (Some(0), Some(false)));
    assert_eq!(p["state_hash"], ZERO64);
    assert_eq!(p["state_digest"], ZERO64);
}

store_test!(#[tokio::test] async fn pull_limit_defaults_to_1000_and_is_clamped_to_10000);
async fn pull_limit_defaults_to_1000_and_is_clamped_to_10000(backend: &Backend) {
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    for b in 0..11u64 {
        let n = if b == 10 { 1 } else { 1000 };
        let changes = (0..n)
            .map(|i| append(&format!("a{b}-{i}"), "log", "x", json!(i), &hlc(t + b * 1000 + i, 0, "w")))
            .collect();
        push(&c, url, "w", changes).await;
    }
    assert_eq!(head(&c, url).await, 10_001);
    let (_, p) = get(&c, url, "/v1/pull?device_id=r").await;
    assert_eq!(p["changes"].as_array().unwrap().len(), 1000);
    assert_eq!((p["cursor"].as_u64(), p["has_more"].as_bool()), (Some(1000), Some(true)));
    let (_, p) = get(&c, url, "/v1/pull?device_id=r&limit=50000").await;
    assert_eq!(p["changes"].as_array().unwrap().len(), 10_000);
    assert_eq!((p["cursor"].as_u64(), p["has_more"].as_bool()), (Some(10_000), Some(true)));
    let (_, p) = get(&c, url, "/v1/pull?device_id=r&cursor=10000&limit=10000").await;
    assert_eq!(p["changes"].as_array().unwrap().len(), 1);
    assert_eq!(p["has_more"], false);
    // Sync's limit is clamped the same way.
    let (s, p) = post(&c, url, "/v1/sync", &json!({"device_id": "r", "cursor": 0, "limit": 20000})).await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["changes"].as_array().unwrap().len(), 10_000);
    assert_eq!(p["cursor"], 10_000);
}

store_test!(#[tokio::test] async fn limits_and_waits_beyond_64_bits_are_clamped_not_refused);
async fn limits_and_waits_beyond_64_bits_are_clamped_not_refused(backend: &Backend) {
    // §6: a limit or wait above its maximum is clamped; only zero, negative or non-integer is a 400.
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.as_str());
    push(&c, url, "w", vec![upsert("c1", "tasks", "e", json!({"a": 1}), &hlc(base(), 0, "w"))]).await;
    let huge = "100000000000000000000";
    let mut refused = Vec::new();
    for path in [
        format!("/v1/pull?device_id=r&limit={huge}"),
        format!("/v1/pull?device_id=r&wait={huge}"),
        format!("/v1/conflicts?limit={huge}"),
    ] {
        let (s, _, text) = send(c.get(format!("{url}{path}"))).await;
        if s != 200 {
            refused.push(format!("GET {path} -> {s} {text}"));
        }
    }
    let body = format!(r#"{{"device_id":"r","cursor":0,"limit":{huge}}}"#);
    let r = c.post(format!("{url}/v1/sync")).header("content-type", "application/json").body(body.clone());
    let (s, _, text) = send(r).await;
    if s != 200 {
        refused.push(format!("POST /v1/sync {body} -> {s} {text}"));
    }
    assert!(refused.is_empty(), "limits above the maximum must be clamped:\n{}", refused.join("\n"));
}

store_test!(#[tokio::test] async fn pull_wait_returns_as_soon_as_a_change_arrives);
async fn pull_wait_returns_as_soon_as_a_change_arrives(backend: &Backend) {
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.clone());
    push(&c, &url, "w", vec![upsert("c1", "tasks", "e", json!({"a": 1}), &hlc(base(), 0, "w"))]).await;
    let waiter = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let (s, p) = get(&c, &url, "/v1/pull?device_id=r&cursor=1&wait=5").await;
            (s, p, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    push(&c, &url, "w", vec![upsert("c2", "tasks", "e", json!({"a": 2}), &hlc(now_ms(), 0, "w"))]).await;
    let (s, p, elapsed) = waiter.await.unwrap();
    assert_eq!(s, 200, "{p}");
    assert!(elapsed < Duration::from_secs(4), "the long poll took {elapsed:?}");
    assert_eq!(p["changes"].as_array().unwrap().len(), 1, "{p}");
    assert_eq!(p["changes"][0]["change_id"], "c2");
    assert_eq!(p["cursor"], 2);

    // Nothing arrives: an empty page after the wait.
    let started = Instant::now();
    let (s, p) = get(&c, &url, "/v1/pull?device_id=r&cursor=2&wait=1").await;
    let elapsed = started.elapsed();
    assert_eq!(s, 200);
    assert_eq!(p["changes"], json!([]));
    assert_eq!((p["cursor"].as_u64(), p["has_more"].as_bool()), (Some(2), Some(false)));
    assert!(elapsed >= Duration::from_millis(900), "wait=1 answered after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "wait=1 answered after {elapsed:?}");
    // With changes already there, wait does not delay the answer.
    let started = Instant::now();
    let (_, p) = get(&c, &url, "/v1/pull?device_id=r&cursor=0&wait=5").await;
    assert_eq!(p["changes"].as_array().unwrap().len(), 2);
    assert!(started.elapsed() < Duration::from_secs(4));
}

// ---------------------------------------------------------------- 410

store_test!(#[tokio::test] async fn cursor_above_head_is_reset_required_and_sync_applies_nothing);
async fn cursor_above_head_is_reset_required_and_sync_applies_nothing(backend: &Backend) {
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    push(
        &c,
        url,
        "w",
        vec![
            upsert("c1", "tasks", "e", json!({"a": 1}), &hlc(t, 0, "w")),
            upsert("c2", "tasks", "f", json!({"a": 1}), &hlc(t, 1, "w")),
        ],
    )
    .await;
    let before = status(&c, url).await;
    assert_error(send(c.get(format!("{url}/v1/pull?device_id=r&cursor=3"))).await, 410, "reset_required");
    assert_error(send(c.get(format!("{url}/v1/pull?device_id=r&cursor=3&wait=2"))).await, 410, "reset_required");
    let (s, _) = get(&c, url, "/v1/pull?device_id=r&cursor=2").await;
    assert_eq!(s, 200);
    let body = json!({"device_id": "s", "cursor": 5, "changes": [
        upsert("c3", "tasks", "g", json!({"a": 1}), &hlc(t, 2, "s")),
        delete("c4", "tasks", "e", &hlc(t + 1, 0, "s")),
    ]});
    assert_error(send(c.post(format!("{url}/v1/sync")).json(&body)).await, 410, "reset_required");
    assert_error(
        send(c.post(format!("{url}/v1/sync")).json(&json!({"device_id": "s", "cursor": 3}))).await,
        410,
        "reset_required",
    );
    let after = status(&c, url).await;
    assert_eq!(after["head"], 2);
    assert_eq!(after["state_hash"], before["state_hash"]);
    assert_eq!(after["state_digest"], before["state_digest"]);
    // The refused changes were not kept: sent again from a good cursor, they apply.
    let body = json!({"device_id": "s", "cursor": 2, "changes": [upsert("c3", "tasks", "g", json!({"a": 1}), &hlc(t, 2, "s"))]});
    let (s, answer) = post(&c, url, "/v1/sync", &body).await;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(answer["results"][0]["status"], "applied");
    assert_eq!(answer["results"][0]["seq"], 3);
}

// ---------------------------------------------------------------- sync

store_test!(#[tokio::test] async fn sync_pushes_then_pulls_leaving_out_its_own_changes);
async fn sync_pushes_then_pulls_leaving_out_its_own_changes(backend: &Backend) {
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    push(
        &c,
        url,
        "A",
        vec![
            upsert("a1", "tasks", "e1", json!({"v": 1}), &hlc(t, 0, "A")),
            upsert("a2", "tasks", "e2", json!({"v": 2}), &hlc(t + 1, 0, "A")),
        ],
    )
    .await;
    let body = json!({"device_id": "B", "cursor": 0, "changes": [
        upsert("b1", "tasks", "e3", json!({"v": 3}), &hlc(t + 2, 0, "B")),
        upsert("a1", "tasks", "e1", json!({"v": 9}), &hlc(t + 3, 0, "B")),
    ]});
    let (s, a) = post(&c, url, "/v1/sync", &body).await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(a["results"][0], json!({"change_id": "b1", "status": "applied", "seq": 3}));
    assert_eq!(a["results"][1], json!({"change_id": "a1", "status": "duplicate", "seq": 1}));
    let seqs: Vec<u64> = a["changes"].as_array().unwrap().iter().map(|c| c["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [2], "sync must leave out the changes it pushed (applied or duplicate): {a}");
    assert_eq!(a["cursor"], 3);
    assert_eq!(a["has_more"], false);
    let s = status(&c, url).await;
    assert_eq!(a["state_hash"], s["state_hash"]);
    assert_eq!(a["state_digest"], s["state_digest"]);
    assert!(a["server_time"].is_u64());

    // `limit` bounds the seqs covered, returned or left out: an empty page with has_more.
    let body = json!({"device_id": "B", "cursor": 3, "limit": 1, "changes": [
        upsert("b2", "tasks", "e4", json!({"v": 4}), &hlc(t + 4, 0, "B")),
        upsert("b3", "tasks", "e5", json!({"v": 5}), &hlc(t + 5, 0, "B")),
    ]});
    let (s, a) = post(&c, url, "/v1/sync", &body).await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(a["results"].as_array().unwrap().len(), 2);
    assert_eq!(a["results"][0]["seq"], 4);
    assert_eq!(a["results"][1]["seq"], 5);
    assert_eq!(a["changes"], json!([]));
    assert_eq!((a["cursor"].as_u64(), a["has_more"].as_bool()), (Some(4), Some(true)));
    let (_, p4) = get(&c, url, "/v1/pull?device_id=x&cursor=3&limit=1").await;
    assert_eq!(a["state_hash"], p4["state_hash"], "hashes at the returned cursor");
    // From an older cursor with a limit: another device's change is returned, own ones skipped.
    let body = json!({"device_id": "A", "cursor": 1, "limit": 3, "changes": [
        upsert("a3", "tasks", "e6", json!({"v": 6}), &hlc(t + 6, 0, "A")),
    ]});
    let (_, a) = post(&c, url, "/v1/sync", &body).await;
    assert_eq!(a["results"][0]["seq"], 6);
    let ids: Vec<&str> = a["changes"].as_array().unwrap().iter().map(|c| c["change_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a2", "b1", "b2"]);
    assert_eq!((a["cursor"].as_u64(), a["has_more"].as_bool()), (Some(4), Some(true)));
    // A sync without changes is a pull; results present and empty.
    let (s, a) = post(&c, url, "/v1/sync", &json!({"device_id": "C"})).await;
    assert_eq!(s, 200);
    assert_eq!(a["results"], json!([]));
    assert_eq!(a["changes"].as_array().unwrap().len(), 6);
    assert_eq!(a["cursor"], 6);
    // `null` members mean absent.
    let (s, a) =
        post(&c, url, "/v1/sync", &json!({"device_id": "C", "cursor": null, "limit": null, "changes": null})).await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(a["cursor"], 6);
    // A rejected change is a result; the rest of the batch applies.
    let body = json!({"device_id": "C", "cursor": 6, "changes": [
        upsert("c1", "tasks", "e7", json!({"v": 7}), &hlc(now_ms() + 3_600_000, 0, "C")),
        upsert("c2", "tasks", "e7", json!({"v": 8}), &hlc(t + 8, 0, "C")),
    ]});
    let (_, a) = post(&c, url, "/v1/sync", &body).await;
    assert_eq!(a["results"][0]["status"], "rejected");
    assert_eq!(a["results"][0]["conflict"]["reason"], "clock_skew");
    assert_eq!(a["results"][1]["seq"], 7);
    assert_eq!(a["changes"], json!([]));
    assert_eq!(a["cursor"], 7);
}

// ---------------------------------------------------------------- devices and status

fn device<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == id)
        .unwrap_or_else(|| panic!("device {id} not registered: {status}"))
}

store_test!(#[tokio::test] async fn device_cursors_are_the_highest_given);
async fn device_cursors_are_the_highest_given(backend: &Backend) {
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.as_str());
    let t = base();
    let started = now_ms();
    push(
        &c,
        url,
        "pusher",
        (1..=3).map(|i| upsert(&format!("c{i}"), "tasks", "e", json!({"i": i}), &hlc(t + i, 0, "pusher"))).collect(),
    )
    .await;
    get(&c, url, "/v1/pull?device_id=puller&cursor=0&limit=2").await;
    get(&c, url, "/v1/pull?device_id=puller&cursor=0&limit=1").await;
    post(&c, url, "/v1/sync", &json!({"device_id": "syncer", "cursor": 1})).await;
    bootstrap_lines(&c, url, "booter").await;
    get(&c, url, "/v1/status?device_id=watcher").await;
    let late = send(c.get(format!("{url}/v1/pull?device_id=late&cursor=99"))).await;
    assert_eq!(late.0, 410);
    // Pushing does not raise a cursor.
    push(&c, url, "puller", vec![upsert("c4", "tasks", "e", json!({"i": 4}), &hlc(t + 4, 0, "puller"))]).await;
    let s = status(&c, url).await;
    let ended = now_ms();
    let want = [("pusher", 0), ("puller", 2), ("syncer", 3), ("booter", 3), ("watcher", 0), ("late", 0)];
    for (id, cursor) in want {
        let d = device(&s, id);
        assert_eq!(d["cursor"], cursor, "{id}: {s}");
        let seen = d["last_seen"].as_u64().unwrap();
        assert!((started.saturating_sub(1000)..=ended + 1000).contains(&seen), "{id} last_seen {seen}");
    }
    assert_eq!(s["devices"].as_array().unwrap().len(), want.len(), "{s}");
}

store_test!(#[tokio::test] async fn status_reports_user_head_hashes_horizon_and_policies);
async fn status_reports_user_head_hashes_horizon_and_policies(backend: &Backend) {
    let server = Server::start_with(
        backend,
        cfg("[server]\ndefault_policy = \"server\"\n\n[collections.notes]\npolicy = \"entity\"\n\n\
         [collections.docs]\npolicy = \"reject\"\n"),
    );
    let (c, url) = (client(), server.url.as_str());
    let s = status(&c, url).await;
    assert_eq!(s["user_id"], "local");
    assert_eq!(s["head"], 0);
    assert_eq!(s["state_hash"], ZERO64);
    assert_eq!(s["state_digest"], ZERO64);
    assert_eq!(s["horizon"], 0);
    assert_eq!(s["policies"], json!({"default": "server", "collections": {"notes": "entity", "docs": "reject"}}));
    assert_eq!(s["devices"], json!([]));
    assert!(s["server_time"].as_u64().is_some_and(|t| t.abs_diff(now_ms()) < 60_000));
    let a = push(&c, url, "d", vec![upsert("c1", "tasks", "e", json!({"a": 1}), &hlc(base(), 0, "d"))]).await;
    let s = status(&c, url).await;
    assert_eq!(s["head"], 1);
    assert_eq!(s["state_hash"], a["state_hash"]);
    assert_eq!(s["state_digest"], a["state_digest"]);
    assert!(is_hex64(&s["state_hash"]) && is_hex64(&s["state_digest"]));
    assert_eq!(s["horizon"], 0);
    // Collections only used, not configured, are not listed.
    assert_eq!(s["policies"]["collections"], json!({"notes": "entity", "docs": "reject"}));
    let plain = Server::start(backend);
    assert_eq!(status(&c, &plain.url).await["policies"], json!({"default": "fields", "collections": {}}));
}

// ---------------------------------------------------------------- bootstrap

store_test!(#[tokio::test] async fn bootstrap_streams_header_entities_appends_and_end);
async fn bootstrap_streams_header_entities_appends_and_end(backend: &Backend) {
    let server = Server::start_with(backend, cfg("[collections.notes]\npolicy = \"entity\"\n"));
    let (c, url) = (client(), server.url.as_str());
    // Empty dataset.
    let r = c.get(format!("{url}/v1/bootstrap")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ct = r.headers().get(reqwest::header::CONTENT_TYPE).unwrap().to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/x-ndjson"), "{ct}");
    let text = r.text().await.unwrap();
    assert!(text.ends_with('\n'));
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["cursor"], 0);
    assert_eq!(lines[0]["state_hash"], ZERO64);
    assert_eq!(lines[0]["state_digest"], ZERO64);
    assert_eq!(lines[1], json!({"end": true, "count": 0}));

    let t = base();
    push(
        &c,
        url,
        "d",
        vec![
            upsert("c1", "tasks", "e1", json!({"a": 1}), &hlc(t, 0, "d")),
            append("c2", "tasks", "e1", json!({"op": 1}), &hlc(t + 1, 0, "d")),
            upsert("c3", "tasks", "e2", json!({"b": 2}), &hlc(t + 2, 0, "d")),
            delete("c4", "tasks", "e2", &hlc(t + 3, 0, "d")),
            upsert("c5", "notes", "n1", json!({"c": 3}), &hlc(t + 4, 0, "d")),
            append("c6", "notes", "n9", json!("x"), &hlc(t + 5, 0, "d")),
            delete("c7", "notes", "n2", &hlc(t + 6, 0, "d")),
        ],
    )
    .await;
    let lines = bootstrap_lines(&c, url, "b").await;
    let s = status(&c, url).await;
    let header = &lines[0];
    let keys: Vec<&String> = header.as_object().unwrap().keys().collect();
    for k in ["cursor", "state_hash", "state_digest", "server_time", "policies"] {
        assert!(header.get(k).is_some(), "header lacks {k}: {header}");
    }
    assert_eq!(keys.len(), 5, "{header}");
    assert_eq!(header["cursor"], 7);
    assert_eq!(header["state_hash"], s["state_hash"]);
    assert_eq!(header["state_digest"], s["state_digest"]);
    assert_eq!(header["policies"], json!({"default": "fields", "collections": {"notes": "entity"}}));
    assert!(header["server_time"].is_u64());
    let last = lines.last().unwrap();
    assert_eq!(*last, json!({"end": true, "count": lines.len() - 2}));
    let body = &lines[1..lines.len() - 1];
    let entities: Vec<&Value> = body.iter().filter_map(|l| l.get("entity")).collect();
    let changes: Vec<&Value> = body.iter().filter_map(|l| l.get("change")).collect();
    assert_eq!(entities.len() + changes.len(), body.len(), "every line is an entity or a change: {body:?}");
    assert_eq!(entities.len(), 4);
    for e in &entities {
        let mut k: Vec<&String> = e.as_object().unwrap().keys().collect();
        k.sort();
        assert_eq!(k, ["collection", "data", "deleted", "entity_id", "meta", "version"], "{e}");
    }
    let e2 = entity(body, "tasks", "e2");
    assert_eq!((e2["deleted"].clone(), e2["data"].clone(), e2["version"].clone()), (json!(true), json!({}), json!(4)));
    let n2 = entity(body, "notes", "n2");
    assert_eq!((n2["deleted"].clone(), n2["meta"].clone()), (json!(true), json!({"hlc": hlc(t + 6, 0, "d")})));
    assert_eq!(entity(body, "tasks", "e1")["version"], 1);
    assert_eq!(entity(body, "notes", "n1")["data"], json!({"c": 3}));
    let ids: Vec<&str> = changes.iter().map(|c| c["change_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["c2", "c6"]);
    assert_eq!(changes[0]["seq"], 2);
    assert_eq!(changes[1]["seq"], 6);
    assert_eq!(changes[1]["device_id"], "d");
    assert_eq!(changes[1]["data"], "x");
}

// ---------------------------------------------------------------- plumbing

store_test!(#[tokio::test] async fn healthz_unknown_paths_and_wrong_methods);
async fn healthz_unknown_paths_and_wrong_methods(backend: &Backend) {
    let server = Server::start(backend);
    let (c, url) = (client(), server.url.as_str());
    let r = c.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_error(send(c.get(format!("{url}/v1/nope"))).await, 404, "not_found");
    assert_error(send(c.get(format!("{url}/"))).await, 404, "not_found");
    assert_error(send(c.post(format!("{url}/v2/push")).json(&json!({}))).await, 404, "not_found");
    assert_error(send(c.get(format!("{url}/v1/push"))).await, 405, "method_not_allowed");
    assert_error(send(c.get(format!("{url}/v1/sync"))).await, 405, "method_not_allowed");
    assert_error(send(c.post(format!("{url}/v1/pull")).json(&json!({}))).await, 405, "method_not_allowed");
    assert_error(send(c.delete(format!("{url}/v1/status"))).await, 405, "method_not_allowed");
    assert_error(send(c.put(format!("{url}/v1/bootstrap"))).await, 405, "method_not_allowed");
    assert_error(send(c.post(format!("{url}/v1/conflicts"))).await, 405, "method_not_allowed");
    assert_error(send(c.post(format!("{url}/healthz"))).await, 405, "method_not_allowed");
}

// ---------------------------------------------------------------- JWT

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn now_s() -> u64 {
    now_ms() / 1000
}

fn jwt(alg: jsonwebtoken::Algorithm, secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), claims, &jsonwebtoken::EncodingKey::from_secret(secret))
        .unwrap()
}

fn mint(user: &str, secret_file: &Path) -> String {
    let (st, out, err) =
        run_cli(&["token", "--user", user, "--secret-file", secret_file.to_str().unwrap(), "--ttl", "1h"]);
    assert!(st.success(), "token failed: {err}");
    assert_eq!(out.lines().count(), 1, "stdout must be the token alone: {out:?}");
    let token = out.trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "{token}");
    token
}

async fn as_user(token: &str, req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.bearer_auth(token).send().await.unwrap();
    let s = r.status().as_u16();
    let text = r.text().await.unwrap();
    (s, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

store_test!(#[tokio::test] async fn jwt_auth_refuses_bad_tokens_and_separates_users);
async fn jwt_auth_refuses_bad_tokens_and_separates_users(backend: &Backend) {
    const SECRET: &str = "s3cret-alpha";
    let server = Server::start_with(backend, Options { jwt_secret: Some(SECRET.into()), ..Options::default() });
    let (c, url) = (client(), server.url.as_str());
    let alice = mint("alice", &server.secret_file());
    let bob = mint("bob", &server.secret_file());

    // Health needs no token; everything else does.
    assert_eq!(c.get(format!("{url}/healthz")).send().await.unwrap().status().as_u16(), 200);
    let t = base();
    let body = json!({"device_id": "d", "changes": [upsert("x1", "tasks", "e", json!({"a": 1}), &hlc(t, 0, "d"))]});
    let requests = || {
        vec![
            c.post(format!("{url}/v1/push")).json(&body),
            c.get(format!("{url}/v1/pull?device_id=d")),
            c.post(format!("{url}/v1/sync")).json(&json!({"device_id": "d"})),
            c.get(format!("{url}/v1/bootstrap")),
            c.get(format!("{url}/v1/status")),
            c.get(format!("{url}/v1/conflicts")),
        ]
    };
    for req in requests() {
        assert_error(send(req).await, 401, "unauthorized");
    }

    // Forged (another secret), expired, wrong algorithms, missing claims, garbage.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.txt");
    std::fs::write(&other, "another-secret\n").unwrap();
    let forged = mint("alice", &other);
    let key = SECRET.as_bytes();
    let hs256 = jsonwebtoken::Algorithm::HS256;
    let expired = jwt(hs256, key, &json!({"sub": "alice", "exp": now_s() - 3600}));
    let expired_past_leeway = jwt(hs256, key, &json!({"sub": "alice", "exp": now_s() - 120}));
    let hs512 = jwt(jsonwebtoken::Algorithm::HS512, key, &json!({"sub": "alice", "exp": now_s() + 3600}));
    let no_exp = jwt(hs256, key, &json!({"sub": "alice"}));
    let no_sub = jwt(hs256, key, &json!({"exp": now_s() + 3600}));
    let empty_sub = jwt(hs256, key, &json!({"sub": "", "exp": now_s() + 3600}));
    let long_sub = jwt(hs256, key, &json!({"sub": "a".repeat(129), "exp": now_s() + 3600}));
    let control_sub = jwt(hs256, key, &json!({"sub": "al\u{1}ice", "exp": now_s() + 3600}));
    let none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(json!({"sub": "alice", "exp": now_s() + 3600}).to_string().as_bytes())
    );
    let bad = [
        ("forged", forged),
        ("expired", expired),
        ("expired beyond the leeway", expired_past_leeway),
        ("HS512", hs512),
        ("alg none", none),
        ("no exp", no_exp),
        ("no sub", no_sub),
        ("empty sub", empty_sub),
        ("129-char sub", long_sub),
        ("control char in sub", control_sub),
        ("garbage", "not.a.jwt".into()),
    ];
    for (what, token) in &bad {
        for req in requests() {
            let answer = send(req.bearer_auth(token)).await;
            assert_eq!(answer.0, 401, "{what} token: {}", answer.2);
            assert_error(answer, 401, "unauthorized");
        }
    }
    let basic = send(c.get(format!("{url}/v1/status")).header("authorization", format!("Basic {alice}"))).await;
    assert_error(basic, 401, "unauthorized");
    assert_eq!(head_of(&c, url, &alice).await, 0, "a refused push wrote something");

    // Within the 60 s leeway, and a secret file with CRLF line ends, are accepted.
    let recent = jwt(hs256, key, &json!({"sub": "alice", "exp": now_s() - 20}));
    let (s, st) = as_user(&recent, c.get(format!("{url}/v1/status"))).await;
    assert_eq!((s, st["user_id"].as_str()), (200, Some("alice")), "{st}");
    let crlf = dir.path().join("crlf.txt");
    std::fs::write(&crlf, format!("{SECRET}\r\n\r\n")).unwrap();
    let (s, _) = as_user(&mint("alice", &crlf), c.get(format!("{url}/v1/status"))).await;
    assert_eq!(s, 200);

    // Users are separate datasets: the same change_id, own seqs, own logs, own devices.
    let (s, a) = as_user(
        &alice,
        c.post(format!("{url}/v1/push")).json(&json!({"device_id": "alice-phone", "changes": [
            upsert("same", "tasks", "e", json!({"owner": "alice"}), &hlc(t, 0, "alice-phone")),
            upsert("a2", "tasks", "e", json!({"owner": "old"}), &hlc(t - 10, 0, "alice-phone")),
        ]})),
    )
    .await;
    assert_eq!(s, 200, "{a}");
    let (s, b) = as_user(
        &bob,
        c.post(format!("{url}/v1/push")).json(&json!({"device_id": "bob-phone", "changes": [
            upsert("same", "tasks", "e", json!({"owner": "bob"}), &hlc(t, 0, "bob-phone")),
        ]})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["results"][0], json!({"change_id": "same", "status": "applied", "seq": 1}), "{b}");
    let (_, pa) = as_user(&alice, c.get(format!("{url}/v1/pull?device_id=alice-laptop"))).await;
    let (_, pb) = as_user(&bob, c.get(format!("{url}/v1/pull?device_id=bob-laptop"))).await;
    assert_eq!(pa["changes"].as_array().unwrap().len(), 2);
    assert!(pa["changes"].as_array().unwrap().iter().all(|c| c["device_id"] == "alice-phone"), "{pa}");
    assert_eq!(pb["changes"].as_array().unwrap().len(), 1);
    assert_eq!(pb["changes"][0]["data"], json!({"owner": "bob"}));
    let (_, sa) = as_user(&alice, c.get(format!("{url}/v1/status"))).await;
    let (_, sb) = as_user(&bob, c.get(format!("{url}/v1/status"))).await;
    assert_eq!((sa["user_id"].as_str(), sa["head"].as_u64()), (Some("alice"), Some(2)));
    assert_eq!((sb["user_id"].as_str(), sb["head"].as_u64()), (Some("bob"), Some(1)));
    assert_ne!(sa["state_hash"], sb["state_hash"]);
    let devices = |s: &Value| -> Vec<String> {
        s["devices"].as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap().to_owned()).collect()
    };
    assert!(devices(&sb).iter().all(|d| d.starts_with("bob")), "{sb}");
    assert!(devices(&sa).iter().all(|d| d.starts_with("alice")), "{sa}");
    let (_, ca) = as_user(&alice, c.get(format!("{url}/v1/conflicts"))).await;
    let (_, cb) = as_user(&bob, c.get(format!("{url}/v1/conflicts"))).await;
    assert_eq!(ca["conflicts"].as_array().unwrap().len(), 1);
    assert_eq!(cb["conflicts"], json!([]));
    let r = c.get(format!("{url}/v1/bootstrap")).bearer_auth(&bob).send().await.unwrap();
    let text = r.text().await.unwrap();
    assert!(text.contains("\"owner\":\"bob\"") && !text.contains("alice"), "{text}");
    // Bob cannot follow Alice's log past his own head.
    let (s, _) = as_user(&bob, c.get(format!("{url}/v1/pull?device_id=bob-laptop&cursor=2"))).await;
    assert_eq!(s, 410);
}

async fn head_of(c: &reqwest::Client, url: &str, token: &str) -> u64 {
    let (s, st) = as_user(token, c.get(format!("{url}/v1/status"))).await;
    assert_eq!(s, 200, "{st}");
    st["head"].as_u64().unwrap()
}
