//! Everything durable, behind one domain-level interface.
//!
//! The server speaks to a [`Store`] in terms of datasets, batches, pages and
//! snapshots, never SQL, so each backend can serialise writes its own way:
//! [`sqlite::SqliteStore`] through one writer thread with group commit,
//! [`postgres::PostgresStore`] through a row lock per dataset.
//! Every table is keyed by `user_id` first, so the schema can be distributed
//! by user.
//!
//! Each backend keeps only its SQL and its connection handling; every
//! decision that does not depend on the database (which rows a page covers,
//! when a cursor calls for a bootstrap, how a push is planned, how rows are
//! decoded, how a bootstrap streams) is made once, in [`core`], [`page`],
//! [`rows`] and [`chunks`].
//!
//! [`admin`] reads reports for operators (`deltasync admin`) over a
//! read-only connection of its own, outside [`Store`]: it never writes or
//! migrates.

pub mod admin;
pub mod chunks;
pub mod core;
pub mod notify;
pub mod page;
pub mod postgres;
pub mod rows;
mod schema;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use deltasync_protocol::wire::{ConflictRecord, DeviceStatus, Policies, PushResult};
use deltasync_protocol::{Change, DeviceId, UserId};
use tokio::sync::watch;

pub use self::chunks::ChunkStream;
pub use self::page::PageLimit;
pub use crate::batch::DatasetHead;

/// A boxed future, so that [`Store`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What every [`Store`] operation answers: a boxed future of its result.
pub type StoreFuture<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// Why a store operation failed. Maps SQLite and PostgreSQL errors to one set of kinds.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database cannot be reached or is busy; retrying later may work (transient).
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The stored data is not what this version of deltasync wrote (local corruption).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The configuration changes the policy of a collection that has changes (operator's fault).
    #[error(
        "collection {collection:?} has changes under merge policy {stored}, but the configuration now gives it {configured}; a collection's policy is fixed once it has changes: restore `{stored}` for it in the config file"
    )]
    PolicyChanged {
        /// The collection.
        collection: String,
        /// The policy its changes were merged with.
        stored: String,
        /// The policy the configuration gives it now.
        configured: String,
    },
    /// The database was written by a newer deltasync (operator's fault).
    #[error("the database schema is version {found}, newer than this server knows ({known}); upgrade deltasync")]
    SchemaTooNew {
        /// The schema version found.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// The database URL cannot be used as given (operator's fault).
    #[error("the database URL is invalid: {0}")]
    InvalidDatabaseUrl(String),
    /// A store setting from the environment cannot be used (operator's fault).
    #[error("invalid store setting: {0}")]
    InvalidSetting(String),
    /// The server is shutting down and takes no more writes.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Any other database failure (a bug or a broken disk).
    #[error("database error: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether the same request may succeed when retried later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::ShuttingDown)
    }
}

/// What a migration run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// The schema version found.
    pub from: i64,
    /// The schema version now.
    pub to: i64,
}

/// What one compaction pass did (see [`core::compact`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Compacted {
    /// The datasets looked at.
    pub datasets: u64,
    /// The datasets whose history was dropped (their horizon moved, or a pass cut short was finished).
    pub compacted: u64,
    /// The log rows deleted.
    pub dropped: u64,
    /// The highest horizon a dataset reached in this pass (0 when none moved).
    pub horizon: u64,
}

/// A validated push, ready for the store.
#[derive(Debug, Clone)]
pub struct PushBatch {
    /// The dataset.
    pub user: UserId,
    /// The pushing device.
    pub device: DeviceId,
    /// The changes, in request order.
    pub changes: Vec<Change>,
    /// The server's time for this push.
    pub now: u64,
    /// How far ahead of `now` an HLC may be (`max_clock_drift_ms`).
    pub max_clock_drift_ms: u64,
    /// For sync: the request's cursor, which must not be above the head (else nothing is applied).
    pub require_cursor: Option<u64>,
}

/// A device heard from: it is registered, its `last_seen` raised to `now`,
/// and its cursor raised to `cursor` if given (neither is ever lowered).
#[derive(Debug, Clone)]
pub struct DeviceTouch {
    /// The dataset.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
    /// The cursor the device has reached, if it says.
    pub cursor: Option<u64>,
    /// The server's time.
    pub now: u64,
}

impl DeviceTouch {
    /// `device` of `user`, heard from at `now`, at `cursor` if given.
    pub fn new(user: &UserId, device: &DeviceId, cursor: Option<u64>, now: u64) -> DeviceTouch {
        DeviceTouch { user: user.clone(), device: device.clone(), cursor, now }
    }
}

/// What a push did.
#[derive(Debug, Clone)]
pub enum PushOutcome {
    /// The batch was committed durably.
    Committed {
        /// One result per change, in request order.
        results: Vec<PushResult>,
        /// The dataset head after the push.
        head: DatasetHead,
    },
    /// `require_cursor` was outside `horizon..=head`: nothing was applied.
    ResetRequired {
        /// The head at the time.
        head: DatasetHead,
    },
}

