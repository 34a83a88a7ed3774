//! [`Client`]: the handle an app holds. Local reads and writes, stats and
//! events live here; [`crate::sync`] adds the network side.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deltasync_protocol::wire::Policies;
use deltasync_protocol::{
    Change, ChangeId, ChangeLimits, Collection, DeviceId, EntityId, EntityState, Hlc, HlcClock, Op, StateDigest,
    StateHash, json,
};
use rusqlite::{Connection, TransactionBehavior};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::{Notify, broadcast};

use crate::error::{ClientError, Result};
use crate::http::{HttpOptions, ServerApi};
use crate::local::{self, OutboxEntry, OutboxStatus};
use crate::view::{self, Entity};

/// The largest canonical size of a change's `data` the client accepts (the server's default limit).
pub const MAX_DATA_BYTES: usize = 262_144;

/// What a local write must keep to: the server's default limits, so that a
/// change the server would refuse is refused now, not at sync.
const LOCAL_LIMITS: ChangeLimits =
    ChangeLimits { max_data_bytes: MAX_DATA_BYTES, max_depth: deltasync_protocol::json::DEFAULT_MAX_DEPTH };

/// The default of [`ClientOptions::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The default of [`ClientOptions::stall_timeout`].
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The default of [`ClientOptions::journal_limit`].
pub const DEFAULT_JOURNAL_LIMIT: u64 = 10_000;

/// How a [`Client`] is set up. `Default` gives sensible values for an app.
#[derive(Clone)]
pub struct ClientOptions {
    /// The server's base URL (`http://host:port`). Kept in the local database,
    /// so later opens may leave it out.
    pub server: Option<String>,
    /// A bearer token for servers running with `--auth jwt`.
    pub token: Option<String>,
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
    /// The wall clock in ms since the epoch; replaceable for tests.
    pub wall_clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Called as long work advances (each page of a sync, every 10,000
    /// entities of a bootstrap), for a progress display.
    pub progress: Option<Arc<dyn Fn(Progress) + Send + Sync>>,
}

/// How far a sync has got, reported to [`ClientOptions::progress`].
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
        /// Entities written to the local database.
        entities: u64,
    },
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            server: None,
            token: None,
            batch_size: 500,
            http2_prior_knowledge: false,
            page_limit: deltasync_protocol::wire::MAX_PULL_LIMIT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            sync_timeout: None,
            journal_limit: DEFAULT_JOURNAL_LIMIT,
            wall_clock: Arc::new(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)),
            progress: None,
        }
    }
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("batch_size", &self.batch_size)
            .field("page_limit", &self.page_limit)
            .field("request_timeout", &self.request_timeout)
            .field("stall_timeout", &self.stall_timeout)
            .field("sync_timeout", &self.sync_timeout)
            .field("journal_limit", &self.journal_limit)
            .finish_non_exhaustive()
    }
}

/// Where a change that the app is told about came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A write made on this device.
    Local,
    /// Changes pulled from the server.
    Server,
    /// The confirmed state was replaced by a bootstrap: re-read everything.
    Reset,
}

/// Which entities changed, sent to every [`Client::subscribe`]r.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    /// Where the change came from.
    pub origin: Origin,
    /// The entities whose view may have changed (empty for [`Origin::Reset`]).
    pub entities: Vec<(Collection, EntityId)>,
}

/// Counters for an app's status line or a debugging session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// This device's id.
    pub device_id: DeviceId,
    /// The server's base URL, once known.
    pub server: Option<String>,
    /// Local changes not yet in the confirmed state (sent ones included).
    pub pending: u64,
    /// Local changes refused for good, kept for the app to show.
    pub failed: u64,
    /// The seq the confirmed state stands at.
    pub cursor: u64,
    /// The chain head at `cursor`.
    pub state_hash: StateHash,
    /// The digest of the confirmed state.
    pub state_digest: StateDigest,
    /// When the last successful sync finished (ms since the epoch), or `None`.
    pub last_sync_at: Option<u64>,
    /// The error of the last sync, when it failed (cleared by a successful sync).
    pub last_error: Option<LastError>,
    /// When the syncs started failing (the end of the first failed sync in a
    /// row, ms since the epoch), while they do.
    pub failing_since: Option<u64>,
    /// How many syncs in a row failed (0 after a successful one).
    pub failed_syncs: u64,
    /// Acknowledged changes kept in the journal, for a server restored from a backup.
    pub journal: u64,
}

/// The error a sync failed with, as [`Stats`] shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastError {
    /// The error's code, as the command line prints it (`protocol`, `unreachable`, …).
    pub code: String,
    /// What went wrong.
    pub message: String,
    /// When that sync ended, ms since the epoch.
    pub at: u64,
}

