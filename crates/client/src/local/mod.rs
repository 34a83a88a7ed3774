//! The device's local SQLite database: the server-confirmed state, the outbox
//! of pending changes, the journal of acknowledged ones, and the sync state.
//!
//! # Layout
//!
//! - this module: the sync state (`meta`) and the confirmed state (`entities`, `appends`);
//! - [`schema`]: opening, creating atomically, refusing foreign files, migrating;
//! - [`outbox`]: local changes not yet in the confirmed state;
//! - [`journal`]: acknowledged changes kept for a server restored from a backup.
//!
//! Every function takes a connection or transaction the caller holds, so a
//! caller composes several of them into one transaction: a local write, or a
//! page of the log applied with its cursor and hashes, is all or nothing.

pub mod journal;
pub mod outbox;
pub mod schema;

use deltasync_protocol::wire::Policies;
use deltasync_protocol::{DeviceId, EntityState, Hlc, StateDigest, StateHash};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::error::{ClientError, Result};

pub use journal::*;
pub use outbox::*;
pub use schema::open;

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

/// The last sync error, kept in the local database until a sync succeeds, so
/// that a failure that repeats (a server answer this client cannot read, an
/// expired token) is visible instead of retried silently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncFailure {
    /// The error's code, as the command line prints it (`protocol`, `unreachable`, …).
    pub code: String,
    /// The error's message.
    pub message: String,
    /// When the first of the failed syncs in a row ended, ms since the epoch.
    pub since: u64,
    /// When the last one ended.
    pub at: u64,
    /// How many syncs in a row failed.
    pub count: u64,
}

/// The last sync error, if the last sync failed.
pub fn sync_failure(conn: &Connection) -> Result<Option<SyncFailure>> {
    meta(conn, "sync_failure")?
        .map(|s| serde_json::from_str(&s).map_err(|e| ClientError::LocalCorrupt(format!("sync_failure: {e}"))))
        .transpose()
}

/// Records a failed sync at `now`, continuing the run of failures if there is one.
pub fn record_sync_failure(conn: &Connection, code: &str, message: &str, now: u64) -> Result<SyncFailure> {
    let previous = sync_failure(conn)?;
    let failure = SyncFailure {
        code: code.to_owned(),
        message: message.to_owned(),
        since: previous.as_ref().map_or(now, |p| p.since),
        at: now,
        count: previous.map_or(0, |p| p.count) + 1,
    };
    set_meta(conn, "sync_failure", &serde_json::to_string(&failure).expect("failure serialises"))?;
    Ok(failure)
}

/// Forgets the last sync error (a sync succeeded).
pub fn clear_sync_failure(conn: &Connection) -> Result<()> {
    conn.prepare_cached("DELETE FROM meta WHERE key = 'sync_failure'")?.execute([])?;
    Ok(())
}

/// The server's horizon, as last seen in `/v1/status` (0 before).
pub fn horizon(conn: &Connection) -> Result<u64> {
    Ok(parse_meta(conn, "horizon")?.unwrap_or(0))
}

/// Records the server's horizon.
pub fn set_horizon(conn: &Connection, horizon: u64) -> Result<()> {
    set_meta(conn, "horizon", &horizon.to_string())
}
