//! End-to-end tests of the file store mode (`deltasync client --store URL`):
//! devices sync through a plain store (a folder, WebDAV served by wsgidav, S3
//! served by moto) with no server, each device a local database driven through the real command
//! line, one process per command.
//!
//! Each scenario is a function taking a [`StoreUnderTest`], so that the same
//! scenario runs on every kind of store: [`store_scenario!`] makes one
//! `#[test]` per kind, and [`start_store`] is the one place where kinds are
//! added. Besides the commands' own output, the scenarios read the store's
//! objects directly ([`StoreObjects`]): the log as stored is the ground truth
//! (every change once, seqs gapless), and damaging it is how tampering is tested.

mod common;
#[path = "../../client/tests/support/stores.rs"]
mod stores;

use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::devices::{Lost, Out, check_report, lost_summary, tick};
use common::{binary, random_uuid};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// The stores under test.
// ---------------------------------------------------------------------------

/// Direct access to a store's objects, bypassing deltasync: to read the log
/// as it is stored, and to damage it. Names are the store's object names
/// (`log/00000000000000000001.json`, `meta.json`, …).
trait StoreObjects: Send + Sync {
    /// The object's bytes, or `None` when it does not exist.
    fn read(&self, name: &str) -> Option<Vec<u8>>;
    /// Creates or replaces the object.
    fn write(&self, name: &str, bytes: &[u8]);
    /// Deletes the object.
    fn remove(&self, name: &str);
    /// The names of the objects directly in folder `dir` (without the folder), sorted.
    fn list(&self, dir: &str) -> Vec<String>;
}

/// A store a scenario runs on: the URL every device is given, the
/// environment every `deltasync` child gets (credentials, endpoints), direct
/// access to its objects, and whatever keeps it alive (a temporary folder, a
/// server process), dropped with it.
pub struct StoreUnderTest {
    /// The `--store` URL.
    pub url: String,
    /// Set on every `deltasync` child process.
    pub env: Vec<(String, String)>,
    objects: Box<dyn StoreObjects>,
    _guard: Box<dyn Any + Send + Sync>,
}

/// A folder store's objects: files under its root.
struct FolderObjects {
    root: PathBuf,
}

impl StoreObjects for FolderObjects {
    fn read(&self, name: &str) -> Option<Vec<u8>> {
        match std::fs::read(self.root.join(name)) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => panic!("cannot read {name} in {}: {e}", self.root.display()),
        }
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.root.join(name), bytes).unwrap_or_else(|e| panic!("cannot write {name}: {e}"));
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.root.join(name)).unwrap_or_else(|e| panic!("cannot delete {name}: {e}"));
    }

    fn list(&self, dir: &str) -> Vec<String> {
        let mut names: Vec<String> = match std::fs::read_dir(self.root.join(dir)) {
            Ok(entries) => entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("cannot list {dir}: {e}"),
        };
        names.sort();
        names
    }
}

/// A fresh, empty folder store (`file://` URL of a new temporary directory).
fn folder_store() -> StoreUnderTest {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    std::fs::create_dir(&root).unwrap();
    StoreUnderTest {
        url: format!("file://{}", root.display()),
        env: Vec::new(),
        objects: Box::new(FolderObjects { root }),
        _guard: Box::new(dir),
    }
}

// ===========================================================================
// THE PLACE WHERE KINDS OF STORE ARE ADDED.
//
// WebDAV (wsgidav) and S3 (moto) come from `crates/client/tests/support/stores.rs`
// (another branch). To add one:
//   1. a match arm in `start_store` that starts the server (or returns `None`,
//      after saying why, when its tool is not installed: the test then passes
//      as skipped) and returns a `StoreUnderTest` with a fresh store URL
//      (`webdav://127.0.0.1:PORT/<random>`, `s3://bucket/<random>`), `env`
//      with DELTASYNC_STORE_USER / DELTASYNC_STORE_PASSWORD or AWS_ENDPOINT_URL /
//      AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION, a `StoreObjects`
//      over the same server, and the server's guard;
//   2. a `#[test] fn webdav()` / `fn s3()` line in `store_scenario!` below.
// ===========================================================================

/// A store served by a test server (`Err`: its program is missing here),
/// its objects reached through the client's own object layer.
fn served_store(started: Result<stores::TestStore, String>) -> Option<StoreUnderTest> {
    let store = match started {
        Ok(store) => store,
        Err(why) => {
            eprintln!("skipped: {why}");
            return None;
        }
    };
    Some(StoreUnderTest {
        url: store.url.clone(),
        env: store.env.clone(),
        objects: Box::new(ServedObjects::new(&store.url, &store.env)),
        _guard: Box::new(store),
    })
}

/// A served store's objects, read and damaged through `ObjectStore`.
struct ServedObjects {
    store: deltasync_client::filestore::objects::ObjectStore,
    runtime: tokio::runtime::Runtime,
}

impl ServedObjects {
    fn new(url: &str, env: &[(String, String)]) -> ServedObjects {
        use deltasync_client::filestore::objects::{ObjectStore, StoreEnv};
        let store = ObjectStore::open_with(url, &StoreEnv::from_pairs(env.to_vec())).expect("the test store opens");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        ServedObjects { store, runtime }
    }
}

impl StoreObjects for ServedObjects {
    fn read(&self, name: &str) -> Option<Vec<u8>> {
        self.runtime
            .block_on(self.store.read(name))
            .unwrap_or_else(|e| panic!("cannot read {name}: {e}"))
            .map(|o| o.bytes)
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        use deltasync_client::filestore::objects::{Created, Replaced};
        let current = self.runtime.block_on(self.store.read(name)).unwrap();
        let written = match current {
            None => matches!(self.runtime.block_on(self.store.create(name, bytes.to_vec())).unwrap(), Created::Written),
            Some(o) => matches!(
                self.runtime.block_on(self.store.replace(name, bytes.to_vec(), o.version.as_deref())).unwrap(),
                Replaced::Written
            ),
        };
        assert!(written, "cannot write {name}: it changed meanwhile");
    }

