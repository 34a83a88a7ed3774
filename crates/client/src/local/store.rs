//! The SQLite database as the engine's [`LocalStore`]: one connection, lent
//! to one transaction at a time (`BEGIN IMMEDIATE` for writes, so that two
//! processes on one file take turns too), rolled back unless committed.
//!
//! Its operations never wait on anything but SQLite itself, so the futures
//! the engine builds on it finish in one poll: the client's synchronous API
//! (`get`, `put`, …) drives them with [`run_now`].

use std::future::Future;

use deltasync_engine::slot::Slot;
use deltasync_engine::{Access, Confirmed, Journaled, LocalStore, OutboxEntry, StoreTx};
use deltasync_protocol::{Change, Collection, Conflict, EntityId, EntityState};
use futures_util::FutureExt;
use rusqlite::Connection;

use crate::error::ClientError;

type EngineResult<T> = deltasync_engine::Result<T>;

/// The local database, as a store.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Slot<Connection>,
}

impl SqliteStore {
    /// The store on an open (and migrated) connection: see [`super::open`].
    pub fn new(conn: Connection) -> Self {
        SqliteStore { conn: Slot::new(conn) }
    }
}

/// Drives a future on the SQLite store to its end at once.
pub fn run_now<F: Future>(f: F) -> F::Output {
    f.now_or_never().expect("operations on the SQLite store never wait for anything else")
}

/// A transaction on the local database.
pub struct SqliteTx<'a> {
    store: &'a SqliteStore,
    conn: Option<Connection>,
    /// Committed without waiting for the disk ([`Access::Refetchable`]).
    relaxed: bool,
}

/// A refetchable transaction commits with `synchronous = NORMAL`: in WAL mode
/// its commit is not synced, so a crash of the machine may undo it, whole
/// (WAL frames are checksummed), and the next synced commit makes it durable
/// with everything before it. Every other transaction syncs.
const RELAXED_BEGIN: &str = "PRAGMA synchronous = NORMAL; BEGIN IMMEDIATE";
const SYNCED_AGAIN: &str = "PRAGMA synchronous = FULL";

fn engine_error(e: ClientError) -> deltasync_engine::Error {
    match e {
        ClientError::LocalCorrupt(m) => deltasync_engine::Error::LocalCorrupt(m),
        e => deltasync_engine::Error::store(e),
    }
}

impl LocalStore for SqliteStore {
    type Tx<'a> = SqliteTx<'a>;

    async fn begin(&self, access: Access) -> EngineResult<SqliteTx<'_>> {
        let conn = self.conn.take();
        let begin = match access {
            Access::Read => "BEGIN",
            Access::Write => "BEGIN IMMEDIATE",
            Access::Refetchable => RELAXED_BEGIN,
        };
        let relaxed = access == Access::Refetchable;
        if let Err(e) = conn.execute_batch(begin) {
            if relaxed {
                let _ = conn.execute_batch(SYNCED_AGAIN);
            }
            self.conn.give_back(conn);
            return Err(engine_error(e.into()));
        }
        Ok(SqliteTx { store: self, conn: Some(conn), relaxed })
    }
}

impl Drop for SqliteTx<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            if self.relaxed {
                let _ = conn.execute_batch(SYNCED_AGAIN);
            }
            self.store.conn.give_back(conn);
        }
    }
}

impl SqliteTx<'_> {
    /// Runs one of the local database's functions on this transaction.
    fn with<T>(&self, f: impl FnOnce(&Connection) -> crate::Result<T>) -> EngineResult<T> {
        f(self.conn.as_ref().expect("an open transaction has its connection")).map_err(engine_error)
    }
}

