//! The device's local SQLite database: the server-confirmed state, the outbox
//! of pending changes, and the sync state.
//!
//! Every function takes a connection or transaction the caller holds, so a
//! caller composes several of them into one transaction: a local write, or a
//! page of the log applied with its cursor and hashes, is all or nothing.

use std::path::Path;

use deltasync_protocol::wire::Policies;
use deltasync_protocol::{Change, Collection, Conflict, DeviceId, EntityId, EntityState, Hlc, StateDigest, StateHash};
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{ClientError, Result};

/// The newest local schema this build knows.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA_V1: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- The server-confirmed state: the log applied up to the cursor.
CREATE TABLE entities (
    collection  TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    state       TEXT NOT NULL,      -- EntityState as JSON, meta included
    entity_hash BLOB,               -- its digest contribution; NULL when deleted
    PRIMARY KEY (collection, entity_id)
) WITHOUT ROWID;

-- Logged appends (opaque data, e.g. CRDT operations), in seq order.
CREATE TABLE appends (
    seq    INTEGER PRIMARY KEY,
    change TEXT NOT NULL
);

-- Local changes not yet in the confirmed state, in the order they were made.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    change_id       TEXT NOT NULL UNIQUE,
    collection      TEXT NOT NULL,
    entity_id       TEXT NOT NULL,
    change          TEXT NOT NULL,  -- the Change as JSON
    status          TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
    seq             INTEGER,        -- the seq the server gave it (status sent)
    retries         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    conflict        TEXT,           -- the server's conflict, as JSON
    created_at      INTEGER NOT NULL
);
CREATE INDEX outbox_by_entity ON outbox (collection, entity_id, id);
";

/// Opens (creating if needed) the local database at `path` and brings its schema up to date.
pub fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(ClientError::SchemaTooNew { found: version, known: SCHEMA_VERSION });
    }
    if version < 1 {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(SCHEMA_V1)?;
        tx.pragma_update(None, "user_version", 1)?;
        tx.commit()?;
    }
    Ok(conn)
}

/// Reads one `meta` value.
pub fn meta(conn: &Connection, key: &str) -> Result<Option<String>> {
    Ok(conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?)
}

/// Writes one `meta` value.
pub fn set_meta(conn: &Connection, key: &str, value: &str) -> Result<()> {
    conn.prepare_cached("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2")?
        .execute([key, value])?;
    Ok(())
}

fn parse_meta<T: std::str::FromStr>(conn: &Connection, key: &str) -> Result<Option<T>> {
    match meta(conn, key)? {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| ClientError::LocalCorrupt(format!("meta {key} holds {s:?}"))),
    }
}

/// What the device knows about its place in the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncState {
    /// The device id, made once and kept.
    pub device_id: DeviceId,
    /// The server's base URL, once known.
    pub server_url: Option<String>,
    /// The seq the confirmed state stands at.
    pub cursor: u64,
    /// The chain head at `cursor`.
    pub state_hash: StateHash,
    /// The digest of the confirmed state.
    pub state_digest: StateDigest,
    /// When the last sync finished, ms since the epoch.
    pub last_sync_at: Option<u64>,
    /// The policies learned from the server.
    pub policies: Option<Policies>,
}

/// Reads the sync state, making the device id on first use.
pub fn sync_state(conn: &Connection) -> Result<SyncState> {
    let device_id = match meta(conn, "device_id")? {
        Some(id) => DeviceId::parse(id).map_err(|e| ClientError::LocalCorrupt(format!("device id: {e}")))?,
        None => {
            let simple = uuid::Uuid::now_v7().simple().to_string();
            let id = DeviceId::parse(format!("dev-{}", &simple[simple.len() - 12..])).expect("valid device id");
            set_meta(conn, "device_id", id.as_str())?;
            id
        }
    };
    let policies = policies(conn)?;
    Ok(SyncState {
        device_id,
        server_url: meta(conn, "server_url")?,
        cursor: parse_meta(conn, "cursor")?.unwrap_or(0),
        state_hash: parse_meta(conn, "state_hash")?.unwrap_or(StateHash::ZERO),
        state_digest: parse_meta(conn, "state_digest")?.unwrap_or(StateDigest::ZERO),
        last_sync_at: parse_meta(conn, "last_sync_at")?,
        policies,
    })
}

/// Records where the confirmed state stands.
pub fn set_position(conn: &Connection, cursor: u64, hash: &StateHash, digest: &StateDigest) -> Result<()> {
    set_meta(conn, "cursor", &cursor.to_string())?;
    set_meta(conn, "state_hash", &hash.to_hex())?;
    set_meta(conn, "state_digest", &digest.to_hex())?;
    Ok(())
}

