//! [`Engine`]: one device's replica, driven through a store, a transport and
//! a clock. Local reads and writes live in [`crate::local`], the network side
//! in [`crate::sync`].

use std::sync::{Arc, Mutex, MutexGuard};

use deltasync_protocol::{Collection, DeviceId, EntityId};
use serde::Serialize;

use crate::clock::{Clock, DeviceClock};
use crate::error::{Error, Result};
use crate::replica;
use crate::store::{Access, LocalStore, StoreTx};
use crate::transport::Transport;

/// The default of [`EngineOptions::journal_limit`].
pub const DEFAULT_JOURNAL_LIMIT: u64 = 10_000;

/// How far a sync has got, reported as [`Notice::Progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A page of a sync was applied.
    Sync {
        /// This device's changes accepted so far.
        pushed: u64,
        /// Changes received so far.
        pulled: u64,
        /// The cursor reached.
        cursor: u64,
    },
    /// Entities loaded so far by a bootstrap.
    Bootstrap {
        /// Entities written to the local store.
        entities: u64,
    },
}

/// Where a change that the app is told about came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A write made on this device.
    Local,
    /// Changes pulled from the server.
    Server,
    /// The confirmed state was replaced by a bootstrap (or a reset): re-read everything.
    Reset,
}

/// Which entities changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    /// Where the change came from.
    pub origin: Origin,
    /// The entities whose view may have changed (empty for [`Origin::Reset`]).
    pub entities: Vec<(Collection, EntityId)>,
}

/// What the engine tells its embedder as it works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Entities changed (a local write, a page from the server, a bootstrap).
    Changed(ChangeEvent),
    /// A local write is waiting in the outbox: a background runner may sync soon.
    LocalWrite,
    /// Long work advanced.
    Progress(Progress),
}

/// Receives [`Notice`]s.
pub type Listener = Arc<dyn Fn(Notice) + Send + Sync>;

/// How the engine syncs.
#[derive(Clone)]
pub struct EngineOptions {
    /// The most changes sent in one request.
    pub batch_size: usize,
    /// The most seqs asked for per page when catching up.
    pub page_limit: u64,
    /// How many acknowledged changes the journal keeps.
    pub journal_limit: u64,
    /// A replica's first sync fetches a snapshot instead of the log when the
    /// log holds more changes than this (see [`crate::FIRST_SYNC_SNAPSHOT_AFTER`]);
    /// `u64::MAX` always pulls the log.
    pub first_sync_snapshot_after: u64,
    /// Receives change events, local-write notices and progress.
    pub listener: Option<Listener>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            batch_size: 500,
            page_limit: deltasync_protocol::wire::MAX_PULL_LIMIT,
            journal_limit: DEFAULT_JOURNAL_LIMIT,
            first_sync_snapshot_after: crate::FIRST_SYNC_SNAPSHOT_AFTER,
            listener: None,
        }
    }
}

impl std::fmt::Debug for EngineOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineOptions")
            .field("batch_size", &self.batch_size)
            .field("page_limit", &self.page_limit)
            .field("journal_limit", &self.journal_limit)
            .field("first_sync_snapshot_after", &self.first_sync_snapshot_after)
            .finish_non_exhaustive()
    }
}

/// One device's replica: a store, a transport (absent for a device with no
/// server yet), a clock, and the state kept between calls.
pub struct Engine<S, T, C> {
    pub(crate) store: S,
    pub(crate) transport: Option<T>,
    pub(crate) clock: C,
    pub(crate) options: EngineOptions,
    pub(crate) device: DeviceId,
    pub(crate) hlc: Mutex<DeviceClock>,
    /// The last change id made, so the next sorts after it.
    pub(crate) last_change_id: Mutex<u128>,
    /// One sync (or applied long poll) at a time.
    pub(crate) sync_lock: futures_util::lock::Mutex<()>,
}

impl<S: LocalStore, T: Transport, C: Clock> Engine<S, T, C> {
    /// Opens the replica in `store` (making its device id on first use) and
    /// resumes its clock.
    pub async fn open(store: S, transport: Option<T>, clock: C, options: EngineOptions) -> Result<Self> {
        let mut tx = store.begin(Access::Write).await?;
        let device = replica::device_id(&mut tx, clock.random_u64()).await?;
        if let Some(t) = &transport {
            tx.set_meta(replica::keys::SERVER_URL, t.base().trim_end_matches('/')).await?;
        }
        let last = replica::clock(&mut tx).await?;
        let offset = replica::clock_offset(&mut tx).await?;
        tx.commit().await?;
        let hlc = Mutex::new(DeviceClock::resume(device.clone(), last.as_ref(), offset));
        Ok(Engine {
            store,
            transport,
            clock,
            options,
            device,
            hlc,
            last_change_id: Mutex::new(0),
            sync_lock: Default::default(),
        })
    }

    /// This device's id.
    pub fn device_id(&self) -> &DeviceId {
        &self.device
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The transport, when the device has a server.
    pub fn transport_ref(&self) -> Option<&T> {
        self.transport.as_ref()
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// The engine's options.
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    pub(crate) fn transport(&self) -> Result<&T> {
        self.transport.as_ref().ok_or(Error::NoServer)
    }

    pub(crate) fn device_clock(&self) -> MutexGuard<'_, DeviceClock> {
        self.hlc.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn wall_ms(&self) -> u64 {
        self.clock.wall_ms()
    }

    pub(crate) fn notify(&self, notice: Notice) {
        if let Some(listener) = &self.options.listener {
            listener(notice);
        }
    }

    pub(crate) fn emit(&self, origin: Origin, entities: Vec<(Collection, EntityId)>) {
        self.notify(Notice::Changed(ChangeEvent { origin, entities }));
    }

    pub(crate) fn progress(&self, p: Progress) {
        self.notify(Notice::Progress(p));
    }

    /// Takes in the server's clock and persists a new wall-clock correction.
    pub(crate) async fn observe_server_time(&self, server_time: u64) -> Result<()> {
        let changed = self.device_clock().observe_server_time(self.wall_ms(), server_time);
        if let Some(offset) = changed {
            let mut tx = self.store.begin(Access::Write).await?;
            tx.set_meta(replica::keys::CLOCK_OFFSET_MS, &offset.to_string()).await?;
            tx.commit().await?;
        }
        Ok(())
    }
}
