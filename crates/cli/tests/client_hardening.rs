//! `deltasync client` against what should not stall or fool it: a server that
//! answers a byte a second, a proxy's HTML error page, a web server that is
//! not deltasync at all, an answer it cannot parse, a database path holding
//! something else, a process killed while it creates its database, and a
//! reader that closes stdout early.
//!
//! Bounds on time are liveness bounds, never speed measurements.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::devices::*;
use common::{Backend, Server, now_ms};
use serde_json::{Value, json};

/// Far more than a timed-out command needs here, far less than the misbehaving server would take.
const LIVENESS: Duration = Duration::from_secs(30);

/// How a [`TinyServer`] writes its answer.
#[derive(Clone, Copy)]
enum Pace {
    /// All at once.
    AtOnce,
    /// One byte a second.
    ByteASecond,
}

/// A tiny HTTP/1.1 server on a real socket, one thread per connection, that
/// answers every request with `answer(path)` and closes the connection.
struct TinyServer {
    url: String,
    stop: Arc<AtomicBool>,
}

impl TinyServer {
    fn start(pace: Pace, answer: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static) -> TinyServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let (stopped, answer) = (stop.clone(), Arc::new(answer));
        thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (answer, stopped) = (answer.clone(), stopped.clone());
                        thread::spawn(move || serve(stream, pace, &*answer, &stopped));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        TinyServer { url, stop }
    }
}

