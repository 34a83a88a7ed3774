//! Every bad input of protocol §7 and §8 is answered with the right status and a
//! JSON error, and leaves the store exactly as it was.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG: &str = "[server]\nmax_batch = 3\nmax_data_bytes = 100\nmax_body_bytes = 2000\n";

fn start(backend: &Backend) -> Server {
    Server::start_with(backend, Options { config: Some(CONFIG.into()), ..Options::default() })
}

fn stamp(k: u64) -> String {
    hlc(now_ms() - 60_000 + k, 0, "dev1")
}

/// Sends a request; returns (status, Content-Type, body text).
async fn send(req: reqwest::RequestBuilder) -> (u16, String, String) {
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let ct = r.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    (status, ct, r.text().await.unwrap())
}

/// Asserts a §8 error answer and returns its body.
fn assert_error(what: &str, answer: (u16, String, String), status: u16, code: &str) -> Value {
    let (s, ct, text) = answer;
    assert_eq!(s, status, "{what}: expected {status} {code}, got {s}: {text}");
    assert!(ct.starts_with("application/json"), "{what}: error Content-Type is {ct:?}: {text}");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: error is not JSON ({e}): {text}"));
    assert_eq!(body["error"], code, "{what}: {body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: no message: {body}");
    if let Some(d) = body.get("details").filter(|d| !d.is_null()) {
        for item in d.as_array().unwrap_or_else(|| panic!("{what}: details is not a list: {body}")) {
            assert!(item["index"].is_u64() && item["message"].is_string(), "{what}: bad detail {item}");
        }
    }
    body
}

/// POSTs a raw body with Content-Type application/json.
async fn post_raw(c: &reqwest::Client, url: &str, path: &str, body: &str) -> (u16, String, String) {
    send(c.post(format!("{url}{path}")).header("content-type", "application/json").body(body.to_owned())).await
}

/// Everything a client can observe of the store, minus clocks.
async fn snapshot(c: &reqwest::Client, url: &str) -> Value {
    let (_, mut st) = get(c, url, "/v1/status").await;
    st.as_object_mut().unwrap().remove("server_time");
    st.as_object_mut().unwrap().remove("devices");
    let mut lines = bootstrap_lines(c, url, "observer").await;
    lines[0].as_object_mut().unwrap().remove("server_time");
    let (_, conflicts) = get(c, url, "/v1/conflicts?limit=1000").await;
    let (_, log) = get(c, url, "/v1/pull?device_id=observer&limit=10000").await;
    json!({"status": st, "bootstrap": lines, "conflicts": conflicts, "log": log["changes"]})
}

async fn head_and_hash(c: &reqwest::Client, url: &str) -> (Value, Value, Value) {
    let (_, st) = get(c, url, "/v1/status").await;
    (st["head"].clone(), st["state_hash"].clone(), st["state_digest"].clone())
}

/// Seeds the store with an entity, an append and a conflict.
async fn seed(c: &reqwest::Client, url: &str) {
    push(
        c,
        url,
        "seed",
        vec![
            upsert("s1", "tasks", "e1", json!({"a": 1, "b": 2}), &stamp(10)),
            json!({"change_id": "s2", "collection": "tasks", "entity_id": "e1", "op": "append", "data": [1], "hlc": stamp(11)}),
            upsert("s3", "tasks", "e1", json!({"a": 0}), &stamp(1)),
        ],
    )
    .await;
}

fn good(id: &str) -> Value {
    upsert(id, "tasks", "g", json!({"v": 1}), &stamp(20))
}

fn base_change() -> Map<String, Value> {
    upsert("bad-1", "tasks", "e1", json!({"x": 1}), &stamp(30)).as_object().unwrap().clone()
}

fn set(k: &str, v: Value) -> String {
    let mut m = base_change();
    m.insert(k.into(), v);
    Value::Object(m).to_string()
}

