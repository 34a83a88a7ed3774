//! [`IdbStore`]: a [`LocalStore`] in IndexedDB, one database per store.
//!
//! Each [`StoreTx`] is one IndexedDB transaction over every object store.
//! Reads await their requests as promises: Chromium keeps a transaction
//! active while promise reactions run, so the engine's awaits between
//! requests do not let it auto-commit. Writes are queued without waiting
//! (requests run in order; a failed one aborts the transaction). [`StoreTx::commit`] waits for
//! the `complete` event; a write transaction dropped uncommitted is aborted,
//! which rolls it back. Outbox ids come from the `outbox` store's key
//! generator, which neither `clear()` nor deletes reset: ids are never reused.

use std::cell::RefCell;
use std::collections::HashMap;

use deltasync_engine::{Access, Confirmed, Error, Journaled, LocalStore, OutboxEntry, OutboxStatus, Result, StoreTx};
use deltasync_protocol::{Change, Collection, Conflict, EntityId, EntityState};
use js_sys::{Array, Promise};
use wasm_bindgen::prelude::*;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{IdbDatabase, IdbFactory, IdbKeyRange, IdbObjectStore, IdbRequest, IdbTransaction, IdbTransactionMode};

use crate::records::{
    JournalRow, OutboxRow, decode_confirmed, decode_segment, encode_confirmed, encode_segment, parse_row, row_json,
};
use crate::schema::{
    APPENDS, ENTITIES, JOURNAL, JOURNAL_BY_SEQ, META, OUTBOX, OUTBOX_BY_CHANGE, OUTBOX_BY_ENTITY, SEGMENTS,
    STAGED_APPENDS, STAGED_ENTITIES, STORES, open_database,
};
use crate::segments::{EntityKey, MAX_LIVE_ENTITIES, SEGMENT_ENTITIES, SEGMENT_THRESHOLD, SegmentCache};

#[wasm_bindgen(inline_js = r#"
export function settled(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}
export function finished(tx) {
  return new Promise((resolve) => {
    tx.oncomplete = () => resolve("complete");
    tx.onabort = () => resolve("aborted: " + (tx.error ? tx.error.name + ": " + tx.error.message : "abort()"));
  });
}
export function transaction(db, names, mode, durability) {
  return db.transaction(names, mode, { durability });
}
export function commit_now(tx) {
  if (typeof tx.commit === "function") tx.commit();
}
"#)]
extern "C" {
    /// A promise of a request's result (rejected with its error).
    fn settled(req: &IdbRequest) -> Promise;
    /// A promise of how a transaction ended: `complete`, or why it aborted.
    fn finished(tx: &IdbTransaction) -> Promise;
    /// A transaction over `names` with a durability hint (ignored by browsers without one).
    #[wasm_bindgen(catch)]
    fn transaction(
        db: &IdbDatabase,
        names: &Array,
        mode: IdbTransactionMode,
        durability: &str,
    ) -> std::result::Result<IdbTransaction, JsValue>;
    /// Asks a transaction to commit now, where the browser can.
    #[wasm_bindgen(catch)]
    fn commit_now(tx: &IdbTransaction) -> std::result::Result<(), JsValue>;
}

/// A store error from what JavaScript threw.
pub(crate) fn js_error(value: JsValue) -> Error {
    let text = if let Some(s) = value.as_string() {
        s
    } else if let Some(e) = value.dyn_ref::<js_sys::Error>() {
        String::from(e.message())
    } else if let Some(e) = value.dyn_ref::<web_sys::DomException>() {
        format!("{}: {}", e.name(), e.message())
    } else {
        format!("{value:?}")
    };
    Error::Store(format!("IndexedDB: {text}").into())
}

/// Awaits one request's result.
pub(crate) async fn wait(request: std::result::Result<IdbRequest, JsValue>) -> Result<JsValue> {
    let request = request.map_err(js_error)?;
    JsFuture::from(settled(&request)).await.map_err(js_error)
}

/// The browser's (or worker's) IndexedDB.
pub(crate) fn factory() -> Result<IdbFactory> {
    let value = js_sys::Reflect::get(&js_sys::global(), &"indexedDB".into()).map_err(js_error)?;
    value.dyn_into::<IdbFactory>().map_err(|_| Error::Store("IndexedDB is not available here".into()))
}

/// A replica kept in one IndexedDB database, opened on the first transaction.
#[derive(Debug)]
pub struct IdbStore {
    name: String,
    db: RefCell<Option<IdbDatabase>>,
    /// Closed by [`IdbStore::close`]: no transaction begins any more.
    closed: std::cell::Cell<bool>,
    /// The live segments, as this tab last saw them ([`crate::segments`]).
    segments: RefCell<SegmentCache>,
}

