//! Sync through a plain file store (a folder, WebDAV, S3) with no server:
//! the objects such a store holds and the rules a device follows on them,
//! with no I/O (the native client reads and writes the objects; see
//! `docs/file-store.md` for the layout, the algorithm and why it is safe).
//!
//! - [`layout`]: the object names;
//! - [`segment`]: a log segment, one push's logged changes with the chain head
//!   and digest before and after them;
//! - [`ledger`]: the dataset as the log builds it, in memory: it verifies
//!   every segment it reads, plans pushes with the server's planner, and
//!   answers the requests a server would;
//! - [`snapshot`]: a ledger written out whole, so that a new device starts
//!   from it and the tail of the log.

pub mod layout;
pub mod ledger;
pub mod segment;
pub mod snapshot;

use deltasync_protocol::wire::Policies;
use deltasync_protocol::{StateDigest, StateHash};
use serde::{Deserialize, Serialize};

pub use ledger::{Ledger, Planned};
pub use segment::Segment;

/// The `format` every object of a store of this version carries.
pub const FORMAT: &str = "deltasync-file-store/1";

/// A store's descriptor (`deltasync.json`): written once, create-only, by the
/// first device, and never changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Always [`FORMAT`].
    pub format: String,
    /// The dataset's user id, made by the first device (a random UUID).
    pub user_id: String,
    /// The merge policies every device applies.
    pub policies: Policies,
    /// When the store was made, ms since the epoch.
    pub created: u64,
}

/// The head hint (`meta.json`): where the log stood when a device last
/// wrote it, and the newest snapshot. Only a hint: a device that crashed
/// after writing a segment leaves it behind the log, so readers always look
/// for the segment after the hinted head as well.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadHint {
    /// Always [`FORMAT`].
    pub format: String,
    /// The highest seq known to the writer.
    pub head: u64,
    /// The chain head at `head`.
    pub state_hash: StateHash,
    /// The state digest at `head`.
    pub state_digest: StateDigest,
    /// The seq of the newest snapshot, if any.
    #[serde(default)]
    pub snapshot: Option<u64>,
    /// When it was written, ms since the epoch.
    pub updated: u64,
}

/// A store object that could not be trusted or read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FileStoreError {
    /// The object is not what this version of deltasync writes.
    #[error("{object} in the file store is unreadable: {message}")]
    Unreadable {
        /// The object's name.
        object: String,
        /// What is wrong with it.
        message: String,
    },
    /// The object reads, but does not agree with the log before it: it was
    /// edited or damaged after it was written. Nothing in it is applied.
    #[error(
        "{object} in the file store does not match the log before it ({message}): it was changed after it was written; nothing from it was applied"
    )]
    Tampered {
        /// The object's name.
        object: String,
        /// Which check failed.
        message: String,
    },
}

impl From<FileStoreError> for crate::Error {
    fn from(e: FileStoreError) -> Self {
        crate::Error::Integrity(e.to_string())
    }
}
