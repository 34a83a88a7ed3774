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
    /// The first seq of the segment that ends at the head (0 for the empty log).
    pub(super) last_segment: u64,
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
            last_segment: 0,
        }
    }

    /// The first seq of the segment that ends at the head (0 for the empty
    /// log): the object a snapshot's chain head is checked against.
    pub fn last_segment(&self) -> u64 {
        self.last_segment
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
        self.last_segment = segment.first();
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

#[cfg(test)]
mod tests {
    use deltasync_protocol::wire::ResultStatus;
    use deltasync_protocol::{ChangeLimits, Policy};
    use serde_json::{Value, json};

    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn change(id: &str, entity: &str, data: Value, ms: u64, device: &str) -> Change {
        let hlc = format!("{ms:013}-00000-{device}");
        let value = json!({"change_id": id, "collection": "tasks", "entity_id": entity, "op": "upsert", "data": data, "hlc": hlc});
        Change::from_json(&value, &ChangeLimits::default()).expect("a valid change")
    }

    fn device(name: &str) -> DeviceId {
        DeviceId::parse(name).unwrap()
    }

    /// Plans `changes` and applies the segment to every ledger given, as devices that read it.
    fn push(ledgers: &mut [&mut Ledger], from: &str, changes: &[Change]) -> Planned {
        let planned = ledgers[0].plan(&device(from), changes, NOW, 60_000);
        if let Some(segment) = &planned.segment {
            for l in ledgers.iter_mut() {
                l.apply("log/x.json", segment).expect("a planned segment applies");
            }
        }
        planned
    }

    #[test]
    fn a_segment_planned_by_one_device_applies_on_another_to_the_same_head() {
        let mut writer = Ledger::new(Policies::default());
        let mut reader = Ledger::new(Policies::default());
        let planned = push(
            &mut [&mut writer, &mut reader],
            "a",
            &[
                change("c1", "t1", json!({"title": "x"}), NOW - 10, "a"),
                change("c2", "t1", json!({"done": true}), NOW - 5, "a"),
            ],
        );
        assert!(planned.results.iter().all(|r| r.status == ResultStatus::Applied));
        assert_eq!(planned.results.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![Some(1), Some(2)]);
        assert_eq!(writer.head(), reader.head());
        assert_eq!(reader.head().seq, 2);
        let page = reader.page(0, 1000, &HashSet::new()).unwrap();
        assert_eq!(page.changes.len(), 2);
        assert_eq!((page.state_hash, page.state_digest), (reader.head().state_hash, reader.head().state_digest));
        // A page may stop between two changes of one segment, with the hashes there.
        let first = reader.page(0, 1, &HashSet::new()).unwrap();
        assert!(first.has_more);
        assert_eq!(first.state_hash, StateHash::default().fold(&page.changes[0]));
        assert!(reader.page(3, 10, &HashSet::new()).is_none(), "a cursor past the head needs a reset");
    }

    #[test]
    fn a_retried_push_is_answered_duplicate_and_writes_nothing() {
        let mut ledger = Ledger::new(Policies::default());
        let changes = [change("c1", "t1", json!({"n": 1}), NOW, "a")];
        push(&mut [&mut ledger], "a", &changes);
        let again = ledger.plan(&device("a"), &changes, NOW, 60_000);
        assert!(again.segment.is_none());
        assert_eq!(again.results[0].status, ResultStatus::Duplicate);
        assert_eq!(again.results[0].seq, Some(1));
    }

    #[test]
    fn the_loser_of_a_race_plans_again_on_top_of_the_winner() {
        let mut a = Ledger::new(Policies::default());
        let mut b = Ledger::new(Policies::default());
        push(&mut [&mut a, &mut b], "a", &[change("c0", "t0", json!({"n": 0}), NOW, "a")]);
        let mine = [change("c1", "t1", json!({"n": 1}), NOW, "a")];
        let theirs = [change("c2", "t1", json!({"m": 2}), NOW + 1, "b")];
        let lost = a.plan(&device("a"), &mine, NOW, 60_000).segment.unwrap();
        // b wins seq 2: its segment is applied everywhere; a's first plan no longer fits.
        push(&mut [&mut b, &mut a], "b", &theirs);
        assert!(matches!(a.apply("log/2.json", &lost), Err(FileStoreError::Tampered { .. })));
        let replanned = push(&mut [&mut a, &mut b], "a", &mine);
        assert_eq!(replanned.results[0].seq, Some(3));
        assert_eq!(a.head(), b.head());
        let t1 = change("x", "t1", json!({}), NOW, "a");
        assert_eq!(a.entities[&(t1.collection, t1.entity_id)].data.len(), 2, "both fields survive");
    }

    #[test]
    fn an_edited_segment_is_refused_whole_and_names_the_object() {
        let writer = Ledger::new(Policies::default());
        let planned = writer.plan(&device("a"), &[change("c1", "t1", json!({"n": 1}), NOW, "a")], NOW, 60_000);
        let segment = planned.segment.unwrap();
        let mut edited = segment.clone();
        edited.changes[0].change.data = Some(json!({"n": 2}));
        let mut reader = Ledger::new(Policies::default());
        let err = reader.apply("log/00000000000000000001.json", &edited).unwrap_err();
        assert!(err.to_string().contains("log/00000000000000000001.json"), "{err}");
        assert_eq!(reader.head(), DatasetHead::default(), "nothing applied");
        let mut relinked = segment.clone();
        relinked.prev_hash = segment.state_hash;
        assert!(matches!(reader.apply("log/1.json", &relinked), Err(FileStoreError::Tampered { .. })));
        let mut digest = segment.clone();
        digest.state_digest = StateDigest::default();
        assert!(matches!(reader.apply("log/1.json", &digest), Err(FileStoreError::Tampered { .. })));
        reader.apply("log/1.json", &segment).expect("the original applies");
    }

    #[test]
    fn a_change_its_policy_refuses_cannot_be_slipped_into_a_segment() {
        let policies = Policies { default: Policy::Reject, collections: Default::default() };
        let mut writer = Ledger::new(policies.clone());
        let versioned = |id: &str, entity: &str, base: u64| {
            let mut c = change(id, entity, json!({"n": id}), NOW, "a");
            c.base_version = Some(base);
            c
        };
        let created = push(&mut [&mut writer], "a", &[versioned("c1", "t1", 0)]);
        assert_eq!(created.results[0].status, ResultStatus::Applied);
        // An upsert based on an old version is refused under `reject`: the planner logs nothing…
        let refused = writer.plan(&device("b"), &[versioned("c2", "t1", 0)], NOW, 60_000);
        assert_eq!(refused.results[0].status, ResultStatus::Rejected);
        assert!(refused.segment.is_none());
        // …and a segment that logs such a change anyway is refused by every reader.
        let mut forged = writer.plan(&device("b"), &[versioned("c3", "t2", 0)], NOW, 60_000);
        let mut segment = forged.segment.take().expect("a new entity is created");
        segment.changes[0].change.entity_id = deltasync_protocol::EntityId::parse("t1").unwrap();
        let mut reader = writer.clone();
        let err = reader.apply("log/2.json", &segment).unwrap_err();
        assert!(err.to_string().contains("merge policy refuses"), "{err}");
    }

    #[test]
    fn a_snapshot_reads_back_to_the_same_ledger_and_an_edited_one_is_refused() {
        let mut ledger = Ledger::new(Policies::default());
        for i in 0..20 {
            push(
                &mut [&mut ledger],
                "a",
                &[change(&format!("c{i}"), &format!("t{}", i % 7), json!({"i": i}), NOW, "a")],
            );
        }
        let body = ledger.snapshot_body();
        let read = Ledger::from_snapshot("snapshots/s.ndjson", &body, Policies::default()).unwrap();
        assert_eq!(read.head(), ledger.head());
        assert_eq!(read.base(), 20);
        assert_eq!(read.bootstrap_body(1), ledger.bootstrap_body(1));
        assert_eq!(read.known.len(), 20);
        // The old log is not in memory: pages start at the snapshot.
        assert!(read.page(19, 10, &HashSet::new()).is_none());
        assert_eq!(read.page(20, 10, &HashSet::new()).unwrap().changes.len(), 0);
        let text = String::from_utf8(body).unwrap();
        let edited = text.replacen("\"i\":3", "\"i\":4", 1);
        assert_ne!(edited, text);
        let err = Ledger::from_snapshot("snapshots/s.ndjson", edited.as_bytes(), Policies::default()).unwrap_err();
        assert!(matches!(err, FileStoreError::Tampered { .. }), "{err}");
        let cut = &text.as_bytes()[..text.len() - 30];
        assert!(matches!(
            Ledger::from_snapshot("snapshots/s.ndjson", cut, Policies::default()),
            Err(FileStoreError::Unreadable { .. })
        ));
    }
}
