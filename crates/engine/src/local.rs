//! Local reads and writes: they never wait for the network. Each write is one
//! transaction that adds a change to the outbox; reads merge the outbox on top
//! of the confirmed state ([`crate::view`]).

use std::collections::{BTreeMap, HashMap};

use deltasync_protocol::wire::Policies;
use deltasync_protocol::{Change, ChangeId, ChangeLimits, Collection, EntityId, EntityState, Op, json};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::clock::Clock;
use crate::engine::{Engine, Notice, Origin};
use crate::error::{Error, Result};
use crate::replica::{self, keys};
use crate::store::{Access, LocalStore, OutboxEntry, OutboxStatus, StoreTx};
use crate::transport::Transport;
use crate::view::{self, Entity};

/// The largest canonical size of a change's `data` accepted locally (the server's default limit).
pub const MAX_DATA_BYTES: usize = 262_144;

/// What a local write must keep to: the server's default limits, so that a
/// change the server would refuse is refused now, not at sync.
const LOCAL_LIMITS: ChangeLimits =
    ChangeLimits { max_data_bytes: MAX_DATA_BYTES, max_depth: deltasync_protocol::json::DEFAULT_MAX_DEPTH };

/// Counters for an app's status line or a debugging session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// This device's id.
    pub device_id: deltasync_protocol::DeviceId,
    /// The server's base URL, once known.
    pub server: Option<String>,
    /// The user whose data the replica holds, once a server said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Local changes not yet in the confirmed state (sent ones included).
    pub pending: u64,
    /// Local changes refused for good, kept for the app to show.
    pub failed: u64,
    /// The seq the confirmed state stands at.
    pub cursor: u64,
    /// The chain head at `cursor`.
    pub state_hash: deltasync_protocol::StateHash,
    /// The digest of the confirmed state.
    pub state_digest: deltasync_protocol::StateDigest,
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

/// What a write does to the entity as the app sees it: the operation and its
/// data, or `None` when there is nothing to write.
type Edit = Option<(Op, Option<Value>)>;

/// A new change id after `last` (updated): 48 bits of milliseconds and 80
/// random bits (the layout of a UUIDv7) in 26 characters of Crockford's base32
/// (the ULID spelling). Ids sort by creation time, also within one
/// millisecond, so the server's idempotency index grows at its end.
pub fn next_change_id(last: &mut u128, wall_ms: u64, random: u128) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let candidate = ((wall_ms as u128 & 0xffff_ffff_ffff) << 80) | (random & ((1u128 << 80) - 1));
    *last = candidate.max(last.wrapping_add(1));
    let mut n = *last;
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

/// The upsert that makes `data` the entity's whole data.
fn put_edit(view: Option<&EntityState>, data: Map<String, Value>) -> Edit {
    let Some(view) = view.filter(|v| !v.deleted) else {
        return Some((Op::Upsert, Some(Value::Object(data))));
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
    (!delta.is_empty()).then_some((Op::Upsert, Some(Value::Object(delta))))
}

/// The upsert that writes `fields`.
fn patch_edit(view: Option<&EntityState>, fields: Map<String, Value>) -> Edit {
    let Some(view) = view.filter(|v| !v.deleted) else {
        return Some((Op::Upsert, Some(Value::Object(fields))));
    };
    let delta: Map<String, Value> =
        fields.into_iter().filter(|(name, value)| !same_value(view.data.get(name), value)).collect();
    (!delta.is_empty()).then_some((Op::Upsert, Some(Value::Object(delta))))
}

/// The policies learned from the server (the defaults before the first sync).
pub(crate) async fn policies_of(tx: &mut impl StoreTx) -> Result<Policies> {
    Ok(replica::policies(tx).await?.unwrap_or_default())
}

/// What one write of [`Engine::write_batch`] does.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteKind {
    /// As [`Engine::put`]: `data` becomes the entity's whole data.
    Put(Map<String, Value>),
    /// As [`Engine::patch`]: the given fields are written.
    Patch(Map<String, Value>),
    /// As [`Engine::delete`].
    Delete,
}

/// One write of [`Engine::write_batch`].
#[derive(Debug, Clone, PartialEq)]
pub struct LocalWrite {
    /// The entity's collection.
    pub collection: String,
    /// The entity's id.
    pub entity_id: String,
    /// What to write.
    pub edit: WriteKind,
}

