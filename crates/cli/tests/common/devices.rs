//! Devices for end-to-end tests of `deltasync client`: each is one local
//! SQLite file driven through the real command line, one process per command.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use super::binary;

/// What one `deltasync` process did.
#[derive(Debug)]
pub struct Out {
    /// The exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Everything printed on stdout.
    pub stdout: String,
    /// Everything printed on stderr.
    pub stderr: String,
}

impl Out {
    fn from_output(out: Output) -> Out {
        Out {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Whether the process exited 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Stdout parsed as one JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!("stdout is not one JSON value ({e}): {:?}\nstderr: {}", self.stdout, self.stderr)
        })
    }

    /// The last line of stderr parsed as the `{"error", "message"}` object, after
    /// checking that the process exited 1 and printed nothing on stdout.
    pub fn error(&self) -> Value {
        assert_eq!(self.code, Some(1), "expected exit code 1; stdout {:?}, stderr {:?}", self.stdout, self.stderr);
        assert!(self.stdout.trim().is_empty(), "a failed command printed on stdout: {:?}", self.stdout);
        let last = self.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_else(|| {
            panic!("a failed command printed nothing on stderr");
        });
        let v: Value = serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("the last stderr line is not JSON ({e}): {last:?}\nstderr: {}", self.stderr));
        let obj = v.as_object().unwrap_or_else(|| panic!("the last stderr line is not an object: {v}"));
        assert!(obj.get("error").is_some_and(Value::is_string), "no string `error` in {v}");
        assert!(obj.get("message").is_some_and(Value::is_string), "no string `message` in {v}");
        v
    }
}

/// One device: a local database driven by `deltasync client`.
#[derive(Debug, Clone)]
pub struct Device {
    /// A name for messages.
    pub name: String,
    /// The local database file.
    pub db: PathBuf,
    /// A token passed with `--token` on every command, if any.
    pub token: Option<String>,
}

impl Device {
    /// A device whose database is `<dir>/<name>.db` (created by its first command).
    pub fn new(dir: &Path, name: &str) -> Device {
        Device { name: name.to_owned(), db: dir.join(format!("{name}.db")), token: None }
    }

    /// The command `deltasync client --db DB [--server URL] [--token T] ARGS…`,
    /// with the DELTASYNC_* environment fallbacks removed.
    pub fn command(&self, server: Option<&str>, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary());
        cmd.arg("client").arg("--db").arg(&self.db);
        if let Some(url) = server {
            cmd.arg("--server").arg(url);
        }
        if let Some(token) = &self.token {
            cmd.arg("--token").arg(token);
        }
        cmd.args(args).env_remove("DELTASYNC_SERVER").env_remove("DELTASYNC_TOKEN").env("RUST_LOG", "warn");
        cmd
    }

    /// Runs one client command.
    pub fn run(&self, server: Option<&str>, args: &[&str]) -> Out {
        Out::from_output(self.command(server, args).output().expect("run deltasync client"))
    }

    /// Runs one client command that must succeed, and returns its stdout as JSON.
    pub fn ok(&self, args: &[&str]) -> Value {
        let out = self.run(None, args);
        assert!(out.success(), "{}: `{}` failed: {out:?}", self.name, args.join(" "));
        out.json()
    }

    /// `put`: returns the change id, or `null` when nothing was written.
    pub fn put(&self, collection: &str, id: &str, data: Value) -> Value {
        self.ok(&["put", collection, id, &data.to_string()])
    }

    /// `patch`: returns the change id, or `null` when nothing was written.
    pub fn patch(&self, collection: &str, id: &str, data: Value) -> Value {
        self.ok(&["patch", collection, id, &data.to_string()])
    }

    /// `delete`: returns the change id.
    pub fn delete(&self, collection: &str, id: &str) -> String {
        let v = self.ok(&["delete", collection, id]);
        v.as_str().unwrap_or_else(|| panic!("delete printed {v}, not a change id")).to_owned()
    }

    /// `get`: the data, or `None` when the command exits 1 with `not_found`.
    pub fn get(&self, collection: &str, id: &str) -> Option<Value> {
        let out = self.run(None, &["get", collection, id]);
        if out.success() {
            let v = out.json();
            assert!(v.is_object(), "get printed {v}, not an object");
            return Some(v);
        }
        let err = out.error();
        assert_eq!(err["error"], "not_found", "{}: get {collection}/{id}: {err}", self.name);
        None
    }

    /// `list`: the JSON array of `{"id", "data"}`.
    pub fn list(&self, collection: &str) -> Value {
        self.ok(&["list", collection])
    }

    /// `sync` against `url`, which must succeed; returns the report.
    pub fn sync(&self, url: &str) -> Value {
        let out = self.run(Some(url), &["sync"]);
        assert!(out.success(), "{}: sync failed: {out:?}", self.name);
        let report = out.json();
        check_report(&report);
        report
    }

    /// `sync` against `url`, which must fail; returns the error object.
    pub fn sync_fails(&self, url: &str) -> Value {
        self.run(Some(url), &["sync"]).error()
    }

    /// `status`.
    pub fn status(&self) -> Value {
        self.ok(&["status"])
    }

    /// `export-pending`.
    pub fn export_pending(&self) -> Vec<Value> {
        match self.ok(&["export-pending"]) {
            Value::Array(items) => items,
            other => panic!("export-pending printed {other}, not an array"),
        }
    }

    /// This device's id (from `status`).
    pub fn device_id(&self) -> String {
        self.status()["device_id"].as_str().unwrap().to_owned()
    }

    /// Opens the local database directly (to inspect or tamper with it).
    pub fn sqlite(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(&self.db).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn
    }

    /// One `meta` value of the local database.
    pub fn meta(&self, key: &str) -> Option<String> {
        use rusqlite::OptionalExtension;
        self.sqlite().query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional().unwrap()
    }
}

