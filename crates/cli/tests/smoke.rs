//! The server starts, answers health checks, and round-trips one change.

mod common;

use common::*;
use serde_json::json;

store_test!(#[tokio::test] async fn serves_push_and_pull_on_a_fresh_store);
async fn serves_push_and_pull_on_a_fresh_store(backend: &Backend) {
    let server = Server::start(backend);
    let c = client();
    let r = c.get(format!("{}/healthz", server.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let answer = push(
        &c,
        &server.url,
        "phone",
        vec![upsert("c1", "tasks", "t1", json!({"title": "milk"}), &hlc(now_ms(), 0, "phone"))],
    )
    .await;
    assert_eq!(answer["results"][0]["status"], "applied");
    assert_eq!(answer["results"][0]["seq"], 1);
    let (status, page) = get(&c, &server.url, "/v1/pull?device_id=laptop&cursor=0").await;
    assert_eq!(status, 200);
    assert_eq!(page["changes"][0]["data"], json!({"title": "milk"}));
    assert_eq!(page["state_hash"], answer["state_hash"]);
    // SQLite only: the store is the file the server was given.
    if *backend == Backend::Sqlite {
        let file = server.sqlite_file().expect("a sqlite:// database");
        assert!(file.exists(), "{}", file.display());
    }
}

/// A log that goes to a file (not a terminal) carries no ANSI colour codes.
#[test]
fn logs_to_a_file_have_no_colour_codes() {
    let server = Server::start_with(&Backend::Sqlite, Options { capture_log: true, ..Options::default() });
    let log = server.log();
    assert!(log.contains("INFO"), "the server logged nothing at start: {log:?}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log:?}");
}
