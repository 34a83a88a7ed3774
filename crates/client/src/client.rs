//! [`Client`]: the handle an app holds. A thin adapter: the engine
//! (`deltasync-engine`) holds every rule; this file gives it the SQLite store,
//! the reqwest transport and the system clock, and turns its notices into
//! tokio events.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deltasync_engine::{Clock, Engine, EngineOptions, LocalWrite, Notice, WriteKind};
use deltasync_protocol::snapshot::SnapshotEntry;
use deltasync_protocol::{ChangeId, DeviceId};
use serde_json::{Map, Value};
use tokio::sync::{Notify, broadcast};

pub use deltasync_engine::{ChangeEvent, DEFAULT_JOURNAL_LIMIT, LastError, MAX_DATA_BYTES, Origin, Progress, Stats};

use crate::error::Result;
use crate::filestore::{self, FileStoreApi};
use crate::http::{HttpOptions, ServerApi};
use crate::local::{self, OutboxEntry, SqliteStore, store::run_now};
use crate::remote::Remote;
use crate::sync::SyncReport;
use crate::view::Entity;

/// The default of [`ClientOptions::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The default of [`ClientOptions::stall_timeout`].
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What [`Client::import`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Imported {
    /// Entities put into the outbox (one upsert each).
    pub written: u64,
    /// Entities whose view already held their fields: nothing written.
    pub unchanged: u64,
}

/// How a [`Client`] is set up. `Default` gives sensible values for an app.
#[derive(Clone)]
pub struct ClientOptions {
    /// The server's base URL (`http://host:port`). Kept in the local database,
    /// so later opens may leave it out.
    pub server: Option<String>,
    /// A file store to sync through instead of a server: `file:///dir`,
    /// `webdav://host/path` (`webdavs://` for HTTPS; user and password from
    /// `DELTASYNC_STORE_USER` / `DELTASYNC_STORE_PASSWORD`) or
    /// `s3://bucket/prefix` (endpoint and keys from the usual `AWS_*`
    /// variables). Kept in the local database like `server`; give one or the
    /// other. See `docs/file-store.md`.
    pub store: Option<String>,
    /// A bearer token for servers running with `--auth jwt`.
    pub token: Option<String>,
    /// Where a fresh token comes from when the server answers 401 (an expired
    /// token, or none given): asked once per refused request, which is then
    /// sent again once. Nothing is lost meanwhile: a sync that still fails
    /// `unauthorized` keeps every change in the outbox.
    pub token_provider: Option<crate::http::TokenProvider>,
    /// The most changes sent in one request (the server's `max_batch` is 1000 by default).
    pub batch_size: usize,
    /// Speak HTTP/2 to an `http://` server without negotiating it first (h2c
    /// "prior knowledge"): header compression makes a small sync about 200
    /// bytes lighter. Only for servers reached directly (a `deltasync serve`
    /// speaks both); `https://` servers negotiate HTTP/2 by themselves.
    pub http2_prior_knowledge: bool,
    /// The most seqs asked for per page.
    pub page_limit: u64,
    /// The longest one request may take, from connecting to the last byte of
    /// its answer (default 60 s; a long poll gets its wait on top). A server
    /// that answers a byte at a time cannot hold a sync past it.
    pub request_timeout: Duration,
    /// The longest a streamed answer (bootstrap) may send nothing (default 30 s).
    pub stall_timeout: Duration,
    /// The longest one whole sync may take, all its requests and heals
    /// included (default none: a first sync of a large dataset may take long).
    /// Past it the sync fails with a `timeout` error; nothing local is lost.
    pub sync_timeout: Option<Duration>,
    /// How many of this device's acknowledged changes are kept in the journal
    /// (default 10,000), to be re-pushed if the server is restored from a
    /// backup that lacks them. 0 keeps none.
    pub journal_limit: u64,
    /// A first sync fetches a snapshot of the server's state instead of its
    /// log when the log holds more changes than this (default 10,000: a
    /// snapshot holds each entity once, and arrives sorted). `u64::MAX`
    /// always pulls the log.
    pub first_sync_snapshot_after: u64,
    /// The wall clock in ms since the epoch; replaceable for tests.
    pub wall_clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Called as long work advances (each page of a sync, every 10,000
    /// entities of a bootstrap), for a progress display.
    pub progress: Option<Arc<dyn Fn(Progress) + Send + Sync>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            server: None,
            store: None,
            token: None,
            token_provider: None,
            batch_size: 500,
            http2_prior_knowledge: false,
            page_limit: deltasync_protocol::wire::MAX_PULL_LIMIT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            sync_timeout: None,
            journal_limit: DEFAULT_JOURNAL_LIMIT,
            first_sync_snapshot_after: deltasync_engine::FIRST_SYNC_SNAPSHOT_AFTER,
            wall_clock: Arc::new(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)),
            progress: None,
        }
    }
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("server", &self.server)
            .field("store", &self.store)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("token_provider", &self.token_provider.is_some())
            .field("batch_size", &self.batch_size)
            .field("page_limit", &self.page_limit)
            .field("request_timeout", &self.request_timeout)
            .field("stall_timeout", &self.stall_timeout)
            .field("sync_timeout", &self.sync_timeout)
            .field("journal_limit", &self.journal_limit)
            .field("first_sync_snapshot_after", &self.first_sync_snapshot_after)
            .finish_non_exhaustive()
    }
}

