//! Convergence: random interleavings of offline writes on three devices and
//! syncs always end in the same state on every device and on the server, and
//! that state is what an independent model of the merge policies computes
//! from the server's log. Plus a hand-computed scenario with a fake clock.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Devices, FakeClock, TestServer, config, listing, obj, server_listing};
use deltasync_client::{Client, ClientOptions, SyncReport};
use deltasync_protocol::wire::Policies;
use deltasync_protocol::{ConflictReason, Policy};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};

const COLLECTIONS: [&str; 2] = ["tasks", "notes"];
const IDS: [&str; 3] = ["a", "b", "c"];
const FIELDS: [&str; 3] = ["x", "y", "z"];

#[derive(Debug, Clone)]
enum Step {
    Put {
        dev: usize,
        coll: usize,
        id: usize,
        data: [Option<Value>; 3],
    },
    Patch {
        dev: usize,
        coll: usize,
        id: usize,
        data: [Option<Value>; 3],
    },
    Delete {
        dev: usize,
        coll: usize,
        id: usize,
    },
    Append {
        dev: usize,
        coll: usize,
        id: usize,
        data: Value,
    },
    Sync {
        dev: usize,
    },
    /// Closes the device's client and opens it again from its file.
    Reopen {
        dev: usize,
    },
}

#[derive(Debug, Clone)]
struct Scenario {
    /// Each device's wall clock offset from the server's, in ms.
    skews: [i64; 3],
    /// Each device's `(batch_size, page_limit)`: small ones exercise paging.
    paging: [(usize, u64); 3],
    /// Each step with the ms the shared clock advances before it.
    steps: Vec<(u64, Step)>,
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0i64..3).prop_map(Value::from),
        prop::sample::select(vec!["a", "b"]).prop_map(Value::from),
        Just(Value::Null),
    ]
}

fn fields() -> impl Strategy<Value = [Option<Value>; 3]> {
    prop::array::uniform3(prop::option::of(value()))
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..3usize, 0..2usize, 0..3usize, fields()).prop_map(|(dev, coll, id, data)| Step::Put { dev, coll, id, data }),
        4 => (0..3usize, 0..2usize, 0..3usize, fields()).prop_map(|(dev, coll, id, data)| Step::Patch { dev, coll, id, data }),
        1 => (0..3usize, 0..2usize, 0..3usize).prop_map(|(dev, coll, id)| Step::Delete { dev, coll, id }),
        1 => (0..3usize, 0..2usize, 0..3usize, value()).prop_map(|(dev, coll, id, data)| Step::Append { dev, coll, id, data }),
        2 => (0..3usize).prop_map(|dev| Step::Sync { dev }),
        1 => (0..3usize).prop_map(|dev| Step::Reopen { dev }),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let paging = (prop::sample::select(vec![1usize, 2, 500]), prop::sample::select(vec![1u64, 3, 10_000]));
    (
        // Mostly small skews; sometimes a clock 10 minutes ahead (past the
        // server's 5-minute drift: refused, re-stamped) or behind.
        prop::array::uniform3(prop_oneof![6 => -2000i64..2000, 1 => Just(600_000i64), 1 => Just(-600_000i64)]),
        prop::array::uniform3(paging),
        prop::collection::vec((0u64..4, step()), 1..40),
    )
        .prop_map(|(skews, paging, steps)| Scenario { skews, paging, steps })
}

fn to_map(data: &[Option<Value>; 3]) -> Map<String, Value> {
    FIELDS.iter().zip(data).filter_map(|(name, v)| v.clone().map(|v| (name.to_string(), v))).collect()
}

fn fail<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> TestCaseError {
    move |e| TestCaseError::fail(format!("{what}: {e}"))
}

