//! A server restored from a backup loses nothing that a device still holds:
//! every device notices the restore, heals, and sends again its own changes
//! that the server had acknowledged after the backup, under their original
//! change ids; the sync report counts them as `restored`.
//!
//! The backup is the real thing: on SQLite, the database files copied after a
//! clean stop (SIGTERM); on PostgreSQL, `pg_dump` of the server's schema, and
//! `psql` to restore it.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::devices::*;
use common::{Backend, Server};
use serde_json::{Value, json};

/// A copy of a stopped server's data.
enum Backup {
    /// The SQLite files (database and WAL, when there is one).
    Sqlite(tempfile::TempDir),
    /// A `pg_dump` of the schema.
    Postgres { dump: tempfile::NamedTempFile, schema: String, base_url: String },
}

/// The PostgreSQL schema a server's `--database` URL selects.
fn schema_of(database: &str) -> String {
    database.split("search_path%3D").nth(1).expect("a search_path in the database URL").to_owned()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn sqlite_files(db: &Path) -> [(PathBuf, &'static str); 2] {
    [(db.to_owned(), "server.db"), (PathBuf::from(format!("{}-wal", db.display())), "server.db-wal")]
}

/// Stops the server cleanly, backs its data up, and starts it again.
fn back_up(server: &mut Server, backend: &Backend) -> Backup {
    assert!(server.terminate().success(), "the server did not stop cleanly");
    let backup = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            for (file, name) in sqlite_files(&server.sqlite_file().unwrap()) {
                if file.exists() {
                    std::fs::copy(&file, dir.path().join(name)).unwrap();
                }
            }
            Backup::Sqlite(dir)
        }
        Backend::Postgres { base_url } => {
            let dump = tempfile::NamedTempFile::new().unwrap();
            let schema = schema_of(&server.database);
            run(Command::new("pg_dump")
                .args(["--schema", &schema, "--no-owner", "--file"])
                .arg(dump.path())
                .arg(base_url));
            Backup::Postgres { dump, schema, base_url: base_url.clone() }
        }
    };
    server.restart();
    backup
}

/// Stops the server cleanly, puts the backup in place of its data, and starts it again.
fn restore(server: &mut Server, backup: &Backup) {
    assert!(server.terminate().success(), "the server did not stop cleanly");
    match backup {
        Backup::Sqlite(dir) => {
            let db = server.sqlite_file().unwrap();
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
            }
            for (file, name) in sqlite_files(&db) {
                if dir.path().join(name).exists() {
                    std::fs::copy(dir.path().join(name), file).unwrap();
                }
            }
        }
        Backup::Postgres { dump, schema, base_url } => {
            run(Command::new("psql")
                .args(["--quiet", "--set", "ON_ERROR_STOP=1", "--command"])
                .arg(format!("DROP SCHEMA {schema} CASCADE"))
                .arg(base_url));
            run(Command::new("psql")
                .args(["--quiet", "--set", "ON_ERROR_STOP=1", "--file"])
                .arg(dump.path())
                .arg(base_url));
        }
    }
    server.restart();
}

fn change_id(v: Value) -> String {
    v.as_str().unwrap_or_else(|| panic!("expected a change id, got {v}")).to_owned()
}

store_test!(#[test] fn a_server_restored_from_a_backup_gets_back_every_change_a_device_still_holds);
fn a_server_restored_from_a_backup_gets_back_every_change_a_device_still_holds(backend: &Backend) {
    let mut server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let devices: Vec<Device> = ["a", "b", "c"].iter().map(|n| Device::new(dir.path(), n)).collect();
    // `late` syncs only before the backup, and writes offline after it.
    let late = Device::new(dir.path(), "late");
    let mut made: Vec<String> = Vec::new();

    // Before the backup: every device writes, and everyone pulls everything.
    for d in devices.iter().chain([&late]) {
        made.push(change_id(d.put("tasks", &format!("{}-1", d.name), json!({"by": d.name, "n": 1}))));
        d.sync(&server.url);
    }
    for d in devices.iter().chain([&late]) {
        d.sync(&server.url);
    }
    let backup = back_up(&mut server, backend);

    // After the backup: each device makes a different number of changes
    // (upserts, a delete, an append), all acknowledged, and pulls everything.
    let mut after: HashMap<String, usize> = HashMap::new();
    for (i, d) in devices.iter().enumerate() {
        tick();
        let mut mine = vec![change_id(d.patch("tasks", &format!("{}-1", d.name), json!({"n": 2})))];
        for k in 0..i {
            mine.push(change_id(d.put("tasks", &format!("{}-new{k}", d.name), json!({"by": d.name, "k": k}))));
        }
        if i == 2 {
            mine.push(d.delete("tasks", "a-1"));
            mine.push(change_id(d.ok(&["append", "log", "l1", r#"{"op":"opaque"}"#])));
        }
        let r = d.sync(&server.url);
        assert_eq!(r["applied"], mine.len(), "{}: {r}", d.name);
        after.insert(d.name.clone(), mine.len());
        made.extend(mine);
    }
    for d in &devices {
        d.sync(&server.url);
    }
    tick();
    made.push(change_id(late.patch("tasks", "late-1", json!({"offline": true}))));
    let head_before_restore = server_status(&server.url, None)["head"].as_u64().unwrap();

    restore(&mut server, &backup);
    let restored_head = server_status(&server.url, None)["head"].as_u64().unwrap();
    assert!(restored_head < head_before_restore, "the restore did not go back: {restored_head}");

    // Every device that synced after the backup heals and gives back exactly
    // its own changes acknowledged after it; nothing is reported lost.
    for d in &devices {
        let r = d.sync(&server.url);
        assert_eq!(r["healed"], true, "{}: {r}", d.name);
        assert_eq!(r["restored"], after[&d.name], "{}: {r}", d.name);
        assert_eq!(r["applied"], after[&d.name], "{}: {r}", d.name);
        assert_eq!(r["lost"], json!([]), "{}: {r}", d.name);
        assert_eq!(r["pending"], 0, "{}: {r}", d.name);
    }
    // A device whose state is older than the backup needs no heal; its offline
    // change is an ordinary push, not a restored one.
    let r = late.sync(&server.url);
    assert_eq!((r["healed"].clone(), r["restored"].clone(), r["applied"].clone()), (json!(false), json!(0), json!(1)));

    // Everyone converges, verified, and the log holds every change ever made exactly once.
    for d in devices.iter().chain([&late]) {
        let r = d.sync(&server.url);
        assert_eq!((r["verified"].clone(), r["healed"].clone()), (json!(true), json!(false)), "{}: {r}", d.name);
    }
    let all: Vec<&Device> = devices.iter().chain([&late]).collect();
    assert_converged(&all, &server.url, None, &[("tasks", None)]);
    let digests: Vec<Value> = all.iter().map(|d| d.status()["state_digest"].clone()).collect();
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    let mut counts: HashMap<String, usize> = HashMap::new();
    for c in server_log(&server.url, None) {
        *counts.entry(c["change_id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    for id in &made {
        assert_eq!(counts.get(id), Some(&1), "change {id} is not in the log exactly once: {counts:?}");
    }
    assert_eq!(counts.len(), made.len(), "the log holds changes nobody made: {counts:?}");
    // The edits made after the backup are in the state again.
    assert_eq!(devices[0].get("tasks", "b-new0"), Some(json!({"by": "b", "k": 0})));
    assert_eq!(devices[0].get("tasks", "a-1"), None, "c's delete was restored");
    assert_eq!(devices[1].get("tasks", "c-1"), Some(json!({"by": "c", "n": 2})));
}
