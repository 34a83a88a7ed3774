//! §5 integrity, recomputed independently of the server and of the protocol
//! crate's chain and digest code: the hash chain at every pull page and push
//! answer, and the state digest from bootstrap lines, status and pull pages.

mod common;
mod verify;

use std::collections::{BTreeMap, HashMap};

use common::*;
use deltasync_protocol::json::to_jcs;
use serde_json::{Map, Value, json};
use verify::*;

/// JSON text parsed with its number literals kept as written (`1e21`, `4.50`, `-0`).
fn raw(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

/// Issues strictly increasing HLCs (one per millisecond), so that arrival
/// order is HLC order and the `fields` policy reduces to "apply in order".
struct Clock {
    base: u64,
    n: u64,
}

impl Clock {
    fn new() -> Clock {
        Clock { base: now_ms() - 250_000, n: 0 }
    }

    fn next(&mut self, device: &str) -> String {
        self.n += 1;
        hlc(self.base + self.n, 0, device)
    }
}

fn append(change_id: &str, collection: &str, entity_id: &str, data: Option<Value>, hlc: &str) -> Value {
    let mut c =
        json!({"change_id": change_id, "collection": collection, "entity_id": entity_id, "op": "append", "hlc": hlc});
    if let Some(d) = data {
        c["data"] = d;
    }
    c
}

/// The expected entity state under `fields` with HLCs in arrival order:
/// an upsert patches (or, on a deleted entity, revives with only its own
/// fields), a delete hides everything, an append changes nothing.
#[derive(Default, Clone)]
struct Model {
    entities: BTreeMap<(String, String), (Map<String, Value>, bool)>,
}

impl Model {
    fn apply(&mut self, change: &Value) {
        let key = (change["collection"].as_str().unwrap().to_owned(), change["entity_id"].as_str().unwrap().to_owned());
        match change["op"].as_str().unwrap() {
            "upsert" => {
                let fields = change["data"].as_object().unwrap();
                let entry = self.entities.entry(key).or_insert_with(|| (Map::new(), false));
                if entry.1 {
                    *entry = (Map::new(), false);
                }
                for (k, v) in fields {
                    entry.0.insert(k.clone(), v.clone());
                }
            }
            "delete" => {
                self.entities.insert(key, (Map::new(), true));
            }
            "append" => {}
            op => panic!("unknown op {op}"),
        }
    }

    fn digest(&self) -> String {
        let live: Vec<(&str, &str, Value)> = self
            .entities
            .iter()
            .filter(|(_, (_, deleted))| !deleted)
            .map(|((c, id), (data, _))| (c.as_str(), id.as_str(), Value::Object(data.clone())))
            .collect();
        digest_of(live.iter().map(|(c, id, d)| (*c, *id, d)))
    }
}

/// What a push answered, to compare with the recomputed chain afterwards.
struct Answer {
    cursor: u64,
    state_hash: String,
    state_digest: String,
}

/// Pushes and records the answer, asserting every result is applied or duplicate.
async fn push_rec(
    c: &reqwest::Client,
    url: &str,
    device: &str,
    changes: Vec<Value>,
    sent: &mut HashMap<String, (String, Value)>,
    answers: &mut Vec<Answer>,
) -> Value {
    for ch in &changes {
        sent.entry(ch["change_id"].as_str().unwrap().to_owned()).or_insert_with(|| (device.to_owned(), ch.clone()));
    }
    let a = push(c, url, device, changes).await;
    for r in a["results"].as_array().unwrap() {
        assert!(r["status"] == "applied" || r["status"] == "duplicate", "unexpected result {r}");
    }
    answers.push(Answer {
        cursor: a["cursor"].as_u64().unwrap(),
        state_hash: a["state_hash"].as_str().unwrap().to_owned(),
        state_digest: a["state_digest"].as_str().unwrap().to_owned(),
    });
    a
}

/// Pushes the varied log of the first two tests; returns what was sent (change_id -> (device, change)) and the answers.
async fn push_varied_log(c: &reqwest::Client, url: &str) -> (HashMap<String, (String, Value)>, Vec<Answer>) {
    let mut clock = Clock::new();
    let mut sent = HashMap::new();
    let mut answers = Vec::new();

    let d = "phone-7f3a";
    let batch1 = vec![
        upsert(
            "c-001",
            "tasks",
            "t1",
            raw(r#"{"title": "Buy milk", "done": false, "n": 1e21, "f": 0.1, "g": 4.50}"#),
            &clock.next(d),
        ),
        upsert(
            "c-002",
            "tasks",
            "t2",
            json!({"title": "été 🚀 \u{0f}\n\"quoted\" \\ /", "tags": ["a", "b"], "nested": {"z": 1, "a": [null, true, false]}}),
            &clock.next(d),
        ),
        upsert(
            "c-003",
            "notes",
            "заметка-1",
            raw(
                r#"{"\ufb33": "dalet", "\ud83d\ude00": "grin", "\u20ac": "euro", "\r": "cr", "1": 4.50, "\u0080": "ctl"}"#,
            ),
            &clock.next(d),
        ),
        append("c-004", "crdt", "doc1", Some(json!({"op": "ins", "pos": 0, "text": "héllo"})), &clock.next(d)),
        upsert(
            "c-005",
            "tasks",
            "t3",
            raw(
                r#"{"big": 9007199254740992, "neg": -0, "small": 1e-7, "exp": 1E30, "x": 333333333.33333329, "e": 2e-3, "min": 5e-324}"#,
            ),
            &clock.next(d),
        ),
    ];
    push_rec(c, url, d, batch1, &mut sent, &mut answers).await;

    let d = "laptop.home_2";
    let batch2 = vec![
        upsert("c-006", "tasks", "t1", json!({"done": true}), &clock.next(d)),
        delete("c-007", "tasks", "t2", &clock.next(d)),
        delete("c-008", "tasks", "never-seen", &clock.next(d)),
        append("c-009", "crdt", "doc1", Some(json!([1, "two", {"three": 3}])), &clock.next(d)),
        upsert("c-010", "tasks", "t1", json!({"title": null}), &clock.next(d)),
    ];
    push_rec(c, url, d, batch2, &mut sent, &mut answers).await;

    let d = "tablet-3";
    let batch3 = vec![
        upsert("c-011", "tasks", "t2", json!({"title": "revived"}), &clock.next(d)),
        upsert("c-012", "tasks", "t2", raw(r#"{"extra": 2e-3}"#), &clock.next(d)),
        delete("c-013", "notes", "заметка-1", &clock.next(d)),
        append("c-014", "crdt", "doc2", Some(json!("plain string")), &clock.next(d)),
        append("c-015", "crdt", "doc2", None, &clock.next(d)),
        json!({"change_id": "c-016", "collection": "tasks", "entity_id": "t3", "op": "delete", "data": null, "hlc": clock.next(d)}),
    ];
    push_rec(c, url, d, batch3, &mut sent, &mut answers).await;

    // Many small changes over a few entities from several devices:
    // creations, one-field updates, deletes, revivals, appends.
    let devices = ["phone-7f3a", "laptop.home_2", "tablet-3", "watch_9"];
    let mut n = 100;
    for round in 0..6 {
        let d = devices[round % devices.len()];
        let mut batch = Vec::new();
        for k in 0..7 {
            n += 1;
            let id = format!("c-{n:03}");
            let entity = format!("e{}", (round * 7 + k) % 5);
            let h = clock.next(d);
            batch.push(match (round + k) % 6 {
                0 => upsert(
                    &id,
                    "items",
                    &entity,
                    json!({"name": format!("item {n} ✓"), "qty": n, "ratio": n as f64 / 7.0}),
                    &h,
                ),
                1 => upsert(&id, "items", &entity, json!({"qty": n * 2}), &h),
                2 => delete(&id, "items", &entity, &h),
                3 => {
                    upsert(&id, "items", &entity, json!({"note": format!("révision {round}"), "flag": k % 2 == 0}), &h)
                }
                4 => append(&id, "log", &entity, Some(json!({"round": round, "k": k})), &h),
                _ => upsert(&id, "items", &entity, raw(&format!(r#"{{"f": 1e21, "g": 0.1, "h": {n}.5}}"#)), &h),
            });
        }
        push_rec(c, url, d, batch, &mut sent, &mut answers).await;
    }

    // A retried batch: the first three are duplicates (consume no seq), the rest are new.
    let d = "phone-7f3a";
    let retry = vec![
        sent["c-001"].1.clone(),
        sent["c-002"].1.clone(),
        sent["c-006"].1.clone(),
        upsert("c-200", "notes", "заметка-1", json!({"body": "back again 🐘"}), &clock.next(d)),
        delete("c-201", "tasks", "never-seen", &clock.next(d)),
    ];
    let a = push_rec(c, url, d, retry, &mut sent, &mut answers).await;
    let statuses: Vec<&str> = a["results"].as_array().unwrap().iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["duplicate", "duplicate", "duplicate", "applied", "applied"]);
    assert_eq!(a["results"][0]["seq"], 1);
    assert_eq!(a["results"][1]["seq"], 2);
    assert_eq!(a["results"][2]["seq"], 6);
    (sent, answers)
}

/// Replays the log through the model; returns the digest after every seq (index 0: empty).
fn model_digests(log: &[Value]) -> (Model, Vec<String>) {
    let mut model = Model::default();
    let mut digests = vec![model.digest()];
    for ch in log {
        model.apply(ch);
        digests.push(model.digest());
    }
    (model, digests)
}

store_test!(#[tokio::test] async fn chain_recomputed_at_every_page_and_push_answer);
async fn chain_recomputed_at_every_page_and_push_answer(backend: &Backend) {
    let server = Server::start(backend);
    let c = client();
    let (sent, answers) = push_varied_log(&c, &server.url).await;

    for limit in [3u64, 1, 7, 1000] {
        let (log, pages) = pull_all(&c, &server.url, "auditor", limit).await;
        let heads = chain_heads(&log);
        let (_, digests) = model_digests(&log);
        let head = log.len() as u64;
        assert!(head > 50, "the log is shorter than intended: {head}");
        if limit == 3 {
            assert_eq!(pages.len() as u64, head.div_ceil(3), "pages of limit 3");
        }
        for p in &pages {
            assert_eq!(
                p.state_hash, heads[p.cursor as usize],
                "state_hash of the page at cursor {} (limit {limit})",
                p.cursor
            );
            assert_eq!(
                p.state_digest, digests[p.cursor as usize],
                "state_digest of the page at cursor {} (limit {limit})",
                p.cursor
            );
        }
        assert_eq!(pages.last().unwrap().cursor, head);
        for a in &answers {
            assert_eq!(a.state_hash, heads[a.cursor as usize], "push answer state_hash at cursor {}", a.cursor);
            assert_eq!(a.state_digest, digests[a.cursor as usize], "push answer state_digest at cursor {}", a.cursor);
        }
        // Every logged change is what was sent, by the device that sent it.
        assert_eq!(log.len(), sent.len(), "every distinct change_id is logged once");
        for ch in &log {
            let (device, orig) = &sent[ch["change_id"].as_str().unwrap()];
            assert_eq!(&ch["device_id"], device);
            for k in ["collection", "entity_id", "op", "hlc"] {
                assert_eq!(ch[k], orig[k], "{k} of {}", ch["change_id"]);
            }
            let sent_data = orig.get("data").cloned().unwrap_or(Value::Null);
            let got_data = ch.get("data").cloned().unwrap_or(Value::Null);
            assert_eq!(to_jcs(&got_data), to_jcs(&sent_data), "data of {}", ch["change_id"]);
            assert!(ch["server_time"].as_u64().is_some());
        }
    }

    // A hand-checked instance of c_n for one change, so that the recomputation itself is pinned down.
    let (log, _) = pull_all(&c, &server.url, "auditor", 1).await;
    let first = to_jcs(&chain_object(&log[0]));
    let expected_prefix = format!(
        r#"{{"change_id":"c-001","collection":"tasks","data":{{"done":false,"f":0.1,"g":4.5,"n":1e+21,"title":"Buy milk"}},"device_id":"phone-7f3a","entity_id":"t1","hlc":"{}","op":"upsert","seq":1}}"#,
        log[0]["hlc"].as_str().unwrap()
    );
    assert_eq!(first, expected_prefix);
    let mut two = [0u8; 64];
    two[..32].copy_from_slice(&sha256(first.as_bytes()));
    assert_eq!(hex::encode(sha256(&two)), chain_heads(&log)[1]);
}

store_test!(#[tokio::test] async fn digest_recomputed_from_bootstrap_equals_header_status_and_last_page);
async fn digest_recomputed_from_bootstrap_equals_header_status_and_last_page(backend: &Backend) {
    let server = Server::start(backend);
    let c = client();
    let _ = push_varied_log(&c, &server.url).await;
    let (log, pages) = pull_all(&c, &server.url, "auditor", 3).await;
    let (model, digests) = model_digests(&log);
    let heads = chain_heads(&log);

    let boot = Bootstrap::parse(bootstrap_lines(&c, &server.url, "fresh-device").await);
    let recomputed = boot.recomputed_digest();
    let st = status(&c, &server.url).await;
    let head = log.len() as u64;

    assert_eq!(boot.header["cursor"], head);
    assert_eq!(boot.header["state_digest"], recomputed.as_str(), "bootstrap header digest vs entity lines");
    assert_eq!(st["state_digest"], recomputed.as_str(), "status digest");
    assert_eq!(pages.last().unwrap().state_digest, recomputed, "last pull page digest");
    assert_eq!(recomputed, digests[head as usize], "digest of the expected state");
    assert_eq!(recomputed, model.digest());
    assert_eq!(boot.header["state_hash"], heads[head as usize].as_str());
    assert_eq!(st["state_hash"], heads[head as usize].as_str());
    assert_eq!(st["head"], head);
    assert_ne!(recomputed, zeros());

    // The bootstrap's entities are exactly the expected state, tombstones included.
    let mut got: BTreeMap<(String, String), (Value, bool)> = BTreeMap::new();
    for e in &boot.entities {
        let key = (e["collection"].as_str().unwrap().to_owned(), e["entity_id"].as_str().unwrap().to_owned());
        assert!(got.insert(key, (e["data"].clone(), e["deleted"].as_bool().unwrap())).is_none(), "entity twice: {e}");
        assert!(e["version"].as_u64().is_some() && e.get("meta").is_some());
    }
    assert_eq!(got.len(), model.entities.len());
    for (key, (data, deleted)) in &model.entities {
        let (gdata, gdeleted) = &got[key];
        assert_eq!(gdeleted, deleted, "deleted flag of {key:?}");
        assert_eq!(to_jcs(gdata), to_jcs(&Value::Object(data.clone())), "data of {key:?}");
    }
    assert!(got[&("tasks".to_owned(), "never-seen".to_owned())].1, "a delete of an unseen entity is a tombstone");
    // The appends, in seq order.
    let appends: Vec<&Value> = log.iter().filter(|c| c["op"] == "append").collect();
    assert_eq!(boot.appends.len(), appends.len());
    for (b, l) in boot.appends.iter().zip(appends) {
        assert_eq!(b["seq"], l["seq"]);
        assert_eq!(b["change_id"], l["change_id"]);
        assert_eq!(to_jcs(&b["data"]), to_jcs(&l["data"]));
    }
    assert_eq!(boot.count, (boot.entities.len() + boot.appends.len()) as u64);
}

store_test!(#[tokio::test] async fn empty_dataset_has_zero_hash_and_digest);
async fn empty_dataset_has_zero_hash_and_digest(backend: &Backend) {
    let server = Server::start(backend);
    let c = client();
    let st = status(&c, &server.url).await;
    assert_eq!(st["head"], 0);
    assert_eq!(st["state_hash"], zeros().as_str());
    assert_eq!(st["state_digest"], zeros().as_str());
    let boot = Bootstrap::parse(bootstrap_lines(&c, &server.url, "d1").await);
    assert_eq!(boot.header["cursor"], 0);
    assert_eq!(boot.header["state_hash"], zeros().as_str());
    assert_eq!(boot.header["state_digest"], zeros().as_str());
    assert_eq!(boot.count, 0);
    assert_eq!(boot.recomputed_digest(), zeros());
    let (log, pages) = pull_all(&c, &server.url, "d1", 3).await;
    assert!(log.is_empty());
    assert_eq!(pages.len(), 1);
    assert_eq!(pages[0].cursor, 0);
    assert_eq!(pages[0].state_hash, zeros());
    assert_eq!(pages[0].state_digest, zeros());
    assert!(!pages[0].has_more);
    assert_eq!(chain_heads(&log)[0], zeros());
}

/// The changes of one step, and the live entities `(entity_id, data)` expected after it.
type Step = (Vec<Value>, Vec<(&'static str, Value)>);

store_test!(#[tokio::test] async fn digest_follows_deletes_and_revivals);
async fn digest_follows_deletes_and_revivals(backend: &Backend) {
    let server = Server::start(backend);
    let c = client();
    let mut clock = Clock::new();
    let d = "dev-1";
    let a = |k: &str| ("things".to_owned(), k.to_owned());

    // Each step: the changes to push, then the live entities expected afterwards.
    let mut n = 0;
    let mut id = || {
        n += 1;
        format!("x{n}")
    };
    let steps: Vec<Step> = vec![
        (
            vec![
                upsert(&id(), "things", "a", json!({"x": 1, "y": "why"}), &clock.next(d)),
                upsert(&id(), "things", "b", json!({"x": 2}), &clock.next(d)),
            ],
            vec![("a", json!({"x": 1, "y": "why"})), ("b", json!({"x": 2}))],
        ),
        (vec![delete(&id(), "things", "a", &clock.next(d))], vec![("b", json!({"x": 2}))]),
        // Everything deleted: the digest is zero again although two tombstones exist.
        (vec![delete(&id(), "things", "b", &clock.next(d))], vec![]),
        // Revived with only its own fields: `y` stays hidden behind the tombstone.
        (vec![upsert(&id(), "things", "a", json!({"x": 10}), &clock.next(d))], vec![("a", json!({"x": 10}))]),
        (
            vec![
                upsert(&id(), "things", "a", json!({"z": null}), &clock.next(d)),
                upsert(&id(), "things", "b", json!({"w": [1, 2]}), &clock.next(d)),
                delete(&id(), "things", "b", &clock.next(d)),
            ],
            vec![("a", json!({"x": 10, "z": null}))],
        ),
        // A delete of a deleted entity and an append change nothing.
        (
            vec![
                delete(&id(), "things", "b", &clock.next(d)),
                append(&id(), "things", "b", Some(json!({"op": 1})), &clock.next(d)),
            ],
            vec![("a", json!({"x": 10, "z": null}))],
        ),
        // Revive b, delete a within one batch.
        (
            vec![
                upsert(&id(), "things", "b", json!({"v": "back"}), &clock.next(d)),
                delete(&id(), "things", "a", &clock.next(d)),
            ],
            vec![("b", json!({"v": "back"}))],
        ),
    ];
    for (i, (changes, live)) in steps.into_iter().enumerate() {
        let answer = push(&c, &server.url, d, changes).await;
        let expected = digest_of(live.iter().map(|(k, v)| ("things", *k, v)));
        if live.is_empty() {
            assert_eq!(expected, zeros());
        }
        assert_eq!(answer["state_digest"], expected.as_str(), "push answer digest after step {i}");
        let st = status(&c, &server.url).await;
        assert_eq!(st["state_digest"], expected.as_str(), "status digest after step {i}");
        let boot = Bootstrap::parse(bootstrap_lines(&c, &server.url, d).await);
        assert_eq!(boot.recomputed_digest(), expected, "bootstrap lines after step {i}");
        assert_eq!(boot.header["state_digest"], expected.as_str(), "bootstrap header after step {i}");
        let live_keys: Vec<(String, String)> = live.iter().map(|(k, _)| a(k)).collect();
        for e in &boot.entities {
            let key = (e["collection"].as_str().unwrap().to_owned(), e["entity_id"].as_str().unwrap().to_owned());
            assert_eq!(
                e["deleted"].as_bool().unwrap(),
                !live_keys.contains(&key),
                "deleted flag of {key:?} after step {i}"
            );
            if e["deleted"] == true {
                assert_eq!(e["data"], json!({}), "a deleted entity has data {{}}");
            }
        }
    }
    let (log, pages) = pull_all(&c, &server.url, d, 3).await;
    let heads = chain_heads(&log);
    for p in &pages {
        assert_eq!(p.state_hash, heads[p.cursor as usize]);
    }
}
