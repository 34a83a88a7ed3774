//! Durability: SIGKILL in the middle of a stream of pushes loses no
//! acknowledged change and leaves no half-applied batch; SIGTERM drains
//! in-flight pushes and exits 0.

mod common;
mod verify;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use deltasync_protocol::json::to_jcs;
use deltasync_protocol::{EntityState, Merge, Policy, StoredChange, merge};
use serde_json::{Value, json};
use verify::*;

const PUSHERS: usize = 4;

/// What became of one pushed batch.
#[derive(Debug, Clone)]
enum Outcome {
    /// Answered 200: the seq of each change, in order.
    Acked(Vec<u64>),
    /// Answered with an error status: must have changed nothing.
    Refused(u16, String),
    /// No complete answer (connection lost): either all there or none.
    Unknown(String),
}

/// The batch a pusher has in flight, if any, and when it was sent.
type InFlight = Arc<Mutex<Option<(String, Instant)>>>;

#[derive(Debug, Clone)]
struct Sent {
    prefix: String,
    ids: Vec<String>,
    outcome: Outcome,
    /// When the answer (or the failure) came.
    done_at: Instant,
}

/// Pushes batches (ids `<prefix>-c<i>`) until `stop` is set or a push fails: small ones
/// (1–8 changes) or, when `heavy`, 500–999 changes that keep the server busy for a while.
/// While a push is under way, `in_flight` holds its batch prefix and when it was sent.
async fn pusher(
    url: String,
    device: String,
    heavy: bool,
    acked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    in_flight: InFlight,
) -> Vec<Sent> {
    let c = client();
    let base = now_ms() - 200_000;
    let mut ms = 0u64;
    let mut out = Vec::new();
    let mut b = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let prefix = format!("{device}-b{b:05}");
        let size = if heavy { 500 + (b * 137) % 500 } else { 1 + (b * 5 + device.len()) % 8 };
        let mut changes = Vec::with_capacity(size);
        let mut ids = Vec::with_capacity(size);
        for i in 0..size {
            ms += 1;
            let id = format!("{prefix}-c{i}");
            let entity = format!("e{}", (b * 3 + i * 7) % 40);
            let h = hlc(base + ms, 0, &device);
            changes.push(match (b + i) % 9 {
                8 => delete(&id, "crash", &entity, &h),
                7 => json!({"change_id": id, "collection": "crashlog", "entity_id": entity, "op": "append", "data": {"b": b, "i": i}, "hlc": h}),
                k => upsert(&id, "crash", &entity, json!({format!("f{k}"): format!("{device} batch {b} change {i} ✓"), "n": b}), &h),
            });
            ids.push(id);
        }
        b += 1;
        let body = json!({"device_id": device, "changes": changes});
        *in_flight.lock().unwrap() = Some((prefix.clone(), Instant::now()));
        let outcome = match c.post(format!("{url}/v1/push")).json(&body).send().await {
            Err(e) => Outcome::Unknown(format!("send: {}", error_chain(&e))),
            Ok(r) => {
                let status = r.status().as_u16();
                match r.text().await {
                    Err(e) => Outcome::Unknown(format!("body: {}", error_chain(&e))),
                    Ok(text) if status == 200 => {
                        let v: Value = serde_json::from_str(&text).expect("a 200 push answer is JSON");
                        let seqs: Vec<u64> = v["results"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|r| {
                                assert_eq!(r["status"], "applied", "{r}");
                                r["seq"].as_u64().unwrap()
                            })
                            .collect();
                        assert_eq!(seqs.len(), size);
                        Outcome::Acked(seqs)
                    }
                    Ok(text) => Outcome::Refused(status, text),
                }
            }
        };
        let failed = !matches!(outcome, Outcome::Acked(_));
        if !failed {
            acked.fetch_add(1, Ordering::SeqCst);
        }
        *in_flight.lock().unwrap() = None;
        out.push(Sent { prefix, ids, outcome, done_at: Instant::now() });
        if failed {
            break;
        }
    }
    out
}