impl StoreTx for SqliteTx<'_> {
    async fn commit(self) -> EngineResult<()> {
        // Dropping the transaction then syncs again the commits that follow.
        self.with(|c| Ok(c.execute_batch("COMMIT")?))
    }

    async fn meta(&mut self, key: &str) -> EngineResult<Option<String>> {
        self.with(|c| super::meta(c, key))
    }

    async fn set_meta(&mut self, key: &str, value: &str) -> EngineResult<()> {
        self.with(|c| super::set_meta(c, key, value))
    }

    async fn remove_meta(&mut self, key: &str) -> EngineResult<()> {
        self.with(|c| super::remove_meta(c, key))
    }

    async fn confirmed(&mut self, collection: &str, entity_id: &str) -> EngineResult<Option<Confirmed>> {
        self.with(|c| super::confirmed(c, collection, entity_id))
    }

    async fn confirmed_in(&mut self, collection: &str) -> EngineResult<Vec<EntityState>> {
        self.with(|c| super::confirmed_in(c, collection))
    }

    async fn put_confirmed(&mut self, state: &EntityState, hash: Option<&[u8; 32]>) -> EngineResult<()> {
        self.with(|c| super::put_confirmed(c, state, hash))
    }

    async fn put_append(&mut self, seq: u64, change_json: &str) -> EngineResult<()> {
        self.with(|c| super::put_append(c, seq, change_json))
    }

    async fn clear_staged(&mut self) -> EngineResult<()> {
        self.with(super::clear_staged)
    }

    async fn stage_entity(&mut self, state: &EntityState, json: &str, hash: Option<&[u8; 32]>) -> EngineResult<()> {
        self.with(|c| super::stage_entity(c, state, json, hash))
    }

    async fn stage_append(&mut self, seq: u64, change_json: &str) -> EngineResult<()> {
        self.with(|c| super::stage_append(c, seq, change_json))
    }

    async fn adopt_staged(&mut self) -> EngineResult<()> {
        self.with(super::adopt_staged)
    }

    async fn push_outbox(&mut self, change: &Change, now: u64) -> EngineResult<()> {
        self.with(|c| super::push_outbox(c, change, now))
    }

    async fn active_for_entity(
        &mut self,
        collection: &Collection,
        entity_id: &EntityId,
    ) -> EngineResult<Vec<OutboxEntry>> {
        self.with(|c| super::active_for_entity(c, collection, entity_id))
    }

    async fn active_in(&mut self, collection: &str) -> EngineResult<Vec<OutboxEntry>> {
        self.with(|c| super::active_in(c, collection))
    }

    async fn all_entries(&mut self) -> EngineResult<Vec<OutboxEntry>> {
        self.with(super::all_entries)
    }

    async fn pending_after(&mut self, after: i64, limit: u32) -> EngineResult<Vec<OutboxEntry>> {
        self.with(|c| super::pending_entries_after(c, after, limit))
    }

    async fn has_pending_after(
        &mut self,
        collection: &Collection,
        entity_id: &EntityId,
        id: i64,
    ) -> EngineResult<bool> {
        self.with(|c| super::has_pending_after(c, collection, entity_id, id))
    }

    async fn outbox_counts(&mut self) -> EngineResult<(u64, u64)> {
        self.with(super::outbox_counts)
    }

    async fn mark_sent(&mut self, id: i64, seq: u64) -> EngineResult<()> {
        self.with(|c| super::mark_sent(c, id, seq))
    }

    async fn mark_failed(&mut self, id: i64, message: &str, conflict: Option<&Conflict>) -> EngineResult<()> {
        self.with(|c| super::mark_failed(c, id, message, conflict))
    }

    async fn mark_retry(&mut self, id: i64, retries: u32, next_attempt_at: u64, message: &str) -> EngineResult<()> {
        self.with(|c| super::mark_retry(c, id, retries, next_attempt_at, message))
    }

    async fn replace_change(&mut self, id: i64, change: &Change) -> EngineResult<()> {
        self.with(|c| super::replace_change(c, id, change))
    }

    async fn reset_retries(&mut self) -> EngineResult<()> {
        self.with(super::reset_retries)
    }

    async fn requeue_failed(&mut self) -> EngineResult<u64> {
        self.with(super::requeue_failed)
    }

    async fn discard_failed(&mut self) -> EngineResult<u64> {
        self.with(super::discard_failed)
    }

    async fn unsend_above(&mut self, cursor: u64) -> EngineResult<u64> {
        self.with(|c| super::unsend_above(c, cursor))
    }

    async fn confirm(&mut self, change_id: &str, seq: u64) -> EngineResult<bool> {
        self.with(|c| super::confirm(c, change_id, seq))
    }

    async fn confirm_up_to(&mut self, cursor: u64) -> EngineResult<()> {
        self.with(|c| super::confirm_up_to(c, cursor))
    }

    async fn journal_by_seq(&mut self) -> EngineResult<Vec<Journaled>> {
        self.with(super::journal_by_seq)
    }

    async fn journal_len(&mut self) -> EngineResult<u64> {
        self.with(super::journal_len)
    }

    async fn trim_journal(&mut self, limit: u64, horizon: u64) -> EngineResult<u64> {
        self.with(|c| super::trim_journal(c, limit, horizon))
    }

    async fn journal_to_outbox(&mut self, id: i64) -> EngineResult<()> {
        self.with(|c| super::journal_to_outbox(c, id))
    }

    async fn clear_all(&mut self, keep: &[&str]) -> EngineResult<()> {
        self.with(|c| super::clear_all(c, keep))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn the_sqlite_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let n = AtomicU32::new(0);
        let fresh = || {
            let path = dir.path().join(format!("replica-{}.db", n.fetch_add(1, Ordering::SeqCst)));
            SqliteStore::new(super::super::open(&path).unwrap())
        };
        run_now(deltasync_engine::conformance::run(fresh));
    }
}