/// The policies learned from the server, if any yet.
pub fn policies(conn: &Connection) -> Result<Option<Policies>> {
    meta(conn, "policies")?
        .map(|s| serde_json::from_str(&s).map_err(|e| ClientError::LocalCorrupt(format!("policies: {e}"))))
        .transpose()
}

/// Records the policies learned from the server.
pub fn set_policies(conn: &Connection, policies: &Policies) -> Result<()> {
    set_meta(conn, "policies", &serde_json::to_string(policies).expect("policies serialise"))
}

/// The last HLC this device issued, to resume its clock.
pub fn clock(conn: &Connection) -> Result<Option<Hlc>> {
    meta(conn, "clock")?
        .map(|s| Hlc::parse(s).map_err(|e| ClientError::LocalCorrupt(format!("clock: {e}"))))
        .transpose()
}

/// A confirmed entity with its stored digest contribution.
pub struct Confirmed {
    /// The entity's state.
    pub state: EntityState,
    /// Its digest contribution (`None` when deleted).
    pub hash: Option<[u8; 32]>,
}

fn read_confirmed(state: String, hash: Option<Vec<u8>>) -> Result<Confirmed> {
    let state: EntityState =
        serde_json::from_str(&state).map_err(|e| ClientError::LocalCorrupt(format!("entity state: {e}")))?;
    let hash = match hash {
        None => None,
        Some(b) => Some(b.try_into().map_err(|_| ClientError::LocalCorrupt("entity hash is not 32 bytes".into()))?),
    };
    Ok(Confirmed { state, hash })
}

/// The confirmed state of one entity.
pub fn confirmed(conn: &Connection, collection: &str, entity_id: &str) -> Result<Option<Confirmed>> {
    let row = conn
        .prepare_cached("SELECT state, entity_hash FROM entities WHERE collection = ?1 AND entity_id = ?2")?
        .query_row([collection, entity_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    row.map(|(s, h)| read_confirmed(s, h)).transpose()
}

/// Every confirmed entity of a collection.
pub fn confirmed_in(conn: &Connection, collection: &str) -> Result<Vec<EntityState>> {
    let mut stmt = conn.prepare_cached("SELECT state FROM entities WHERE collection = ?1")?;
    let rows = stmt.query_map([collection], |r| r.get::<_, String>(0))?;
    rows.map(|s| read_confirmed(s?, None).map(|c| c.state)).collect()
}

/// Replaces an entity's confirmed state.
pub fn put_confirmed(conn: &Connection, state: &EntityState, hash: Option<&[u8; 32]>) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO entities (collection, entity_id, state, entity_hash) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (collection, entity_id) DO UPDATE SET state = ?3, entity_hash = ?4",
    )?
    .execute(params![
        state.collection.as_str(),
        state.entity_id.as_str(),
        serde_json::to_string(state).expect("entity state serialises"),
        hash.map(|h| h.as_slice()),
    ])?;
    Ok(())
}

/// Records a logged `append`.
pub fn put_append(conn: &Connection, seq: u64, change_json: &str) -> Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO appends (seq, change) VALUES (?1, ?2)")?
        .execute(params![seq, change_json])?;
    Ok(())
}

/// Forgets the whole confirmed state (before a bootstrap replaces it).
pub fn clear_confirmed(conn: &Connection) -> Result<()> {
    conn.execute_batch("DELETE FROM entities; DELETE FROM appends;")?;
    Ok(())
}

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
}

const OUTBOX_COLUMNS: &str =
    "id, change, status, seq, retries, next_attempt_at, last_error, conflict, created_at FROM outbox";

fn read_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawEntry> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?))
}

type RawEntry = (i64, String, String, Option<u64>, u32, u64, Option<String>, Option<String>, u64);

fn decode_entry(raw: RawEntry) -> Result<OutboxEntry> {
    let (id, change, status, seq, retries, next_attempt_at, last_error, conflict, created_at) = raw;
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

/// Drops the entry with this change id, if any (it is now in the confirmed state).
/// Returns whether there was one.
pub fn confirm(conn: &Connection, change_id: &str) -> Result<bool> {
    Ok(conn.prepare_cached("DELETE FROM outbox WHERE change_id = ?1 AND status <> 'failed'")?.execute([change_id])? > 0)
}

/// Drops acknowledged entries whose seq the confirmed state already covers.
pub fn confirm_up_to(conn: &Connection, cursor: u64) -> Result<()> {
    conn.prepare_cached("DELETE FROM outbox WHERE status = 'sent' AND seq <= ?1")?.execute([cursor])?;
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
