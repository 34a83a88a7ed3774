//! The compaction workload (`--workloads compaction`, on SQLite): the
//! database file's size under a steady load, with and without compaction.
//!
//! Four devices update 1,000 entities (random UUID ids) `--compaction-updates`
//! times in all, each in syncs of [`BATCH`] changes that also pull what the
//! others pushed, so every device's cursor follows the head. It runs twice,
//! each on a fresh server: one that compacts every `--compact-interval`
//! with `compact_after = "0s"`, and one that never compacts. The file (with
//! its WAL) is sampled every second; the figures are its peak and its size
//! at the end of each run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::server::Servers;
use super::workloads::{Stamps, bar};
use super::{Figure, Target};

/// The devices that update the entities.
const DEVICES: usize = 4;
/// The entities they update.
const ENTITIES: usize = 1_000;
/// Changes per sync.
const BATCH: usize = 100;

/// The sizes of the SQLite file at `db` and of its WAL, in bytes.
fn file_sizes(db: &Path) -> (u64, u64) {
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    (size(db), size(&wal))
}

/// The size of the SQLite file at `db` and its WAL together, in bytes.
fn file_size(db: &Path) -> u64 {
    let (main, wal) = file_sizes(db);
    main + wal
}

/// One device's loop: `syncs` syncs of [`BATCH`] updates, each followed by
/// pulls until the device has caught up.
async fn device(
    http: reqwest::Client,
    url: String,
    n: usize,
    ids: Arc<Vec<String>>,
    syncs: usize,
    done: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let name = format!("bench-compact-{n}");
    let mut stamps = Stamps::new(&name);
    let mut cursor = 0u64;
    for s in 0..syncs {
        let changes: Vec<Value> = (0..BATCH)
            .map(|k| {
                let i = (s * BATCH + k) * 7919 % ENTITIES;
                json!({
                    "change_id": uuid::Uuid::new_v4().to_string(),
                    "collection": "tasks",
                    "entity_id": ids[(i + n * 251) % ENTITIES],
                    "op": "upsert",
                    "data": {"title": format!("Task {i} with a reasonably long title"), "done": s % 2 == 0, "n": s},
                    "hlc": stamps.next(),
                })
            })
            .collect();
        let mut body = json!({"device_id": name, "cursor": cursor, "changes": changes, "limit": 10_000});
        loop {
            let r = http.post(format!("{url}/v1/sync")).json(&body).send().await?;
            let status = r.status();
            let answer: Value = serde_json::from_slice(&r.bytes().await?)?;
            if !status.is_success() {
                bail!("{name}: sync answered {status}: {answer}");
            }
            cursor = answer["cursor"].as_u64().context("a sync answer without cursor")?;
            if answer["has_more"] != true {
                break;
            }
            body = json!({"device_id": name, "cursor": cursor, "changes": [], "limit": 10_000});
        }
        done.fetch_add(BATCH as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// One run on a fresh server started with `config`: the file's size samples
/// (seconds, bytes) and how long the updates took.
async fn run(updates: usize, config: &str, label: &str) -> anyhow::Result<(Vec<(f64, u64)>, Duration)> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.db");
    let servers = Servers::start_with(&format!("sqlite://{}", db.display()), 1, None, config, &[])?;
    let url = servers.urls().remove(0);
    let ids: Arc<Vec<String>> = Arc::new((0..ENTITIES).map(|_| uuid::Uuid::new_v4().to_string()).collect());
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let syncs = updates.div_ceil(DEVICES * BATCH);
    let done = Arc::new(AtomicU64::new(0));
    let progress = bar((syncs * DEVICES * BATCH) as u64, label);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let sampler = {
        let (db, stop, done, progress) = (db.clone(), stop.clone(), done.clone(), progress.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                samples.push((started.elapsed().as_secs_f64(), file_size(&db)));
                progress.set_position(done.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            samples
        })
    };
    let devices: Vec<_> = (0..DEVICES)
        .map(|n| tokio::spawn(device(http.clone(), url.clone(), n, ids.clone(), syncs, done.clone())))
        .collect();
    for d in devices {
        d.await??;
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut samples = sampler.await?;
    samples.push((started.elapsed().as_secs_f64(), file_size(&db)));
    progress.finish_and_clear();
    drop(servers);
    let (main, wal) = file_sizes(&db);
    eprintln!("{label}: database file {main} bytes, WAL {wal} bytes at the end");
    Ok((samples, took))
}

/// Runs the workload: `updates` updates with compaction every `interval`, then without.
pub async fn compaction(updates: usize, interval: &str) -> anyhow::Result<Vec<Figure>> {
    deltasync_server::config::parse_duration(interval)
        .map_err(|e| anyhow::anyhow!("--compact-interval {interval:?}: {e}"))?;
    let with = format!("[server]\ncompact_after = \"0s\"\ncompact_interval = \"{interval}\"\n");
    let without = "[server]\ncompact_interval = \"36500d\"\n";
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut figures = Vec::new();
    let mut peaks = Vec::new();
    for (what, config) in
        [(format!("compaction every {interval}"), with.as_str()), ("no compaction".to_owned(), without)]
    {
        let (samples, took) = run(updates, config, &format!("updates, {what}")).await?;
        let peak = samples.iter().map(|(_, b)| *b).max().unwrap_or(0);
        let end = samples.last().map_or(0, |(_, b)| *b);
        // Every tenth sample, to show the shape without a second per line.
        let shape: Vec<Value> =
            samples.iter().step_by(10).map(|(t, b)| json!({"s": (t * 10.0).round() / 10.0, "mib": mib(*b)})).collect();
        let details = json!({
            "updates": updates, "devices": DEVICES, "entities": ENTITIES, "batch": BATCH,
            "seconds": took.as_secs_f64(), "updates_per_sec": updates as f64 / took.as_secs_f64(),
            "peak_mib": mib(peak), "end_mib": mib(end), "samples": shape,
        });
        figures.push(Figure::new(format!("database file peak, {what}"), mib(peak), "MiB", None, details.clone()));
        figures.push(Figure::new(format!("database file at the end, {what}"), mib(end), "MiB", None, details));
        peaks.push(peak);
    }
    let ratio = peaks[0] as f64 / peaks[1].max(1) as f64;
    figures.push(Figure::new(
        "database file peak, with / without compaction",
        ratio,
        "x",
        Some(Target::AtMost(1.0)),
        json!({"with_peak_mib": mib(peaks[0]), "without_peak_mib": mib(peaks[1])}),
    ));
    Ok(figures)
}
