//! The deltasync protocol: everything server and clients must agree on, with no I/O.
//!
//! # Layout
//!
//! - [`ids`]: validated names (collections, entity ids, device ids, change ids, user ids).
//! - [`hlc`]: hybrid logical clock stamps and a clock that issues them.
//! - [`json`]: number validation and the JSON Canonicalization Scheme (RFC 8785).
//! - [`change`]: changes as sent by clients and as stored by the server, and their validation.
//! - [`chain`]: the SHA-256 hash chain over the change log.
//! - [`digest`]: the order-independent digest of the entity state.
//! - [`merge`]: entity state and the four merge policies, shared by server and client.
//! - [`wire`]: request and answer bodies of the HTTP endpoints.
//! - [`snapshot`]: full-state snapshot files to import, and the change ids imported entities get.
//!
//! Server and clients call the same [`merge::merge`] and the same [`chain`] and
//! [`digest`] functions, so they cannot disagree about state or hashes.

pub mod batch;
pub mod chain;
pub mod change;
pub mod digest;
mod hash32;
pub mod hlc;
pub mod ids;
pub mod json;
pub mod merge;
pub mod snapshot;
pub mod wire;

pub use chain::{ChainHasher, StateHash, change_hash};
pub use change::{Change, ChangeError, ChangeLimits, Op, StoredChange};
pub use digest::StateDigest;
pub use hlc::{Hlc, HlcClock};
pub use ids::{ChangeId, Collection, DeviceId, EntityId, NameError, UserId};
pub use merge::{Conflict, ConflictReason, EntityState, Merge, Meta, Policy, merge};
