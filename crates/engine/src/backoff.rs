//! Exponential backoff with jitter (seed 003).

use std::time::Duration;

/// The most times the server may refuse a change before it is set aside as failed.
pub const MAX_RETRIES: u32 = 5;

/// The wait before attempt `attempt + 1`: `base · 2^attempt`, at most `cap`,
/// then scaled by `0.5 + unit / 2` for a random `unit` in `[0, 1)`, so that
/// devices refused together do not come back together.
pub fn delay(attempt: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(20)).min(cap);
    exp.mul_f64(0.5 + unit.clamp(0.0, 1.0 - f64::EPSILON) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(30);
        for attempt in 0..10 {
            for unit in [0.0, 0.3, 0.999_999] {
                let d = delay(attempt, base, cap, unit);
                let full = base.saturating_mul(1 << attempt).min(cap);
                assert!(d >= full / 2 && d < full, "attempt {attempt}: {d:?} not in [{:?}, {full:?})", full / 2);
            }
        }
    }

    #[test]
    fn jitter_follows_the_random_unit() {
        let d = |unit| delay(3, Duration::from_secs(1), Duration::from_secs(60), unit);
        assert!(d(0.1) < d(0.9));
    }
}
