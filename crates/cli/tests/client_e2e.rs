//! End-to-end tests of `deltasync client`: devices (local SQLite files driven
//! through the real command line) write offline while the server is down,
//! sync in several orders after it comes back, and converge on the state the
//! merge rules of protocol §4 give; plus the `reject` and `entity` policies,
//! pending edits that meet a pull, auth, and the put/patch/get/list contract.

mod common;

use std::collections::HashMap;

use common::devices::*;
use common::{Backend, Server};
use serde_json::{Value, json};

/// `list` output for `(id, data)` pairs, in the given order.
fn listing(items: &[(&str, Value)]) -> Value {
    Value::Array(items.iter().map(|(id, data)| json!({"id": id, "data": data})).collect())
}

/// Ids of the changes a device's export-pending shows.
fn pending_ids(d: &Device) -> Vec<String> {
    d.export_pending().iter().map(|c| c["change_id"].as_str().unwrap().to_owned()).collect()
}

/// Three devices write offline (same and different entities and fields, deletes,
/// revivals), then sync in `order` (indices into [A, B, C]) after a restart.
/// `expected_lost[i]` is what device i's first sync must report as lost.
fn offline_scenario(backend: &Backend, order: &[usize], expected_lost: [Vec<Lost>; 3]) {
    let mut server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let b = Device::new(dir.path(), "b");
    let c = Device::new(dir.path(), "c");
    let devices = [&a, &b, &c];

    // The shared starting point, synced everywhere.
    a.put("tasks", "t1", json!({"title": "base", "done": false}));
    a.put("tasks", "t2", json!({"title": "t2", "note": "n0"}));
    a.put("tasks", "t4", json!({"z": 0, "w": "w"}));
    a.put("tasks", "t5", json!({"a": 1, "b": 2}));
    for d in devices {
        let r = d.sync(&server.url);
        assert_eq!(r["verified"], true, "{r}");
    }
    assert_eq!(a.sync(&server.url)["pulled"], 0);
    assert_converged(&devices, &server.url, None, &[("tasks", None)]);

    server.kill();
    let old_url = server.url.clone();

    // Offline writes, in this wall-clock (so HLC) order.
    let mut steps: Vec<(&Device, Value)> = Vec::new();
    let mut step = |d: &'static str, v: Value| {
        let dev = match d {
            "a" => &a,
            "b" => &b,
            _ => &c,
        };
        assert!(v.is_string(), "{d}: a write printed {v}, not a change id");
        steps.push((dev, v));
        tick();
    };
    step("a", a.patch("tasks", "t1", json!({"title": "A1"}))); // 1
    step("b", b.patch("tasks", "t1", json!({"done": true}))); // 2
    step("c", c.patch("tasks", "t1", json!({"title": "C1"}))); // 3: newest title
    step("a", json!(a.delete("tasks", "t2"))); // 4
    step("b", b.patch("tasks", "t2", json!({"note": "B"}))); // 5: revives t2 with note only
    step("c", c.patch("tasks", "t3", json!({"v": 1}))); // 6: a new entity…
    step("b", json!(b.delete("tasks", "t3"))); // 7: …deleted later by a device that never saw it
    step("a", a.patch("tasks", "t4", json!({"z": 1}))); // 8
    step("c", json!(c.delete("tasks", "t4"))); // 9: delete newer than A's edit
    step("b", json!(b.delete("tasks", "t5"))); // 10
    step("c", c.put("tasks", "t5", json!({"a": 9}))); // 11: revives t5: a = 9, b = null
    step("a", a.put("notes", "n1", json!({"text": "hello", "tags": ["x"]}))); // 12
    step("b", b.patch("notes", "n1", json!({"text": "from B"}))); // 13
    // C's view already has done = false: nothing to write, so B's done = true stands.
    assert_eq!(c.patch("tasks", "t1", json!({"done": false})), Value::Null);
    step("a", a.patch("tasks", "t6", json!({"k": "A"}))); // 14
    step("c", c.patch("tasks", "t6", json!({"k": "C", "m": 1}))); // 15: k wins over A's
    step("a", a.patch("tasks", "t6", json!({"m": 2}))); // 16: m wins over C's
    // Several changes of one entity in one outbox.
    step("a", a.patch("tasks", "t7", json!({"n": 1})));
    step("a", a.patch("tasks", "t7", json!({"n": 2})));
    step("a", json!(a.delete("tasks", "t7")));
    step("a", a.patch("tasks", "t7", json!({"n": 3, "o": 1})));

    // Reads show each device's own pending changes merged on its confirmed state.
    assert_eq!(a.get("tasks", "t1"), Some(json!({"title": "A1", "done": false})));
    assert_eq!(b.get("tasks", "t1"), Some(json!({"title": "base", "done": true})));
    assert_eq!(c.get("tasks", "t1"), Some(json!({"title": "C1", "done": false})));
    assert_eq!(a.get("tasks", "t2"), None);
    assert_eq!(b.get("tasks", "t2"), Some(json!({"title": "t2", "note": "B"})));
    assert_eq!(b.get("tasks", "t3"), None);
    assert_eq!(c.get("tasks", "t3"), Some(json!({"v": 1})));
    assert_eq!(c.get("tasks", "t4"), None);
    assert_eq!(b.get("tasks", "t5"), None);
    assert_eq!(c.get("tasks", "t5"), Some(json!({"a": 9, "b": null})));
    assert_eq!(b.get("notes", "n1"), Some(json!({"text": "from B"})));
    assert_eq!(a.get("tasks", "t7"), Some(json!({"n": 3, "o": 1})));

    // Every write is in its device's outbox, in order.
    let mut written: HashMap<String, Vec<String>> = HashMap::new();
    for (d, id) in &steps {
        written.entry(d.name.clone()).or_default().push(id.as_str().unwrap().to_owned());
    }
    for d in devices {
        let ids = pending_ids(d);
        assert_eq!(ids, written[&d.name], "{}: export-pending", d.name);
        let st = d.status();
        assert_eq!(st["pending"], ids.len(), "{}: {st}", d.name);
        assert_eq!(st["failed"], 0, "{}: {st}", d.name);
    }

    // Syncing while the server is down fails cleanly and keeps the outbox.
    for d in devices {
        let before = d.status();
        let err = d.sync_fails(&old_url);
        assert_eq!(err["error"], "unreachable", "{}: {err}", d.name);
        let err = d.run(None, &["sync"]).error();
        assert_eq!(err["error"], "unreachable", "{}: sync with the stored URL: {err}", d.name);
        // Only the record of the failure changes: the last error, kept until a sync succeeds.
        let mut after = d.status();
        assert_eq!(after["last_error"]["code"], "unreachable", "{}: {after}", d.name);
        assert_eq!(after["failed_syncs"], 2, "{}: {after}", d.name);
        for key in ["last_error", "failing_since", "failed_syncs"] {
            after[key] = before[key].clone();
        }
        assert_eq!(after, before, "{}: a failed sync changed the status", d.name);
        assert_eq!(pending_ids(d), written[&d.name], "{}: a failed sync changed the outbox", d.name);
    }

    server.restart();
    let mut first: [Option<Value>; 3] = [None, None, None];
    for &i in order {
        let d = devices[i];
        let r = d.sync(&server.url);
        assert_eq!(r["verified"], true, "{}: {r}", d.name);
        assert_eq!(r["healed"], false, "{}: {r}", d.name);
        assert!(r.get("mismatch").is_none_or(Value::is_null), "{}: {r}", d.name);
        assert_eq!(r["pending"], 0, "{}: {r}", d.name);
        assert_eq!(r["failed"], 0, "{}: {r}", d.name);
        if first[i].is_none() {
            assert_eq!(r["pushed"], written[&d.name].len(), "{}: {r}", d.name);
            assert_eq!(r["applied"], written[&d.name].len(), "{}: {r}", d.name);
            assert_eq!(r["duplicate"], 0, "{}: {r}", d.name);
            assert_eq!(lost_summary(&r), expected_lost[i], "{}: first sync after the restart: {r}", d.name);
            first[i] = Some(r);
        } else {
            assert_eq!(r["pushed"], 0, "{}: {r}", d.name);
            assert_eq!(r["conflicts"], 0, "{}: {r}", d.name);
        }
    }

    // The merge rules, by hand.
    let tasks = listing(&[
        ("t1", json!({"title": "C1", "done": true})),
        ("t2", json!({"note": "B"})),
        ("t5", json!({"a": 9, "b": null})),
        ("t6", json!({"k": "C", "m": 2})),
        ("t7", json!({"n": 3, "o": 1})),
    ]);
    let notes = listing(&[("n1", json!({"text": "from B", "tags": ["x"]}))]);
    assert_converged(&devices, &server.url, None, &[("tasks", Some(tasks)), ("notes", Some(notes))]);
    for d in devices {
        assert_eq!(d.get("tasks", "t3"), None, "{}", d.name);
        assert_eq!(d.get("tasks", "t4"), None, "{}", d.name);
        assert_eq!(d.status()["failed"], 0);
        let r = d.sync(&server.url);
        assert_eq!(
            (r["pushed"].clone(), r["pulled"].clone(), r["verified"].clone()),
            (json!(0), json!(0), json!(true))
        );
    }

    // The server logged each change exactly once, as pushed by its device.
    let log = server_log(&server.url, None);
    let mut seen: HashMap<String, (String, usize)> = HashMap::new();
    for c in &log {
        let e = seen.entry(c["change_id"].as_str().unwrap().to_owned()).or_insert((String::new(), 0));
        e.0 = c["device_id"].as_str().unwrap().to_owned();
        e.1 += 1;
    }
    for d in devices {
        let device_id = d.device_id();
        for id in &written[&d.name] {
            assert_eq!(seen.get(id), Some(&(device_id.clone(), 1)), "{}: change {id} in the log", d.name);
        }
    }
    assert_eq!(log.len(), 4 + steps.len(), "the log holds the base and every offline write");
}

