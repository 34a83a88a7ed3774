//! Logging refusals (a cap reached, an accept failing) so that a client who
//! provokes thousands of them a second cannot flood the log: one line per
//! [`LOG_EVERY`] at most, saying how many were refused since the last.

use std::time::{Duration, Instant};

/// How often a kind of refusal is logged at most.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Counts refusals of one kind between log lines.
#[derive(Debug, Default)]
pub struct RefusalCounter {
    refused: u64,
    last_logged: Option<Instant>,
}

impl RefusalCounter {
    /// Counts one refusal; when a log line is due, answers how many to report
    /// (this one included) and starts counting again.
    pub fn count(&mut self) -> Option<u64> {
        self.refused += 1;
        let now = Instant::now();
        if self.last_logged.is_some_and(|at| now.duration_since(at) < LOG_EVERY) {
            return None;
        }
        self.last_logged = Some(now);
        Some(std::mem::take(&mut self.refused))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_refusal_is_logged_and_a_burst_after_it_is_only_counted() {
        let mut counter = RefusalCounter::default();
        assert_eq!(counter.count(), Some(1));
        for _ in 0..1000 {
            assert_eq!(counter.count(), None);
        }
        counter.last_logged = Some(Instant::now() - LOG_EVERY);
        assert_eq!(counter.count(), Some(1001));
    }
}