/// An error with its sources, for the report.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Starts the pushers; returns their handles and the shared counters.
fn start_pushers(
    url: &str,
    tag: &str,
    heavy: bool,
) -> (Vec<tokio::task::JoinHandle<Vec<Sent>>>, Arc<AtomicUsize>, Arc<AtomicBool>) {
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let handles = (0..PUSHERS)
        .map(|t| {
            tokio::spawn(pusher(
                url.to_owned(),
                format!("{tag}{t}"),
                heavy,
                acked.clone(),
                stop.clone(),
                InFlight::default(),
            ))
        })
        .collect();
    (handles, acked, stop)
}

async fn wait_for_acks(acked: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "only {} batches acknowledged in 60 s", acked.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Checks the log after a restart against what the pushers saw; returns the pulled log.
async fn check_after_restart(c: &reqwest::Client, url: &str, sent: &[Sent]) -> Vec<Value> {
    let (log, pages) = pull_all(c, url, "auditor", 1000).await;
    let head = log.len() as u64;
    for (i, ch) in log.iter().enumerate() {
        assert_eq!(ch["seq"].as_u64().unwrap(), i as u64 + 1, "seqs are gapless 1..head");
    }
    let by_id: HashMap<&str, u64> =
        log.iter().map(|ch| (ch["change_id"].as_str().unwrap(), ch["seq"].as_u64().unwrap())).collect();
    assert_eq!(by_id.len(), log.len(), "a change_id is logged twice");

    // Every logged change belongs to a batch that is entirely present.
    let mut present_per_batch: BTreeMap<&str, usize> = BTreeMap::new();
    for ch in &log {
        let id = ch["change_id"].as_str().unwrap();
        let prefix = &id[..id.rfind("-c").expect("batch-prefixed change id")];
        *present_per_batch.entry(prefix).or_default() += 1;
    }
    let batches: HashMap<&str, &Sent> = sent.iter().map(|s| (s.prefix.as_str(), s)).collect();
    let (mut acked, mut unknown_present, mut unknown_absent, mut refused) = (0, 0, 0, 0);
    for (prefix, n) in &present_per_batch {
        let s = batches.get(prefix).unwrap_or_else(|| panic!("batch {prefix} in the log was never sent"));
        assert_eq!(*n, s.ids.len(), "batch {prefix} is half there: {n} of {} changes", s.ids.len());
    }
    for s in sent {
        let present: Vec<Option<u64>> = s.ids.iter().map(|id| by_id.get(id.as_str()).copied()).collect();
        match &s.outcome {
            Outcome::Acked(seqs) => {
                acked += 1;
                let got: Vec<u64> = present
                    .iter()
                    .zip(&s.ids)
                    .map(|(p, id)| p.unwrap_or_else(|| panic!("acknowledged change {id} is lost")))
                    .collect();
                assert_eq!(&got, seqs, "acknowledged seqs of batch {}", s.prefix);
            }
            Outcome::Refused(status, body) => {
                refused += 1;
                assert!(
                    present.iter().all(Option::is_none),
                    "batch {} answered {status} {body} but is logged",
                    s.prefix
                );
            }
            Outcome::Unknown(_) => {
                if present.iter().all(Option::is_some) {
                    unknown_present += 1;
                } else {
                    assert!(present.iter().all(Option::is_none), "batch {} is half there", s.prefix);
                    unknown_absent += 1;
                }
            }
        }
    }
    println!(
        "after restart: head {head}, {acked} acknowledged batches all present, {refused} refused (absent), \
         unacknowledged in flight: {unknown_present} committed, {unknown_absent} not"
    );

    // The chain verifies from seq 1 to head and equals status; the digest recomputes from a bootstrap.
    let heads = chain_heads(&log);
    for p in &pages {
        assert_eq!(p.state_hash, heads[p.cursor as usize]);
    }
    let st = status(c, url).await;
    assert_eq!(st["head"], head);
    assert_eq!(st["state_hash"], heads[head as usize].as_str(), "status state_hash vs the recomputed chain");
    let boot = Bootstrap::parse(bootstrap_lines(c, url, "auditor").await);
    assert_eq!(boot.header["cursor"], head);
    assert_eq!(boot.recomputed_digest(), st["state_digest"].as_str().unwrap(), "bootstrap digest vs status");
    assert_eq!(boot.header["state_digest"], st["state_digest"]);

    // The entity table is exactly what the log merges to: nothing of a lost batch lingers in it.
    let mut states: BTreeMap<(String, String), EntityState> = BTreeMap::new();
    for ch in &log {
        let stored: StoredChange = serde_json::from_value(ch.clone()).unwrap();
        let key = (stored.change.collection.as_str().to_owned(), stored.change.entity_id.as_str().to_owned());
        match merge(Policy::Fields, states.get(&key), &stored.change, stored.seq) {
            Merge::Applied { state, .. } => {
                states.insert(key, state);
            }
            Merge::Logged => {}
            Merge::Rejected(c) => panic!("a logged change merges as rejected: {c:?}"),
        }
    }
    assert_eq!(boot.entities.len(), states.len(), "entities in the bootstrap vs entities the log makes");
    for e in &boot.entities {
        let key = (e["collection"].as_str().unwrap().to_owned(), e["entity_id"].as_str().unwrap().to_owned());
        let want = states.get(&key).unwrap_or_else(|| panic!("entity {key:?} has no change in the log")).to_value();
        for k in ["data", "version", "deleted", "meta"] {
            assert_eq!(to_jcs(&e[k]), to_jcs(&want[k]), "{k} of {key:?}");
        }
    }
    assert_eq!(boot.appends.len(), log.iter().filter(|c| c["op"] == "append").count());
    log
}

store_test!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sigkill_mid_stream_loses_no_acknowledged_change_and_leaves_no_half_batch
);
async fn sigkill_mid_stream_loses_no_acknowledged_change_and_leaves_no_half_batch(backend: &Backend) {
    let mut server = Server::start(backend);
    let started = Instant::now();
    let (handles, acked, stop) = start_pushers(&server.url, "k", false);
    wait_for_acks(&acked, 400).await;
    tokio::task::block_in_place(|| server.kill());
    let at_kill = acked.load(Ordering::SeqCst);
    println!("SIGKILL after {at_kill} acknowledged batches ({:.2?})", started.elapsed());
    stop.store(true, Ordering::SeqCst);
    let mut sent = Vec::new();
    for h in handles {
        sent.extend(h.await.expect("a pusher panicked"));
    }
    let n_acked = sent.iter().filter(|s| matches!(s.outcome, Outcome::Acked(_))).count();
    let n_changes: usize = sent.iter().filter(|s| matches!(s.outcome, Outcome::Acked(_))).map(|s| s.ids.len()).sum();
    println!(
        "{n_acked} batches ({n_changes} changes) acknowledged in {:.2?}: {:.0} batches/s",
        started.elapsed(),
        n_acked as f64 / started.elapsed().as_secs_f64()
    );
    for s in &sent {
        if let Outcome::Refused(status, body) = &s.outcome {
            panic!("batch {} refused with {status} before the kill: {body}", s.prefix);
        }
    }

    tokio::task::block_in_place(|| server.restart());
    let c = client();
    let log = check_after_restart(&c, &server.url, &sent).await;

    // The store keeps going after recovery: the next change takes head + 1 and extends the chain.
    let head = log.len() as u64;
    let after = push(
        &c,
        &server.url,
        "after-crash",
        vec![upsert("after-1", "crash", "e1", json!({"after": true}), &hlc(now_ms(), 0, "after-crash"))],
    )
    .await;
    assert_eq!(after["results"][0]["seq"], head + 1);
    let (log2, _) = pull_all(&c, &server.url, "auditor", 1000).await;
    assert_eq!(after["state_hash"], chain_heads(&log2)[head as usize + 1].as_str());
}