/// A page of the log.
#[derive(Debug, Clone)]
pub struct ChangePage {
    /// `(seq, stored change as wire JSON)`, in seq order.
    pub changes: Vec<(u64, String)>,
    /// The highest seq the page covers.
    pub cursor: u64,
    /// Whether the log goes on past `cursor`.
    pub has_more: bool,
    /// The chain head at `cursor`.
    pub state_hash: deltasync_protocol::StateHash,
    /// The state digest at `cursor`.
    pub state_digest: deltasync_protocol::StateDigest,
}

/// The answer to a page request.
#[derive(Debug, Clone)]
pub enum PageOutcome {
    /// The page.
    Page(ChangePage),
    /// The cursor is below the horizon or above the head.
    ResetRequired {
        /// The head at the time.
        head: DatasetHead,
    },
}

/// A dataset's status.
#[derive(Debug, Clone)]
pub struct DatasetStatus {
    /// Its head.
    pub head: DatasetHead,
    /// Its devices, by id.
    pub devices: Vec<DeviceStatus>,
}

/// A page of conflict records.
#[derive(Debug, Clone)]
pub struct ConflictPage {
    /// The records, oldest first.
    pub records: Vec<ConflictRecord>,
    /// Whether more follow.
    pub has_more: bool,
}

/// A consistent snapshot of a dataset, streamed.
pub struct BootstrapStream {
    /// Where the snapshot stands.
    pub head: DatasetHead,
    /// NDJSON lines (each with its newline), one per entity, then one per
    /// logged append, in chunks. It ends early (after an `Err`, or with
    /// nothing) when the snapshot could not be read to its end.
    pub lines: ChunkStream,
}

/// Everything durable the server needs.
pub trait Store: Send + Sync + 'static {
    /// Checks that the configured policies keep every collection's policy; called at start.
    fn check_policies<'a>(&'a self, policies: &'a Policies) -> StoreFuture<'a, ()>;

    /// Applies a batch as one durable transaction and answers after commit.
    fn push(&self, batch: PushBatch, policies: Policies) -> StoreFuture<'_, PushOutcome>;

    /// Reads the changes after `cursor` within `limit` (see [`page::PageAssembler`]),
    /// with the hashes at the page's end.
    fn changes_since<'a>(&'a self, user: &'a UserId, cursor: u64, limit: PageLimit) -> StoreFuture<'a, PageOutcome>;

    /// Registers a device, raises its `last_seen`, and its cursor if given (see [`DeviceTouch`]).
    fn touch_device(&self, touch: DeviceTouch) -> StoreFuture<'_, ()>;

    /// The user id of an OpenID Connect identity (`iss`, `sub`): made on its
    /// first sign-in, a new random UUID, the same one ever after.
    fn user_for_identity<'a>(&'a self, issuer: &'a str, subject: &'a str, now: u64) -> StoreFuture<'a, UserId>;

    /// The dataset head and devices.
    fn status<'a>(&'a self, user: &'a UserId) -> StoreFuture<'a, DatasetStatus>;

    /// The dataset head alone (the empty head when the user has no dataset):
    /// one row, for the live channel.
    fn head<'a>(&'a self, user: &'a UserId) -> StoreFuture<'a, crate::batch::DatasetHead>;

    /// Conflict records with `id > since`, at most `limit`.
    fn conflicts<'a>(&'a self, user: &'a UserId, since: u64, limit: u64) -> StoreFuture<'a, ConflictPage>;

    /// A consistent snapshot of the whole dataset, streamed with bounded memory.
    /// The snapshot is released when the stream is dropped, or when its reader
    /// takes no chunk for `stall` (see [`chunks`]).
    fn bootstrap<'a>(&'a self, user: &'a UserId, stall: Duration) -> StoreFuture<'a, BootstrapStream>;

    /// A receiver of the dataset's head seq, which changes whenever a push commits.
    fn subscribe(&self, user: &UserId) -> watch::Receiver<u64>;

    /// Runs one compaction pass over every dataset under `rules` (see
    /// [`core::compact`]): raises horizons, drops the history below them in
    /// short writes, and gives the freed space back where the database can.
    fn compact<'a>(&'a self, rules: &'a core::compact::CompactRules) -> StoreFuture<'a, Compacted>;

    /// Answers once the database answers a read.
    fn health(&self) -> StoreFuture<'_, ()>;

    /// Commits a write that changes nothing, to learn whether writes work
    /// (a full disk, a read-only database); as costly as one small commit.
    fn write_probe(&self) -> StoreFuture<'_, ()>;

    /// Finishes queued writes and stops taking new ones.
    fn close(&self) -> BoxFuture<'_, ()>;
}
