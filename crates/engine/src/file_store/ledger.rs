//! The dataset as a file store's log builds it, held in memory by a device:
//! what a server would hold in its tables. A device reads segments into it
//! (each one verified against the log before it), plans its pushes on it
//! with the server's planner, and answers the engine's requests from it, so
//! that the engine cannot tell a file store from a server.

use std::collections::{BTreeMap, HashMap, HashSet};

use deltasync_protocol::batch::{self, DatasetHead, EntityKey, Rules, batch_keys, plan_push};
use deltasync_protocol::merge::{Merge, merge};
use deltasync_protocol::wire::{
    BootstrapEnd, BootstrapHeader, BootstrapLine, ConflictRecord, DeviceStatus, Policies, PushResult,
};
use deltasync_protocol::{Change, ChangeId, DeviceId, EntityState, Op, StateDigest, StateHash, StoredChange};

use super::segment::Segment;
use super::{FORMAT, FileStoreError};

/// A logged change with the chain head and digest right after it.
#[derive(Debug, Clone)]
struct Logged {
    change: StoredChange,
    state_hash: StateHash,
    state_digest: StateDigest,
}

/// A page of the log, as a pull or sync answer carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct LogPage {
    /// The changes, in seq order (less the ones left out).
    pub changes: Vec<StoredChange>,
    /// The highest seq the page covers.
    pub cursor: u64,
    /// Whether more changes follow.
    pub has_more: bool,
    /// The chain head at `cursor`.
    pub state_hash: StateHash,
    /// The state digest at `cursor`.
    pub state_digest: StateDigest,
}

/// What a planned push does: the answer per change, and the segment to
/// write (none when nothing is logged: every change a duplicate or refused).
#[derive(Debug, Clone)]
pub struct Planned {
    /// One result per change, in request order.
    pub results: Vec<PushResult>,
    /// The segment that logs the push, to be written create-only at its first seq.
    pub segment: Option<Segment>,
}

/// The dataset, from a snapshot (or the empty log) and the segments after it.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub(super) policies: Policies,
    pub(super) head: DatasetHead,
    /// The seq the log held in memory starts after (the snapshot's).
    pub(super) base: u64,
    pub(super) base_hash: StateHash,
    pub(super) base_digest: StateDigest,
    pub(super) entities: BTreeMap<EntityKey, EntityState>,
    pub(super) known: HashMap<ChangeId, u64>,
    /// Every logged `append`, in seq order (a bootstrap carries them).
    pub(super) appends: Vec<StoredChange>,
    log: Vec<Logged>,
    pub(super) conflicts: Vec<ConflictRecord>,
    pub(super) devices: BTreeMap<String, DeviceStatus>,
}

impl Ledger {
    /// The empty dataset under `policies`.
    pub fn new(policies: Policies) -> Ledger {
        Ledger {
            policies,
            head: DatasetHead::default(),
            base: 0,
            base_hash: StateHash::default(),
            base_digest: StateDigest::default(),
            entities: BTreeMap::new(),
            known: HashMap::new(),
            appends: Vec::new(),
            log: Vec::new(),
            conflicts: Vec::new(),
            devices: BTreeMap::new(),
        }
    }

    /// Where the log stands.
    pub fn head(&self) -> DatasetHead {
        self.head
    }

    /// The seq the log held in memory starts after (a snapshot's): pages
    /// start no earlier.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The merge policies.
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// The devices that pushed, each with the last seq it logged and when.
    pub fn devices(&self) -> Vec<DeviceStatus> {
        self.devices.values().cloned().collect()
    }

    /// The number of entities that have state.
    pub fn entity_count(&self) -> usize {
        self.entities.len()
    }

