//! No poison pills (issue 10): no change the server accepts can make an
//! answer that a client cannot parse.
//!
//! Data nested exactly `max_depth` levels deep is pushed in every place an
//! answer can carry it (an upsert that later wins a field, one that loses to a
//! tombstone, a `reject`-policy `version_mismatch`, an append); then every kind
//! of answer is read and parsed with `serde_json` at its default recursion
//! limit into the protocol's wire types, as the Rust client does, and its
//! nesting measured: none may pass `max_depth + ENVELOPE_DEPTH`, which the
//! server's configuration keeps within `CLIENT_PARSE_DEPTH`. Two `deltasync
//! client` devices then sync that data, lose against it and heal from a
//! bootstrap of it, without error. Data one level deeper is refused whole.
//!
//! Run at the default `max_depth` and at the largest the server accepts.

mod common;

use std::collections::BTreeMap;

use common::devices::{Device, assert_converged, lost_summary};
use common::{Backend, Options, Server, delete, hlc, now_ms, upsert};
use deltasync_protocol::json::{self, CLIENT_PARSE_DEPTH, DEFAULT_MAX_DEPTH, ENVELOPE_DEPTH};
use deltasync_protocol::wire::{
    BootstrapEnd, BootstrapHeader, BootstrapLine, ConflictsResponse, ErrorBody, PullResponse, PushResponse,
    ResultStatus, StatusResponse, SyncResponse,
};
use deltasync_protocol::{ConflictReason, Op};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

