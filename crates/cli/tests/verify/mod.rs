//! Independent recomputation of the §5 hash chain and state digest, and log
//! readers shared by the integrity, concurrency and crash tests.
//!
//! SHA-256, the chain concatenation and the 256-bit modular sum are computed
//! here with `sha2` directly; only JCS comes from the protocol crate (it is
//! verified separately against RFC 8785's vectors).
#![allow(dead_code)]

use deltasync_protocol::json::to_jcs;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::common::{get, get_as};

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `c_n` of §5: exactly these eight members of a stored change, `data` null when absent.
pub fn chain_object(change: &Value) -> Value {
    let data = change.get("data").cloned().unwrap_or(Value::Null);
    json!({
        "seq": change["seq"].as_u64().expect("seq is an integer"),
        "change_id": change["change_id"],
        "device_id": change["device_id"],
        "collection": change["collection"],
        "entity_id": change["entity_id"],
        "op": change["op"],
        "data": data,
        "hlc": change["hlc"],
    })
}

/// `SHA-256(JCS(c_n))`.
pub fn change_hash(change: &Value) -> [u8; 32] {
    sha256(to_jcs(&chain_object(change)).as_bytes())
}

/// The chain head, folded by hand (the default is the empty log: seq 0, 32 zero bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Chain {
    /// The last seq folded in.
    pub seq: u64,
    /// `state_hash_seq`.
    pub hash: [u8; 32],
}

impl Chain {
    /// Folds the next stored change in, asserting that its seq follows on.
    pub fn fold(&mut self, change: &Value) {
        let seq = change["seq"].as_u64().expect("seq");
        assert_eq!(seq, self.seq + 1, "the log is not gapless: expected seq {} next, got {change}", self.seq + 1);
        let mut input = Vec::with_capacity(64);
        input.extend_from_slice(&change_hash(change));
        input.extend_from_slice(&self.hash);
        self.hash = sha256(&input);
        self.seq = seq;
    }

    /// The head as 64 lowercase hex digits.
    pub fn hex(&self) -> String {
        hex::encode(self.hash)
    }
}

/// `(a + b) mod 2^256`, both big-endian.
pub fn add256(a: &mut [u8; 32], b: &[u8; 32]) {
    let mut carry = 0u16;
    for i in (0..32).rev() {
        let s = a[i] as u16 + b[i] as u16 + carry;
        a[i] = s as u8;
        carry = s >> 8;
    }
}

/// The §5 entity hash of a live entity.
pub fn entity_hash(collection: &str, entity_id: &str, data: &Value) -> [u8; 32] {
    sha256(to_jcs(&json!({"collection": collection, "entity_id": entity_id, "data": data})).as_bytes())
}

/// The digest of a set of live entities `(collection, entity_id, data)`.
pub fn digest_of<'a>(entities: impl IntoIterator<Item = (&'a str, &'a str, &'a Value)>) -> String {
    let mut sum = [0u8; 32];
    for (c, id, data) in entities {
        add256(&mut sum, &entity_hash(c, id, data));
    }
    hex::encode(sum)
}

/// 64 zeros: the hash and digest of an empty dataset.
pub fn zeros() -> String {
    "0".repeat(64)
}

/// A parsed bootstrap stream.
#[derive(Debug)]
pub struct Bootstrap {
    /// The first line.
    pub header: Value,
    /// The `entity` objects.
    pub entities: Vec<Value>,
    /// The `change` objects (appends).
    pub appends: Vec<Value>,
    /// The `count` of the end line.
    pub count: u64,
}

