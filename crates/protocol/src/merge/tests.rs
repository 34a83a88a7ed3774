//! Tests of the merge policies against spec §4: hand-written cases for each
//! policy, then property tests (order independence of `fields`, determinism
//! of every policy under replay).

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::digest::StateDigest;

const T0: u64 = 1_763_800_000_000;

/// An HLC `ms` milliseconds after T0, from device `dev`.
fn hlc(ms: u64, dev: &str) -> Hlc {
    Hlc::parse(format!("{:013}-00000-{dev}", T0 + ms)).unwrap()
}

fn change(id: &str, entity: &str, op: Op, data: Option<Value>, h: Hlc, base_version: Option<u64>) -> Change {
    Change {
        change_id: crate::ids::ChangeId::parse(id).unwrap(),
        collection: Collection::parse("tasks").unwrap(),
        entity_id: EntityId::parse(entity).unwrap(),
        op,
        data,
        hlc: h,
        base_version,
    }
}

fn up(id: &str, ms: u64, data: Value) -> Change {
    change(id, "e1", Op::Upsert, Some(data), hlc(ms, "dev"), None)
}

fn del(id: &str, ms: u64) -> Change {
    change(id, "e1", Op::Delete, None, hlc(ms, "dev"), None)
}

fn with_base(mut c: Change, base: Option<u64>) -> Change {
    c.base_version = base;
    c
}

/// Merges a change that must be logged and change the entity; returns the state and conflict.
fn apply(policy: Policy, cur: Option<&EntityState>, c: &Change, seq: u64) -> (EntityState, Option<Conflict>) {
    match merge(policy, cur, c, seq) {
        Merge::Applied { state, conflict } => {
            if let Some(conf) = &conflict {
                assert_eq!(conf.current.as_ref(), Some(&state.to_value()), "`current` is the entity after the merge");
            }
            (state, conflict)
        }
        other => panic!("expected Applied for {c:?}, got {other:?}"),
    }
}

/// Merges `changes` in order from nothing, at seqs 1.., and returns the final state and every conflict.
fn run(policy: Policy, changes: &[Change]) -> (EntityState, Vec<Option<Conflict>>) {
    let mut state: Option<EntityState> = None;
    let mut conflicts = Vec::new();
    for (i, c) in changes.iter().enumerate() {
        let (s, conf) = apply(policy, state.as_ref(), c, i as u64 + 1);
        state = Some(s);
        conflicts.push(conf);
    }
    (state.expect("at least one change"), conflicts)
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().expect("an object").clone()
}

fn names(list: &[&str]) -> Option<Vec<String>> {
    Some(list.iter().map(|s| s.to_string()).collect())
}

fn sorted(fields: &Option<Vec<String>>) -> Option<Vec<String>> {
    fields.clone().map(|mut f| {
        f.sort();
        f
    })
}

fn field_hlcs(state: &EntityState) -> BTreeMap<String, Hlc> {
    match &state.meta {
        Meta::Fields { fields, .. } => fields.clone(),
        other => panic!("expected fields meta, got {other:?}"),
    }
}

// ---------------------------------------------------------------- fields

#[test]
fn fields_last_writer_wins_per_field_by_hlc() {
    let (s, conflicts) = run(
        Policy::Fields,
        &[
            up("c1", 10, json!({"a": 1, "b": 1})),
            up("c2", 30, json!({"a": 2})),
            // Arrives last, but older than c2: loses `a`, wins `b` and `c`.
            up("c3", 20, json!({"a": 3, "b": 3, "c": 3})),
        ],
    );
    assert_eq!(s.data, obj(json!({"a": 2, "b": 3, "c": 3})));
    assert!(!s.deleted);
    assert_eq!(s.version, 3);
    assert_eq!(conflicts[0], None);
    assert_eq!(conflicts[1], None);
    let conf = conflicts[2].clone().unwrap();
    assert_eq!(conf.reason, ConflictReason::Superseded);
    assert_eq!(conf.fields, names(&["a"]), "names exactly the lost fields");
    assert_eq!(
        s.meta,
        Meta::Fields {
            fields: [("a", 30), ("b", 20), ("c", 20)].iter().map(|(k, ms)| (k.to_string(), hlc(*ms, "dev"))).collect(),
            t: None,
            u: Some(hlc(30, "dev")),
        }
    );
}

#[test]
fn fields_upsert_losing_every_field_is_superseded_with_all_of_them() {
    let (s, conflicts) =
        run(Policy::Fields, &[up("c1", 50, json!({"a": 1, "b": 1})), up("c2", 40, json!({"b": 2, "a": 2}))]);
    assert_eq!(s.data, obj(json!({"a": 1, "b": 1})));
    let conf = conflicts[1].clone().unwrap();
    assert_eq!(conf.reason, ConflictReason::Superseded);
    assert_eq!(sorted(&conf.fields), names(&["a", "b"]));
    assert_eq!(s.version, 2, "version is the seq of the last upsert, superseded or not");
}

