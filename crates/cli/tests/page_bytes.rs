//! Pull and sync pages are bounded in bytes as well as in changes: a page
//! carries changes in seq order while the sum over them of (bytes of the
//! change's `data` JSON text + 512) stays within `max_page_bytes`; the first
//! change is always served, however large. `cursor` is the last seq served and
//! `has_more` says whether the log goes past it. Checked on both stores, over
//! pull and sync, and end to end with `deltasync client sync`.

mod common;

use std::collections::{BTreeMap, HashSet};

use common::devices::Device;
use common::*;
use deltasync_protocol::json::to_jcs;
use serde_json::{Value, json};

/// What each change costs in a page besides its data (the sizes of the main
/// test follow it, so that its pages stay on the rule's edges).
const OVERHEAD: usize = 256;
/// The page cap of the main tests.
const PAGE_BYTES: usize = 1_048_576;
/// Data may be larger than the default 256 KiB here (the key has no ceiling but 1).
const CONFIG: &str = "[server]\nmax_page_bytes = 1048576\nmax_data_bytes = 1048576\n";
const ENTITIES: usize = 20;

/// One change the test pushed, by its seq.
#[derive(Clone, Debug)]
struct Pushed {
    entity_id: String,
    data: Value,
    cost: usize,
}

/// The bytes a change with this data counts for in a page.
///
/// The server stores each change's data as its canonical (JCS) text and
/// measures that. `serde_json::to_string` of the parsed value gives the same
/// bytes for these documents: serde_json's map (no `preserve_order`) sorts keys
/// by bytes, which for ASCII keys is the JCS (UTF-16) order; the strings hold
/// only ASCII letters, digits and spaces, so neither escapes anything; and the
/// numbers are integers. So no tolerance is needed; the assertion makes sure.
fn cost(data: &Value) -> usize {
    let text = serde_json::to_string(data).unwrap();
    assert!(text == to_jcs(data), "serde_json's text differs from JCS; the test's size model is wrong");
    text.len() + OVERHEAD
}

/// The last seq the rule serves on a page after `cursor` (`None` at the head).
fn rule_end(costs: &BTreeMap<u64, usize>, cursor: u64, cap: usize) -> Option<u64> {
    let mut sum = 0usize;
    let mut end = None;
    for (&seq, &c) in costs.range(cursor + 1..) {
        if end.is_some() && sum + c > cap {
            break;
        }
        sum += c;
        end = Some(seq);
    }
    end
}

/// Pushes `docs` (entity id, data) as upserts in batches of `per_push`;
/// returns them by the seq the server gave.
async fn push_docs(url: &str, docs: Vec<(String, Value)>, per_push: usize) -> BTreeMap<u64, Pushed> {
    let c = client();
    let base = now_ms() - 60_000;
    let mut by_seq = BTreeMap::new();
    let mut n = 0u64;
    for batch in docs.chunks(per_push) {
        let changes: Vec<Value> = batch
            .iter()
            .map(|(id, data)| {
                n += 1;
                upsert(&random_uuid(), "docs", id, data.clone(), &hlc(base + n, 0, "writer"))
            })
            .collect();
        let answer = push(&c, url, "writer", changes).await;
        for (result, (id, data)) in answer["results"].as_array().unwrap().iter().zip(batch) {
            assert_eq!(result["status"], "applied", "{result}");
            let seq = result["seq"].as_u64().unwrap();
            by_seq.insert(seq, Pushed { entity_id: id.clone(), data: data.clone(), cost: cost(data) });
        }
    }
    by_seq
}

#[derive(Clone, Copy, Debug)]
enum Via {
    Pull,
    Sync,
}

/// One page after `cursor`, via pull or a sync without changes.
async fn page(c: &reqwest::Client, url: &str, via: Via, cursor: u64) -> Value {
    let (status, body) = match via {
        Via::Pull => get(c, url, &format!("/v1/pull?device_id=reader&cursor={cursor}&limit=10000")).await,
        Via::Sync => {
            post(c, url, "/v1/sync", &json!({"device_id": "syncer", "cursor": cursor, "limit": 10000, "changes": []}))
                .await
        }
    };
    assert_eq!(status, 200, "{via:?} from cursor {cursor}: {}", short(&body));
    body
}

