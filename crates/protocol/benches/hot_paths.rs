//! Criterion benchmarks for the protocol's per-change hot paths.
//!
//! Every accepted change costs the server (and every client replaying the
//! log) one merge, one step of the hash chain and one digest update. These
//! benchmarks time each of those on a realistic entity: a task with five
//! fields (`title`, `done`, `priority`, `tags`, `estimate`), about 150 bytes in
//! canonical form.
//!
//! Groups, each reporting elements (calls) per second:
//!
//! - `merge`: [`merge`] of a one-field upsert onto the entity under the
//!   `fields` and `entity` policies, and a first insert (no current state).
//! - `chain`: [`StateHash::fold`] (JCS of the stored change plus two SHA-256s),
//!   and its parts: [`change_hash_input`], [`change_hash`] and [`json::to_jcs`]
//!   of the data alone.
//! - `digest`: [`digest::entity_hash`] and [`StateDigest::replace`].
//!
//! Run with:
//!
//! ```text
//! cargo bench -p deltasync-protocol --bench hot_paths -- --warm-up-time 1 --measurement-time 3
//! ```

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_main};
use deltasync_protocol::chain::change_hash_input;
use deltasync_protocol::{
    Change, ChangeId, Collection, DeviceId, EntityId, EntityState, Hlc, Merge, Op, Policy, StateDigest, StateHash,
    StoredChange, change_hash, digest, json, merge,
};
use serde_json::{Map, Value};

/// The entity's full data: five fields, about 150 bytes in canonical form.
const TASK: &str = r#"{
    "title": "Buy milk, eggs and bread at the corner shop on the way home",
    "done": false,
    "priority": 3,
    "tags": ["home", "errands", "weekly"],
    "estimate": 0.75
}"#;

/// A one-field delta onto [`TASK`].
const DELTA: &str = r#"{"done": true}"#;

/// Parses JSON text the way the server receives it (numbers stay literal under `arbitrary_precision`).
fn value(text: &str) -> Value {
    serde_json::from_str(text).expect("valid JSON")
}

/// An upsert of `data` to `tasks/t-0001`, stamped `physical_ms` by device `phone-7f3a`.
fn upsert(change_id: &str, data: Value, physical_ms: u64) -> Change {
    let device = DeviceId::parse("phone-7f3a").expect("device id");
    Change {
        change_id: ChangeId::parse(change_id).expect("change id"),
        collection: Collection::parse("tasks").expect("collection"),
        entity_id: EntityId::parse("t-0001").expect("entity id"),
        op: Op::Upsert,
        data: Some(data),
        hlc: Hlc::new(physical_ms, 0, &device),
        base_version: None,
    }
}

/// The entity after its first insert at seq 1 under `policy`.
fn inserted(policy: Policy, insert: &Change) -> EntityState {
    match merge(policy, None, insert, 1) {
        Merge::Applied { state, conflict: None } => state,
        other => panic!("first insert did not apply cleanly: {other:?}"),
    }
}

fn bench_merge(c: &mut Criterion) {
    let insert = upsert("0196a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", value(TASK), 1_763_800_000_000);
    let update = upsert("0196a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c", value(DELTA), 1_763_800_001_000);
    let fields_state = inserted(Policy::Fields, &insert);
    let entity_state = inserted(Policy::Entity, &insert);
    for (policy, state) in [(Policy::Fields, &fields_state), (Policy::Entity, &entity_state)] {
        match merge(policy, Some(state), &update, 2) {
            Merge::Applied { state, conflict: None } => assert_eq!(state.data.len(), 5),
            other => panic!("{policy} update did not apply cleanly: {other:?}"),
        }
    }

    let mut group = c.benchmark_group("merge");
    group.throughput(Throughput::Elements(1));
    group.bench_function("fields_upsert_1_field", |b| {
        b.iter(|| merge(black_box(Policy::Fields), black_box(Some(&fields_state)), black_box(&update), black_box(2)))
    });
    group.bench_function("entity_upsert_1_field", |b| {
        b.iter(|| merge(black_box(Policy::Entity), black_box(Some(&entity_state)), black_box(&update), black_box(2)))
    });
    group.bench_function("fields_first_insert", |b| {
        b.iter(|| merge(black_box(Policy::Fields), black_box(None), black_box(&insert), black_box(1)))
    });
    group.finish();
}

fn bench_chain(c: &mut Criterion) {
    let data = value(TASK);
    let stored = StoredChange {
        seq: 1_234_567,
        device_id: DeviceId::parse("phone-7f3a").expect("device id"),
        server_time: 1_763_800_000_123,
        change: upsert("0196a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", data.clone(), 1_763_800_000_000),
    };
    let head = StateHash([0x5a; 32]);
    let jcs_len = json::to_jcs(&data).len();
    assert!((140..=160).contains(&jcs_len), "data is {jcs_len} bytes in canonical form");

    let mut group = c.benchmark_group("chain");
    group.throughput(Throughput::Elements(1));
    group.bench_function("fold", |b| b.iter(|| black_box(&head).fold(black_box(&stored))));
    group.bench_function("change_hash", |b| b.iter(|| change_hash(black_box(&stored))));
    group.bench_function("change_jcs", |b| b.iter(|| change_hash_input(black_box(&stored))));
    group.bench_function("data_to_jcs", |b| b.iter(|| json::to_jcs(black_box(&data))));
    group.finish();
}

fn bench_digest(c: &mut Criterion) {
    let old_data: Map<String, Value> = serde_json::from_str(TASK).expect("object");
    let mut new_data = old_data.clone();
    new_data.insert("done".to_owned(), Value::Bool(true));
    let old = digest::entity_hash("tasks", "t-0001", &old_data);
    let new = digest::entity_hash("tasks", "t-0001", &new_data);
    let mut state = StateDigest([0xa5; 32]);

    let mut group = c.benchmark_group("digest");
    group.throughput(Throughput::Elements(1));
    group.bench_function("entity_hash", |b| {
        b.iter(|| digest::entity_hash(black_box("tasks"), black_box("t-0001"), black_box(&new_data)))
    });
    group.bench_function("replace", |b| {
        b.iter(|| black_box(&mut state).replace(black_box(Some(&old)), black_box(Some(&new))))
    });
    group.finish();
}

/// What `criterion_group!(benches, ...)` expands to, spelled out because the
/// macro's function is `pub` without a doc comment, which trips the workspace's `missing_docs` lint.
fn benches() {
    let mut c = Criterion::default().configure_from_args();
    bench_merge(&mut c);
    bench_chain(&mut c);
    bench_digest(&mut c);
}

criterion_main!(benches);