#[test]
fn fields_null_is_stored_as_null() {
    let (s, _) = run(Policy::Fields, &[up("c1", 1, json!({"a": 1})), up("c2", 2, json!({"a": null}))]);
    assert_eq!(s.data, obj(json!({"a": null})));
}

#[test]
fn fields_delete_of_a_live_entity_hides_everything() {
    let (s, conflicts) = run(Policy::Fields, &[up("c1", 10, json!({"a": 1, "b": 2})), del("c2", 20)]);
    assert!(s.deleted);
    assert_eq!(s.data, Map::new(), "a deleted entity has data {{}}");
    assert_eq!(s.version, 2);
    assert_eq!(conflicts[1], None);
    assert_eq!(s.meta, Meta::Fields { fields: BTreeMap::new(), t: Some(hlc(20, "dev")), u: Some(hlc(10, "dev")) });
}

#[test]
fn fields_tombstone_hides_older_fields_and_a_surviving_entity_reports_superseded() {
    let (s, conflicts) = run(
        Policy::Fields,
        &[
            up("c1", 10, json!({"a": 1, "b": 1})),
            up("c2", 30, json!({"c": 3, "b": 3})),
            // Arrives last, between the two upserts: hides `a` only.
            del("c3", 20),
        ],
    );
    assert!(!s.deleted, "alive: u (30) > t (20)");
    assert_eq!(s.data, obj(json!({"b": 3, "c": 3})));
    assert_eq!(s.version, 3, "version is the seq of the delete, even superseded");
    let conf = conflicts[2].clone().unwrap();
    assert_eq!(conf.reason, ConflictReason::Superseded);
    assert_eq!(sorted(&conf.fields), names(&["b", "c"]), "a delete names the fields that survive");
    let Meta::Fields { t, u, .. } = &s.meta else { panic!("fields meta") };
    assert_eq!(t.as_ref(), Some(&hlc(20, "dev")));
    assert_eq!(u.as_ref(), Some(&hlc(30, "dev")));
    assert!(!field_hlcs(&s).contains_key("a"));
}

#[test]
fn fields_delete_older_than_every_field_keeps_all_of_them() {
    let (s, conflicts) = run(Policy::Fields, &[up("c1", 10, json!({"a": 1})), del("c2", 5)]);
    assert_eq!(s.data, obj(json!({"a": 1})));
    assert!(!s.deleted);
    let conf = conflicts[1].clone().unwrap();
    assert_eq!((conf.reason, conf.fields), (ConflictReason::Superseded, names(&["a"])));
}

#[test]
fn fields_upsert_losing_to_a_tombstone_is_deleted_naming_every_field() {
    let (s, conflicts) = run(
        Policy::Fields,
        &[up("c1", 10, json!({"a": 1})), del("c2", 50), up("c3", 30, json!({"a": 2, "z": 0, "m": null}))],
    );
    assert!(s.deleted);
    assert_eq!(s.data, Map::new());
    assert_eq!(s.version, 3, "version is the seq of the losing upsert");
    let conf = conflicts[2].clone().unwrap();
    assert_eq!(conf.reason, ConflictReason::Deleted);
    assert_eq!(sorted(&conf.fields), names(&["a", "m", "z"]), "every field of the upsert");
    assert_eq!(conf.current.unwrap()["deleted"], json!(true));
    let Meta::Fields { t, u, .. } = &s.meta else { panic!("fields meta") };
    assert_eq!(t.as_ref(), Some(&hlc(50, "dev")));
    assert_eq!(u.as_ref(), Some(&hlc(30, "dev")), "u is the greatest upsert HLC, losing ones included");
}

#[test]
fn fields_upsert_of_a_never_seen_entity_older_than_its_tombstone_is_deleted() {
    let (s, conflicts) = run(Policy::Fields, &[del("c1", 50), up("c2", 30, json!({"a": 1}))]);
    assert!(s.deleted);
    assert_eq!(s.data, Map::new());
    assert_eq!(conflicts[0], None, "deleting a never-seen entity is no conflict");
    let conf = conflicts[1].clone().unwrap();
    assert_eq!((conf.reason, conf.fields), (ConflictReason::Deleted, names(&["a"])));
}

