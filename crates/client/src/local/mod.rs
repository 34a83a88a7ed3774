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

/// Empties the staging area of a bootstrap: two tables of the connection's
/// temporary database (shaped as `entities` and `appends`), made on first
/// use. They need not survive the connection: a bootstrap that did not finish
/// starts over.
pub fn clear_staged(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS staged_entities (
             collection TEXT NOT NULL, entity_id TEXT NOT NULL, state TEXT NOT NULL, entity_hash BLOB,
             PRIMARY KEY (collection, entity_id)) WITHOUT ROWID;
         CREATE TEMP TABLE IF NOT EXISTS staged_appends (seq INTEGER PRIMARY KEY, change TEXT NOT NULL);
         DELETE FROM temp.staged_entities; DELETE FROM temp.staged_appends;",
    )?;
    Ok(())
}

/// Stages one entity of a bootstrap's snapshot.
pub fn stage_entity(conn: &Connection, state: &EntityState, hash: Option<&[u8; 32]>) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO temp.staged_entities (collection, entity_id, state, entity_hash) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        state.collection.as_str(),
        state.entity_id.as_str(),
        serde_json::to_string(state).expect("entity state serialises"),
        hash.map(|h| h.as_slice()),
    ])?;
    Ok(())
}

/// Stages one logged `append` of a bootstrap's snapshot.
pub fn stage_append(conn: &Connection, seq: u64, change_json: &str) -> Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO temp.staged_appends (seq, change) VALUES (?1, ?2)")?
        .execute(params![seq, change_json])?;
    Ok(())
}

/// Makes the staged snapshot the confirmed state and empties the staging area.
pub fn adopt_staged(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "DELETE FROM entities; DELETE FROM appends;
         INSERT INTO entities (collection, entity_id, state, entity_hash)
             SELECT collection, entity_id, state, entity_hash FROM temp.staged_entities;
         INSERT INTO appends (seq, change) SELECT seq, change FROM temp.staged_appends;
         DELETE FROM temp.staged_entities; DELETE FROM temp.staged_appends;",
    )?;
    Ok(())
}

/// Forgets the whole replica but the meta values named in `keep`.
pub fn clear_all(conn: &Connection, keep: &[&str]) -> Result<()> {
    conn.execute_batch("DELETE FROM entities; DELETE FROM appends; DELETE FROM outbox; DELETE FROM journal;")?;
    let keys: Vec<String> =
        conn.prepare("SELECT key FROM meta")?.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    for key in keys.iter().filter(|k| !keep.contains(&k.as_str())) {
        remove_meta(conn, key)?;
    }
    Ok(())
}