/// The engine's clock on this machine: the options' wall clock, `Instant`
/// for monotonic time, and the standard library's random hash keys.
pub struct SystemClock {
    wall: Arc<dyn Fn() -> u64 + Send + Sync>,
    start: Instant,
}

impl Clock for SystemClock {
    fn wall_ms(&self) -> u64 {
        (self.wall)()
    }

    fn monotonic_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn random_u64(&self) -> u64 {
        deltasync_engine::clock::mixed_random(self.start.elapsed().as_nanos() as u64)
    }
}

/// The engine as the native client builds it.
pub(crate) type NativeEngine = Engine<SqliteStore, Remote, SystemClock>;

pub(crate) struct Inner {
    pub(crate) engine: NativeEngine,
    pub(crate) events: broadcast::Sender<ChangeEvent>,
    pub(crate) local_writes: Arc<Notify>,
    pub(crate) options: ClientOptions,
}

/// A device's handle on its local replica: cheap to clone, safe to share between tasks.
///
/// Reads and writes are local and never wait for the network; [`Client::sync`]
/// exchanges changes with the server.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

/// Turns the engine's notices into the client's channels and callback.
fn listener(
    events: broadcast::Sender<ChangeEvent>,
    local_writes: Arc<Notify>,
    progress: Option<Arc<dyn Fn(Progress) + Send + Sync>>,
) -> deltasync_engine::Listener {
    Arc::new(move |notice| match notice {
        Notice::Changed(event) => drop(events.send(event)),
        Notice::LocalWrite => local_writes.notify_one(),
        Notice::Progress(p) => {
            if let Some(f) = &progress {
                f(p)
            }
        }
    })
}

impl Client {
    /// Opens (creating if needed) the local database at `path`.
    ///
    /// The first open makes the device id, which is kept for good. A server URL
    /// given in `options` replaces the one kept in the database.
    pub fn open(path: impl AsRef<Path>, options: ClientOptions) -> Result<Client> {
        let conn = local::open(path.as_ref())?;
        if options.server.is_some() && options.store.is_some() {
            return Err(crate::ClientError::Invalid(
                "give a server URL or a file store URL, not both: a device syncs with one of them".into(),
            ));
        }
        let remote_url = match options.store.as_ref().or(options.server.as_ref()) {
            Some(url) => Some(url.trim_end_matches('/').to_owned()),
            None => local::meta(&conn, deltasync_engine::replica::keys::SERVER_URL)?,
        };
        let http = HttpOptions {
            http2_prior_knowledge: options.http2_prior_knowledge,
            request_timeout: options.request_timeout,
            stall_timeout: options.stall_timeout,
        };
        let api = match remote_url.as_deref() {
            None => None,
            Some(url) if filestore::is_store_url(url) => {
                let mut head_file = path.as_ref().as_os_str().to_owned();
                head_file.push(".store-head");
                let head_file = (path.as_ref() != Path::new(":memory:")).then(|| head_file.into());
                Some(Remote::Files(Box::new(FileStoreApi::new(url, head_file, options.wall_clock.clone())?)))
            }
            Some(url) => Some(Remote::Server(
                ServerApi::new(url, options.token.clone(), http)?.with_token_provider(options.token_provider.clone()),
            )),
        };
        let (events, _) = broadcast::channel(1024);
        let local_writes = Arc::new(Notify::new());
        let engine_options = EngineOptions {
            batch_size: options.batch_size,
            page_limit: options.page_limit,
            journal_limit: options.journal_limit,
            first_sync_snapshot_after: options.first_sync_snapshot_after,
            listener: Some(listener(events.clone(), local_writes.clone(), options.progress.clone())),
        };
        let clock = SystemClock { wall: options.wall_clock.clone(), start: Instant::now() };
        let engine = run_now(Engine::open(SqliteStore::new(conn), api, clock, engine_options))?;
        Ok(Client { inner: Arc::new(Inner { engine, events, local_writes, options }) })
    }