impl LocalWrite {
    /// A write as apps and files give it: `{"op": "put" | "patch" | "delete",
    /// "collection", "id", "data"}` (`data` an object for `put` and `patch`).
    /// `at` names it in the error (`writes[3]`, `line 12`).
    pub fn from_json(item: Value, at: &str) -> Result<LocalWrite> {
        let Value::Object(mut item) = item else {
            return Err(Error::Invalid(format!("{at}: a write must be an object {{op, collection, id, data}}")));
        };
        let mut field = |name: &str| match item.remove(name) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let (Some(op), Some(collection), Some(entity_id)) = (field("op"), field("collection"), field("id")) else {
            return Err(Error::Invalid(format!("{at} needs string fields op, collection and id")));
        };
        let mut data = || match item.remove("data") {
            Some(Value::Object(o)) => Ok(o),
            _ => Err(Error::Invalid(format!("{at} ({op}) needs an object `data`"))),
        };
        let edit = match op.as_str() {
            "put" => WriteKind::Put(data()?),
            "patch" => WriteKind::Patch(data()?),
            "delete" => WriteKind::Delete,
            other => return Err(Error::Invalid(format!("{at}: unknown op {other:?} (put, patch or delete)"))),
        };
        Ok(LocalWrite { collection, entity_id, edit })
    }

    /// Every write of a JSON array of them (see [`LocalWrite::from_json`]).
    pub fn parse_array(value: Value) -> Result<Vec<LocalWrite>> {
        let Value::Array(items) = value else {
            return Err(Error::Invalid("writes must be an array of {op, collection, id, data}".into()));
        };
        items.into_iter().enumerate().map(|(i, item)| LocalWrite::from_json(item, &format!("writes[{i}]"))).collect()
    }
}

/// Local writes within one transaction: the policies read once, and the
/// device's clock caught up with the one the store holds, which another
/// process or browser tab of the same replica may have moved on.
struct Writer<'e, S, T, C> {
    engine: &'e Engine<S, T, C>,
    policies: Policies,
    /// The newest stamp issued, to persist at the end.
    last: Option<deltasync_protocol::Hlc>,
    /// What the writes see of each entity, read once (at once for a batch).
    seen: HashMap<(Collection, EntityId), Seen>,
}

/// An entity as the writes of one transaction see it.
struct Seen {
    /// Its confirmed version (0 when never confirmed).
    confirmed_version: u64,
    /// Its confirmed state.
    confirmed: Option<EntityState>,
    /// Its active outbox changes, this transaction's included, in order.
    changes: Vec<Change>,
    /// The newest seq the server gave one of them.
    acked: Option<u64>,
}

impl<'e, S: LocalStore, T: Transport, C: Clock> Writer<'e, S, T, C> {
    async fn begin(engine: &'e Engine<S, T, C>, tx: &mut impl StoreTx) -> Result<Self> {
        let policies = policies_of(tx).await?;
        if let Some(stored) = replica::clock(tx).await? {
            engine.device_clock().hlc.observe_stamp(&stored);
        }
        Ok(Writer { engine, policies, last: None, seen: HashMap::new() })
    }

    /// Reads the entities of `keys` not read yet, at once.
    async fn read(&mut self, tx: &mut impl StoreTx, keys: &[(&Collection, &EntityId)]) -> Result<()> {
        let mut missing: Vec<(&Collection, &EntityId)> =
            keys.iter().copied().filter(|(c, e)| !self.seen.contains_key(&((*c).clone(), (*e).clone()))).collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let names: Vec<(&str, &str)> = missing.iter().map(|(c, e)| (c.as_str(), e.as_str())).collect();
        let confirmed = tx.confirmed_many(&names).await?;
        let active = tx.active_for_entities(&missing).await?;
        for (((collection, entity_id), confirmed), active) in missing.into_iter().zip(confirmed).zip(active) {
            let seen = Seen {
                confirmed_version: confirmed.as_ref().map_or(0, |c| c.state.version),
                confirmed: confirmed.map(|c| c.state),
                acked: active.iter().filter_map(|e| e.seq).max(),
                changes: active.into_iter().map(|e| e.change).collect(),
            };
            self.seen.insert((collection.clone(), entity_id.clone()), seen);
        }
        Ok(())
    }