    /// Applies the segment stored as `object`, the next one of the log,
    /// after checking that it agrees with the log before it: its seqs follow
    /// the head, its chain starts at the head's, every change merges under
    /// its collection's policy, and the chain head and digest it claims are
    /// the ones its changes give. Nothing is applied when a check fails.
    pub fn apply(&mut self, object: &str, segment: &Segment) -> Result<(), FileStoreError> {
        let tampered = |message: String| FileStoreError::Tampered { object: object.to_owned(), message };
        if segment.prev_hash != self.head.state_hash {
            return Err(tampered(format!(
                "its chain starts at {}, the log before it ends at {}",
                segment.prev_hash, self.head.state_hash
            )));
        }
        let mut hash = self.head.state_hash;
        let mut digest = self.head.state_digest;
        let mut touched: HashMap<EntityKey, EntityState> = HashMap::new();
        let mut ids = HashSet::new();
        let mut logged = Vec::with_capacity(segment.changes.len());
        for (i, stored) in segment.changes.iter().enumerate() {
            let seq = self.head.seq + 1 + i as u64;
            if stored.seq != seq {
                return Err(tampered(format!("change {} has seq {}, the log needs {seq}", i + 1, stored.seq)));
            }
            let change = &stored.change;
            if self.known.contains_key(&change.change_id) || !ids.insert(change.change_id.clone()) {
                return Err(tampered(format!("change {} is logged twice", change.change_id.as_str())));
            }
            let key = (change.collection.clone(), change.entity_id.clone());
            let current = touched.get(&key).or_else(|| self.entities.get(&key));
            match merge(self.policies.of(change.collection.as_str()), current, change, seq) {
                Merge::Rejected(_) => {
                    return Err(tampered(format!(
                        "change {} (seq {seq}) is one its collection's merge policy refuses",
                        change.change_id.as_str()
                    )));
                }
                Merge::Logged => {}
                Merge::Applied { state, .. } => {
                    let old = current.and_then(EntityState::entity_hash);
                    digest.replace(old.as_ref(), state.entity_hash().as_ref());
                    touched.insert(key, state);
                }
            }
            hash = hash.fold(stored);
            logged.push(Logged { change: stored.clone(), state_hash: hash, state_digest: digest });
        }
        if hash != segment.state_hash {
            return Err(tampered(format!("its changes hash to {hash}, it says {}", segment.state_hash)));
        }
        if digest != segment.state_digest {
            return Err(tampered(format!("its changes give the digest {digest}, it says {}", segment.state_digest)));
        }
        for (i, record) in segment.conflicts.iter().enumerate() {
            let id = self.head.conflict_seq + 1 + i as u64;
            if record.id != id {
                return Err(tampered(format!("conflict record {} should be {id}", record.id)));
            }
        }
        // Every check passed: apply.
        self.entities.extend(touched);
        for entry in &logged {
            self.known.insert(entry.change.change.change_id.clone(), entry.change.seq);
            if entry.change.change.op == Op::Append {
                self.appends.push(entry.change.clone());
            }
            let device = entry.change.device_id.as_str();
            let status = self.devices.entry(device.to_owned()).or_insert_with(|| DeviceStatus {
                device_id: device.to_owned(),
                cursor: 0,
                last_seen: 0,
            });
            status.cursor = entry.change.seq;
            status.last_seen = status.last_seen.max(entry.change.server_time);
        }
        self.log.extend(logged);
        self.conflicts.extend(segment.conflicts.iter().cloned());
        self.head.seq = segment.last();
        self.head.state_hash = hash;
        self.head.state_digest = digest;
        self.head.conflict_seq += segment.conflicts.len() as u64;
        Ok(())
    }

