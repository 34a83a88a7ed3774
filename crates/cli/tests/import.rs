//! Importing full-state snapshots, end to end on both stores: `deltasync
//! import` into a fresh database that `deltasync serve` then serves (devices
//! sync it verified), beside a running server, a second run that imports
//! nothing, bad lines that import nothing, and an unknown format. And the
//! client side: `deltasync client import SNAPSHOT` puts the entities in the
//! outbox once, and a sync pushes them.

mod common;

use std::path::Path;

use common::devices::Device;
use common::*;
use serde_json::{Value, json};

/// `{"tasks": {t0..t(n-1)}}` as one document spread over lines, as people write it.
fn document(n: usize) -> String {
    let tasks: serde_json::Map<String, Value> =
        (0..n).map(|i| (format!("t{i}"), json!({"title": format!("task {i}"), "n": i}))).collect();
    serde_json::to_string_pretty(&json!({ "tasks": tasks })).unwrap()
}

/// `n` NDJSON snapshot lines of collection `notes`, with a blank line in the middle.
fn lines(n: usize) -> String {
    let mut text = String::new();
    for i in 0..n {
        if i == n / 2 {
            text.push('\n');
        }
        let line = json!({"collection": "notes", "entity_id": format!("n{i}"), "data": {"text": format!("note {i}")}});
        text.push_str(&format!("{line}\n"));
    }
    text
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Runs `deltasync import` of `file` into `database` for user `local`:
/// (success, stdout as JSON or `null`, stderr).
fn import(database: &str, file: &str) -> (bool, Value, String) {
    import_with(database, file, &[])
}

/// [`import`] with more flags.
fn import_with(database: &str, file: &str, flags: &[&str]) -> (bool, Value, String) {
    let mut args = vec!["import", "--database", database, "--user", "local", "--device", "importer", file];
    args.extend_from_slice(flags);
    let (status, stdout, stderr) = run_cli(&args);
    let summary = if status.success() {
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("import printed non-JSON ({e}): {stdout}"))
    } else {
        assert!(stdout.trim().is_empty(), "a failed import printed on stdout: {stdout}");
        Value::Null
    };
    (status.success(), summary, stderr)
}

/// The counts of a summary, without its timings.
fn counts(summary: &Value) -> Value {
    json!({
        "entities": summary["entities"],
        "imported": summary["imported"],
        "duplicates": summary["duplicates"],
        "rejected": summary["rejected"],
    })
}

async fn head(url: &str) -> u64 {
    let (s, body) = get(&client(), url, "/v1/status").await;
    assert_eq!(s, 200, "{body}");
    body["head"].as_u64().unwrap()
}

