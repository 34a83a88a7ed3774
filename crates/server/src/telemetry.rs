//! Metrics, in Prometheus text: what `GET /metrics` (and the port of
//! `deltasync serve --metrics-listen`) answers.
//!
//! The process records through the `metrics` crate's global recorder, which
//! [`recorder`] installs once (a process that already has another recorder
//! keeps it, and `/metrics` then shows only what was described here).
//! Durations are histograms with the buckets of [`BUCKETS`], in seconds.
//!
//! | metric | kind | labels |
//! | --- | --- | --- |
//! | `deltasync_http_requests_total` | counter | `endpoint` (the route, `other` for anything else), `status` |
//! | `deltasync_http_request_duration_seconds` | histogram | `endpoint` |
//! | `deltasync_changes_total` | counter | `result`: `applied`, `duplicate`, `rejected`, `conflict` |
//! | `deltasync_live_connections` | gauge | |
//! | `deltasync_waiting_polls` | gauge | |
//! | `deltasync_store_commit_seconds` | histogram | |
//! | `deltasync_rate_limited_total` | counter | |

use std::sync::OnceLock;
use std::time::Duration;

use deltasync_protocol::wire::{PushResult, ResultStatus};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests answered, by endpoint and status.
pub const HTTP_REQUESTS: &str = "deltasync_http_requests_total";
/// How long requests took, by endpoint, until their answer's head.
pub const HTTP_DURATION: &str = "deltasync_http_request_duration_seconds";
/// Pushed changes, by what became of them.
pub const CHANGES: &str = "deltasync_changes_total";
/// Live sockets (`GET /v1/live`) open now.
pub const LIVE_CONNECTIONS: &str = "deltasync_live_connections";
/// Long polls waiting now.
pub const WAITING_POLLS: &str = "deltasync_waiting_polls";
/// How long the store's write commits took.
pub const STORE_COMMIT: &str = "deltasync_store_commit_seconds";
/// Requests answered `429 rate_limited`.
pub const RATE_LIMITED: &str = "deltasync_rate_limited_total";

/// The histogram buckets, in seconds: from half a millisecond to a minute.
pub const BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// How often histograms are drained into their buckets (the exporter keeps
/// raw samples until then, so this bounds their memory).
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process's recorder, installed on first use; its handle renders the text.
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS))
            .expect("the buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed: /metrics shows only deltasync's descriptions");
        }
        describe();
        handle
    })
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by endpoint and status.");
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "Time to answer an HTTP request (until its head), by endpoint.");
    describe_counter!(
        CHANGES,
        "Pushed changes by result: applied, duplicate, rejected, or conflict (applied, with a conflict recorded)."
    );
    describe_gauge!(LIVE_CONNECTIONS, "Live WebSocket connections open now.");
    describe_gauge!(WAITING_POLLS, "Long polls (GET /v1/pull with wait) waiting now.");
    describe_histogram!(STORE_COMMIT, Unit::Seconds, "Time to commit one group of writes to the store, durably.");
    describe_counter!(RATE_LIMITED, "Requests answered 429 rate_limited.");
    // Present from the start, at zero, so that a first scrape shows every name.
    for result in ["applied", "duplicate", "rejected", "conflict"] {
        metrics::counter!(CHANGES, "result" => result).absolute(0);
    }
    metrics::counter!(RATE_LIMITED).absolute(0);
    metrics::gauge!(LIVE_CONNECTIONS).set(0.0);
    metrics::gauge!(WAITING_POLLS).set(0.0);
}

/// Counts the results of one push or sync.
pub fn count_results(results: &[PushResult]) {
    let (mut applied, mut duplicate, mut rejected, mut conflict) = (0u64, 0u64, 0u64, 0u64);
    for r in results {
        match r.status {
            ResultStatus::Rejected => rejected += 1,
            ResultStatus::Duplicate => duplicate += 1,
            ResultStatus::Applied if r.conflict.is_some() => conflict += 1,
            ResultStatus::Applied => applied += 1,
        }
    }
    for (result, n) in [("applied", applied), ("duplicate", duplicate), ("rejected", rejected), ("conflict", conflict)]
    {
        if n > 0 {
            metrics::counter!(CHANGES, "result" => result).increment(n);
        }
    }
}

/// Records one store commit that took `took`.
pub fn commit_took(took: Duration) {
    metrics::histogram!(STORE_COMMIT).record(took.as_secs_f64());
}

/// The metrics now, in the Prometheus text format (version 0.0.4).
pub fn render() -> String {
    recorder().render()
}

/// Drains histogram samples into buckets every [`UPKEEP_EVERY`], for as
/// long as the process runs.
pub async fn upkeep() {
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    loop {
        every.tick().await;
        recorder().run_upkeep();
    }
}
