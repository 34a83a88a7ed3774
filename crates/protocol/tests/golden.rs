//! The golden vectors (`tests/golden/vectors.json`, made by `tests/golden/generate.py`
//! independently of this crate) checked against the crate's own hashing, merge and digest.

use std::collections::BTreeMap;

use deltasync_protocol::chain::{self, ChainHasher, StateHash};
use deltasync_protocol::digest::StateDigest;
use deltasync_protocol::json;
use deltasync_protocol::merge::{self, EntityState, Merge, Policy};
use deltasync_protocol::{Change, Op, StoredChange};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

const VECTORS: &str = include_str!("golden/vectors.json");

fn str_member<'a>(v: &'a Value, name: &str) -> &'a str {
    v[name].as_str().unwrap_or_else(|| panic!("`{name}` must be a string in {v}"))
}

fn hex32(text: &str, name: &str) -> [u8; 32] {
    assert!(
        text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "`{name}` must be 64 lowercase hex digits: {text}"
    );
    StateHash::from_hex(text).unwrap().0
}

/// Builds the stored change from its JSON text both through serde and through the
/// validating parser, and checks they agree.
fn stored_change(raw: &RawValue) -> StoredChange {
    let by_serde: StoredChange = serde_json::from_str(raw.get()).expect("a stored change");
    let v: Value = serde_json::from_str(raw.get()).unwrap();
    let change =
        Change::from_json(&v, &deltasync_protocol::ChangeLimits::default()).expect("the vector's change is valid");
    assert_eq!(by_serde.change, change);
    assert_eq!(Some(by_serde.seq), v["seq"].as_u64());
    assert_eq!(Some(by_serde.server_time), v["server_time"].as_u64());
    assert_eq!(by_serde.device_id.as_str(), str_member(&v, "device_id"));
    by_serde
}

#[derive(Deserialize)]
struct File {
    description: String,
    policy: String,
    vectors: Vec<RawVector>,
}

/// One vector as stored; `change` stays JSON text so that its number literals reach the parser as written.
#[derive(Deserialize)]
struct RawVector {
    note: String,
    change: Box<RawValue>,
    jcs: String,
    change_hash: String,
    state_hash: String,
    state_digest: String,
    entity: Value,
}

struct Vector {
    note: String,
    change: StoredChange,
    jcs: String,
    change_hash: [u8; 32],
    state_hash: StateHash,
    state_digest: StateDigest,
    entity: Value,
}

fn vectors() -> Vec<Vector> {
    let file: File = serde_json::from_str(VECTORS).expect("vectors.json has the expected shape");
    assert!(file.description.contains("SHA-256"));
    assert_eq!(file.policy, "fields");
    assert!(file.vectors.len() >= 10);
    file.vectors
        .into_iter()
        .map(|v| Vector {
            change: stored_change(&v.change),
            change_hash: hex32(&v.change_hash, "change_hash"),
            state_hash: StateHash(hex32(&v.state_hash, "state_hash")),
            state_digest: StateDigest(hex32(&v.state_digest, "state_digest")),
            note: v.note,
            jcs: v.jcs,
            entity: v.entity,
        })
        .collect()
}

#[test]
fn vectors_cover_what_they_claim() {
    let vs = vectors();
    let ops: Vec<Op> = vs.iter().map(|v| v.change.change.op).collect();
    assert!(ops.contains(&Op::Upsert) && ops.contains(&Op::Delete) && ops.contains(&Op::Append));
    assert!(vs.iter().any(|v| v.change.change.entity_id.as_str().contains(' ')));
    for literal in ["1e21", "0.1", "-0", "4.50", "1e-7", "\\u00e9", "\u{20ac}", "\\ud83d\\ude00"] {
        assert!(VECTORS.contains(literal), "vectors.json should hold the literal {literal}");
    }
    for (i, v) in vs.iter().enumerate() {
        assert_eq!(v.change.seq, i as u64 + 1, "seqs are 1..N");
    }
}

