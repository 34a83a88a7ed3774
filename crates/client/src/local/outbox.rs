//! The outbox: local changes not yet in the confirmed state, in the order
//! they were made, with where each stands (pending, sent, failed).

use deltasync_protocol::{Change, Collection, Conflict, EntityId};
use rusqlite::{Connection, params};

use crate::error::{ClientError, Result};

/// Where an outbox change stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxStatus {
    /// Not yet acknowledged by the server.
    Pending,
    /// Acknowledged with a seq, not yet in the confirmed state.
    Sent,
    /// Refused for good; kept for the app to show, no longer applied to reads.
    Failed,
}

impl OutboxStatus {
    /// The status as stored and exported.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::Pending => "pending",
            OutboxStatus::Sent => "sent",
            OutboxStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "pending" => Ok(OutboxStatus::Pending),
            "sent" => Ok(OutboxStatus::Sent),
            "failed" => Ok(OutboxStatus::Failed),
            other => Err(ClientError::LocalCorrupt(format!("outbox status {other:?}"))),
        }
    }
}

/// One local change in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    /// Its position in the outbox (the order changes were made in).
    pub id: i64,
    /// The change.
    pub change: Change,
    /// Where it stands.
    pub status: OutboxStatus,
    /// The seq the server gave it, once acknowledged.
    pub seq: Option<u64>,
    /// How many times the server refused it.
    pub retries: u32,
    /// Not to be sent before this time (ms since the epoch) by background syncs.
    pub next_attempt_at: u64,
    /// The last refusal's message.
    pub last_error: Option<String>,
    /// The server's conflict, for a change refused for good.
    pub conflict: Option<Conflict>,
    /// When the change was made.
    pub created_at: u64,
    /// Whether a heal put it back from the journal: the server acknowledged it
    /// once, but the server it syncs with now may have lost it.
    pub requeued: bool,
}

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
        status: OutboxStatus::parse(&status)?,
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

/// Whether a change of the same entity made after `entry` is still unacknowledged.
pub fn has_pending_after(conn: &Connection, entry: &OutboxEntry) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM outbox WHERE collection = ?1 AND entity_id = ?2 AND id > ?3
             AND status = 'pending')",
        )?
        .query_row(params![entry.change.collection.as_str(), entry.change.entity_id.as_str(), entry.id], |r| {
            r.get(0)
        })?)
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
