//! A replica's first sync: past `first_sync_snapshot_after` changes it starts
//! from the server's snapshot and pulls only what follows; below it, it pulls
//! the log. Either way it ends in the same verified state, keeps the writes
//! made before it, and later syncs pull.

mod common;

use common::{Devices, TestServer, listing, obj};
use deltasync_client::{Client, ClientOptions};
use serde_json::{Map, Value, json};

type Listing = Vec<(String, Map<String, Value>)>;

fn options(url: &str, snapshot_after: u64) -> ClientOptions {
    ClientOptions { server: Some(url.to_owned()), first_sync_snapshot_after: snapshot_after, ..Default::default() }
}

/// A server whose log holds [`write_history`], the devices' directory, and the writer.
async fn server_with_history() -> (TestServer, Devices, Client) {
    let server = TestServer::start().await;
    let devices = Devices::new();
    let writer = devices.open("W", &server.url);
    write_history(&writer).await;
    (server, devices, writer)
}

/// Upserts, updates, deletes and appends in two collections from one device.
async fn write_history(writer: &Client) {
    for i in 0..12 {
        writer.put("tasks", &format!("t{i:02}"), obj(json!({"title": format!("task {i}"), "done": false}))).unwrap();
    }
    for i in (0..12).step_by(3) {
        writer.patch("tasks", &format!("t{i:02}"), obj(json!({"done": true}))).unwrap();
    }
    writer.delete("tasks", "t05").unwrap();
    writer.put("notes", "n1", obj(json!({"body": "hello"}))).unwrap();
    writer.append("notes", "n1", json!({"op": "insert", "at": 0})).unwrap();
    writer.append("notes", "n1", json!({"op": "insert", "at": 1})).unwrap();
    let report = writer.sync().await.unwrap();
    assert!(report.verified, "{report:?}");
}

fn state(client: &Client) -> (Listing, Listing) {
    (listing(client, "tasks"), listing(client, "notes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_log_is_fetched_as_a_snapshot_and_ends_where_pulling_it_would() {
    let (server, devices, writer) = server_with_history().await;
    let head = server.head().await;
    assert!(head > 5, "the history is longer than the threshold used below");

    let snapshot = devices.open_with("S", options(&server.url, 5));
    let first = snapshot.sync().await.unwrap();
    // 12 tasks (one deleted, still an entity) and one note.
    assert_eq!((first.bootstrapped, first.pulled), (13, 0), "{first:?}");
    assert!(first.verified && !first.healed, "a first sync from a snapshot is not a heal: {first:?}");
    assert_eq!(first.cursor, head);

    let pulling = devices.open_with("P", options(&server.url, u64::MAX));
    let pulled = pulling.sync().await.unwrap();
    assert_eq!((pulled.bootstrapped, pulled.pulled), (0, head), "{pulled:?}");
    assert_eq!((first.state_hash, first.state_digest), (pulled.state_hash, pulled.state_digest));
    assert_eq!(state(&snapshot), state(&pulling));
    assert_eq!(state(&snapshot), state(&writer));

    // Later syncs pull what follows, verified from the snapshot's position.
    writer.patch("tasks", "t01", obj(json!({"title": "renamed"}))).unwrap();
    writer.append("notes", "n1", json!({"op": "insert", "at": 2})).unwrap();
    writer.sync().await.unwrap();
    let next = snapshot.sync().await.unwrap();
    assert_eq!((next.bootstrapped, next.pulled), (0, 2), "{next:?}");
    assert!(next.verified, "{next:?}");
    assert_eq!(state(&snapshot), state(&writer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_before_a_first_sync_from_a_snapshot_are_kept_and_pushed() {
    let (server, devices, writer) = server_with_history().await;

    let fresh = devices.open_with("N", options(&server.url, 5));
    fresh.patch("tasks", "t02", obj(json!({"owner": "n"}))).unwrap();
    fresh.put("tasks", "mine", obj(json!({"title": "offline"}))).unwrap();
    let first = fresh.sync().await.unwrap();
    assert_eq!((first.bootstrapped, first.pushed, first.pending), (13, 2, 0), "{first:?}");
    assert!(first.verified, "{first:?}");
    writer.sync().await.unwrap();
    assert_eq!(state(&fresh), state(&writer));
    let t02 = fresh.get("tasks", "t02").unwrap().unwrap();
    assert_eq!((t02.data["owner"].clone(), t02.data["title"].clone()), (json!("n"), json!("task 2")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_no_longer_than_the_threshold_is_pulled() {
    let (server, devices, writer) = server_with_history().await;
    let head = server.head().await;

    let at = devices.open_with("A", options(&server.url, head));
    let report = at.sync().await.unwrap();
    assert_eq!((report.bootstrapped, report.pulled), (0, head), "{report:?}");
    assert_eq!(state(&at), state(&writer));
}