#[test]
fn change_hashes_match() {
    for v in vectors() {
        let input = String::from_utf8(chain::change_hash_input(&v.change)).unwrap();
        assert_eq!(input, v.jcs, "JCS of seq {} ({})", v.change.seq, v.note);
        assert_eq!(
            hex::encode(chain::change_hash(&v.change)),
            hex::encode(v.change_hash),
            "change_hash of seq {} ({})",
            v.change.seq,
            v.note
        );
    }
}

#[test]
fn state_hash_chain_matches() {
    let mut head = StateHash::ZERO;
    let mut hasher = ChainHasher::new(0, StateHash::ZERO);
    for v in vectors() {
        let next = head.next(&v.change_hash);
        assert_eq!(next, head.fold(&v.change));
        assert_eq!(next, v.state_hash, "state_hash after seq {} ({})", v.change.seq, v.note);
        assert_eq!(hasher.push(&v.change), Ok(next));
        head = next;
    }
    // A change out of order is refused.
    let vs = vectors();
    assert!(ChainHasher::new(0, StateHash::ZERO).push(&vs[1].change).is_err());
}

#[test]
fn merge_and_state_digest_match() {
    let mut states: BTreeMap<(String, String), EntityState> = BTreeMap::new();
    let mut digest = StateDigest::ZERO;
    for v in vectors() {
        let c = &v.change.change;
        let key = (c.collection.as_str().to_owned(), c.entity_id.as_str().to_owned());
        let old = states.get(&key);
        match merge::merge(Policy::Fields, old, c, v.change.seq) {
            Merge::Logged => {
                assert_eq!(c.op, Op::Append);
                assert!(v.entity.is_null(), "seq {}: an append has no entity", v.change.seq);
            }
            Merge::Applied { state, .. } => {
                let old_hash = old.and_then(EntityState::entity_hash);
                let new_hash = state.entity_hash();
                // replace() must equal sub() then add().
                let mut by_parts = digest;
                if let Some(h) = &old_hash {
                    by_parts.sub(h);
                }
                if let Some(h) = &new_hash {
                    by_parts.add(h);
                }
                digest.replace(old_hash.as_ref(), new_hash.as_ref());
                assert_eq!(digest, by_parts);

                let e = &v.entity;
                assert_eq!(str_member(e, "collection"), c.collection.as_str());
                assert_eq!(str_member(e, "entity_id"), c.entity_id.as_str());
                assert_eq!(e["deleted"].as_bool(), Some(state.deleted), "seq {}: deleted", v.change.seq);
                let data = json::to_jcs(&Value::Object(state.data.clone()));
                assert_eq!(data, str_member(e, "data_jcs"), "seq {} ({}): visible data", v.change.seq, v.note);
                match new_hash {
                    Some(h) => assert_eq!(hex::encode(h), str_member(e, "entity_hash"), "seq {}", v.change.seq),
                    None => assert!(e["entity_hash"].is_null()),
                }
                assert_eq!(state.version, v.change.seq);
                states.insert(key, state);
            }
            Merge::Rejected(conf) => {
                panic!("seq {}: `fields` never refuses, got {conf:?}", v.change.seq)
            }
        }
        assert_eq!(digest, v.state_digest, "state_digest after seq {} ({})", v.change.seq, v.note);

        // The digest recomputed from scratch agrees with the incremental one.
        let mut fresh = StateDigest::ZERO;
        for s in states.values() {
            if let Some(h) = s.entity_hash() {
                fresh.add(&h);
            }
        }
        assert_eq!(fresh, digest);
    }
    assert_ne!(digest, StateDigest::ZERO);
}

#[test]
fn wire_json_round_trips_the_vectors() {
    for v in vectors() {
        let text = v.change.to_wire_json();
        let back: StoredChange = serde_json::from_str(&text).unwrap();
        assert_eq!(chain::change_hash(&back), v.change_hash, "seq {}", v.change.seq);
    }
}