store_test!(#[tokio::test] async fn both_formats_import_into_a_fresh_database_that_serve_then_serves);
async fn both_formats_import_into_a_fresh_database_that_serve_then_serves(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (database, _schema) = backend.fresh_database(dir.path());
    let doc = write(dir.path(), "snapshot.json", &document(1_500));
    let ndjson = write(dir.path(), "snapshot.ndjson", &lines(700));

    let (ok, summary, stderr) = import(&database, &doc);
    assert!(ok, "{stderr}");
    assert_eq!(counts(&summary), json!({"entities": 1_500, "imported": 1_500, "duplicates": 0, "rejected": 0}));
    assert!(summary["elapsed_ms"].is_u64() && summary["rate_per_sec"].is_u64(), "{summary}");
    let (ok, summary, stderr) = import(&database, &ndjson);
    assert!(ok, "{stderr}");
    assert_eq!(counts(&summary), json!({"entities": 700, "imported": 700, "duplicates": 0, "rejected": 0}));

    // The importing device stands at the head: it never holds compaction back.
    let (status, stdout, stderr) = run_cli(&["admin", "devices", "--database", &database, "--user", "local"]);
    assert!(status.success(), "{stderr}");
    let devices: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(devices["devices"][0]["device_id"], "importer", "{devices}");
    assert_eq!((&devices["devices"][0]["cursor"], &devices["devices"][0]["behind"]), (&json!(2_200), &json!(0)));

    let server = Server::start_with(backend, Options { database: Some(database.clone()), ..Default::default() });
    assert_eq!(head(&server.url).await, 2_200);
    let a = Device::new(dir.path(), "a");
    let report = a.sync(&server.url);
    assert_eq!(report["verified"], true, "{report}");
    assert_eq!(a.list("tasks").as_array().unwrap().len(), 1_500);
    assert_eq!(a.get("tasks", "t7"), Some(json!({"title": "task 7", "n": 7})));
    assert_eq!(a.get("notes", "n699"), Some(json!({"text": "note 699"})));

    // A second run, with the server running: every change is a duplicate, nothing moves.
    for file in [&doc, &ndjson] {
        let (ok, summary, stderr) = import(&database, file);
        assert!(ok, "{stderr}");
        let n = summary["entities"].as_u64().unwrap();
        assert_eq!(counts(&summary), json!({"entities": n, "imported": 0, "duplicates": n, "rejected": 0}));
        assert!(stderr.contains("nothing imported"), "{stderr}");
    }
    assert_eq!(head(&server.url).await, 2_200);

    // The chain goes on: a device's edit after the import, and a new device, both verify.
    a.patch("tasks", "t7", json!({"done": true}));
    assert_eq!(a.sync(&server.url)["verified"], true);
    let b = Device::new(dir.path(), "b");
    assert_eq!(b.sync(&server.url)["verified"], true);
    assert_eq!(b.get("tasks", "t7"), Some(json!({"title": "task 7", "n": 7, "done": true})));
    assert_eq!(a.status()["state_digest"], b.status()["state_digest"]);
}

store_test!(#[tokio::test] async fn an_import_beside_a_running_server_keeps_the_chain);
async fn an_import_beside_a_running_server_keeps_the_chain(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    a.put("notes", "n1", json!({"text": "written before", "by": "a"}));
    a.put("notes", "mine", json!({"text": "only a"}));
    assert_eq!(a.sync(&server.url)["verified"], true);

    // n1 is in the snapshot too: the import is one more upsert of its fields.
    let (ok, summary, stderr) = import(&server.database, &write(dir.path(), "s.ndjson", &lines(300)));
    assert!(ok, "{stderr}");
    assert_eq!(summary["imported"], 300, "{summary}");
    a.put("notes", "after", json!({"text": "written after"}));
    let report = a.sync(&server.url);
    assert_eq!(report["verified"], true, "{report}");
    assert_eq!(head(&server.url).await, 2 + 300 + 1);
    assert_eq!(a.get("notes", "n1"), Some(json!({"text": "note 1", "by": "a"})));

    let b = Device::new(dir.path(), "b");
    assert_eq!(b.sync(&server.url)["verified"], true);
    assert_eq!(b.list("notes").as_array().unwrap().len(), 300 + 2);
    assert_eq!(a.status()["state_digest"], b.status()["state_digest"]);
}

store_test!(#[tokio::test] async fn the_reject_policy_holds_for_an_import);
async fn the_reject_policy_holds_for_an_import(backend: &Backend) {
    let config = "[collections.notes]\npolicy = \"reject\"\n";
    let server = Server::start_with(backend, Options { config: Some(config.into()), ..Default::default() });
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    a.put("notes", "n1", json!({"text": "a's own"}));
    assert_eq!(a.sync(&server.url)["verified"], true);
    let config_file = write(dir.path(), "server.toml", config);

    // n1 exists: refused under `reject`; the 9 others are created.
    let file = write(dir.path(), "s.ndjson", &lines(10));
    let (ok, summary, stderr) = import_with(&server.database, &file, &["--config", &config_file]);
    assert!(ok, "{stderr}");
    assert_eq!(counts(&summary), json!({"entities": 10, "imported": 9, "duplicates": 0, "rejected": 1}));
    assert!(stderr.contains("1 entities were rejected"), "{stderr}");
    assert_eq!(head(&server.url).await, 1 + 9);
    assert_eq!(a.sync(&server.url)["verified"], true);
    assert_eq!(a.get("notes", "n1"), Some(json!({"text": "a's own"})));
    assert_eq!(a.get("notes", "n2"), Some(json!({"text": "note 2"})));
}

store_test!(#[tokio::test] async fn a_bad_line_is_named_and_nothing_is_imported);
async fn a_bad_line_is_named_and_nothing_is_imported(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let good = lines(3_000);
    let mut all: Vec<&str> = good.lines().collect();
    // Line 2,500 (well past the first batch of 1,000) has an array for data.
    let bad = json!({"collection": "notes", "entity_id": "x", "data": [1, 2]}).to_string();
    all[2_499] = &bad;
    let (ok, _, stderr) = import(&server.database, &write(dir.path(), "bad.ndjson", &all.join("\n")));
    assert!(!ok);
    assert!(stderr.contains("line 2500:") && stderr.contains("must be a JSON object"), "{stderr}");
    assert!(stderr.contains("nothing was imported"), "{stderr}");

    // An entity given twice, a bad collection name: named by line too.
    let twice = format!("{}{}", lines(2), lines(2).lines().next().unwrap());
    let (ok, _, stderr) = import(&server.database, &write(dir.path(), "twice.ndjson", &twice));
    assert!(!ok && stderr.contains("line 4:") && stderr.contains("already given on line 1"), "{stderr}");
    let name = json!({"collection": "no spaces", "entity_id": "x", "data": {}}).to_string();
    let (ok, _, stderr) = import(&server.database, &write(dir.path(), "name.ndjson", &format!("{}{name}\n", lines(1))));
    assert!(!ok && stderr.contains("line 3:") && stderr.contains("collection"), "{stderr}");
    // A document: broken JSON is named by line, a bad entity by its name.
    let broken = document(3).replace("\"task 2\"", "\"task 2\",,");
    let (ok, _, stderr) = import(&server.database, &write(dir.path(), "broken.json", &broken));
    let line = broken.lines().position(|l| l.contains(",,")).unwrap() + 1;
    assert!(!ok && stderr.contains(&format!("line {line}:")), "{stderr}");
    let (ok, _, stderr) =
        import(&server.database, &write(dir.path(), "entity.json", r#"{"tasks": {"a": {}, "b": 7}}"#));
    assert!(!ok && stderr.contains("entity \"b\" of collection \"tasks\""), "{stderr}");

    assert_eq!(head(&server.url).await, 0, "nothing was imported");
}

store_test!(#[test] fn an_unknown_format_is_refused_clearly);
fn an_unknown_format_is_refused_clearly(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (database, _schema) = backend.fresh_database(dir.path());
    let (ok, _, stderr) = import(&database, &write(dir.path(), "a.csv", "collection,entity_id\ntasks,a\n"));
    assert!(
        !ok && stderr.contains("no known format") && stderr.contains("{collection: {entity_id: data}}"),
        "{stderr}"
    );
    let writes = json!({"op": "put", "collection": "tasks", "id": "a", "data": {}}).to_string();
    let (ok, _, stderr) = import(&database, &write(dir.path(), "w.ndjson", &writes));
    assert!(!ok && stderr.contains("deltasync client import"), "{stderr}");
    let two = "{\"tasks\": {}}\n{\"notes\": {}}\n";
    let (ok, _, stderr) = import(&database, &write(dir.path(), "two.json", two));
    assert!(!ok && stderr.contains("line 1:") && stderr.contains("entity_id"), "{stderr}");
    let (ok, _, stderr) = import(&database, &write(dir.path(), "empty.json", "\n"));
    assert!(!ok && stderr.contains("empty"), "{stderr}");
    let (ok, _, stderr) = import(&database, dir.path().join("missing.json").to_str().unwrap());
    assert!(!ok && stderr.contains("cannot read"), "{stderr}");
    let (status, _, stderr) =
        run_cli(&["import", "--database", &database, "--user", "local", "--device", "bad device", "x.json"]);
    assert!(!status.success() && stderr.contains("--device"), "{stderr}");
}

store_test!(#[test] fn a_client_import_fills_the_outbox_once_and_sync_pushes_it);
fn a_client_import_fills_the_outbox_once_and_sync_pushes_it(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Device::new(dir.path(), "a"), Device::new(dir.path(), "b"));
    let doc = write(dir.path(), "snapshot.json", &document(1_200));
    let ndjson = write(dir.path(), "snapshot.ndjson", &lines(50));

    let out = a.run(None, &["import", "--batch", "500", &doc]);
    assert!(out.success(), "{out:?}");
    assert_eq!(out.json(), json!({"entities": 1_200, "written": 1_200, "unchanged": 0}));
    assert_eq!(a.ok(&["import", &ndjson]), json!({"entities": 50, "written": 50, "unchanged": 0}));
    assert_eq!(a.status()["pending"], 1_250);

    // Again: the local data holds every entity already, nothing is written.
    for (file, n) in [(&doc, 1_200), (&ndjson, 50)] {
        let out = a.run(None, &["import", file]);
        assert!(out.success(), "{out:?}");
        assert_eq!(out.json(), json!({"entities": n, "written": 0, "unchanged": n}));
        assert!(out.stderr.contains("nothing imported"), "{out:?}");
    }
    assert_eq!(a.status()["pending"], 1_250);

    // A bad line: named, nothing written.
    let bad = format!("{}{}\n", lines(3), json!({"collection": "notes", "entity_id": "z", "data": null}));
    let err = a.run(None, &["import", &write(dir.path(), "bad.ndjson", &bad)]).error();
    let message = err["message"].as_str().unwrap();
    assert!(message.contains("line 5:") && message.contains("nothing was imported"), "{message}");
    assert_eq!(a.status()["pending"], 1_250);

    let report = a.sync(&server.url);
    assert_eq!((report["pushed"].as_u64(), &report["verified"]), (Some(1_250), &json!(true)), "{report}");
    assert_eq!(a.status()["pending"], 0);
    // After the sync the snapshot is the confirmed state: a re-import still writes nothing.
    assert_eq!(a.ok(&["import", &doc])["written"], 0);
    assert_eq!(b.sync(&server.url)["verified"], true);
    assert_eq!(b.list("tasks").as_array().unwrap().len(), 1_200);
    assert_eq!(b.get("notes", "n3"), Some(json!({"text": "note 3"})));
}
