//! The probe: another user's device that writes and syncs in a loop through a
//! proxy without faults, timing each `sync` process, to measure how much the
//! hostile user and the workload delay an innocent user.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::workload::{Ended, FaultDevice, finish};

/// One timed sync.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the process started.
    pub start: Instant,
    /// How long it took, start to exit.
    pub took: Duration,
    /// The error code when it failed (`None`: it succeeded).
    pub error: Option<String>,
}

impl Sample {
    /// When it ended.
    pub fn end(&self) -> Instant {
        self.start + self.took
    }
}

/// Until `stop`: patch one field, then time one `sync` through `url`, every `pause`.
pub fn probe(device: &FaultDevice, url: &str, pause: Duration, stop: &AtomicBool) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let mut write = device.command(None, &["patch", "diary", "today", &json!({"n": n}).to_string()]);
        match finish(write.spawn().expect("start the probe's write"), None) {
            Ended::Ok(_) => {}
            Ended::Failed(code, stderr) => panic!("the probe's local write failed with {code}: {stderr}"),
            Ended::Killed => panic!("the probe's local write was killed"),
        }
        let start = Instant::now();
        let child = device.command(Some(url), &["sync"]).spawn().expect("start the probe's sync");
        let error = match finish(child, None) {
            Ended::Ok(_) => None,
            Ended::Failed(code, _) => Some(code),
            Ended::Killed => Some("killed".to_owned()),
        };
        samples.push(Sample { start, took: start.elapsed(), error });
        std::thread::sleep(pause);
    }
    samples
}

/// The `q` quantile (0..=1) of sorted durations.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}
