//! The deltasync client engine: every client-side rule of the protocol, with
//! no I/O.
//!
//! An [`Engine`] is one device's replica of a user's dataset. It owns the
//! rules that every client must get right, whatever it runs on: deltas and
//! HLC stamping of local writes, the outbox and what the server's refusals do
//! to it, backoff, clock correction, page verification (gapless seqs, the
//! SHA-256 chain and the state digest), healing by bootstrap, the journal
//! re-sent to a server restored from a backup, and the user the replica
//! belongs to.
//!
//! It reaches the world only through three interfaces, which adapters
//! implement:
//! - a [`LocalStore`] (SQLite in the native client, IndexedDB in a browser,
//!   [`MemoryStore`] in tests and for embedders that keep nothing);
//! - a [`Transport`] to the server (reqwest, `fetch`, or the server in-process);
//! - a [`Clock`] (wall time, monotonic time, randomness).
//!
//! The engine needs no threads, files, sockets or system clock, and builds
//! for `wasm32-unknown-unknown`. Its functions are `async` and generic over
//! the three interfaces; a store whose operations never wait (SQLite, memory)
//! may be driven to completion with one poll.
//!
//! # Layout
//! - [`engine`]: the engine, its options and its notices;
//! - [`local`]: local writes and reads; [`view`]: the optimistic view;
//! - [`sync`]: push, pull, verify, heal; [`bootstrap`], [`restore`];
//! - [`user`]: the replica's user, `reset`, the conflict records;
//! - [`schedule`]: when a runner syncs, and how loudly it reports failures;
//! - [`store`], [`transport`], [`clock`]: the interfaces; [`answer`]: how
//!   an HTTP answer is judged (deltasync's, another server's, a missing endpoint);
//!   [`requests`]: the requests every HTTP transport sends;
//!   [`replica`]: the sync state kept in the store;
//! - [`memory`]: the in-memory store; [`slot`]: how stores lend themselves to a transaction; [`conformance`]: the suite every store passes.

pub mod answer;
pub mod backoff;
pub mod bootstrap;
pub mod clock;
pub mod conformance;
pub mod engine;
pub mod error;
pub mod file_store;
pub mod local;
pub mod memory;
pub mod replica;
pub mod requests;
pub mod restore;
pub mod schedule;
pub mod slot;
pub mod store;
pub mod sync;
pub mod transport;
pub mod user;
pub mod view;

pub use clock::Clock;
pub use engine::{ChangeEvent, DEFAULT_JOURNAL_LIMIT, Engine, EngineOptions, Listener, Notice, Origin, Progress};
pub use error::{Error, Result, TimeoutKind};
pub use local::{LastError, LocalWrite, MAX_DATA_BYTES, Stats, WriteKind};
pub use memory::MemoryStore;
pub use store::{Access, Confirmed, Journaled, LocalStore, OutboxEntry, OutboxStatus, StoreTx};
pub use sync::{FIRST_SYNC_SNAPSHOT_AFTER, LostChange, SyncReport};
pub use transport::{ByteStream, SyncBody, Transport};
pub use view::Entity;
