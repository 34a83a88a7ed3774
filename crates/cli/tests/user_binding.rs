//! A local replica belongs to one user. Before, a device that wrote with
//! alice's token and then synced with bob's token pushed alice's changes into
//! bob's dataset, where bob saw them. Now the sync is refused before anything
//! of the replica is sent, saying whose the replica is and how to start over
//! (`reset`), through the SDK and the command line alike.

mod common;

use common::devices::*;
use common::{Backend, Options, Server, token_for};
use deltasync_client::{Client, ClientError, ClientOptions};
use serde_json::{Value, json};

const SECRET: &str = "binding-secret";

fn jwt_server() -> Server {
    Server::start_with(&Backend::Sqlite, Options { jwt_secret: Some(SECRET.into()), ..Options::default() })
}

/// What bob's dataset holds: its log and its devices (but the probe that reads them).
fn bobs_dataset(url: &str, bob: &str) -> (Vec<Value>, Vec<Value>) {
    let (status, page) = http_get(url, "/v1/pull?device_id=probe&cursor=0", Some(bob));
    assert_eq!(status, 200, "{page}");
    let (status, st) = http_get(url, "/v1/status", Some(bob));
    assert_eq!(status, 200, "{st}");
    let devices = st["devices"].as_array().unwrap().iter().filter(|d| d["device_id"] != "probe").cloned().collect();
    (page["changes"].as_array().unwrap().clone(), devices)
}

fn open(path: &std::path::Path, url: &str, token: &str) -> Client {
    let options = ClientOptions { server: Some(url.into()), token: Some(token.into()), ..Default::default() };
    Client::open(path, options).unwrap()
}

fn fields(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[test]
fn the_sdk_refuses_another_users_token_and_starts_over_after_reset() {
    let server = jwt_server();
    let (alice, bob) = (token_for(SECRET, "alice"), token_for(SECRET, "bob"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.db");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

    let phone = open(&path, &server.url, &alice);
    phone.put("notes", "n1", fields(json!({"text": "alice's diary"}))).unwrap();
    rt.block_on(phone.sync()).unwrap();
    phone.put("notes", "n2", fields(json!({"text": "alice's second entry"}))).unwrap();
    assert_eq!(phone.stats().unwrap().user_id.as_deref(), Some("alice"));
    drop(phone);

    // The same replica with bob's token: refused, and nothing reached bob.
    let phone = open(&path, &server.url, &bob);
    let err = rt.block_on(phone.sync()).unwrap_err();
    assert!(
        matches!(&err, ClientError::WrongUser { replica_user, token_user } if replica_user == "alice" && token_user == "bob"),
        "{err:?}"
    );
    assert_eq!(err.code(), "wrong_user");
    let message = err.to_string();
    assert!(
        message.contains("\"alice\"") && message.contains("reset") && message.contains("export-pending"),
        "{message}"
    );
    assert_eq!(bobs_dataset(&server.url, &bob), (vec![], vec![]), "bob's dataset saw nothing of this device");
    let err = rt.block_on(phone.conflicts(0, None)).unwrap_err();
    assert_eq!(err.code(), "wrong_user", "every server call is refused: {err:?}");

    // Reset refuses while a change is pending, then starts over when forced.
    let err = rt.block_on(phone.reset(false)).unwrap_err();
    assert!(matches!(err, ClientError::PendingChanges { pending: 1, failed: 0 }), "{err:?}");
    assert!(err.to_string().contains("export-pending"), "{err}");
    assert_eq!(phone.get("notes", "n2").unwrap().unwrap().data["text"], "alice's second entry");
    let device = phone.device_id().clone();
    rt.block_on(phone.reset(true)).unwrap();
    let st = phone.stats().unwrap();
    assert_eq!((st.pending, st.cursor, st.user_id.clone()), (0, 0, None), "{st:?}");
    assert_eq!(phone.list("notes").unwrap(), vec![], "alice's data is gone from the replica");
    assert_eq!(st.device_id, device, "the device keeps its id");

    let report = rt.block_on(phone.sync()).unwrap();
    assert_eq!((report.pushed, report.pulled), (0, 0), "{report:?}");
    assert_eq!(phone.stats().unwrap().user_id.as_deref(), Some("bob"));
    assert_eq!(bobs_dataset(&server.url, &bob).0, Vec::<Value>::new(), "bob's log is still empty");
}

#[test]
fn the_command_line_refuses_another_users_token_and_resets() {
    let server = jwt_server();
    let (alice, bob) = (token_for(SECRET, "alice"), token_for(SECRET, "bob"));
    let dir = tempfile::tempdir().unwrap();
    let mut phone = Device::new(dir.path(), "phone");
    phone.token = Some(alice.clone());
    phone.put("notes", "n1", json!({"text": "alice's diary"}));
    phone.sync(&server.url);
    phone.put("notes", "n2", json!({"text": "alice's second entry"}));

    phone.token = Some(bob.clone());
    let err = phone.sync_fails(&server.url);
    assert_eq!(err["error"], "wrong_user", "{err}");
    assert!(err["message"].as_str().unwrap().contains("deltasync client --db PATH reset"), "{err}");
    assert_eq!(bobs_dataset(&server.url, &bob), (vec![], vec![]));

    let out = phone.run(None, &["reset"]);
    assert!(!out.success());
    let err = out.error();
    assert_eq!(err["error"], "pending_changes", "{err}");
    assert!(err["message"].as_str().unwrap().contains("export-pending"), "{err}");
    assert_eq!(phone.export_pending().len(), 1, "the refused reset kept the pending change");

    assert_eq!(phone.ok(&["reset", "--force"]), json!({"reset": true}));
    assert_eq!(phone.list("notes"), json!([]));
    let report = phone.sync(&server.url);
    assert_eq!((report["pushed"].clone(), report["pulled"].clone()), (json!(0), json!(0)), "{report}");
    assert_eq!(phone.status()["user_id"], "bob");

    // Alice's own devices still see her data, and only hers.
    let mut laptop = Device::new(dir.path(), "laptop");
    laptop.token = Some(alice);
    laptop.sync(&server.url);
    assert_eq!(laptop.list("notes"), json!([{"id": "n1", "data": {"text": "alice's diary"}}]));
}