#[test]
fn fields_upsert_newer_than_the_tombstone_revives_with_only_newer_fields() {
    let (s, conflicts) =
        run(Policy::Fields, &[up("c1", 10, json!({"a": 1, "b": 1})), del("c2", 20), up("c3", 30, json!({"c": 3}))]);
    assert!(!s.deleted);
    assert_eq!(s.data, obj(json!({"c": 3})));
    assert_eq!(conflicts[2], None);
    // A later-arriving field older than the tombstone stays hidden.
    let (s2, conf) = apply(Policy::Fields, Some(&s), &up("c4", 15, json!({"a": 9, "d": 9})), 4);
    assert_eq!(s2.data, obj(json!({"c": 3})));
    let conf = conf.unwrap();
    assert_eq!((conf.reason, sorted(&conf.fields)), (ConflictReason::Deleted, names(&["a", "d"])));
}

#[test]
fn fields_empty_upsert_newer_than_the_tombstone_revives_an_empty_entity() {
    let (s, conflicts) = run(Policy::Fields, &[up("c1", 10, json!({"a": 1})), del("c2", 20), up("c3", 30, json!({}))]);
    assert!(!s.deleted, "alive iff u > t");
    assert_eq!(s.data, Map::new());
    assert_eq!(conflicts[2], None);
}

#[test]
fn fields_a_greater_tombstone_wins_over_a_lesser_one() {
    let (s, conflicts) = run(
        Policy::Fields,
        &[up("c1", 10, json!({"a": 1})), del("c2", 40), del("c3", 20), up("c4", 30, json!({"b": 1}))],
    );
    assert_eq!(conflicts[2], None, "an older delete of a deleted entity is no conflict");
    assert!(s.deleted, "t stays 40 > u 30");
    assert_eq!(conflicts[3].clone().unwrap().reason, ConflictReason::Deleted);
}

#[test]
fn fields_equal_hlcs_the_later_arrival_loses() {
    // Two different changes with the same HLC (a broken client).
    let (s, conflicts) = run(Policy::Fields, &[up("c1", 10, json!({"a": 1, "b": 1})), up("c2", 10, json!({"a": 2}))]);
    assert_eq!(s.data, obj(json!({"a": 1, "b": 1})));
    let conf = conflicts[1].clone().unwrap();
    assert_eq!((conf.reason, conf.fields), (ConflictReason::Superseded, names(&["a"])));

    // An upsert with the tombstone's HLC, arriving after it, loses.
    let (s, conflicts) =
        run(Policy::Fields, &[up("c1", 5, json!({"a": 1})), del("c2", 10), up("c3", 10, json!({"b": 2}))]);
    assert!(s.deleted);
    assert_eq!(conflicts[2].clone().unwrap().reason, ConflictReason::Deleted);
}

/// Spec §4: "A delete raises `t` and hides every field whose HLC is *below*
/// it", and "Equal HLCs from different changes resolve as 'not greater': the
/// later arrival loses". A delete arriving after an upsert with the same HLC
/// therefore does not hide that upsert's field: once a newer upsert revives the
/// entity, the field is visible again. (Whether the entity is alive right
/// after the tied delete is fixed by "alive iff u > t": it is not.)
#[test]
fn fields_tombstone_hides_fields_at_its_own_hlc() {
    // Documented choice (docs/protocol.md, "Ties at the tombstone"): a field is
    // visible only if its HLC is greater than the tombstone, the same test an
    // upsert must pass to write it. A field stamped exactly at the tombstone
    // cannot be kept anyway: the entity is then deleted (u is not > t) and a
    // deleted entity holds data {}. This keeps the rule order-independent.
    let (s, _) = run(Policy::Fields, &[up("c1", 10, json!({"a": 1})), del("c2", 10)]);
    assert!(s.deleted, "u (10) is not greater than t (10)");
    let (s, _) = apply(Policy::Fields, Some(&s), &up("c3", 20, json!({"b": 2})), 3);
    assert!(!s.deleted);
    assert_eq!(s.data, obj(json!({"b": 2})), "field `a` (HLC 10) is hidden by the tombstone at HLC 10");
    let (r, _) = run(Policy::Fields, &[del("c2", 10), up("c1", 10, json!({"a": 1})), up("c3", 20, json!({"b": 2}))]);
    assert_eq!(r.data, s.data, "either arrival order gives the same state");
}

#[test]
fn fields_conflict_current_and_state_json_shape() {
    let (s, conflicts) = run(Policy::Fields, &[up("c1", 10, json!({"a": 1})), up("c2", 5, json!({"a": 2}))]);
    let current = conflicts[1].clone().unwrap().current.unwrap();
    assert_eq!(current, s.to_value());
    assert_eq!(
        current,
        json!({
            "collection": "tasks", "entity_id": "e1", "data": {"a": 1}, "version": 2, "deleted": false,
            "meta": {"fields": {"a": hlc(10, "dev").as_str()}, "t": null, "u": hlc(10, "dev").as_str()}
        })
    );
}

