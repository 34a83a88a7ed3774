//! PostgreSQL restarted under a stream of pushes through two instances:
//! meanwhile the servers answer 503 `unavailable`, afterwards they serve
//! again by themselves, and no acknowledged change is lost or logged twice.
//!
//! This test stops and starts the machine's PostgreSQL cluster (with
//! `pg_ctlcluster`), so it is the only test of its binary: cargo runs test
//! binaries one after another, so no other test sees the outage. Because it
//! takes the whole cluster down, it runs only when `DELTASYNC_TEST_PG_RESTART=1`
//! says that may be done (`.ci/run` sets it), and says it is skipped otherwise,
//! as when `DELTASYNC_TEST_POSTGRES` is not set.

mod common;
mod verify;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::pg_cluster::{PgCluster, restart_allowed};
use common::*;
use serde_json::{Value, json};
use verify::*;

const PUSHERS: usize = 4;

/// What a pusher saw.
#[derive(Default, Debug)]
struct Seen {
    /// `(change_id, seq)` from every 200 answer, including `duplicate` results of retries.
    acked: Vec<(String, u64)>,
    /// Change ids this pusher sent.
    sent: Vec<String>,
    /// 503 answers.
    unavailable: usize,
    /// 200 answers after the database came back.
    after_restart: usize,
}

