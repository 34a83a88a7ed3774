//! End-to-end tests of the `deltasync client` commands beyond one-shot sync:
//! `conflicts` (the server's records, page by page), `retry-failed` and
//! `discard-failed` (changes the server refused for good), `watch` (a line per
//! sync until a count, a signal or a closed stdout), and `no_endpoint` for a
//! server URL with a wrong path, and `import` (many writes from NDJSON, in
//! batches). Each runs against a real `deltasync serve`.
//!
//! Bounds on time are liveness bounds, never speed measurements.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::devices::*;
use common::{Backend, Server};
use serde_json::{Value, json};

/// Far more than the commands here need, far less than a hung one would take.
const LIVENESS: Duration = Duration::from_secs(60);

/// The conflicts page a device prints for `args` (after `conflicts`).
fn conflicts(device: &Device, url: &str, args: &[&str]) -> Value {
    let mut all = vec!["conflicts"];
    all.extend_from_slice(args);
    let out = device.run(Some(url), &all);
    assert!(out.success(), "{}: conflicts {args:?} failed: {out:?}", device.name);
    assert_eq!(out.stdout.lines().count(), 1, "not one line: {:?}", out.stdout);
    out.json()
}

/// The change ids of a conflicts page's records, in order.
fn record_ids(page: &Value) -> Vec<&str> {
    page["conflicts"].as_array().unwrap().iter().map(|r| r["change_id"].as_str().unwrap()).collect()
}

/// Devices `a` and `b` each set the `title` of `entities` offline, `b` later
/// (a newer HLC); `b` syncs first, then `a`, whose titles lose. Returns `a`'s
/// change ids, in order.
fn a_loses_titles(server: &Server, a: &Device, b: &Device, entities: &[&str]) -> Vec<String> {
    let mut lost = Vec::new();
    for e in entities {
        lost.push(a.patch("tasks", e, json!({"title": format!("from a {e}")})).as_str().unwrap().to_owned());
        tick();
        b.patch("tasks", e, json!({"title": format!("from b {e}")}));
        tick();
    }
    assert_eq!(b.sync(&server.url)["conflicts"], 0);
    let r = a.sync(&server.url);
    assert_eq!(r["conflicts"], entities.len(), "{r}");
    lost
}

store_test!(#[test] fn conflicts_shows_the_change_that_lost_a_field_to_another_device);
fn conflicts_shows_the_change_that_lost_a_field_to_another_device(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Device::new(dir.path(), "a"), Device::new(dir.path(), "b"));
    assert_eq!(conflicts(&a, &server.url, &[]), json!({"conflicts": [], "cursor": 0, "has_more": false}));

    let lost = a_loses_titles(&server, &a, &b, &["t1"]);
    let page = conflicts(&a, &server.url, &[]);
    assert_eq!(record_ids(&page), [lost[0].as_str()], "{page}");
    let record = &page["conflicts"][0];
    assert_eq!(record["device_id"], a.device_id(), "{record}");
    assert_eq!((&record["collection"], &record["entity_id"]), (&json!("tasks"), &json!("t1")), "{record}");
    assert_eq!(record["reason"], "superseded", "{record}");
    assert_eq!(record["fields"], json!(["title"]), "{record}");
    assert_eq!(record["data"], json!({"title": "from a t1"}), "{record}");
    assert_eq!(record["current"]["data"]["title"], "from b t1", "{record}");
    assert_eq!((&page["cursor"], &page["has_more"]), (&record["id"], &json!(false)), "{page}");
    // The server's answer as it is, for any device of the user (b reads a's record too).
    let (status, served) = http_get(&server.url, "/v1/conflicts?since=0", None);
    assert_eq!(status, 200, "{served}");
    assert_eq!(page, served);
    assert_eq!(conflicts(&b, &server.url, &[]), served);
}

