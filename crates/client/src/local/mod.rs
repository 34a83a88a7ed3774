//! The device's local SQLite database, as the engine's [`LocalStore`]: the
//! server-confirmed state, the outbox of pending changes, the journal of
//! acknowledged ones, and the sync state (meta values the engine gives their
//! types to).
//!
//! # Layout
//!
//! - this module: meta values and the confirmed state (`entities`, `appends`);
//! - [`schema`]: opening, creating atomically, refusing foreign files, migrating;
//! - [`outbox`]: local changes not yet in the confirmed state;
//! - [`journal`]: acknowledged changes kept for a server restored from a backup;
//! - [`store`]: the engine's store interface on top of the above, one
//!   SQLite transaction per engine transaction.
//!
//! Every function takes a connection the caller holds inside a transaction,
//! so that a local write, or a page of the log applied with its cursor and
//! hashes, is all or nothing.
//!
//! [`LocalStore`]: deltasync_engine::LocalStore

pub mod journal;
pub mod outbox;
pub mod schema;
pub mod store;

use deltasync_protocol::EntityState;
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{ClientError, Result};

pub use deltasync_engine::{Confirmed, Journaled, OutboxEntry, OutboxStatus};
pub use journal::*;
pub use outbox::*;
pub use schema::open;
pub use store::{SqliteStore, SqliteTx};

/// Reads one `meta` value.
pub fn meta(conn: &Connection, key: &str) -> Result<Option<String>> {
    Ok(conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?.query_row([key], |r| r.get(0)).optional()?)
}

/// Writes one `meta` value.
pub fn set_meta(conn: &Connection, key: &str, value: &str) -> Result<()> {
    conn.prepare_cached("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2")?
        .execute([key, value])?;
    Ok(())
}

/// Removes one `meta` value.
pub fn remove_meta(conn: &Connection, key: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM meta WHERE key = ?1")?.execute([key])?;
    Ok(())
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

/// Empties the staging area of a bootstrap (`staged_entities` and
/// `staged_appends`, shaped as `entities` and `appends`). A bootstrap that did
/// not finish leaves rows there; the next one starts by clearing them.
pub fn clear_staged(conn: &Connection) -> Result<()> {
    conn.execute_batch("DELETE FROM staged_entities; DELETE FROM staged_appends;")?;
    Ok(())
}

/// Stages one entity of a bootstrap's snapshot, keeping `json` (the state as
/// the snapshot carried it) as its text.
pub fn stage_entity(conn: &Connection, state: &EntityState, json: &str, hash: Option<&[u8; 32]>) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO staged_entities (collection, entity_id, state, entity_hash) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![state.collection.as_str(), state.entity_id.as_str(), json, hash.map(|h| h.as_slice()),])?;
    Ok(())
}

/// Stages one logged `append` of a bootstrap's snapshot.
pub fn stage_append(conn: &Connection, seq: u64, change_json: &str) -> Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO staged_appends (seq, change) VALUES (?1, ?2)")?
        .execute(params![seq, change_json])?;
    Ok(())
}

/// Makes the staged snapshot the confirmed state and empties the staging
/// area: the staged tables take the confirmed tables' names, and empty
/// staged tables are made. Nothing is copied, so adopting a snapshot of a
/// million entities costs what adopting ten does (the old confirmed tables'
/// pages go to the free list, and SQLite reuses them).
pub fn adopt_staged(conn: &Connection) -> Result<()> {
    conn.execute_batch(&format!(
        "DROP TABLE entities; ALTER TABLE staged_entities RENAME TO entities;
         DROP TABLE appends; ALTER TABLE staged_appends RENAME TO appends;
         {}",
        schema::STAGED_TABLES
    ))?;
    Ok(())
}

/// Forgets the whole replica but the meta values named in `keep`.
pub fn clear_all(conn: &Connection, keep: &[&str]) -> Result<()> {
    conn.execute_batch(
        "DELETE FROM entities; DELETE FROM appends; DELETE FROM outbox; DELETE FROM journal;\n         DELETE FROM staged_entities; DELETE FROM staged_appends;",
    )?;
    let keys: Vec<String> =
        conn.prepare("SELECT key FROM meta")?.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    for key in keys.iter().filter(|k| !keep.contains(&k.as_str())) {
        remove_meta(conn, key)?;
    }
    Ok(())
}