impl IdbStore {
    /// The store in the database named `name` (created on first use).
    pub fn new(name: &str) -> Self {
        IdbStore {
            name: name.to_owned(),
            db: RefCell::new(None),
            closed: Default::default(),
            segments: Default::default(),
        }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the connection (once its transactions have ended); a
    /// transaction begun afterwards fails.
    pub fn close(&self) {
        self.closed.set(true);
        if let Some(db) = self.db.borrow_mut().take() {
            db.close();
        }
    }

    /// Folds the oldest live segment into the entity rows, in one
    /// transaction ([`crate::segments`]). Returns how many entities the live
    /// segments still hold: 0 when there is nothing left to fold.
    pub async fn fold_segment(&self) -> Result<usize> {
        let mut tx = self.transaction(Access::Refetchable).await?;
        tx.view().await?;
        let oldest = self.segments.borrow().oldest().map(|(key, entities)| (key, entities.to_vec()));
        let Some((key, entities)) = oldest else { return Ok(0) };
        for ((collection, entity_id), state) in &entities {
            tx.put(ENTITIES, &state.as_str().into(), &entity_key(collection, entity_id)).await?;
        }
        tx.delete(SEGMENTS, &seq_key(key)).await?;
        tx.commit().await?;
        let mut cache = self.segments.borrow_mut();
        cache.remove(key);
        Ok(cache.entries())
    }

    /// How many entities the live segments hold, as this tab last saw them.
    pub fn unfolded(&self) -> usize {
        self.segments.borrow().entries()
    }

    /// A transaction over every object store.
    async fn transaction(&self, access: Access) -> Result<IdbTx<'_>> {
        let db = self.database().await?;
        // A local write is flushed before it counts as done ("strict"); what the
        // server can send again is left to the browser to flush ("relaxed"),
        // which halves the cost of applying a page.
        let (mode, durability) = match access {
            Access::Read => (IdbTransactionMode::Readonly, "default"),
            Access::Write => (IdbTransactionMode::Readwrite, "strict"),
            Access::Refetchable => (IdbTransactionMode::Readwrite, "relaxed"),
        };
        let names: Array = STORES.iter().map(|s| JsValue::from_str(s)).collect();
        let tx = transaction(&db, &names, mode, durability).map_err(js_error)?;
        let done = finished(&tx);
        Ok(IdbTx {
            tx,
            done,
            access,
            ended: false,
            store: self,
            synced: false,
            cleared: false,
            confirmed: HashMap::new(),
        })
    }

    async fn database(&self) -> Result<IdbDatabase> {
        if self.closed.get() {
            return Err(Error::Store(format!("the IndexedDB database {:?} was closed", self.name).into()));
        }
        if let Some(db) = self.db.borrow().as_ref() {
            return Ok(db.clone());
        }
        let opened = open_database(&self.name).await?;
        let mut slot = self.db.borrow_mut();
        match slot.as_ref() {
            // Another transaction opened it while this one waited.
            Some(db) => {
                opened.close();
                Ok(db.clone())
            }
            None => Ok(slot.insert(opened).clone()),
        }
    }
}

impl Drop for IdbStore {
    fn drop(&mut self) {
        // The connection closes once its transactions have ended.
        if let Some(db) = self.db.get_mut().take() {
            db.close();
        }
    }
}

impl LocalStore for IdbStore {
    type Tx<'a> = IdbTx<'a>;

    async fn begin(&self, access: Access) -> Result<IdbTx<'_>> {
        // A long first sync must not hold every page in memory: past the
        // bound, its pages wait for folds.
        if access == Access::Refetchable && self.unfolded() > MAX_LIVE_ENTITIES {
            while self.fold_segment().await? > MAX_LIVE_ENTITIES / 2 {}
        }
        self.transaction(access).await
    }
}

/// One IndexedDB transaction over every object store of an [`IdbStore`].
pub struct IdbTx<'a> {
    tx: IdbTransaction,
    /// Settles with how the transaction ended.
    done: Promise,
    access: Access,
    /// Committed: nothing to undo on drop.
    ended: bool,
    store: &'a IdbStore,
    /// Whether the store's segment cache was brought up to date in this transaction.
    synced: bool,
    /// Whether this transaction cleared the confirmed state (rows and segments).
    cleared: bool,
    /// The entities this transaction confirmed (encoded), written at commit
    /// as rows or segments.
    confirmed: HashMap<EntityKey, String>,
}

impl Drop for IdbTx<'_> {
    fn drop(&mut self) {
        if !self.ended && self.access.writes() {
            // Fails only when the transaction already ended (it then kept nothing it was not told to).
            let _ = self.tx.abort();
        }
    }
}

