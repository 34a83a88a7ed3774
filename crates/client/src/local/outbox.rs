//! The outbox: local changes not yet in the confirmed state, in the order
//! they were made, with where each stands (pending, sent, failed).

use deltasync_engine::{OutboxEntry, OutboxStatus};
use deltasync_protocol::{Change, Collection, Conflict, EntityId};
use rusqlite::{Connection, params};

use crate::error::{ClientError, Result};

const OUTBOX_COLUMNS: &str =
    "id, change, status, seq, retries, next_attempt_at, last_error, conflict, created_at, requeued FROM outbox";

fn read_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawEntry> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?))
}

type RawEntry = (i64, String, String, Option<u64>, u32, u64, Option<String>, Option<String>, u64, bool);

fn decode_entry(raw: RawEntry) -> Result<OutboxEntry> {
    let (id, change, status, seq, retries, next_attempt_at, last_error, conflict, created_at, requeued) = raw;
    let change = serde_json::from_str(&change).map_err(|e| ClientError::LocalCorrupt(format!("outbox change: {e}")))?;
    let conflict = conflict
        .map(|c| serde_json::from_str(&c).map_err(|e| ClientError::LocalCorrupt(format!("outbox conflict: {e}"))))
        .transpose()?;
    Ok(OutboxEntry {
        id,
        change,
        status: OutboxStatus::parse(&status).map_err(|e| ClientError::LocalCorrupt(e.to_string()))?,
        seq,
        retries,
        next_attempt_at,
        last_error,
        conflict,
        created_at,
        requeued,
    })
}

fn query_entries(conn: &Connection, where_clause: &str, args: impl rusqlite::Params) -> Result<Vec<OutboxEntry>> {
    let order = if where_clause.contains("ORDER BY") { "" } else { " ORDER BY id" };
    let sql = format!("SELECT {OUTBOX_COLUMNS} WHERE {where_clause}{order}");
    let mut stmt = conn.prepare_cached(&sql)?;
    let raws = stmt.query_map(args, read_entry)?.collect::<rusqlite::Result<Vec<_>>>()?;
    raws.into_iter().map(decode_entry).collect()
}

/// Adds a change to the outbox.
pub fn push_outbox(conn: &Connection, change: &Change, now: u64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO outbox (change_id, collection, entity_id, change, status, created_at)
         VALUES (?1, ?2, ?3, ?4, 'pending', ?5)",
    )?
    .execute(params![
        change.change_id.as_str(),
        change.collection.as_str(),
        change.entity_id.as_str(),
        serde_json::to_string(change).expect("change serialises"),
        now,
    ])?;
    Ok(())
}

/// The changes still applied to reads (pending and sent) of one entity, in order.
pub fn active_for_entity(conn: &Connection, collection: &Collection, entity_id: &EntityId) -> Result<Vec<OutboxEntry>> {
    query_entries(
        conn,
        "collection = ?1 AND entity_id = ?2 AND status <> 'failed'",
        [collection.as_str(), entity_id.as_str()],
    )
}

/// The changes still applied to reads (pending and sent) of one collection, in order.
pub fn active_in(conn: &Connection, collection: &str) -> Result<Vec<OutboxEntry>> {
    query_entries(conn, "collection = ?1 AND status <> 'failed'", [collection])
}

/// Every outbox entry, in order.
pub fn all_entries(conn: &Connection) -> Result<Vec<OutboxEntry>> {
    query_entries(conn, "1", [])
}

/// Up to `limit` entries not yet acknowledged whose id is above `after`, in order.
pub fn pending_entries_after(conn: &Connection, after: i64, limit: u32) -> Result<Vec<OutboxEntry>> {
    query_entries(conn, "status = 'pending' AND id > ?1 ORDER BY id LIMIT ?2", params![after, limit])
}

/// Whether a change of the entity made after outbox entry `id` is still unacknowledged.
pub fn has_pending_after(conn: &Connection, collection: &Collection, entity_id: &EntityId, id: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM outbox WHERE collection = ?1 AND entity_id = ?2 AND id > ?3
             AND status = 'pending')",
        )?
        .query_row(params![collection.as_str(), entity_id.as_str(), id], |r| r.get(0))?)
}

