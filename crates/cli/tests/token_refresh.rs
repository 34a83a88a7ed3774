//! Expired tokens: `deltasync client --token-command CMD` (the SDK's
//! `ClientOptions::token_provider`) asks for a fresh token when the server
//! answers 401, sends the request once more, never loops, and loses nothing
//! while no good token can be had. Real server processes with `--auth jwt`.

mod common;

use std::path::Path;

use common::*;
use serde_json::{Value, json};

const SECRET: &str = "token-refresh-test-secret";

/// An HS256 token for `user` that expired an hour ago.
fn expired_token(user: &str) -> String {
    let exp = now_ms() / 1000 - 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// `deltasync client --db DB --server URL [--token T] --token-command CMD ARGS…`: exit success, and its JSON.
fn client(db: &Path, url: &str, token: Option<&str>, command: &str, args: &[&str]) -> (bool, Value) {
    let db = db.display().to_string();
    let mut all = vec!["client", "--db", &db, "--server", url, "--token-command", command];
    if let Some(token) = token {
        all.extend(["--token", token]);
    }
    all.extend(args);
    let (status, out, err) = run_cli(&all);
    // Answers go to stdout, errors (`{"error", "message"}`) to stderr.
    let text = if status.success() { out.trim() } else { err.trim() };
    let json = serde_json::from_str(text).unwrap_or_else(|_| json!({"stdout": out, "stderr": err}));
    (status.success(), json)
}

/// A token command that counts its runs in `dir/runs` and prints `dir/token`.
fn counting_command(dir: &Path) -> String {
    format!("echo run >> {0}/runs; cat {0}/token", dir.display())
}

fn runs(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("runs")).map_or(0, |s| s.lines().count())
}

#[test]
fn an_expired_token_is_renewed_once_and_the_sync_goes_through() {
    let server =
        Server::start_with(&Backend::Sqlite, Options { jwt_secret: Some(SECRET.into()), ..Options::default() });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), format!("{}\n", token_for(SECRET, "alice"))).unwrap();
    let db = dir.path().join("phone.db");
    let command = counting_command(dir.path());
    let expired = expired_token("alice");

    let (ok, out) = client(&db, &server.url, Some(&expired), &command, &["put", "notes", "n1", r#"{"t":"hi"}"#]);
    assert!(ok, "{out}");
    assert_eq!(runs(dir.path()), 0, "a local write needs no token");
    let (ok, report) = client(&db, &server.url, Some(&expired), &command, &["sync"]);
    assert!(ok, "{report}");
    assert_eq!((report["pushed"].as_u64(), report["verified"].as_bool()), (Some(1), Some(true)), "{report}");
    assert_eq!(runs(dir.path()), 1, "one refusal, one fresh token, then every request carried it");

    // Without --token, the first request asks the command.
    let other = dir.path().join("laptop.db");
    let (ok, report) = client(&other, &server.url, None, &command, &["sync"]);
    assert!(ok, "{report}");
    assert_eq!(runs(dir.path()), 2);
    let (ok, data) = client(&other, &server.url, None, &command, &["get", "notes", "n1"]);
    assert!(ok);
    assert_eq!(data["t"], "hi", "{data}");
}

#[test]
fn a_provider_without_a_good_token_fails_the_sync_once_and_loses_nothing() {
    let server =
        Server::start_with(&Backend::Sqlite, Options { jwt_secret: Some(SECRET.into()), ..Options::default() });
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("phone.db");
    let expired = expired_token("bob");
    let command = counting_command(dir.path());
    let (ok, _) = client(&db, &server.url, Some(&expired), &command, &["put", "notes", "n1", r#"{"t":"kept"}"#]);
    assert!(ok);

    // The command hands out another expired token: one run, one retry, then the sync fails.
    std::fs::write(dir.path().join("token"), expired_token("bob")).unwrap();
    let (ok, error) = client(&db, &server.url, Some(&expired), &command, &["sync"]);
    assert!(!ok);
    assert_eq!(error["error"], "unauthorized", "{error}");
    assert_eq!(runs(dir.path()), 1, "the provider is asked once per refused request, never in a loop");

    // The command fails: the sync says why.
    let failing = "echo 'no session: sign in again' >&2; exit 3";
    let (ok, error) = client(&db, &server.url, Some(&expired), failing, &["sync"]);
    assert!(!ok);
    assert_eq!(error["error"], "unauthorized", "{error}");
    assert!(error["message"].as_str().unwrap().contains("no session: sign in again"), "{error}");

    // Nothing was lost: the change waits in the outbox, and goes with the first good token.
    let (_, status) = client(&db, &server.url, Some(&expired), failing, &["status"]);
    assert_eq!(status["pending"], 1, "{status}");
    std::fs::write(dir.path().join("token"), token_for(SECRET, "bob")).unwrap();
    let (ok, report) = client(&db, &server.url, Some(&expired), &command, &["sync"]);
    assert!(ok, "{report}");
    assert_eq!(report["pushed"], 1, "{report}");
}
