//! Many devices pushing at once to one dataset: the log stays gapless, every
//! change is logged exactly once, and the chain verifies.

mod common;
mod verify;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use deltasync_protocol::{StateHash, StoredChange};
use serde_json::{Value, json};
use verify::*;

const TASKS: usize = 16;
const BATCHES: usize = 20;
const PER_BATCH: usize = 50;

/// Folds the pulled log with the protocol crate's chain; returns the hex head after every seq.
fn crate_chain(log: &[Value]) -> Vec<String> {
    let mut h = StateHash::ZERO;
    let mut heads = vec![h.to_hex()];
    for (i, v) in log.iter().enumerate() {
        let stored: StoredChange = serde_json::from_value(v.clone()).expect("a stored change");
        assert_eq!(stored.seq, i as u64 + 1, "the log is not gapless");
        h = h.fold(&stored);
        heads.push(h.to_hex());
    }
    heads
}

store_test!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sixteen_devices_pushing_at_once_give_a_gapless_log
);
async fn sixteen_devices_pushing_at_once_give_a_gapless_log(backend: &Backend) {
    let server = Server::start(backend);
    let url = server.url.clone();
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let url = url.clone();
        handles.push(tokio::spawn(async move {
            let c = client();
            let device = format!("dev-{t:02}");
            let base = now_ms() - 100_000;
            let mut counter = 0u32;
            // (change_id, seq) of every applied result, and (cursor, state_hash) of every answer.
            let mut applied = Vec::new();
            let mut answers = Vec::new();
            for b in 0..BATCHES {
                let mut changes = Vec::with_capacity(PER_BATCH);
                for i in 0..PER_BATCH {
                    counter += 1;
                    let id = format!("t{t:02}-b{b:02}-c{i:02}");
                    // Shared entities, so devices contend for the same rows.
                    let entity = format!("e{}", (t * 7 + b * 3 + i) % 100);
                    let h = hlc(base + (b * PER_BATCH + i) as u64, counter % 100_000, &device);
                    changes.push(match i % 10 {
                        9 => delete(&id, "shared", &entity, &h),
                        8 => json!({"change_id": id, "collection": "ops", "entity_id": entity, "op": "append", "data": {"t": t, "b": b, "i": i}, "hlc": h}),
                        _ => upsert(&id, "shared", &entity, json!({format!("f{}", i % 4): format!("{device} {b} {i}"), "n": i}), &h),
                    });
                }
                let answer = push(&c, &url, &device, changes).await;
                let results = answer["results"].as_array().unwrap();
                assert_eq!(results.len(), PER_BATCH);
                let mut last = 0;
                for (i, r) in results.iter().enumerate() {
                    assert_eq!(r["status"], "applied", "fields policy never refuses: {r}");
                    assert_eq!(r["change_id"], format!("t{t:02}-b{b:02}-c{i:02}").as_str(), "results out of request order");
                    let seq = r["seq"].as_u64().unwrap();
                    assert!(seq > last, "seqs of one push follow request order");
                    last = seq;
                    applied.push((r["change_id"].as_str().unwrap().to_owned(), seq));
                }
                let cursor = answer["cursor"].as_u64().unwrap();
                assert!(cursor >= last, "push cursor {cursor} is below its own last seq {last}");
                answers.push((cursor, answer["state_hash"].as_str().unwrap().to_owned()));
            }
            (applied, answers)
        }));
    }
    // An observer pulls and bootstraps while the pushes go on; what it saw is checked against the final chain.
    let done = Arc::new(AtomicBool::new(false));
    let observer = {
        let (url, done) = (url.clone(), done.clone());
        tokio::spawn(async move {
            let c = client();
            let mut cursor = 0u64;
            let mut pages = Vec::new();
            let mut boots = Vec::new();
            let mut round = 0;
            while !done.load(Ordering::SeqCst) {
                round += 1;
                let (code, page) =
                    get(&c, &url, &format!("/v1/pull?device_id=observer&cursor={cursor}&limit=500")).await;
                assert_eq!(code, 200, "{page}");
                let list = page["changes"].as_array().unwrap();
                for (k, ch) in list.iter().enumerate() {
                    assert_eq!(ch["seq"].as_u64().unwrap(), cursor + 1 + k as u64, "a live pull page has a gap");
                }
                cursor = page["cursor"].as_u64().unwrap();
                pages.push((cursor, page["state_hash"].as_str().unwrap().to_owned()));
                if round % 4 == 0 {
                    // A bootstrap taken mid-stream is one consistent snapshot.
                    let boot = Bootstrap::parse(bootstrap_lines(&c, &url, "observer-boot").await);
                    assert_eq!(
                        boot.recomputed_digest(),
                        boot.header["state_digest"].as_str().unwrap(),
                        "a bootstrap taken during pushes is not one snapshot"
                    );
                    let at = boot.header["cursor"].as_u64().unwrap();
                    assert!(boot.appends.iter().all(|a| a["seq"].as_u64().unwrap() <= at), "an append past the cursor");
                    boots.push((at, boot.header["state_hash"].as_str().unwrap().to_owned()));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (pages, boots)
        })
    };
    let mut applied = Vec::new();
    let mut answers = Vec::new();
    for h in handles {
        let (a, b) = h.await.expect("a pushing task panicked");
        applied.extend(a);
        answers.extend(b);
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::SeqCst);
    let (observed_pages, observed_boots) = observer.await.expect("the observer panicked");
    let n = TASKS * BATCHES * PER_BATCH;
    println!(
        "pushed {n} changes in {} pushes from {TASKS} tasks in {:.2?} ({:.0} changes/s, {:.0} pushes/s)",
        TASKS * BATCHES,
        elapsed,
        n as f64 / elapsed.as_secs_f64(),
        (TASKS * BATCHES) as f64 / elapsed.as_secs_f64()
    );

    let c = client();
    let (log, pages) = pull_all(&c, &url, "auditor", 1000).await;
    assert_eq!(log.len(), n);
    let mut seen = HashSet::new();
    let mut by_id = HashMap::new();
    for (i, ch) in log.iter().enumerate() {
        assert_eq!(ch["seq"].as_u64().unwrap(), i as u64 + 1, "seqs are exactly 1..={n}");
        let id = ch["change_id"].as_str().unwrap().to_owned();
        assert!(seen.insert(id.clone()), "change {id} logged twice");
        by_id.insert(id, ch.clone());
    }
    assert_eq!(applied.len(), n);
    for (id, seq) in &applied {
        let ch = by_id.get(id).unwrap_or_else(|| panic!("applied change {id} is not in the log"));
        assert_eq!(ch["seq"].as_u64().unwrap(), *seq, "applied seq of {id}");
        assert_eq!(ch["device_id"].as_str().unwrap(), format!("dev-{}", &id[1..3]), "device of {id}");
    }
    let heads = crate_chain(&log);
    for p in &pages {
        assert_eq!(p.state_hash, heads[p.cursor as usize], "page state_hash at {}", p.cursor);
    }
    for (cursor, hash) in &answers {
        assert_eq!(hash, &heads[*cursor as usize], "push answer state_hash at cursor {cursor}");
    }
    for (cursor, hash) in &observed_pages {
        assert_eq!(hash, &heads[*cursor as usize], "state_hash of a page pulled during the pushes, at {cursor}");
    }
    for (cursor, hash) in &observed_boots {
        assert_eq!(hash, &heads[*cursor as usize], "state_hash of a bootstrap taken during the pushes, at {cursor}");
    }
    println!("observer: {} pages and {} bootstraps during the pushes", observed_pages.len(), observed_boots.len());
    let st = status(&c, &url).await;
    assert_eq!(st["head"], n as u64);
    assert_eq!(st["state_hash"], heads[n].as_str());
    let boot = Bootstrap::parse(bootstrap_lines(&c, &url, "auditor").await);
    assert_eq!(boot.recomputed_digest(), st["state_digest"].as_str().unwrap(), "bootstrap digest vs status");
    assert_eq!(boot.appends.len(), n / 10);
}

store_test!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn retry_storm_logs_every_change_exactly_once
);
async fn retry_storm_logs_every_change_exactly_once(backend: &Backend) {
    const STORM_TASKS: usize = 12;
    const ROUNDS: usize = 3;
    let server = Server::start(backend);
    let url = server.url.clone();
    let base = now_ms() - 100_000;
    // One fixed set of changes that every task sends, with the same content.
    let set: Vec<Value> = (0..240)
        .map(|i| {
            let id = format!("storm-{i:03}");
            let entity = format!("s{}", i % 20);
            let h = hlc(base + i as u64, 0, "origin");
            match i % 8 {
                7 => delete(&id, "storm", &entity, &h),
                6 => json!({"change_id": id, "collection": "storm", "entity_id": entity, "op": "append", "data": [i], "hlc": h}),
                _ => upsert(&id, "storm", &entity, json!({"v": i, "w": format!("value {i}")}), &h),
            }
        })
        .collect();
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..STORM_TASKS {
        let url = url.clone();
        let set = set.clone();
        handles.push(tokio::spawn(async move {
            let c = client();
            let device = format!("retry-{t:02}");
            // Each task cuts the set differently and starts at a different place.
            let chunk = [50, 17, 240, 33, 1, 120][t % 6];
            let mut order = set.clone();
            order.rotate_left((t * 37) % set.len());
            let mut results = Vec::new();
            for _ in 0..ROUNDS {
                for batch in order.chunks(chunk) {
                    let answer = push(&c, &url, &device, batch.to_vec()).await;
                    for r in answer["results"].as_array().unwrap() {
                        results.push(r.clone());
                    }
                }
            }
            results
        }));
    }
    let mut results = Vec::new();
    for h in handles {
        results.extend(h.await.expect("a pushing task panicked"));
    }
    println!("retry storm: {} results in {:.2?}", results.len(), started.elapsed());

    let mut seq_of: HashMap<String, u64> = HashMap::new();
    let mut applied_count: HashMap<String, usize> = HashMap::new();
    for r in &results {
        let id = r["change_id"].as_str().unwrap().to_owned();
        let status = r["status"].as_str().unwrap();
        assert!(status == "applied" || status == "duplicate", "unexpected result {r}");
        let seq = r["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {r}"));
        if let Some(prev) = seq_of.insert(id.clone(), seq) {
            assert_eq!(prev, seq, "two seqs for {id}");
        }
        if status == "applied" {
            *applied_count.entry(id).or_default() += 1;
        }
    }
    assert_eq!(seq_of.len(), set.len());
    for ch in &set {
        let id = ch["change_id"].as_str().unwrap();
        assert_eq!(applied_count.get(id).copied().unwrap_or(0), 1, "{id} must be applied exactly once");
    }
    let c = client();
    let (log, _) = pull_all(&c, &url, "auditor", 100).await;
    assert_eq!(log.len(), set.len(), "every change is logged exactly once");
    let mut seen = HashSet::new();
    for (i, ch) in log.iter().enumerate() {
        assert_eq!(ch["seq"].as_u64().unwrap(), i as u64 + 1);
        let id = ch["change_id"].as_str().unwrap();
        assert!(seen.insert(id.to_owned()), "{id} logged twice");
        assert_eq!(seq_of[id], i as u64 + 1, "the seq the results gave {id}");
    }
    let heads = crate_chain(&log);
    let st = status(&c, &url).await;
    assert_eq!(st["state_hash"], heads[log.len()].as_str());
    let boot = Bootstrap::parse(bootstrap_lines(&c, &url, "auditor").await);
    assert_eq!(boot.recomputed_digest(), st["state_digest"].as_str().unwrap());
}
