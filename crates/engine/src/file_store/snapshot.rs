//! A snapshot: a ledger written out whole at a seq (NDJSON), so that a new
//! device reads it and the segments after it instead of the whole log. A
//! device writes one create-only when [`is_due`] says so; the digest it
//! claims is checked against its entities when it is read, its chain head
//! against the segment that ends at its seq, and the segments after it must
//! chain onto it.

use std::collections::{BTreeMap, HashMap};

use deltasync_protocol::batch::DatasetHead;
use deltasync_protocol::wire::{ConflictRecord, DeviceStatus, Policies};
use deltasync_protocol::{EntityState, StateDigest, StateHash, StoredChange};
use serde::{Deserialize, Serialize};

use super::ledger::{Ledger, write_line};
use super::segment::Segment;
use super::{FORMAT, FileStoreError};

/// The fewest changes logged between two snapshots.
pub const SNAPSHOT_EVERY: u64 = 10_000;

/// Whether a device whose log stands at `head` should write a snapshot,
/// the newest being at `newest` and the dataset holding `entities`: once
/// [`SNAPSHOT_EVERY`] changes and half as many changes as there are
/// entities were logged since the newest. A snapshot costs about as much as
/// the entities; spacing them by half the entity count keeps that cost a
/// small constant per change, and a new device reads at most about half the
/// dataset's size in segments after the snapshot.
pub fn is_due(head: u64, newest: Option<u64>, entities: usize) -> bool {
    let since = head.saturating_sub(newest.unwrap_or(0));
    since >= SNAPSHOT_EVERY.max(entities as u64 / 2)
}

/// Receipts (change id, seq) per line.
const RECEIPTS_PER_LINE: usize = 1000;

/// The first line.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    cursor: u64,
    state_hash: StateHash,
    state_digest: StateDigest,
    conflict_seq: u64,
    /// The first seq of the segment that ends at `cursor`: its chain head
    /// and digest must be the snapshot's ([`Ledger::check_snapshot_end`]).
    last_segment: u64,
}

/// A line after the header.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Line {
    Entity(EntityState),
    Change(StoredChange),
    Receipts(Vec<(String, u64)>),
    Conflict(ConflictRecord),
    Device(DeviceStatus),
}

/// The last line.
#[derive(Debug, Serialize, Deserialize)]
struct End {
    end: bool,
    count: u64,
}

impl Ledger {
    /// Checks a ledger read from the snapshot `object` against `segment`, the
    /// segment its header names as ending at its seq: the snapshot's digest
    /// is checked against its entities when read, its chain head only here.
    /// (A snapshot at seq 0 has no segment to check.)
    pub fn check_snapshot_end(&self, object: &str, segment: Option<&Segment>) -> Result<(), FileStoreError> {
        let tampered = |message: String| FileStoreError::Tampered { object: object.to_owned(), message };
        let head = self.head;
        if head.seq == 0 {
            return Ok(());
        }
        let Some(segment) = segment else {
            return Err(tampered(format!(
                "the segment it names, {}, is not in the store",
                super::layout::segment(self.last_segment)
            )));
        };
        if segment.last() != head.seq
            || segment.state_hash != head.state_hash
            || segment.state_digest != head.state_digest
        {
            return Err(tampered(format!(
                "its head (seq {}, chain {}) is not where {} ends (seq {}, chain {})",
                head.seq,
                head.state_hash,
                super::layout::segment(self.last_segment),
                segment.last(),
                segment.state_hash
            )));
        }
        Ok(())
    }

