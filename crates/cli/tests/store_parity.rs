//! The same pushes give the same answers on SQLite and on PostgreSQL: results,
//! seqs, chain heads, digests, pages, bootstrap lines (in the same order),
//! conflict records and status, byte for byte once the server's clock is
//! taken out.
//!
//! PostgreSQL only: the test says it is skipped when `DELTASYNC_TEST_POSTGRES`
//! is not set.

mod common;

use common::*;
use serde_json::{Value, json};

const CONFIG: &str = "[collections.whole]\npolicy = \"entity\"\n\n[collections.ordered]\npolicy = \"server\"\n\n\
                      [collections.guarded]\npolicy = \"reject\"\n";

/// Entity ids whose byte order differs from most locales' order.
const IDS: &[&str] = &["a", "B", "Z", "é", "e", "ä", "Ω", "😀", "a b", "_x", "10", "9"];
const COLLECTIONS: &[&str] = &["notes", "whole", "ordered", "guarded", "Notes"];

/// A small deterministic generator, so both stores get the very same requests.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Every request of the workload, in order: (path, body).
fn workload(base: u64) -> Vec<(&'static str, Value)> {
    let mut rng = Lcg(42);
    let mut requests = Vec::new();
    let mut sent: Vec<Value> = Vec::new();
    let mut tick = 0u64;
    for push in 0..60 {
        let device = format!("dev-{}", rng.next(4));
        let mut changes = Vec::new();
        for i in 0..1 + rng.next(12) {
            tick += 1;
            let id = format!("p{push}-c{i}");
            let collection = COLLECTIONS[rng.next(COLLECTIONS.len() as u64) as usize];
            let entity = IDS[rng.next(IDS.len() as u64) as usize];
            // Some stamps go back in time, so that last-writer-wins has losers.
            let ms = base + tick * 10 - rng.next(3) * 25;
            let h = hlc(ms, rng.next(3) as u32, &device);
            let mut change = match rng.next(10) {
                0 => delete(&id, collection, entity, &h),
                1 => {
                    json!({"change_id": id, "collection": collection, "entity_id": entity, "op": "append", "data": {"n": i, "text": "ünï"}, "hlc": h})
                }
                _ => upsert(
                    &id,
                    collection,
                    entity,
                    json!({format!("f{}", rng.next(3)): [push, i, 1.5e300, -0.0, "text \u{1}"], "n": rng.next(1000)}),
                    &h,
                ),
            };
            if collection == "guarded" && rng.next(2) == 0 {
                change["base_version"] = json!(rng.next(4));
            }
            changes.push(change);
        }
        // Retries of earlier changes (duplicates) and, now and then, a clock far ahead.
        if push % 7 == 3 && !sent.is_empty() {
            changes.push(sent[rng.next(sent.len() as u64) as usize].clone());
        }
        if push % 11 == 5 {
            changes.push(upsert(
                &format!("p{push}-ahead"),
                "notes",
                "a",
                json!({"x": 1}),
                &hlc(base + 10_000_000_000, 0, &device),
            ));
        }
        sent.extend(changes.iter().cloned());
        if push % 5 == 4 {
            requests.push(("/v1/sync", json!({"device_id": device, "cursor": 0, "changes": changes, "limit": 5})));
        } else {
            requests.push(("/v1/push", json!({"device_id": device, "changes": changes})));
        }
    }
    requests
}

/// The value with every `server_time` and `last_seen` member removed, recursively.
fn without_clock(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| k.as_str() != "server_time" && k.as_str() != "last_seen")
                .map(|(k, v)| (k.clone(), without_clock(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_clock).collect()),
        other => other.clone(),
    }
}

/// Everything a client can read back from a server, clock removed.
async fn read_back(c: &reqwest::Client, url: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = 0;
    loop {
        let (code, page) = get(c, url, &format!("/v1/pull?device_id=reader&cursor={cursor}&limit=7")).await;
        assert_eq!(code, 200, "{page}");
        out.push(without_clock(&page));
        cursor = page["cursor"].as_u64().unwrap();
        if page["has_more"] != true {
            break;
        }
    }
    for line in bootstrap_lines(c, url, "reader").await {
        out.push(without_clock(&line));
    }
    let (code, conflicts) = get(c, url, "/v1/conflicts?since=0&limit=1000").await;
    assert_eq!(code, 200, "{conflicts}");
    out.push(without_clock(&conflicts));
    let (code, status) = get(c, url, "/v1/status").await;
    assert_eq!(code, 200, "{status}");
    out.push(without_clock(&status));
    out
}

#[tokio::test]
async fn the_same_pushes_give_the_same_answers_on_both_stores() {
    let Some(postgres) = Backend::postgres() else { return };
    let opts = Options { config: Some(CONFIG.into()), ..Options::default() };
    let sqlite = Server::start_with(&Backend::Sqlite, opts.clone());
    let pg = Server::start_with(&postgres, opts);
    let c = client();
    let requests = workload(now_ms() - 1_000_000);
    let (mut applied, mut conflicts) = (0, 0);
    for (i, (path, body)) in requests.iter().enumerate() {
        let (code_a, a) = post(&c, &sqlite.url, path, body).await;
        let (code_b, b) = post(&c, &pg.url, path, body).await;
        assert_eq!(code_a, code_b, "request {i} ({path}): {a} vs {b}");
        assert_eq!(without_clock(&a), without_clock(&b), "answer to request {i} ({path}) differs");
        for r in a["results"].as_array().into_iter().flatten() {
            applied += usize::from(r["status"] == "applied");
            conflicts += usize::from(!r["conflict"].is_null());
        }
    }
    // The workload must exercise what it claims to.
    assert!(applied > 200, "only {applied} changes applied");
    assert!(conflicts > 5, "only {conflicts} results carried a conflict");
    let (a, b) = (read_back(&c, &sqlite.url).await, read_back(&c, &pg.url).await);
    assert_eq!(a.len(), b.len(), "different numbers of pages and lines");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "what the two stores serve differs");
    }
    println!("{} requests, {applied} changes applied, {conflicts} conflicts: identical on both stores", requests.len());
}
