//! The state hash chain over the change log (§5):
//!
//! ```text
//! change_hash_n = SHA-256( JCS(c_n) )
//! state_hash_n  = SHA-256( change_hash_n || state_hash_{n-1} ),  state_hash_0 = 32 zero bytes
//! ```
//!
//! `c_n` holds exactly `seq`, `change_id`, `device_id`, `collection`,
//! `entity_id`, `op`, `data` (null when absent) and `hlc`.

use sha2::{Digest, Sha256};

use crate::change::StoredChange;
use crate::hash32::hash32;
use crate::json;

hash32!(
    /// The head of the hash chain after some prefix of the log.
    StateHash
);

/// The canonical bytes that a change hash is taken over.
pub fn change_hash_input(c: &StoredChange) -> Vec<u8> {
    // Members in JCS order (UTF-16 order of the names):
    // change_id, collection, data, device_id, entity_id, hlc, op, seq.
    let ch = &c.change;
    let mut out = Vec::with_capacity(192);
    out.extend_from_slice(b"{\"change_id\":");
    json::write_str(&mut out, ch.change_id.as_str());
    out.extend_from_slice(b",\"collection\":");
    json::write_str(&mut out, ch.collection.as_str());
    out.extend_from_slice(b",\"data\":");
    match &ch.data {
        Some(d) => json::write_jcs(&mut out, d),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"device_id\":");
    json::write_str(&mut out, c.device_id.as_str());
    out.extend_from_slice(b",\"entity_id\":");
    json::write_str(&mut out, ch.entity_id.as_str());
    out.extend_from_slice(b",\"hlc\":");
    json::write_str(&mut out, ch.hlc.as_str());
    out.extend_from_slice(b",\"op\":\"");
    out.extend_from_slice(ch.op.as_str().as_bytes());
    out.extend_from_slice(b"\",\"seq\":");
    json::write_f64(&mut out, c.seq as f64);
    out.push(b'}');
    out
}

/// `SHA-256(JCS(c))` of a stored change.
pub fn change_hash(c: &StoredChange) -> [u8; 32] {
    Sha256::digest(change_hash_input(c)).into()
}

impl StateHash {
    /// The chain's next link: `SHA-256(change_hash || self)`.
    pub fn next(&self, change_hash: &[u8; 32]) -> StateHash {
        let mut h = Sha256::new();
        h.update(change_hash);
        h.update(self.0);
        StateHash(h.finalize().into())
    }

    /// Folds one stored change into the chain.
    pub fn fold(&self, c: &StoredChange) -> StateHash {
        self.next(&change_hash(c))
    }
}

/// Folds a run of changes into a chain head, checking that seqs follow on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHasher {
    /// The last seq folded in.
    pub seq: u64,
    /// The chain head at `seq`.
    pub hash: StateHash,
}

impl ChainHasher {
    /// A chain at `seq` with head `hash` (use 0 and [`StateHash::ZERO`] for an empty log).
    pub fn new(seq: u64, hash: StateHash) -> Self {
        Self { seq, hash }
    }

    /// Folds the next change in; refuses a change whose seq is not the next one.
    pub fn push(&mut self, c: &StoredChange) -> Result<StateHash, (u64, u64)> {
        if c.seq != self.seq + 1 {
            return Err((self.seq + 1, c.seq));
        }
        self.hash = self.hash.fold(c);
        self.seq = c.seq;
        Ok(self.hash)
    }
}
