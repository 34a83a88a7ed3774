//! The background [`SyncRunner`]: sync on start, debounced syncs after local
//! writes, `sync_now`, live mode (the live channel, or a long poll on a
//! server without it), stop, and network failures.
//!
//! Timing is checked loosely: orderings and generous upper bounds, never
//! tight windows.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Devices, TestServer, dead_url, eventually, obj};
use deltasync_client::runner::LastSync;
use deltasync_client::{ClientError, Origin, Result as ClientResult, RunnerOptions, SyncReport, SyncRunner};
use deltasync_protocol::{Collection, EntityId};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout};

fn options(interval: Duration, debounce: Duration, live: bool) -> RunnerOptions {
    RunnerOptions { interval, debounce, live, wait: Duration::from_secs(30) }
}

/// The next sync outcome the runner reports, within `within`.
async fn next_outcome(rx: &mut watch::Receiver<LastSync>, within: Duration) -> Arc<ClientResult<SyncReport>> {
    timeout(within, rx.changed()).await.expect("a sync outcome in time").expect("runner alive");
    rx.borrow_and_update().clone().expect("an outcome")
}

fn ok_report(outcome: &ClientResult<SyncReport>) -> &SyncReport {
    match outcome {
        Ok(r) => r,
        Err(e) => panic!("the runner's sync failed: {e}"),
    }
}