store_test!(#[test] fn offline_writes_on_three_devices_converge_syncing_a_b_c_a_b);
fn offline_writes_on_three_devices_converge_syncing_a_b_c_a_b(backend: &Backend) {
    offline_scenario(
        backend,
        &[0, 1, 2, 0, 1],
        [
            vec![],
            vec![],
            // C's v = 1 (6) arrives after B's delete (7); C's m = 1 (15) after A's m = 2 (16).
            vec![lost("tasks", "t3", "deleted", &["v"]), lost("tasks", "t6", "superseded", &["m"])],
        ],
    );
}

store_test!(#[test] fn offline_writes_on_three_devices_converge_syncing_c_a_b_c_a);
fn offline_writes_on_three_devices_converge_syncing_c_a_b_c_a(backend: &Backend) {
    offline_scenario(
        backend,
        &[2, 0, 1, 2, 0],
        [
            // A's title (1) loses to C's (3), its z (8) to C's delete (9), its k (14) to C's (15).
            vec![
                lost("tasks", "t1", "superseded", &["title"]),
                lost("tasks", "t4", "deleted", &["z"]),
                lost("tasks", "t6", "superseded", &["k"]),
            ],
            // B's delete of t5 (10) leaves it alive: C's put (11) is newer.
            vec![lost("tasks", "t5", "superseded", &["a", "b"])],
            vec![],
        ],
    );
}

store_test!(#[test] fn reject_policy_refuses_the_second_offline_edit_and_keeps_it_as_failed);
fn reject_policy_refuses_the_second_offline_edit_and_keeps_it_as_failed(backend: &Backend) {
    let mut server = Server::start_with(
        backend,
        common::Options { config: Some("[collections.docs]\npolicy = \"reject\"\n".into()), ..Default::default() },
    );
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let b = Device::new(dir.path(), "b");
    let c = Device::new(dir.path(), "c");
    a.put("docs", "d1", json!({"title": "v1", "body": "x"}));
    for d in [&a, &b, &c] {
        d.sync(&server.url);
    }

    server.kill();
    a.patch("docs", "d1", json!({"title": "A"}));
    tick();
    let refused = b.patch("docs", "d1", json!({"title": "B", "body": "y"}));
    tick();
    b.patch("docs", "d2", json!({"k": 1}));
    assert_eq!(b.get("docs", "d1"), Some(json!({"title": "B", "body": "y"})), "a pending edit shows before the sync");
    server.restart();

    let r = a.sync(&server.url);
    assert_eq!((r["applied"].clone(), r["conflicts"].clone()), (json!(1), json!(0)), "{r}");

    let r = b.sync(&server.url);
    assert!(r["conflicts"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["failed"], 1, "{r}");
    assert_eq!(r["applied"], 1, "d2 still goes: {r}");
    assert_eq!(r["pending"], 0, "{r}");
    assert_eq!(r["verified"], true, "{r}");
    let lost_changes = r["lost"].as_array().unwrap();
    assert_eq!(lost_changes.len(), 1, "{r}");
    assert_eq!(lost_changes[0]["change_id"], refused, "{r}");
    assert_eq!(lost_changes[0]["entity_id"], "d1", "{r}");
    assert_eq!(lost_changes[0]["conflict"]["reason"], "version_mismatch", "{r}");

    let st = b.status();
    assert_eq!((st["pending"].clone(), st["failed"].clone()), (json!(0), json!(1)), "{st}");
    let exported = b.export_pending();
    assert_eq!(exported.len(), 1, "{exported:?}");
    let e = &exported[0];
    assert_eq!(e["change_id"], refused, "{e}");
    assert_eq!(e["state"], "failed", "{e}");
    assert_eq!(e["op"], "upsert", "{e}");
    assert_eq!(e["data"], json!({"title": "B", "body": "y"}), "{e}");
    assert_eq!(e["conflict"]["reason"], "version_mismatch", "{e}");
    assert_eq!(e["conflict"]["current"]["data"], json!({"title": "A", "body": "x"}), "{e}");
    // The failed edit no longer shows.
    assert_eq!(b.get("docs", "d1"), Some(json!({"title": "A", "body": "x"})));

    // The server recorded the refusal, and logged nothing for it.
    let (status, conflicts) = http_get(&server.url, "/v1/conflicts", None);
    assert_eq!(status, 200, "{conflicts}");
    let records: Vec<&Value> =
        conflicts["conflicts"].as_array().unwrap().iter().filter(|c| c["change_id"] == refused).collect();
    assert_eq!(records.len(), 1, "{conflicts}");
    assert_eq!(records[0]["reason"], "version_mismatch");
    assert!(server_log(&server.url, None).iter().all(|c| c["change_id"] != refused));

    c.sync(&server.url);
    a.sync(&server.url);
    let docs = listing(&[("d1", json!({"title": "A", "body": "x"})), ("d2", json!({"k": 1}))]);
    assert_converged(&[&a, &b, &c], &server.url, None, &[("docs", Some(docs))]);

    // The failed change is kept across syncs, and a new edit on the current version goes through.
    let r = b.sync(&server.url);
    assert_eq!((r["failed"].clone(), r["conflicts"].clone()), (json!(0), json!(0)), "{r}");
    assert_eq!(b.status()["failed"], 1);
    assert_eq!(b.export_pending()[0]["state"], "failed");
    b.patch("docs", "d1", json!({"body": "y2"}));
    let r = b.sync(&server.url);
    assert_eq!((r["applied"].clone(), r["conflicts"].clone()), (json!(1), json!(0)), "{r}");
    for d in [&a, &c] {
        d.sync(&server.url);
    }
    let docs = listing(&[("d1", json!({"title": "A", "body": "y2"})), ("d2", json!({"k": 1}))]);
    assert_converged(&[&a, &b, &c], &server.url, None, &[("docs", Some(docs))]);
    assert_eq!(b.status()["failed"], 1);

    // Several offline edits of one entity by one device go one by one, each on
    // the version its predecessor made; a delete and a revival too.
    c.patch("docs", "d1", json!({"title": "C1"}));
    c.patch("docs", "d1", json!({"title": "C2"}));
    c.delete("docs", "d2");
    c.patch("docs", "d2", json!({"k": 2}));
    c.patch("docs", "d3", json!({"new": true}));
    let r = c.sync(&server.url);
    assert_eq!(
        (r["applied"].clone(), r["conflicts"].clone(), r["failed"].clone()),
        (json!(5), json!(0), json!(0)),
        "{r}"
    );
    a.sync(&server.url);
    b.sync(&server.url);
    let docs =
        listing(&[("d1", json!({"title": "C2", "body": "y2"})), ("d2", json!({"k": 2})), ("d3", json!({"new": true}))]);
    assert_converged(&[&a, &b, &c], &server.url, None, &[("docs", Some(docs))]);

    // A failed change is kept across a heal too.
    let hash = b.meta("state_hash").unwrap();
    let bad = format!("{}{}", if hash.starts_with('0') { "1" } else { "0" }, &hash[1..]);
    b.sqlite().execute("UPDATE meta SET value = ?1 WHERE key = 'state_hash'", [bad]).unwrap();
    let r = b.sync(&server.url);
    assert_eq!((r["verified"].clone(), r["healed"].clone()), (json!(false), json!(true)), "{r}");
    let exported = b.export_pending();
    assert_eq!(exported.len(), 1, "{exported:?}");
    assert_eq!((&exported[0]["change_id"], &exported[0]["state"]), (&refused, &json!("failed")));
    assert_eq!(exported[0]["conflict"]["reason"], "version_mismatch");
    assert_eq!(b.status()["failed"], 1);
    assert_eq!(b.get("docs", "d1"), Some(json!({"title": "C2", "body": "y2"})));
}

store_test!(#[test] fn entity_policy_keeps_the_newest_whole_change);
fn entity_policy_keeps_the_newest_whole_change(backend: &Backend) {
    let server = Server::start_with(
        backend,
        common::Options { config: Some("[collections.notes]\npolicy = \"entity\"\n".into()), ..Default::default() },
    );
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let b = Device::new(dir.path(), "b");
    let c = Device::new(dir.path(), "c");
    a.put("notes", "n1", json!({"a": "0", "b": "0"}));
    a.put("notes", "n2", json!({"a": "0", "b": "0"}));
    a.put("tasks", "t1", json!({"a": "0", "b": "0"}));
    for d in [&a, &b, &c] {
        d.sync(&server.url);
    }

    a.patch("notes", "n1", json!({"a": "A"})); // 1
    tick();
    b.patch("notes", "n1", json!({"b": "B"})); // 2: the newest change of n1
    tick();
    c.delete("notes", "n2"); // 3
    tick();
    a.patch("notes", "n2", json!({"a": "A2"})); // 4: revives n2 with only its own fields
    tick();
    // The same kind of edits in a `fields` collection merge field by field.
    a.patch("tasks", "t1", json!({"a": "A"}));
    tick();
    b.patch("tasks", "t1", json!({"b": "B"}));
    assert_eq!(a.get("notes", "n1"), Some(json!({"a": "A", "b": "0"})));

    let r = b.sync(&server.url);
    assert_eq!(r["conflicts"], 0, "{r}");
    let r = c.sync(&server.url);
    assert_eq!(r["conflicts"], 0, "{r}");
    let r = a.sync(&server.url);
    assert_eq!(lost_summary(&r), vec![lost("notes", "n1", "superseded", &["a"])], "{r}");
    assert_eq!(r["lost"][0]["conflict"]["current"]["data"], json!({"a": "0", "b": "B"}), "{r}");
    b.sync(&server.url);
    c.sync(&server.url);

    let notes = listing(&[("n1", json!({"a": "0", "b": "B"})), ("n2", json!({"a": "A2"}))]);
    let tasks = listing(&[("t1", json!({"a": "A", "b": "B"}))]);
    assert_converged(&[&a, &b, &c], &server.url, None, &[("notes", Some(notes)), ("tasks", Some(tasks))]);
}

/// Two devices share `e1 = {x: "0", y: "0"}`; A edits x (pending) and B edits
/// x and y, B's edit `b_newer` than A's or not, and B syncs first. A's edit
/// shows on A until its sync, then LWW decides.
fn pending_edit_meets_a_pull(backend: &Backend, b_newer: bool) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let b = Device::new(dir.path(), "b");
    a.put("items", "e1", json!({"x": "0", "y": "0"}));
    a.sync(&server.url);
    b.sync(&server.url);

    let a_change = if b_newer {
        let id = a.patch("items", "e1", json!({"x": "a"}));
        tick();
        b.patch("items", "e1", json!({"x": "b", "y": "b"}));
        id
    } else {
        b.patch("items", "e1", json!({"x": "b", "y": "b"}));
        tick();
        a.patch("items", "e1", json!({"x": "a"}))
    };
    let r = b.sync(&server.url);
    assert_eq!(r["applied"], 1, "{r}");

    // A's own pending edit shows on A, whatever the server holds.
    assert_eq!(a.get("items", "e1"), Some(json!({"x": "a", "y": "0"})));
    assert_eq!(a.status()["pending"], 1);

    let r = a.sync(&server.url);
    assert_eq!((r["pushed"].clone(), r["pulled"].clone()), (json!(1), json!(1)), "{r}");
    let expected = if b_newer {
        assert_eq!(lost_summary(&r), vec![lost("items", "e1", "superseded", &["x"])], "{r}");
        assert_eq!(r["lost"][0]["change_id"], a_change);
        json!({"x": "b", "y": "b"})
    } else {
        assert_eq!(r["conflicts"], 0, "{r}");
        json!({"x": "a", "y": "b"})
    };
    assert_eq!(r["pending"], 0, "{r}");
    assert_eq!(a.get("items", "e1"), Some(expected.clone()));
    b.sync(&server.url);
    assert_converged(&[&a, &b], &server.url, None, &[("items", Some(listing(&[("e1", expected)])))]);
}

store_test!(#[test] fn a_pending_edit_loses_to_a_newer_remote_edit_pulled_at_sync);
fn a_pending_edit_loses_to_a_newer_remote_edit_pulled_at_sync(backend: &Backend) {
    pending_edit_meets_a_pull(backend, true);
}

store_test!(#[test] fn a_pending_edit_wins_over_an_older_remote_edit_pulled_at_sync);
fn a_pending_edit_wins_over_an_older_remote_edit_pulled_at_sync(backend: &Backend) {
    pending_edit_meets_a_pull(backend, false);
}

store_test!(#[test] fn pending_edits_survive_pulls_of_the_same_entity_and_merge_by_lww);
/// A's edits of e3 and e4 wait behind changes the server refuses (data over its
/// `max_data_bytes`), so several syncs pull B's edits of the same entities while
/// A's stay pending; reads merge them by LWW all along, and once the refused
/// changes are set aside as failed, A's edits go and end as LWW says.
fn pending_edits_survive_pulls_of_the_same_entity_and_merge_by_lww(backend: &Backend) {
    let server = Server::start_with(
        backend,
        common::Options { config: Some("[server]\nmax_data_bytes = 512\n".into()), ..Default::default() },
    );
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let b = Device::new(dir.path(), "b");
    a.put("items", "e3", json!({"x": "0", "y": "0"}));
    a.put("items", "e4", json!({"x": "0", "y": "0"}));
    a.sync(&server.url);
    b.sync(&server.url);

    let blob = "z".repeat(2000);
    let big3 = a.patch("items", "e3", json!({"blob": blob}));
    let big4 = a.patch("items", "e4", json!({"blob": blob}));
    tick();
    let a3 = a.patch("items", "e3", json!({"x": "a"}));
    tick();
    b.patch("items", "e3", json!({"x": "b", "y": "b"})); // newer than A's x of e3
    tick();
    b.patch("items", "e4", json!({"x": "b", "y": "b"}));
    tick();
    let a4 = a.patch("items", "e4", json!({"x": "a"})); // newer than B's x of e4
    assert_eq!(b.sync(&server.url)["applied"], 2);

    for round in 1..5 {
        let r = a.sync(&server.url);
        assert_eq!(r["pushed"], 0, "round {round}: {r}");
        assert_eq!(r["pulled"], if round == 1 { 2 } else { 0 }, "round {round}: {r}");
        assert_eq!(r["pending"], 4, "round {round}: {r}");
        assert_eq!(r["failed"], 0, "round {round}: {r}");
        assert_eq!(r["verified"], true, "round {round}: {r}");
        let e3 = a.get("items", "e3").unwrap();
        let e4 = a.get("items", "e4").unwrap();
        assert_eq!((&e3["x"], &e3["y"], &e3["blob"]), (&json!("b"), &json!("b"), &json!(blob)), "round {round}");
        assert_eq!((&e4["x"], &e4["y"], &e4["blob"]), (&json!("a"), &json!("b"), &json!(blob)), "round {round}");
        let exported = a.export_pending();
        let ids: Vec<&Value> = exported.iter().map(|e| &e["change_id"]).collect();
        assert_eq!(ids, vec![&big3, &big4, &a3, &a4], "round {round}");
        assert!(exported.iter().all(|e| e["state"] == "pending"), "round {round}: {exported:?}");
        // Each `sync` run by hand gives the refused changes a fresh start: 1 refusal, not `round`.
        assert_eq!(exported[0]["retries"], 1, "round {round}: {exported:?}");
        assert!(exported[0]["last_error"].as_str().unwrap().contains("max_data_bytes"), "{exported:?}");
        assert_eq!(exported[2]["retries"], 0, "round {round}: {exported:?}");
    }

    // A scheduled sync keeps counting: as if four background syncs had been
    // refused already, the fifth refusal sets the big changes aside, and A's
    // edits go in the same sync.
    a.sqlite().execute("UPDATE outbox SET retries = 4, next_attempt_at = 0 WHERE retries > 0", []).unwrap();
    let out = a.run(Some(&server.url), &["sync", "--scheduled"]);
    assert!(out.success(), "{out:?}");
    let r = out.json();
    check_report(&r);
    assert_eq!(r["failed"], 2, "{r}");
    assert_eq!(r["applied"], 2, "{r}");
    assert_eq!(r["pending"], 0, "{r}");
    let lost_changes = r["lost"].as_array().unwrap();
    assert!(
        lost_changes.iter().any(|l| l["change_id"] == a3
            && l["conflict"]["reason"] == "superseded"
            && l["conflict"]["fields"] == json!(["x"])),
        "{r}"
    );
    assert!(lost_changes.iter().all(|l| l["change_id"] != a4), "{r}");
    let st = a.status();
    assert_eq!((st["pending"].clone(), st["failed"].clone()), (json!(0), json!(2)), "{st}");
    let exported = a.export_pending();
    assert_eq!(exported.iter().map(|e| &e["change_id"]).collect::<Vec<_>>(), vec![&big3, &big4]);
    assert!(exported.iter().all(|e| e["state"] == "failed"), "{exported:?}");

    b.sync(&server.url);
    let items = listing(&[("e3", json!({"x": "b", "y": "b"})), ("e4", json!({"x": "a", "y": "b"}))]);
    assert_converged(&[&a, &b], &server.url, None, &[("items", Some(items))]);

    // The report counts the two refused-for-good changes in `conflicts`; `lost`
    // is documented as "the changes counted in `conflicts`", so it must name them too.
    assert_eq!(r["conflicts"], 3, "{r}");
    assert_eq!(lost_changes.len(), 3, "sync report `lost` omits changes counted in `conflicts`: {r}");
}

store_test!(#[test] fn jwt_auth_token_flag_and_environment_fallbacks);
fn jwt_auth_token_flag_and_environment_fallbacks(backend: &Backend) {
    let server =
        Server::start_with(backend, common::Options { jwt_secret: Some("e2e-secret".into()), ..Default::default() });
    let secret = server.secret_file();
    let mint = |user: &str| {
        let (status, out, err) = common::run_cli(&["token", "--user", user, "--secret-file", secret.to_str().unwrap()]);
        assert!(status.success(), "token: {err}");
        out.trim().to_owned()
    };
    let u1 = mint("u1");
    let u2 = mint("u2");
    let dir = tempfile::tempdir().unwrap();

    // No token: the write works offline-style, the sync is refused.
    let mut a = Device::new(dir.path(), "a");
    a.put("tasks", "t1", json!({"title": "secret plans"}));
    let err = a.sync_fails(&server.url);
    assert_eq!(err["error"], "unauthorized", "{err}");
    // A forged token is refused too.
    a.token = Some(format!("{}x", u1));
    assert_eq!(a.sync_fails(&server.url)["error"], "unauthorized");
    let st = a.status();
    assert_eq!(
        (st["pending"].clone(), st["cursor"].clone(), st["last_sync_at"].clone()),
        (json!(1), json!(0), json!(null))
    );

    a.token = Some(u1.clone());
    let r = a.sync(&server.url);
    assert_eq!(r["applied"], 1, "{r}");
    assert!(a.status()["last_sync_at"].is_u64());

    // DELTASYNC_SERVER and DELTASYNC_TOKEN stand in for the flags.
    let b = Device::new(dir.path(), "b");
    let run_env = |d: &Device, args: &[&str], token: &str| {
        let out =
            d.command(None, args).env("DELTASYNC_SERVER", &server.url).env("DELTASYNC_TOKEN", token).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let r = run_env(&b, &["sync"], &u1);
    assert_eq!(r["pulled"], 1, "{r}");
    assert_eq!(b.get("tasks", "t1"), Some(json!({"title": "secret plans"})));
    assert_eq!(b.status()["server"], json!(server.url), "the URL from the environment is kept");
    // Only the server from the environment, the token by flag.
    let mut b2 = b.clone();
    b2.token = Some(u1.clone());
    let out = b2.command(None, &["sync"]).env("DELTASYNC_SERVER", &server.url).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The stored URL with no token at all: unauthorized.
    assert_eq!(b.run(None, &["sync"]).error()["error"], "unauthorized");

    // Another user's token sees another dataset.
    let c = Device::new(dir.path(), "c");
    let r = run_env(&c, &["sync"], &u2);
    assert_eq!(r["pulled"], 0, "{r}");
    assert_eq!(c.list("tasks"), json!([]));

    let st = server_status(&server.url, Some(&u1));
    assert_eq!(st["head"], 1);
    assert_eq!(a.status()["state_hash"], st["state_hash"]);
    assert_eq!(b.status()["state_hash"], st["state_hash"]);
}

store_test!(#[test] fn put_patch_delete_get_list_follow_the_command_line_contract);
fn put_patch_delete_get_list_follow_the_command_line_contract(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let outbox_len = || a.export_pending().len();

    // Before any sync: no server, cursor 0, zero hashes, never synced.
    let st = a.status();
    assert!(st["device_id"].as_str().is_some_and(|d| !d.is_empty()), "{st}");
    assert_eq!(st["server"], Value::Null, "{st}");
    assert_eq!((st["pending"].clone(), st["failed"].clone(), st["cursor"].clone()), (json!(0), json!(0), json!(0)));
    assert_eq!(st["state_hash"], json!("0".repeat(64)), "{st}");
    assert_eq!(st["state_digest"], json!("0".repeat(64)), "{st}");
    assert_eq!(st["last_sync_at"], Value::Null, "{st}");
    assert_eq!(a.device_id(), st["device_id"].as_str().unwrap(), "the device id is kept");
    assert_eq!(a.run(None, &["sync"]).error()["error"], "no_server");
    assert_eq!(a.export_pending(), Vec::<Value>::new());

    // put over an entity with more fields: the missing ones are sent as null.
    a.put("c", "e1", json!({"a": 1, "b": 2, "c": 3}));
    a.sync(&format!("{}/", server.url)); // a trailing slash is allowed
    assert_eq!(a.status()["server"], json!(server.url));
    let id = a.put("c", "e1", json!({"a": 1, "d": 4}));
    assert!(id.is_string(), "{id}");
    let exported = a.export_pending();
    assert_eq!(exported.len(), 1);
    assert_eq!(exported[0]["change_id"], id);
    assert_eq!(exported[0]["state"], "pending");
    assert_eq!(exported[0]["op"], "upsert");
    assert_eq!(exported[0]["data"], json!({"b": null, "c": null, "d": 4}), "{}", exported[0]);
    assert!(exported[0]["hlc"].as_str().unwrap().ends_with(&format!("-{}", a.device_id())), "{}", exported[0]);
    assert_eq!(a.get("c", "e1"), Some(json!({"a": 1, "b": null, "c": null, "d": 4})));

    // A put or patch that changes nothing prints null and writes nothing.
    assert_eq!(a.put("c", "e1", json!({"a": 1, "d": 4})), Value::Null);
    assert_eq!(a.put("c", "e1", json!({"a": 1, "b": null, "c": null, "d": 4})), Value::Null);
    assert_eq!(a.patch("c", "e1", json!({"a": 1})), Value::Null);
    assert_eq!(a.patch("c", "e1", json!({"a": 1.0})), Value::Null, "1.0 is the same JSON value as 1");
    assert_eq!(a.patch("c", "e1", json!({})), Value::Null);
    assert_eq!(outbox_len(), 1);
    // A patch sends only the fields that differ.
    let id = a.patch("c", "e1", json!({"a": 1, "d": 5}));
    assert_eq!(a.export_pending()[1]["change_id"], id);
    assert_eq!(a.export_pending()[1]["data"], json!({"d": 5}));

    // Bad input: exit 1, error JSON, nothing written.
    for args in [
        vec!["put", "c", "e1", "{\"a\":"],
        vec!["put", "c", "e1", "[1, 2]"],
        vec!["put", "c", "e1", "\"text\""],
        vec!["patch", "c", "e1", "not json"],
        vec!["patch", "c", "e1", "null"],
        vec!["patch", "c", "e1", "42"],
        vec!["put", "bad collection!", "e1", "{}"],
        vec!["patch", "c", "", "{\"a\":1}"],
        vec!["patch", "c", "e1", "{\"n\": 1e400}"],
    ] {
        let err = a.run(None, &args).error();
        assert_eq!(err["error"], "invalid_input", "{args:?}: {err}");
        assert!(!err["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(outbox_len(), 2);
    let err = a.run(None, &["get", "c", "a\nb"]).error();
    assert_eq!(err["error"], "invalid_input", "a control character in an id: {err}");
    let nowhere = Device::new(&dir.path().join("no-such-dir"), "x");
    assert_eq!(nowhere.run(None, &["status"]).error()["error"], "local_store");

    // get of a deleted entity, or of one never seen, exits 1.
    a.delete("c", "e1");
    assert_eq!(a.get("c", "e1"), None);
    let err = a.run(None, &["get", "c", "e1"]).error();
    assert_eq!(err["error"], "not_found", "{err}");
    assert_eq!(a.get("c", "nobody"), None);
    assert!(!a.delete("c", "never-seen").is_empty(), "a delete of an unseen entity is a tombstone");
    assert_eq!(a.get("c", "never-seen"), None);
    a.sync(&server.url);
    assert_eq!(a.get("c", "e1"), None);
    // A patch revives a deleted entity with only its own fields.
    a.patch("c", "e1", json!({"z": 1}));
    assert_eq!(a.get("c", "e1"), Some(json!({"z": 1})));

    // list: sorted by id in code-point order, confirmed and pending alike.
    let ids = ["b", "a9", "é", "😀", "～", "B", "a10", "Z", "a", "e"];
    for (i, id) in ids.iter().enumerate() {
        a.put("l", id, json!({"i": i}));
        if i == 4 {
            a.sync(&server.url);
        }
    }
    let mut sorted: Vec<(&str, Value)> = ids.iter().enumerate().map(|(i, id)| (*id, json!({"i": i}))).collect();
    sorted.sort_by(|x, y| x.0.chars().cmp(y.0.chars()));
    let names: Vec<&str> = sorted.iter().map(|x| x.0).collect();
    assert_eq!(names, ["B", "Z", "a", "a10", "a9", "b", "e", "é", "～", "😀"]);
    let expected = listing(&sorted);
    assert_eq!(a.list("l"), expected, "pending and confirmed mixed");
    a.sync(&server.url);
    assert_eq!(a.list("l"), expected, "all confirmed");
    let b = Device::new(dir.path(), "b");
    b.sync(&server.url);
    assert_eq!(b.list("l"), expected, "on another device");
    assert_eq!(a.list("empty"), json!([]));
    assert_eq!(a.run(None, &["list", "bad collection!"]).error()["error"], "invalid_input");
}

store_test!(#[test] fn a_device_far_behind_syncs_across_several_verified_pages);
fn a_device_far_behind_syncs_across_several_verified_pages(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    a.put("bulk", "mine", json!({"v": 0}));
    a.sync(&server.url);
    // B has synced once: far behind afterwards, but not new (a new replica
    // would start from a snapshot; see the end of this test).
    let b = Device::new(dir.path(), "b");
    b.sync(&server.url);
    a.patch("bulk", "mine", json!({"v": 1})); // pending while the log grows past one page

    // 10 500 changes from another device, straight over HTTP (the page limit is 10 000).
    let total = 10_500usize;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let http = common::client();
        let base = common::now_ms() - 200_000;
        for batch in 0..total / 1000 + 1 {
            let changes: Vec<Value> = (batch * 1000..((batch + 1) * 1000).min(total))
                .map(|i| {
                    let h = common::hlc(base + i as u64, 0, "bulk-dev");
                    let entity = format!("e{:03}", i % 300);
                    if i % 11 == 10 {
                        common::delete(&format!("bulk-{i}"), "bulk", &entity, &h)
                    } else {
                        common::upsert(
                            &format!("bulk-{i}"),
                            "bulk",
                            &entity,
                            json!({"i": i, format!("f{}", i % 3): i}),
                            &h,
                        )
                    }
                })
                .collect();
            common::push(&http, &server.url, "bulk-dev", changes).await;
        }
    });

    let r = a.sync(&server.url);
    assert_eq!(r["applied"], 1, "{r}");
    // A's own change got seq total + 2, beyond the first page: the second page
    // (another request) may hand it back like any change, counted as pulled.
    let pulled = r["pulled"].as_u64().unwrap() as usize;
    assert!(pulled == total || pulled == total + 1, "{r}");
    assert_eq!(r["cursor"], total + 2, "{r}");
    assert_eq!(
        (r["verified"].clone(), r["healed"].clone(), r["pending"].clone()),
        (json!(true), json!(false), json!(0))
    );
    assert_eq!(a.get("bulk", "mine"), Some(json!({"v": 1})));
    let r = b.sync(&server.url);
    assert_eq!((r["pulled"].as_u64(), r["bootstrapped"].as_u64()), (Some(total as u64 + 1), Some(0)), "{r}");
    assert_eq!(r["verified"], true, "{r}");

    // A new device finds a log longer than 10,000 changes: it starts from
    // the snapshot (300 bulk entities and A's), pulling nothing after it.
    let c = Device::new(dir.path(), "c");
    let r = c.sync(&server.url);
    assert_eq!((r["bootstrapped"].as_u64(), r["pulled"].as_u64()), (Some(301), Some(0)), "{r}");
    assert_eq!((r["verified"].clone(), r["healed"].clone()), (json!(true), json!(false)), "{r}");
    assert_converged(&[&a, &b, &c], &server.url, None, &[("bulk", None)]);
}

store_test!(#[test] fn numbers_read_the_same_on_every_device_after_sync);
/// Numbers are values, not literals (§3: each is taken as the nearest double):
/// once synced, the device that wrote `1.50` must read what every other device
/// reads, so that `get` and `list` print the same text everywhere.
fn numbers_read_the_same_on_every_device_after_sync(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let b = Device::new(dir.path(), "b");
    let out = a.run(Some(&server.url), &["put", "nums", "x", r#"{"a":1.50,"b":1e2,"c":-0,"d":1.0,"e":0.1}"#]);
    assert!(out.success(), "{out:?}");
    a.sync(&server.url);
    b.sync(&server.url);
    let st_a = a.status();
    let st_b = b.status();
    assert_eq!(st_a["state_digest"], st_b["state_digest"], "the digests (over JCS) agree");
    // The other device reads the server's form.
    let b_get = b.run(None, &["get", "nums", "x"]).stdout;
    assert_eq!(b_get.trim(), r#"{"a":1.5,"b":100,"c":0,"d":1,"e":0.1}"#);
    let a_get = a.run(None, &["get", "nums", "x"]).stdout;
    assert_eq!(a_get, b_get, "the writing device prints its own number literals after the sync");
    assert_eq!(a.run(None, &["list", "nums"]).stdout, b.run(None, &["list", "nums"]).stdout);
}