/// A JS number for an id or a seq (both far below 2^53).
fn num(n: impl Into<f64>) -> JsValue {
    JsValue::from_f64(n.into())
}

fn id_key(id: i64) -> JsValue {
    num(id as f64)
}

fn seq_key(seq: u64) -> JsValue {
    num(seq as f64)
}

/// The key of an entity: `[collection, entity_id]`.
fn entity_key(collection: &str, entity_id: &str) -> JsValue {
    Array::of2(&collection.into(), &entity_id.into()).into()
}

/// Every `[collection, …]` key: arrays sort after strings, so `[collection, []]` bounds them.
fn collection_range(collection: &str) -> Result<IdbKeyRange> {
    let lower = Array::of1(&collection.into());
    let upper = Array::of2(&collection.into(), &Array::new());
    IdbKeyRange::bound(&lower, &upper).map_err(js_error)
}

/// A JS object from a row.
fn to_object<T: serde::Serialize>(row: &T) -> Result<JsValue> {
    js_sys::JSON::parse(&row_json(row)?).map_err(js_error)
}

/// A row from a JS object.
fn from_object<T: for<'de> serde::Deserialize<'de>>(what: &str, value: &JsValue) -> Result<T> {
    let text = js_sys::JSON::stringify(value).map_err(js_error)?;
    parse_row(what, &String::from(text))
}

/// The entries of an array of outbox rows.
fn outbox_entries(rows: JsValue) -> Result<Vec<OutboxEntry>> {
    Array::from(&rows).iter().map(|row| from_object::<OutboxRow>("outbox row", &row)?.entry()).collect()
}

fn active(e: &OutboxEntry) -> bool {
    e.status != OutboxStatus::Failed
}

/// An array of strings.
fn strings(value: JsValue, what: &str) -> Result<Vec<String>> {
    Array::from(&value)
        .iter()
        .map(|v| v.as_string().ok_or_else(|| Error::LocalCorrupt(format!("{what}: not a string"))))
        .collect()
}

/// Awaits requests that were all sent before the first is awaited: their
/// round trips to the browser's database overlap.
async fn wait_all(requests: Vec<IdbRequest>) -> Result<Vec<JsValue>> {
    let pending: Vec<Promise> = requests.iter().map(settled).collect();
    let mut results = Vec::with_capacity(pending.len());
    for promise in pending {
        results.push(JsFuture::from(promise).await.map_err(js_error)?);
    }
    Ok(results)
}

