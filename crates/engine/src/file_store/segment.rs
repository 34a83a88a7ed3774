//! A log segment: the changes one push logged, in seq order, with the chain
//! head before them and the chain head and digest after them. A segment is
//! written once, create-only, under the seq of its first change
//! ([`super::layout::segment`]), so two devices racing for the same seqs
//! cannot both succeed.

use deltasync_protocol::wire::ConflictRecord;
use deltasync_protocol::{StateDigest, StateHash, StoredChange};
use serde::{Deserialize, Serialize};

use super::{FORMAT, FileStoreError};

/// A log segment as stored (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    /// Always [`FORMAT`].
    pub format: String,
    /// The chain head before the first change: the previous segment's last.
    pub prev_hash: StateHash,
    /// The logged changes, seqs consecutive, never empty.
    pub changes: Vec<StoredChange>,
    /// The conflict records the push made, ids consecutive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<ConflictRecord>,
    /// The chain head after the last change.
    pub state_hash: StateHash,
    /// The state digest after the last change.
    pub state_digest: StateDigest,
}

impl Segment {
    /// The seq of the first change.
    pub fn first(&self) -> u64 {
        self.changes.first().map_or(0, |c| c.seq)
    }

    /// The seq of the last change.
    pub fn last(&self) -> u64 {
        self.changes.last().map_or(0, |c| c.seq)
    }

    /// The segment as stored.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a segment serialises")
    }

    /// Reads the segment stored as `object`: it must parse and hold changes.
    /// (Whether it agrees with the log is [`super::Ledger::apply`]'s check.)
    pub fn decode(object: &str, bytes: &[u8]) -> Result<Segment, FileStoreError> {
        let unreadable = |message: String| FileStoreError::Unreadable { object: object.to_owned(), message };
        let segment: Segment = serde_json::from_slice(bytes).map_err(|e| unreadable(format!("not a segment: {e}")))?;
        if segment.format != FORMAT {
            return Err(unreadable(format!("format {:?}, this deltasync reads {FORMAT:?}", segment.format)));
        }
        if segment.changes.is_empty() {
            return Err(unreadable("it holds no changes".into()));
        }
        Ok(segment)
    }
}