store_test!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sigterm_with_pushes_in_flight_exits_zero_and_keeps_every_acknowledged_change
);
async fn sigterm_with_pushes_in_flight_exits_zero_and_keeps_every_acknowledged_change(backend: &Backend) {
    let mut server = Server::start(backend);
    // Two pushers of small batches and two of large ones, so that requests are
    // certainly in the server's hands when the signal comes.
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let mut heavy_in_flight = Vec::new();
    for (t, heavy) in [(0, false), (1, false), (2, true), (3, true)] {
        let in_flight = InFlight::default();
        if heavy {
            heavy_in_flight.push(in_flight.clone());
        }
        handles.push(tokio::spawn(pusher(
            server.url.clone(),
            format!("t{t}"),
            heavy,
            acked.clone(),
            stop.clone(),
            in_flight,
        )));
    }
    wait_for_acks(&acked, 60).await;
    // Signal while a large push has been in the server's hands for at least 30 ms.
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        let busy = heavy_in_flight
            .iter()
            .find_map(|f| f.lock().unwrap().clone().filter(|(_, since)| since.elapsed() >= Duration::from_millis(30)));
        if let Some((prefix, _)) = busy {
            break prefix;
        }
        assert!(Instant::now() < deadline, "no large push stayed in flight for 30 ms");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    // A watchdog so that a server that never exits fails the test instead of hanging it.
    let pid = server.child.id();
    let exited = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let exited = exited.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if exited.load(Ordering::SeqCst) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = std::process::Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            true
        })
    };
    let t0 = Instant::now();
    let status = tokio::task::block_in_place(|| server.terminate());
    exited.store(true, Ordering::SeqCst);
    let took = t0.elapsed();
    assert!(!watchdog.join().unwrap(), "the server did not exit within 30 s of SIGTERM");
    println!("SIGTERM: exited with {status} after {took:.2?}, {} batches acknowledged", acked.load(Ordering::SeqCst));
    assert!(status.success(), "deltasync serve exited with {status} after SIGTERM");
    stop.store(true, Ordering::SeqCst);
    let mut sent = Vec::new();
    for h in handles {
        sent.extend(h.await.expect("a pusher panicked"));
    }
    for s in &sent {
        match &s.outcome {
            Outcome::Acked(_) => {}
            Outcome::Unknown(why) => println!("  last push of {}: no answer: {why}", s.prefix),
            Outcome::Refused(status, body) => println!("  last push of {}: {status} {body}", s.prefix),
        }
    }
    // Requests in the server's hands when the signal came were answered, not dropped.
    let drained: Vec<&Sent> =
        sent.iter().filter(|s| s.done_at > t0 && matches!(s.outcome, Outcome::Acked(_))).collect();
    println!(
        "  answered 200 after SIGTERM: {} batches ({} changes)",
        drained.len(),
        drained.iter().map(|s| s.ids.len()).sum::<usize>()
    );
    let held = sent.iter().find(|s| s.prefix == held).unwrap();
    assert!(
        matches!(held.outcome, Outcome::Acked(_)),
        "push {} ({} changes) was in flight for 30+ ms when SIGTERM came and was not answered: {:?}",
        held.prefix,
        held.ids.len(),
        held.outcome
    );

    tokio::task::block_in_place(|| server.restart());
    let c = client();
    check_after_restart(&c, &server.url, &sent).await;
}

store_test!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sigterm_answers_a_waiting_long_poll_and_exits_promptly
);
async fn sigterm_answers_a_waiting_long_poll_and_exits_promptly(backend: &Backend) {
    let mut server = Server::start(backend);
    let c = client();
    push(&c, &server.url, "d", vec![upsert("lp-1", "x", "a", json!({"v": 1}), &hlc(now_ms(), 0, "d"))]).await;
    let url = server.url.clone();
    let poll = tokio::spawn(async move {
        let c = client();
        let t = Instant::now();
        let r = get(&c, &url, "/v1/pull?device_id=poller&cursor=1&wait=60").await;
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let status = tokio::task::block_in_place(|| server.terminate());
    let took = t0.elapsed();
    let ((code, page), waited) = poll.await.expect("the long poll panicked");
    println!(
        "SIGTERM with a long poll waiting: {status} after {took:.2?}; the poll answered {code} after {waited:.2?}"
    );
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(10), "a waiting long poll held the shutdown for {took:.2?}");
    assert_eq!(code, 200, "{page}");
    assert_eq!(page["changes"], json!([]));
    assert_eq!(page["cursor"], 1);
}