store_test!(#[test] fn data_at_the_default_max_depth_is_in_every_answer_and_every_client_reads_it);
fn data_at_the_default_max_depth_is_in_every_answer_and_every_client_reads_it(backend: &Backend) {
    no_poison_pills(backend, None);
}

store_test!(#[test] fn data_at_the_largest_max_depth_allowed_is_in_every_answer_and_every_client_reads_it);
fn data_at_the_largest_max_depth_allowed_is_in_every_answer_and_every_client_reads_it(backend: &Backend) {
    no_poison_pills(backend, Some(CLIENT_PARSE_DEPTH - ENVELOPE_DEPTH));
}

/// A value exactly `levels` deep (see [`json::depth`]), objects and arrays in turn.
fn nested(levels: usize) -> Value {
    let mut v = json!("leaf");
    for level in 1..=levels {
        v = if level % 2 == 1 { json!({ "k": v }) } else { json!([v]) };
    }
    v
}

/// Upsert data exactly `levels` deep: one field `name` holding the deep part.
fn deep_fields(name: &str, levels: usize) -> Value {
    json!({ name: nested(levels - 1) })
}

fn with_base(mut change: Value, base_version: u64) -> Value {
    change["base_version"] = json!(base_version);
    change
}

fn append(change_id: &str, collection: &str, entity_id: &str, data: Value, hlc: &str) -> Value {
    json!({"change_id": change_id, "collection": collection, "entity_id": entity_id, "op": "append", "data": data, "hlc": hlc})
}

/// Blocking HTTP to the server, answers kept as text so that they can be
/// parsed exactly as a client parses them.
struct Api {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    url: String,
}

impl Api {
    fn new(url: &str) -> Api {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Api { rt, client: common::client(), url: url.to_owned() }
    }

    fn send(&self, req: reqwest::RequestBuilder) -> (u16, String) {
        self.rt.block_on(async {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    }

    fn post(&self, path: &str, body: &Value) -> (u16, String) {
        let body = serde_json::to_vec(body).unwrap();
        let req = self.client.post(format!("{}{path}", self.url)).header("content-type", "application/json").body(body);
        self.send(req)
    }

    fn get(&self, path_and_query: &str) -> (u16, String) {
        self.send(self.client.get(format!("{}{path_and_query}", self.url)))
    }
}

/// Every answer read, with how deeply it nests.
#[derive(Default)]
struct Answers {
    depths: BTreeMap<String, usize>,
}

impl Answers {
    /// Parses `text` as a `T` at `serde_json`'s default recursion limit, as the
    /// Rust client does, and records the depth of the document.
    fn parse<T: DeserializeOwned>(&mut self, what: &str, text: &str) -> T {
        let typed = serde_json::from_str::<T>(text)
            .unwrap_or_else(|e| panic!("{what}: the answer does not parse as the client parses it: {e}"));
        let value: Value = serde_json::from_str(text).unwrap();
        let depth = json::depth(&value);
        let deepest = self.depths.entry(what.to_owned()).or_default();
        *deepest = (*deepest).max(depth);
        typed
    }

    /// A 200 answer parsed as a `T`.
    fn ok<T: DeserializeOwned>(&mut self, what: &str, (status, text): (u16, String)) -> T {
        assert_eq!(status, 200, "{what}: {text}");
        self.parse(what, &text)
    }

    fn depth(&self, what: &str) -> usize {
        *self.depths.get(what).unwrap_or_else(|| panic!("no answer {what} was read"))
    }
}

fn no_poison_pills(backend: &Backend, configured: Option<usize>) {
    let max_depth = configured.unwrap_or(DEFAULT_MAX_DEPTH);
    let server_section = configured.map(|d| format!("max_depth = {d}\n")).unwrap_or_default();
    let config = format!("[server]\n{server_section}\n[collections.strict]\npolicy = \"reject\"\n");
    let server = Server::start_with(backend, Options { config: Some(config), ..Options::default() });
    let api = Api::new(&server.url);
    let mut answers = Answers::default();

    one_level_deeper_is_refused_whole(&api, &mut answers, max_depth);
    deep_data_everywhere(&api, &mut answers, max_depth);
    read_every_answer(&api, &mut answers, max_depth);
    devices_sync_lose_and_heal(&server, &api, max_depth);

    // The margin: no answer nests deeper than max_depth + ENVELOPE_DEPTH, which
    // the configuration keeps within what serde_json parses.
    let (deepest_kind, deepest) = answers.depths.iter().max_by_key(|(_, d)| **d).unwrap();
    eprintln!("max_depth {max_depth}: answer depths {:?}; deepest {deepest_kind} at {deepest}", answers.depths);
    assert!(
        *deepest <= max_depth + ENVELOPE_DEPTH,
        "{deepest_kind} nests {deepest} levels deep, past max_depth {max_depth} + ENVELOPE_DEPTH {ENVELOPE_DEPTH}"
    );
    assert!(max_depth + ENVELOPE_DEPTH <= CLIENT_PARSE_DEPTH);
    // Data at max_depth really reached the answers: a conflict's `current` sits
    // five levels down in push and sync results.
    assert_eq!(answers.depth("push with conflicts"), max_depth + 5);
    assert_eq!(answers.depth("sync with conflicts"), max_depth + 5);
    assert_eq!(answers.depth("conflicts"), max_depth + 4);
    assert_eq!(answers.depth("pull"), max_depth + 3);
    assert_eq!(answers.depth("bootstrap line"), max_depth + 2);
}

/// Data one level past `max_depth`, alone or beside a good change, in push or
/// sync, in each kind of change: a 413 naming `max_depth`, nothing written.
fn one_level_deeper_is_refused_whole(api: &Api, answers: &mut Answers, max_depth: usize) {
    let t = now_ms();
    let too_deep = [
        upsert("deep-1", "tasks", "e1", deep_fields("deep", max_depth + 1), &hlc(t, 0, "w1")),
        with_base(upsert("deep-2", "strict", "s1", deep_fields("deep", max_depth + 1), &hlc(t, 1, "w1")), 0),
        append("deep-3", "tasks", "e3", nested(max_depth + 1), &hlc(t, 2, "w1")),
    ];
    let good = upsert("fine", "tasks", "e9", json!({"a": 1}), &hlc(t, 3, "w1"));
    for change in &too_deep {
        for (path, changes) in [("/v1/push", json!([change])), ("/v1/sync", json!([good, change]))] {
            let (status, text) = api.post(path, &json!({"device_id": "w1", "changes": changes}));
            assert_eq!(status, 413, "{path} of {}: {text}", change["change_id"]);
            let body: ErrorBody = answers.parse("413", &text);
            assert_eq!(body.error, "payload_too_large", "{text}");
            assert!(body.message.contains(&format!("max_depth is {max_depth}")), "{text}");
            let details = body.details.unwrap_or_default();
            assert_eq!(details.len(), 1, "{text}");
            assert_eq!(details[0].change_id.as_deref(), change["change_id"].as_str(), "{text}");
        }
    }
    // Past what the server's JSON parser reads at all (128 levels): still a
    // 413 naming max_depth, not a 400 about invalid JSON.
    let beyond = upsert("deep-4", "tasks", "e4", nested(200), &hlc(t, 4, "w1"));
    for path in ["/v1/push", "/v1/sync"] {
        let (status, text) = api.post(path, &json!({"device_id": "w1", "changes": [beyond]}));
        assert_eq!(status, 413, "{path} of data 200 deep: {text}");
        let body: ErrorBody = answers.parse("413", &text);
        assert_eq!(body.error, "payload_too_large", "{text}");
        assert!(body.message.contains(&format!("max_depth = {max_depth}")), "{text}");
    }
    let status: StatusResponse = answers.ok("status", api.get("/v1/status"));
    assert_eq!(status.head, 0, "a refused request wrote something");
}

/// Pushes data exactly `max_depth` deep wherever an answer can carry it.
fn deep_data_everywhere(api: &Api, answers: &mut Answers, max_depth: usize) {
    let t = now_ms();
    let mut winner = deep_fields("deep", max_depth);
    winner["title"] = json!("new");
    let first = json!({"device_id": "w1", "changes": [
        upsert("c1", "tasks", "e1", winner, &hlc(t + 2000, 0, "w1")),
        with_base(upsert("c2", "strict", "s1", deep_fields("deep", max_depth), &hlc(t, 0, "w1")), 0),
        delete("c3", "tasks", "e2", &hlc(t + 2000, 1, "w1")),
        append("c4", "tasks", "e3", nested(max_depth), &hlc(t, 1, "w1")),
    ]});
    let applied: PushResponse = answers.ok("push", api.post("/v1/push", &first));
    assert!(applied.results.iter().all(|r| r.status == ResultStatus::Applied), "{:?}", applied.results);

    // Losers: a field to a newer write, an upsert to a tombstone, a stale base_version.
    let losers = json!({"device_id": "w2", "changes": [
        upsert("c5", "tasks", "e1", json!({"title": "old"}), &hlc(t + 1000, 0, "w2")),
        upsert("c6", "tasks", "e2", deep_fields("deep", max_depth), &hlc(t + 1000, 1, "w2")),
        with_base(upsert("c7", "strict", "s1", json!({"x": 1}), &hlc(t + 1000, 2, "w2")), 0),
    ]});
    let lost: PushResponse = answers.ok("push with conflicts", api.post("/v1/push", &losers));
    let reasons: Vec<_> = lost.results.iter().map(|r| r.conflict.as_ref().map(|c| c.reason)).collect();
    let expected = [ConflictReason::Superseded, ConflictReason::Deleted, ConflictReason::VersionMismatch];
    assert_eq!(reasons, expected.map(Some), "{:?}", lost.results);
    let current = lost.results[2].conflict.as_ref().unwrap().current.as_ref().unwrap();
    assert_eq!(json::depth(&current["data"]), max_depth, "the version_mismatch answer lacks the deep entity");

    // The same through sync, whose answer also pages every change from 0.
    let sync = json!({"device_id": "w2", "cursor": 0, "changes": [
        upsert("c8", "tasks", "e1", json!({"title": "older"}), &hlc(t + 500, 0, "w2")),
        with_base(upsert("c9", "strict", "s1", json!({"y": 1}), &hlc(t + 500, 1, "w2")), 0),
    ]});
    let synced: SyncResponse = answers.ok("sync with conflicts", api.post("/v1/sync", &sync));
    let reasons: Vec<_> = synced.results.iter().map(|r| r.conflict.as_ref().map(|c| c.reason)).collect();
    assert_eq!(reasons, [Some(ConflictReason::Superseded), Some(ConflictReason::VersionMismatch)]);
    assert!(synced.changes.iter().any(|c| c.change.op == Op::Append), "the sync page lacks the append");
}

/// Reads every kind of answer: pull, bootstrap, conflicts, status.
fn read_every_answer(api: &Api, answers: &mut Answers, max_depth: usize) {
    let pull: PullResponse = answers.ok("pull", api.get("/v1/pull?device_id=reader&cursor=0"));
    let deep_changes =
        pull.changes.iter().filter(|c| c.change.data.as_ref().is_some_and(|d| json::depth(d) == max_depth));
    assert_eq!(deep_changes.count(), 4, "c1, c2, c4 and c6 carry data at max_depth");

    let (status, text) = api.get("/v1/bootstrap?device_id=reader");
    assert_eq!(status, 200, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let header: BootstrapHeader = answers.parse("bootstrap header", lines[0]);
    assert_eq!(header.cursor, pull.cursor);
    let mut deep_lines = 0;
    for line in &lines[1..lines.len() - 1] {
        let deep = match answers.parse::<BootstrapLine>("bootstrap line", line) {
            BootstrapLine::Entity(e) => json::depth(&Value::Object(e.data)) == max_depth,
            BootstrapLine::Change(c) => c.change.data.as_ref().is_some_and(|d| json::depth(d) == max_depth),
        };
        deep_lines += usize::from(deep);
    }
    assert_eq!(deep_lines, 3, "entities e1 and s1 and the append carry data at max_depth");
    let end: BootstrapEnd = answers.parse("bootstrap end", lines[lines.len() - 1]);
    assert_eq!(end.count as usize, lines.len() - 2);

    let conflicts: ConflictsResponse = answers.ok("conflicts", api.get("/v1/conflicts"));
    assert_eq!(conflicts.conflicts.len(), 5, "c5, c6, c7, c8 and c9 lost");
    let _: StatusResponse = answers.ok("status", api.get("/v1/status?device_id=reader"));
}

/// Two `deltasync client` devices sync the deep data, lose against it (its
/// entity comes back as `current`), and heal from a bootstrap of it.
fn devices_sync_lose_and_heal(server: &Server, api: &Api, max_depth: usize) {
    let url = server.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Device::new(dir.path(), "a"), Device::new(dir.path(), "b"));
    for d in [&a, &b] {
        let report = d.sync(url);
        assert_eq!(report["verified"], true, "{}: {report}", d.name);
    }
    let e1 = a.get("tasks", "e1").expect("a holds tasks/e1");
    assert_eq!(e1["deep"], nested(max_depth - 1), "a's copy of the deep field differs");
    // Local writes stay within the client's own limit, the default max_depth.
    let local = DEFAULT_MAX_DEPTH.min(max_depth);
    a.ok(&["append", "tasks", "e3", &nested(local).to_string()]);
    a.patch("tasks", "e4", deep_fields("mine", local));

    // b edits; meanwhile newer deep writes land, so b's changes lose with the deep entity as `current`.
    b.patch("strict", "s1", json!({"z": 1}));
    b.patch("tasks", "e1", json!({"title": "from b"}));
    let version = {
        let (_, text) = api.get("/v1/pull?device_id=w1&cursor=0");
        let pull: PullResponse = serde_json::from_str(&text).unwrap();
        pull.changes.iter().filter(|c| c.change.entity_id.as_str() == "s1").map(|c| c.seq).max().unwrap()
    };
    let ahead = now_ms() + 120_000;
    let newer = json!({"device_id": "w1", "changes": [
        with_base(upsert("c10", "strict", "s1", deep_fields("deep2", max_depth), &hlc(ahead, 0, "w1")), version),
        upsert("c11", "tasks", "e1", json!({"title": "future", "deep3": nested(max_depth - 1)}), &hlc(ahead, 1, "w1")),
    ]});
    let (status, text) = api.post("/v1/push", &newer);
    assert_eq!(status, 200, "{text}");
    let report = b.sync(url);
    let lost = lost_summary(&report);
    let reasons: Vec<(&str, &str)> = lost.iter().map(|l| (l.1.as_str(), l.2.as_str())).collect();
    assert_eq!(reasons, [("s1", "version_mismatch"), ("e1", "superseded")], "{report}");
    let failed = b.export_pending();
    let current = &failed.iter().find(|c| c["entity_id"] == "s1").expect("s1 failed")["conflict"]["current"];
    assert_eq!(json::depth(&current["data"]), max_depth, "b's failed change lacks the deep current: {current}");

    // a heals from a bootstrap that streams every deep entity.
    a.sync(url);
    a.sqlite().execute("UPDATE meta SET value = ?1 WHERE key = 'state_hash'", ["0".repeat(64)]).unwrap();
    let healed = a.sync(url);
    assert_eq!((healed["verified"].clone(), healed["healed"].clone()), (json!(false), json!(true)), "{healed}");
    for d in [&b, &a, &b] {
        d.sync(url);
    }
    assert_converged(&[&a, &b], url, None, &[("tasks", None), ("strict", None)]);
    assert_eq!(b.get("strict", "s1").expect("s1")["deep2"], nested(max_depth - 1));
    assert_eq!(a.get("tasks", "e1").expect("e1")["deep3"], nested(max_depth - 1));
}
