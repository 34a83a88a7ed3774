//! §6: a bootstrap is "streamed with bounded server memory however large the
//! dataset". 200,000 entities of ~450 bytes (≈ 90 MB of data, ≈ 140 MB of
//! NDJSON) are bootstrapped by a slow reader while the server's RSS is sampled.

mod common;
mod verify;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use verify::*;

const ENTITIES: usize = 200_000;
const BATCH: usize = 1000;
const PUSHERS: usize = 4;
/// The reader's pace: well below what the server produces (~88 MB/s in a debug build), so that it must hold back.
const READ_BYTES_PER_SEC: f64 = 20.0 * 1024.0 * 1024.0;
/// The allowed RSS growth while streaming.
const MAX_GROWTH_KIB: u64 = 64 * 1024;

fn body_of(i: usize) -> String {
    // ~430 bytes that differ per entity.
    let mut s = String::with_capacity(440);
    let mut k = 0;
    while s.len() < 430 {
        s.push_str(&format!("{:08x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(k)));
        s.push(' ');
        k += 7;
    }
    s
}

fn data_of(i: usize) -> Value {
    json!({"title": format!("entity {i}"), "n": i, "body": body_of(i)})
}

store_test!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn bootstrap_of_200k_entities_streams_with_bounded_memory
);
async fn bootstrap_of_200k_entities_streams_with_bounded_memory(backend: &Backend) {
    let server = Server::start(backend);
    let url = server.url.clone();

    // Load: 200 pushes of 1000 upserts from 4 concurrent devices.
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..PUSHERS {
        let url = url.clone();
        handles.push(tokio::spawn(async move {
            let c = client();
            let device = format!("loader-{t}");
            let base = now_ms() - 250_000;
            for b in (t..ENTITIES / BATCH).step_by(PUSHERS) {
                let changes: Vec<Value> = (b * BATCH..(b + 1) * BATCH)
                    .map(|i| {
                        upsert(
                            &format!("load-{i}"),
                            "big",
                            &format!("ent-{i:06}"),
                            data_of(i),
                            &hlc(base + i as u64, 0, &device),
                        )
                    })
                    .collect();
                let answer = push(&c, &url, &device, changes).await;
                assert_eq!(answer["results"].as_array().unwrap().len(), BATCH);
            }
        }));
    }
    for h in handles {
        h.await.expect("a loader panicked");
    }
    let load_time = started.elapsed();
    println!(
        "pushed {ENTITIES} entities in {load_time:.2?} ({:.0} changes/s)",
        ENTITIES as f64 / load_time.as_secs_f64()
    );
    let c = client();
    let st = status(&c, &url).await;
    assert_eq!(st["head"], ENTITIES as u64);

    // Let the server settle, then take the baseline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = server.rss_kib();
    assert!(baseline > 0, "cannot read the server's RSS");

    let pid = server.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            let mut samples = 0u64;
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(rss_kib(pid), Ordering::SeqCst);
                samples += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        })
    };

    let t0 = Instant::now();
    let r = c.get(format!("{url}/v1/bootstrap?device_id=reader")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-type"].to_str().unwrap().starts_with("application/x-ndjson"),
        "bootstrap content type"
    );
    let mut stream = r.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut header: Option<Value> = None;
    let mut end: Option<Value> = None;
    let mut seen = vec![false; ENTITIES];
    let mut entity_lines = 0usize;
    let mut digest = [0u8; 32];
    let mut bytes = 0usize;
    let mut chunks = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("bootstrap stream broke");
        bytes += chunk.len();
        chunks += 1;
        pending.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(nl) = pending[start..].iter().position(|b| *b == b'\n') {
            let line: Value = serde_json::from_slice(&pending[start..start + nl]).expect("an NDJSON line");
            start += nl + 1;
            assert!(end.is_none(), "a line after the end line");
            if header.is_none() {
                header = Some(line);
            } else if let Some(e) = line.get("entity") {
                entity_lines += 1;
                assert_eq!(e["collection"], "big");
                assert_eq!(e["deleted"], false);
                let id = e["entity_id"].as_str().unwrap();
                let i: usize = id.strip_prefix("ent-").and_then(|n| n.parse().ok()).expect("an entity id we pushed");
                assert!(!seen[i], "{id} twice");
                seen[i] = true;
                assert_eq!(e["data"]["n"].as_u64(), Some(i as u64), "data of {id}");
                assert_eq!(e["data"]["body"].as_str(), Some(body_of(i).as_str()), "data of {id}");
                add256(&mut digest, &entity_hash("big", id, &e["data"]));
            } else if line.get("end").is_some() {
                end = Some(line);
            } else {
                panic!("unexpected bootstrap line {line}");
            }
        }
        pending.drain(..start);
        // Read no faster than READ_BYTES_PER_SEC.
        let due = Duration::from_secs_f64(bytes as f64 / READ_BYTES_PER_SEC);
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    let took = t0.elapsed();
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.join().unwrap();
    let peak = peak.load(Ordering::SeqCst);
    let after = server.rss_kib();
    let growth = peak.saturating_sub(baseline);
    println!(
        "bootstrap: {entity_lines} entity lines, {:.1} MB in {chunks} chunks in {took:.2?} ({:.1} MB/s)",
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / took.as_secs_f64()
    );
    println!(
        "server RSS: baseline {:.1} MiB, peak {:.1} MiB, growth {:.1} MiB, after {:.1} MiB ({samples} samples every 20 ms)",
        baseline as f64 / 1024.0,
        peak as f64 / 1024.0,
        growth as f64 / 1024.0,
        after as f64 / 1024.0
    );

    assert!(pending.is_empty(), "the stream ended inside a line");
    let header = header.expect("a header line");
    let end = end.expect("an end line: the stream is incomplete");
    assert_eq!(end["end"], true);
    assert_eq!(end["count"], ENTITIES as u64, "the end line counts {ENTITIES} entity lines");
    assert_eq!(entity_lines, ENTITIES);
    assert!(seen.iter().all(|s| *s), "an entity is missing");
    assert_eq!(header["cursor"], ENTITIES as u64);
    assert_eq!(header["state_digest"], hex::encode(digest).as_str(), "the digest recomputed from the stream");
    assert_eq!(header["state_digest"], st["state_digest"]);
    assert!(
        growth < MAX_GROWTH_KIB,
        "server RSS grew by {growth} KiB while streaming {} MB: the bootstrap is buffered, not streamed",
        bytes / 1_000_000
    );
}