    /// Adds one change to the outbox; `build` sees the current view.
    async fn write(
        &mut self,
        tx: &mut impl StoreTx,
        collection: &Collection,
        entity_id: &EntityId,
        build: impl FnOnce(Option<&EntityState>) -> Edit,
    ) -> Result<Option<ChangeId>> {
        let engine = self.engine;
        self.read(tx, &[(collection, entity_id)]).await?;
        let seen = self.seen.get_mut(&(collection.clone(), entity_id.clone())).expect("read above");
        let (view, _) = view::overlay(&self.policies, seen.confirmed.clone(), seen.changes.iter());
        let Some((op, data)) = build(view.as_ref()) else {
            return Ok(None);
        };
        // The version this edit is based on: the newest acknowledged local change
        // of the entity, or the confirmed version. Pending changes before it are
        // rebased when the server gives them a seq.
        let base_version = seen.acked.unwrap_or(seen.confirmed_version);
        let hlc = engine.device_clock().tick(engine.wall_ms());
        let change = Change {
            change_id: ChangeId::parse(engine.new_change_id())?,
            collection: collection.clone(),
            entity_id: entity_id.clone(),
            op,
            data,
            hlc,
            base_version: Some(base_version),
        };
        let change = canonical(change)?;
        tx.push_outbox(&change, engine.wall_ms()).await?;
        self.last = Some(change.hlc.clone());
        let id = change.change_id.clone();
        seen.changes.push(change);
        Ok(Some(id))
    }

    /// Persists the clock's position.
    async fn finish(self, tx: &mut impl StoreTx) -> Result<()> {
        match self.last {
            Some(last) => tx.set_meta(keys::CLOCK, last.as_str()).await,
            None => Ok(()),
        }
    }
}

impl<S: LocalStore, T: Transport, C: Clock> Engine<S, T, C> {
    fn new_change_id(&self) -> String {
        let random = ((self.clock.random_u64() as u128) << 64) | self.clock.random_u64() as u128;
        let mut last = self.last_change_id.lock().unwrap_or_else(|p| p.into_inner());
        next_change_id(&mut last, self.wall_ms(), random)
    }

    /// Makes one local change in one transaction. `build` sees the current view.
    async fn write(
        &self,
        collection: &str,
        entity_id: &str,
        build: impl FnOnce(Option<&EntityState>) -> Edit,
    ) -> Result<Option<ChangeId>> {
        let collection = Collection::parse(collection)?;
        let entity_id = EntityId::parse(entity_id)?;
        let mut tx = self.store.begin(Access::Write).await?;
        let mut writer = Writer::begin(self, &mut tx).await?;
        let change = writer.write(&mut tx, &collection, &entity_id, build).await?;
        writer.finish(&mut tx).await?;
        tx.commit().await?;
        if change.is_some() {
            self.emit(Origin::Local, vec![(collection, entity_id)]);
            self.notify(Notice::LocalWrite);
        }
        Ok(change)
    }

    /// Makes many local changes in one transaction: all are kept or none
    /// (the first invalid write fails the batch). Returns each write's change
    /// id, `None` where a `put` or `patch` changed nothing. For bulk work: one
    /// transaction costs far less than one per write.
    pub async fn write_batch(&self, writes: Vec<LocalWrite>) -> Result<Vec<Option<ChangeId>>> {
        let mut parsed = Vec::with_capacity(writes.len());
        for w in writes {
            parsed.push((Collection::parse(&w.collection)?, EntityId::parse(&w.entity_id)?, w.edit));
        }
        let mut tx = self.store.begin(Access::Write).await?;
        let mut writer = Writer::begin(self, &mut tx).await?;
        let keys: Vec<(&Collection, &EntityId)> = parsed.iter().map(|(c, e, _)| (c, e)).collect();
        writer.read(&mut tx, &keys).await?;
        let mut ids = Vec::with_capacity(parsed.len());
        let mut touched = Vec::new();
        for (collection, entity_id, edit) in parsed {
            let id = match edit {
                WriteKind::Put(data) => writer.write(&mut tx, &collection, &entity_id, |v| put_edit(v, data)).await?,
                WriteKind::Patch(fields) => {
                    writer.write(&mut tx, &collection, &entity_id, |v| patch_edit(v, fields)).await?
                }
                WriteKind::Delete => {
                    writer.write(&mut tx, &collection, &entity_id, |_| Some((Op::Delete, None))).await?
                }
            };
            if id.is_some() {
                touched.push((collection, entity_id));
            }
            ids.push(id);
        }
        writer.finish(&mut tx).await?;
        tx.commit().await?;
        if !touched.is_empty() {
            self.emit(Origin::Local, touched);
            self.notify(Notice::LocalWrite);
        }
        Ok(ids)
    }

    /// Makes `data` the entity's whole data: one upsert with the fields that
    /// differ from the current view, plus `null` for each field the view has
    /// and `data` lacks. Returns the change's id, or `None` when nothing changed.
    pub async fn put(&self, collection: &str, entity_id: &str, data: Map<String, Value>) -> Result<Option<ChangeId>> {
        self.write(collection, entity_id, |view| put_edit(view, data)).await
    }

