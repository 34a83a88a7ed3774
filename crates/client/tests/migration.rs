//! Local databases written by older versions open in this one, migrated in
//! place with nothing lost. `fixtures/v1.db` was written by the deltasync
//! that had schema version 1: two changes synced (cursor 2), then a pending
//! patch of `tasks/t1` and a pending append.

mod common;

use common::{TestServer, open_client};
use deltasync_client::ClientOptions;
use serde_json::json;

fn fixture_copy(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("device.db");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1.db"), &path).unwrap();
    path
}

fn tables(conn: &rusqlite::Connection) -> Vec<String> {
    let mut stmt = conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").unwrap();
    stmt.query_map([], |r| r.get(0)).unwrap().collect::<rusqlite::Result<_>>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_is_migrated_keeping_its_device_and_its_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture_copy(dir.path());
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, 1, "the fixture is not a version 1 database");
        assert!(!tables(&conn).contains(&"journal".to_owned()));
    }

    let client = open_client(&path, ClientOptions::default());
    let stats = client.stats().unwrap();
    assert_eq!(stats.device_id.as_str(), "dev-c3a562aa0959");
    assert_eq!((stats.pending, stats.failed, stats.cursor, stats.journal), (2, 0, 2, 0));
    assert_eq!(stats.state_hash.to_hex(), "6d0c9b00fe64e0e1381bb3a1c3ecd52bd0d82306acbcf81cf90bd37d406754b2");
    assert_eq!(client.get("tasks", "t1").unwrap().unwrap().data, common::obj(json!({"title": "synced", "done": true})));
    assert_eq!(client.get("tasks", "t2").unwrap().unwrap().data, common::obj(json!({"title": "also synced"})));
    let outbox = client.outbox().unwrap();
    assert_eq!(outbox.len(), 2);
    assert!(outbox.iter().all(|e| !e.requeued && e.seq.is_none()));
    drop(client);

    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, 3);
        assert!(tables(&conn).contains(&"journal".to_owned()));
        assert!(tables(&conn).contains(&"staged_entities".to_owned()));
    }
    // Opening again changes nothing.
    let client = open_client(&path, ClientOptions::default());
    assert_eq!(client.stats().unwrap().pending, 2);
    drop(client);

    // It syncs: its server is gone, a new one asks for a reset, and the
    // pending changes go; from now on acknowledged ones are journaled.
    let mut server = TestServer::start().await;
    let client = open_client(&path, ClientOptions { server: Some(server.url.clone()), ..Default::default() });
    let report = client.sync().await.unwrap();
    assert!(report.healed, "{report:?}");
    assert_eq!((report.applied, report.restored, report.pending), (2, 0, 0), "{report:?}");
    assert_eq!(client.stats().unwrap().journal, 2);
    server.stop().await;
}
