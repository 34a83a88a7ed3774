//! `deltasync admin` against real servers: two users push from several
//! devices (one change loses to a newer one, which records a conflict), then
//! every report is read by the built binary, as JSON and as a table, and its
//! errors are checked, on SQLite and (with `DELTASYNC_TEST_POSTGRES`) PostgreSQL.

mod common;

use std::process::ExitStatus;

use common::*;
use serde_json::{Value, json};

const SECRET: &str = "admin-secret";

/// POSTs a push as `user` (a JWT server), asserting 200.
async fn push_as(c: &reqwest::Client, url: &str, user: &str, device: &str, changes: Vec<Value>) -> Value {
    let r = c
        .post(format!("{url}/v1/push"))
        .bearer_auth(token_for(SECRET, user))
        .json(&json!({"device_id": device, "changes": changes}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.json().await.unwrap()
}

/// Runs `deltasync admin ARGS --database DB`: (status, stdout, stderr).
fn admin(database: &str, args: &[&str]) -> (ExitStatus, String, String) {
    let mut all = vec!["admin"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--database", database]);
    run_cli(&all)
}

/// Runs a report that must succeed and answers its JSON document.
fn report(database: &str, args: &[&str]) -> Value {
    let (status, out, err) = admin(database, args);
    assert!(status.success(), "admin {args:?} failed: {err}");
    assert_eq!(out.lines().count(), 1, "one JSON document on one line: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("admin {args:?} printed non-JSON ({e}): {out}"))
}

/// Runs a report that must fail and answers its stderr.
fn refused(database: &str, args: &[&str]) -> String {
    let (status, out, err) = admin(database, args);
    assert!(!status.success(), "admin {args:?} succeeded: {out}");
    assert!(out.is_empty(), "nothing on stdout when refused: {out}");
    err
}

fn seqs(history: &Value) -> Vec<u64> {
    history["changes"].as_array().unwrap().iter().map(|c| c["seq"].as_u64().unwrap()).collect()
}

/// Alice: phone writes tasks/t1, tasks/t2, notes/n1; the laptop writes
/// tasks/t1 with an older clock (superseded: a conflict record); the phone
/// deletes tasks/t2 and pulls everything. Bob: the tablet writes two notes.
async fn populate(url: &str) {
    let c = client();
    let t = now_ms() - 60_000;
    push_as(
        &c,
        url,
        "alice",
        "phone",
        vec![
            upsert("a1", "tasks", "t1", json!({"title": "buy milk"}), &hlc(t + 10, 0, "phone")),
            upsert("a2", "tasks", "t2", json!({"title": "call mom", "done": false}), &hlc(t + 11, 0, "phone")),
            upsert("a3", "notes", "n1", json!({"text": "hello"}), &hlc(t + 12, 0, "phone")),
        ],
    )
    .await;
    let lost = push_as(
        &c,
        url,
        "alice",
        "laptop",
        vec![upsert("a4", "tasks", "t1", json!({"title": "buy bread"}), &hlc(t + 5, 0, "laptop"))],
    )
    .await;
    assert_eq!(lost["results"][0]["conflict"]["reason"], "superseded", "{lost}");
    push_as(&c, url, "alice", "phone", vec![delete("a5", "tasks", "t2", &hlc(t + 20, 0, "phone"))]).await;
    let pulled = c
        .get(format!("{url}/v1/pull?device_id=phone&cursor=0"))
        .bearer_auth(token_for(SECRET, "alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(pulled.status().as_u16(), 200);
    push_as(
        &c,
        url,
        "bob",
        "tablet",
        vec![
            upsert("b1", "notes", "b1", json!({"text": "bob's"}), &hlc(t + 30, 0, "tablet")),
            upsert("b2", "notes", "b2", json!({"text": "second"}), &hlc(t + 31, 0, "tablet")),
        ],
    )
    .await;
}

store_test!(#[tokio::test] async fn admin_reports_what_the_database_holds);
async fn admin_reports_what_the_database_holds(backend: &Backend) {
    let server = Server::start_with(backend, Options { jwt_secret: Some(SECRET.into()), ..Options::default() });
    populate(&server.url).await;
    let db = server.database.as_str();

    // users: both, with their counts.
    let users = report(db, &["users"]);
    let users = users["users"].as_array().unwrap();
    let ids: Vec<&str> = users.iter().map(|u| u["user_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["alice", "bob"]);
    let (alice, bob) = (&users[0], &users[1]);
    assert_eq!(
        (&alice["head"], &alice["changes"], &alice["entities"], &alice["devices"], &alice["conflicts"]),
        (&json!(5), &json!(5), &json!(2), &json!(2), &json!(1)),
        "{alice}"
    );
    assert_eq!(
        (&bob["head"], &bob["entities"], &bob["devices"], &bob["conflicts"]),
        (&json!(2), &json!(2), &json!(1), &json!(0))
    );
    let active = alice["last_activity"].as_u64().unwrap();
    assert!(active.abs_diff(now_ms()) < 600_000, "last activity {active} is about now");

    // devices: the phone pulled everything, the laptop never pulled.
    let devices = report(db, &["devices", "--user", "alice"]);
    assert_eq!((&devices["head"], &devices["horizon"]), (&json!(5), &json!(0)));
    let d: Vec<(&str, u64, u64)> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["device_id"].as_str().unwrap(), d["cursor"].as_u64().unwrap(), d["behind"].as_u64().unwrap()))
        .collect();
    assert_eq!(d, [("laptop", 0, 5), ("phone", 5, 0)]);
    assert!(devices["devices"][0]["last_seen"].as_u64().unwrap() > 0);

    // history: newest first, one entity, a limit.
    let history = report(db, &["history", "--user", "alice"]);
    assert_eq!(seqs(&history), [5, 4, 3, 2, 1]);
    let newest = &history["changes"][0];
    assert_eq!(
        (&newest["change_id"], &newest["device_id"], &newest["op"]),
        (&json!("a5"), &json!("phone"), &json!("delete"))
    );
    assert!(newest["data"].is_null(), "{newest}");
    let lost = &history["changes"][1];
    assert_eq!(
        (&lost["collection"], &lost["entity_id"], &lost["data"]),
        (&json!("tasks"), &json!("t1"), &json!({"title": "buy bread"}))
    );
    assert!(lost["hlc"].as_str().unwrap().ends_with("-laptop"));
    assert!(lost["server_time"].as_u64().unwrap() > 0);
    let t1 = report(db, &["history", "--user", "alice", "--entity", "tasks/t1"]);
    assert_eq!(seqs(&t1), [4, 1]);
    assert_eq!(t1["entity"], "tasks/t1");
    assert_eq!(seqs(&report(db, &["history", "--user", "alice", "--limit", "2"])), [5, 4]);
    assert_eq!(seqs(&report(db, &["history", "--user", "alice", "--entity", "tasks/none"])), Vec::<u64>::new());
    assert_eq!(seqs(&report(db, &["history", "--user", "bob"])), [2, 1]);

    // conflicts: the laptop's lost write.
    let conflicts = report(db, &["conflicts", "--user", "alice"]);
    assert_eq!(conflicts["total"], 1);
    let record = &conflicts["conflicts"][0];
    assert_eq!(
        (&record["change_id"], &record["device_id"], &record["reason"]),
        (&json!("a4"), &json!("laptop"), &json!("superseded"))
    );
    assert_eq!(record["fields"], json!(["title"]));
    assert_eq!(report(db, &["conflicts", "--user", "bob"])["conflicts"], json!([]));

    // volume: the changes of each UTC day (of their server_time), with the bytes of their data.
    let volume = report(db, &["volume", "--user", "alice", "--by", "day"]);
    let mut expected: Vec<(String, u64, usize)> = Vec::new();
    for c in history["changes"].as_array().unwrap().iter().rev() {
        let date = utc_date(c["server_time"].as_u64().unwrap() / 86_400_000);
        let bytes = if c["data"].is_null() { 0 } else { serde_json::to_string(&c["data"]).unwrap().len() };
        match expected.last_mut() {
            Some(day) if day.0 == date => (day.1, day.2) = (day.1 + 1, day.2 + bytes),
            _ => expected.push((date, 1, bytes)),
        }
    }
    let days: Vec<(String, u64, usize)> = volume["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let n = |k: &str| d[k].as_u64().unwrap();
            (d["date"].as_str().unwrap().to_owned(), n("changes"), n("bytes") as usize)
        })
        .collect();
    assert_eq!(days, expected, "{volume}");
    assert_eq!(days.iter().map(|d| d.1).sum::<u64>(), 5);
    let expected_date = days[0].0.clone();

    // stats: totals and horizons.
    let stats = report(db, &["stats"]);
    let store = if backend.is_postgres() { "postgres" } else { "sqlite" };
    assert_eq!(stats["store"], store);
    assert_eq!(
        [
            &stats["users"],
            &stats["changes"],
            &stats["entities"],
            &stats["tombstones"],
            &stats["devices"],
            &stats["conflicts"]
        ],
        [&json!(2), &json!(7), &json!(4), &json!(1), &json!(3), &json!(1)],
        "{stats}"
    );
    assert!(stats["database_bytes"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(
        stats["datasets"],
        json!([{"user_id": "alice", "head": 5, "horizon": 0}, {"user_id": "bob", "head": 2, "horizon": 0}])
    );

    // --format table: the rows are there, aligned under headers.
    let (status, table, err) = admin(db, &["users", "--format", "table"]);
    assert!(status.success(), "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("USER") && lines[0].contains("LAST ACTIVITY"), "{table}");
    assert!(lines[2].starts_with("alice") && lines[3].starts_with("bob"), "{table}");
    let (status, table, err) = admin(db, &["history", "--user", "alice", "--format", "table"]);
    assert!(status.success(), "{err}");
    for id in ["a1", "a2", "a3", "a4", "a5"] {
        assert!(table.lines().any(|l| l.split_whitespace().any(|w| w == id)), "{id} missing:\n{table}");
    }
    assert!(table.contains("{\"title\":\"buy bread\"}"), "{table}");
    for args in [
        &["devices", "--user", "alice"][..],
        &["conflicts", "--user", "alice"][..],
        &["volume", "--user", "alice"][..],
        &["stats"][..],
    ] {
        let (status, table, err) = admin(db, &[args, &["--format", "table"][..]].concat());
        assert!(status.success(), "{args:?}: {err}");
        let expect = match args[0] {
            "devices" => "laptop",
            "conflicts" => "superseded",
            "volume" => expected_date.as_str(),
            _ => "tombstones",
        };
        assert!(table.contains(expect), "{args:?} table lacks {expect}:\n{table}");
    }

    // The database from the environment, as for `compact`.
    let out =
        std::process::Command::new(binary()).args(["admin", "stats"]).env("DELTASYNC_DATABASE", db).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap()["changes"], 7);

    // Errors: a clear message and a non-zero exit.
    let unknown = refused(db, &["devices", "--user", "carol"]);
    assert!(unknown.contains("no user \"carol\"") && unknown.contains("admin users"), "{unknown}");
    for report in ["history", "conflicts", "volume"] {
        assert!(refused(db, &[report, "--user", "carol"]).contains("no user \"carol\""), "{report}");
    }
    let by = refused(db, &["volume", "--user", "alice", "--by", "week"]);
    assert!(by.contains("'week'") && by.contains("possible values: day"), "{by}");
    let entity = refused(db, &["history", "--user", "alice", "--entity", "tasks"]);
    assert!(entity.contains("COLLECTION/ENTITY_ID"), "{entity}");
    let entity = refused(db, &["history", "--user", "alice", "--entity", "bad name/t1"]);
    assert!(entity.contains("collection may only contain"), "{entity}");
    let limit = refused(db, &["history", "--user", "alice", "--limit", "0"]);
    assert!(limit.contains("--limit"), "{limit}");
    let format = refused(db, &["stats", "--format", "xml"]);
    assert!(format.contains("possible values: json, table"), "{format}");

    // The same once the server has stopped (on SQLite, without its WAL file).
    let mut server = server;
    assert!(server.terminate().success());
    let mut again = report(&server.database, &["stats"]);
    again["database_bytes"] = stats["database_bytes"].clone();
    assert_eq!(again, stats, "a stopped server's database reads the same");
}

/// The UTC date of `day` days after the epoch, computed by `date(1)`.
fn utc_date(day: u64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{}", day * 86_400), "+%Y-%m-%d"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

store_test!(#[test] fn admin_refuses_a_schema_it_does_not_read);
fn admin_refuses_a_schema_it_does_not_read(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (db, _schema) = backend.fresh_database(dir.path());
    if let Some(path) = db.strip_prefix("sqlite://") {
        let missing = refused(&db, &["users"]);
        assert!(missing.contains("no SQLite database at"), "{missing}");
        assert!(!std::path::Path::new(path).exists(), "admin created no file");
        std::fs::write(path, b"").unwrap();
    }
    let empty = refused(&db, &["stats"]);
    assert!(empty.contains("no deltasync schema"), "{empty}");
    let (status, _, err) = run_cli(&["migrate", "--database", &db]);
    assert!(status.success(), "{err}");
    let stats = report(&db, &["stats"]);
    assert_eq!((&stats["users"], &stats["changes"], &stats["datasets"]), (&json!(0), &json!(0), &json!([])));
    assert_eq!(report(&db, &["users"]), json!({"users": []}));

    let set_version = |v: i64| match backend {
        Backend::Sqlite => {
            let path = db.strip_prefix("sqlite://").unwrap();
            rusqlite::Connection::open(path).unwrap().execute("UPDATE schema_version SET version = ?1", [v]).unwrap();
        }
        Backend::Postgres { .. } => pg_execute(&db, format!("UPDATE schema_version SET version = {v}")).unwrap(),
    };
    let known = stats["schema_version"].as_i64().unwrap();
    set_version(known + 1);
    let newer = refused(&db, &["users"]);
    assert!(newer.contains(&format!("version {}, newer than this deltasync", known + 1)), "{newer}");
    set_version(known - 1);
    let older = refused(&db, &["users"]);
    assert!(older.contains("older than this deltasync") && older.contains("deltasync migrate"), "{older}");
    assert!(refused(&db, &["users"]).contains(&format!("version {}", known - 1)), "admin did not migrate");
}
