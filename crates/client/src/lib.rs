//! The deltasync client SDK: a device's local replica of a user's dataset.
//!
//! An app opens a [`Client`] on a local SQLite file, reads and writes entities
//! with no network at all, and calls [`Client::sync`] (or starts a
//! [`SyncRunner`]) to exchange changes with a deltasync server. Every device
//! that syncs the same dataset ends with the same state, and proves it: the
//! client folds the server's SHA-256 hash chain and the state digest itself and
//! checks both at every page, re-bootstrapping when they disagree.
//!
//! - Writes go to an **outbox** in the same transaction that makes them, so a
//!   crash never loses or half-writes one.
//! - Reads show the **confirmed** state (the log up to the cursor) with every
//!   pending change merged on top by the same merge function as the server.
//! - A change the server refuses for good (`version_mismatch`, or a refusal
//!   that still stands after [`backoff::MAX_RETRIES`] tries) is kept as
//!   **failed**, with its conflict, for the app to show; it never blocks the
//!   changes behind it.
//! - Acknowledged changes leave the outbox for a bounded **journal**
//!   ([`ClientOptions::journal_limit`]): if the server is restored from a
//!   backup that lacks some of them, the next heal sends those again under
//!   their original change ids ([`SyncReport::restored`]).
//! - Every request has a deadline ([`ClientOptions::request_timeout`],
//!   [`ClientOptions::stall_timeout`]), and a sync that fails is recorded
//!   until one succeeds ([`Stats::last_error`]), so a failure that repeats is
//!   visible rather than retried silently.
//!
//! # Example
//!
//! ```no_run
//! use deltasync_client::{Client, ClientOptions};
//! use serde_json::json;
//!
//! # async fn example() -> Result<(), deltasync_client::ClientError> {
//! let client = Client::open(
//!     "phone.db",
//!     ClientOptions { server: Some("http://127.0.0.1:8787".into()), ..Default::default() },
//! )?;
//! // Works offline: the change waits in the outbox and shows in reads at once.
//! let fields = json!({"title": "Buy milk", "done": false});
//! client.patch("tasks", "t1", fields.as_object().unwrap().clone())?;
//! assert_eq!(client.get("tasks", "t1")?.unwrap().data["title"], "Buy milk");
//!
//! // Exchange changes with the server, verified against its hashes.
//! let report = client.sync().await?;
//! println!("pushed {}, pulled {}, verified {}", report.pushed, report.pulled, report.verified);
//!
//! // Or keep syncing in the background, and hear about every change.
//! let mut events = client.subscribe();
//! let runner = deltasync_client::SyncRunner::start(client.clone(), Default::default());
//! while let Ok(event) = events.recv().await {
//!     println!("{:?} changed {:?}", event.origin, event.entities);
//! #   break;
//! }
//! runner.stop().await;
//! # Ok(())
//! # }
//! ```

//! # Layout
//!
//! The rules live in the I/O-free engine ([`deltasync_engine`]); this crate
//! is its native adapters: [`local`] (the SQLite store), [`http`] (the
//! reqwest transport), [`client`] (the handle and the system clock) and
//! [`runner`] (the tokio background sync).

pub mod client;
pub mod error;
pub mod filestore;
pub mod http;
pub mod live;
pub mod local;
pub mod remote;
pub mod runner;

pub use deltasync_engine::{self as engine, backoff, sync, view};

pub use client::{
    ChangeEvent, Client, ClientOptions, DEFAULT_JOURNAL_LIMIT, DEFAULT_REQUEST_TIMEOUT, DEFAULT_STALL_TIMEOUT,
    Imported, LastError, MAX_DATA_BYTES, Origin, Progress, Stats,
};
pub use deltasync_engine::{LocalWrite, WriteKind};
pub use error::{ClientError, Result, TimeoutKind};
pub use http::TokenProvider;
pub use local::{OutboxEntry, OutboxStatus};
pub use runner::{RunnerOptions, SyncRunner};
pub use sync::{LostChange, SyncReport};
pub use view::Entity;
