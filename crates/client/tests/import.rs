//! `Client::import`: snapshot entries go into the outbox once (a second
//! import writes nothing, also after the sync), and a sync pushes them so that
//! the server and another device hold the same state.

mod common;

use common::{Devices, TestServer, listing};
use deltasync_protocol::ChangeLimits;
use deltasync_protocol::snapshot;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_fills_the_outbox_once_and_a_sync_pushes_it() {
    let server = TestServer::start().await;
    let devices = Devices::new();
    let (a, b) = (devices.open("a", &server.url), devices.open("b", &server.url));
    let text: String = (0..300)
        .map(|i| json!({"collection": "tasks", "entity_id": format!("t{i}"), "data": {"n": i}}).to_string() + "\n")
        .collect();
    let entries = snapshot::parse(&text, &ChangeLimits::default()).unwrap();

    let done = a.import(entries.clone()).unwrap();
    assert_eq!((done.written, done.unchanged), (300, 0));
    assert_eq!(a.outbox().unwrap().len(), 300);
    // An entity the app changed since is written again, with the snapshot's fields only.
    a.patch("tasks", "t5", common::obj(json!({"n": 55, "extra": true}))).unwrap();
    let done = a.import(entries.clone()).unwrap();
    assert_eq!((done.written, done.unchanged), (1, 299));
    assert_eq!(a.get("tasks", "t5").unwrap().unwrap().data, common::obj(json!({"n": 5, "extra": true})));
    let done = a.import(entries.clone()).unwrap();
    assert_eq!((done.written, done.unchanged), (0, 300), "a second run writes nothing");
    assert_eq!(a.outbox().unwrap().len(), 302);

    let report = a.sync().await.unwrap();
    assert_eq!((report.pushed, report.failed), (302, 0), "{report:?}");
    assert_eq!(a.outbox().unwrap().len(), 0);
    assert_eq!(a.import(entries).unwrap().written, 0, "the confirmed state holds them too");
    assert_eq!(server.head().await, 302);
    b.sync().await.unwrap();
    assert_eq!(listing(&b, "tasks"), listing(&a, "tasks"));
    assert_eq!(b.stats().unwrap().state_digest, a.stats().unwrap().state_digest);
}