fn without(k: &str) -> String {
    let mut m = base_change();
    m.remove(k);
    Value::Object(m).to_string()
}

fn with_op(op: &str, data: Option<Value>) -> String {
    let mut m = base_change();
    m.insert("op".into(), json!(op));
    match data {
        Some(d) => m.insert("data".into(), d),
        None => m.remove("data"),
    };
    Value::Object(m).to_string()
}

/// A change whose `data` is the raw JSON text `raw_data`.
fn raw_data(raw: &str) -> String {
    set("data", json!("__RAW__")).replace("\"__RAW__\"", raw)
}

/// (description, raw JSON text of one bad change)
fn bad_changes() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = vec![
        ("change_id missing".into(), without("change_id")),
        ("change_id a number".into(), set("change_id", json!(5))),
        ("change_id empty".into(), set("change_id", json!(""))),
        ("change_id 65 chars".into(), set("change_id", json!("c".repeat(65)))),
        ("change_id with a control char".into(), set("change_id", json!("a\u{1}b"))),
        ("collection missing".into(), without("collection")),
        ("collection with a slash".into(), set("collection", json!("bad/name"))),
        ("collection with a space".into(), set("collection", json!("has space"))),
        ("collection non-ASCII".into(), set("collection", json!("tâches"))),
        ("collection 65 chars".into(), set("collection", json!("c".repeat(65)))),
        ("collection empty".into(), set("collection", json!(""))),
        ("collection a number".into(), set("collection", json!(7))),
        ("entity_id missing".into(), without("entity_id")),
        ("entity_id empty".into(), set("entity_id", json!(""))),
        ("entity_id 257 chars".into(), set("entity_id", json!("e".repeat(257)))),
        ("entity_id 257 non-ASCII chars".into(), set("entity_id", json!("é".repeat(257)))),
        ("entity_id with BEL".into(), set("entity_id", json!("a\u{7}b"))),
        ("entity_id with NUL".into(), set("entity_id", json!("a\u{0}b"))),
        ("entity_id with DEL".into(), set("entity_id", json!("a\u{7f}b"))),
        ("entity_id with a C1 control".into(), set("entity_id", json!("a\u{85}b"))),
        ("entity_id an object".into(), set("entity_id", json!({"id": 1}))),
        ("op unknown (merge)".into(), set("op", json!("merge"))),
        ("op upper case".into(), set("op", json!("UPSERT"))),
        ("op missing".into(), without("op")),
        ("op a number".into(), set("op", json!(1))),
        ("hlc missing".into(), without("hlc")),
        ("hlc a number".into(), set("hlc", json!(1763800000000u64))),
        ("hlc without counter".into(), set("hlc", json!("1763800000000"))),
        ("hlc 12 digits".into(), set("hlc", json!("176380000000-00000-dev1"))),
        ("hlc 4-digit counter".into(), set("hlc", json!("1763800000000-0000-dev1"))),
        ("hlc without device".into(), set("hlc", json!("1763800000000-00000-"))),
        ("hlc device with a space".into(), set("hlc", json!("1763800000000-00000-dev 1"))),
        ("hlc with letters".into(), set("hlc", json!("17638000000x0-00000-dev1"))),
        ("upsert without data".into(), with_op("upsert", None)),
        ("upsert with null data".into(), with_op("upsert", Some(Value::Null))),
        ("upsert with array data".into(), with_op("upsert", Some(json!([1, 2])))),
        ("upsert with string data".into(), with_op("upsert", Some(json!("x")))),
        ("delete with object data".into(), with_op("delete", Some(json!({"x": 1})))),
        ("delete with empty object data".into(), with_op("delete", Some(json!({})))),
        ("delete with array data".into(), with_op("delete", Some(json!([])))),
        ("base_version negative".into(), set("base_version", json!(-1))),
        ("base_version float".into(), set("base_version", json!(1.5))),
        ("base_version string".into(), set("base_version", json!("3"))),
        ("base_version bool".into(), set("base_version", json!(true))),
        ("data 9007199254740993".into(), raw_data(r#"{"n": 9007199254740993}"#)),
        ("data -9007199254740993".into(), raw_data(r#"{"n": -9007199254740993}"#)),
        ("data nested 9007199254740995".into(), raw_data(r#"{"n": [1, {"deep": 9007199254740995}]}"#)),
        ("data 1e400".into(), raw_data(r#"{"n": 1e400}"#)),
        ("data -1e400".into(), raw_data(r#"{"n": -1e400}"#)),
        ("data 1e400 nested".into(), raw_data(r#"{"n": {"m": [1e400]}}"#)),
        ("append data 1e400".into(), raw_data("1e400").replace("\"upsert\"", "\"append\"")),
        ("append data 9007199254740993".into(), raw_data("9007199254740993").replace("\"upsert\"", "\"append\"")),
    ];
    for (what, data) in [
        ("lone high surrogate", r#"{"s": "\ud800"}"#),
        ("lone low surrogate", r#"{"s": "a\udc00b"}"#),
        ("reversed surrogate pair", r#"{"s": "\ude00\ud83d"}"#),
        ("lone surrogate in a key", r#"{"\ud800": 1}"#),
    ] {
        v.push((format!("data with a {what}"), raw_data(data)));
    }
    v.push((
        "entity_id with a lone surrogate".into(),
        set("entity_id", json!("__RAW__")).replace("\"__RAW__\"", r#""\ud800""#),
    ));
    for (what, raw) in
        [("a number", "1"), ("a string", "\"x\""), ("null", "null"), ("an array", "[]"), ("true", "true")]
    {
        v.push((format!("change is {what}"), raw.to_owned()));
    }
    v
}

store_test!(#[tokio::test] async fn every_bad_change_is_refused_whole_on_push_and_sync);
async fn every_bad_change_is_refused_whole_on_push_and_sync(backend: &Backend) {
    let server = start(backend);
    let (c, url) = (client(), server.url.as_str());
    seed(&c, url).await;
    let before = snapshot(&c, url).await;
    let hh = head_and_hash(&c, url).await;
    let mut failures = Vec::new();
    for (n, (what, bad)) in bad_changes().into_iter().enumerate() {
        let good = good(&format!("good-{n}")).to_string();
        for (path, body) in [
            ("/v1/push", format!(r#"{{"device_id":"dev1","changes":[{good},{bad}]}}"#)),
            ("/v1/sync", format!(r#"{{"device_id":"dev1","cursor":0,"changes":[{good},{bad}]}}"#)),
        ] {
            let (s, ct, text) = post_raw(&c, url, path, &body).await;
            let ok = s == 400 && ct.starts_with("application/json");
            if !ok {
                failures.push(format!("{path} {what}: {s} {text}\n    body: {body}"));
                continue;
            }
            let err = assert_error(&format!("{path} {what}"), (s, ct, text), 400, "invalid_request");
            // A change that parsed as JSON is named by index; lone surrogates fail the whole body's parse.
            if !what.contains("surrogate") {
                let details = &err["details"];
                let named = details.as_array().is_some_and(|d| d.len() == 1 && d[0]["index"] == 1);
                if !named {
                    failures.push(format!("{path} {what}: details must name index 1 only: {err}"));
                }
            }
            if head_and_hash(&c, url).await != hh {
                failures.push(format!("{path} {what}: the store changed"));
            }
        }
    }
    assert!(failures.is_empty(), "{} bad changes were mishandled:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(snapshot(&c, url).await, before);
}

store_test!(#[tokio::test] async fn a_batch_with_only_its_last_change_bad_writes_nothing);
async fn a_batch_with_only_its_last_change_bad_writes_nothing(backend: &Backend) {
    let server = start(backend);
    let (c, url) = (client(), server.url.as_str());
    seed(&c, url).await;
    let before = snapshot(&c, url).await;
    let mut last = base_change();
    last.insert("change_id".into(), json!("third"));
    last.insert("op".into(), json!("merge"));
    let changes = json!([good("first"), upsert("second", "tasks", "e1", json!({"a": 5}), &stamp(40)), last]);
    for path in ["/v1/push", "/v1/sync"] {
        let answer = send(c.post(format!("{url}{path}")).json(&json!({"device_id": "dev1", "changes": changes}))).await;
        let err = assert_error(path, answer, 400, "invalid_request");
        let details = err["details"].as_array().unwrap_or_else(|| panic!("{path}: no details: {err}"));
        assert_eq!(details.len(), 1, "{err}");
        assert_eq!(details[0]["index"], 2, "{err}");
        assert_eq!(details[0]["change_id"], "third", "{err}");
        assert!(details[0]["message"].as_str().unwrap().contains("merge"), "{err}");
        assert_eq!(snapshot(&c, url).await, before, "{path} wrote part of a refused batch");
    }
    // Several bad changes are each named.
    let mut bad_a = base_change();
    bad_a.insert("hlc".into(), json!("nope"));
    let changes = json!([bad_a, good("ok"), {"op": "upsert"}]);
    let answer = send(c.post(format!("{url}/v1/push")).json(&json!({"device_id": "dev1", "changes": changes}))).await;
    let err = assert_error("two bad", answer, 400, "invalid_request");
    let idx: Vec<u64> = err["details"].as_array().unwrap().iter().map(|d| d["index"].as_u64().unwrap()).collect();
    assert_eq!(idx, [0, 2], "{err}");
    assert_eq!(err["details"][0]["change_id"], "bad-1");
    assert!(err["details"][1].get("change_id").is_none_or(Value::is_null), "{err}");
    // The good changes of those batches were not reserved either.
    let a = push(&c, url, "dev1", vec![good("first"), good("ok")]).await;
    assert_eq!(a["results"][0]["status"], "applied");
    assert_eq!(a["results"][1]["status"], "applied");
}

store_test!(#[tokio::test] async fn malformed_bodies_are_refused);
async fn malformed_bodies_are_refused(backend: &Backend) {
    let server = start(backend);
    let (c, url) = (client(), server.url.as_str());
    seed(&c, url).await;
    let before = snapshot(&c, url).await;
    let ok = json!([good("g1")]).to_string();
    let cases: Vec<(&str, &str, String)> = vec![
        ("/v1/push", "truncated JSON", format!(r#"{{"device_id":"dev1","changes":{ok}"#)),
        ("/v1/push", "empty body", String::new()),
        ("/v1/push", "trailing garbage", format!(r#"{{"device_id":"dev1","changes":{ok}}} x"#)),
        ("/v1/push", "single quotes", "{'device_id':'dev1'}".into()),
        ("/v1/push", "body an array", format!("[{ok}]")),
        ("/v1/push", "body a string", r#""push""#.into()),
        ("/v1/push", "body null", "null".into()),
        ("/v1/push", "body a number", "5".into()),
        ("/v1/push", "device_id missing", format!(r#"{{"changes":{ok}}}"#)),
        ("/v1/push", "device_id null", format!(r#"{{"device_id":null,"changes":{ok}}}"#)),
        ("/v1/push", "device_id a number", format!(r#"{{"device_id":5,"changes":{ok}}}"#)),
        ("/v1/push", "device_id empty", format!(r#"{{"device_id":"","changes":{ok}}}"#)),
        ("/v1/push", "device_id with a space", format!(r#"{{"device_id":"dev 1","changes":{ok}}}"#)),
        ("/v1/push", "device_id 65 chars", format!(r#"{{"device_id":"{}","changes":{ok}}}"#, "d".repeat(65))),
        ("/v1/push", "device_id non-ASCII", format!(r#"{{"device_id":"dév","changes":{ok}}}"#)),
        ("/v1/push", "changes missing", r#"{"device_id":"dev1"}"#.into()),
        ("/v1/push", "changes null", r#"{"device_id":"dev1","changes":null}"#.into()),
        ("/v1/push", "changes an object", r#"{"device_id":"dev1","changes":{"0":{}}}"#.into()),
        ("/v1/push", "changes a string", r#"{"device_id":"dev1","changes":"x"}"#.into()),
        ("/v1/sync", "truncated JSON", r#"{"device_id":"dev1","cursor":0"#.into()),
        ("/v1/sync", "body an array", "[]".into()),
        ("/v1/sync", "device_id missing", r#"{"cursor":0}"#.into()),
        ("/v1/sync", "device_id with a space", r#"{"device_id":"dev 1"}"#.into()),
        ("/v1/sync", "cursor a string", r#"{"device_id":"dev1","cursor":"x"}"#.into()),
        ("/v1/sync", "cursor numeric string", r#"{"device_id":"dev1","cursor":"0"}"#.into()),
        ("/v1/sync", "cursor negative", r#"{"device_id":"dev1","cursor":-1}"#.into()),
        ("/v1/sync", "cursor float", r#"{"device_id":"dev1","cursor":1.5}"#.into()),
        ("/v1/sync", "limit zero", r#"{"device_id":"dev1","limit":0}"#.into()),
        ("/v1/sync", "limit a string", r#"{"device_id":"dev1","limit":"5"}"#.into()),
        ("/v1/sync", "limit negative", r#"{"device_id":"dev1","limit":-3}"#.into()),
        ("/v1/sync", "limit float", r#"{"device_id":"dev1","limit":2.5}"#.into()),
        ("/v1/sync", "changes a string", r#"{"device_id":"dev1","changes":"x"}"#.into()),
        ("/v1/sync", "changes an object", r#"{"device_id":"dev1","changes":{}}"#.into()),
        ("/v1/sync", "limit zero with changes", format!(r#"{{"device_id":"dev1","limit":0,"changes":{ok}}}"#)),
        ("/v1/sync", "cursor bad with changes", format!(r#"{{"device_id":"dev1","cursor":"x","changes":{ok}}}"#)),
    ];
    let mut failures = Vec::new();
    for (path, what, body) in &cases {
        let (s, ct, text) = post_raw(&c, url, path, body).await;
        if s != 400 || !ct.starts_with("application/json") {
            failures.push(format!("{path} {what}: {s} {ct} {text}"));
            continue;
        }
        assert_error(&format!("{path} {what}"), (s, ct, text), 400, "invalid_request");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(snapshot(&c, url).await, before);
}

store_test!(#[tokio::test] async fn wrong_content_types_are_refused);
async fn wrong_content_types_are_refused(backend: &Backend) {
    let server = start(backend);
    let (c, url) = (client(), server.url.as_str());
    seed(&c, url).await;
    let before = snapshot(&c, url).await;
    let push_body = json!({"device_id": "dev1", "changes": [good("g1")]}).to_string();
    let sync_body = json!({"device_id": "dev1", "cursor": 0, "changes": [good("g2")]}).to_string();
    for (path, body) in [("/v1/push", &push_body), ("/v1/sync", &sync_body)] {
        for ct in [Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("application/jsonx"), None] {
            let mut req = c.post(format!("{url}{path}")).body(body.clone());
            if let Some(ct) = ct {
                req = req.header("content-type", ct);
            }
            assert_error(&format!("{path} Content-Type {ct:?}"), send(req).await, 400, "invalid_request");
        }
    }
    assert_eq!(snapshot(&c, url).await, before);
    // A charset parameter is fine.
    let req =
        c.post(format!("{url}/v1/push")).header("content-type", "application/json; charset=utf-8").body(push_body);
    let (s, _, text) = send(req).await;
    assert_eq!(s, 200, "{text}");
}

store_test!(#[tokio::test] async fn boundary_values_are_accepted);
async fn boundary_values_are_accepted(backend: &Backend) {
    let server = start(backend);
    let (c, url) = (client(), server.url.as_str());
    let accepted = |changes: Vec<Value>| {
        let (c, url) = (c.clone(), url.to_owned());
        async move {
            let (s, a) = post(&c, &url, "/v1/push", &json!({"device_id": "d".repeat(64), "changes": changes})).await;
            assert_eq!(s, 200, "{a}");
            for r in a["results"].as_array().unwrap() {
                assert_eq!(r["status"], "applied", "{a}");
            }
        }
    };
    accepted(vec![
        upsert(&"c".repeat(64), &"C".repeat(64), &"e".repeat(256), json!({"x": 1}), &stamp(1)),
        upsert(&"é".repeat(64), "A-z_0.9", &"é".repeat(256), json!({"x": 1}), &stamp(2)),
    ])
    .await;
    accepted(vec![upsert("n1", "tasks", "e", json!({"a": 9007199254740992u64, "b": -9007199254740992i64}), &stamp(3))])
        .await;
    // Raw numbers: 2^54 is exact; 0.1, 1e21 and 1E2 are doubles; a valid surrogate pair.
    let raw = format!(
        r#"{{"device_id":"d1","changes":[{{"change_id":"n2","collection":"tasks","entity_id":"e","op":"upsert","hlc":"{}","data":{{"a":18014398509481984,"b":0.1,"c":1e21,"d":1E2,"e":-0.0,"s":"\ud83d\ude00"}},"base_version":null,"unknown_member":[1]}}],"extra":true}}"#,
        stamp(4)
    );
    let (s, _, text) = post_raw(&c, url, "/v1/push", &raw).await;
    assert_eq!(s, 200, "{text}");
    // A delete with null data, an append with no data.
    accepted(vec![
        json!({"change_id": "d1", "collection": "tasks", "entity_id": "x", "op": "delete", "data": null, "hlc": stamp(5)}),
        json!({"change_id": "a1", "collection": "tasks", "entity_id": "x", "op": "append", "hlc": stamp(6)}),
    ])
    .await;
    // Exactly max_batch changes, and data of exactly max_data_bytes in JCS form: {"s":"…"} is 8 + n bytes.
    accepted((0..3).map(|i| good(&format!("b{i}"))).collect()).await;
    accepted(vec![upsert("big", "tasks", "e", json!({"s": "x".repeat(92)}), &stamp(7))]).await;
    let (_, st) = get(&c, url, "/v1/status").await;
    assert_eq!(st["head"], 10);
}

store_test!(#[tokio::test] async fn limits_answer_413_naming_the_key);
async fn limits_answer_413_naming_the_key(backend: &Backend) {
    let server = start(backend);
    let (c, url) = (client(), server.url.as_str());
    seed(&c, url).await;
    let before = snapshot(&c, url).await;
    let four: Vec<Value> = (0..4).map(|i| good(&format!("g{i}"))).collect();
    for (path, body) in [
        ("/v1/push", json!({"device_id": "dev1", "changes": four})),
        ("/v1/sync", json!({"device_id": "dev1", "cursor": 0, "changes": four})),
    ] {
        let err = assert_error(path, send(c.post(format!("{url}{path}")).json(&body)).await, 413, "payload_too_large");
        assert!(err["message"].as_str().unwrap().contains("max_batch is 3"), "{err}");
    }
    // data over max_data_bytes: 93 characters make 101 bytes; multi-byte characters count as bytes.
    for (what, data) in [
        ("ascii", json!({"s": "x".repeat(93)})),
        ("utf-8", json!({"s": "é".repeat(47)})),
        ("escapes", json!({"s": "\u{1}".repeat(16)})),
    ] {
        for path in ["/v1/push", "/v1/sync"] {
            let body = json!({"device_id": "dev1", "changes": [good("ok"), upsert("big", "tasks", "e", data.clone(), &stamp(9))]});
            let err = assert_error(
                &format!("{path} {what}"),
                send(c.post(format!("{url}{path}")).json(&body)).await,
                413,
                "payload_too_large",
            );
            assert!(err["message"].as_str().unwrap().contains("max_data_bytes"), "{err}");
            assert_eq!(err["details"][0]["index"], 1, "{err}");
            assert_eq!(err["details"][0]["change_id"], "big", "{err}");
        }
    }
    let append = json!({"change_id": "ap", "collection": "tasks", "entity_id": "e", "op": "append", "data": "y".repeat(200), "hlc": stamp(9)});
    let err = assert_error(
        "append",
        send(c.post(format!("{url}/v1/push")).json(&json!({"device_id": "dev1", "changes": [append]}))).await,
        413,
        "payload_too_large",
    );
    assert!(err["message"].as_str().unwrap().contains("max_data_bytes"), "{err}");
    assert_eq!(snapshot(&c, url).await, before);
}

/// A push body of exactly `len` bytes: valid JSON padded with spaces.
fn padded_push(len: usize) -> Vec<u8> {
    let mut body = json!({"device_id": "dev1", "changes": [good("pad")]}).to_string().into_bytes();
    assert!(body.len() <= len);
    body.resize(len, b' ');
    body
}

store_test!(#[tokio::test] async fn oversized_bodies_get_a_readable_413);
async fn oversized_bodies_get_a_readable_413(backend: &Backend) {
    let server = start(backend);
    let (c, url) = (client(), server.url.as_str());
    seed(&c, url).await;
    let before = snapshot(&c, url).await;
    let check = |what: &str, answer: (u16, String, String)| {
        let err = assert_error(what, answer, 413, "payload_too_large");
        assert!(err["message"].as_str().unwrap().contains("max_body_bytes"), "{what}: {err}");
    };
    // Just over the limit, with Content-Length.
    let r = c.post(format!("{url}/v1/push")).header("content-type", "application/json").body(padded_push(2001));
    check("2001 bytes", send(r).await);
    // Far over it: the client is still sending when the answer comes, and must be able to read it.
    for path in ["/v1/push", "/v1/sync"] {
        let big = padded_push(4 * 1024 * 1024);
        let r = c.post(format!("{url}{path}")).header("content-type", "application/json").body(big);
        let answer = r.send().await.unwrap_or_else(|e| panic!("{path}: the client could not read the 413: {e:?}"));
        let status = answer.status().as_u16();
        let ct = answer.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        check(&format!("{path} 4 MiB"), (status, ct, answer.text().await.unwrap()));
    }
    // Without Content-Length (chunked): refused once the limit is passed.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = padded_push(6000).chunks(500).map(|c| Ok(c.to_vec())).collect();
    let stream = futures_util::stream::iter(chunks);
    let r = c
        .post(format!("{url}/v1/push"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream));
    check("chunked", send(r).await);
    // Exactly at the limit is fine, and the server still serves after all this.
    assert_eq!(snapshot(&c, url).await, before);
    let r = c.post(format!("{url}/v1/push")).header("content-type", "application/json").body(padded_push(2000));
    let (s, _, text) = send(r).await;
    assert_eq!(s, 200, "{text}");
}

/// Sends raw HTTP/1.1 bytes and reads the answer until the connection closes or `timeout`.
async fn raw_http(addr: &str, request: &[u8], timeout: Duration) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&out);
                // Stop once a final (non-1xx) answer with its JSON body is in.
                if let Some(pos) = text.find("HTTP/1.1 4")
                    && text[pos..].contains("\r\n\r\n")
                    && text.trim_end().ends_with('}')
                {
                    break;
                }
            }
            Ok(Err(e)) => panic!("reading the answer failed: {e}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

store_test!(#[tokio::test] async fn expect_100_continue_over_the_limit_is_answered_without_the_body);
async fn expect_100_continue_over_the_limit_is_answered_without_the_body(backend: &Backend) {
    let server = start(backend);
    let c = client();
    seed(&c, &server.url).await;
    let before = snapshot(&c, &server.url).await;
    let addr = server.url.strip_prefix("http://").unwrap();
    for path in ["/v1/push", "/v1/sync"] {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 50000\r\n\
             Expect: 100-continue\r\n\r\n"
        );
        let answer = raw_http(addr, request.as_bytes(), Duration::from_secs(10)).await;
        assert!(!answer.contains("100 Continue"), "{path}: the server asked for the body: {answer}");
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer:?}");
        assert!(answer.to_ascii_lowercase().contains("content-type: application/json"), "{answer}");
        assert!(answer.contains("payload_too_large") && answer.contains("max_body_bytes"), "{answer}");
    }
    // Within the limit, Expect: 100-continue gets its 100 and the request goes through.
    let body = json!({"device_id": "dev1", "changes": [good("cont")]}).to_string();
    let request = format!(
        "POST /v1/push HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.unwrap().unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first.starts_with("HTTP/1.1 100"), "{first:?}");
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut rest = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut rest)).await.unwrap().unwrap();
    assert!(rest.contains("HTTP/1.1 200") || first.contains("HTTP/1.1 200"), "{first}{rest}");
    let (_, st) = get(&c, &server.url, "/v1/status").await;
    assert_eq!(st["head"], before["status"]["head"].as_u64().unwrap() + 1);
}

store_test!(#[tokio::test] async fn bad_query_parameters_are_refused);
async fn bad_query_parameters_are_refused(backend: &Backend) {
    let server = start(backend);
    let (c, url) = (client(), server.url.as_str());
    seed(&c, url).await;
    let before = snapshot(&c, url).await;
    let long = "d".repeat(65);
    let cases = [
        "/v1/pull".to_owned(),
        "/v1/pull?cursor=0".into(),
        "/v1/pull?device_id=".into(),
        "/v1/pull?device_id=a%20b".into(),
        format!("/v1/pull?device_id={long}"),
        "/v1/pull?device_id=r&cursor=-1".into(),
        "/v1/pull?device_id=r&cursor=abc".into(),
        "/v1/pull?device_id=r&cursor=1.5".into(),
        "/v1/pull?device_id=r&cursor=".into(),
        "/v1/pull?device_id=r&cursor=%2B1".into(),
        "/v1/pull?device_id=r&limit=0".into(),
        "/v1/pull?device_id=r&limit=1.5".into(),
        "/v1/pull?device_id=r&limit=-1".into(),
        "/v1/pull?device_id=r&limit=ten".into(),
        "/v1/pull?device_id=r&wait=-1".into(),
        "/v1/pull?device_id=r&wait=1.5".into(),
        "/v1/pull?device_id=r&wait=soon".into(),
        "/v1/conflicts?since=-1".into(),
        "/v1/conflicts?since=x".into(),
        "/v1/conflicts?limit=0".into(),
        "/v1/conflicts?limit=-5".into(),
        "/v1/conflicts?limit=2.5".into(),
        "/v1/status?device_id=bad%20id".into(),
        format!("/v1/status?device_id={long}"),
        "/v1/bootstrap?device_id=bad%20id".into(),
    ];
    let mut failures = Vec::new();
    for path in &cases {
        let (s, ct, text) = send(c.get(format!("{url}{path}"))).await;
        if s != 400 || !ct.starts_with("application/json") {
            failures.push(format!("GET {path}: {s} {ct} {text}"));
            continue;
        }
        assert_error(path, (s, ct, text), 400, "invalid_request");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(snapshot(&c, url).await, before);
}