// ---------------------------------------------------------------- entity

#[test]
fn entity_newer_upsert_patches_older_loses_whole() {
    let (s, conflicts) = run(
        Policy::Entity,
        &[up("c1", 10, json!({"a": 1, "b": 1})), up("c2", 30, json!({"a": 2})), up("c3", 20, json!({"b": 3, "c": 3}))],
    );
    assert_eq!(s.data, obj(json!({"a": 2, "b": 1})), "c3 loses entirely, even its untouched fields");
    assert_eq!(s.version, 3);
    assert_eq!(s.meta, Meta::Last { hlc: hlc(30, "dev") }, "the HLC of the last change applied");
    assert_eq!(conflicts[1], None);
    let conf = conflicts[2].clone().unwrap();
    assert_eq!((conf.reason, sorted(&conf.fields)), (ConflictReason::Superseded, names(&["b", "c"])));
}

#[test]
fn entity_delete_and_revival_keeps_only_the_reviving_fields() {
    let (s, conflicts) =
        run(Policy::Entity, &[up("c1", 10, json!({"a": 1, "b": 1})), del("c2", 20), up("c3", 30, json!({"c": 3}))]);
    assert_eq!(conflicts, vec![None, None, None]);
    assert!(!s.deleted);
    assert_eq!(s.data, obj(json!({"c": 3})));
    assert_eq!(s.version, 3);
}

#[test]
fn entity_delete_applied_clears_data() {
    let (s, conflicts) = run(Policy::Entity, &[up("c1", 10, json!({"a": 1})), del("c2", 20)]);
    assert!(s.deleted);
    assert_eq!(s.data, Map::new());
    assert_eq!(conflicts[1], None);
    assert_eq!(s.meta, Meta::Last { hlc: hlc(20, "dev") });
}

#[test]
fn entity_upsert_older_than_an_applied_delete_is_deleted_naming_every_field() {
    let (s, conflicts) =
        run(Policy::Entity, &[up("c1", 10, json!({"a": 1})), del("c2", 40), up("c3", 30, json!({"x": 1, "a": 2}))]);
    assert!(s.deleted);
    assert_eq!(s.data, Map::new());
    assert_eq!(s.version, 3);
    assert_eq!(s.meta, Meta::Last { hlc: hlc(40, "dev") });
    let conf = conflicts[2].clone().unwrap();
    assert_eq!((conf.reason, sorted(&conf.fields)), (ConflictReason::Deleted, names(&["a", "x"])));
}

#[test]
fn entity_delete_older_than_the_last_change_is_superseded_naming_surviving_fields() {
    let (s, conflicts) = run(Policy::Entity, &[up("c1", 10, json!({"a": 1, "b": 2})), del("c2", 5)]);
    assert!(!s.deleted);
    assert_eq!(s.data, obj(json!({"a": 1, "b": 2})));
    assert_eq!(s.version, 2, "version is the seq of the superseded delete");
    let conf = conflicts[1].clone().unwrap();
    assert_eq!((conf.reason, sorted(&conf.fields)), (ConflictReason::Superseded, names(&["a", "b"])));
}

#[test]
fn entity_older_delete_of_a_deleted_entity_is_no_conflict() {
    let (s, conflicts) = run(Policy::Entity, &[del("c1", 20), del("c2", 10)]);
    assert!(s.deleted);
    assert_eq!(conflicts, vec![None, None]);
    assert_eq!(s.version, 2);
    assert_eq!(s.meta, Meta::Last { hlc: hlc(20, "dev") });
}

#[test]
fn entity_equal_hlcs_the_later_arrival_loses() {
    let (s, conflicts) = run(Policy::Entity, &[up("c1", 10, json!({"a": 1})), up("c2", 10, json!({"a": 2}))]);
    assert_eq!(s.data, obj(json!({"a": 1})));
    assert_eq!(conflicts[1].clone().unwrap().reason, ConflictReason::Superseded);

    let (s, conflicts) = run(Policy::Entity, &[up("c1", 10, json!({"a": 1})), del("c2", 10)]);
    assert!(!s.deleted, "a tied delete arriving later loses");
    assert_eq!(conflicts[1].clone().unwrap().fields, names(&["a"]));

    let (s, conflicts) = run(Policy::Entity, &[del("c1", 10), up("c2", 10, json!({"a": 1}))]);
    assert!(s.deleted, "a tied upsert arriving later loses");
    assert_eq!(conflicts[1].clone().unwrap().reason, ConflictReason::Deleted);
}

