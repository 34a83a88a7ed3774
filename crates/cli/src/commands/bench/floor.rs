//! The SQLite floor (`--workloads sqlite-floor`): the rows one push writes,
//! inserted straight into a fresh database with the server's own schema and
//! settings, with no server, no HTTP, no JSON and no merge. It says how fast
//! SQLite itself takes those rows on this machine, so that the push figures
//! can be read against it (docs/benchmarks.md).
//!
//! Each batch is one transaction, committed as the server's group commit
//! commits (WAL, `synchronous = FULL`): a row in `changes`, one in
//! `pending_entities` and one in `pending_receipts` per change, and the
//! dataset's row; and, as the server's writer does, a fold of the pending
//! rows into `entities` and `receipts` in a transaction of its own every
//! [`FOLD_ROWS`] of them, in key order. The server's writer sorts the rows
//! in its index in memory; here SQLite sorts them ([`fold`]): the same rows
//! in the same order. The ids are those of `--ids`, the data that of the
//! push workload.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use rusqlite::params;
use serde_json::json;

use deltasync_server::store::core::pending::FOLD_ROWS;

use super::Figure;
use super::workloads::{Ids, bar, entity_data};

/// The bytes this process has sent to storage so far (Linux), to count what
/// the inserts write, WAL and checkpoints included.
fn written_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines().find_map(|l| l.strip_prefix("write_bytes: ")).and_then(|v| v.trim().parse().ok())
}

/// Writes every pending row into `entities` and `receipts` in key order
/// (newest state last, so that it wins) and empties the pending tables.
fn fold(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "INSERT OR REPLACE INTO entities (user_id, collection, entity_id, data, version, deleted, meta, entity_hash)
           SELECT user_id, collection, entity_id, data, version, deleted, meta, entity_hash FROM pending_entities
           ORDER BY user_id, collection, entity_id, id;
         INSERT INTO receipts (user_id, change_id, seq)
           SELECT user_id, change_id, seq FROM pending_receipts ORDER BY user_id, change_id;
         DELETE FROM pending_entities; DELETE FROM pending_receipts;",
    )
}

/// Inserts `count` changes to new entities in batches of `batch` into a
/// fresh database under `dir`; returns the figure.
pub fn sqlite_floor(dir: &Path, count: usize, batch: usize, ids: Ids) -> anyhow::Result<Figure> {
    let path = dir.join("floor.db");
    deltasync_server::store::sqlite::SqliteStore::migrate(&path)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
    let mut conn = rusqlite::Connection::open(&path).context("opening the floor database")?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    let (user, device, run) = ("bench-floor", "bench-floor-device", 0);
    let hash = [7u8; 32];
    let progress = bar(count as u64, &format!("SQLite floor, {} ids", ids.as_str()));
    let written = written_bytes();
    let started = Instant::now();
    let mut seq = 0u64;
    // Pending rows since the last fold, and the seq they were counted to.
    let (mut pending, mut pending_from) = (0usize, 0usize);
    for start in (0..count).step_by(batch.max(1)) {
        let tx = conn.transaction()?;
        {
            let mut change = tx.prepare_cached(
                "INSERT INTO changes (user_id, seq, change_id, device_id, collection, entity_id, op, data, hlc, \
                 base_version, server_time, state_hash, state_digest) \
                 VALUES (?1, ?2, ?3, ?4, 'tasks', ?5, 'upsert', ?6, ?7, 0, ?8, ?9, ?9)",
            )?;
            let mut entity = tx.prepare_cached(
                "INSERT INTO pending_entities (user_id, collection, entity_id, data, version, deleted, meta, entity_hash) \
                 VALUES (?1, 'tasks', ?2, ?3, ?4, 0, ?5, ?6)",
            )?;
            let mut receipt =
                tx.prepare_cached("INSERT INTO pending_receipts (user_id, change_id, seq) VALUES (?1, ?2, ?3)")?;
            for i in start..(start + batch).min(count) {
                seq += 1;
                let (change_id, entity_id, data) = (ids.change(device, run, i), ids.entity(run, i), entity_data(i));
                let hlc = format!("{:013}-{:05}-{device}", 1_765_000_000_000u64 + seq / 100, seq % 100);
                let meta = format!(r#"{{"u":"{hlc}"}}"#);
                change.execute(params![
                    user,
                    seq as i64,
                    change_id,
                    device,
                    entity_id,
                    data,
                    hlc,
                    seq as i64,
                    &hash[..]
                ])?;
                entity.execute(params![user, entity_id, data, seq as i64, meta, &hash[..]])?;
                receipt.execute(params![user, change_id, seq as i64])?;
            }
            tx.execute(
                "INSERT INTO datasets (user_id, head, state_hash, state_digest) VALUES (?1, ?2, ?3, ?3) \
                 ON CONFLICT (user_id) DO UPDATE SET head = excluded.head, state_hash = excluded.state_hash",
                params![user, seq as i64, &hash[..]],
            )?;
        }
        tx.commit()?;
        pending += 2 * (seq as usize - pending_from);
        pending_from = seq as usize;
        if pending >= FOLD_ROWS {
            let tx = conn.transaction()?;
            fold(&tx)?;
            tx.commit()?;
            pending = 0;
        }
        progress.set_position(seq);
    }
    let seconds = started.elapsed().as_secs_f64();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    let per_change = written.zip(written_bytes()).map(|(a, b)| (b - a) as f64 / count.max(1) as f64 / 1024.0);
    progress.finish_and_clear();
    Ok(Figure::new(
        format!("SQLite floor, batches of {batch}{}", ids.suffix()),
        count as f64 / seconds,
        "changes/s",
        None,
        json!({"changes": count, "seconds": seconds, "batch": batch, "ids": ids.as_str(),
               "kib_written_per_change": per_change}),
    ))
}
