//! `GET /metrics` and `--metrics-listen` against a real `deltasync serve`:
//! every metric the issue names, with values that follow what the server
//! did, text that `promtool check metrics` accepts, a token required on the
//! main port (not under `--auth none`, not on the metrics port), and
//! `--log-format json`.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const SECRET: &str = "metrics-test-secret";

/// `promtool`, from Debian's `prometheus` package (`.ci/run` installs it).
fn promtool() -> &'static str {
    for path in ["/usr/bin/promtool", "/usr/local/bin/promtool"] {
        if std::path::Path::new(path).exists() {
            return path;
        }
    }
    panic!("promtool is not installed: apt-get install -y --no-install-recommends prometheus (.ci/run does)")
}

/// `promtool check metrics` of `text`: its exit status and what it printed.
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The value of the sample `name{labels}` (labels exactly as rendered), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits for the log line that names the metrics port, and returns its URL.
fn metrics_url(server: &Server) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = server.log();
        if let Some(at) = log.lines().find_map(|l| l.split("metrics without a token at ").nth(1)) {
            return at.split_whitespace().next().unwrap().trim_matches('"').to_owned();
        }
        assert!(Instant::now() < deadline, "no metrics port in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let mut request = client().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

store_test!(#[tokio::test] async fn metrics_follow_what_the_server_did_and_promtool_accepts_them);
async fn metrics_follow_what_the_server_did_and_promtool_accepts_them(backend: &Backend) {
    let server = Server::start_with(
        backend,
        Options {
            jwt_secret: Some(SECRET.into()),
            config: Some("[limits]\nrequests_per_second = 1\nburst = 30\n".into()),
            capture_log: true,
            extra_args: vec!["--metrics-listen".into(), "127.0.0.1:0".into()],
            ..Options::default()
        },
    );
    let token = token_for(SECRET, "alice");
    let http = client();
    let push = |changes: Vec<Value>| {
        let (http, url, token) = (http.clone(), server.url.clone(), token.clone());
        async move {
            let response = http
                .post(format!("{url}/v1/push"))
                .bearer_auth(&token)
                .json(&json!({"device_id": "phone", "changes": changes}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 200);
        }
    };
    let changes: Vec<Value> = (0..5)
        .map(|i| upsert(&format!("c{i}"), "notes", &format!("n{i}"), json!({"i": i}), &hlc(now_ms(), i, "phone")))
        .collect();
    push(changes.clone()).await;
    push(vec![changes[0].clone()]).await; // a duplicate
    let skewed = upsert("c9", "notes", "n9", json!({"i": 9}), &hlc(now_ms() + 3_600_000, 0, "phone"));
    push(vec![skewed]).await; // rejected: clock_skew, an hour ahead

    // The main port wants a token; with one, it answers.
    let (status, _) = get(&format!("{}/metrics", server.url), None).await;
    assert_eq!(status, 401);
    // Spend the rest of alice's burst, so that one request is refused.
    let mut refused = 0;
    for _ in 0..40 {
        if get(&format!("{}/v1/status", server.url), Some(&token)).await.0 == 429 {
            refused += 1;
        }
    }
    assert!(refused > 0);

    let unauthenticated = metrics_url(&server);
    let (status, text) = get(&unauthenticated, None).await;
    assert_eq!(status, 200, "{text}");
    for name in [
        "deltasync_http_requests_total",
        "deltasync_http_request_duration_seconds_bucket",
        "deltasync_changes_total",
        "deltasync_live_connections",
        "deltasync_waiting_polls",
        "deltasync_store_commit_seconds_bucket",
        "deltasync_rate_limited_total",
    ] {
        assert!(text.contains(name), "{name} is missing:\n{text}");
    }
    assert_eq!(sample(&text, "deltasync_changes_total{result=\"applied\"}"), Some(5.0), "{text}");
    assert_eq!(sample(&text, "deltasync_changes_total{result=\"duplicate\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "deltasync_changes_total{result=\"rejected\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "deltasync_rate_limited_total"), Some(refused as f64), "{text}");
    assert_eq!(
        sample(&text, "deltasync_http_requests_total{endpoint=\"/v1/push\",status=\"200\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "deltasync_http_requests_total{endpoint=\"/v1/status\",status=\"429\"}"),
        Some(refused as f64),
        "{text}"
    );
    assert!(sample(&text, "deltasync_store_commit_seconds_count").unwrap_or(0.0) >= 3.0, "{text}");
    let (ok, said) = promtool_check(&text);
    assert!(ok, "promtool check metrics refused the text: {said}\n{text}");

    // The metrics port serves nothing else.
    let (status, _) = get(&unauthenticated.replace("/metrics", "/v1/status"), Some(&token)).await;
    assert_eq!(status, 404);
    // A token of another user reads the same metrics on the main port (they are the server's).
    let (status, main) = get(&format!("{}/metrics", server.url), Some(&token_for(SECRET, "bob"))).await;
    assert_eq!(status, 200);
    assert!(main.contains("deltasync_changes_total{result=\"applied\"} 5"), "{main}");
}

#[tokio::test]
async fn without_auth_the_metrics_need_no_token_and_live_sockets_and_polls_are_gauged() {
    let server = Server::start(&Backend::Sqlite);
    let url = server.url.clone();
    let poll = tokio::spawn(async move { get(&format!("{url}/v1/pull?device_id=d1&cursor=0&wait=3"), None).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, text) = get(&format!("{}/metrics", server.url), None).await;
        assert_eq!(status, 200);
        if sample(&text, "deltasync_waiting_polls") == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "the waiting poll never showed:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(poll.await.unwrap().0, 200);
    let (_, text) = get(&format!("{}/metrics", server.url), None).await;
    assert_eq!(sample(&text, "deltasync_waiting_polls"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "deltasync_live_connections"), Some(0.0), "{text}");
}

#[tokio::test]
async fn log_format_json_writes_one_object_per_line_with_the_refusals() {
    let server = Server::start_with(
        &Backend::Sqlite,
        Options {
            jwt_secret: Some(SECRET.into()),
            capture_log: true,
            extra_args: vec!["--log-format".into(), "json".into()],
            ..Options::default()
        },
    );
    let (status, _) = get(&format!("{}/v1/status", server.url), Some("not-a-token")).await;
    assert_eq!(status, 401);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = server.log();
        let lines: Vec<Value> = log
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        if let Some(refused) = lines.iter().find(|l| l["fields"]["message"] == "request refused") {
            assert_eq!(refused["level"], "INFO", "{refused}");
            assert_eq!(refused["fields"]["status"], 401, "{refused}");
            assert_eq!(refused["fields"]["code"], "unauthorized", "{refused}");
            assert_eq!(refused["fields"]["address"], "127.0.0.1", "{refused}");
            assert!(refused["fields"]["reason"].as_str().is_some_and(|r| !r.is_empty()), "{refused}");
            break;
        }
        assert!(Instant::now() < deadline, "no refusal logged:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