impl Bootstrap {
    /// Splits bootstrap lines, asserting the framing (header, body lines, end line with the right count).
    pub fn parse(lines: Vec<Value>) -> Bootstrap {
        assert!(lines.len() >= 2, "a bootstrap has at least a header and an end line: {lines:?}");
        let header = lines[0].clone();
        for key in ["cursor", "state_hash", "state_digest", "server_time", "policies"] {
            assert!(header.get(key).is_some(), "bootstrap header lacks {key}: {header}");
        }
        let end = lines.last().unwrap().clone();
        assert_eq!(end["end"], true, "last bootstrap line is not the end line: {end}");
        let count = end["count"].as_u64().expect("end line count");
        let body = &lines[1..lines.len() - 1];
        assert_eq!(count, body.len() as u64, "end line count differs from the number of lines");
        let mut entities = Vec::new();
        let mut appends = Vec::new();
        for line in body {
            if let Some(e) = line.get("entity") {
                entities.push(e.clone());
            } else if let Some(c) = line.get("change") {
                appends.push(c.clone());
            } else {
                panic!("unexpected bootstrap line {line}");
            }
        }
        Bootstrap { header, entities, appends, count }
    }

    /// The digest recomputed from the entity lines (deleted ones add nothing).
    pub fn recomputed_digest(&self) -> String {
        digest_of(
            self.entities
                .iter()
                .filter(|e| e["deleted"] == false)
                .map(|e| (e["collection"].as_str().unwrap(), e["entity_id"].as_str().unwrap(), &e["data"])),
        )
    }
}

/// One pull page's answer, without its changes.
#[derive(Debug, Clone)]
pub struct PageInfo {
    /// The page's `cursor`.
    pub cursor: u64,
    /// The page's `state_hash`.
    pub state_hash: String,
    /// The page's `state_digest`.
    pub state_digest: String,
    /// The page's `has_more`.
    pub has_more: bool,
    /// How many changes it held.
    pub len: usize,
}

/// Pulls the whole log from cursor 0 with pages of `limit`; returns the changes and every page's summary.
pub async fn pull_all(c: &reqwest::Client, url: &str, device: &str, limit: u64) -> (Vec<Value>, Vec<PageInfo>) {
    pull_all_as(c, url, device, limit, None).await
}

/// [`pull_all`] with a bearer token, for servers with `--auth jwt`.
pub async fn pull_all_as(
    c: &reqwest::Client,
    url: &str,
    device: &str,
    limit: u64,
    token: Option<&str>,
) -> (Vec<Value>, Vec<PageInfo>) {
    let mut cursor = 0u64;
    let mut changes = Vec::new();
    let mut pages = Vec::new();
    loop {
        let path = format!("/v1/pull?device_id={device}&cursor={cursor}&limit={limit}");
        let (status, page) = get_as(c, url, &path, token).await;
        assert_eq!(status, 200, "pull failed: {page}");
        let list = page["changes"].as_array().expect("changes").clone();
        assert!(list.len() as u64 <= limit, "a page holds more than limit changes");
        let info = PageInfo {
            cursor: page["cursor"].as_u64().expect("cursor"),
            state_hash: page["state_hash"].as_str().expect("state_hash").to_owned(),
            state_digest: page["state_digest"].as_str().expect("state_digest").to_owned(),
            has_more: page["has_more"].as_bool().expect("has_more"),
            len: list.len(),
        };
        match list.last() {
            Some(last) => assert_eq!(info.cursor, last["seq"].as_u64().unwrap(), "page cursor is not its last seq"),
            None => assert_eq!(info.cursor, cursor, "an empty page moved the cursor"),
        }
        cursor = info.cursor;
        let more = info.has_more;
        let empty = list.is_empty();
        changes.extend(list);
        pages.push(info);
        if !more {
            break;
        }
        assert!(!empty, "has_more with an empty pull page");
    }
    (changes, pages)
}

/// Folds a whole log by hand; returns the hex chain head after every seq (index 0 is the empty log).
pub fn chain_heads(log: &[Value]) -> Vec<String> {
    let mut chain = Chain::default();
    let mut heads = vec![chain.hex()];
    for change in log {
        chain.fold(change);
        heads.push(chain.hex());
    }
    heads
}

/// GETs /v1/status.
pub async fn status(c: &reqwest::Client, url: &str) -> Value {
    let (code, body) = get(c, url, "/v1/status").await;
    assert_eq!(code, 200, "status failed: {body}");
    body
}