const LONG: Duration = Duration::from_secs(60);
const TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncs_on_start() {
    let mut server = TestServer::start().await;
    let devices = Devices::new();
    let client = devices.open("A", &server.url);
    client.patch("tasks", "t1", obj(json!({"title": "before start"}))).unwrap();

    let runner = SyncRunner::start(client.clone(), options(LONG, Duration::from_millis(300), false));
    let mut outcomes = runner.outcomes();
    let outcome = next_outcome(&mut outcomes, TIMEOUT).await;
    let r = ok_report(&outcome);
    assert_eq!((r.pushed, r.pending), (1, 0), "{r:?}");
    assert_eq!(server.head().await, 1);
    assert!(client.stats().unwrap().last_sync_at.is_some());
    timeout(TIMEOUT, runner.stop()).await.expect("stop ends the task");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_write_syncs_after_the_debounce_not_before() {
    let mut server = TestServer::start().await;
    let devices = Devices::new();
    let client = devices.open("A", &server.url);
    let debounce = Duration::from_millis(600);
    let runner = SyncRunner::start(client.clone(), options(LONG, debounce, false));
    let mut outcomes = runner.outcomes();
    ok_report(&*next_outcome(&mut outcomes, TIMEOUT).await);
    let first_sync_seen = Instant::now();

    // A burst of writes right after a sync: they wait for the debounce, then go in one sync.
    for i in 0..3 {
        client.patch("tasks", &format!("t{i}"), obj(json!({"n": i}))).unwrap();
    }
    let mut arrived = None;
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if server.head().await > 0 {
            arrived = Some(Instant::now());
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    let arrived = arrived.expect("the debounced sync happened (long before the 60 s interval)");
    assert!(
        arrived >= first_sync_seen + debounce / 2,
        "the writes reached the server {:?} after the last sync, before the debounce ({debounce:?})",
        arrived - first_sync_seen
    );
    let outcome = next_outcome(&mut outcomes, TIMEOUT).await;
    let r = ok_report(&outcome);
    assert_eq!((r.pushed, r.pending), (3, 0), "the burst went in one sync: {r:?}");
    assert_eq!(server.head().await, 3);

    // A write long after the last sync is not held back further than the debounce.
    sleep(debounce * 2).await;
    let before = Instant::now();
    client.patch("tasks", "late", obj(json!({"n": 9}))).unwrap();
    let outcome = next_outcome(&mut outcomes, TIMEOUT).await;
    assert_eq!(ok_report(&outcome).pushed, 1);
    assert!(before.elapsed() < Duration::from_secs(5), "took {:?}", before.elapsed());
    timeout(TIMEOUT, runner.stop()).await.expect("stop ends the task");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_now_bypasses_the_debounce() {
    let mut server = TestServer::start().await;
    let devices = Devices::new();
    let client = devices.open("A", &server.url);
    let runner = SyncRunner::start(client.clone(), options(LONG, Duration::from_secs(30), false));
    let mut outcomes = runner.outcomes();
    ok_report(&*next_outcome(&mut outcomes, TIMEOUT).await);

    client.patch("tasks", "t1", obj(json!({"title": "now"}))).unwrap();
    sleep(Duration::from_millis(300)).await;
    assert_eq!(server.head().await, 0, "held by the 30 s debounce");
    let asked = Instant::now();
    runner.sync_now();
    let outcome = next_outcome(&mut outcomes, TIMEOUT).await;
    assert_eq!(ok_report(&outcome).pushed, 1);
    assert_eq!(server.head().await, 1);
    assert!(asked.elapsed() < Duration::from_secs(5), "sync_now took {:?}", asked.elapsed());
    timeout(TIMEOUT, runner.stop()).await.expect("stop ends the task");
    server.stop().await;
}

/// Waits until `events` reports `t1` of `tasks` changed by the server.
async fn server_change_of_t1(events: &mut tokio::sync::broadcast::Receiver<deltasync_client::ChangeEvent>) {
    let wanted = (Collection::parse("tasks").unwrap(), EntityId::parse("t1").unwrap());
    timeout(TIMEOUT, async {
        loop {
            let e = events.recv().await.expect("event channel open");
            if e.origin == Origin::Server && e.entities.contains(&wanted) {
                assert_eq!(e.entities, vec![wanted]);
                return;
            }
        }
    })
    .await
    .expect("B heard of A's change in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_mode_syncs_when_the_live_channel_says_the_head_moved() {
    let mut server = TestServer::start().await;
    let devices = Devices::new();
    let a = devices.open("A", &server.url);
    let b = devices.open("B", &server.url);
    let mut events = b.subscribe();
    let runner = SyncRunner::start(b.clone(), options(LONG, Duration::from_millis(300), true));
    let mut outcomes = runner.outcomes();
    ok_report(&*next_outcome(&mut outcomes, TIMEOUT).await);
    // Let the live channel open (not required for correctness).
    sleep(Duration::from_millis(200)).await;

    a.patch("tasks", "t1", obj(json!({"title": "hello"}))).unwrap();
    assert_eq!(a.sync().await.unwrap().pushed, 1);
    let sent = Instant::now();
    server_change_of_t1(&mut events).await;
    eprintln!("live change arrived {:?} after A's sync", sent.elapsed());
    // The interval is 60 s and nothing was written on B: only the live
    // channel's head can have started this sync.
    let report = ok_report(&*next_outcome(&mut outcomes, TIMEOUT).await).clone();
    assert_eq!(report.pulled, 1, "{report:?}");
    assert_eq!(b.get("tasks", "t1").unwrap().unwrap().data["title"], "hello");
    let status = server.status().await;
    let st = b.stats().unwrap();
    assert_eq!((st.cursor, st.state_hash, st.state_digest), (status.head, status.state_hash, status.state_digest));

    // The head of B's own sync does not start another one.
    sleep(Duration::from_millis(500)).await;
    assert!(!outcomes.has_changed().unwrap(), "a sync ran with nothing new on the server");

    // Stop ends the task while the live channel is open.
    timeout(Duration::from_secs(5), runner.stop()).await.expect("stop ends the task with the live channel open");
    server.stop().await;
}

/// A real server's router on a fresh SQLite file in `dir`, and what keeps it running.
fn real_router(dir: &std::path::Path) -> (axum::Router, watch::Sender<bool>) {
    let store = deltasync_server::store::sqlite::SqliteStore::open(&dir.join("server.db")).unwrap();
    let (shutdown, rx) = watch::channel(false);
    let state = deltasync_server::api::AppState::new(
        Arc::new(store),
        deltasync_server::Config::default(),
        deltasync_server::Auth::None,
        deltasync_server::Clock::system(),
        rx,
    );
    (deltasync_server::api::router(Arc::new(state)), shutdown)
}

/// Serves `app` on a free port of 127.0.0.1; returns its URL.
async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// A server without the live channel (as before it had one): the real
/// router, with `GET /v1/live` answered 404. Returns its URL, and what keeps
/// it running.
async fn start_without_live() -> (String, tokio::sync::watch::Sender<bool>, tempfile::TempDir) {
    use axum::response::IntoResponse;
    let dir = tempfile::tempdir().unwrap();
    let (router, shutdown) = real_router(dir.path());
    let app = router.layer(axum::middleware::from_fn(
        |request: axum::extract::Request, next: axum::middleware::Next| async move {
            if request.uri().path() == "/v1/live" {
                let body = json!({"error": "not_found", "message": "no such endpoint: /v1/live"});
                return (axum::http::StatusCode::NOT_FOUND, axum::Json(body)).into_response();
            }
            next.run(request).await
        },
    ));
    (serve(app).await, shutdown, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_mode_long_polls_a_server_without_the_live_channel() {
    let (url, _running, _dir) = start_without_live().await;
    let devices = Devices::new();
    let a = devices.open("A", &url);
    let b = devices.open("B", &url);
    let mut events = b.subscribe();
    let runner = SyncRunner::start(b.clone(), options(LONG, Duration::from_millis(300), true));
    let mut outcomes = runner.outcomes();
    ok_report(&*next_outcome(&mut outcomes, TIMEOUT).await);
    sleep(Duration::from_millis(200)).await;

    a.patch("tasks", "t1", obj(json!({"title": "hello"}))).unwrap();
    assert_eq!(a.sync().await.unwrap().pushed, 1);
    server_change_of_t1(&mut events).await;
    assert!(!outcomes.has_changed().unwrap(), "no sync ran (the interval is 60 s): the long poll delivered the change");
    assert_eq!(b.get("tasks", "t1").unwrap().unwrap().data["title"], "hello");

    // Stop ends the task while a long poll is held on the server.
    timeout(Duration::from_secs(5), runner.stop()).await.expect("stop ends the task during a long poll");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_drop_end_the_task() {
    let mut server = TestServer::start().await;
    let devices = Devices::new();
    let client = devices.open("A", &server.url);
    let debounce = Duration::from_millis(100);

    let runner = SyncRunner::start(client.clone(), options(LONG, debounce, false));
    let mut outcomes = runner.outcomes();
    ok_report(&*next_outcome(&mut outcomes, TIMEOUT).await);
    timeout(TIMEOUT, runner.stop()).await.expect("stop ends the task");
    assert!(outcomes.changed().await.is_err(), "the runner's task is gone");
    client.patch("tasks", "t1", obj(json!({"n": 1}))).unwrap();
    sleep(debounce * 8).await;
    assert_eq!(server.head().await, 0, "a stopped runner does not sync");

    let runner = SyncRunner::start(client.clone(), options(LONG, debounce, false));
    let mut outcomes = runner.outcomes();
    assert_eq!(ok_report(&*next_outcome(&mut outcomes, TIMEOUT).await).pushed, 1);
    drop(runner);
    assert!(timeout(TIMEOUT, outcomes.changed()).await.expect("task ends").is_err(), "dropping stops the task");
    client.patch("tasks", "t2", obj(json!({"n": 2}))).unwrap();
    sleep(debounce * 8).await;
    assert_eq!(server.head().await, 1, "a dropped runner does not sync");
    assert_eq!(client.stats().unwrap().pending, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_failures_are_reported_and_the_outbox_waits_for_the_server() {
    let url = dead_url();
    let devices = Devices::new();
    let client = devices.open("A", &url);
    client.patch("tasks", "t1", obj(json!({"title": "offline"}))).unwrap();

    let runner = SyncRunner::start(client.clone(), options(LONG, Duration::from_millis(100), false));
    let mut outcomes = runner.outcomes();
    let outcome = next_outcome(&mut outcomes, TIMEOUT).await;
    match &*outcome {
        Err(e @ ClientError::Unreachable { .. }) => assert!(e.is_transient()),
        other => panic!("expected an unreachable error, got {other:?}"),
    }
    let outbox = client.outbox().unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].retries, 0, "a network failure is not a refusal");
    assert_eq!(client.get("tasks", "t1").unwrap().unwrap().data["title"], "offline");

    // The server comes up where the client looks: the runner's backoff retries on its own.
    let mut server = TestServer::start_at(&url).await;
    let synced = timeout(Duration::from_secs(20), async {
        loop {
            let outcome = next_outcome(&mut outcomes, Duration::from_secs(20)).await;
            if let Ok(r) = &*outcome {
                return r.clone();
            }
        }
    })
    .await
    .expect("the runner recovered after the server came up");
    assert_eq!((synced.pushed, synced.pending), (1, 0), "{synced:?}");
    assert!(eventually(TIMEOUT, || async { server.head().await == 1 }).await);
    assert_eq!(client.stats().unwrap().pending, 0);

    // After recovery, a local write is synced after the debounce again.
    client.patch("tasks", "t2", obj(json!({"title": "online"}))).unwrap();
    assert!(eventually(TIMEOUT, || async { server.head().await == 2 }).await, "debounced sync after recovery");
    timeout(TIMEOUT, runner.stop()).await.expect("stop ends the task");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_now_recovers_at_once_after_a_network_failure() {
    let url = dead_url();
    let devices = Devices::new();
    let client = devices.open("A", &url);
    client.patch("tasks", "t1", obj(json!({"n": 1}))).unwrap();
    // With a 60 s interval the network backoff can grow to tens of seconds; sync_now skips it.
    let runner = SyncRunner::start(client.clone(), options(LONG, Duration::from_millis(100), false));
    let mut outcomes = runner.outcomes();
    for _ in 0..2 {
        assert!(next_outcome(&mut outcomes, TIMEOUT).await.is_err());
    }
    let mut server = TestServer::start_at(&url).await;
    runner.sync_now();
    let outcome = next_outcome(&mut outcomes, Duration::from_secs(5)).await;
    assert_eq!(ok_report(&outcome).pushed, 1);
    assert_eq!(server.head().await, 1);
    timeout(TIMEOUT, runner.stop()).await.expect("stop ends the task");
    server.stop().await;
}

/// Three devices with live runners write concurrently; with no manual sync at
/// all they converge on the server's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_runners_on_three_devices_converge_on_their_own() {
    let mut server = TestServer::start().await;
    let devices = Devices::new();
    let clients: Vec<_> = ["A", "B", "C"].iter().map(|n| devices.open(n, &server.url)).collect();
    let runners: Vec<_> =
        clients.iter().map(|c| SyncRunner::start(c.clone(), options(LONG, Duration::from_millis(50), true))).collect();
    // A small deterministic pseudo-random walk of writes.
    let mut seed: u64 = 0x5eed;
    let mut next = move |n: u64| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    for step in 0..90u64 {
        let c = &clients[next(3) as usize];
        let id = format!("e{}", next(4));
        match next(6) {
            0 => {
                c.delete("tasks", &id).unwrap();
            }
            1 | 2 => {
                c.put("tasks", &id, obj(json!({"x": next(3), "by": step}))).unwrap();
            }
            _ => {
                c.patch("tasks", &id, obj(json!({["x", "y", "z"][next(3) as usize]: step}))).unwrap();
            }
        }
        sleep(Duration::from_millis(next(30))).await;
    }
    let converged = eventually(Duration::from_secs(30), || async {
        let status = server.status().await;
        clients.iter().all(|c| {
            let st = c.stats().unwrap();
            st.pending == 0
                && st.cursor == status.head
                && st.state_hash == status.state_hash
                && st.state_digest == status.state_digest
        })
    })
    .await;
    let status = server.status().await;
    let stats: Vec<_> = clients.iter().map(|c| c.stats().unwrap()).collect();
    assert!(
        converged,
        "the runners did not converge: server head {} {:?}; devices {stats:#?}",
        status.head, status.state_hash
    );
    let (_, entities) = server.snapshot().await;
    for c in &clients {
        assert_eq!(common::listing(c, "tasks"), common::server_listing(&entities, "tasks"));
        assert_eq!(c.stats().unwrap().failed, 0);
    }
    for r in runners {
        timeout(TIMEOUT, r.stop()).await.expect("stop ends the task");
    }
    server.stop().await;
}

/// A real server whose first answer is `429 rate_limited` with
/// `Retry-After: 3`; the arrival time of every request is recorded.
async fn start_refusing_once() -> (String, Arc<std::sync::Mutex<Vec<Instant>>>, watch::Sender<bool>, tempfile::TempDir)
{
    use axum::response::IntoResponse;
    let dir = tempfile::tempdir().unwrap();
    let (router, shutdown) = real_router(dir.path());
    let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = arrivals.clone();
    let app = router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let seen = seen.clone();
            async move {
                let first = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(Instant::now());
                    seen.len() == 1
                };
                if first {
                    let body = json!({"error": "rate_limited", "message": "too many requests; retry after 3 s"});
                    let mut response = (axum::http::StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
                    response.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("3"));
                    return response;
                }
                next.run(request).await
            }
        },
    ));
    (serve(app).await, arrivals, shutdown, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_sync_is_retried_no_sooner_than_retry_after_says() {
    let (url, arrivals, _running, _dir) = start_refusing_once().await;
    let devices = Devices::new();
    let client = devices.open("A", &url);
    client.patch("tasks", "t1", obj(json!({"title": "waits its turn"}))).unwrap();
    // Without Retry-After the first retry would come after 0.5-1 s.
    let runner = SyncRunner::start(client.clone(), options(LONG, Duration::from_millis(100), false));
    let mut outcomes = runner.outcomes();
    let refused = next_outcome(&mut outcomes, TIMEOUT).await;
    match &*refused {
        Err(e) => {
            assert_eq!(e.code(), "rate_limited", "{e}");
            assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        }
        Ok(r) => panic!("the first sync was refused, yet reported {r:?}"),
    }
    let retried = next_outcome(&mut outcomes, TIMEOUT).await;
    assert_eq!(ok_report(&retried).pushed, 1);
    let arrivals = arrivals.lock().unwrap().clone();
    let waited = arrivals[1] - arrivals[0];
    assert!(waited >= Duration::from_millis(2_950), "the retry came {waited:?} after the 429 that said 3 s");
    timeout(TIMEOUT, runner.stop()).await.expect("stop ends the task");
}