impl IdbTx<'_> {
    fn store(&self, name: &str) -> Result<IdbObjectStore> {
        self.tx.object_store(name).map_err(js_error)
    }

    /// Brings the store's segment cache up to date with the segments in the
    /// database (once per transaction): reads in those it does not know,
    /// forgets those folded or cleared since.
    async fn view(&mut self) -> Result<()> {
        if self.synced {
            return Ok(());
        }
        let segments = self.store(SEGMENTS)?;
        let live = Array::from(&wait(segments.get_all_keys()).await?)
            .iter()
            .map(|k| {
                k.as_f64().map(|k| k as u64).ok_or_else(|| Error::LocalCorrupt("segment key: not a number".into()))
            })
            .collect::<Result<Vec<u64>>>()?;
        self.store.segments.borrow_mut().retain(&live);
        let missing = self.store.segments.borrow().missing(&live);
        if !missing.is_empty() {
            let requests =
                missing.iter().map(|k| segments.get(&seq_key(*k)).map_err(js_error)).collect::<Result<_>>()?;
            let texts = wait_all(requests).await?;
            let mut cache = self.store.segments.borrow_mut();
            for (key, text) in missing.into_iter().zip(texts) {
                let text = text.as_string().ok_or_else(|| Error::LocalCorrupt("segment: not a string".into()))?;
                cache.insert(key, decode_segment(&text)?);
            }
        }
        self.synced = true;
        Ok(())
    }

    /// An entity's encoded state written in this transaction or held by a
    /// live segment: these override its row. Call [`IdbTx::view`] first.
    fn overlaid(&self, collection: &str, entity_id: &str) -> Option<String> {
        if !self.confirmed.is_empty()
            && let Some(state) = self.confirmed.get(&(collection.to_owned(), entity_id.to_owned()))
        {
            return Some(state.clone());
        }
        let segments = self.store.segments.borrow();
        if self.cleared || segments.is_empty() {
            return None;
        }
        segments.get(collection, entity_id).map(str::to_owned)
    }

    /// Writes the entities this transaction confirmed: as rows when they are
    /// few and no segment is live, else as new segments (a row must never be
    /// newer than a live segment). Returns each segment's `add` request and
    /// entities, for the cache once the transaction commits.
    async fn write_confirmed(&mut self) -> Result<Vec<(IdbRequest, Vec<(EntityKey, String)>)>> {
        if self.confirmed.is_empty() {
            return Ok(Vec::new());
        }
        self.view().await?;
        let live = !self.cleared && !self.store.segments.borrow().is_empty();
        let confirmed = std::mem::take(&mut self.confirmed);
        if !live && confirmed.len() < SEGMENT_THRESHOLD {
            for ((collection, entity_id), state) in confirmed {
                self.put(ENTITIES, &state.into(), &entity_key(&collection, &entity_id)).await?;
            }
            return Ok(Vec::new());
        }
        let segments = self.store(SEGMENTS)?;
        let mut written = Vec::new();
        let mut entities = confirmed.into_iter().peekable();
        while entities.peek().is_some() {
            let chunk: Vec<(EntityKey, String)> = entities.by_ref().take(SEGMENT_ENTITIES).collect();
            let request = segments.add(&encode_segment(&chunk)?.into()).map_err(js_error)?;
            written.push((request, chunk));
        }
        Ok(written)
    }

    // Writes are queued, not awaited: IndexedDB runs a transaction's requests
    // in order (a later read sees them), and a failed one aborts the
    // transaction, which `commit` then reports. Not waiting for each write's
    // round trip through the event loop is what makes bulk writes fast.

    async fn put(&self, store: &str, value: &JsValue, key: &JsValue) -> Result<()> {
        self.store(store)?.put_with_key(value, key).map(drop).map_err(js_error)
    }

    async fn put_row<T: serde::Serialize>(&self, store: &str, row: &T) -> Result<()> {
        self.store(store)?.put(&to_object(row)?).map(drop).map_err(js_error)
    }

    async fn delete(&self, store: &str, key: &JsValue) -> Result<()> {
        self.store(store)?.delete(key).map(drop).map_err(js_error)
    }

    async fn clear(&self, store: &str) -> Result<()> {
        self.store(store)?.clear().map(drop).map_err(js_error)
    }

    /// How many rows a store holds.
    async fn count(&self, store: &str) -> Result<f64> {
        let n = wait(self.store(store)?.count()).await?;
        n.as_f64().ok_or_else(|| Error::Store("IndexedDB: count is not a number".into()))
    }

    async fn get(&self, store: &str, key: &JsValue) -> Result<Option<JsValue>> {
        let value = wait(self.store(store)?.get(key)).await?;
        Ok(if value.is_undefined() { None } else { Some(value) })
    }

    /// Outbox entries from an index, by id.
    async fn outbox_by(&self, index: &str, key: &JsValue) -> Result<Vec<OutboxEntry>> {
        let index = self.store(OUTBOX)?.index(index).map_err(js_error)?;
        let mut entries = outbox_entries(wait(index.get_all_with_key(key)).await?)?;
        entries.sort_by_key(|e| e.id);
        Ok(entries)
    }

    async fn all_outbox(&self) -> Result<Vec<OutboxEntry>> {
        outbox_entries(wait(self.store(OUTBOX)?.get_all()).await?)
    }

    async fn put_entry(&self, entry: &OutboxEntry) -> Result<()> {
        self.put_row(OUTBOX, &OutboxRow::of(entry)?).await
    }

    /// Changes the entry `id`, if there is one.
    async fn edit_entry(&self, id: i64, edit: impl FnOnce(&mut OutboxEntry)) -> Result<()> {
        let Some(row) = self.get(OUTBOX, &id_key(id)).await? else { return Ok(()) };
        let mut entry = from_object::<OutboxRow>("outbox row", &row)?.entry()?;
        edit(&mut entry);
        self.put_entry(&entry).await
    }

    /// Changes every entry `pick` chooses with `edit`; returns how many.
    async fn edit_outbox(&self, pick: impl Fn(&OutboxEntry) -> bool, edit: impl Fn(&mut OutboxEntry)) -> Result<u64> {
        let mut n = 0;
        for mut entry in self.all_outbox().await?.into_iter().filter(|e| pick(e)) {
            edit(&mut entry);
            self.put_entry(&entry).await?;
            n += 1;
        }
        Ok(n)
    }

    /// Moves an outbox entry to the journal at `seq`.
    async fn journal_entry(&self, entry: &OutboxEntry, seq: u64) -> Result<()> {
        self.delete(OUTBOX, &id_key(entry.id)).await?;
        self.put_row(JOURNAL, &JournalRow::of(entry, seq)?).await
    }

    async fn journal_rows(&self) -> Result<Vec<JournalRow>> {
        let rows = wait(self.store(JOURNAL)?.get_all()).await?;
        Array::from(&rows).iter().map(|row| from_object("journal row", &row)).collect()
    }

    /// Copies every row of `from` into `to`, keys and all.
    async fn copy_all(&self, from: &str, to: &str) -> Result<()> {
        let source = self.store(from)?;
        let keys = Array::from(&wait(source.get_all_keys()).await?);
        let values = Array::from(&wait(source.get_all()).await?);
        for (key, value) in keys.iter().zip(values.iter()) {
            self.put(to, &value, &key).await?;
        }
        Ok(())
    }

    /// Drops the whole confirmed state: rows, segments, and what this
    /// transaction confirmed so far.
    async fn forget_confirmed(&mut self) -> Result<()> {
        self.confirmed.clear();
        self.cleared = true;
        self.clear(ENTITIES).await?;
        self.clear(SEGMENTS).await
    }

    /// The confirmed rows of `keys` (segments aside).
    async fn confirmed_rows(&mut self, keys: &[(&str, &str)]) -> Result<Vec<Option<Confirmed>>> {
        let store = self.store(ENTITIES)?;
        let decode = |v: JsValue| -> Result<Option<Confirmed>> {
            if v.is_undefined() {
                return Ok(None);
            }
            let text = v.as_string().ok_or_else(|| Error::LocalCorrupt("entity: not a string".into()))?;
            decode_confirmed(&text).map(Some)
        };
        // No more entities than keys (a replica filling up): one read of them all.
        if keys.len() >= 64 && self.count(ENTITIES).await? <= keys.len() as f64 {
            let all_keys = Array::from(&wait(store.get_all_keys()).await?);
            let values = Array::from(&wait(store.get_all()).await?);
            let mut by_key = std::collections::HashMap::new();
            for (key, value) in all_keys.iter().zip(values.iter()) {
                let key = Array::from(&key);
                if let (Some(c), Some(e)) = (key.get(0).as_string(), key.get(1).as_string()) {
                    by_key.insert((c, e), value);
                }
            }
            return keys
                .iter()
                .map(|(c, e)| decode(by_key.remove(&((*c).to_owned(), (*e).to_owned())).unwrap_or(JsValue::UNDEFINED)))
                .collect();
        }
        let requests =
            keys.iter().map(|(c, e)| store.get(&entity_key(c, e)).map_err(js_error)).collect::<Result<_>>()?;
        wait_all(requests).await?.into_iter().map(decode).collect()
    }
}

