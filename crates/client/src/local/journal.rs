//! The journal: this device's own changes that the server acknowledged and
//! that left the outbox, kept (the newest `ClientOptions::journal_limit`, and
//! none at or below the server's horizon) so that a server restored from a
//! backup can be given back the ones it lost. A heal (in the engine) puts the
//! entries the server no longer holds back into the outbox under their
//! original outbox ids and change ids. The rules are checked by the engine's
//! store conformance suite.

use deltasync_engine::Journaled;
use rusqlite::Connection;

use crate::error::{ClientError, Result};

/// Every journal entry, by seq.
pub fn journal_by_seq(conn: &Connection) -> Result<Vec<Journaled>> {
    let mut stmt = conn.prepare_cached("SELECT id, change, seq FROM journal ORDER BY seq, id")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, u64>(2)?)))?;
    let rows = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(id, change, seq)| {
            let change = serde_json::from_str(&change)
                .map_err(|e| ClientError::LocalCorrupt(format!("journal change {id}: {e}")))?;
            Ok(Journaled { id, change, seq })
        })
        .collect()
}

/// How many entries the journal holds.
pub fn journal_len(conn: &Connection) -> Result<u64> {
    Ok(conn.query_row("SELECT COUNT(*) FROM journal", [], |r| r.get(0))?)
}

/// Drops the entries at or below the server's `horizon`, then all but the
/// newest `limit` (newest by outbox id: the order the changes were made in).
/// Returns how many were dropped.
pub fn trim_journal(conn: &Connection, limit: u64, horizon: u64) -> Result<u64> {
    let mut dropped = 0;
    if horizon > 0 {
        dropped += conn.prepare_cached("DELETE FROM journal WHERE seq <= ?1")?.execute([horizon])?;
    }
    dropped += conn
        .prepare_cached("DELETE FROM journal WHERE id <= (SELECT id FROM journal ORDER BY id DESC LIMIT 1 OFFSET ?1)")?
        .execute([limit.min(i64::MAX as u64)])?;
    Ok(dropped as u64)
}

/// Moves journal entry `id` back into the outbox as pending and requeued,
/// under its original outbox id (so it keeps its place ahead of newer changes
/// of the same entity).
pub fn journal_to_outbox(conn: &Connection, id: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO outbox (id, change_id, collection, entity_id, change, status, created_at, requeued)
         SELECT id, change_id, collection, entity_id, change, 'pending', created_at, 1 FROM journal WHERE id = ?1",
    )?
    .execute([id])?;
    conn.prepare_cached("DELETE FROM journal WHERE id = ?1")?.execute([id])?;
    Ok(())
}