    /// What this client asked of its file store so far (requests and bytes
    /// each way), when it syncs through one.
    pub fn file_store_traffic(&self) -> Option<filestore::Traffic> {
        match self.engine().transport_ref()? {
            Remote::Files(api) => Some(api.traffic()),
            Remote::Server(_) => None,
        }
    }

    /// This device's id.
    pub fn device_id(&self) -> &DeviceId {
        self.inner.engine.device_id()
    }

    pub(crate) fn engine(&self) -> &NativeEngine {
        &self.inner.engine
    }

    /// Subscribes to change events: one per local write and one per page of server changes.
    ///
    /// A receiver that falls more than 1024 events behind gets `Lagged` and should re-read.
    pub fn subscribe(&self) -> broadcast::Receiver<ChangeEvent> {
        self.inner.events.subscribe()
    }

    /// Resolves when a local write happens (used by the background runner).
    pub(crate) async fn local_write(&self) {
        self.inner.local_writes.notified().await
    }

    /// Makes `data` the entity's whole data: one upsert with the fields that
    /// differ from the current view, plus `null` for each field the view has
    /// and `data` lacks. Returns the change's id, or `None` when nothing changed.
    pub fn put(&self, collection: &str, entity_id: &str, data: Map<String, Value>) -> Result<Option<ChangeId>> {
        Ok(run_now(self.engine().put(collection, entity_id, data))?)
    }

    /// Writes the given fields (creating or reviving the entity): one upsert with
    /// the fields that differ from the current view. Returns the change's id, or
    /// `None` when nothing changed.
    pub fn patch(&self, collection: &str, entity_id: &str, fields: Map<String, Value>) -> Result<Option<ChangeId>> {
        Ok(run_now(self.engine().patch(collection, entity_id, fields))?)
    }

    /// Deletes the entity (a tombstone, also for an entity never seen).
    pub fn delete(&self, collection: &str, entity_id: &str) -> Result<ChangeId> {
        Ok(run_now(self.engine().delete(collection, entity_id))?)
    }

    /// Makes many writes in one local transaction: all are kept or none (the
    /// first invalid write fails the batch). Returns each write's change id,
    /// `None` where a `put` or `patch` changed nothing. For bulk work: one
    /// transaction costs far less than one per write.
    pub fn write_batch(&self, writes: Vec<LocalWrite>) -> Result<Vec<Option<ChangeId>>> {
        Ok(run_now(self.engine().write_batch(writes))?)
    }

    /// Puts snapshot entries into the outbox once, in one local transaction
    /// (all or none): each entity is written as a `patch` of its fields, so it
    /// becomes one upsert, and an entity whose view already holds those
    /// fields is skipped. Importing the same snapshot again therefore writes
    /// nothing. Parse a snapshot file with
    /// [`deltasync_protocol::snapshot::parse`]; for a large one, call this per
    /// slice of a few thousand entries.
    pub fn import(&self, entries: Vec<SnapshotEntry>) -> Result<Imported> {
        let writes = entries
            .into_iter()
            .map(|e| LocalWrite {
                collection: e.collection.into_string(),
                entity_id: e.entity_id.into_string(),
                edit: WriteKind::Patch(e.data),
            })
            .collect();
        let ids = self.write_batch(writes)?;
        let written = ids.iter().filter(|id| id.is_some()).count() as u64;
        Ok(Imported { written, unchanged: ids.len() as u64 - written })
    }

    /// Logs an `append`: opaque data (for example a CRDT operation) that the
    /// server keeps in the log but never merges into entity state.
    pub fn append(&self, collection: &str, entity_id: &str, data: Value) -> Result<ChangeId> {
        Ok(run_now(self.engine().append(collection, entity_id, data))?)
    }

    /// The entity as the app sees it, or `None` when it is absent or deleted.
    pub fn get(&self, collection: &str, entity_id: &str) -> Result<Option<Entity>> {
        Ok(run_now(self.engine().get(collection, entity_id))?)
    }

    /// The live entities of a collection, sorted by id in code-point order.
    pub fn list(&self, collection: &str) -> Result<Vec<Entity>> {
        Ok(run_now(self.engine().list(collection))?)
    }

    /// Counters for a status line.
    pub fn stats(&self) -> Result<Stats> {
        Ok(run_now(self.engine().stats())?)
    }