// ---------------------------------------------------------------- server

#[test]
fn server_arrival_order_wins_and_never_conflicts() {
    let changes = [
        up("c1", 50, json!({"a": 1, "b": 1})),
        up("c2", 10, json!({"a": 2})),
        del("c3", 5),
        up("c4", 1, json!({"c": 3})),
    ];
    let (s, conflicts) = run(Policy::Server, &changes);
    assert_eq!(conflicts, vec![None; 4]);
    assert!(!s.deleted);
    assert_eq!(s.data, obj(json!({"c": 3})), "revival keeps only the reviving fields");
    assert_eq!(s.version, 4);
    assert_eq!(s.meta, Meta::Last { hlc: hlc(1, "dev") }, "the HLC of the last change applied");

    let (s, _) = run(Policy::Server, &changes[..2]);
    assert_eq!(s.data, obj(json!({"a": 2, "b": 1})), "an older HLC still patches");
    let (s, _) = run(Policy::Server, &changes[..3]);
    assert!(s.deleted);
    assert_eq!(s.data, Map::new());
    assert_eq!(s.version, 3);
}

// ---------------------------------------------------------------- reject

fn rejected(policy: Policy, cur: Option<&EntityState>, c: &Change) -> Conflict {
    match merge(policy, cur, c, 99) {
        Merge::Rejected(conf) => conf,
        other => panic!("expected Rejected, got {other:?}"),
    }
}

#[test]
fn reject_refuses_a_missing_base_version() {
    let conf = rejected(Policy::Reject, None, &up("c1", 10, json!({"a": 1})));
    assert_eq!(conf.reason, ConflictReason::VersionMismatch);
    assert_eq!(conf.fields, None, "a version_mismatch has no fields");
    assert_eq!(conf.current, Some(Value::Null), "null when the entity never existed");

    let (s, _) = apply(Policy::Reject, None, &with_base(up("c1", 10, json!({"a": 1})), Some(0)), 1);
    let conf = rejected(Policy::Reject, Some(&s), &up("c2", 20, json!({"a": 2})));
    assert_eq!(conf.reason, ConflictReason::VersionMismatch);
    assert_eq!(conf.current, Some(s.to_value()));
}

#[test]
fn reject_refuses_a_mismatched_base_version_with_the_unchanged_entity() {
    let conf = rejected(Policy::Reject, None, &with_base(up("c1", 10, json!({"a": 1})), Some(3)));
    assert_eq!(conf.current, Some(Value::Null));

    let (s1, _) = apply(Policy::Reject, None, &with_base(up("c1", 10, json!({"a": 1})), Some(0)), 1);
    let (s2, conf) = apply(Policy::Reject, Some(&s1), &with_base(up("c2", 20, json!({"b": 2})), Some(1)), 2);
    assert_eq!(conf, None);
    assert_eq!(s2.data, obj(json!({"a": 1, "b": 2})));
    assert_eq!(s2.version, 2);
    for stale in [Some(0), Some(1), Some(3)] {
        let conf = rejected(Policy::Reject, Some(&s2), &with_base(up("c3", 30, json!({"a": 3})), stale));
        assert_eq!(conf.reason, ConflictReason::VersionMismatch);
        assert_eq!(conf.fields, None);
        assert_eq!(conf.current, Some(s2.to_value()), "the unchanged entity");
    }
    // A delete is refused the same way.
    let conf = rejected(Policy::Reject, Some(&s2), &with_base(del("c4", 40), Some(1)));
    assert_eq!(conf.reason, ConflictReason::VersionMismatch);
}

#[test]
fn reject_applies_a_matching_change_whatever_its_hlc() {
    let (s1, _) = apply(Policy::Reject, None, &with_base(up("c1", 50, json!({"a": 1})), Some(0)), 1);
    let (s2, conf) = apply(Policy::Reject, Some(&s1), &with_base(up("c2", 10, json!({"a": 2})), Some(1)), 2);
    assert_eq!(conf, None);
    assert_eq!(s2.data, obj(json!({"a": 2})));
    assert_eq!(s2.meta, Meta::Last { hlc: hlc(10, "dev") });
}

