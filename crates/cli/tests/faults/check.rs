//! The checks at the end of a fault run, once faults have stopped and every
//! device has synced: the log is whole and its chain verifies; every change a
//! device acknowledged to its user is logged exactly once (or was refused for
//! good under `reject`); every device's state equals a replay of the log under
//! the collections' policies; digests and chain heads agree everywhere.

use std::collections::{BTreeMap, HashMap};

use deltasync_protocol::json::to_jcs;
use deltasync_protocol::{EntityState, Merge, Policy, StoredChange, merge};
use serde_json::{Value, json};

use super::workload::{COLLECTIONS, Record};
use crate::verify::{Chain, PageInfo, digest_of};

/// What a device shows at the end of a run.
#[derive(Debug)]
pub struct DeviceEnd {
    /// The device's name in the run.
    pub name: String,
    /// Its device id.
    pub device_id: String,
    /// What it did during the run.
    pub record: Record,
    /// Its `status`.
    pub status: Value,
    /// Its `export-pending` entries whose state is `failed`.
    pub failed: Vec<Value>,
    /// Its `list` of every collection of the workload.
    pub lists: BTreeMap<String, Value>,
    /// The report of its last sync.
    pub last_report: Value,
}

/// The state a log merges to.
#[derive(Debug)]
pub struct Replay {
    /// Per collection, the live entities as `list` prints them: `[{"id", "data"}]` sorted by id.
    pub lists: BTreeMap<String, Value>,
    /// The state digest of the live entities.
    pub digest: String,
}

/// The policy of each collection of the workload.
pub fn policies() -> HashMap<String, Policy> {
    COLLECTIONS.iter().map(|(c, p)| ((*c).to_owned(), p.parse().unwrap())).collect()
}

/// The log is `1..head` without gaps, its chain folds to every page's `state_hash`
/// and to the server's, and the server's head is its last seq.
pub fn check_chain(log: &[Value], pages: &[PageInfo], server: &Value) {
    let mut chain = Chain::default();
    let mut heads = vec![chain.hex()];
    for change in log {
        chain.fold(change);
        heads.push(chain.hex());
    }
    for page in pages {
        assert_eq!(
            page.state_hash, heads[page.cursor as usize],
            "the state_hash of the page ending at {}",
            page.cursor
        );
    }
    assert_eq!(server["head"], json!(log.len()), "the server's head is the log's last seq: {server}");
    assert_eq!(server["state_hash"], json!(chain.hex()), "the server's state_hash is the folded chain: {server}");
}

/// Every change id a device's finished write printed is in the log exactly once,
/// or is `failed` on that device with `version_mismatch` (only under `reject`)
/// and not logged; every logged change of a device it did not record came from
/// one of its killed writes; nothing is logged twice.
pub fn check_acknowledged(log: &[Value], devices: &[DeviceEnd]) {
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for change in log {
        let id = change["change_id"].as_str().expect("change_id");
        let seq = change["seq"].as_u64().expect("seq");
        if let Some(first) = seen.insert(id, seq) {
            panic!("change {id} is logged twice, at seqs {first} and {seq}");
        }
    }
    let by_device: HashMap<&str, &DeviceEnd> = devices.iter().map(|d| (d.device_id.as_str(), d)).collect();
    let mut unrecorded: HashMap<&str, u64> = HashMap::new();
    for d in devices {
        let failed: HashMap<&str, &Value> =
            d.failed.iter().map(|f| (f["change_id"].as_str().expect("change_id"), f)).collect();
        for f in failed.values() {
            assert_eq!(f["collection"], "claims", "{}: only changes under `reject` may fail for good: {f}", d.name);
            assert_eq!(f["conflict"]["reason"], "version_mismatch", "{}: failed for another reason: {f}", d.name);
        }
        for w in &d.record.written {
            match (seen.get(w.change_id.as_str()), failed.get(w.change_id.as_str())) {
                (Some(_), None) => {}
                (None, Some(_)) => {}
                (Some(seq), Some(f)) => {
                    panic!("{}: change {} is logged at seq {seq} and failed: {f}", d.name, w.change_id)
                }
                (None, None) => panic!(
                    "{}: change {} ({} {}/{}) was acknowledged by the client but is neither in the log nor failed",
                    d.name, w.change_id, w.command, w.collection, w.entity_id
                ),
            }
        }
    }
    let recorded: HashMap<&str, ()> =
        devices.iter().flat_map(|d| d.record.written.iter().map(|w| (w.change_id.as_str(), ()))).collect();
    for change in log {
        let device = change["device_id"].as_str().expect("device_id");
        let d = by_device.get(device).unwrap_or_else(|| panic!("a change from unknown device {device}: {change}"));
        if !recorded.contains_key(change["change_id"].as_str().unwrap()) {
            let n = unrecorded.entry(device).or_insert(0);
            *n += 1;
            assert!(
                *n <= d.record.killed_writes,
                "{}: {} logged changes were never printed by a write, but only {} writes were killed (last: {change})",
                d.name,
                n,
                d.record.killed_writes
            );
        }
    }
}