/// A JSON value for messages, without the long data.
fn short(v: &Value) -> String {
    let mut v = v.clone();
    if let Some(changes) = v.get_mut("changes").and_then(Value::as_array_mut) {
        for ch in changes {
            if let Some(d) = ch.get_mut("data") {
                *d = json!(format!("<{} bytes>", serde_json::to_string(d).unwrap().len()));
            }
        }
    }
    v.to_string()
}

/// Reads the whole log from cursor 0, checking every page against the rule;
/// returns the number of changes on each page.
async fn walk(url: &str, via: Via, pushed: &BTreeMap<u64, Pushed>, cap: usize) -> Vec<usize> {
    let c = client();
    let costs: BTreeMap<u64, usize> = pushed.iter().map(|(s, p)| (*s, p.cost)).collect();
    let head = *pushed.keys().last().unwrap();
    let mut cursor = 0u64;
    let mut pages = Vec::new();
    let mut seen = HashSet::new();
    loop {
        assert!(pages.len() <= pushed.len(), "{via:?}: more pages than changes: {pages:?}");
        let body = page(&c, url, via, cursor).await;
        let changes = body["changes"].as_array().unwrap_or_else(|| panic!("{via:?}: no changes: {}", short(&body)));
        let seqs: Vec<u64> = changes.iter().map(|ch| ch["seq"].as_u64().unwrap()).collect();
        let served: Vec<usize> = changes.iter().map(|ch| cost(&ch["data"])).collect();
        let sum: usize = served.iter().sum();
        let expected_end = rule_end(&costs, cursor, cap);
        let expected: Vec<u64> = expected_end.map_or(vec![], |end| (cursor + 1..=end).collect());
        assert_eq!(
            seqs,
            expected,
            "{via:?} page after cursor {cursor}: served seqs {seqs:?} costing {served:?} (sum {sum}, cap {cap}); \
             the rule serves {expected:?} (costs of what follows: {:?})",
            costs.range(cursor + 1..).map(|(_, c)| *c).take(8).collect::<Vec<_>>()
        );
        for ch in changes {
            let seq = ch["seq"].as_u64().unwrap();
            let p = &pushed[&seq];
            assert!(seen.insert(seq), "{via:?}: seq {seq} served twice");
            assert_eq!(ch["entity_id"], p.entity_id.as_str(), "{via:?}: seq {seq}");
            assert!(ch["data"] == p.data, "{via:?}: seq {seq} came back with other data");
        }
        assert!(
            seqs.len() == 1 || sum <= cap,
            "{via:?}: a page of {} changes is over the cap: {sum} > {cap}",
            seqs.len()
        );
        let last = *seqs.last().unwrap_or(&cursor);
        assert_eq!(body["cursor"].as_u64(), Some(last), "{via:?}: cursor after {cursor}: {}", short(&body));
        assert_eq!(
            body["has_more"].as_bool(),
            Some(last < head),
            "{via:?}: has_more at {last} of {head}: {}",
            short(&body)
        );
        if seqs.is_empty() {
            break;
        }
        pages.push(seqs.len());
        cursor = last;
        if last == head {
            // The end: one more page from the head is empty, with has_more false.
            let body = page(&c, url, via, head).await;
            assert_eq!(body["changes"], json!([]), "{via:?}: a page past the head: {}", short(&body));
            assert_eq!((body["cursor"].as_u64(), body["has_more"].as_bool()), (Some(head), Some(false)));
            break;
        }
    }
    let all: HashSet<u64> = pushed.keys().copied().collect();
    assert_eq!(seen, all, "{via:?}: not every change arrived");
    pages
}

/// The data sizes of the twenty documents, chosen so that the pages of a
/// 1 MiB cap fall on the rule's edges, whatever [`OVERHEAD`] is:
/// - seqs 1–4 cost exactly the cap (so the bound is inclusive, and a larger
///   overhead would leave seq 4 out);
/// - seqs 5–9 cost exactly the cap in five changes;
/// - seqs 10–14 cost the cap plus one byte, so seq 14 opens the next page
///   (with a smaller overhead all five would fit);
/// - seqs 14–17 leave no room for seq 18, and 18–20 are the last page.
///
/// With an overhead of 512: 4 × 261,632 + 4 × 512 = 1,048,576, and
/// 1,046,016 + 5 × 512 = 1,048,576 (seqs 5–9), 1,046,017 + 5 × 512 (seqs 10–14).
fn sizes() -> Vec<usize> {
    let (quarter, fifth) = (PAGE_BYTES / 4, PAGE_BYTES / 5);
    let last_fifth = PAGE_BYTES - 4 * fifth;
    let (a, b) = (quarter - OVERHEAD, fifth - OVERHEAD);
    let mut sizes = vec![a; 4]; // seqs 1–4
    sizes.extend([b, b, b, b, last_fifth - OVERHEAD]); // seqs 5–9
    sizes.extend([b, b, b, b, last_fifth + 1 - OVERHEAD]); // seqs 10–13, and 14 one byte too many
    sizes.extend([255_000, 255_000, 255_000]); // seqs 15–17
    sizes.extend([100_000, 150_000, 200_000]); // seqs 18–20
    assert_eq!(sizes.len(), ENTITIES);
    sizes
}