pub(crate) struct ClockState {
    pub(crate) clock: HlcClock,
    /// Correction added to the wall clock (negative when it runs ahead of the server's).
    pub(crate) offset_ms: i64,
}

pub(crate) struct Inner {
    pub(crate) db: Mutex<Connection>,
    pub(crate) api: Option<ServerApi>,
    pub(crate) device: DeviceId,
    pub(crate) clock: Mutex<ClockState>,
    pub(crate) events: broadcast::Sender<ChangeEvent>,
    pub(crate) local_writes: Notify,
    pub(crate) sync_lock: tokio::sync::Mutex<()>,
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A new change id: the 128 bits of a UUIDv7 in 26 characters of Crockford's
/// base32 (the ULID spelling). Ids sort by creation time, so the server's
/// idempotency index grows at its end, and they are 10 bytes shorter on the
/// wire than the hyphenated UUID.
fn time_ordered_id() -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut n = uuid::Uuid::now_v7().as_u128();
    let mut out = [0u8; 26];
    for digit in out.iter_mut().rev() {
        *digit = ALPHABET[(n & 31) as usize];
        n >>= 5;
    }
    out.iter().map(|&b| b as char).collect()
}

/// JSON values compared as the protocol does: by their canonical form (`1.0` equals `1`).
fn same_value(a: Option<&Value>, b: &Value) -> bool {
    a.is_some_and(|a| a == b || json::to_jcs(a) == json::to_jcs(b))
}

impl Client {
    /// Opens (creating if needed) the local database at `path`.
    ///
    /// The first open makes the device id, which is kept for good. A server URL
    /// given in `options` replaces the one kept in the database.
    pub fn open(path: impl AsRef<Path>, options: ClientOptions) -> Result<Client> {
        let conn = local::open(path.as_ref())?;
        if let Some(url) = &options.server {
            local::set_meta(&conn, "server_url", url.trim_end_matches('/'))?;
        }
        let state = local::sync_state(&conn)?;
        let api = state
            .server_url
            .as_deref()
            .map(|url| {
                let http = HttpOptions {
                    http2_prior_knowledge: options.http2_prior_knowledge,
                    request_timeout: options.request_timeout,
                    stall_timeout: options.stall_timeout,
                };
                ServerApi::new(url, options.token.clone(), http)
            })
            .transpose()?;
        let clock = match local::clock(&conn)? {
            Some(last) => HlcClock::resume(state.device_id.clone(), &last),
            None => HlcClock::new(state.device_id.clone()),
        };
        let offset_ms = local::meta(&conn, "clock_offset_ms")?.and_then(|s| s.parse().ok()).unwrap_or(0);
        let (events, _) = broadcast::channel(1024);
        Ok(Client {
            inner: Arc::new(Inner {
                db: Mutex::new(conn),
                api,
                device: state.device_id,
                clock: Mutex::new(ClockState { clock, offset_ms }),
                events,
                local_writes: Notify::new(),
                sync_lock: tokio::sync::Mutex::new(()),
                options,
            }),
        })
    }

    /// This device's id.
    pub fn device_id(&self) -> &DeviceId {
        &self.inner.device
    }