/// Pushes batches of 1–8 changes; a batch that is refused or gets no answer
/// is retried with the same change ids until it is acknowledged, as a client does.
async fn pusher(url: String, p: usize, stop: Arc<AtomicBool>, restarted: Arc<AtomicBool>) -> Seen {
    let c = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let device = format!("pusher-{p}");
    let base = now_ms() - 100_000;
    let mut seen = Seen::default();
    let mut n = 0u64;
    let mut batch_no = 0;
    while !stop.load(Ordering::SeqCst) {
        let size = 1 + (batch_no * 5 + p) % 8;
        let changes: Vec<Value> = (0..size)
            .map(|i| {
                n += 1;
                let id = format!("p{p}-b{batch_no}-c{i}");
                seen.sent.push(id.clone());
                upsert(&id, "stream", &format!("e{}", n % 40), json!({"p": p, "n": n}), &hlc(base + n, 0, &device))
            })
            .collect();
        batch_no += 1;
        let body = json!({"device_id": device, "changes": changes});
        loop {
            let after = restarted.load(Ordering::SeqCst);
            match c.post(format!("{url}/v1/push")).json(&body).send().await {
                Ok(r) if r.status() == 200 => {
                    let answer: Value = r.json().await.unwrap();
                    for r in answer["results"].as_array().unwrap() {
                        let status = r["status"].as_str().unwrap();
                        assert!(status == "applied" || status == "duplicate", "{r}");
                        seen.acked.push((r["change_id"].as_str().unwrap().to_owned(), r["seq"].as_u64().unwrap()));
                    }
                    if after {
                        seen.after_restart += 1;
                    }
                    break;
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    assert_eq!(status, 503, "only 503 may answer a push while the database is away: {text}");
                    let v: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(v["error"], "unavailable", "{v}");
                    assert!(v["message"].as_str().unwrap().contains("PostgreSQL"), "the message names the cause: {v}");
                    seen.unavailable += 1;
                }
                Err(e) => panic!("the server itself must stay up and answer: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    seen
}

/// Polls /v1/status twice, 250 ms apart; how many answered 200.
async fn seen_after_restart(c: &reqwest::Client, url: &str) -> usize {
    let mut ok = 0;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if get(c, url, "/v1/status").await.0 == 200 {
            ok += 1;
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_under_pushes_loses_nothing_acknowledged() {
    let Some(backend) = Backend::postgres() else { return };
    if !restart_allowed() {
        eprintln!(
            "skipped: set DELTASYNC_TEST_PG_RESTART=1 to let this test stop and start the local PostgreSQL cluster"
        );
        return;
    }
    let Some(cluster) = PgCluster::local() else {
        eprintln!("skipped: no online PostgreSQL cluster found by pg_lsclusters to restart");
        return;
    };
    let a = Server::start(&backend);
    let b = Server::start_with(&backend, Options { database: Some(a.database.clone()), ..Options::default() });
    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..PUSHERS)
        .map(|p| {
            let url = if p % 2 == 0 { a.url.clone() } else { b.url.clone() };
            tokio::spawn(pusher(url, p, stop.clone(), restarted.clone()))
        })
        .collect();
    let c = client();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let cluster_ = cluster.clone();
    tokio::task::spawn_blocking(move || cluster_.stop()).await.unwrap();
    let down_at = Instant::now();
    // While the database is down, every endpoint that needs it answers 503.
    let health = c.get(format!("{}/healthz", a.url)).send().await.unwrap().status().as_u16();
    let (pull_status, pull) = get(&c, &b.url, "/v1/pull?device_id=observer&cursor=0").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cluster_ = cluster.clone();
    tokio::task::spawn_blocking(move || cluster_.start()).await.unwrap();
    restarted.store(true, Ordering::SeqCst);
    println!("PostgreSQL was down for {:.2?}", down_at.elapsed());
    assert_eq!(health, 503, "/healthz while the database is down");
    assert_eq!(pull_status, 503, "a pull while the database is down: {pull}");
    assert_eq!(pull["error"], "unavailable", "{pull}");

    // Let the stream go on until every pusher has been served again, then stop.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && seen_after_restart(&c, &a.url).await < 2 {}
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let mut seen = Vec::new();
    for h in handles {
        seen.push(h.await.expect("a pusher panicked"));
    }
    let unavailable: usize = seen.iter().map(|s| s.unavailable).sum();
    println!(
        "pushers: {} changes acknowledged, {unavailable} answers 503 during the outage, {} pushes served after it",
        seen.iter().map(|s| s.acked.len()).sum::<usize>(),
        seen.iter().map(|s| s.after_restart).sum::<usize>()
    );
    assert!(unavailable > 0, "no push was answered 503 while the database was down");
    for (p, s) in seen.iter().enumerate() {
        assert!(s.after_restart > 0, "pusher {p} was never served after the restart");
    }

    // Every change sent was eventually acknowledged, and the log holds each exactly once, at its acked seq.
    let (log, pages) = pull_all(&c, &b.url, "auditor", 1000).await;
    let mut seq_of = std::collections::HashMap::new();
    for (i, ch) in log.iter().enumerate() {
        assert_eq!(ch["seq"].as_u64().unwrap(), i as u64 + 1, "the log is gapless");
        let id = ch["change_id"].as_str().unwrap().to_owned();
        assert!(seq_of.insert(id.clone(), i as u64 + 1).is_none(), "{id} is logged twice");
    }
    let sent: usize = seen.iter().map(|s| s.sent.len()).sum();
    assert_eq!(log.len(), sent, "the log holds exactly the changes sent");
    for s in &seen {
        for (id, seq) in &s.acked {
            assert_eq!(seq_of.get(id), Some(seq), "acknowledged change {id} at seq {seq}");
        }
    }
    let heads = chain_heads(&log);
    for page in &pages {
        assert_eq!(page.state_hash, heads[page.cursor as usize]);
    }
    let st = status(&c, &a.url).await;
    assert_eq!(st["state_hash"], heads[log.len()].as_str(), "the chain verifies after the restart");

    // Instance A listens again: a long poll on it wakes on a push through B.
    let head = log.len() as u64;
    let waiter = {
        let (c, url) = (c.clone(), a.url.clone());
        tokio::spawn(async move { get(&c, &url, &format!("/v1/pull?device_id=waiter&cursor={head}&wait=30")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = Instant::now();
    push(
        &c,
        &b.url,
        "late",
        vec![upsert("after-restart", "stream", "e0", json!({"late": true}), &hlc(now_ms(), 0, "late"))],
    )
    .await;
    let (code, page) = waiter.await.unwrap();
    assert_eq!(code, 200, "{page}");
    assert_eq!(page["changes"][0]["change_id"], "after-restart", "{page}");
    assert!(sent.elapsed() < Duration::from_secs(15), "the long poll on A was not woken after the restart");
    println!("a long poll on A woke {:?} after a push through B, after the restart", sent.elapsed());
}
