//! Applying one push batch to a dataset, in memory: the server's planner,
//! also run by devices that sync through a file store.
//!
//! A store loads what a batch needs (the dataset head, the seqs of change ids
//! it already holds, the current state of the entities the batch touches),
//! [`plan_push`] decides everything, and the store writes the plan in the same
//! transaction. The decision logic is therefore the same on every store.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::merge::{Merge, merge};
use crate::wire::{Policies, PushResult, ResultStatus};
use crate::{
    Change, ChangeId, Collection, Conflict, DeviceId, EntityId, EntityState, Op, Policy, StateDigest, StateHash,
    StoredChange,
};

/// Where a dataset's log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DatasetHead {
    /// The highest seq (0 for an empty log).
    pub seq: u64,
    /// The chain head at `seq`.
    pub state_hash: StateHash,
    /// The state digest at `seq`.
    pub state_digest: StateDigest,
    /// The highest seq compacted away.
    pub horizon: u64,
    /// The id of the last conflict record.
    pub conflict_seq: u64,
}

/// An entity key: collection and entity id.
pub type EntityKey = (Collection, EntityId);

/// What a store loads before planning a batch.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The dataset head.
    pub head: DatasetHead,
    /// Seqs of the batch's change ids that the dataset already holds.
    pub known: HashMap<ChangeId, u64>,
    /// Current state of the entities the batch touches (absent: no state yet).
    pub entities: HashMap<EntityKey, EntityState>,
}

/// A change to append to the log, with the chain head and digest after it.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// The stored change.
    pub change: StoredChange,
    /// The chain head after this change.
    pub state_hash: StateHash,
    /// The state digest after this change.
    pub state_digest: StateDigest,
}

/// A conflict record to keep.
#[derive(Debug, Clone)]
pub struct ConflictEntry {
    /// The record id.
    pub id: u64,
    /// The losing change.
    pub change: Change,
    /// The device that sent it.
    pub device_id: DeviceId,
    /// Its seq when it was logged.
    pub seq: Option<u64>,
    /// Why it lost.
    pub conflict: Conflict,
    /// When.
    pub server_time: u64,
}

/// Everything a batch does, for the store to write.
#[derive(Debug, Default)]
pub struct PushPlan {
    /// One result per change, in request order.
    pub results: Vec<PushResult>,
    /// New log entries, in seq order.
    pub log: Vec<LogEntry>,
    /// Final state of every entity the batch changed, with its digest contribution (`None` when deleted).
    pub entities: Vec<(EntityState, Option<[u8; 32]>)>,
    /// Conflict records to keep.
    pub conflicts: Vec<ConflictEntry>,
    /// The dataset head after the batch.
    pub head: DatasetHead,
    /// Collections the batch wrote to, with their effective policy.
    pub collections: BTreeSet<(String, Policy)>,
}

/// The clock and rules a batch is judged by.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// The server's time, ms since the epoch.
    pub now: u64,
    /// How far ahead of `now` an HLC may be.
    pub max_clock_drift_ms: u64,
    /// The merge policies.
    pub policies: &'a Policies,
}

