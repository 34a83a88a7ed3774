//! The local store: what a device keeps of its replica, behind an interface
//! any storage can implement (SQLite natively, IndexedDB in a browser, memory
//! in tests).
//!
//! A store holds four things:
//! - **meta**: string keys and values (the sync state; the engine gives them
//!   their types, see [`crate::replica`]);
//! - the **confirmed state**: each entity with its digest contribution, and
//!   the logged appends by seq;
//! - the **outbox**: local changes not yet in the confirmed state, in the
//!   order they were made (increasing ids, never reused), each `pending`,
//!   `sent` (with its seq) or `failed`;
//! - the **journal**: acknowledged changes that left the outbox, kept for a
//!   server restored from a backup.
//!
//! A bootstrap writes its snapshot to a **staging area** in short
//! transactions as it arrives, and adopts it in one transaction at the end,
//! so no transaction stays open while the network is awaited (IndexedDB
//! cannot keep one open across a `fetch`) and reads keep showing the old
//! state until the new one is whole and verified.
//!
//! Everything happens in a transaction ([`LocalStore::begin`]): a write
//! transaction's changes are all kept by [`StoreTx::commit`] or none (dropping
//! it uncommitted rolls back). Write transactions never overlap. The engine
//! never opens a transaction while it holds one, and never holds one while it
//! waits for the network. [`crate::conformance`] checks every rule here.

use deltasync_protocol::{Change, Collection, Conflict, EntityId, EntityState};

use crate::error::{Error, Result};

/// What a transaction may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only.
    Read,
    /// Reads and writes; one at a time.
    Write,
    /// As [`Access::Write`], for writing only what the server can send again
    /// (a page of the log, a bootstrap chunk): a store may commit it less
    /// durably, so that a crash of the machine may undo it, whole (never in
    /// part). The replica is then back at an older cursor and pulls again.
    Refetchable,
}

impl Access {
    /// Whether the transaction may write.
    pub fn writes(self) -> bool {
        self != Access::Read
    }
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

    /// The status stored as `s`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "pending" => Ok(OutboxStatus::Pending),
            "sent" => Ok(OutboxStatus::Sent),
            "failed" => Ok(OutboxStatus::Failed),
            other => Err(Error::LocalCorrupt(format!("outbox status {other:?}"))),
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

/// A confirmed entity with its stored digest contribution.
#[derive(Debug, Clone, PartialEq)]
pub struct Confirmed {
    /// The entity's state.
    pub state: EntityState,
    /// Its digest contribution (`None` when deleted).
    pub hash: Option<[u8; 32]>,
}

/// A journal entry: one of this device's acknowledged changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Journaled {
    /// The outbox id the change had.
    pub id: i64,
    /// The change, as last sent.
    pub change: Change,
    /// The seq the server acknowledged it at.
    pub seq: u64,
}

/// A local store. See the module's documentation for its rules.
#[allow(async_fn_in_trait)] // Send-ness follows the concrete store; the engine is generic, not boxed.
pub trait LocalStore {
    /// A transaction on this store.
    type Tx<'a>: StoreTx
    where
        Self: 'a;

    /// Begins a transaction. A write transaction waits for the one before it.
    async fn begin(&self, access: Access) -> Result<Self::Tx<'_>>;
}

/// A shared store is a store: several engines (a process's, or a browser
/// tab's) may work on one replica, as they would on one database.
impl<S: LocalStore> LocalStore for &S {
    type Tx<'a>
        = S::Tx<'a>
    where
        Self: 'a;

    async fn begin(&self, access: Access) -> Result<Self::Tx<'_>> {
        (**self).begin(access).await
    }
}

/// The operations of one transaction. Outbox lists are in outbox order
/// (increasing id) unless said otherwise.
#[allow(async_fn_in_trait)]
pub trait StoreTx {
    /// Keeps every write of this transaction.
    async fn commit(self) -> Result<()>;

    /// One meta value.
    async fn meta(&mut self, key: &str) -> Result<Option<String>>;
    /// Sets one meta value.
    async fn set_meta(&mut self, key: &str, value: &str) -> Result<()>;
    /// Removes one meta value (absent is fine).
    async fn remove_meta(&mut self, key: &str) -> Result<()>;

    /// The confirmed state of one entity.
    async fn confirmed(&mut self, collection: &str, entity_id: &str) -> Result<Option<Confirmed>>;
    /// The confirmed state of each entity of `keys` (`(collection, entity_id)`),
    /// in order. A store whose reads make a round trip (IndexedDB) sends them
    /// all before waiting for the first.
    async fn confirmed_many(&mut self, keys: &[(&str, &str)]) -> Result<Vec<Option<Confirmed>>> {
        let mut found = Vec::with_capacity(keys.len());
        for (collection, entity_id) in keys {
            found.push(self.confirmed(collection, entity_id).await?);
        }
        Ok(found)
    }
    /// Every confirmed entity of a collection, in any order.
    async fn confirmed_in(&mut self, collection: &str) -> Result<Vec<EntityState>>;
    /// Replaces an entity's confirmed state.
    async fn put_confirmed(&mut self, state: &EntityState, hash: Option<&[u8; 32]>) -> Result<()>;
    /// Records a logged `append` (the change as the wire shows it) at its seq, replacing one there.
    async fn put_append(&mut self, seq: u64, change_json: &str) -> Result<()>;
    /// Empties the staging area where a bootstrap's snapshot is written
    /// before it replaces the confirmed state. The staging area need not
    /// survive a restart (a bootstrap that did not finish starts over).
    async fn clear_staged(&mut self) -> Result<()>;
    /// Stages one entity of a snapshot (replacing one staged with the same key).
    /// `json` is `state` as the snapshot carried it (JSON that reads back as
    /// `state`), for a store that keeps text: it need not serialise it again.
    async fn stage_entity(&mut self, state: &EntityState, json: &str, hash: Option<&[u8; 32]>) -> Result<()>;
    /// Stages one logged `append` of a snapshot at its seq.
    async fn stage_append(&mut self, seq: u64, change_json: &str) -> Result<()>;
    /// Makes the staged snapshot the confirmed state (every confirmed entity
    /// and append replaced) and empties the staging area.
    async fn adopt_staged(&mut self) -> Result<()>;