/// The pages the rule gives for [`sizes`].
const PAGES: [usize; 5] = [4, 5, 4, 4, 3];

/// Twenty documents of [`sizes`] (100–256 KiB), with random UUID ids.
fn twenty_docs() -> Vec<(String, Value)> {
    sizes().iter().enumerate().map(|(i, bytes)| (random_uuid(), document(i as u64, *bytes))).collect()
}

store_test!(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn pages_of_large_changes_obey_the_byte_cap);
async fn pages_of_large_changes_obey_the_byte_cap(backend: &Backend) {
    let server = Server::start_with(backend, Options { config: Some(CONFIG.into()), ..Options::default() });
    let pushed = push_docs(&server.url, twenty_docs(), 5).await;
    assert_eq!(pushed.len(), ENTITIES);
    assert_eq!(pushed.keys().copied().collect::<Vec<_>>(), (1..=ENTITIES as u64).collect::<Vec<_>>());

    for via in [Via::Pull, Via::Sync] {
        let pages = walk(&server.url, via, &pushed, PAGE_BYTES).await;
        eprintln!("{via:?}: {} pages of {pages:?} changes", pages.len());
        assert!(pages.iter().any(|n| *n > 1), "{via:?}: no page carried more than one change: {pages:?}");
        assert_eq!(pages, PAGES, "{via:?}: the pages of the twenty documents");
    }

    // `deltasync client sync` pages through the same log and verifies it.
    let url = server.url.clone();
    let expected: BTreeMap<String, Value> = pushed.values().map(|p| (p.entity_id.clone(), p.data.clone())).collect();
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let device = Device::new(dir.path(), "cli");
        let report = device.sync(&url);
        assert_eq!(report["verified"], true, "{report}");
        assert_eq!(report["healed"], false, "the client had to re-bootstrap: {report}");
        assert_eq!(report["pulled"], ENTITIES as u64, "{report}");
        let list = device.list("docs");
        let got: BTreeMap<String, Value> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|item| (item["id"].as_str().unwrap().to_owned(), item["data"].clone()))
            .collect();
        assert_eq!(got.len(), ENTITIES, "the client lists {} entities", got.len());
        assert!(got == expected, "the client's entities differ from what was pushed");
    })
    .await
    .unwrap();
}

store_test!(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn a_change_larger_than_the_cap_is_served_alone);
async fn a_change_larger_than_the_cap_is_served_alone(backend: &Backend) {
    let config = "[server]\nmax_page_bytes = 300000\nmax_data_bytes = 1048576\n";
    let server = Server::start_with(backend, Options { config: Some(config.into()), ..Options::default() });
    // seq 1 small, 2 and 3 each over the cap alone, 4 and 5 small again.
    let sizes = [10_000usize, 400_000, 350_000, 20_000, 30_000];
    let docs: Vec<(String, Value)> =
        sizes.iter().enumerate().map(|(i, bytes)| (random_uuid(), document(100 + i as u64, *bytes))).collect();
    let pushed = push_docs(&server.url, docs, 5).await;
    assert_eq!(pushed.len(), sizes.len());
    for via in [Via::Pull, Via::Sync] {
        let pages = walk(&server.url, via, &pushed, 300_000).await;
        assert_eq!(pages, [1, 1, 1, 2], "{via:?}: pages of the log [10 KB, 400 KB, 350 KB, 20 KB, 30 KB]");
        // Starting right at the large change.
        let body = page(&client(), &server.url, via, 1).await;
        let seqs: Vec<u64> = body["changes"].as_array().unwrap().iter().map(|c| c["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, [2], "{via:?}: {}", short(&body));
        assert_eq!((body["cursor"].as_u64(), body["has_more"].as_bool()), (Some(2), Some(true)));
    }
}
