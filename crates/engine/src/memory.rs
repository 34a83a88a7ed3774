//! [`MemoryStore`]: a [`LocalStore`] that keeps the replica in memory. For
//! tests, and for embedders that keep nothing between runs (or persist a
//! snapshot themselves). A write transaction keeps an undo log, so dropping
//! it uncommitted puts everything back.

use std::collections::BTreeMap;

use deltasync_protocol::{Change, Collection, Conflict, EntityId, EntityState};

use crate::error::Result;
use crate::slot::Slot;
use crate::store::{Access, Confirmed, Journaled, LocalStore, OutboxEntry, OutboxStatus, StoreTx};

/// A journal entry with the time its change was made.
#[derive(Debug, Clone)]
struct JournalEntry {
    journaled: Journaled,
    created_at: u64,
}

/// The whole replica.
#[derive(Debug, Clone, Default)]
struct Data {
    meta: BTreeMap<String, String>,
    entities: BTreeMap<(String, String), Confirmed>,
    appends: BTreeMap<u64, String>,
    outbox: BTreeMap<i64, OutboxEntry>,
    journal: BTreeMap<i64, JournalEntry>,
    /// A bootstrap's snapshot, before it is adopted.
    staged: (BTreeMap<(String, String), Confirmed>, BTreeMap<u64, String>),
    /// The highest outbox id ever given.
    last_id: i64,
}

/// How to take back one write.
enum Undo {
    Meta(String, Option<String>),
    Entity((String, String), Option<Confirmed>),
    Append(u64, Option<String>),
    Outbox(i64, Option<OutboxEntry>),
    Journal(i64, Option<JournalEntry>),
    Staged(BTreeMap<(String, String), Confirmed>, BTreeMap<u64, String>),
    StagedEntity((String, String), Option<Confirmed>),
    StagedAppend(u64, Option<String>),
    /// The confirmed state before an adoption (the adopted one goes back to staging).
    Adopted(BTreeMap<(String, String), Confirmed>, BTreeMap<u64, String>),
    Whole(Box<Data>),
}

/// The replica in memory. Transactions take turns: one at a time.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// The data, lent to the open transaction.
    slot: Slot<Data>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore { slot: Slot::new(Data::default()) }
    }
}

/// A transaction on a [`MemoryStore`]: it holds the data until it ends.
pub struct MemoryTx<'a> {
    store: &'a MemoryStore,
    data: Option<Data>,
    undo: Vec<Undo>,
    access: Access,
}

impl LocalStore for MemoryStore {
    type Tx<'a> = MemoryTx<'a>;

    async fn begin(&self, access: Access) -> Result<MemoryTx<'_>> {
        Ok(MemoryTx { store: self, data: Some(self.slot.take()), undo: Vec::new(), access })
    }
}

impl Drop for MemoryTx<'_> {
    fn drop(&mut self) {
        let Some(mut data) = self.data.take() else { return };
        for undo in self.undo.drain(..).rev() {
            match undo {
                Undo::Meta(k, v) => restore(&mut data.meta, k, v),
                Undo::Entity(k, v) => restore(&mut data.entities, k, v),
                Undo::Append(k, v) => restore(&mut data.appends, k, v),
                Undo::Outbox(k, v) => restore(&mut data.outbox, k, v),
                Undo::Journal(k, v) => restore(&mut data.journal, k, v),
                Undo::Staged(entities, appends) => data.staged = (entities, appends),
                Undo::StagedEntity(k, v) => restore(&mut data.staged.0, k, v),
                Undo::StagedAppend(k, v) => restore(&mut data.staged.1, k, v),
                Undo::Adopted(entities, appends) => {
                    let adopted = (
                        std::mem::replace(&mut data.entities, entities),
                        std::mem::replace(&mut data.appends, appends),
                    );
                    data.staged = adopted;
                }
                Undo::Whole(whole) => data = *whole,
            }
        }
        self.store.slot.give_back(data);
    }
}

fn restore<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
    match value {
        Some(v) => map.insert(key, v),
        None => map.remove(&key),
    };
}

fn active(e: &OutboxEntry) -> bool {
    e.status != OutboxStatus::Failed
}