/// Decides what a batch does to the dataset described by `snapshot`.
pub fn plan_push(mut snapshot: Snapshot, device: &DeviceId, changes: &[Change], rules: Rules<'_>) -> PushPlan {
    let mut plan = PushPlan { head: snapshot.head, ..PushPlan::default() };
    let mut touched: Vec<EntityKey> = Vec::new();
    let mut touched_set: HashSet<EntityKey> = HashSet::new();
    // Entity hashes computed in this batch, so each state is hashed once.
    let mut hashes: HashMap<EntityKey, Option<[u8; 32]>> = HashMap::new();
    for change in changes {
        let change_id = change.change_id.as_str().to_owned();
        if let Some(&seq) = snapshot.known.get(&change.change_id) {
            plan.results.push(PushResult {
                change_id,
                status: ResultStatus::Duplicate,
                seq: Some(seq),
                conflict: None,
            });
            continue;
        }
        if change.hlc.physical_ms() > rules.now.saturating_add(rules.max_clock_drift_ms) {
            plan.results.push(PushResult {
                change_id,
                status: ResultStatus::Rejected,
                seq: None,
                conflict: Some(Conflict::clock_skew()),
            });
            continue;
        }
        let policy = rules.policies.of(change.collection.as_str());
        let key = (change.collection.clone(), change.entity_id.clone());
        let seq = plan.head.seq + 1;
        let outcome = merge(policy, snapshot.entities.get(&key), change, seq);
        let conflict = match outcome {
            Merge::Rejected(conflict) => {
                plan.head.conflict_seq += 1;
                plan.conflicts.push(ConflictEntry {
                    id: plan.head.conflict_seq,
                    change: change.clone(),
                    device_id: device.clone(),
                    seq: None,
                    conflict: conflict.clone(),
                    server_time: rules.now,
                });
                plan.results.push(PushResult {
                    change_id,
                    status: ResultStatus::Rejected,
                    seq: None,
                    conflict: Some(conflict),
                });
                continue;
            }
            Merge::Logged => None,
            Merge::Applied { state, conflict } => {
                let old = match hashes.get(&key) {
                    Some(h) => *h,
                    None => snapshot.entities.get(&key).and_then(EntityState::entity_hash),
                };
                let new = state.entity_hash();
                plan.head.state_digest.replace(old.as_ref(), new.as_ref());
                hashes.insert(key.clone(), new);
                if touched_set.insert(key.clone()) {
                    touched.push(key.clone());
                }
                snapshot.entities.insert(key, state);
                conflict
            }
        };
        plan.collections.insert((change.collection.as_str().to_owned(), policy));
        let stored = StoredChange { seq, device_id: device.clone(), server_time: rules.now, change: change.clone() };
        plan.head.seq = seq;
        plan.head.state_hash = plan.head.state_hash.fold(&stored);
        snapshot.known.insert(change.change_id.clone(), seq);
        if let Some(c) = &conflict {
            plan.head.conflict_seq += 1;
            plan.conflicts.push(ConflictEntry {
                id: plan.head.conflict_seq,
                change: change.clone(),
                device_id: device.clone(),
                seq: Some(seq),
                conflict: c.clone(),
                server_time: rules.now,
            });
        }
        plan.log.push(LogEntry {
            change: stored,
            state_hash: plan.head.state_hash,
            state_digest: plan.head.state_digest,
        });
        plan.results.push(PushResult { change_id, status: ResultStatus::Applied, seq: Some(seq), conflict });
    }
    plan.entities = touched
        .into_iter()
        .filter_map(|k| {
            let hash = hashes.get(&k).copied().flatten();
            snapshot.entities.remove(&k).map(|state| (state, hash))
        })
        .collect();
    plan
}

/// The entity keys and change ids a batch needs loaded.
pub fn batch_keys(changes: &[Change]) -> (Vec<ChangeId>, Vec<EntityKey>) {
    let mut ids = Vec::with_capacity(changes.len());
    let mut keys = Vec::with_capacity(changes.len());
    let mut seen = HashSet::new();
    for c in changes {
        ids.push(c.change_id.clone());
        if c.op != Op::Append {
            let key = (c.collection.clone(), c.entity_id.clone());
            if seen.insert(key.clone()) {
                keys.push(key);
            }
        }
    }
    (ids, keys)
}

impl ConflictEntry {
    /// The record as `GET /v1/conflicts` serves it.
    pub fn record(&self) -> crate::wire::ConflictRecord {
        crate::wire::ConflictRecord {
            id: self.id,
            change_id: self.change.change_id.as_str().to_owned(),
            device_id: self.device_id.as_str().to_owned(),
            collection: self.change.collection.as_str().to_owned(),
            entity_id: self.change.entity_id.as_str().to_owned(),
            op: self.change.op,
            data: self.change.data.clone(),
            hlc: self.change.hlc.to_string(),
            seq: self.seq,
            reason: self.conflict.reason,
            fields: self.conflict.fields.clone(),
            current: self.conflict.current.clone(),
            server_time: self.server_time,
        }
    }
}
