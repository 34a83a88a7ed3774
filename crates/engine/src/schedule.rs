//! When to sync, for any runner (the native client's tokio task, a browser's
//! timers): the default triggers of the seeds (at start, every 30 s, 5 s
//! after local writes, and a long poll between syncs in live mode), the
//! backoff after a failed sync, and how loudly to report failures that
//! repeat.

use std::time::Duration;

use deltasync_protocol::DeviceId;

use crate::backoff;

/// Sync at least this often.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// Syncs caused by local writes are at least this far apart.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_secs(5);
/// How long a long poll waits on the server.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// The wait after `failures` failed syncs in a row (counting from 0):
/// doubling from 1 s up to `cap` (the interval), with jitter from `unit` in `[0, 1)`.
pub fn retry_delay(failures: u32, cap: Duration, unit: f64) -> Duration {
    backoff::delay(failures, Duration::from_secs(1), cap, unit)
}

/// The wait after a failed sync: [`retry_delay`], but never shorter than
/// what the server asked for (`Retry-After` on a 429 or 503, `told`), even
/// past `cap`: a client waits as told.
pub fn failure_delay(failures: u32, cap: Duration, unit: f64, told: Option<Duration>) -> Duration {
    retry_delay(failures, cap, unit).max(told.unwrap_or_default())
}

/// How many failures in a row with the same error code make the runner log at error level.
pub const PERSISTENT_FAILURES: u32 = 3;

/// How loudly a failure is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loudness {
    /// A failure that may pass: a warning.
    Warn,
    /// A failure that persists: an error.
    Error,
    /// A failure already reported at error level: debug only.
    Quiet,
}

/// The failures in a row of the same kind, to tell a passing glitch from a failure that persists.
#[derive(Debug, Default)]
pub struct FailureStreak {
    code: Option<String>,
    count: u32,
}

impl FailureStreak {
    /// Counts a failure with error `code`; returns how loudly to log it and how many in a row there were.
    pub fn failed(&mut self, code: &str) -> (Loudness, u32) {
        if self.code.as_deref() == Some(code) {
            self.count += 1;
        } else {
            self.code = Some(code.to_owned());
            self.count = 1;
        }
        let loudness = if self.count < PERSISTENT_FAILURES {
            Loudness::Warn
        } else if self.count == PERSISTENT_FAILURES || self.count.is_power_of_two() {
            Loudness::Error
        } else {
            Loudness::Quiet
        };
        (loudness, self.count)
    }

    /// A success ends the streak.
    pub fn succeeded(&mut self) {
        *self = FailureStreak::default();
    }

    /// Logs a failure of `what` (a sync or a long poll) of `device`, with
    /// error `code` and message `e`, as loudly as the streak says.
    pub fn log(&mut self, device: &DeviceId, what: &str, code: &str, e: &dyn std::fmt::Display) {
        let (loudness, count) = self.failed(code);
        match loudness {
            Loudness::Warn => tracing::warn!(%device, "background {what} failed: {e}"),
            Loudness::Error => tracing::error!(
                %device,
                failures = count,
                "background {what} has failed {count} times in a row with `{}`; it keeps retrying, but this looks \
                 like it will not pass by itself: {e}",
                code
            ),
            Loudness::Quiet => tracing::debug!(%device, failures = count, "background {what} failed again: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_waits_at_least_as_long_as_the_server_asked() {
        let cap = Duration::from_secs(30);
        assert_eq!(failure_delay(0, cap, 0.0, None), retry_delay(0, cap, 0.0));
        assert_eq!(failure_delay(0, cap, 0.0, Some(Duration::from_secs(7))), Duration::from_secs(7));
        assert_eq!(failure_delay(0, cap, 0.0, Some(Duration::from_secs(120))), Duration::from_secs(120));
        let long = retry_delay(6, cap, 0.9);
        assert_eq!(failure_delay(6, cap, 0.9, Some(Duration::from_secs(1))), long);
    }

    #[test]
    fn the_same_failure_turns_from_warnings_to_an_error_and_then_quiets_down() {
        let mut streak = FailureStreak::default();
        let levels: Vec<(Loudness, u32)> = (0..9).map(|_| streak.failed("protocol")).collect();
        use Loudness::*;
        assert_eq!(
            levels,
            vec![
                (Warn, 1),
                (Warn, 2),
                (Error, 3),
                (Error, 4),
                (Quiet, 5),
                (Quiet, 6),
                (Quiet, 7),
                (Error, 8),
                (Quiet, 9)
            ]
        );
    }

    #[test]
    fn another_failure_or_a_success_starts_a_new_streak() {
        let mut streak = FailureStreak::default();
        streak.failed("unreachable");
        streak.failed("unreachable");
        assert_eq!(streak.failed("protocol"), (Loudness::Warn, 1));
        streak.failed("protocol");
        assert_eq!(streak.failed("protocol"), (Loudness::Error, 3));
        streak.succeeded();
        assert_eq!(streak.failed("protocol"), (Loudness::Warn, 1));
    }
}
