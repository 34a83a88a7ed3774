//! The order-independent digest of the entity state (§5):
//!
//! ```text
//! entity_hash  = SHA-256( JCS({"collection": c, "entity_id": id, "data": d}) )   per live entity
//! state_digest = ( Σ entity_hash as 256-bit big-endian integers ) mod 2^256
//! ```
//!
//! Deleted entities and `append` changes add nothing. The digest updates in
//! O(1) per change: subtract the entity's old hash, add its new one.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::hash32::hash32;
use crate::json;

hash32!(
    /// The sum, modulo 2^256, of the hashes of all live entities.
    StateDigest
);

/// The hash of one live entity with visible data `data`.
pub fn entity_hash(collection: &str, entity_id: &str, data: &Map<String, Value>) -> [u8; 32] {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"{\"collection\":");
    json::write_str(&mut out, collection);
    out.extend_from_slice(b",\"data\":");
    json::write_object(&mut out, data);
    out.extend_from_slice(b",\"entity_id\":");
    json::write_str(&mut out, entity_id);
    out.push(b'}');
    Sha256::digest(out).into()
}

impl StateDigest {
    /// Adds an entity hash (mod 2^256).
    pub fn add(&mut self, h: &[u8; 32]) {
        let mut carry = 0u16;
        for i in (0..32).rev() {
            let s = self.0[i] as u16 + h[i] as u16 + carry;
            self.0[i] = s as u8;
            carry = s >> 8;
        }
    }

    /// Subtracts an entity hash (mod 2^256).
    pub fn sub(&mut self, h: &[u8; 32]) {
        let mut borrow = 0i16;
        for i in (0..32).rev() {
            let mut d = self.0[i] as i16 - h[i] as i16 - borrow;
            borrow = if d < 0 { 1 } else { 0 };
            if d < 0 {
                d += 256;
            }
            self.0[i] = d as u8;
        }
    }

    /// Replaces an entity's contribution: subtracts `old`, adds `new` (either may be absent).
    pub fn replace(&mut self, old: Option<&[u8; 32]>, new: Option<&[u8; 32]>) {
        if let Some(o) = old {
            self.sub(o);
        }
        if let Some(n) = new {
            self.add(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_then_sub_is_identity_and_wraps() {
        let mut d = StateDigest::ZERO;
        let big = [0xff; 32];
        let one = {
            let mut o = [0; 32];
            o[31] = 1;
            o
        };
        d.add(&big);
        d.add(&one);
        assert_eq!(d, StateDigest::ZERO, "2^256 - 1 + 1 wraps to zero");
        d.sub(&one);
        assert_eq!(d.0, big);
        d.sub(&big);
        assert_eq!(d, StateDigest::ZERO);
    }

    #[test]
    fn order_does_not_matter() {
        let a = entity_hash("c", "a", &Map::new());
        let b = entity_hash("c", "b", &Map::new());
        let mut x = StateDigest::ZERO;
        x.add(&a);
        x.add(&b);
        let mut y = StateDigest::ZERO;
        y.add(&b);
        y.add(&a);
        assert_eq!(x, y);
    }
}