#[test]
fn reject_deleted_entity_keeps_the_version_of_its_delete_and_revives_with_only_new_fields() {
    let (s1, _) = apply(Policy::Reject, None, &with_base(up("c1", 10, json!({"a": 1, "b": 1})), Some(0)), 1);
    let (s2, conf) = apply(Policy::Reject, Some(&s1), &with_base(del("c2", 20), Some(1)), 2);
    assert_eq!(conf, None);
    assert!(s2.deleted);
    assert_eq!(s2.data, Map::new());
    assert_eq!(s2.version, 2);
    let conf = rejected(Policy::Reject, Some(&s2), &with_base(up("c3", 30, json!({"c": 1})), Some(0)));
    assert_eq!(conf.current, Some(s2.to_value()), "a deleted entity is not `null`");
    assert_eq!(conf.current.unwrap()["deleted"], json!(true));
    let (s3, conf) = apply(Policy::Reject, Some(&s2), &with_base(up("c3", 30, json!({"c": 1})), Some(2)), 3);
    assert_eq!(conf, None);
    assert!(!s3.deleted);
    assert_eq!(s3.data, obj(json!({"c": 1})));
    assert_eq!(s3.version, 3);
}

#[test]
fn reject_delete_of_a_never_seen_entity_with_base_zero_is_a_tombstone() {
    let (s, conf) = apply(Policy::Reject, None, &with_base(del("c1", 10), Some(0)), 1);
    assert_eq!(conf, None);
    assert!(s.deleted);
    assert_eq!(s.version, 1);
}

// ---------------------------------------------------------------- append

#[test]
fn append_is_logged_under_every_policy_and_never_refused() {
    let (s, _) = run(Policy::Fields, &[up("c1", 10, json!({"a": 1}))]);
    for policy in [Policy::Fields, Policy::Entity, Policy::Server, Policy::Reject] {
        for base in [None, Some(0), Some(7)] {
            let a = change("c9", "e1", Op::Append, Some(json!([1, {"x": "y"}])), hlc(1, "dev"), base);
            assert_eq!(merge(policy, None, &a, 5), Merge::Logged, "{policy} {base:?}");
            assert_eq!(merge(policy, Some(&s), &a, 5), Merge::Logged, "{policy} {base:?}");
        }
    }
}

#[test]
fn policy_names_round_trip() {
    for policy in [Policy::Fields, Policy::Entity, Policy::Server, Policy::Reject] {
        assert_eq!(policy.as_str().parse::<Policy>(), Ok(policy));
        assert_eq!(serde_json::to_value(policy).unwrap(), json!(policy.as_str()));
    }
    assert!("lww".parse::<Policy>().is_err());
    assert_eq!(Policy::default(), Policy::Fields);
}

// ---------------------------------------------------------------- properties

const ENTITIES: [&str; 3] = ["e1", "e2", "e 3"];
const FIELDS: [&str; 4] = ["a", "b", "c", "d"];

fn small_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-3i64..4).prop_map(|n| json!(n)),
        "[a-zé]{0,3}".prop_map(Value::String),
        (0i64..3).prop_map(|n| json!([n, {"k": n}])),
    ]
}