/// Checks that a sync report has every member the spec names, with sane types.
pub fn check_report(report: &Value) {
    for key in [
        "pushed",
        "applied",
        "duplicate",
        "restored",
        "pulled",
        "conflicts",
        "failed",
        "restamped",
        "pending",
        "cursor",
    ] {
        assert!(report[key].is_u64(), "report member {key} is not a count: {report}");
    }
    for key in ["state_hash", "state_digest"] {
        assert!(is_hash(&report[key]), "report member {key} is not 64 lowercase hex digits: {report}");
    }
    for key in ["verified", "healed"] {
        assert!(report[key].is_boolean(), "report member {key} is not a boolean: {report}");
    }
    assert!(report["lost"].is_array(), "report member lost is not an array: {report}");
    assert!(
        report["conflicts"].as_u64().unwrap() >= report["lost"].as_array().unwrap().len() as u64,
        "conflicts does not count every lost change: {report}"
    );
    assert_eq!(
        report["pushed"].as_u64().unwrap(),
        report["applied"].as_u64().unwrap() + report["duplicate"].as_u64().unwrap(),
        "pushed is not applied + duplicate: {report}"
    );
    assert!(
        report["restored"].as_u64().unwrap() <= report["applied"].as_u64().unwrap(),
        "restored changes are not counted as applied: {report}"
    );
}

/// Whether `v` is a hash as the wire writes it: 64 lowercase hex digits.
pub fn is_hash(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// Sleeps long enough that the next write gets a later HLC than every earlier one,
/// on any device (HLCs come from the wall clock, in milliseconds).
pub fn tick() {
    std::thread::sleep(Duration::from_millis(3));
}

/// A lost change in short: `(collection, entity_id, reason, fields sorted)`.
pub type Lost = (String, String, String, Vec<String>);

/// `(collection, entity_id, reason, fields)` of every lost change of a sync report, sorted.
pub fn lost_summary(report: &Value) -> Vec<Lost> {
    let mut out: Vec<_> = report["lost"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let mut fields: Vec<String> = l["conflict"]["fields"]
                .as_array()
                .map(|f| f.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
                .unwrap_or_default();
            fields.sort();
            (
                l["collection"].as_str().unwrap().to_owned(),
                l["entity_id"].as_str().unwrap().to_owned(),
                l["conflict"]["reason"].as_str().unwrap().to_owned(),
                fields,
            )
        })
        .collect();
    out.sort();
    out
}

/// A lost-change summary line, for writing expectations.
pub fn lost(collection: &str, entity: &str, reason: &str, fields: &[&str]) -> Lost {
    let mut fields: Vec<String> = fields.iter().map(|s| (*s).to_owned()).collect();
    fields.sort();
    (collection.to_owned(), entity.to_owned(), reason.to_owned(), fields)
}

/// GETs `path_and_query` from the server (blocking; for plain `#[test]`s), with an optional token.
pub fn http_get(url: &str, path_and_query: &str, token: Option<&str>) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut req = super::client().get(format!("{url}{path_and_query}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path_and_query} answered non-JSON ({e}): {text}")),
        )
    })
}

/// The server's `/v1/status` answer (asserting 200).
pub fn server_status(url: &str, token: Option<&str>) -> Value {
    let (status, body) = http_get(url, "/v1/status", token);
    assert_eq!(status, 200, "status failed: {body}");
    body
}

/// The whole log as a pull from 0 by an observer device (asserting 200 and one page).
pub fn server_log(url: &str, token: Option<&str>) -> Vec<Value> {
    let (status, body) = http_get(url, "/v1/pull?device_id=observer&cursor=0&limit=10000", token);
    assert_eq!(status, 200, "pull failed: {body}");
    assert_eq!(body["has_more"], false, "the log does not fit one page");
    body["changes"].as_array().unwrap().clone()
}

/// Asserts that every device shows the same `list` of each collection (equal to
/// `expected` when given), has nothing pending or failed, and stands at the
/// server's head with the server's state hash and digest.
pub fn assert_converged(devices: &[&Device], url: &str, token: Option<&str>, collections: &[(&str, Option<Value>)]) {
    let server = server_status(url, token);
    for (collection, expected) in collections {
        let first = devices[0].list(collection);
        if let Some(expected) = expected {
            assert_eq!(&first, expected, "{}: list {collection}", devices[0].name);
        }
        for d in &devices[1..] {
            assert_eq!(d.list(collection), first, "{} and {} differ on list {collection}", d.name, devices[0].name);
        }
    }
    for d in devices {
        let st = d.status();
        assert_eq!(st["cursor"], server["head"], "{}: status {st} vs server {server}", d.name);
        assert_eq!(st["state_hash"], server["state_hash"], "{}: status {st} vs server {server}", d.name);
        assert_eq!(st["state_digest"], server["state_digest"], "{}: status {st} vs server {server}", d.name);
        assert_eq!(st["pending"], 0, "{}: {st}", d.name);
    }
}