    /// Writes the given fields (creating or reviving the entity): one upsert
    /// with the fields that differ from the current view. Returns the change's
    /// id, or `None` when nothing changed.
    pub async fn patch(
        &self,
        collection: &str,
        entity_id: &str,
        fields: Map<String, Value>,
    ) -> Result<Option<ChangeId>> {
        self.write(collection, entity_id, |view| patch_edit(view, fields)).await
    }

    /// Deletes the entity (a tombstone, also for an entity never seen).
    pub async fn delete(&self, collection: &str, entity_id: &str) -> Result<ChangeId> {
        let id = self.write(collection, entity_id, |_| Some((Op::Delete, None))).await?;
        Ok(id.expect("a delete always writes"))
    }

    /// Logs an `append`: opaque data that the server keeps in the log but never
    /// merges into entity state.
    pub async fn append(&self, collection: &str, entity_id: &str, data: Value) -> Result<ChangeId> {
        let id = self.write(collection, entity_id, |_| Some((Op::Append, Some(data)))).await?;
        Ok(id.expect("an append always writes"))
    }

    /// The entity as the app sees it, or `None` when it is absent or deleted.
    pub async fn get(&self, collection: &str, entity_id: &str) -> Result<Option<Entity>> {
        let collection = Collection::parse(collection)?;
        let entity_id = EntityId::parse(entity_id)?;
        let mut tx = self.store.begin(Access::Read).await?;
        let policies = policies_of(&mut tx).await?;
        let confirmed = tx.confirmed(collection.as_str(), entity_id.as_str()).await?.map(|c| c.state);
        let active = tx.active_for_entity(&collection, &entity_id).await?;
        let (state, pending) = view::overlay(&policies, confirmed, active.iter().map(|e| &e.change));
        Ok(view::to_entity(state, pending).filter(|e| !e.deleted))
    }