impl MemoryTx<'_> {
    fn data(&self) -> &Data {
        self.data.as_ref().expect("the transaction holds the data")
    }

    fn data_mut(&mut self) -> &mut Data {
        assert!(self.access.writes(), "a write in a read transaction");
        self.data.as_mut().expect("the transaction holds the data")
    }

    fn set_meta_value(&mut self, key: &str, value: Option<String>) {
        let old = restore_into(&mut self.data_mut().meta, key.to_owned(), value);
        self.undo.push(Undo::Meta(key.to_owned(), old));
    }

    fn set_outbox(&mut self, id: i64, entry: Option<OutboxEntry>) {
        let old = restore_into(&mut self.data_mut().outbox, id, entry);
        self.undo.push(Undo::Outbox(id, old));
    }

    fn set_journal(&mut self, id: i64, entry: Option<JournalEntry>) {
        let old = restore_into(&mut self.data_mut().journal, id, entry);
        self.undo.push(Undo::Journal(id, old));
    }

    /// Changes every outbox entry `pick` chooses with `edit`; returns how many.
    fn edit_outbox(&mut self, pick: impl Fn(&OutboxEntry) -> bool, edit: impl Fn(&mut OutboxEntry)) -> u64 {
        let chosen: Vec<OutboxEntry> = self.data().outbox.values().filter(|e| pick(e)).cloned().collect();
        let n = chosen.len() as u64;
        for mut entry in chosen {
            edit(&mut entry);
            self.set_outbox(entry.id, Some(entry));
        }
        n
    }

    fn edit_entry(&mut self, id: i64, edit: impl FnOnce(&mut OutboxEntry)) {
        if let Some(mut entry) = self.data().outbox.get(&id).cloned() {
            edit(&mut entry);
            self.set_outbox(id, Some(entry));
        }
    }

    fn entries(&self, pick: impl Fn(&OutboxEntry) -> bool) -> Vec<OutboxEntry> {
        self.data().outbox.values().filter(|e| pick(e)).cloned().collect()
    }

    /// Moves an outbox entry to the journal at `seq`.
    fn journal_entry(&mut self, entry: OutboxEntry, seq: u64) {
        let journaled = Journaled { id: entry.id, change: entry.change, seq };
        self.set_outbox(entry.id, None);
        self.set_journal(journaled.id, Some(JournalEntry { journaled, created_at: entry.created_at }));
    }
}

/// Sets `key` to `value` (removing it for `None`); returns the old value.
fn restore_into<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) -> Option<V> {
    match value {
        Some(v) => map.insert(key, v),
        None => map.remove(&key),
    }
}

/// A pending outbox entry with no refusal yet.
fn pending_entry(id: i64, change: Change, created_at: u64, requeued: bool) -> OutboxEntry {
    OutboxEntry {
        id,
        change,
        status: OutboxStatus::Pending,
        seq: None,
        retries: 0,
        next_attempt_at: 0,
        last_error: None,
        conflict: None,
        created_at,
        requeued,
    }
}

fn same_entity(e: &OutboxEntry, collection: &str, entity_id: &str) -> bool {
    e.change.collection.as_str() == collection && e.change.entity_id.as_str() == entity_id
}