/// Merges the whole log, in seq order, under the policies.
pub fn replay(log: &[Value], policies: &HashMap<String, Policy>) -> Replay {
    let mut states: BTreeMap<(String, String), EntityState> = BTreeMap::new();
    for change in log {
        let stored: StoredChange = serde_json::from_value(change.clone()).expect("a stored change");
        let collection = stored.change.collection.as_str().to_owned();
        let policy = policies.get(&collection).copied().unwrap_or_default();
        let key = (collection, stored.change.entity_id.as_str().to_owned());
        match merge(policy, states.get(&key), &stored.change, stored.seq) {
            Merge::Applied { state, .. } => {
                states.insert(key, state);
            }
            Merge::Logged => {}
            Merge::Rejected(c) => panic!("a logged change merges as rejected under {policy}: {c:?}: {change}"),
        }
    }
    let mut lists: BTreeMap<String, Vec<Value>> = policies.keys().map(|c| (c.clone(), Vec::new())).collect();
    for ((collection, id), state) in &states {
        if !state.deleted {
            lists.entry(collection.clone()).or_default().push(json!({"id": id, "data": state.data}));
        }
    }
    let live: Vec<(&str, &str, Value)> = states
        .iter()
        .filter(|(_, s)| !s.deleted)
        .map(|((c, id), s)| (c.as_str(), id.as_str(), Value::Object(s.data.clone())))
        .collect();
    let digest = digest_of(live.iter().map(|(c, id, data)| (*c, *id, data)));
    Replay { lists: lists.into_iter().map(|(c, l)| (c, Value::Array(l))).collect(), digest }
}

/// The device stands at the server's head with its chain head and digest, has
/// nothing pending, its last sync verified, and shows exactly the replayed state.
pub fn check_device(d: &DeviceEnd, replay: &Replay, server: &Value) {
    let st = &d.status;
    for key in ["cursor", "state_hash", "state_digest"] {
        let server_key = if key == "cursor" { "head" } else { key };
        assert_eq!(st[key], server[server_key], "{}: {key} of status {st} vs the server's {server}", d.name);
    }
    assert_eq!(st["pending"], 0, "{}: an outbox is stuck after faults stopped: {st}", d.name);
    assert_eq!(st["failed"], json!(d.failed.len()), "{}: {st}", d.name);
    assert_eq!(d.last_report["verified"], true, "{}: the last sync did not verify: {}", d.name, d.last_report);
    assert_eq!(server["state_digest"], json!(replay.digest), "the server's digest vs the replayed state's");
    for (collection, want) in &replay.lists {
        let got = d.lists.get(collection).unwrap_or_else(|| panic!("{}: no list of {collection}", d.name));
        assert_eq!(to_jcs(got), to_jcs(want), "{}: list {collection} vs the replay of the log", d.name);
    }
}