    /// The ledger as a snapshot object, at its head.
    pub fn snapshot_body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entities.len() * 300 + self.known.len() * 48 + 256);
        let head = self.head;
        let header = Header {
            format: FORMAT.to_owned(),
            cursor: head.seq,
            state_hash: head.state_hash,
            state_digest: head.state_digest,
            conflict_seq: head.conflict_seq,
            last_segment: self.last_segment,
        };
        write_line(&mut out, &header);
        let mut count = 0u64;
        let mut line = |out: &mut Vec<u8>, l: Line| {
            write_line(out, &l);
            count += 1;
        };
        for state in self.entities.values() {
            line(&mut out, Line::Entity(state.clone()));
        }
        for change in &self.appends {
            line(&mut out, Line::Change(change.clone()));
        }
        let mut receipts: Vec<(String, u64)> =
            self.known.iter().map(|(id, &seq)| (id.as_str().to_owned(), seq)).collect();
        receipts.sort_by_key(|r| r.1);
        for chunk in receipts.chunks(RECEIPTS_PER_LINE) {
            line(&mut out, Line::Receipts(chunk.to_vec()));
        }
        for record in &self.conflicts {
            line(&mut out, Line::Conflict(record.clone()));
        }
        for device in self.devices.values() {
            line(&mut out, Line::Device(device.clone()));
        }
        write_line(&mut out, &End { end: true, count });
        out
    }

    /// Reads the snapshot stored as `object` into a ledger under `policies`,
    /// checking that it is whole and that its entities give the digest it claims.
    pub fn from_snapshot(object: &str, bytes: &[u8], policies: Policies) -> Result<Ledger, FileStoreError> {
        let unreadable = |message: String| FileStoreError::Unreadable { object: object.to_owned(), message };
        let mut lines = bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty());
        let header: Header = lines
            .next()
            .ok_or_else(|| unreadable("it is empty".into()))
            .and_then(|l| serde_json::from_slice(l).map_err(|e| unreadable(format!("header: {e}"))))?;
        if header.format != FORMAT {
            return Err(unreadable(format!("format {:?}, this deltasync reads {FORMAT:?}", header.format)));
        }
        let mut ledger = Ledger::new(policies);
        let mut digest = StateDigest::default();
        let mut count = 0u64;
        let mut end = None;
        let mut known = HashMap::new();
        let mut entities = BTreeMap::new();
        for (n, raw) in lines.enumerate() {
            if end.is_some() {
                return Err(unreadable("lines follow its end line".into()));
            }
            if let Ok(e) = serde_json::from_slice::<End>(raw) {
                end = Some(e);
                continue;
            }
            let line: Line = serde_json::from_slice(raw).map_err(|e| unreadable(format!("line {}: {e}", n + 2)))?;
            count += 1;
            match line {
                Line::Entity(state) => {
                    if let Some(h) = state.entity_hash() {
                        digest.add(&h);
                    }
                    let key = (state.collection.clone(), state.entity_id.clone());
                    if entities.insert(key, state).is_some() {
                        return Err(unreadable(format!("line {}: an entity listed twice", n + 2)));
                    }
                }
                Line::Change(change) => ledger.appends.push(change),
                Line::Receipts(receipts) => {
                    for (id, seq) in receipts {
                        let id = deltasync_protocol::ChangeId::parse(id)
                            .map_err(|e| unreadable(format!("line {}: {e}", n + 2)))?;
                        known.insert(id, seq);
                    }
                }
                Line::Conflict(record) => ledger.conflicts.push(record),
                Line::Device(device) => {
                    ledger.devices.insert(device.device_id.clone(), device);
                }
            }
        }
        match end {
            Some(End { end: true, count: c }) if c == count => {}
            Some(_) => return Err(unreadable(format!("its end line does not count its {count} lines"))),
            None => return Err(unreadable("it is cut short (no end line)".into())),
        }
        if digest != header.state_digest {
            return Err(FileStoreError::Tampered {
                object: object.to_owned(),
                message: format!("its entities give the digest {digest}, it says {}", header.state_digest),
            });
        }
        ledger.entities = entities;
        ledger.known = known;
        ledger.head = DatasetHead {
            seq: header.cursor,
            state_hash: header.state_hash,
            state_digest: header.state_digest,
            horizon: 0,
            conflict_seq: header.conflict_seq,
        };
        ledger.base = header.cursor;
        ledger.last_segment = header.last_segment;
        ledger.base_hash = header.state_hash;
        ledger.base_digest = header.state_digest;
        Ok(ledger)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_come_every_ten_thousand_changes_or_half_the_entities() {
        assert!(!is_due(9_999, None, 100));
        assert!(is_due(10_000, None, 100));
        assert!(!is_due(19_999, Some(10_000), 100));
        assert!(is_due(20_000, Some(10_000), 20_000));
        assert!(!is_due(120_000, Some(80_000), 100_000), "40,000 changes is less than half of 100,000 entities");
        assert!(is_due(130_000, Some(80_000), 100_000));
    }
}