    /// The live entities of a collection, sorted by id in code-point order.
    pub async fn list(&self, collection: &str) -> Result<Vec<Entity>> {
        let collection = Collection::parse(collection)?;
        let mut tx = self.store.begin(Access::Read).await?;
        let policies = policies_of(&mut tx).await?;
        let mut states: BTreeMap<String, (Option<EntityState>, Vec<Change>)> = tx
            .confirmed_in(collection.as_str())
            .await?
            .into_iter()
            .map(|s| (s.entity_id.as_str().to_owned(), (Some(s), Vec::new())))
            .collect();
        for entry in tx.active_in(collection.as_str()).await? {
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
    pub async fn stats(&self) -> Result<Stats> {
        let mut tx = self.store.begin(Access::Read).await?;
        let state = replica::sync_state(&mut tx).await?;
        let (pending, failed) = tx.outbox_counts().await?;
        let failure = replica::sync_failure(&mut tx).await?;
        Ok(Stats {
            device_id: state.device_id,
            server: state.server_url,
            user_id: state.user_id,
            pending,
            failed,
            cursor: state.cursor,
            state_hash: state.state_hash,
            state_digest: state.state_digest,
            last_sync_at: state.last_sync_at,
            failing_since: failure.as_ref().map(|f| f.since),
            failed_syncs: failure.as_ref().map_or(0, |f| f.count),
            last_error: failure.map(|f| LastError { code: f.code, message: f.message, at: f.at }),
            journal: tx.journal_len().await?,
        })
    }

    /// Every outbox entry, in the order the changes were made.
    pub async fn outbox(&self) -> Result<Vec<OutboxEntry>> {
        self.store.begin(Access::Read).await?.all_entries().await
    }

    /// The pending and failed changes as JSON: each the protocol's change plus
    /// `state` (`pending` or `failed`), `seq` once acknowledged, `retries`,
    /// `last_error` and, when failed, the server's `conflict`.
    pub async fn export_pending(&self) -> Result<Vec<Value>> {
        Ok(self.outbox().await?.iter().map(export_entry).collect())
    }

    /// Sends every failed change back to the outbox for another try.
    pub async fn retry_failed(&self) -> Result<u64> {
        let mut tx = self.store.begin(Access::Write).await?;
        let n = tx.requeue_failed().await?;
        tx.commit().await?;
        self.notify(Notice::LocalWrite);
        Ok(n)
    }

    /// Forgets every failed change (after the app has shown them).
    pub async fn discard_failed(&self) -> Result<u64> {
        let mut tx = self.store.begin(Access::Write).await?;
        let n = tx.discard_failed().await?;
        tx.commit().await?;
        Ok(n)
    }
}

/// The change as the server would take it: validated by the server's own
/// rules, and its data in canonical form, as the server serves it, so that the
/// writing device reads the same text as every other device. Its ids and
/// stamp were checked when they were made; its data is checked here.
fn canonical(mut change: Change) -> Result<Change> {
    if let Some(text) = Change::check_data(change.op, change.data.as_ref(), &LOCAL_LIMITS)? {
        change.data = Some(serde_json::from_str(&text).expect("JCS text is JSON"));
    }
    Ok(change)
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
    fn a_local_write_is_kept_canonical_and_refused_past_the_servers_limits() {
        use crate::conformance::TestClock;
        use crate::memory::MemoryStore;
        use crate::transport::NoServer;
        futures_executor::block_on(async {
            let engine: Engine<MemoryStore, NoServer, TestClock> =
                Engine::open(MemoryStore::new(), None, TestClock::at(1_763_800_000_000), Default::default())
                    .await
                    .unwrap();
            let data = serde_json::from_str::<Value>(r#"{"n": 1.50, "big": 1e2, "s": "\u00e9"}"#).unwrap();
            engine.put("tasks", "t", data.as_object().cloned().unwrap()).await.unwrap();
            let written = engine.outbox().await.unwrap().remove(0).change.data.unwrap();
            assert_eq!(json::to_jcs(&written), r#"{"big":100,"n":1.5,"s":"é"}"#);
            assert_eq!(
                serde_json::to_string(&written).unwrap(),
                json::to_jcs(&written),
                "stored as the server serves it"
            );

            let mut deep = Value::from(1);
            for _ in 0..100 {
                deep = serde_json::json!({ "d": deep });
            }
            let err = engine.put("tasks", "deep", deep.as_object().cloned().unwrap()).await.unwrap_err();
            assert!(err.to_string().contains("deep"), "{err}");
            let big = serde_json::json!({ "body": "x".repeat(MAX_DATA_BYTES) });
            let err = engine.put("tasks", "big", big.as_object().cloned().unwrap()).await.unwrap_err();
            assert!(err.to_string().contains("bytes"), "{err}");
            assert_eq!(engine.outbox().await.unwrap().len(), 1, "a refused write leaves nothing behind");
        });
    }

    #[test]
    fn change_ids_are_26_characters_and_sort_by_creation() {
        let mut last = 0;
        let ids: Vec<String> =
            (0..200u64).map(|i| next_change_id(&mut last, 1_763_800_000_000 + i / 50, u128::MAX - i as u128)).collect();
        assert!(ids.iter().all(|id| id.len() == 26 && ChangeId::parse(id.as_str()).is_ok()));
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "ids made in order must sort in order, within one millisecond too");
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }

    #[test]
    fn writes_parse_from_the_json_apps_and_files_give() {
        let writes = LocalWrite::parse_array(serde_json::json!([
            {"op": "put", "collection": "tasks", "id": "a", "data": {"title": "x"}},
            {"op": "patch", "collection": "tasks", "id": "b", "data": {"done": true}},
            {"op": "delete", "collection": "tasks", "id": "c"},
        ]))
        .unwrap();
        let kinds: Vec<_> = writes.iter().map(|w| (w.entity_id.as_str(), &w.edit)).collect();
        assert!(matches!(kinds[0], ("a", WriteKind::Put(d)) if d["title"] == "x"));
        assert!(matches!(kinds[1], ("b", WriteKind::Patch(d)) if d["done"] == true));
        assert!(matches!(kinds[2], ("c", WriteKind::Delete)));
    }

    #[test]
    fn a_bad_write_is_named_in_its_error() {
        let message = |value: Value| match LocalWrite::from_json(value, "line 7") {
            Err(Error::Invalid(m)) => m,
            other => panic!("expected an invalid-input error, got {other:?}"),
        };
        assert!(message(serde_json::json!([1])).starts_with("line 7: a write must be an object"));
        assert!(message(serde_json::json!({"op": "put", "id": "a"})).contains("line 7 needs string fields"));
        assert!(
            message(serde_json::json!({"op": "put", "collection": "t", "id": "a"})).contains("needs an object `data`")
        );
        assert!(
            message(serde_json::json!({"op": "upsert", "collection": "t", "id": "a"}))
                .contains("unknown op \"upsert\"")
        );
        assert!(matches!(LocalWrite::parse_array(serde_json::json!({})), Err(Error::Invalid(_))));
    }
}