    /// Every outbox entry, in the order the changes were made.
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>> {
        Ok(run_now(self.engine().outbox())?)
    }

    /// The pending and failed changes as JSON: each the protocol's change plus
    /// `state` (`pending` or `failed`), `seq` once acknowledged, `retries`,
    /// `last_error` and, when failed, the server's `conflict`.
    pub fn export_pending(&self) -> Result<Vec<Value>> {
        Ok(run_now(self.engine().export_pending())?)
    }

    /// Sends every failed change back to the outbox for another try.
    pub fn retry_failed(&self) -> Result<u64> {
        Ok(run_now(self.engine().retry_failed())?)
    }

    /// Forgets every failed change (after the app has shown them).
    pub fn discard_failed(&self) -> Result<u64> {
        Ok(run_now(self.engine().discard_failed())?)
    }

    /// Deletes the replica (confirmed state, outbox, journal, sync state and
    /// the user it belongs to), to start over, for example for another user.
    /// The device keeps its id and the server URL. Refused with
    /// [`crate::ClientError::PendingChanges`] while changes are pending or failed,
    /// unless `force`: export them first ([`Client::export_pending`]).
    pub async fn reset(&self, force: bool) -> Result<()> {
        Ok(self.engine().reset(force).await?)
    }

    /// Syncs now: pushes the whole outbox, pulls every page, verifies, and heals
    /// if needed. A manual sync ignores and resets the backoff and the retry
    /// counts of refused changes.
    pub async fn sync(&self) -> Result<SyncReport> {
        self.sync_with(true).await
    }

    /// Syncs as the background runner does: refused changes keep their
    /// backoff and their retry counts, so a change the server keeps refusing
    /// is set aside as failed after [`crate::backoff::MAX_RETRIES`] tries. For
    /// apps (and cron jobs) that schedule syncs themselves.
    pub async fn sync_scheduled(&self) -> Result<SyncReport> {
        self.sync_with(false).await
    }

    /// Syncs; `manual` ignores (and resets) the backoff of refused changes.
    /// The outcome is kept in the local database: an error until a sync
    /// succeeds (see [`crate::Stats::last_error`]).
    pub(crate) async fn sync_with(&self, manual: bool) -> Result<SyncReport> {
        let outcome = match self.inner.options.sync_timeout {
            None => self.engine().sync_once(manual).await,
            Some(limit) => match tokio::time::timeout(limit, self.engine().sync_once(manual)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(deltasync_engine::Error::Timeout {
                    kind: deltasync_engine::TimeoutKind::Sync,
                    operation: "sync".into(),
                    after: limit,
                }),
            },
        };
        if let Some(e) = self.engine().record_outcome(&outcome).await {
            tracing::warn!(device = %self.device_id(), "cannot record the sync's outcome: {e}");
        }
        Ok(outcome?)
    }

    /// Waits up to `wait` for changes from other devices (a long-poll pull) and
    /// applies them, verified. Returns whether any arrived. The sync lock is
    /// not held while waiting, so a manual sync is never delayed by it.
    pub async fn wait_for_changes(&self, wait: Duration) -> Result<bool> {
        Ok(self.engine().wait_for_changes(wait).await?)
    }

    /// Opens the live channel (`GET /v1/live`): a WebSocket on which the
    /// server sends its head whenever it moves. A server without it answers
    /// a [`crate::ClientError`] whose status is 404.
    pub async fn open_live(&self) -> Result<crate::live::LiveSocket> {
        let api = self.engine().transport_ref().ok_or(deltasync_engine::Error::NoServer)?.server()?;
        Ok(api.open_live(self.device_id().as_str()).await?)
    }

    /// Whether the server's head, as the live channel sent it, differs from
    /// where this replica stands (a sync then has work).
    pub async fn is_behind(&self, head: &deltasync_protocol::wire::LiveHead) -> Result<bool> {
        Ok(self.engine().is_behind(head).await?)
    }

    /// This user's conflict records on the server (changes that lost or were
    /// refused for good, from any device), a page from `since`.
    pub async fn conflicts(
        &self,
        since: u64,
        limit: Option<u64>,
    ) -> Result<deltasync_protocol::wire::ConflictsResponse> {
        Ok(self.engine().conflicts(since, limit).await?)
    }

    /// How long the background runner waits after a network failure, doubling from 1 s up to `cap`.
    pub(crate) fn network_backoff(&self, failures: u32, cap: Duration, told: Option<Duration>) -> Duration {
        let unit = deltasync_engine::clock::unit_random(self.engine().clock());
        deltasync_engine::schedule::failure_delay(failures, cap, unit, told)
    }
}
