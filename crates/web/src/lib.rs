//! The deltasync engine in a browser. [`IdbStore`] keeps a replica in
//! IndexedDB behind the engine's [`deltasync_engine::LocalStore`] interface;
//! `run_conformance` (exported to JavaScript) runs the engine's store
//! conformance suite on it, which `web/tests/conformance.mjs` does in
//! headless Chromium.
//!
//! Only the row encoding ([`records`]) is built for other targets: the store
//! needs a browser, and its checks run in one.

pub mod records;
pub mod segments;

#[cfg(target_arch = "wasm32")]
pub mod api;
#[cfg(target_arch = "wasm32")]
pub mod clock;
#[cfg(all(target_arch = "wasm32", feature = "conformance"))]
mod conformance;
#[cfg(target_arch = "wasm32")]
pub mod fetch;
#[cfg(target_arch = "wasm32")]
mod idb;
#[cfg(target_arch = "wasm32")]
pub mod schema;

#[cfg(all(target_arch = "wasm32", feature = "conformance"))]
pub use conformance::run_conformance;
#[cfg(target_arch = "wasm32")]
pub use idb::{IdbStore, IdbTx};