/// Counts of pending (pending and sent) and failed entries.
pub fn outbox_counts(conn: &Connection) -> Result<(u64, u64)> {
    Ok(conn.query_row(
        "SELECT COALESCE(SUM(status <> 'failed'), 0), COALESCE(SUM(status = 'failed'), 0) FROM outbox",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)
}

/// Marks an entry acknowledged at `seq`.
pub fn mark_sent(conn: &Connection, id: i64, seq: u64) -> Result<()> {
    conn.prepare_cached("UPDATE outbox SET status = 'sent', seq = ?2, last_error = NULL WHERE id = ?1")?
        .execute(params![id, seq])?;
    Ok(())
}

/// Marks an entry refused for good.
pub fn mark_failed(conn: &Connection, id: i64, message: &str, conflict: Option<&Conflict>) -> Result<()> {
    let conflict = conflict.map(|c| serde_json::to_string(c).expect("conflict serialises"));
    conn.prepare_cached("UPDATE outbox SET status = 'failed', last_error = ?2, conflict = ?3 WHERE id = ?1")?
        .execute(params![id, message, conflict])?;
    Ok(())
}

/// Records a refusal that will be retried after `next_attempt_at`.
pub fn mark_retry(conn: &Connection, id: i64, retries: u32, next_attempt_at: u64, message: &str) -> Result<()> {
    conn.prepare_cached("UPDATE outbox SET retries = ?2, next_attempt_at = ?3, last_error = ?4 WHERE id = ?1")?
        .execute(params![id, retries, next_attempt_at, message])?;
    Ok(())
}

/// Replaces an entry's change (a re-stamped HLC, or a rebased `base_version`).
pub fn replace_change(conn: &Connection, id: i64, change: &Change) -> Result<()> {
    conn.prepare_cached("UPDATE outbox SET change = ?2 WHERE id = ?1")?
        .execute(params![id, serde_json::to_string(change).expect("change serialises")])?;
    Ok(())
}

/// Moves the entry with this change id, if any, from the outbox to the
/// journal: the change is in the server's log at `seq`. Returns whether there
/// was one.
pub fn confirm(conn: &Connection, change_id: &str, seq: u64) -> Result<bool> {
    let moved = conn
        .prepare_cached(
            "INSERT OR REPLACE INTO journal (id, change_id, collection, entity_id, change, seq, created_at)
             SELECT id, change_id, collection, entity_id, change, ?2, created_at FROM outbox
             WHERE change_id = ?1 AND status <> 'failed'",
        )?
        .execute(params![change_id, seq])?;
    if moved > 0 {
        conn.prepare_cached("DELETE FROM outbox WHERE change_id = ?1")?.execute([change_id])?;
    }
    Ok(moved > 0)
}

/// Moves the acknowledged entries whose seq the confirmed state already covers
/// to the journal.
pub fn confirm_up_to(conn: &Connection, cursor: u64) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO journal (id, change_id, collection, entity_id, change, seq, created_at)
         SELECT id, change_id, collection, entity_id, change, seq, created_at FROM outbox
         WHERE status = 'sent' AND seq <= ?1",
    )?
    .execute([cursor])?;
    conn.prepare_cached("DELETE FROM outbox WHERE status = 'sent' AND seq <= ?1")?.execute([cursor])?;
    Ok(())
}

/// After a bootstrap at `cursor`: acknowledged entries above it were given
/// seqs the server no longer has (it was restored from a backup), so they go
/// back to pending, marked as requeued. Returns how many.
pub fn unsend_above(conn: &Connection, cursor: u64) -> Result<u64> {
    Ok(conn
        .prepare_cached(
            "UPDATE outbox SET status = 'pending', seq = NULL, requeued = 1, next_attempt_at = 0
             WHERE status = 'sent' AND seq > ?1",
        )?
        .execute([cursor])? as u64)
}

/// Sets the retry count and the next attempt of every pending entry to 0 (a
/// sync the user asked for).
pub fn reset_retries(conn: &Connection) -> Result<()> {
    conn.prepare_cached(
        "UPDATE outbox SET retries = 0, next_attempt_at = 0 WHERE status = 'pending' AND (retries > 0 OR next_attempt_at > 0)",
    )?
    .execute([])?;
    Ok(())
}

/// Sends failed entries back to pending, with their retry count reset.
pub fn requeue_failed(conn: &Connection) -> Result<u64> {
    Ok(conn.execute(
        "UPDATE outbox SET status = 'pending', retries = 0, next_attempt_at = 0, conflict = NULL WHERE status = 'failed'",
        [],
    )? as u64)
}

/// Forgets failed entries. Returns how many there were.
pub fn discard_failed(conn: &Connection) -> Result<u64> {
    Ok(conn.execute("DELETE FROM outbox WHERE status = 'failed'", [])? as u64)
}
