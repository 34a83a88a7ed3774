//! Request rates and waiting polls per user (`[limits]`), against a real
//! `deltasync serve`: past a budget the answer is `429 rate_limited` with
//! `Retry-After`, the refusal is logged at INFO, and one user flooding the
//! server neither spends another user's budget nor slows their syncs.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const SECRET: &str = "rate-limit-test-secret";

fn server(limits: &str) -> Server {
    Server::start_with(
        &Backend::Sqlite,
        Options {
            jwt_secret: Some(SECRET.into()),
            config: Some(format!("[limits]\n{limits}")),
            capture_log: true,
            ..Options::default()
        },
    )
}

/// `GET /v1/status` as `token` (none: no `Authorization`): status, `Retry-After`, body.
async fn status(http: &reqwest::Client, url: &str, token: Option<&str>) -> (u16, Option<String>, Value) {
    let mut request = http.get(format!("{url}/v1/status"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let code = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (code, retry_after, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_user_past_the_burst_is_answered_429_with_retry_after_and_others_are_not() {
    let server = server("requests_per_second = 5\nburst = 20\n");
    let http = client();
    let alice = token_for(SECRET, "alice");
    let mut codes = Vec::new();
    let mut refused = None;
    for _ in 0..300 {
        let (code, retry_after, body) = status(&http, &server.url, Some(&alice)).await;
        if code == 429 && refused.is_none() {
            refused = Some((retry_after, body));
        }
        codes.push(code);
    }
    let ok = codes.iter().filter(|&&c| c == 200).count();
    assert!((20..30).contains(&ok), "the burst of 20 (and what refilled meanwhile) passes, not more: {ok} of 300");
    assert_eq!(codes.iter().filter(|&&c| c != 200 && c != 429).count(), 0, "{codes:?}");
    let (retry_after, body) = refused.expect("some requests were refused");
    let secs: u64 = retry_after.expect("a 429 carries Retry-After").parse().expect("whole seconds");
    assert!(secs >= 1, "{secs}");
    assert_eq!(body["error"], "rate_limited", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("requests_per_second") && message.contains("user alice"), "{message}");

    // Another user's budget is whole; so is an anonymous client's (its address's).
    let (code, _, body) = status(&http, &server.url, Some(&token_for(SECRET, "bob"))).await;
    assert_eq!((code, body["user_id"].as_str()), (200, Some("bob")));
    let (code, _, body) = status(&http, &server.url, None).await;
    assert_eq!((code, body["error"].as_str()), (401, Some("unauthorized")), "{body}");

    // Every refusal is one INFO line naming the status, the user and the reason.
    let log = server.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("request refused") && l.contains("status=429")).collect();
    assert_eq!(lines.len(), 300 - ok, "one line per refused request:\n{log}");
    assert!(
        lines[0].contains("INFO") && lines[0].contains("user=alice") && lines[0].contains("code=rate_limited"),
        "{}",
        lines[0]
    );
    assert!(log.lines().any(|l| l.contains("status=401") && l.contains("code=unauthorized")), "{log}");
}

#[tokio::test]
async fn requests_without_a_valid_token_are_limited_per_address() {
    let server = server("requests_per_second = 1\nburst = 10\n");
    let http = client();
    let mut codes = Vec::new();
    for token in std::iter::repeat_n(Some("not-a-token"), 15).chain(std::iter::repeat_n(None, 15)) {
        codes.push(status(&http, &server.url, token).await.0);
    }
    let unauthorized = codes.iter().filter(|&&c| c == 401).count();
    assert!((10..13).contains(&unauthorized), "the address's burst of 10 gets its 401s: {codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 429).count(), 30 - unauthorized, "{codes:?}");
    // A valid token counts against its user, not the spent address.
    let (code, _, _) = status(&http, &server.url, Some(&token_for(SECRET, "carol"))).await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn long_polls_past_max_waiting_polls_are_refused() {
    let server = server("max_waiting_polls = 2\n");
    let http = client();
    let token = token_for(SECRET, "dave");
    let poll = |device: &'static str| {
        let (http, url, token) = (http.clone(), server.url.clone(), token.clone());
        async move {
            let response = http
                .get(format!("{url}/v1/pull?device_id={device}&cursor=0&wait=3"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            let code = response.status().as_u16();
            let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            (code, retry_after, response.json::<Value>().await.unwrap())
        }
    };
    let waiting = [tokio::spawn(poll("d1")), tokio::spawn(poll("d2"))];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, retry_after, body) = poll("d3").await;
    assert_eq!((code, body["error"].as_str()), (429, Some("rate_limited")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("max_waiting_polls"), "{body}");
    assert!(retry_after.is_some());
    // Another user polls; a pull without wait is not a waiting poll.
    let other = http
        .get(format!("{}/v1/pull?device_id=e1&cursor=0&wait=0", server.url))
        .bearer_auth(token_for(SECRET, "erin"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status().as_u16(), 200);
    let plain =
        http.get(format!("{}/v1/pull?device_id=d4&cursor=0", server.url)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(plain.status().as_u16(), 200);
    for w in waiting {
        assert_eq!(w.await.unwrap().0, 200, "the two waiting polls are answered");
    }
    // Their places are given back.
    assert_eq!(poll("d3").await.0, 200);
}

/// One sync of one small change for `device`, its latency and status.
async fn timed_sync(http: &reqwest::Client, url: &str, token: &str, device: &str, n: u64) -> (u16, Duration) {
    let change = upsert(&random_uuid(), "notes", &format!("n{}", n % 50), json!({"n": n}), &hlc(now_ms(), 0, device));
    let started = Instant::now();
    let response = http
        .post(format!("{url}/v1/sync"))
        .bearer_auth(token)
        .json(&json!({"device_id": device, "cursor": 0, "changes": [change], "limit": 1}))
        .send()
        .await
        .unwrap();
    let code = response.status().as_u16();
    let _ = response.bytes().await;
    (code, started.elapsed())
}

/// Bob's syncs, paced at 40 a second (under the default 50): their p50 and p99.
async fn bobs_syncs(url: &str, count: u64) -> (Duration, Duration) {
    let http = client();
    let token = token_for(SECRET, "bob");
    let mut latencies = Vec::new();
    let mut next = Instant::now();
    for n in 0..count {
        tokio::time::sleep_until(next.into()).await;
        next += Duration::from_millis(25);
        let (code, took) = timed_sync(&http, url, &token, "bob-phone", n).await;
        assert_eq!(code, 200, "bob's sync {n} was refused");
        latencies.push(took);
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).min(latencies.len()) - 1];
    (at(0.50), at(0.99))
}

/// Alice floods `POST /v1/sync` from 32 connections, each waiting `pace`
/// between requests (none: as fast as the server answers), while bob syncs:
/// bob's p50 and p99, and alice's accepted and refused requests.
async fn during_a_flood(url: &str, pace: Option<Duration>) -> ((Duration, Duration), (u64, u64)) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for c in 0..32 {
        let (url, stop) = (url.to_owned(), stop.clone());
        flood.push(tokio::spawn(async move {
            let http = client();
            let token = token_for(SECRET, "alice");
            let (mut ok, mut limited, mut n) = (0u64, 0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                match timed_sync(&http, &url, &token, &format!("alice-{c}"), n).await.0 {
                    200 => ok += 1,
                    429 => limited += 1,
                    other => panic!("alice's flood got {other}"),
                }
                if let Some(pace) = pace {
                    tokio::time::sleep(pace).await;
                }
            }
            (ok, limited)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bob = bobs_syncs(url, 200).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut limited) = (0, 0);
    for f in flood {
        let (o, l) = f.await.unwrap();
        ok += o;
        limited += l;
    }
    (bob, (ok, limited))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_flooding_the_server_does_not_slow_another_users_sync() {
    // The default [limits]: 50 requests a second, bursts of 100.
    let server = server("requests_per_second = 50\n");
    let (alone_p50, alone_p99) = bobs_syncs(&server.url, 200).await;
    // 32 connections each every 16 ms: about 2,000 requests a second, 40 times alice's budget.
    let ((paced_p50, paced_p99), (paced_ok, paced_limited)) =
        during_a_flood(&server.url, Some(Duration::from_millis(16))).await;
    // As fast as the server answers: the flood and the server then share the test machine's cores.
    let ((flood_p50, flood_p99), (ok, limited)) = during_a_flood(&server.url, None).await;
    println!(
        "bob's sync alone: p50 {alone_p50:?}, p99 {alone_p99:?}; \
         during a flood of ~2,000 requests/s ({paced_ok} accepted, {paced_limited} refused 429): p50 {paced_p50:?}, p99 {paced_p99:?}; \
         during an unpaced flood ({ok} accepted, {limited} refused 429): p50 {flood_p50:?}, p99 {flood_p99:?}"
    );
    for (ok, limited) in [(paced_ok, paced_limited), (ok, limited)] {
        assert!(limited > 5 * ok.max(1), "the flood was mostly refused: {ok} accepted, {limited} refused");
        assert!(ok <= 100 + 50 * 10, "alice got no more than her burst and refill over the run: {ok}");
    }
}