/// Syncs and checks what every sync of these scenarios must report.
async fn checked_sync(client: &Client, name: &str) -> Result<SyncReport, TestCaseError> {
    let report = client.sync().await.map_err(|e| TestCaseError::fail(format!("sync of device {name} failed: {e}")))?;
    prop_assert!(report.verified, "device {name}: sync not verified: {report:?}");
    prop_assert!(!report.healed, "device {name}: sync healed: {report:?}");
    prop_assert_eq!(report.failed, 0, "device {}: a change failed: {:?}", name, report);
    prop_assert!(
        report.lost.iter().all(|l| l.conflict.as_ref().is_none_or(|c| c.reason != ConflictReason::ClockSkew)),
        "{report:?}"
    );
    Ok(report)
}

// ---------------------------------------------------------------------------
// An independent model of the merge policies, computed from the server's log.
// ---------------------------------------------------------------------------

#[derive(Default)]
struct FieldsModel {
    t: Option<String>,
    u: Option<String>,
    fields: BTreeMap<String, (String, Value)>,
}

#[derive(Default)]
struct LastModel {
    hlc: Option<String>,
    deleted: bool,
    data: Map<String, Value>,
}

/// The live entities of `collection` after the log, by the rules of protocol §4,
/// written independently of the library's merge function.
fn model(log: &[Value], policies: &Policies, collection: &str) -> Vec<(String, Map<String, Value>)> {
    let policy = policies.of(collection);
    let mut fields_models: BTreeMap<String, FieldsModel> = BTreeMap::new();
    let mut last_models: BTreeMap<String, LastModel> = BTreeMap::new();
    let mut seqs: Vec<u64> = Vec::new();
    for c in log {
        seqs.push(c["seq"].as_u64().expect("seq"));
        if c["collection"] != collection {
            continue;
        }
        let id = c["entity_id"].as_str().expect("entity_id").to_owned();
        let hlc = c["hlc"].as_str().expect("hlc").to_owned();
        let op = c["op"].as_str().expect("op");
        let data = c["data"].as_object().cloned().unwrap_or_default();
        match (policy, op) {
            (_, "append") => {}
            (Policy::Fields, "upsert") => {
                let m = fields_models.entry(id).or_default();
                if m.u.as_ref().is_none_or(|u| hlc > *u) {
                    m.u = Some(hlc.clone());
                }
                for (name, value) in data {
                    let newer = m.fields.get(&name).is_none_or(|(h, _)| hlc > *h);
                    if newer {
                        m.fields.insert(name, (hlc.clone(), value));
                    }
                }
            }
            (Policy::Fields, "delete") => {
                let m = fields_models.entry(id).or_default();
                if m.t.as_ref().is_none_or(|t| hlc > *t) {
                    m.t = Some(hlc);
                }
            }
            (Policy::Entity | Policy::Server, _) => {
                let m = last_models.entry(id).or_default();
                let applies = policy == Policy::Server || m.hlc.as_ref().is_none_or(|h| hlc > *h);
                if !applies {
                    continue;
                }
                let existed = m.hlc.is_some();
                m.hlc = Some(hlc);
                if op == "upsert" {
                    if m.deleted || !existed {
                        m.data.clear();
                        m.deleted = false;
                    }
                    m.data.extend(data);
                } else {
                    m.data.clear();
                    m.deleted = true;
                }
            }
            (p, op) => panic!("model has no rule for {op} under {p:?}"),
        }
    }
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "the log's seqs are exactly 1..head");
    let mut out = Vec::new();
    for (id, m) in fields_models {
        let alive = match (&m.t, &m.u) {
            (None, _) => true,
            (Some(t), Some(u)) => u > t,
            (Some(_), None) => false,
        };
        if alive {
            let data = m
                .fields
                .into_iter()
                .filter(|(_, (h, _))| m.t.as_ref().is_none_or(|t| h > t))
                .map(|(name, (_, v))| (name, v))
                .collect();
            out.push((id, data));
        }
    }
    for (id, m) in last_models {
        if !m.deleted {
            out.push((id, m.data));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

// ---------------------------------------------------------------------------
// The property.
// ---------------------------------------------------------------------------

async fn run_case(s: &Scenario, toml: &str) -> Result<(), TestCaseError> {
    let clock = FakeClock::at_system_time();
    let cfg = config(toml);
    let policies = cfg.policies.clone();
    let mut server = TestServer::start_with(cfg, Some(clock.server_clock())).await;
    let devices = Devices::new();
    let names = ["A", "B", "C"];
    let open = |i: usize| {
        devices.open_with(
            names[i],
            ClientOptions {
                server: Some(server.url.clone()),
                wall_clock: clock.wall(s.skews[i]),
                batch_size: s.paging[i].0,
                page_limit: s.paging[i].1,
                ..Default::default()
            },
        )
    };
    let mut clients: Vec<Client> = (0..3).map(open).collect();

    for (dt, step) in &s.steps {
        clock.advance(*dt);
        match step {
            Step::Put { dev, coll, id, data } => {
                clients[*dev].put(COLLECTIONS[*coll], IDS[*id], to_map(data)).map_err(fail("put"))?;
            }
            Step::Patch { dev, coll, id, data } => {
                clients[*dev].patch(COLLECTIONS[*coll], IDS[*id], to_map(data)).map_err(fail("patch"))?;
            }
            Step::Delete { dev, coll, id } => {
                clients[*dev].delete(COLLECTIONS[*coll], IDS[*id]).map_err(fail("delete"))?;
            }
            Step::Append { dev, coll, id, data } => {
                clients[*dev].append(COLLECTIONS[*coll], IDS[*id], data.clone()).map_err(fail("append"))?;
            }
            Step::Sync { dev } => {
                checked_sync(&clients[*dev], names[*dev]).await?;
            }
            Step::Reopen { dev } => {
                let before = clients[*dev].outbox().map_err(fail("outbox"))?;
                let id = clients[*dev].device_id().clone();
                clients[*dev] = open(*dev);
                prop_assert_eq!(clients[*dev].device_id(), &id, "the device id is kept");
                prop_assert_eq!(clients[*dev].outbox().map_err(fail("outbox"))?, before, "the outbox is kept");
            }
        }
    }

    // Two full rounds: after them every device holds every change.
    for round in 0..2 {
        for (client, name) in clients.iter().zip(names) {
            clock.advance(1);
            let report = checked_sync(client, name).await?;
            if round == 1 {
                prop_assert_eq!(report.pending, 0, "device {} still has pending changes: {:?}", name, report);
            }
        }
    }

    let status = server.status().await;
    let (header, entities) = server.snapshot().await;
    prop_assert_eq!(header.cursor, status.head);
    prop_assert_eq!(&header.state_digest, &status.state_digest);
    let log = server.log().await;
    prop_assert_eq!(log.len() as u64, status.head);

    for collection in COLLECTIONS {
        let on_server = server_listing(&entities, collection);
        let expected = model(&log, &policies, collection);
        prop_assert_eq!(&on_server, &expected, "server state of {} differs from the model", collection);
        for (client, name) in clients.iter().zip(names) {
            let mine = listing(client, collection);
            prop_assert_eq!(&mine, &on_server, "device {} lists {} differently from the server", name, collection);
        }
    }
    for (client, name) in clients.iter().zip(names) {
        let st = client.stats().map_err(fail("stats"))?;
        prop_assert_eq!(st.cursor, status.head, "device {} cursor", name);
        prop_assert_eq!(&st.state_hash, &status.state_hash, "device {} state_hash", name);
        prop_assert_eq!(&st.state_digest, &status.state_digest, "device {} state_digest", name);
        prop_assert_eq!(st.pending, 0, "device {} pending", name);
        prop_assert_eq!(st.failed, 0, "device {} failed", name);
        let outbox = client.outbox().map_err(fail("outbox"))?;
        prop_assert!(outbox.is_empty(), "device {name} outbox not empty: {outbox:?}");
    }
    server.stop().await;
    Ok(())
}

/// Runs the property over `cases` scenarios (`PROPTEST_CASES` overrides it, for longer soaks).
fn run_property(toml: &'static str, cases: u32) {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(cases);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        max_shrink_iters: 64,
        // Keep the repository clean: no proptest-regressions files.
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let started = std::time::Instant::now();
    let result = runner.run(&scenario(), |s| rt.block_on(run_case(&s, toml)));
    eprintln!("{cases} convergence cases with config {toml:?} took {:?}", started.elapsed());
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn random_interleavings_of_offline_writes_on_3_devices_and_syncs_always_converge() {
    run_property("", 24);
}

#[test]
fn random_interleavings_converge_under_entity_and_server_policies() {
    run_property("[collections.tasks]\npolicy = \"entity\"\n\n[collections.notes]\npolicy = \"server\"\n", 24);
}

// ---------------------------------------------------------------------------
// Hand-computed expectations with a fake clock shared by server and devices.
// ---------------------------------------------------------------------------

fn lost_one(report: &SyncReport) -> &deltasync_client::LostChange {
    assert_eq!(report.lost.len(), 1, "exactly one lost change expected: {report:?}");
    &report.lost[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_computed_states_with_a_fake_clock() {
    let clock = FakeClock::at_system_time();
    let mut server = TestServer::start_with(
        config("[collections.notes]\npolicy = \"entity\"\n\n[collections.logs]\npolicy = \"server\"\n"),
        Some(clock.server_clock()),
    )
    .await;
    let devices = Devices::new();
    let a = devices.open_clocked("A", &server.url, clock.wall(0));
    let b = devices.open_clocked("B", &server.url, clock.wall(0));
    // Both learn the policies first.
    a.sync().await.unwrap();
    b.sync().await.unwrap();

    // 1. fields: field-level LWW by HLC, not by arrival.
    clock.advance(10);
    a.patch("tasks", "t1", obj(json!({"x": 1, "y": 1}))).unwrap();
    clock.advance(10);
    b.patch("tasks", "t1", obj(json!({"x": 2}))).unwrap();
    clock.advance(10);
    a.patch("tasks", "t1", obj(json!({"y": 3}))).unwrap();
    let r = a.sync().await.unwrap();
    assert_eq!((r.pushed, r.conflicts), (2, 0), "{r:?}");
    let r = b.sync().await.unwrap();
    assert_eq!((r.pushed, r.pulled, r.conflicts), (1, 2, 0), "B's newer x wins without conflict: {r:?}");
    a.sync().await.unwrap();
    for c in [&a, &b] {
        assert_eq!(c.get("tasks", "t1").unwrap().unwrap().data, obj(json!({"x": 2, "y": 3})));
    }

    // An older field write arriving later loses that field: superseded, naming it.
    clock.advance(10);
    b.patch("tasks", "t1", obj(json!({"z": "b"}))).unwrap();
    clock.advance(10);
    a.patch("tasks", "t1", obj(json!({"z": "a"}))).unwrap();
    assert_eq!(b.get("tasks", "t1").unwrap().unwrap().data["z"], "b", "optimistic local view");
    a.sync().await.unwrap();
    let r = b.sync().await.unwrap();
    let lost = lost_one(&r);
    assert_eq!(lost.conflict.as_ref().unwrap().reason, ConflictReason::Superseded);
    assert_eq!(lost.conflict.as_ref().unwrap().fields.as_deref(), Some(&["z".to_owned()][..]));
    assert_eq!(lost.conflict.as_ref().unwrap().current.as_ref().unwrap()["data"], json!({"x": 2, "y": 3, "z": "a"}));
    assert_eq!(b.get("tasks", "t1").unwrap().unwrap().data, obj(json!({"x": 2, "y": 3, "z": "a"})));

    // 2. A delete, then an older upsert arriving later: the upsert loses, reason `deleted`.
    clock.advance(10);
    b.patch("tasks", "t2", obj(json!({"title": "old"}))).unwrap();
    clock.advance(10);
    a.delete("tasks", "t2").unwrap();
    a.sync().await.unwrap();
    assert_eq!(b.get("tasks", "t2").unwrap().unwrap().data, obj(json!({"title": "old"})));
    let r = b.sync().await.unwrap();
    let lost = lost_one(&r);
    assert_eq!(lost.entity_id.as_str(), "t2");
    assert_eq!(lost.conflict.as_ref().unwrap().reason, ConflictReason::Deleted);
    assert_eq!(lost.conflict.as_ref().unwrap().fields.as_deref(), Some(&["title".to_owned()][..]));
    assert!(b.get("tasks", "t2").unwrap().is_none(), "the older upsert does not revive the entity");

    // 3. A delete older than an upsert that arrived first: the entity stays alive
    //    with only the fields newer than the tombstone; the delete is superseded.
    clock.advance(10);
    a.patch("tasks", "t3", obj(json!({"a": 1, "b": 1}))).unwrap();
    a.sync().await.unwrap();
    b.sync().await.unwrap();
    clock.advance(10);
    a.delete("tasks", "t3").unwrap();
    clock.advance(10);
    b.patch("tasks", "t3", obj(json!({"a": 5}))).unwrap();
    b.sync().await.unwrap();
    let r = a.sync().await.unwrap();
    let lost = lost_one(&r);
    assert_eq!(lost.conflict.as_ref().unwrap().reason, ConflictReason::Superseded);
    assert_eq!(
        lost.conflict.as_ref().unwrap().fields.as_deref(),
        Some(&["a".to_owned()][..]),
        "the fields that survive"
    );
    assert_eq!(a.get("tasks", "t3").unwrap().unwrap().data, obj(json!({"a": 5})));

    // 4. entity: whole-entity LWW: an older upsert loses entirely.
    clock.advance(10);
    a.patch("notes", "n1", obj(json!({"x": 1, "y": 1}))).unwrap();
    clock.advance(10);
    b.patch("notes", "n1", obj(json!({"x": 2}))).unwrap();
    b.sync().await.unwrap();
    let r = a.sync().await.unwrap();
    let lost = lost_one(&r);
    assert_eq!(lost.conflict.as_ref().unwrap().reason, ConflictReason::Superseded);
    let mut lost_fields = lost.conflict.as_ref().unwrap().fields.clone().unwrap();
    lost_fields.sort();
    assert_eq!(lost_fields, ["x", "y"]);
    assert_eq!(a.get("notes", "n1").unwrap().unwrap().data, obj(json!({"x": 2})));

    // 5. server: arrival order wins, whatever the HLC; no conflict.
    clock.advance(10);
    a.patch("logs", "l1", obj(json!({"x": "older-hlc"}))).unwrap();
    clock.advance(10);
    b.patch("logs", "l1", obj(json!({"x": "newer-hlc"}))).unwrap();
    b.sync().await.unwrap();
    let r = a.sync().await.unwrap();
    assert_eq!((r.pushed, r.conflicts), (1, 0), "{r:?}");
    assert!(r.lost.is_empty());

    clock.advance(10);
    b.sync().await.unwrap();
    a.sync().await.unwrap();
    let expected: [(&str, Value); 3] = [
        ("tasks", json!([["t1", {"x": 2, "y": 3, "z": "a"}], ["t3", {"a": 5}]])),
        ("notes", json!([["n1", {"x": 2}]])),
        ("logs", json!([["l1", {"x": "older-hlc"}]])),
    ];
    let status = server.status().await;
    let (_, entities) = server.snapshot().await;
    for (collection, want) in &expected {
        for c in [&a, &b] {
            assert_eq!(&serde_json::to_value(listing(c, collection)).unwrap(), want, "{collection}");
        }
        assert_eq!(&serde_json::to_value(server_listing(&entities, collection)).unwrap(), want, "{collection}");
    }
    for c in [&a, &b] {
        let st = c.stats().unwrap();
        assert_eq!((st.cursor, st.pending, st.failed), (status.head, 0, 0));
        assert_eq!(st.state_hash, status.state_hash);
        assert_eq!(st.state_digest, status.state_digest);
    }

    // The server kept a conflict record of each loss, in order.
    let (code, body) = server.get("/v1/conflicts").await;
    assert_eq!(code, 200);
    let reasons: Vec<&str> =
        body["conflicts"].as_array().unwrap().iter().map(|r| r["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["superseded", "deleted", "superseded", "superseded"]);
    tokio::time::timeout(Duration::from_secs(30), server.stop()).await.unwrap();
}