impl StoreTx for MemoryTx<'_> {
    async fn commit(mut self) -> Result<()> {
        self.undo.clear();
        Ok(())
    }

    async fn meta(&mut self, key: &str) -> Result<Option<String>> {
        Ok(self.data().meta.get(key).cloned())
    }

    async fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.set_meta_value(key, Some(value.to_owned()));
        Ok(())
    }

    async fn remove_meta(&mut self, key: &str) -> Result<()> {
        self.set_meta_value(key, None);
        Ok(())
    }

    async fn confirmed(&mut self, collection: &str, entity_id: &str) -> Result<Option<Confirmed>> {
        Ok(self.data().entities.get(&(collection.to_owned(), entity_id.to_owned())).cloned())
    }

    async fn confirmed_in(&mut self, collection: &str) -> Result<Vec<EntityState>> {
        let data = self.data();
        let from = (collection.to_owned(), String::new());
        Ok(data
            .entities
            .range(from..)
            .take_while(|((c, _), _)| c == collection)
            .map(|(_, e)| e.state.clone())
            .collect())
    }

    async fn put_confirmed(&mut self, state: &EntityState, hash: Option<&[u8; 32]>) -> Result<()> {
        let key = (state.collection.as_str().to_owned(), state.entity_id.as_str().to_owned());
        let value = Confirmed { state: state.clone(), hash: hash.copied() };
        let old = self.data_mut().entities.insert(key.clone(), value);
        self.undo.push(Undo::Entity(key, old));
        Ok(())
    }

    async fn put_append(&mut self, seq: u64, change_json: &str) -> Result<()> {
        let old = self.data_mut().appends.insert(seq, change_json.to_owned());
        self.undo.push(Undo::Append(seq, old));
        Ok(())
    }

    async fn clear_staged(&mut self) -> Result<()> {
        let (entities, appends) = std::mem::take(&mut self.data_mut().staged);
        self.undo.push(Undo::Staged(entities, appends));
        Ok(())
    }

    async fn stage_entity(&mut self, state: &EntityState, _json: &str, hash: Option<&[u8; 32]>) -> Result<()> {
        let key = (state.collection.as_str().to_owned(), state.entity_id.as_str().to_owned());
        let value = Confirmed { state: state.clone(), hash: hash.copied() };
        let old = self.data_mut().staged.0.insert(key.clone(), value);
        self.undo.push(Undo::StagedEntity(key, old));
        Ok(())
    }

    async fn stage_append(&mut self, seq: u64, change_json: &str) -> Result<()> {
        let old = self.data_mut().staged.1.insert(seq, change_json.to_owned());
        self.undo.push(Undo::StagedAppend(seq, old));
        Ok(())
    }

    async fn adopt_staged(&mut self) -> Result<()> {
        let data = self.data_mut();
        let (entities, appends) = std::mem::take(&mut data.staged);
        let old = (std::mem::replace(&mut data.entities, entities), std::mem::replace(&mut data.appends, appends));
        self.undo.push(Undo::Adopted(old.0, old.1));
        Ok(())
    }

    async fn push_outbox(&mut self, change: &Change, now: u64) -> Result<()> {
        let data = self.data_mut();
        data.last_id += 1;
        let entry = pending_entry(data.last_id, change.clone(), now, false);
        // Ids are never reused, not even after a rollback: last_id stays.
        self.set_outbox(entry.id, Some(entry));
        Ok(())
    }

    async fn active_for_entity(&mut self, collection: &Collection, entity_id: &EntityId) -> Result<Vec<OutboxEntry>> {
        Ok(self.entries(|e| active(e) && same_entity(e, collection.as_str(), entity_id.as_str())))
    }

    async fn active_in(&mut self, collection: &str) -> Result<Vec<OutboxEntry>> {
        Ok(self.entries(|e| active(e) && e.change.collection.as_str() == collection))
    }

    async fn all_entries(&mut self) -> Result<Vec<OutboxEntry>> {
        Ok(self.entries(|_| true))
    }

    async fn pending_after(&mut self, after: i64, limit: u32) -> Result<Vec<OutboxEntry>> {
        let data = self.data();
        let pending = data.outbox.range(after.saturating_add(1)..).map(|(_, e)| e);
        Ok(pending.filter(|e| e.status == OutboxStatus::Pending).take(limit as usize).cloned().collect())
    }

    async fn has_pending_after(&mut self, collection: &Collection, entity_id: &EntityId, id: i64) -> Result<bool> {
        let later = self.data().outbox.range(id.saturating_add(1)..).map(|(_, e)| e);
        Ok(later
            .filter(|e| e.status == OutboxStatus::Pending)
            .any(|e| same_entity(e, collection.as_str(), entity_id.as_str())))
    }

    async fn outbox_counts(&mut self) -> Result<(u64, u64)> {
        let failed = self.data().outbox.values().filter(|e| !active(e)).count() as u64;
        Ok((self.data().outbox.len() as u64 - failed, failed))
    }

    async fn mark_sent(&mut self, id: i64, seq: u64) -> Result<()> {
        self.edit_entry(id, |e| {
            e.status = OutboxStatus::Sent;
            e.seq = Some(seq);
            e.last_error = None;
        });
        Ok(())
    }

    async fn mark_failed(&mut self, id: i64, message: &str, conflict: Option<&Conflict>) -> Result<()> {
        self.edit_entry(id, |e| {
            e.status = OutboxStatus::Failed;
            e.last_error = Some(message.to_owned());
            e.conflict = conflict.cloned();
        });
        Ok(())
    }

    async fn mark_retry(&mut self, id: i64, retries: u32, next_attempt_at: u64, message: &str) -> Result<()> {
        self.edit_entry(id, |e| {
            e.retries = retries;
            e.next_attempt_at = next_attempt_at;
            e.last_error = Some(message.to_owned());
        });
        Ok(())
    }

    async fn replace_change(&mut self, id: i64, change: &Change) -> Result<()> {
        self.edit_entry(id, |e| e.change = change.clone());
        Ok(())
    }

    async fn reset_retries(&mut self) -> Result<()> {
        self.edit_outbox(
            |e| e.status == OutboxStatus::Pending && (e.retries > 0 || e.next_attempt_at > 0),
            |e| {
                e.retries = 0;
                e.next_attempt_at = 0;
            },
        );
        Ok(())
    }

    async fn requeue_failed(&mut self) -> Result<u64> {
        Ok(self.edit_outbox(
            |e| e.status == OutboxStatus::Failed,
            |e| {
                e.status = OutboxStatus::Pending;
                e.retries = 0;
                e.next_attempt_at = 0;
                e.conflict = None;
            },
        ))
    }

    async fn discard_failed(&mut self) -> Result<u64> {
        let failed: Vec<i64> = self.entries(|e| !active(e)).iter().map(|e| e.id).collect();
        for id in &failed {
            self.set_outbox(*id, None);
        }
        Ok(failed.len() as u64)
    }

    async fn unsend_above(&mut self, cursor: u64) -> Result<u64> {
        Ok(self.edit_outbox(
            |e| e.status == OutboxStatus::Sent && e.seq.is_some_and(|s| s > cursor),
            |e| {
                e.status = OutboxStatus::Pending;
                e.seq = None;
                e.requeued = true;
                e.next_attempt_at = 0;
            },
        ))
    }

    async fn confirm(&mut self, change_id: &str, seq: u64) -> Result<bool> {
        let found = self.entries(|e| e.change.change_id.as_str() == change_id && active(e)).into_iter().next();
        let Some(entry) = found else { return Ok(false) };
        self.journal_entry(entry, seq);
        Ok(true)
    }

    async fn confirm_up_to(&mut self, cursor: u64) -> Result<()> {
        for entry in self.entries(|e| e.status == OutboxStatus::Sent && e.seq.is_some_and(|s| s <= cursor)) {
            let seq = entry.seq.expect("a sent entry has its seq");
            self.journal_entry(entry, seq);
        }
        Ok(())
    }

    async fn journal_by_seq(&mut self) -> Result<Vec<Journaled>> {
        let mut all: Vec<Journaled> = self.data().journal.values().map(|j| j.journaled.clone()).collect();
        all.sort_by_key(|j| (j.seq, j.id));
        Ok(all)
    }

    async fn journal_len(&mut self) -> Result<u64> {
        Ok(self.data().journal.len() as u64)
    }

    async fn trim_journal(&mut self, limit: u64, horizon: u64) -> Result<u64> {
        let data = self.data();
        let below: Vec<i64> = data
            .journal
            .values()
            .filter(|j| horizon > 0 && j.journaled.seq <= horizon)
            .map(|j| j.journaled.id)
            .collect();
        let kept = data.journal.len() - below.len();
        let surplus = kept.saturating_sub(usize::try_from(limit).unwrap_or(usize::MAX));
        let oldest: Vec<i64> = data.journal.keys().filter(|id| !below.contains(id)).take(surplus).copied().collect();
        for id in below.iter().chain(&oldest) {
            self.set_journal(*id, None);
        }
        Ok((below.len() + oldest.len()) as u64)
    }

    async fn journal_to_outbox(&mut self, id: i64) -> Result<()> {
        let Some(entry) = self.data().journal.get(&id).cloned() else { return Ok(()) };
        self.set_journal(id, None);
        if self.data().outbox.contains_key(&id) {
            return Ok(());
        }
        let JournalEntry { journaled, created_at } = entry;
        self.set_outbox(id, Some(pending_entry(id, journaled.change, created_at, true)));
        Ok(())
    }

    async fn clear_all(&mut self, keep: &[&str]) -> Result<()> {
        let data = self.data_mut();
        let before = std::mem::take(data);
        data.meta = before
            .meta
            .iter()
            .filter(|(k, _)| keep.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        data.last_id = before.last_id;
        self.undo.push(Undo::Whole(Box::new(before)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_store_passes_the_conformance_suite() {
        futures_executor::block_on(crate::conformance::run(MemoryStore::new));
    }
}