    /// Plans `changes` from `device` on the log as it stands, exactly as a
    /// server would (duplicates, clock skew against `now`, merges, seqs,
    /// chain, digest, conflicts).
    pub fn plan(&self, device: &DeviceId, changes: &[Change], now: u64, max_clock_drift_ms: u64) -> Planned {
        let (ids, keys) = batch_keys(changes);
        let snapshot = batch::Snapshot {
            head: self.head,
            known: ids.into_iter().filter_map(|id| self.known.get(&id).map(|&seq| (id, seq))).collect(),
            entities: keys.into_iter().filter_map(|k| self.entities.get(&k).map(|s| (k, s.clone()))).collect(),
        };
        let rules = Rules { now, max_clock_drift_ms, policies: &self.policies };
        let plan = plan_push(snapshot, device, changes, rules);
        let segment = (!plan.log.is_empty()).then(|| Segment {
            format: FORMAT.to_owned(),
            prev_hash: self.head.state_hash,
            changes: plan.log.iter().map(|e| e.change.clone()).collect(),
            conflicts: plan.conflicts.iter().map(batch::ConflictEntry::record).collect(),
            state_hash: plan.head.state_hash,
            state_digest: plan.head.state_digest,
        });
        Planned { results: plan.results, segment }
    }

    /// The chain head and digest at `seq`, if the log in memory reaches it.
    pub fn hashes_at(&self, seq: u64) -> Option<(StateHash, StateDigest)> {
        if seq == self.base {
            return Some((self.base_hash, self.base_digest));
        }
        let i = seq.checked_sub(self.base + 1)?;
        self.log.get(usize::try_from(i).ok()?).map(|e| (e.state_hash, e.state_digest))
    }

    /// The page after `cursor` covering at most `limit` seqs, leaving out
    /// the seqs in `left_out` (a sync's own pushed changes). `None` when the
    /// cursor lies outside the log held (the device must bootstrap, as a
    /// server's `410 reset_required` says).
    pub fn page(&self, cursor: u64, limit: u64, left_out: &HashSet<u64>) -> Option<LogPage> {
        if cursor < self.base || cursor > self.head.seq {
            return None;
        }
        let end = self.head.seq.min(cursor.saturating_add(limit.max(1)));
        let from = usize::try_from(cursor - self.base).ok()?;
        let to = usize::try_from(end - self.base).ok()?;
        let changes =
            self.log[from..to].iter().filter(|e| !left_out.contains(&e.change.seq)).map(|e| e.change.clone()).collect();
        let (state_hash, state_digest) = self.hashes_at(end)?;
        Some(LogPage { changes, cursor: end, has_more: end < self.head.seq, state_hash, state_digest })
    }

    /// Conflict records with an id above `since`, at most `limit`, and whether more follow.
    pub fn conflicts(&self, since: u64, limit: u64) -> (Vec<ConflictRecord>, bool) {
        let after: Vec<&ConflictRecord> = self.conflicts.iter().filter(|r| r.id > since).collect();
        let take = usize::try_from(limit).unwrap_or(usize::MAX);
        (after.iter().take(take).map(|r| (*r).clone()).collect(), after.len() > take)
    }

    /// The dataset as a bootstrap stream (`GET /v1/bootstrap`'s body): the
    /// header, every entity in key order, every logged `append`, the end line.
    pub fn bootstrap_body(&self, server_time: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entities.len() * 256 + 256);
        let header = BootstrapHeader {
            cursor: self.head.seq,
            state_hash: self.head.state_hash,
            state_digest: self.head.state_digest,
            server_time,
            policies: self.policies.clone(),
        };
        write_line(&mut out, &header);
        for state in self.entities.values() {
            write_line(&mut out, &BootstrapLine::Entity(state.clone()));
        }
        for change in &self.appends {
            write_line(&mut out, &BootstrapLine::Change(change.clone()));
        }
        let count = (self.entities.len() + self.appends.len()) as u64;
        write_line(&mut out, &BootstrapEnd { end: true, count });
        out
    }
}

/// Appends `value` as one JSON line.
pub(super) fn write_line(out: &mut Vec<u8>, value: &impl serde::Serialize) {
    serde_json::to_writer(&mut *out, value).expect("a line serialises");
    out.push(b'\n');
}