store_test!(#[test] fn conflicts_pages_with_limit_and_since);
fn conflicts_pages_with_limit_and_since(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Device::new(dir.path(), "a"), Device::new(dir.path(), "b"));
    let lost = a_loses_titles(&server, &a, &b, &["t1", "t2", "t3"]);
    let lost: Vec<&str> = lost.iter().map(String::as_str).collect();

    let first = conflicts(&a, &server.url, &["--limit", "2"]);
    assert_eq!(record_ids(&first), lost[..2], "{first}");
    assert_eq!((&first["cursor"], &first["has_more"]), (&first["conflicts"][1]["id"], &json!(true)), "{first}");
    let since = first["cursor"].to_string();
    let second = conflicts(&a, &server.url, &["--since", &since, "--limit", "2"]);
    assert_eq!(record_ids(&second), lost[2..], "{second}");
    assert_eq!((&second["cursor"], &second["has_more"]), (&second["conflicts"][0]["id"], &json!(false)), "{second}");
    let after = second["cursor"].to_string();
    let past = conflicts(&a, &server.url, &["--since", &after]);
    assert_eq!(past, json!({"conflicts": [], "cursor": second["cursor"], "has_more": false}));
    assert_eq!(record_ids(&conflicts(&a, &server.url, &["--limit", "1"])), lost[..1]);

    // A zero limit is refused before asking the server; the help says how to page.
    let out = a.run(Some(&server.url), &["conflicts", "--limit", "0"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    let help = a.run(None, &["conflicts", "--help"]);
    let words = help.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(help.success() && words.contains("pass --since <cursor>"), "{}", help.stdout);
}

/// Devices `a` and `b` under `reject`: `b` edits `d1` on a version `a` already
/// changed, so the server refuses `b`'s change for good. Returns its id.
fn b_refused_for_good(server: &Server, a: &Device, b: &Device) -> String {
    a.put("docs", "d1", json!({"title": "v1"}));
    a.sync(&server.url);
    b.sync(&server.url);
    a.patch("docs", "d1", json!({"title": "A"}));
    a.sync(&server.url);
    let refused = b.patch("docs", "d1", json!({"title": "B"})).as_str().unwrap().to_owned();
    let r = b.sync(&server.url);
    assert_eq!((&r["failed"], &r["lost"][0]["change_id"]), (&json!(1), &json!(refused)), "{r}");
    refused
}

/// `(pending, failed)` of a device's status.
fn counts(d: &Device) -> (u64, u64) {
    let st = d.status();
    (st["pending"].as_u64().unwrap(), st["failed"].as_u64().unwrap())
}

store_test!(#[test] fn retry_failed_and_discard_failed_act_on_changes_refused_for_good);
fn retry_failed_and_discard_failed_act_on_changes_refused_for_good(backend: &Backend) {
    let config = "[collections.docs]\npolicy = \"reject\"\n".to_owned();
    let server = Server::start_with(backend, common::Options { config: Some(config), ..Default::default() });
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Device::new(dir.path(), "a"), Device::new(dir.path(), "b"));
    let refused = b_refused_for_good(&server, &a, &b);
    assert_eq!(counts(&b), (0, 1));

    // Back to the outbox: pending again, and shown in reads again.
    assert_eq!(b.ok(&["retry-failed"]), json!({"requeued": 1}));
    assert_eq!(counts(&b), (1, 0));
    let exported = b.export_pending();
    assert_eq!((&exported[0]["change_id"], &exported[0]["state"]), (&json!(refused), &json!("pending")));
    assert_eq!(b.get("docs", "d1"), Some(json!({"title": "B"})));
    assert_eq!(b.ok(&["retry-failed"]), json!({"requeued": 0}));
    // Sent again on the version it was made on, it is refused again (a second record).
    let r = b.sync(&server.url);
    assert_eq!((&r["failed"], &r["lost"][0]["change_id"]), (&json!(1), &json!(refused)), "{r}");
    assert_eq!(record_ids(&conflicts(&b, &server.url, &[])), [refused.as_str(), refused.as_str()]);

    // Discarded: gone from the outbox, the state is the server's, nothing more is sent.
    assert_eq!(b.ok(&["discard-failed"]), json!({"discarded": 1}));
    assert_eq!(counts(&b), (0, 0));
    assert_eq!(b.export_pending(), Vec::<Value>::new());
    assert_eq!(b.ok(&["discard-failed"]), json!({"discarded": 0}));
    assert_eq!(b.ok(&["retry-failed"]), json!({"requeued": 0}));
    assert_eq!(b.get("docs", "d1"), Some(json!({"title": "A"})));
    let r = b.sync(&server.url);
    assert_eq!((&r["pushed"], &r["failed"]), (&json!(0), &json!(0)), "{r}");
    assert_converged(&[&a, &b], &server.url, None, &[("docs", None)]);
}

/// Runs `watch` with `args` against `url` and waits for it (within [`LIVENESS`]).
fn watch(device: &Device, url: &str, args: &[&str]) -> Out {
    let mut all = vec!["watch"];
    all.extend_from_slice(args);
    let started = Instant::now();
    let out = device.run(Some(url), &all);
    assert!(started.elapsed() < LIVENESS, "watch took {:?}", started.elapsed());
    out
}

/// The lines of stdout, each parsed as JSON.
fn json_lines(out: &Out) -> Vec<Value> {
    out.stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"))).collect()
}

store_test!(#[test] fn watch_prints_a_report_line_per_sync_and_stops_after_count);
fn watch_prints_a_report_line_per_sync_and_stops_after_count(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Device::new(dir.path(), "a"), Device::new(dir.path(), "b"));
    a.put("tasks", "t1", json!({"v": 1}));
    b.put("tasks", "t2", json!({"v": 2}));
    b.sync(&server.url);

    let out = watch(&a, &server.url, &["--count", "2", "--interval", "1"]);
    assert!(out.success(), "{out:?}");
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2, "{out:?}");
    for report in &lines {
        check_report(report);
        assert_eq!(report["verified"], true, "{report}");
    }
    assert_eq!((&lines[0]["applied"], &lines[0]["pulled"]), (&json!(1), &json!(1)), "{}", lines[0]);
    assert_eq!((&lines[1]["pushed"], &lines[1]["pulled"]), (&json!(0), &json!(0)), "{}", lines[1]);
    assert!(!out.stderr.contains("\"error\""), "{}", out.stderr);
    b.sync(&server.url);
    assert_converged(&[&a, &b], &server.url, None, &[("tasks", None)]);
}

store_test!(#[test] fn watch_prints_an_error_line_per_failed_sync_and_keeps_going);
fn watch_prints_an_error_line_per_failed_sync_and_keeps_going(backend: &Backend) {
    let mut server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    a.put("tasks", "t1", json!({"v": 1}));
    server.kill();

    let out = watch(&a, &server.url, &["--count", "2", "--interval", "1"]);
    assert!(out.success(), "{out:?}");
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2, "{out:?}");
    for line in &lines {
        assert_eq!(line["error"], "unreachable", "{line}");
        assert!(line["message"].as_str().unwrap().contains(&server.url), "{line}");
    }
    let st = a.status();
    assert_eq!((&st["pending"], &st["failed_syncs"]), (&json!(1), &json!(2)), "{st}");
    assert_eq!(st["last_error"]["code"], "unreachable", "{st}");

    // With no server at all, every sync would fail alike: watch says so once and exits 1.
    let fresh = Device::new(dir.path(), "fresh");
    assert_eq!(fresh.run(None, &["watch", "--count", "2"]).error()["error"], "no_server");
}

/// Starts `watch --interval 30` on `device` with stdout piped, and reads its first line.
fn start_watch(device: &Device, url: &str) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = device
        .command(Some(url), &["watch", "--interval", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    check_report(&serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}")));
    (child, stdout)
}

/// Waits for `child` within [`LIVENESS`]; returns its exit code (`None` when killed by a signal).
fn wait_exit(child: &mut Child) -> Option<i32> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if started.elapsed() > LIVENESS {
            let _ = child.kill();
            panic!("watch did not stop within {LIVENESS:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

store_test!(#[test] fn watch_stops_cleanly_on_sigterm_and_sigint);
fn watch_stops_cleanly_on_sigterm_and_sigint(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    for signal in ["-TERM", "-INT"] {
        let (mut child, mut stdout) = start_watch(&a, &server.url);
        assert!(Command::new("kill").arg(signal).arg(child.id().to_string()).status().unwrap().success());
        assert_eq!(wait_exit(&mut child), Some(0), "{signal}");
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        assert_eq!(rest, "", "{signal}: nothing printed after the signal");
    }
}

store_test!(#[test] fn watch_ends_quietly_when_its_reader_goes_away);
fn watch_ends_quietly_when_its_reader_goes_away(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let mut child = a
        .command(Some(&server.url), &["watch", "--interval", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    check_report(&serde_json::from_str(&line).unwrap());
    drop(stdout); // the next sync's line meets a closed pipe
    assert_eq!(wait_exit(&mut child), Some(0));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!stderr.contains("\"error\""), "{stderr}");
}

store_test!(#[test] fn a_server_url_with_a_wrong_path_is_no_endpoint);
fn a_server_url_with_a_wrong_path_is_no_endpoint(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    a.put("tasks", "t1", json!({"v": 1}));
    let wrong = format!("{}/wrong/prefix", server.url);
    for (args, request) in [(&["sync"][..], "GET /v1/status"), (&["conflicts"][..], "GET /v1/conflicts")] {
        let err = a.run(Some(&wrong), args).error();
        assert_eq!(err["error"], "no_endpoint", "{args:?}: {err}");
        let message = err["message"].as_str().unwrap();
        let expected =
            format!("the server at {wrong} has no {request}: an older deltasync, or --server has a wrong path");
        assert!(message.ends_with(&expected), "{message}");
    }
    assert_eq!(a.status()["pending"], 1);
    // The right URL works, and is kept.
    assert_eq!(a.sync(&server.url)["applied"], 1);
}

/// `lines` NDJSON writes: puts of entities `i0`, `i1`, …
fn ndjson_puts(lines: usize) -> String {
    (0..lines)
        .map(|i| {
            json!({"op": "put", "collection": "tasks", "id": format!("i{i}"), "data": {"n": i}}).to_string() + "\n"
        })
        .collect()
}

store_test!(#[test] fn import_writes_ndjson_in_batches_that_sync_like_any_write);
fn import_writes_ndjson_in_batches_that_sync_like_any_write(backend: &Backend) {
    let server = Server::start(backend);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Device::new(dir.path(), "a"), Device::new(dir.path(), "b"));
    // 2,500 puts, a blank line, a patch and a delete of imported entities, a put that changes nothing.
    let mut text = ndjson_puts(2_500);
    text.push('\n');
    text.push_str(&json!({"op": "patch", "collection": "tasks", "id": "i1", "data": {"done": true}}).to_string());
    text.push('\n');
    text.push_str(&json!({"op": "delete", "collection": "tasks", "id": "i2"}).to_string());
    text.push('\n');
    text.push_str(&json!({"op": "put", "collection": "tasks", "id": "i3", "data": {"n": 3}}).to_string());
    text.push('\n');
    let file = dir.path().join("writes.ndjson");
    std::fs::write(&file, text).unwrap();
    let out = a.run(None, &["import", "--batch", "1000", file.to_str().unwrap()]);
    assert!(out.success(), "{out:?}");
    assert_eq!(out.json(), json!({"lines": 2_504, "written": 2_502, "unchanged": 1}));
    assert_eq!(a.status()["pending"], 2_502);

    let r = a.sync(&server.url);
    assert_eq!(r["pushed"], 2_502, "{r}");
    b.sync(&server.url);
    let listed = b.list("tasks");
    assert_eq!(listed.as_array().unwrap().len(), 2_499, "i2 is deleted");
    let i1 = listed.as_array().unwrap().iter().find(|e| e["id"] == "i1").unwrap();
    assert_eq!(i1["data"], json!({"n": 1, "done": true}));
    assert_eq!(a.status()["state_digest"], b.status()["state_digest"]);
}

/// No server: an import is local.
#[test]
fn import_stops_at_a_bad_line_and_says_what_was_kept() {
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    let mut lines: Vec<String> = ndjson_puts(2_500).lines().map(str::to_owned).collect();
    lines[1_499] = json!({"op": "put", "collection": "tasks", "id": "x"}).to_string();
    let file = dir.path().join("bad.ndjson");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let err = a.run(None, &["import", "--batch", "1000", file.to_str().unwrap()]).error();
    assert_eq!(err["error"], "invalid_input", "{err}");
    let message = err["message"].as_str().unwrap();
    assert!(message.contains("line 1500 (put) needs an object `data`"), "{message}");
    assert!(message.contains("lines 1 to 1000 were imported") && message.contains("tail -n +1001"), "{message}");
    // The first batch is kept whole; the one with the bad line is not written at all.
    assert_eq!(a.status()["pending"], 1_000);

    let err = a.run(None, &["import", dir.path().join("missing.ndjson").to_str().unwrap()]).error();
    assert!(err["message"].as_str().unwrap().contains("cannot read"), "{err}");
    assert_eq!(a.status()["pending"], 1_000);
}