    pub(crate) fn db(&self) -> MutexGuard<'_, Connection> {
        lock(&self.inner.db)
    }

    pub(crate) fn wall_ms(&self) -> u64 {
        (self.inner.options.wall_clock)()
    }

    /// The wall clock corrected by what the server's clock told us.
    pub(crate) fn corrected_now(&self, clock: &ClockState) -> u64 {
        self.wall_ms().saturating_add_signed(clock.offset_ms)
    }

    /// Takes in stamps received from the server, so later local stamps are
    /// greater; returns the clock's position to persist.
    pub(crate) fn observe_stamps<'a>(&self, stamps: impl IntoIterator<Item = &'a Hlc>) -> Hlc {
        let mut c = lock(&self.inner.clock);
        for stamp in stamps {
            c.clock.observe_stamp(stamp);
        }
        c.clock.position()
    }

    pub(crate) fn tick(&self) -> Hlc {
        let mut c = lock(&self.inner.clock);
        let now = self.corrected_now(&c);
        c.clock.tick(now)
    }

    pub(crate) fn progress(&self, p: Progress) {
        if let Some(f) = &self.inner.options.progress {
            f(p);
        }
    }

    pub(crate) fn emit(&self, origin: Origin, entities: Vec<(Collection, EntityId)>) {
        let _ = self.inner.events.send(ChangeEvent { origin, entities });
    }

    /// The policies learned from the server (the defaults before the first sync).
    pub(crate) fn policies(conn: &Connection) -> Result<Policies> {
        Ok(local::policies(conn)?.unwrap_or_default())
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

    /// Makes one local change in one transaction. `build` sees the current view
    /// and returns the operation and data, or `None` when there is nothing to write.
    fn write(
        &self,
        collection: &str,
        entity_id: &str,
        build: impl FnOnce(Option<&EntityState>) -> Result<Option<(Op, Option<Value>)>>,
    ) -> Result<Option<ChangeId>> {
        let collection = Collection::parse(collection)?;
        let entity_id = EntityId::parse(entity_id)?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let policies = Self::policies(&tx)?;
        let confirmed = local::confirmed(&tx, collection.as_str(), entity_id.as_str())?;
        let active = local::active_for_entity(&tx, &collection, &entity_id)?;
        let confirmed_version = confirmed.as_ref().map_or(0, |c| c.state.version);
        let (view, _) =
            view::overlay(&policies, confirmed.map(|c| c.state), active.iter().map(|e: &OutboxEntry| &e.change));
        let Some((op, data)) = build(view.as_ref())? else {
            return Ok(None);
        };
        // The version this edit is based on: the newest acknowledged local change
        // of the entity, or the confirmed version. Pending changes before it are
        // rebased when the server gives them a seq.
        let base_version = active.iter().filter_map(|e| e.seq).max().unwrap_or(confirmed_version);
        let hlc = self.tick();
        let change = Change {
            change_id: ChangeId::parse(time_ordered_id())?,
            collection: collection.clone(),
            entity_id: entity_id.clone(),
            op,
            data,
            hlc,
            base_version: Some(base_version),
        };
        // The server's own validation, so a bad value is refused now rather than at sync.
        let mut change = Change::from_json(&serde_json::to_value(&change).expect("change serialises"), &LOCAL_LIMITS)?;
        // Keep data in canonical form, as the server serves it, so that the
        // writing device reads the same text as every other device.
        change.data = change.data.map(|d| serde_json::from_str(&json::to_jcs(&d)).expect("JCS text is JSON"));
        local::push_outbox(&tx, &change, self.wall_ms())?;
        local::set_meta(&tx, "clock", change.hlc.as_str())?;
        tx.commit()?;
        drop(db);
        self.emit(Origin::Local, vec![(collection, entity_id)]);
        self.inner.local_writes.notify_one();
        Ok(Some(change.change_id))
    }

    /// Makes `data` the entity's whole data: one upsert with the fields that
    /// differ from the current view, plus `null` for each field the view has
    /// and `data` lacks. Returns the change's id, or `None` when nothing changed.
    pub fn put(&self, collection: &str, entity_id: &str, data: Map<String, Value>) -> Result<Option<ChangeId>> {
        self.write(collection, entity_id, |view| {
            let Some(view) = view.filter(|v| !v.deleted) else {
                return Ok(Some((Op::Upsert, Some(Value::Object(data)))));
            };
            let mut delta = Map::new();
            for (name, value) in &view.data {
                if !data.contains_key(name) && !value.is_null() {
                    delta.insert(name.clone(), Value::Null);
                }
            }
            for (name, value) in data {
                if !same_value(view.data.get(&name), &value) {
                    delta.insert(name, value);
                }
            }
            Ok((!delta.is_empty()).then_some((Op::Upsert, Some(Value::Object(delta)))))
        })
    }

    /// Writes the given fields (creating or reviving the entity): one upsert with
    /// the fields that differ from the current view. Returns the change's id, or
    /// `None` when nothing changed.
    pub fn patch(&self, collection: &str, entity_id: &str, fields: Map<String, Value>) -> Result<Option<ChangeId>> {
        self.write(collection, entity_id, |view| {
            let Some(view) = view.filter(|v| !v.deleted) else {
                return Ok(Some((Op::Upsert, Some(Value::Object(fields)))));
            };
            let delta: Map<String, Value> =
                fields.into_iter().filter(|(name, value)| !same_value(view.data.get(name), value)).collect();
            Ok((!delta.is_empty()).then_some((Op::Upsert, Some(Value::Object(delta)))))
        })
    }

    /// Deletes the entity (a tombstone, also for an entity never seen).
    pub fn delete(&self, collection: &str, entity_id: &str) -> Result<ChangeId> {
        let id = self.write(collection, entity_id, |_| Ok(Some((Op::Delete, None))))?;
        Ok(id.expect("a delete always writes"))
    }

    /// Logs an `append`: opaque data (for example a CRDT operation) that the
    /// server keeps in the log but never merges into entity state.
    pub fn append(&self, collection: &str, entity_id: &str, data: Value) -> Result<ChangeId> {
        let id = self.write(collection, entity_id, |_| Ok(Some((Op::Append, Some(data)))))?;
        Ok(id.expect("an append always writes"))
    }

    /// The entity as the app sees it, or `None` when it is absent or deleted.
    pub fn get(&self, collection: &str, entity_id: &str) -> Result<Option<Entity>> {
        let collection = Collection::parse(collection)?;
        let entity_id = EntityId::parse(entity_id)?;
        let db = self.db();
        let policies = Self::policies(&db)?;
        let confirmed = local::confirmed(&db, collection.as_str(), entity_id.as_str())?.map(|c| c.state);
        let active = local::active_for_entity(&db, &collection, &entity_id)?;
        let (state, pending) = view::overlay(&policies, confirmed, active.iter().map(|e| &e.change));
        Ok(view::to_entity(state, pending).filter(|e| !e.deleted))
    }

    /// The live entities of a collection, sorted by id in code-point order.
    pub fn list(&self, collection: &str) -> Result<Vec<Entity>> {
        let collection = Collection::parse(collection)?;
        let db = self.db();
        let policies = Self::policies(&db)?;
        let mut states: std::collections::BTreeMap<String, (Option<EntityState>, Vec<Change>)> =
            local::confirmed_in(&db, collection.as_str())?
                .into_iter()
                .map(|s| (s.entity_id.as_str().to_owned(), (Some(s), Vec::new())))
                .collect();
        for entry in local::active_in(&db, collection.as_str())? {
            states.entry(entry.change.entity_id.as_str().to_owned()).or_default().1.push(entry.change);
        }
        Ok(states
            .into_values()
            .filter_map(|(confirmed, pending)| {
                let (state, n) = view::overlay(&policies, confirmed, pending.iter());
                view::to_entity(state, n)
            })
            .filter(|e| !e.deleted)
            .collect())
    }

    /// Counters for a status line.
    pub fn stats(&self) -> Result<Stats> {
        let db = self.db();
        let state = local::sync_state(&db)?;
        let (pending, failed) = local::outbox_counts(&db)?;
        let failure = local::sync_failure(&db)?;
        Ok(Stats {
            device_id: state.device_id,
            server: state.server_url,
            pending,
            failed,
            cursor: state.cursor,
            state_hash: state.state_hash,
            state_digest: state.state_digest,
            last_sync_at: state.last_sync_at,
            failing_since: failure.as_ref().map(|f| f.since),
            failed_syncs: failure.as_ref().map_or(0, |f| f.count),
            last_error: failure.map(|f| LastError { code: f.code, message: f.message, at: f.at }),
            journal: local::journal_len(&db)?,
        })
    }

    /// Every outbox entry, in the order the changes were made.
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>> {
        local::all_entries(&self.db())
    }

    /// The pending and failed changes as JSON: each the protocol's change plus
    /// `state` (`pending` or `failed`), `seq` once acknowledged, `retries`,
    /// `last_error` and, when failed, the server's `conflict`.
    pub fn export_pending(&self) -> Result<Vec<Value>> {
        Ok(self.outbox()?.into_iter().map(|entry| export_entry(&entry)).collect())
    }

    /// Sends every failed change back to the outbox for another try.
    pub fn retry_failed(&self) -> Result<u64> {
        let n = local::requeue_failed(&self.db())?;
        self.inner.local_writes.notify_one();
        Ok(n)
    }

    /// Forgets every failed change (after the app has shown them).
    pub fn discard_failed(&self) -> Result<u64> {
        local::discard_failed(&self.db())
    }

    pub(crate) fn api(&self) -> Result<&ServerApi> {
        self.inner.api.as_ref().ok_or(ClientError::NoServer)
    }

    /// How long the background runner waits after a network failure, doubling from 1 s up to `cap`.
    pub(crate) fn network_backoff(failures: u32, cap: Duration) -> Duration {
        crate::backoff::delay(failures, Duration::from_secs(1), cap)
    }
}

fn export_entry(entry: &OutboxEntry) -> Value {
    let mut obj = match serde_json::to_value(&entry.change).expect("change serialises") {
        Value::Object(o) => o,
        _ => unreachable!("a change is an object"),
    };
    let state = if entry.status == OutboxStatus::Failed { "failed" } else { "pending" };
    obj.insert("state".into(), state.into());
    if let Some(seq) = entry.seq {
        obj.insert("seq".into(), seq.into());
    }
    obj.insert("retries".into(), entry.retries.into());
    obj.insert("last_error".into(), entry.last_error.clone().map_or(Value::Null, Value::String));
    if entry.status == OutboxStatus::Failed {
        let conflict = entry.conflict.as_ref().map_or(Value::Null, |c| serde_json::to_value(c).expect("serialises"));
        obj.insert("conflict".into(), conflict);
    }
    Value::Object(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_ids_are_26_characters_and_sort_by_creation() {
        let ids: Vec<String> = (0..200).map(|_| time_ordered_id()).collect();
        assert!(ids.iter().all(|id| id.len() == 26 && ChangeId::parse(id.as_str()).is_ok()));
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "UUIDv7s made in order must sort in order");
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }
}
