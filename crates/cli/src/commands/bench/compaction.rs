//! The compaction workload (`--workloads compaction`, on SQLite): the
//! database file's size under a steady load, with and without compaction.
//!
//! Four devices update 1,000 entities (random UUID ids) `--compaction-updates`
//! times in all, each in syncs of [`BATCH`] changes that also pull what the
//! others pushed, so every device's cursor follows the head. It runs twice,
//! each on a fresh server: one that compacts every `--compact-interval`
//! with `compact_after = "0s"`, and one that never compacts. The file (with
//! its WAL) is sampled every second; the figures are its peak and its size
//! at the end of each run, with what fills the file at the end (SQLite's
//! `dbstat`: the log, the receipts, the entities, free pages).
//!
//! `--compaction-rate` paces the devices (updates per second in all), so
//! that the run lasts long enough for many passes: a steady load rather
//! than a burst that ends before the second pass.

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
    pace: Option<Duration>,
    done: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let name = format!("bench-compact-{n}");
    let mut stamps = Stamps::new(&name);
    let mut cursor = 0u64;
    let started = tokio::time::Instant::now();
    for s in 0..syncs {
        if let Some(pace) = pace {
            // Sync `s` starts at its slot, not `pace` after the one before: a
            // slow sync does not lower the rate, it only delays the next one.
            tokio::time::sleep_until(started + pace * s as u32).await;
        }
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

/// What one run measured.
struct Run {
    /// The file's size (with its WAL) every second: (seconds, bytes).
    samples: Vec<(f64, u64)>,
    /// How long the updates took.
    took: Duration,
    /// What fills the file at the end.
    space: Space,
}

/// Where the bytes of a SQLite file are, by `dbstat`.
struct Space {
    /// Bytes of each table or index, by name.
    by_name: Vec<(String, u64)>,
    /// Bytes in free pages (the freelist).
    free: u64,
    /// Rows in `receipts` and `pending_receipts` (not folded yet).
    receipts: u64,
    /// Rows in `changes` (the log).
    changes: u64,
}

impl Space {
    /// Reads it from the file at `db` (with no server on it).
    fn of(db: &Path) -> anyhow::Result<Space> {
        let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {} to measure it", db.display()))?;
        let mut by_name: Vec<(String, u64)> = conn
            .prepare("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC")?
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<_, _>>()?;
        by_name.retain(|(_, bytes)| *bytes > 0);
        let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        let count = |table: &str| -> anyhow::Result<u64> {
            Ok(conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get::<_, i64>(0))? as u64)
        };
        let receipts = count("receipts")? + count("pending_receipts")?;
        Ok(Space { free: (page * free) as u64, receipts, changes: count("changes")?, by_name })
    }

    /// The bytes of `name` (0 when absent).
    fn bytes(&self, name: &str) -> u64 {
        self.by_name.iter().find(|(n, _)| n == name).map_or(0, |(_, b)| *b)
    }
}

/// One run on a fresh server started with `config`.
async fn run(updates: usize, rate: u32, config: &str, label: &str) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.db");
    let servers = Servers::start_with(&format!("sqlite://{}", db.display()), 1, None, config, &[])?;
    let url = servers.urls().remove(0);
    let ids: Arc<Vec<String>> = Arc::new((0..ENTITIES).map(|_| uuid::Uuid::new_v4().to_string()).collect());
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let syncs = updates.div_ceil(DEVICES * BATCH);
    // Each device makes rate / DEVICES updates a second, in syncs of BATCH.
    let pace = (rate > 0).then(|| Duration::from_secs_f64((DEVICES * BATCH) as f64 / f64::from(rate)));
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
        .map(|n| tokio::spawn(device(http.clone(), url.clone(), n, ids.clone(), syncs, pace, done.clone())))
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
    // The server is gone, so the WAL was checkpointed into the file: measure that.
    let space = Space::of(&db)?;
    Ok(Run { samples, took, space })
}

/// Runs the workload: `updates` updates (`rate` a second in all, or as fast
/// as the server takes them when 0) with compaction every `interval`, then
/// without.
pub async fn compaction(updates: usize, rate: u32, interval: &str) -> anyhow::Result<Vec<Figure>> {
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
        let Run { samples, took, space } = run(updates, rate, config, &format!("updates, {what}")).await?;
        let peak = samples.iter().map(|(_, b)| *b).max().unwrap_or(0);
        let end = samples.last().map_or(0, |(_, b)| *b);
        // About 30 samples, to show the shape without a second per line.
        let shape: Vec<Value> = samples
            .iter()
            .step_by((samples.len() / 30).max(10))
            .map(|(t, b)| json!({"s": (t * 10.0).round() / 10.0, "mib": mib(*b)}))
            .collect();
        let by_name: serde_json::Map<String, Value> =
            space.by_name.iter().map(|(n, b)| (n.clone(), json!(mib(*b)))).collect();
        let details = json!({
            "updates": updates, "devices": DEVICES, "entities": ENTITIES, "batch": BATCH, "rate": rate,
            "seconds": took.as_secs_f64(), "updates_per_sec": updates as f64 / took.as_secs_f64(),
            "peak_mib": mib(peak), "end_mib": mib(end), "samples": shape,
            "at_the_end": {"mib_by_table": by_name, "free_mib": mib(space.free),
                "log_rows": space.changes, "receipts": space.receipts},
        });
        figures.push(Figure::new(format!("database file peak, {what}"), mib(peak), "MiB", None, details.clone()));
        figures.push(Figure::new(format!("database file at the end, {what}"), mib(end), "MiB", None, details.clone()));
        figures.push(Figure::new(
            format!("receipts at the end, {what}"),
            (space.bytes("receipts") + space.bytes("pending_receipts")) as f64 / space.receipts.max(1) as f64,
            "bytes per change",
            None,
            details,
        ));
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