    /// Adds a change to the outbox as pending, with the next id.
    async fn push_outbox(&mut self, change: &Change, now: u64) -> Result<()>;
    /// The pending and sent entries of one entity.
    async fn active_for_entity(&mut self, collection: &Collection, entity_id: &EntityId) -> Result<Vec<OutboxEntry>>;
    /// [`StoreTx::active_for_entity`] of each entity of `keys`, in order (sent at once where that helps).
    async fn active_for_entities(&mut self, keys: &[(&Collection, &EntityId)]) -> Result<Vec<Vec<OutboxEntry>>> {
        let mut found = Vec::with_capacity(keys.len());
        for (collection, entity_id) in keys {
            found.push(self.active_for_entity(collection, entity_id).await?);
        }
        Ok(found)
    }
    /// The pending and sent entries of one collection.
    async fn active_in(&mut self, collection: &str) -> Result<Vec<OutboxEntry>>;
    /// Every outbox entry.
    async fn all_entries(&mut self) -> Result<Vec<OutboxEntry>>;
    /// Up to `limit` pending entries whose id is above `after`.
    async fn pending_after(&mut self, after: i64, limit: u32) -> Result<Vec<OutboxEntry>>;
    /// Whether a pending entry of the entity has an id above `id`.
    async fn has_pending_after(&mut self, collection: &Collection, entity_id: &EntityId, id: i64) -> Result<bool>;
    /// Counts of active (pending and sent) and failed entries.
    async fn outbox_counts(&mut self) -> Result<(u64, u64)>;
    /// Marks an entry acknowledged at `seq` (and clears its last error).
    async fn mark_sent(&mut self, id: i64, seq: u64) -> Result<()>;
    /// Marks an entry refused for good.
    async fn mark_failed(&mut self, id: i64, message: &str, conflict: Option<&Conflict>) -> Result<()>;
    /// Records a refusal that will be retried after `next_attempt_at`.
    async fn mark_retry(&mut self, id: i64, retries: u32, next_attempt_at: u64, message: &str) -> Result<()>;
    /// Replaces an entry's change (a new stamp, or a rebased `base_version`).
    async fn replace_change(&mut self, id: i64, change: &Change) -> Result<()>;
    /// Sets the retry count and the next attempt time of every pending entry to 0.
    async fn reset_retries(&mut self) -> Result<()>;
    /// Failed entries back to pending, retries and conflict cleared. Returns how many.
    async fn requeue_failed(&mut self) -> Result<u64>;
    /// Forgets failed entries. Returns how many.
    async fn discard_failed(&mut self) -> Result<u64>;
    /// Acknowledged entries above `cursor` back to pending (seq cleared,
    /// marked requeued, next attempt 0). Returns how many.
    async fn unsend_above(&mut self, cursor: u64) -> Result<u64>;

    /// Moves the non-failed entry with this change id, if any, from the outbox
    /// to the journal at `seq`. Returns whether there was one.
    async fn confirm(&mut self, change_id: &str, seq: u64) -> Result<bool>;
    /// [`StoreTx::confirm`] of each `(change_id, seq)`, in order (looked up
    /// at once where that helps). Returns how many were found.
    async fn confirm_many(&mut self, confirmations: &[(&str, u64)]) -> Result<u64> {
        let mut found = 0;
        for (change_id, seq) in confirmations {
            found += u64::from(self.confirm(change_id, *seq).await?);
        }
        Ok(found)
    }
    /// Moves every sent entry whose seq is at most `cursor` to the journal.
    async fn confirm_up_to(&mut self, cursor: u64) -> Result<()>;
    /// Every journal entry, by seq (then id).
    async fn journal_by_seq(&mut self) -> Result<Vec<Journaled>>;
    /// How many entries the journal holds.
    async fn journal_len(&mut self) -> Result<u64>;
    /// Drops the journal entries at or below `horizon` (when above 0), then all
    /// but the newest `limit` by id. Returns how many were dropped.
    async fn trim_journal(&mut self, limit: u64, horizon: u64) -> Result<u64>;
    /// Moves a journal entry back into the outbox as pending and requeued,
    /// under its original id (unless an entry has that id already).
    async fn journal_to_outbox(&mut self, id: i64) -> Result<()>;

    /// Forgets the whole replica: confirmed state, outbox, journal and every
    /// meta value except those in `keep`.
    async fn clear_all(&mut self, keep: &[&str]) -> Result<()>;
}