impl StoreTx for IdbTx<'_> {
    async fn commit(mut self) -> Result<()> {
        let segments = self.write_confirmed().await?;
        self.ended = true;
        // Throws only when the transaction is no longer active: it then ended on
        // its own, and `done` says whether it was kept.
        let _ = commit_now(&self.tx);
        let outcome = JsFuture::from(self.done.clone()).await.map_err(js_error)?;
        match outcome.as_string().as_deref() {
            Some("complete") => {}
            other => return Err(Error::Store(format!("IndexedDB transaction not committed: {other:?}").into())),
        }
        // Kept: this tab knows its new segments without reading them back.
        let mut cache = self.store.segments.borrow_mut();
        for (request, entities) in segments {
            let key = request.result().map_err(js_error)?.as_f64();
            let key = key.ok_or_else(|| Error::Store("IndexedDB: a segment key is not a number".into()))?;
            cache.insert(key as u64, entities);
        }
        Ok(())
    }

    async fn meta(&mut self, key: &str) -> Result<Option<String>> {
        let value = self.get(META, &key.into()).await?;
        value
            .map(|v| v.as_string().ok_or_else(|| Error::LocalCorrupt(format!("meta {key:?}: not a string"))))
            .transpose()
    }

    async fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.put(META, &value.into(), &key.into()).await
    }

    async fn remove_meta(&mut self, key: &str) -> Result<()> {
        self.delete(META, &key.into()).await
    }

    async fn confirmed(&mut self, collection: &str, entity_id: &str) -> Result<Option<Confirmed>> {
        self.view().await?;
        if let Some(state) = self.overlaid(collection, entity_id) {
            return decode_confirmed(&state).map(Some);
        }
        let value = self.get(ENTITIES, &entity_key(collection, entity_id)).await?;
        let text = value.map(|v| v.as_string().ok_or_else(|| Error::LocalCorrupt("entity: not a string".into())));
        text.transpose()?.map(|t| decode_confirmed(&t)).transpose()
    }

    async fn confirmed_many(&mut self, keys: &[(&str, &str)]) -> Result<Vec<Option<Confirmed>>> {
        self.view().await?;
        let mut found = Vec::with_capacity(keys.len());
        let mut missed = Vec::new();
        for (n, (collection, entity_id)) in keys.iter().enumerate() {
            match self.overlaid(collection, entity_id) {
                Some(state) => found.push(Some(decode_confirmed(&state)?)),
                None => {
                    found.push(None);
                    missed.push(n);
                }
            }
        }
        let rows = self.confirmed_rows(&missed.iter().map(|n| keys[*n]).collect::<Vec<_>>()).await?;
        for (n, row) in missed.into_iter().zip(rows) {
            found[n] = row;
        }
        Ok(found)
    }

    async fn confirmed_in(&mut self, collection: &str) -> Result<Vec<EntityState>> {
        self.view().await?;
        let range = collection_range(collection)?;
        let rows = wait(self.store(ENTITIES)?.get_all_with_key(&range)).await?;
        // Rows, then segments, then this transaction's own: each overrides the one before.
        let mut texts = strings(rows, "entity")?;
        if !self.cleared {
            let segments = self.store.segments.borrow();
            texts.extend(segments.in_collection(collection).into_iter().map(|(_, s)| s.to_owned()));
        }
        texts.extend(self.confirmed.iter().filter(|((c, _), _)| c == collection).map(|(_, s)| s.clone()));
        let mut by_id = HashMap::new();
        for text in texts {
            let state = decode_confirmed(&text)?.state;
            by_id.insert(state.entity_id.as_str().to_owned(), state);
        }
        let mut states: Vec<EntityState> = by_id.into_values().collect();
        states.sort_unstable_by(|a, b| a.entity_id.as_str().cmp(b.entity_id.as_str()));
        Ok(states)
    }

    async fn put_confirmed(&mut self, state: &EntityState, hash: Option<&[u8; 32]>) -> Result<()> {
        let key = (state.collection.as_str().to_owned(), state.entity_id.as_str().to_owned());
        self.confirmed.insert(key, encode_confirmed(state, hash)?);
        Ok(())
    }

    async fn put_append(&mut self, seq: u64, change_json: &str) -> Result<()> {
        self.put(APPENDS, &change_json.into(), &seq_key(seq)).await
    }

    async fn clear_staged(&mut self) -> Result<()> {
        self.clear(STAGED_ENTITIES).await?;
        self.clear(STAGED_APPENDS).await
    }

    async fn stage_entity(&mut self, state: &EntityState, _json: &str, hash: Option<&[u8; 32]>) -> Result<()> {
        let key = entity_key(state.collection.as_str(), state.entity_id.as_str());
        self.put(STAGED_ENTITIES, &encode_confirmed(state, hash)?.into(), &key).await
    }

    async fn stage_append(&mut self, seq: u64, change_json: &str) -> Result<()> {
        self.put(STAGED_APPENDS, &change_json.into(), &seq_key(seq)).await
    }

    async fn adopt_staged(&mut self) -> Result<()> {
        self.forget_confirmed().await?;
        self.clear(APPENDS).await?;
        self.copy_all(STAGED_ENTITIES, ENTITIES).await?;
        self.copy_all(STAGED_APPENDS, APPENDS).await?;
        self.clear_staged().await
    }

    async fn push_outbox(&mut self, change: &Change, now: u64) -> Result<()> {
        let row = to_object(&OutboxRow::pending(change, now, false)?)?;
        self.store(OUTBOX)?.add(&row).map(drop).map_err(js_error)
    }

    async fn active_for_entity(&mut self, collection: &Collection, entity_id: &EntityId) -> Result<Vec<OutboxEntry>> {
        let key = entity_key(collection.as_str(), entity_id.as_str());
        Ok(self.outbox_by(OUTBOX_BY_ENTITY, &key).await?.into_iter().filter(active).collect())
    }

    async fn active_for_entities(&mut self, keys: &[(&Collection, &EntityId)]) -> Result<Vec<Vec<OutboxEntry>>> {
        // For many entities, one read of a small outbox beats a lookup per entity.
        if keys.len() >= 64 && self.count(OUTBOX).await? <= 4.0 * keys.len() as f64 {
            let mut by_entity: std::collections::HashMap<(&str, &str), Vec<OutboxEntry>> = Default::default();
            let all = self.all_outbox().await?;
            for entry in all.iter().filter(|e| active(e)) {
                let key = (entry.change.collection.as_str(), entry.change.entity_id.as_str());
                by_entity.entry(key).or_default().push(entry.clone());
            }
            return Ok(keys
                .iter()
                .map(|(c, e)| {
                    let mut entries = by_entity.get(&(c.as_str(), e.as_str())).cloned().unwrap_or_default();
                    entries.sort_by_key(|e| e.id);
                    entries
                })
                .collect());
        }
        let index = self.store(OUTBOX)?.index(OUTBOX_BY_ENTITY).map_err(js_error)?;
        let requests = keys
            .iter()
            .map(|(c, e)| index.get_all_with_key(&entity_key(c.as_str(), e.as_str())).map_err(js_error))
            .collect::<Result<_>>()?;
        wait_all(requests)
            .await?
            .into_iter()
            .map(|rows| {
                let mut entries: Vec<OutboxEntry> = outbox_entries(rows)?.into_iter().filter(active).collect();
                entries.sort_by_key(|e| e.id);
                Ok(entries)
            })
            .collect()
    }

    async fn active_in(&mut self, collection: &str) -> Result<Vec<OutboxEntry>> {
        let range = collection_range(collection)?;
        Ok(self.outbox_by(OUTBOX_BY_ENTITY, &range).await?.into_iter().filter(active).collect())
    }

    async fn all_entries(&mut self) -> Result<Vec<OutboxEntry>> {
        self.all_outbox().await
    }

    async fn pending_after(&mut self, after: i64, limit: u32) -> Result<Vec<OutboxEntry>> {
        let range = IdbKeyRange::lower_bound_with_open(&id_key(after), true).map_err(js_error)?;
        let rows = wait(self.store(OUTBOX)?.get_all_with_key(&range)).await?;
        let pending = outbox_entries(rows)?.into_iter().filter(|e| e.status == OutboxStatus::Pending);
        Ok(pending.take(limit as usize).collect())
    }

    async fn has_pending_after(&mut self, collection: &Collection, entity_id: &EntityId, id: i64) -> Result<bool> {
        let key = entity_key(collection.as_str(), entity_id.as_str());
        let entries = self.outbox_by(OUTBOX_BY_ENTITY, &key).await?;
        Ok(entries.iter().any(|e| e.id > id && e.status == OutboxStatus::Pending))
    }

    async fn outbox_counts(&mut self) -> Result<(u64, u64)> {
        let all = self.all_outbox().await?;
        let failed = all.iter().filter(|e| !active(e)).count() as u64;
        Ok((all.len() as u64 - failed, failed))
    }

    async fn mark_sent(&mut self, id: i64, seq: u64) -> Result<()> {
        self.edit_entry(id, |e| {
            e.status = OutboxStatus::Sent;
            e.seq = Some(seq);
            e.last_error = None;
        })
        .await
    }

    async fn mark_failed(&mut self, id: i64, message: &str, conflict: Option<&Conflict>) -> Result<()> {
        self.edit_entry(id, |e| {
            e.status = OutboxStatus::Failed;
            e.last_error = Some(message.to_owned());
            e.conflict = conflict.cloned();
        })
        .await
    }

    async fn mark_retry(&mut self, id: i64, retries: u32, next_attempt_at: u64, message: &str) -> Result<()> {
        self.edit_entry(id, |e| {
            e.retries = retries;
            e.next_attempt_at = next_attempt_at;
            e.last_error = Some(message.to_owned());
        })
        .await
    }

    async fn replace_change(&mut self, id: i64, change: &Change) -> Result<()> {
        self.edit_entry(id, |e| e.change = change.clone()).await
    }

    async fn reset_retries(&mut self) -> Result<()> {
        let pick = |e: &OutboxEntry| e.status == OutboxStatus::Pending && (e.retries > 0 || e.next_attempt_at > 0);
        self.edit_outbox(pick, |e| {
            e.retries = 0;
            e.next_attempt_at = 0;
        })
        .await
        .map(drop)
    }

    async fn requeue_failed(&mut self) -> Result<u64> {
        self.edit_outbox(
            |e| e.status == OutboxStatus::Failed,
            |e| {
                e.status = OutboxStatus::Pending;
                e.retries = 0;
                e.next_attempt_at = 0;
                e.conflict = None;
            },
        )
        .await
    }

    async fn discard_failed(&mut self) -> Result<u64> {
        let failed: Vec<i64> = self.all_outbox().await?.iter().filter(|e| !active(e)).map(|e| e.id).collect();
        for id in &failed {
            self.delete(OUTBOX, &id_key(*id)).await?;
        }
        Ok(failed.len() as u64)
    }

    async fn unsend_above(&mut self, cursor: u64) -> Result<u64> {
        self.edit_outbox(
            |e| e.status == OutboxStatus::Sent && e.seq.is_some_and(|s| s > cursor),
            |e| {
                e.status = OutboxStatus::Pending;
                e.seq = None;
                e.requeued = true;
                e.next_attempt_at = 0;
            },
        )
        .await
    }

    async fn confirm(&mut self, change_id: &str, seq: u64) -> Result<bool> {
        let found = self.outbox_by(OUTBOX_BY_CHANGE, &change_id.into()).await?.into_iter().find(active);
        let Some(entry) = found else { return Ok(false) };
        self.journal_entry(&entry, seq).await?;
        Ok(true)
    }

    async fn confirm_many(&mut self, confirmations: &[(&str, u64)]) -> Result<u64> {
        // A small outbox (empty, in a first sync): one read of it, not a lookup per change.
        if confirmations.len() >= 64 && self.count(OUTBOX).await? <= 4.0 * confirmations.len() as f64 {
            let mut by_change: std::collections::HashMap<String, OutboxEntry> = Default::default();
            for entry in self.all_outbox().await?.into_iter().filter(active) {
                let previous = by_change.get(entry.change.change_id.as_str()).map_or(i64::MAX, |e| e.id);
                if entry.id < previous {
                    by_change.insert(entry.change.change_id.as_str().to_owned(), entry);
                }
            }
            let mut found = 0;
            for (change_id, seq) in confirmations {
                if let Some(entry) = by_change.remove(*change_id) {
                    self.journal_entry(&entry, *seq).await?;
                    found += 1;
                }
            }
            return Ok(found);
        }
        let index = self.store(OUTBOX)?.index(OUTBOX_BY_CHANGE).map_err(js_error)?;
        let requests = confirmations
            .iter()
            .map(|(id, _)| index.get_all_with_key(&(*id).into()).map_err(js_error))
            .collect::<Result<_>>()?;
        let mut found = 0;
        for (rows, (_, seq)) in wait_all(requests).await?.into_iter().zip(confirmations) {
            let mut entries: Vec<OutboxEntry> = outbox_entries(rows)?.into_iter().filter(active).collect();
            entries.sort_by_key(|e| e.id);
            if let Some(entry) = entries.first() {
                self.journal_entry(entry, *seq).await?;
                found += 1;
            }
        }
        Ok(found)
    }

    async fn confirm_up_to(&mut self, cursor: u64) -> Result<()> {
        for entry in self.all_outbox().await? {
            if let (OutboxStatus::Sent, Some(seq)) = (entry.status, entry.seq)
                && seq <= cursor
            {
                self.journal_entry(&entry, seq).await?;
            }
        }
        Ok(())
    }

    async fn journal_by_seq(&mut self) -> Result<Vec<Journaled>> {
        // The index lists by seq, then by key (the id).
        let index = self.store(JOURNAL)?.index(JOURNAL_BY_SEQ).map_err(js_error)?;
        let rows = Array::from(&wait(index.get_all()).await?);
        rows.iter().map(|row| from_object::<JournalRow>("journal row", &row)?.journaled()).collect()
    }

    async fn journal_len(&mut self) -> Result<u64> {
        let n = wait(self.store(JOURNAL)?.count()).await?;
        n.as_f64().map(|n| n as u64).ok_or_else(|| Error::Store("IndexedDB: count is not a number".into()))
    }

    async fn trim_journal(&mut self, limit: u64, horizon: u64) -> Result<u64> {
        let rows = self.journal_rows().await?;
        let (below, kept): (Vec<JournalRow>, Vec<JournalRow>) =
            rows.into_iter().partition(|j| horizon > 0 && j.seq <= horizon);
        let surplus = kept.len().saturating_sub(usize::try_from(limit).unwrap_or(usize::MAX));
        let dropped: Vec<i64> = below.iter().chain(&kept[..surplus]).map(|j| j.id).collect();
        for id in &dropped {
            self.delete(JOURNAL, &id_key(*id)).await?;
        }
        Ok(dropped.len() as u64)
    }

    async fn journal_to_outbox(&mut self, id: i64) -> Result<()> {
        let Some(row) = self.get(JOURNAL, &id_key(id)).await? else { return Ok(()) };
        let row: JournalRow = from_object("journal row", &row)?;
        self.delete(JOURNAL, &id_key(id)).await?;
        if self.get(OUTBOX, &id_key(id)).await?.is_some() {
            return Ok(());
        }
        self.put_row(OUTBOX, &row.requeued()?).await
    }

    async fn clear_all(&mut self, keep: &[&str]) -> Result<()> {
        let mut kept = Vec::new();
        for key in keep {
            if let Some(value) = self.meta(key).await? {
                kept.push((*key, value));
            }
        }
        self.forget_confirmed().await?;
        for store in STORES {
            self.clear(store).await?;
        }
        for (key, value) in kept {
            self.set_meta(key, &value).await?;
        }
        Ok(())
    }
}