impl Drop for TinyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(mut stream: TcpStream, pace: Pace, answer: &(dyn Fn(&str) -> Vec<u8> + Send + Sync), stop: &AtomicBool) {
    stream.set_nonblocking(false).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    if stream.read_exact(&mut body).is_err() {
        return;
    }
    let target = head.split_whitespace().nth(1).unwrap_or_default();
    let reply = answer(target.split('?').next().unwrap_or_default());
    match pace {
        Pace::AtOnce => {
            let _ = stream.write_all(&reply);
        }
        Pace::ByteASecond => {
            for b in reply {
                if stop.load(Ordering::SeqCst) || stream.write_all(&[b]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

fn http_answer(status: u16, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn empty_status() -> String {
    json!({
        "user_id": "local", "head": 0, "state_hash": "0".repeat(64), "state_digest": "0".repeat(64),
        "horizon": 0, "policies": {"default": "fields", "collections": {}}, "devices": [], "server_time": now_ms(),
    })
    .to_string()
}

fn pending_count(device: &Device) -> u64 {
    device.status()["pending"].as_u64().unwrap()
}

#[test]
fn sync_gives_up_at_its_deadline_on_a_server_sending_a_byte_a_second() {
    let server = TinyServer::start(Pace::ByteASecond, |_| http_answer(200, "application/json", &empty_status()));
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    a.put("tasks", "t1", json!({"v": 1}));

    let started = Instant::now();
    let err = a.run(Some(&server.url), &["--timeout", "3", "sync"]).error();
    assert!(started.elapsed() < LIVENESS, "sync took {:?}", started.elapsed());
    assert_eq!(err["error"], "timeout", "{err}");
    let message = err["message"].as_str().unwrap();
    assert!(message.contains("within 3 s") && message.contains("--timeout"), "{message}");
    assert!(message.contains("nothing local was lost"), "{message}");
    assert_eq!(pending_count(&a), 1);
    assert_eq!(a.status()["last_error"]["code"], "timeout");

    // The same limit from the environment.
    let started = Instant::now();
    let out = a.command(Some(&server.url), &["sync"]).env("DELTASYNC_TIMEOUT", "2").output().unwrap();
    assert!(started.elapsed() < LIVENESS, "sync took {:?}", started.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(r#""error":"timeout""#) && stderr.contains("within 2 s"), "{stderr}");
    assert_eq!(pending_count(&a), 1);
}

const NGINX_502: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad \
                         Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

#[test]
fn a_proxys_error_page_is_not_deltasync_unless_it_says_the_server_is_down_or_busy() {
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    a.put("tasks", "t1", json!({"v": 1}));
    let cases = [
        // A gateway saying the server is down, and a rate limit: transient, retried.
        (502, "unavailable"),
        (503, "unavailable"),
        (504, "unavailable"),
        (429, "rate_limited"),
        // Anything else did not come from deltasync.
        (401, "not_deltasync"),
        (408, "not_deltasync"),
        (413, "not_deltasync"),
        (400, "not_deltasync"),
        (500, "not_deltasync"),
    ];
    for (status, code) in cases {
        let server = TinyServer::start(Pace::AtOnce, move |_| {
            http_answer(status, "text/html", &NGINX_502.replace("502 Bad Gateway", &format!("{status} From Proxy")))
        });
        let err = a.sync_fails(&server.url);
        assert_eq!(err["error"], code, "status {status}: {err}");
        let message = err["message"].as_str().unwrap();
        assert!(message.contains(&format!("GET /v1/status to {}/v1/status", server.url)), "{message}");
        assert!(message.contains(&format!("did not come from deltasync: HTTP {status}, text/html")), "{message}");
        assert!(message.contains(&format!("<title>{status} From Proxy</title>")), "{message}");
        assert!(!message.contains('\n'), "{message}");
        assert_eq!(a.status()["last_error"]["code"], code);
    }
    assert_eq!(pending_count(&a), 1);
}

/// A long HTML page, as a web server that is not deltasync answers.
fn html_page(title: &str) -> String {
    let para = "<p>This is the default page of a web server; the site you are looking for is not here.</p>\n";
    format!(
        "<!DOCTYPE html>\n<html>\n<head><title>{title}</title></head>\n<body>\n{}</body>\n</html>\n",
        para.repeat(300)
    )
}

/// Runs `args` against `url` and returns the error, checking that its message is one short line.
fn short_error(device: &Device, url: &str, args: &[&str]) -> (String, String) {
    let err = device.run(Some(url), args).error();
    let message = err["message"].as_str().unwrap().to_owned();
    assert!(message.chars().count() < 500, "{} characters: {message}", message.chars().count());
    assert!(!message.contains('\n') && !message.contains('\r'), "{message}");
    (err["error"].as_str().unwrap().to_owned(), message)
}

#[test]
fn a_web_server_that_is_not_deltasync_is_named_so_in_one_short_line() {
    let welcome = TinyServer::start(Pace::AtOnce, |_| http_answer(200, "text/html", &html_page("Welcome to nginx!")));
    let missing = TinyServer::start(Pace::AtOnce, |_| http_answer(404, "text/html", &html_page("404 Not Found")));
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    a.put("tasks", "t1", json!({"v": 1}));

    let (code, message) = short_error(&a, &welcome.url, &["sync"]);
    assert_eq!(code, "not_deltasync", "{message}");
    assert!(message.contains(&format!("GET /v1/status to {}/v1/status", welcome.url)), "{message}");
    assert!(message.contains("HTTP 200, text/html") && message.contains("Welcome to nginx!"), "{message}");
    assert!(message.contains("check --server / DELTASYNC_SERVER"), "{message}");
    let (code, message) = short_error(&a, &welcome.url, &["conflicts"]);
    assert_eq!(code, "not_deltasync", "{message}");
    assert!(message.contains("GET /v1/conflicts to"), "{message}");

    let (code, message) = short_error(&a, &missing.url, &["sync"]);
    assert_eq!(code, "no_endpoint", "{message}");
    assert!(message.contains(&format!("the server at {} has no GET /v1/status: an older", missing.url)), "{message}");
    assert!(message.contains("did not look like deltasync: HTTP 404, text/html"), "{message}");
    assert!(message.contains("404 Not Found"), "{message}");

    // Nothing local was lost, and status shows the last failure.
    assert_eq!(pending_count(&a), 1);
    assert_eq!(a.status()["last_error"]["code"], "no_endpoint");
}

store_test!(#[test] fn an_answer_that_cannot_be_parsed_is_named_and_shown_by_status_until_a_sync_succeeds);
fn an_answer_that_cannot_be_parsed_is_named_and_shown_by_status_until_a_sync_succeeds(backend: &Backend) {
    // A sync answer whose pulled change holds data nested past what the parser takes (128).
    let change = json!({"seq": 1, "change_id": "deep", "device_id": "other", "collection": "tasks",
        "entity_id": "t9", "op": "upsert", "data": {"x": "DEEP"}, "hlc": "1763800000000-00000-other",
        "server_time": now_ms()});
    let deep = json!({"results": [], "changes": [change], "cursor": 1, "has_more": false,
        "state_hash": "0".repeat(64), "state_digest": "0".repeat(64), "server_time": now_ms()})
    .to_string()
    .replace("\"DEEP\"", &format!("{}{}", "[".repeat(300), "]".repeat(300)));
    let poisoned = TinyServer::start(Pace::AtOnce, move |path| match path {
        "/v1/status" => http_answer(200, "application/json", &empty_status()),
        _ => http_answer(200, "application/json", &deep),
    });
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    a.put("tasks", "t1", json!({"v": 1}));
    assert_eq!(a.status()["last_error"], Value::Null);

    for attempt in 1..=2u64 {
        let err = a.sync_fails(&poisoned.url);
        assert_eq!(err["error"], "protocol", "{err}");
        let message = err["message"].as_str().unwrap();
        assert!(message.contains("POST /v1/sync") && message.contains("recursion limit"), "{message}");
        let st = a.status();
        assert_eq!(st["last_error"]["code"], "protocol", "{st}");
        assert_eq!(st["last_error"]["message"], message, "{st}");
        assert_eq!(st["failed_syncs"], attempt, "{st}");
        assert!(st["failing_since"].as_u64().unwrap() <= st["last_error"]["at"].as_u64().unwrap(), "{st}");
    }

    let server = Server::start(backend);
    let r = a.sync(&server.url);
    assert_eq!(r["applied"], 1, "{r}");
    let st = a.status();
    assert_eq!((st["last_error"].clone(), st["failing_since"].clone()), (Value::Null, Value::Null), "{st}");
    assert_eq!(st["failed_syncs"], 0, "{st}");
}

#[test]
fn a_database_path_holding_something_else_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let empty = Device::new(dir.path(), "empty");
    std::fs::write(&empty.db, b"").unwrap();
    for args in [&["status"][..], &["put", "tasks", "t1", "{}"]] {
        let err = empty.run(None, args).error();
        assert_eq!(err["error"], "local_store", "{err}");
        let message = err["message"].as_str().unwrap();
        assert!(message.contains("empty (0 bytes)") && message.contains("delete it"), "{message}");
        assert_eq!(std::fs::metadata(&empty.db).unwrap().len(), 0, "the empty file was written to");
    }

    let other = Device::new(dir.path(), "other");
    rusqlite::Connection::open(&other.db).unwrap().execute_batch("CREATE TABLE notes (body TEXT)").unwrap();
    let err = other.run(None, &["status"]).error();
    assert_eq!(err["error"], "local_store", "{err}");
    assert!(err["message"].as_str().unwrap().contains("without deltasync's tables"), "{err}");

    let text = Device::new(dir.path(), "text");
    std::fs::write(&text.db, "not a database, but long enough to be read as one and found wanting\n".repeat(100))
        .unwrap();
    let err = text.run(None, &["status"]).error();
    assert!(err["message"].as_str().unwrap().contains("not a SQLite file"), "{err}");
}

#[test]
fn a_process_killed_while_it_creates_its_database_leaves_none_or_a_whole_one() {
    let dir = tempfile::tempdir().unwrap();
    let put = ["put", "tasks", "t1", r#"{"v":1}"#];
    // How long one whole first command takes here, to spread the kills over it.
    let started = Instant::now();
    Device::new(dir.path(), "timing").ok(&put);
    let whole_run = started.elapsed();
    let rounds = 24u32;
    let (mut made, mut absent) = (0, 0);
    for round in 0..rounds {
        let d = Device::new(dir.path(), &format!("d{round}"));
        let mut child = d.command(None, &put).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        // From at once to twice as long as a whole run takes, closer together
        // early on, where the database is made.
        thread::sleep((whole_run * 2 * round / rounds) * round / rounds);
        let _ = child.kill();
        let _ = child.wait();
        if d.db.exists() {
            // Whatever it got to, the file is a database with a device id.
            let st = d.status();
            assert!(st["device_id"].as_str().unwrap().starts_with("dev-"), "round {round}: {st}");
            made += 1;
        } else {
            absent += 1;
        }
    }
    eprintln!("of {rounds} processes killed over 2 × {whole_run:?}, {made} had made their database, {absent} not");
    assert!(absent > 0 && made > 0, "the kills did not span the creation: {made} made, {absent} not");
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    for name in &names {
        let known = name.ends_with(".db") || name.ends_with("-wal") || name.ends_with("-shm");
        assert!(known || name.contains(".creating"), "unexpected file {name}");
    }
}

#[test]
fn output_survives_a_reader_that_closes_stdout_early() {
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a");
    // About 800 KB of export: far more than a pipe holds.
    for i in 0..8 {
        a.put("docs", &format!("d{i}"), json!({"body": "x".repeat(100_000)}));
    }

    // The reader takes a few bytes and goes away, as `| head -c 100` does.
    let mut child = a.command(None, &["export-pending"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut first = [0u8; 100];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");

    // A reader gone before the first byte: every command ends quietly.
    for args in [&["status"][..], &["list", "docs"], &["get", "docs", "d0"], &["put", "docs", "d9", "{}"]] {
        let mut child = a.command(None, args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?}: {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // The write of the last command happened even though nobody read its id.
    assert_eq!(a.get("docs", "d9"), Some(json!({})));
}