fn small_data() -> impl Strategy<Value = Value> {
    proptest::collection::btree_map(proptest::sample::select(FIELDS.to_vec()), small_value(), 0..4)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

/// One generated operation: entity index, upsert data (None: a delete), HLC parts.
#[derive(Debug, Clone)]
struct GenOp {
    entity: usize,
    data: Option<Value>,
    ms: u64,
    device: &'static str,
    /// For `reject`: 0 no base_version, 1 the current version, 2 `stale`.
    base: u8,
    stale: u64,
}

fn gen_op(max_ms: u64) -> impl Strategy<Value = GenOp> {
    (
        0..ENTITIES.len(),
        prop_oneof![3 => small_data().prop_map(Some), 1 => Just(None)],
        0..max_ms,
        proptest::sample::select(vec!["a", "b", "c"]),
        prop_oneof![1 => Just(0u8), 3 => Just(1u8), 1 => Just(2u8)],
        0u64..4,
    )
        .prop_map(|(entity, data, ms, device, base, stale)| GenOp { entity, data, ms, device, base, stale })
}

/// The change for op number `i`; `counter` makes HLCs distinct when asked to.
fn to_change(i: usize, op: &GenOp, counter: u32) -> Change {
    let h = Hlc::parse(format!("{:013}-{:05}-{}", T0 + op.ms, counter, op.device)).unwrap();
    let (o, data) = match &op.data {
        Some(d) => (Op::Upsert, Some(d.clone())),
        None => (Op::Delete, None),
    };
    change(&format!("c{i}"), ENTITIES[op.entity], o, data, h, None)
}

type Key = (String, String);
type States = BTreeMap<Key, EntityState>;

fn key(c: &Change) -> Key {
    (c.collection.as_str().to_owned(), c.entity_id.as_str().to_owned())
}

/// Merges `c` at `seq` into `states`; returns the merge outcome.
fn step(policy: Policy, states: &mut States, c: &Change, seq: u64) -> Merge {
    let k = key(c);
    let out = merge(policy, states.get(&k), c, seq);
    if let Merge::Applied { state, .. } = &out {
        states.insert(k, state.clone());
    }
    out
}

/// A spec-derived model of the `fields` policy's visible outcome, independent of arrival order.
fn fields_model(changes: &[Change]) -> BTreeMap<Key, (bool, Map<String, Value>)> {
    let mut by_entity: BTreeMap<Key, Vec<&Change>> = BTreeMap::new();
    for c in changes {
        by_entity.entry(key(c)).or_default().push(c);
    }
    by_entity
        .into_iter()
        .map(|(k, cs)| {
            let t = cs.iter().filter(|c| c.op == Op::Delete).map(|c| &c.hlc).max();
            let u = cs.iter().filter(|c| c.op == Op::Upsert).map(|c| &c.hlc).max();
            let alive = t.is_none() || u.is_some_and(|u| Some(u) > t);
            let mut latest: BTreeMap<&String, (&Hlc, &Value)> = BTreeMap::new();
            for c in cs.iter().filter(|c| c.op == Op::Upsert) {
                for (name, v) in c.fields().unwrap() {
                    if latest.get(name).is_none_or(|(h, _)| c.hlc > **h) {
                        latest.insert(name, (&c.hlc, v));
                    }
                }
            }
            let data = if alive {
                latest
                    .into_iter()
                    .filter(|(_, (h, _))| t.is_none_or(|t| *h > t))
                    .map(|(n, (_, v))| (n.clone(), v.clone()))
                    .collect()
            } else {
                Map::new()
            };
            (k, (!alive, data))
        })
        .collect()
}

/// A `fields` log with distinct HLCs, and a permutation of it with duplicates mixed in.
fn fields_log_and_shuffle() -> impl Strategy<Value = (Vec<Change>, Vec<Change>)> {
    proptest::collection::vec(gen_op(12), 1..16).prop_flat_map(|ops| {
        let n = ops.len();
        let changes: Vec<Change> = ops.iter().enumerate().map(|(i, op)| to_change(i, op, i as u32)).collect();
        let dups = proptest::collection::vec(0..n, 0..6);
        (Just(changes), dups).prop_flat_map(|(changes, dups)| {
            let mut order: Vec<usize> = (0..changes.len()).collect();
            order.extend(dups);
            let reordered = Just(order).prop_shuffle().prop_map({
                let changes = changes.clone();
                move |order| order.into_iter().map(|i| changes[i].clone()).collect::<Vec<_>>()
            });
            (Just(changes), reordered)
        })
    })
}

/// `data`, `deleted` and `meta` of every entity (not `version`, which follows seqs).
fn content(states: &States) -> BTreeMap<Key, (Map<String, Value>, bool, Meta)> {
    states.iter().map(|(k, s)| (k.clone(), (s.data.clone(), s.deleted, s.meta.clone()))).collect()
}

fn fold(policy: Policy, changes: &[Change]) -> States {
    let mut states = States::new();
    for (i, c) in changes.iter().enumerate() {
        step(policy, &mut states, c, i as u64 + 1);
    }
    states
}

/// Resolves the generated `base` choices against the state as it is when each change arrives,
/// and returns the log of logged changes (with seqs) plus what each arrival did.
#[allow(clippy::type_complexity)]
fn incremental(policy: Policy, ops: &[GenOp]) -> (Vec<(u64, Change)>, Vec<States>, Vec<Merge>, StateDigest) {
    let mut states = States::new();
    let mut log = Vec::new();
    let mut snapshots = vec![States::new()];
    let mut outcomes = Vec::new();
    let mut digest = StateDigest::ZERO;
    for (i, op) in ops.iter().enumerate() {
        let mut c = to_change(i, op, 0);
        if i % 7 == 3 {
            c.op = Op::Append;
            c.data = Some(json!({"i": i}));
        }
        let current_version = states.get(&key(&c)).map_or(0, |s| s.version);
        c.base_version = match op.base {
            0 => None,
            1 => Some(current_version),
            _ => Some(op.stale),
        };
        let seq = log.len() as u64 + 1;
        let old_hash = states.get(&key(&c)).and_then(EntityState::entity_hash);
        let out = step(policy, &mut states, &c, seq);
        match &out {
            Merge::Applied { state, .. } => {
                digest.replace(old_hash.as_ref(), state.entity_hash().as_ref());
                log.push((seq, c));
                snapshots.push(states.clone());
            }
            Merge::Logged => {
                log.push((seq, c));
                snapshots.push(states.clone());
            }
            Merge::Rejected(conf) => {
                assert_eq!(policy, Policy::Reject, "only `reject` refuses");
                assert_eq!(conf.reason, ConflictReason::VersionMismatch);
            }
        }
        outcomes.push(out);
    }
    (log, snapshots, outcomes, digest)
}

fn replay(policy: Policy, start: States, log: &[(u64, Change)]) -> (States, Vec<Merge>) {
    let mut states = start;
    let outcomes = log.iter().map(|(seq, c)| step(policy, &mut states, c, *seq)).collect();
    (states, outcomes)
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    proptest::sample::select(vec![Policy::Fields, Policy::Entity, Policy::Server, Policy::Reject])
}

proptest! {
    /// §4: under `fields`, any order and any duplication of the same changes gives the same state.
    #[test]
    fn fields_merge_is_commutative_and_idempotent((changes, reordered) in fields_log_and_shuffle()) {
        let a = fold(Policy::Fields, &changes);
        let b = fold(Policy::Fields, &reordered);
        prop_assert_eq!(content(&a), content(&b));
        let model = fields_model(&changes);
        let got: BTreeMap<Key, (bool, Map<String, Value>)> =
            a.iter().map(|(k, s)| (k.clone(), (s.deleted, s.data.clone()))).collect();
        prop_assert_eq!(got, model);
        for s in a.values() {
            if let Meta::Fields { fields, .. } = &s.meta {
                prop_assert!(fields.keys().eq(s.data.keys()), "meta.fields names exactly the visible fields");
            }
        }
    }

    /// Every policy is deterministic: replaying the log in seq order from scratch, or from any
    /// snapshot (also one that went through JSON, as a bootstrap does), gives the recorded states,
    /// the same outcomes and the same digest as the incremental run.
    #[test]
    fn replay_reproduces_the_incremental_state(
        policy in policy_strategy(),
        ops in proptest::collection::vec(gen_op(6), 1..20),
    ) {
        let (log, snapshots, outcomes, digest) = incremental(policy, &ops);
        prop_assert_eq!(snapshots.len(), log.len() + 1);
        let logged: Vec<&Merge> = outcomes.iter().filter(|o| !matches!(o, Merge::Rejected(_))).collect();
        for (i, (seq, _)) in log.iter().enumerate() {
            prop_assert_eq!(*seq, i as u64 + 1, "seqs are 1..head with no gaps");
        }

        let (fresh, replayed) = replay(policy, States::new(), &log);
        prop_assert_eq!(&fresh, snapshots.last().unwrap());
        prop_assert_eq!(replayed.iter().collect::<Vec<_>>(), logged, "same outcomes, nothing refused on replay");

        let mut sum = StateDigest::ZERO;
        for s in fresh.values() {
            if let Some(h) = s.entity_hash() {
                sum.add(&h);
            }
        }
        prop_assert_eq!(sum, digest, "incremental digest equals the digest of the final state");

        for k in 0..=log.len() {
            let (prefix, _) = replay(policy, States::new(), &log[..k]);
            prop_assert_eq!(&prefix, &snapshots[k]);
            // Re-merge the rest into the snapshot, as restored from a bootstrap.
            let restored: States = snapshots[k]
                .iter()
                .map(|(key, s)| {
                    let text = serde_json::to_string(s).unwrap();
                    (key.clone(), serde_json::from_str::<EntityState>(&text).unwrap())
                })
                .collect();
            prop_assert_eq!(&restored, &snapshots[k]);
            let (rest, _) = replay(policy, restored, &log[k..]);
            prop_assert_eq!(&rest, &fresh);
        }
    }
}

#[test]
fn meta_reads_back_as_written_and_names_what_it_lacks() {
    let fields = Meta::Fields {
        fields: BTreeMap::from([("title".to_owned(), hlc(1, "a")), ("done".to_owned(), hlc(2, "b"))]),
        t: None,
        u: Some(hlc(2, "b")),
    };
    let deleted = Meta::Fields { fields: BTreeMap::new(), t: Some(hlc(3, "a")), u: None };
    let last = Meta::Last { hlc: hlc(4, "c") };
    for meta in [fields, deleted, last] {
        let text = serde_json::to_string(&meta).unwrap();
        assert_eq!(serde_json::from_str::<Meta>(&text).unwrap(), meta, "{text}");
    }
    // `t` and `u` may be left out; a `fields` object decides the variant.
    let short: Meta = serde_json::from_value(json!({"fields": {}})).unwrap();
    assert_eq!(short, Meta::Fields { fields: BTreeMap::new(), t: None, u: None });
    let err = serde_json::from_value::<Meta>(json!({"version": 3})).unwrap_err();
    assert!(err.to_string().contains("neither `fields` nor `hlc`"), "{err}");
    assert!(serde_json::from_value::<Meta>(json!({"hlc": "not an hlc"})).is_err());
}
