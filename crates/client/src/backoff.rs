//! Exponential backoff with jitter (seed 003).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::Duration;

/// The most times the server may refuse a change before it is set aside as failed.
pub const MAX_RETRIES: u32 = 5;

/// A random number in `[0, 1)`, from the standard library's per-process random keys.
fn unit_random() -> f64 {
    let bits = RandomState::new().hash_one(std::time::Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// The wait before attempt `attempt + 1`: `base · 2^attempt`, at most `cap`,
/// then scaled by a random factor in `[0.5, 1)` so that devices refused
/// together do not come back together.
pub fn delay(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(20)).min(cap);
    exp.mul_f64(0.5 + unit_random() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(30);
        for attempt in 0..10 {
            let d = delay(attempt, base, cap);
            let full = base.saturating_mul(1 << attempt).min(cap);
            assert!(d >= full / 2 && d < full, "attempt {attempt}: {d:?} not in [{:?}, {full:?})", full / 2);
        }
    }

    #[test]
    fn jitter_varies() {
        let ds: std::collections::HashSet<_> =
            (0..20).map(|_| delay(3, Duration::from_secs(1), Duration::from_secs(60))).collect();
        assert!(ds.len() > 1);
    }
}
