//! What syncing through a file store costs, counted at the object layer:
//! a sync with nothing new is one read of an absent object; a one-field
//! edit uploads under a kilobyte (issue 16's cost rules).

use deltasync_client::{Client, ClientOptions};
use serde_json::json;

fn open(path: &std::path::Path, store: Option<&str>) -> Client {
    Client::open(path, ClientOptions { store: store.map(str::to_owned), ..Default::default() }).unwrap()
}

fn fields(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_new_is_one_read_and_a_one_field_edit_uploads_under_a_kilobyte() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    std::fs::create_dir(&root).unwrap();
    let url = format!("file://{}", root.display());
    let a = open(&dir.path().join("a.db"), Some(&url));
    let ids: Vec<String> = (0..50).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    for id in &ids {
        a.put("tasks", id, fields(json!({"title": format!("task {id}"), "done": false, "priority": 3}))).unwrap();
    }
    assert_eq!(a.sync().await.unwrap().applied, 50);

    let b_path = dir.path().join("b.db");
    let b = open(&b_path, Some(&url));
    assert_eq!(b.sync().await.unwrap().pulled, 50);

    // Nothing new, same process: one read (the next segment, absent).
    let before = b.file_store_traffic().unwrap();
    let report = b.sync().await.unwrap();
    assert!(report.verified);
    let cost = b.file_store_traffic().unwrap().since(&before);
    assert_eq!((cost.reads, cost.bytes_read, cost.writes, cost.other), (1, 0, 0, 0), "{cost:?}");

    // Nothing new, a new process on the same database (the URL kept in it).
    drop(b);
    let b = open(&b_path, None);
    let report = b.sync().await.unwrap();
    assert!(report.verified);
    let cost = b.file_store_traffic().unwrap();
    assert_eq!((cost.reads, cost.bytes_read, cost.writes, cost.other), (1, 0, 0, 0), "{cost:?}");

    // A one-field edit: one segment and the head hint, under a kilobyte together.
    let before = a.file_store_traffic().unwrap();
    a.patch("tasks", &ids[7], fields(json!({"done": true}))).unwrap();
    let report = a.sync().await.unwrap();
    assert_eq!(report.applied, 1);
    let cost = a.file_store_traffic().unwrap().since(&before);
    eprintln!("one-field edit: {cost:?}");
    assert_eq!(cost.writes, 2, "a segment and meta.json: {cost:?}");
    assert!(cost.bytes_written <= 1024, "a one-field edit uploaded {} bytes: {cost:?}", cost.bytes_written);

    // And the other device gets it.
    b.sync().await.unwrap();
    assert_eq!(b.get("tasks", &ids[7]).unwrap().unwrap().data["done"], json!(true));
}