    fn remove(&self, name: &str) {
        self.runtime.block_on(self.store.delete(name)).unwrap_or_else(|e| panic!("cannot delete {name}: {e}"));
    }

    fn list(&self, dir: &str) -> Vec<String> {
        self.runtime.block_on(self.store.list(dir)).unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
    }
}

/// A fresh store of `kind`, or `None` when that kind cannot run here.
fn start_store(kind: &str) -> Option<StoreUnderTest> {
    match kind {
        "folder" => Some(folder_store()),
        "webdav" => served_store(stores::wsgidav()),
        "s3" => served_store(stores::moto()),
        other => panic!("no store of kind {other:?}"),
    }
}

/// Runs `scenario` on a fresh store of `kind` (skipped when it cannot run here).
fn run_on(kind: &str, scenario: impl FnOnce(&StoreUnderTest)) {
    match start_store(kind) {
        Some(store) => scenario(&store),
        None => eprintln!("skipped: no {kind} store here"),
    }
}

/// Makes module `$name` with one `#[test]` per kind of store, each running
/// `$scenario` (a closure taking `&StoreUnderTest`) on a fresh store.
/// Attributes before the name (`#[ignore = "why"]`) go on every test.
macro_rules! store_scenario {
    ($(#[$attr:meta])* $name:ident, $scenario:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$attr])*
            #[test]
            fn folder() {
                super::run_on("folder", $scenario)
            }
            $(#[$attr])*
            #[test]
            fn webdav() {
                super::run_on("webdav", $scenario)
            }
            $(#[$attr])*
            #[test]
            fn s3() {
                super::run_on("s3", $scenario)
            }
        }
    };
}

// ---------------------------------------------------------------------------
// Devices and the log as stored.
// ---------------------------------------------------------------------------

/// One device: a local database driven by `deltasync client`, syncing with a store.
struct Device<'s> {
    name: String,
    db: PathBuf,
    store: &'s StoreUnderTest,
}

impl<'s> Device<'s> {
    /// A device whose database is `<dir>/<name>.db` (created by its first command).
    fn new(dir: &Path, name: &str, store: &'s StoreUnderTest) -> Device<'s> {
        Device { name: name.to_owned(), db: dir.join(format!("{name}.db")), store }
    }

    /// `deltasync client --db DB [--store URL] ARGS…` with the store's
    /// environment, the DELTASYNC_* fallbacks removed, and `env` on top.
    fn command(&self, with_store: bool, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(binary());
        cmd.arg("client").arg("--db").arg(&self.db);
        if with_store {
            cmd.arg("--store").arg(&self.store.url);
        }
        cmd.args(args);
        for var in ["DELTASYNC_SERVER", "DELTASYNC_STORE", "DELTASYNC_TOKEN", "DELTASYNC_FAULT"] {
            cmd.env_remove(var);
        }
        cmd.env("RUST_LOG", "warn");
        cmd.envs(self.store.env.iter().map(|(k, v)| (k, v)));
        cmd.envs(env.iter().copied());
        cmd
    }

    fn run_with(&self, with_store: bool, args: &[&str], env: &[(&str, &str)]) -> Out {
        let out = self.command(with_store, args, env).output().expect("run deltasync client");
        Out {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// A local command that must succeed: its stdout as JSON.
    fn ok(&self, args: &[&str]) -> Value {
        let out = self.run_with(false, args, &[]);
        assert!(out.success(), "{}: `{}` failed: {out:?}", self.name, args.join(" "));
        out.json()
    }

    /// `put`: the change id (asserted to be one).
    fn put(&self, collection: &str, id: &str, data: Value) -> String {
        change_id(&self.name, self.ok(&["put", collection, id, &data.to_string()]))
    }

    /// `patch`: the change id (asserted to be one).
    fn patch(&self, collection: &str, id: &str, data: Value) -> String {
        change_id(&self.name, self.ok(&["patch", collection, id, &data.to_string()]))
    }

    /// `delete`: the change id.
    fn delete(&self, collection: &str, id: &str) -> String {
        change_id(&self.name, self.ok(&["delete", collection, id]))
    }

    /// `get`: the data, or `None` when the command fails with `not_found`.
    fn get(&self, collection: &str, id: &str) -> Option<Value> {
        let out = self.run_with(false, &["get", collection, id], &[]);
        if out.success() {
            return Some(out.json());
        }
        let err = out.error();
        assert_eq!(err["error"], "not_found", "{}: get {collection}/{id}: {err}", self.name);
        None
    }

    fn list(&self, collection: &str) -> Value {
        self.ok(&["list", collection])
    }

    fn status(&self) -> Value {
        self.ok(&["status"])
    }

    /// `conflicts` (every record: one page of up to 1000).
    fn conflicts(&self) -> Value {
        let out = self.run_with(false, &["conflicts", "--limit", "1000"], &[]);
        assert!(out.success(), "{}: conflicts failed: {out:?}", self.name);
        out.json()
    }

    /// `sync --store URL`, which must succeed: its report (checked for shape).
    fn sync(&self) -> Value {
        let out = self.sync_out(true, &[]);
        assert!(out.success(), "{}: sync failed: {out:?}", self.name);
        let report = out.json();
        check_report(&report);
        report
    }

    /// `sync`, with the URL passed or not (it is kept in the database), and more environment.
    fn sync_out(&self, with_store: bool, env: &[(&str, &str)]) -> Out {
        self.run_with(with_store, &["sync"], env)
    }
}

fn change_id(device: &str, v: Value) -> String {
    v.as_str().unwrap_or_else(|| panic!("{device}: a write printed {v}, not a change id")).to_owned()
}

/// The store's segments as stored: `(object name, parsed JSON)`, in log order.
fn segments(store: &StoreUnderTest) -> Vec<(String, Value)> {
    store
        .objects
        .list("log")
        .into_iter()
        .map(|name| {
            let name = format!("log/{name}");
            let bytes = store.objects.read(&name).unwrap();
            let v: Value =
                serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{name} is not JSON ({e}): {bytes:?}"));
            (name, v)
        })
        .collect()
}

/// Every change in the store's log, in seq order, after checking the log as
/// stored: each segment is named after its first seq, seqs run 1..=N with no
/// gap or repeat, each segment chains on the one before, and no change id
/// appears twice.
fn logged_changes(store: &StoreUnderTest) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut prev_hash: Option<Value> = None;
    for (name, segment) in segments(store) {
        let changes = segment["changes"].as_array().unwrap_or_else(|| panic!("{name}: no changes: {segment}"));
        assert!(!changes.is_empty(), "{name} holds no changes");
        let first = changes[0]["seq"].as_u64().unwrap();
        assert_eq!(name, format!("log/{first:020}.json"), "a segment is not named after its first seq");
        if let Some(prev) = &prev_hash {
            assert_eq!(&segment["prev_hash"], prev, "{name} does not chain on the segment before it");
        }
        prev_hash = Some(segment["state_hash"].clone());
        out.extend(changes.iter().cloned());
    }
    let seqs: Vec<u64> = out.iter().map(|c| c["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=out.len() as u64).collect::<Vec<_>>(), "the log's seqs are not 1..=N");
    let mut seen = HashSet::new();
    for c in &out {
        let id = c["change_id"].as_str().unwrap();
        assert!(seen.insert(id.to_owned()), "change {id} is logged twice: {c}");
    }
    out
}

/// The store's head as its last segment says: `(seq, state_hash, state_digest)`.
fn log_head(store: &StoreUnderTest) -> (u64, Value, Value) {
    let changes = logged_changes(store);
    let (_, last) = segments(store).pop().expect("the log is empty");
    (changes.len() as u64, last["state_hash"].clone(), last["state_digest"].clone())
}

/// `meta.json`, the head hint, if present.
fn meta(store: &StoreUnderTest) -> Option<Value> {
    store.objects.read("meta.json").map(|b| serde_json::from_slice(&b).expect("meta.json is JSON"))
}

/// Asserts that every device stands at the store's head (its last segment's
/// seq, chain head and digest) with nothing pending, and that their `list`s
/// of `collection` are the same (and equal to `expected`, when given).
fn assert_converged(store: &StoreUnderTest, devices: &[&Device], collection: &str, expected: Option<&Value>) {
    let (head, state_hash, state_digest) = log_head(store);
    let first = devices[0].list(collection);
    if let Some(expected) = expected {
        assert_eq!(&first, expected, "{}: list {collection}", devices[0].name);
    }
    for d in devices {
        let st = d.status();
        assert_eq!(st["cursor"], head, "{}: {st}", d.name);
        assert_eq!(st["state_hash"], state_hash, "{}: {st}", d.name);
        assert_eq!(st["state_digest"], state_digest, "{}: {st}", d.name);
        assert_eq!(st["pending"], 0, "{}: {st}", d.name);
        assert_eq!(st["failed"], 0, "{}: {st}", d.name);
        assert_eq!(d.list(collection), first, "{} and {} differ on list {collection}", d.name, devices[0].name);
    }
}

/// `list` output for `(id, data)` pairs, sorted by id as `list` sorts.
fn listing(items: &[(&str, Value)]) -> Value {
    let mut items: Vec<(&str, Value)> = items.to_vec();
    items.sort_by(|a, b| a.0.cmp(b.0));
    Value::Array(items.iter().map(|(id, data)| json!({"id": id, "data": data})).collect())
}

// ---------------------------------------------------------------------------
// 1. Three devices edit offline, then sync in every order.
// ---------------------------------------------------------------------------

store_scenario!(offline_edits_on_three_devices_sync_a_b_c, |s| offline_edits(s, [0, 1, 2]));
store_scenario!(offline_edits_on_three_devices_sync_a_c_b, |s| offline_edits(s, [0, 2, 1]));
store_scenario!(offline_edits_on_three_devices_sync_b_a_c, |s| offline_edits(s, [1, 0, 2]));
store_scenario!(offline_edits_on_three_devices_sync_b_c_a, |s| offline_edits(s, [1, 2, 0]));
store_scenario!(offline_edits_on_three_devices_sync_c_a_b, |s| offline_edits(s, [2, 0, 1]));
store_scenario!(offline_edits_on_three_devices_sync_c_b_a, |s| offline_edits(s, [2, 1, 0]));

/// Three devices share a starting point, edit offline (overlapping entities
/// and fields, deletes, revivals, entities new to the others), sync in
/// `order` (indices into [A, B, C]), then once more each: all converge on the
/// state the field-level merge gives, whatever the order.
fn offline_edits(store: &StoreUnderTest, order: [usize; 3]) {
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a", store);
    let b = Device::new(dir.path(), "b", store);
    let c = Device::new(dir.path(), "c", store);
    let devices = [&a, &b, &c];
    let [e1, e2, e3, e4, u1, u2] = std::array::from_fn(|_| random_uuid());
    let (e1, e2, e3, e4, u1, u2) = (&*e1, &*e2, &*e3, &*e4, &*u1, &*u2);

    // The shared starting point.
    a.put("tasks", e1, json!({"title": "base", "done": false, "n": 0}));
    a.put("tasks", e2, json!({"x": 1}));
    a.put("tasks", e3, json!({"a": 1, "b": 1}));
    a.put("tasks", e4, json!({"z": 0}));
    for d in devices {
        let r = d.sync();
        assert_eq!(r["verified"], true, "{}: {r}", d.name);
        assert_eq!(r["pending"], 0, "{}: {r}", d.name);
    }
    assert_converged(store, &devices, "tasks", None);
    assert_eq!(logged_changes(store).len(), 4);

    // Offline writes, in this wall-clock (so HLC) order.
    let mut written: [Vec<String>; 3] = Default::default();
    let mut step = |i: usize, id: String| {
        written[i].push(id);
        tick();
    };
    step(0, a.patch("tasks", e1, json!({"title": "A"}))); // three devices, three fields of e1
    step(1, b.patch("tasks", e1, json!({"done": true})));
    step(2, c.patch("tasks", e1, json!({"n": 3})));
    step(1, b.delete("tasks", e2)); // deleted…
    step(2, c.patch("tasks", e2, json!({"y": 2}))); // …and revived later with y alone
    step(0, a.patch("tasks", e3, json!({"a": 2}))); // one field written twice: the later wins
    step(2, c.patch("tasks", e3, json!({"a": 3})));
    step(0, a.patch("tasks", e4, json!({"z": 1}))); // edited, then deleted later
    step(2, c.delete("tasks", e4));
    step(0, a.put("tasks", u1, json!({"k": "A"}))); // new on A, and written on B unseen
    step(1, b.patch("tasks", u1, json!({"m": "B"})));
    step(2, c.put("tasks", u2, json!({"v": 1}))); // new on C, deleted on B unseen
    step(1, b.delete("tasks", u2));

    // Each device reads its own pending writes merged on what it had.
    assert_eq!(a.get("tasks", e1), Some(json!({"title": "A", "done": false, "n": 0})));
    assert_eq!(b.get("tasks", e1), Some(json!({"title": "base", "done": true, "n": 0})));
    assert_eq!(b.get("tasks", e2), None);
    assert_eq!(c.get("tasks", e4), None);
    for (i, d) in devices.iter().enumerate() {
        let st = d.status();
        assert_eq!(st["pending"], written[i].len(), "{}: {st}", d.name);
    }

    let mut lost: Vec<(usize, Lost)> = Vec::new();
    for &i in &order {
        let d = devices[i];
        let r = d.sync();
        assert_eq!(r["verified"], true, "{}: {r}", d.name);
        assert_eq!(r["healed"], false, "{}: {r}", d.name);
        assert_eq!(r["pending"], 0, "{}: {r}", d.name);
        assert_eq!(r["failed"], 0, "{}: {r}", d.name);
        assert_eq!(r["pushed"], written[i].len(), "{}: {r}", d.name);
        assert_eq!(r["applied"], written[i].len(), "{}: {r}", d.name);
        assert_eq!(r["duplicate"], 0, "{}: {r}", d.name);
        lost.extend(lost_summary(&r).into_iter().map(|l| (i, l)));
    }
    // The final round, without --store: the URL is kept in each database.
    for d in devices {
        let out = d.sync_out(false, &[]);
        assert!(out.success(), "{}: sync with the kept store URL: {out:?}", d.name);
        let r = out.json();
        assert_eq!((&r["pushed"], &r["verified"], &r["pending"]), (&json!(0), &json!(true), &json!(0)), "{r}");
    }

    // The merge rules, by hand: every field written survives unless a later write to it won.
    let expected = listing(&[
        (e1, json!({"title": "A", "done": true, "n": 3})),
        (e2, json!({"y": 2})),
        (e3, json!({"a": 3, "b": 1})),
        (u1, json!({"k": "A", "m": "B"})),
    ]);
    assert_converged(store, &devices, "tasks", Some(&expected));
    for d in devices {
        assert_eq!(d.get("tasks", e4), None, "{}", d.name);
        assert_eq!(d.get("tasks", u2), None, "{}", d.name);
        // A sync with nothing new changes nothing.
        let r = d.sync();
        assert_eq!((&r["pushed"], &r["pulled"], &r["verified"]), (&json!(0), &json!(0), &json!(true)), "{r}");
    }

    // The log holds every write exactly once, from the device that made it.
    let log = logged_changes(store);
    assert_eq!(log.len(), 4 + written.iter().map(Vec::len).sum::<usize>(), "the log: {log:?}");
    let by_id: HashMap<&str, &Value> = log.iter().map(|c| (c["change_id"].as_str().unwrap(), c)).collect();
    for (i, d) in devices.iter().enumerate() {
        let device_id = d.status()["device_id"].clone();
        for id in &written[i] {
            let c = by_id.get(id.as_str()).unwrap_or_else(|| panic!("{}: change {id} is not in the log", d.name));
            assert_eq!(c["device_id"], device_id, "{}: change {id}", d.name);
        }
    }
    // A write loses only when it reaches the store after a later write of
    // the same field (or a later delete) by another device: which ones lose
    // depends on the order, the final state does not.
    let before = |x: usize, y: usize| order.iter().position(|&i| i == x) < order.iter().position(|&i| i == y);
    let mut expected_lost: Vec<(usize, &str, &str, Option<Vec<&str>>)> = Vec::new();
    if before(2, 1) {
        expected_lost.push((1, e2, "superseded", None)); // B's delete, older than C's y
    }
    if before(2, 0) {
        expected_lost.push((0, e3, "superseded", Some(vec!["a"]))); // A's a = 2, older than C's a = 3
        expected_lost.push((0, e4, "deleted", Some(vec!["z"]))); // A's z = 1, older than C's delete
    }
    if before(1, 2) {
        expected_lost.push((2, u2, "deleted", Some(vec!["v"]))); // C's put, older than B's delete
    }
    expected_lost.sort();
    let mut seen_lost: Vec<(usize, &str, &str, Option<Vec<&str>>)> = lost
        .iter()
        .map(|(i, l)| {
            let fields = (l.1 != e2).then(|| l.3.iter().map(String::as_str).collect());
            (*i, l.1.as_str(), l.2.as_str(), fields)
        })
        .collect();
    seen_lost.sort();
    assert_eq!(seen_lost, expected_lost, "what lost, syncing in order {order:?}: {lost:?}");
    // The head hint caught up with the log (the last write updated it).
    let (head, state_hash, _) = log_head(store);
    let hint = meta(store).expect("meta.json was written");
    assert_eq!((&hint["head"], &hint["state_hash"]), (&json!(head), &state_hash), "meta.json: {hint}");
}

// ---------------------------------------------------------------------------
// 2. Four devices write and sync concurrently.
// ---------------------------------------------------------------------------

store_scenario!(four_devices_writing_and_syncing_concurrently_lose_nothing, concurrent_writers);

/// What one writer thread did.
#[derive(Default)]
struct Writer {
    /// `(entity id, change id, data)` of every put.
    puts: Vec<(String, String, Value)>,
    syncs: u64,
    /// Syncs that pushed something.
    pushing_syncs: u64,
    /// Syncs that also pulled other devices' changes (they interleaved with others).
    pulling_syncs: u64,
    /// The output of every sync that failed.
    failures: Vec<String>,
}

/// Four devices each loop { put a new entity ; sync } for a few seconds, all
/// at once; then each syncs twice. Every write is in the log exactly once
/// with gapless seqs, and all four hold every entity with the same digest.
fn concurrent_writers(store: &StoreUnderTest) {
    const RUN_FOR: Duration = Duration::from_secs(8);
    let dir = tempfile::tempdir().unwrap();
    let devices: Vec<Device> = (0..4).map(|i| Device::new(dir.path(), &format!("d{i}"), store)).collect();
    let deadline = Instant::now() + RUN_FOR;
    let writers: Vec<Writer> = std::thread::scope(|s| {
        let threads: Vec<_> = devices
            .iter()
            .map(|d| {
                s.spawn(move || {
                    let mut w = Writer::default();
                    while Instant::now() < deadline {
                        let id = random_uuid();
                        let data = json!({"device": d.name, "n": w.puts.len()});
                        let change = d.put("items", &id, data.clone());
                        w.puts.push((id, change, data));
                        let out = d.sync_out(true, &[]);
                        w.syncs += 1;
                        if out.success() {
                            let r = out.json();
                            check_report(&r);
                            assert_eq!(r["verified"], true, "{}: {r}", d.name);
                            if r["pushed"].as_u64().unwrap() > 0 {
                                w.pushing_syncs += 1;
                            }
                            if r["pulled"].as_u64().unwrap() > 0 {
                                w.pulling_syncs += 1;
                            }
                        } else {
                            w.failures.push(format!("{}: {out:?}", d.name));
                        }
                    }
                    w
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for _ in 0..2 {
        for d in &devices {
            let r = d.sync();
            assert_eq!((&r["verified"], &r["pending"]), (&json!(true), &json!(0)), "{}: {r}", d.name);
        }
    }

    let puts: usize = writers.iter().map(|w| w.puts.len()).sum();
    let syncs: u64 = writers.iter().map(|w| w.syncs).sum();
    let pushing: u64 = writers.iter().map(|w| w.pushing_syncs).sum();
    let pulling: u64 = writers.iter().map(|w| w.pulling_syncs).sum();
    let failures: Vec<&String> = writers.iter().flat_map(|w| &w.failures).collect();
    let log = logged_changes(store);
    let segment_count = segments(store).len();
    // A push that loses a race for its seqs re-plans on the winner's segment
    // inside the same sync: that is not visible from outside. What is: a
    // sync that failed leaves its write to the next one, which then logs two
    // changes in one segment (fewer segments than puts).
    eprintln!(
        "concurrent writers: {puts} puts, {syncs} syncs ({pushing} pushed, {pulling} also pulled others' changes, {} \
         failed), {} changes in {segment_count} segments",
        failures.len(),
        log.len()
    );
    assert!(failures.is_empty(), "syncs failed while four devices wrote at once: {failures:#?}");
    assert!(writers.iter().all(|w| w.puts.len() >= 2), "a device wrote fewer than 2 entities in {RUN_FOR:?}");

    // Every write exactly once (logged_changes checks the once and the gapless seqs).
    assert_eq!(log.len(), puts, "the log holds {} changes for {puts} puts", log.len());
    let logged: HashSet<&str> = log.iter().map(|c| c["change_id"].as_str().unwrap()).collect();
    for (i, w) in writers.iter().enumerate() {
        for (_, change, _) in &w.puts {
            assert!(logged.contains(change.as_str()), "d{i}'s change {change} is not in the log");
        }
    }
    let mut expected: Vec<(&str, Value)> =
        writers.iter().flat_map(|w| &w.puts).map(|(id, _, data)| (id.as_str(), data.clone())).collect();
    expected.sort_by(|x, y| x.0.cmp(y.0));
    let expected = listing(&expected);
    let refs: Vec<&Device> = devices.iter().collect();
    assert_converged(store, &refs, "items", Some(&expected));

    // meta.json is only a hint, but a true one: a head the log reaches, with that head's chain hash.
    let hint = meta(store).expect("meta.json");
    let hinted = hint["head"].as_u64().unwrap();
    assert!(hinted <= log.len() as u64, "meta.json claims head {hinted} past the log's {}", log.len());
    let at_hint =
        segments(store).into_iter().find(|(_, s)| s["changes"].as_array().unwrap().last().unwrap()["seq"] == hinted);
    let (name, segment) = at_hint.unwrap_or_else(|| panic!("no segment ends at meta.json's head {hinted}"));
    assert_eq!(hint["state_hash"], segment["state_hash"], "meta.json's chain hash is not {name}'s: {hint}");
    eprintln!("concurrent writers: meta.json says head {hinted} of {}", log.len());
}

// ---------------------------------------------------------------------------
// 3. A device dies between its segment write and its meta.json write.
// ---------------------------------------------------------------------------

store_scenario!(a_device_killed_after_writing_its_segment_loses_nothing, |s| killed_after_segment(s, false));
store_scenario!(a_device_killed_after_writing_its_segment_resyncs_without_healing, |s| killed_after_segment(s, true));

/// Device A's sync writes its segment and dies before `meta.json`; B finds
/// the segment past the hinted head; A, back, finds its change logged (a
/// duplicate, not logged twice); the next write moves `meta.json` to the head.
/// `strict`: A's return is also a plain verified sync (no mismatch, no re-bootstrap).
fn killed_after_segment(store: &StoreUnderTest, strict: bool) {
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a", store);
    let b = Device::new(dir.path(), "b", store);
    let base = random_uuid();
    a.put("notes", &base, json!({"text": "base"}));
    a.sync();
    b.sync();
    let hint = meta(store).expect("meta.json after the first write");
    assert_eq!(hint["head"], 1, "{hint}");

    // A writes its segment and dies before meta.json.
    let x = random_uuid();
    let change = a.put("notes", &x, json!({"text": "written by A before it died"}));
    let out = a.sync_out(true, &[("DELTASYNC_FAULT", "abort-after-segment")]);
    assert!(!out.success(), "the faulted sync did not die: {out:?}");
    assert_eq!(out.code, None, "the faulted sync should die of SIGABRT: {out:?}");
    let log = logged_changes(store);
    assert_eq!(log.len(), 2, "the dying sync's segment is not in the store: {log:?}");
    assert_eq!(log[1]["change_id"], change.as_str());
    assert_eq!(meta(store).unwrap()["head"], 1, "meta.json moved although A died before writing it");
    assert_eq!(a.status()["pending"], 1, "A's change left its outbox although A never saw it logged");

    // B finds the segment past the hinted head.
    let r = b.sync();
    assert_eq!((&r["pulled"], &r["verified"]), (&json!(1), &json!(true)), "{r}");
    assert_eq!(b.get("notes", &x), Some(json!({"text": "written by A before it died"})));

    // A, back without the fault: its change is found logged, not logged again.
    let r = a.sync();
    assert_eq!(r["pushed"], 1, "{r}");
    assert_eq!(r["duplicate"], 1, "A's change should be a duplicate of the one its dead sync logged: {r}");
    assert_eq!(r["applied"], 0, "{r}");
    assert_eq!(r["pending"], 0, "{r}");
    if strict {
        assert_eq!((&r["verified"], &r["healed"], &r["bootstrapped"]), (&json!(true), &json!(false), &json!(0)), "{r}");
        assert!(r.get("mismatch").is_none_or(Value::is_null), "{r}");
    }
    let log = logged_changes(store);
    assert_eq!(log.len(), 2, "A's change was logged twice: {log:?}");
    assert_converged(store, &[&a, &b], "notes", None);
    assert_eq!(a.get("notes", &x), b.get("notes", &x));

    // The next write moves meta.json to the true head.
    b.put("notes", &random_uuid(), json!({"text": "after"}));
    b.sync();
    let (head, state_hash, state_digest) = log_head(store);
    assert_eq!(head, 3);
    let hint = meta(store).unwrap();
    assert_eq!((&hint["head"], &hint["state_hash"], &hint["state_digest"]), (&json!(3), &state_hash, &state_digest));
    a.sync();
    assert_converged(store, &[&a, &b], "notes", None);
}

// ---------------------------------------------------------------------------
// 4. Objects edited in the store.
// ---------------------------------------------------------------------------

store_scenario!(a_segment_with_edited_data_is_refused, edited_segment_data);
store_scenario!(a_segment_with_an_edited_state_hash_is_refused, edited_segment_state_hash);
store_scenario!(an_edited_snapshot_is_not_trusted, |s| edited_snapshot(s, false));
store_scenario!(a_snapshot_with_an_edited_chain_head_is_named_or_skipped, |s| edited_snapshot(s, true));
store_scenario!(a_missing_segment_is_not_taken_for_the_end_of_the_log, missing_segment);

/// Replaces the one occurrence of `from` in object `name` with `to` (same
/// length or not: the JSON stays valid as long as both are plain string contents).
fn edit_object(store: &StoreUnderTest, name: &str, from: &str, to: &str) {
    let text = String::from_utf8(store.objects.read(name).unwrap_or_else(|| panic!("no {name}"))).unwrap();
    assert_eq!(text.matches(from).count(), 1, "{from:?} is not in {name} exactly once: {text}");
    store.objects.write(name, text.replace(from, to).as_bytes());
}

/// Asserts that `out` is the `integrity` error naming `object` as changed after it was written.
fn assert_tampered(out: &Out, object: &str) {
    let err = out.error();
    assert_eq!(err["error"], "integrity", "{err}");
    let message = err["message"].as_str().unwrap();
    assert!(message.contains(object), "the message does not name {object}: {message}");
    assert!(message.contains("changed after it was written"), "{message}");
}

/// Two devices write three segments; returns them and the ids of what they wrote.
fn three_segments<'s>(store: &'s StoreUnderTest, dir: &Path) -> (Device<'s>, Device<'s>, [String; 3]) {
    let a = Device::new(dir, "a", store);
    let b = Device::new(dir, "b", store);
    let ids: [String; 3] = std::array::from_fn(|_| random_uuid());
    a.put("notes", &ids[0], json!({"text": "original text"}));
    a.sync();
    b.put("notes", &ids[1], json!({"text": "from b"}));
    b.sync();
    a.put("notes", &ids[2], json!({"text": "from a again"}));
    a.sync();
    b.sync();
    assert_eq!(segments(store).len(), 3);
    assert_converged(store, &[&a, &b], "notes", None);
    (a, b, ids)
}

/// A value inside a change of the first segment is edited (valid JSON still).
fn edited_segment_data(store: &StoreUnderTest) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, ids) = three_segments(store, dir.path());
    let first = "log/00000000000000000001.json";
    edit_object(store, first, "original text", "forged text");

    // A device new to the store reads the log from its start: refused, nothing applied.
    let c = Device::new(dir.path(), "c", store);
    assert_tampered(&c.sync_out(true, &[]), first);
    let st = c.status();
    assert_eq!((&st["cursor"], &c.list("notes")), (&json!(0), &json!([])), "{st}");

    // A device that has the log and finds nothing new does not read it again:
    // its sync succeeds and it keeps the original.
    let r = a.sync();
    assert_eq!((&r["pulled"], &r["verified"]), (&json!(0), &json!(true)), "{r}");
    assert_eq!(a.get("notes", &ids[0]), Some(json!({"text": "original text"})));

    // But a write needs the ledger, which a new process builds from the log
    // (there is no snapshot yet): it is refused too, and the write stays in the outbox.
    b.put("notes", &random_uuid(), json!({"text": "on top"}));
    assert_tampered(&b.sync_out(true, &[]), first);
    assert_eq!(b.status()["pending"], 1);
    assert_eq!(segments(store).len(), 3, "a segment was written on top of a tampered log");
}

/// Only a segment's claimed `state_hash` is edited: its changes are intact.
fn edited_segment_state_hash(store: &StoreUnderTest) {
    let dir = tempfile::tempdir().unwrap();
    let (_a, _b, _) = three_segments(store, dir.path());
    let second = "log/00000000000000000002.json";
    let segment: Value = serde_json::from_slice(&store.objects.read(second).unwrap()).unwrap();
    let claimed = segment["state_hash"].as_str().unwrap().to_owned();
    let forged: String = claimed.chars().rev().collect();
    assert_ne!(forged, claimed);
    edit_object(store, second, &format!("\"state_hash\":\"{claimed}\""), &format!("\"state_hash\":\"{forged}\""));
    let c = Device::new(dir.path(), "c", store);
    assert_tampered(&c.sync_out(true, &[]), second);
    assert_eq!(c.status()["cursor"], 0);
}

/// The number of changes in the log after which a device writes a snapshot
/// (`deltasync_engine::file_store::snapshot::SNAPSHOT_EVERY`; `is_due`).
const SNAPSHOT_EVERY: usize = 10_000;

/// A snapshot's entity is edited: its digest no longer matches its
/// entities, so a new device does not trust it and reads the log instead.
/// `strict`: with the header's chain head edited, a new device either syncs
/// (from the log) or fails naming the snapshot, not the intact segment after it.
fn edited_snapshot(store: &StoreUnderTest, strict: bool) {
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a", store);
    let b = Device::new(dir.path(), "b", store);
    // Enough changes for a snapshot, in one import and one sync.
    let needle = random_uuid();
    let mut lines = String::new();
    for i in 0..SNAPSHOT_EVERY - 1 {
        let line = json!({"op": "put", "collection": "bulk", "id": format!("e{i:05}"), "data": {"i": i}});
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    lines.push_str(
        &json!({"op": "put", "collection": "bulk", "id": needle, "data": {"text": "true value"}}).to_string(),
    );
    let file = dir.path().join("bulk.ndjson");
    std::fs::write(&file, lines).unwrap();
    let imported = a.ok(&["import", file.to_str().unwrap()]);
    assert_eq!(imported["written"], SNAPSHOT_EVERY, "{imported}");
    let r = a.sync();
    assert_eq!((&r["applied"], &r["verified"]), (&json!(SNAPSHOT_EVERY), &json!(true)), "{r}");
    let snapshots = store.objects.list("snapshots");
    assert_eq!(snapshots, vec![format!("{SNAPSHOT_EVERY:020}.ndjson")], "no snapshot after {SNAPSHOT_EVERY} changes");
    let snapshot = format!("snapshots/{}", snapshots[0]);
    // One more segment after the snapshot.
    b.put("bulk", "after", json!({"text": "after the snapshot"}));
    b.sync();
    a.sync();

    let original = store.objects.read(&snapshot).unwrap();
    edit_object(store, &snapshot, "true value", "forged value");
    let c = Device::new(dir.path(), "c", store);
    let out = c.sync_out(true, &[]);
    assert!(out.success(), "a new device could not sync past a damaged snapshot: {out:?}");
    let r = out.json();
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(c.get("bulk", &needle), Some(json!({"text": "true value"})), "the forged snapshot was believed");
    assert_eq!(c.get("bulk", "after"), Some(json!({"text": "after the snapshot"})));
    assert_converged(store, &[&a, &b, &c], "bulk", None);

    // The snapshot's claimed chain head alone edited (its entities still give its digest).
    store.objects.write(&snapshot, &original);
    let header: Value = serde_json::from_slice(original.split(|&b| b == b'\n').next().unwrap()).unwrap();
    let claimed = header["state_hash"].as_str().unwrap().to_owned();
    let forged: String = claimed.chars().rev().collect();
    edit_object(store, &snapshot, &claimed, &forged);
    let d = Device::new(dir.path(), "d", store);
    let out = d.sync_out(true, &[]);
    if out.success() {
        // Read from the log, past the snapshot: the true state.
        assert_eq!(out.json()["verified"], true, "{out:?}");
        assert_converged(store, &[&a, &d], "bulk", None);
    } else {
        // Refused: the forged chain head is not taken, and nothing is applied.
        let err = out.error();
        assert_eq!(err["error"], "integrity", "{err}");
        assert_eq!(d.status()["cursor"], 0);
        if strict {
            let message = err["message"].as_str().unwrap();
            assert!(message.contains(&snapshot), "the error does not name the edited {snapshot}: {message}");
        }
    }
}

/// Segment 2 of 3 is missing from the store (deleted by hand, or not yet
/// delivered by a tool that syncs the folder between machines), while
/// `meta.json` says the log reaches 3. A new device must not take seq 2 for
/// its own write; once segment 2 is back, everyone converges.
fn missing_segment(store: &StoreUnderTest) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, _) = three_segments(store, dir.path());
    assert_eq!(meta(store).unwrap()["head"], 3);
    let second = "log/00000000000000000002.json";
    let held_back = store.objects.read(second).unwrap();
    std::fs::write(dir.path().join("held-back.json"), &held_back).unwrap();
    store.objects.remove(second);

    let c = Device::new(dir.path(), "c", store);
    let mine = random_uuid();
    let change = c.put("notes", &mine, json!({"text": "from c"}));
    let out = c.sync_out(true, &[]);
    let in_hole = store.objects.read(second);
    assert!(
        in_hole.is_none(),
        "c wrote its change into the missing segment's seq while meta.json says the log reaches 3 (its sync: \
         {out:?}): {}",
        String::from_utf8_lossy(in_hole.as_deref().unwrap_or_default())
    );

    // Segment 2 arrives: everyone converges, c's change logged once, after 3.
    store.objects.write(second, &held_back);
    let r = c.sync();
    assert_eq!((&r["verified"], &r["pending"]), (&json!(true), &json!(0)), "{r}");
    a.sync();
    b.sync();
    assert_converged(store, &[&a, &b, &c], "notes", None);
    let log = logged_changes(store);
    assert_eq!(log.len(), 4, "{log:?}");
    assert_eq!(log[3]["change_id"], change.as_str());
}

// ---------------------------------------------------------------------------
// 5. Concurrent conflicting edits under the `fields` policy.
// ---------------------------------------------------------------------------

store_scenario!(conflicting_offline_edits_lose_nothing_under_fields_b_syncs_first, |s| conflicting_edits(s, true));
store_scenario!(conflicting_offline_edits_lose_nothing_under_fields_a_syncs_first, |s| conflicting_edits(s, false));

/// A and B edit the same entities offline: on `e1` A writes first, on `e2`
/// B does; then both sync, B first when `b_first`. Whatever the order, the
/// later write of each field wins and every other field survives; the one
/// older write that reaches the store after a newer one (A's e1 title when
/// B syncs first, B's e2 title otherwise) loses, and a conflict record,
/// which both devices list, keeps its value.
fn conflicting_edits(store: &StoreUnderTest, b_first: bool) {
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a", store);
    let b = Device::new(dir.path(), "b", store);
    let e1 = random_uuid();
    let e2 = random_uuid();
    a.put("docs", &e1, json!({"title": "base", "body": "base", "n": 0}));
    a.put("docs", &e2, json!({"title": "base"}));
    a.sync();
    b.sync();

    let a1 = a.patch("docs", &e1, json!({"title": "title by A", "n": 1}));
    tick();
    b.patch("docs", &e1, json!({"title": "title by B", "body": "body by B"}));
    let b2 = b.patch("docs", &e2, json!({"title": "e2 by B"}));
    tick();
    a.patch("docs", &e2, json!({"title": "e2 by A"}));

    let (first, second) = if b_first { (&b, &a) } else { (&a, &b) };
    let r1 = first.sync();
    assert_eq!((&r1["applied"], &r1["conflicts"]), (&json!(2), &json!(0)), "{}: {r1}", first.name);
    let r2 = second.sync();
    assert_eq!((&r2["applied"], &r2["verified"]), (&json!(2), &json!(true)), "{}: {r2}", second.name);
    let (loser, losing_entity, losing_value) = if b_first { (&a1, &e1, "title by A") } else { (&b2, &e2, "e2 by B") };
    assert_eq!(
        lost_summary(&r2),
        vec![("docs".to_owned(), losing_entity.clone(), "superseded".to_owned(), vec!["title".to_owned()])],
        "{}: {r2}",
        second.name
    );
    first.sync();

    let expected = listing(&[
        (&e1, json!({"title": "title by B", "body": "body by B", "n": 1})),
        (&e2, json!({"title": "e2 by A"})),
    ]);
    assert_converged(store, &[&a, &b], "docs", Some(&expected));

    // Both devices list the one record of what lost, with its value in it.
    let ca = a.conflicts();
    assert_eq!(ca, b.conflicts(), "the devices list different conflicts");
    let records = ca["conflicts"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{ca}");
    let record = &records[0];
    assert_eq!(record["change_id"], loser.as_str(), "{record}");
    assert_eq!(record["entity_id"], losing_entity.as_str(), "{record}");
    assert_eq!(record["reason"], "superseded", "{record}");
    assert_eq!(record["fields"], json!(["title"]), "{record}");
    assert_eq!(record["data"]["title"], losing_value, "the losing value is not kept: {record}");
    let in_log: BTreeMap<u64, Value> = segments(store)
        .into_iter()
        .flat_map(|(_, s)| s["conflicts"].as_array().cloned().unwrap_or_default())
        .map(|r| (r["id"].as_u64().unwrap(), r))
        .collect();
    assert_eq!(in_log.len(), 1, "the store's segments hold {} conflict records: {in_log:?}", in_log.len());
}

// ---------------------------------------------------------------------------
// A folder that a sync tool replicates is refused before anything is written.
// ---------------------------------------------------------------------------

#[test]
fn a_folder_a_sync_tool_replicates_is_refused_before_the_first_write() {
    let dir = tempfile::tempdir().unwrap();
    let dropbox = dir.path().join("Dropbox");
    let root = dropbox.join("apps/tasks");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(dropbox.join(".dropbox"), b"{}").unwrap();
    let store = StoreUnderTest {
        url: format!("file://{}", root.display()),
        env: Vec::new(),
        objects: Box::new(FolderObjects { root: root.clone() }),
        _guard: Box::new(()),
    };
    let a = Device::new(dir.path(), "a", &store);
    a.put("notes", &random_uuid(), json!({"text": "kept in the outbox"}));
    let out = a.sync_out(true, &[]);
    let err = out.error();
    assert_eq!(err["error"], "file_store", "{err}");
    let message = err["message"].as_str().unwrap();
    assert!(message.contains("Dropbox") && message.contains(".dropbox"), "{message}");
    assert!(store.objects.list("log").is_empty(), "a segment was written to a replicated folder");
    assert_eq!(a.status()["pending"], 1, "the change left the outbox");
}

// ---------------------------------------------------------------------------
// A store whose conditional writes do not hold is refused, with the reason.
// ---------------------------------------------------------------------------

#[test]
fn a_webdav_server_that_ignores_conditional_writes_is_refused_with_the_reason() {
    let Some(store) = served_store(stores::rclone()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = Device::new(dir.path(), "a", &store);
    a.put("notes", &random_uuid(), json!({"text": "kept in the outbox"}));
    let out = a.sync_out(true, &[]);
    let err = out.error();
    assert_eq!(err["error"], "file_store", "{err}");
    let message = err["message"].as_str().unwrap();
    assert!(message.contains("If-None-Match"), "the message does not say which check failed: {message}");
    assert!(store.objects.list("log").is_empty(), "a segment was written to a store that failed the probe");
    assert_eq!(a.status()["pending"], 1, "the change left the outbox");
}
