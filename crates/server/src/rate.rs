//! Request rates: how many requests one user, or one client address, may send.
//!
//! Each key has a bucket of `burst` requests that refills at
//! `requests_per_second` (the generic cell rate algorithm of the `governor`
//! crate). A request that finds its bucket empty is answered
//! `429 rate_limited` with `Retry-After` in whole seconds, without reaching
//! its handler, so one user flooding the server spends none of the store's
//! time and none of another user's bucket.
//!
//! A request with a valid token counts against its user; one without (no
//! token, a refused token, `/healthz`, the web files, or any request under
//! `--auth none`, where every client is the same user) against its client's
//! IP address.
//!
//! Memory stays bounded: a key is kept only while its bucket is not full
//! again, which takes `burst / requests_per_second` seconds after its last
//! request, and [`RateLimiter::forget_idle`] drops the full ones.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deltasync_protocol::UserId;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// The `[limits]` keys of the configuration: request rates and waiting polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// Requests per second one user (or one client address) may send, sustained.
    pub requests_per_second: u32,
    /// Requests one user (or address) may send at once after a quiet spell.
    pub burst: u32,
    /// Long polls (`GET /v1/pull` with `wait`) one user may have waiting at once.
    pub max_waiting_polls: usize,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits { requests_per_second: 50, burst: 100, max_waiting_polls: 16 }
    }
}

/// Whose bucket a request takes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// An authenticated user.
    User(UserId),
    /// A client address, for requests without a valid token.
    Address(IpAddr),
}

impl std::fmt::Display for RateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RateKey::User(user) => write!(f, "user {user}"),
            RateKey::Address(ip) => write!(f, "address {ip}"),
        }
    }
}

/// How often (in checks) idle keys are dropped.
const FORGET_EVERY: u64 = 4096;

/// The buckets of every user and address that sent a request lately.
pub struct RateLimiter {
    limits: RateLimits,
    buckets: DefaultKeyedRateLimiter<RateKey>,
    clock: DefaultClock,
    checks: AtomicU64,
}

impl RateLimiter {
    /// Buckets under `limits` (`requests_per_second` and `burst` at least 1).
    pub fn new(limits: RateLimits) -> RateLimiter {
        let rate = NonZeroU32::new(limits.requests_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.burst).unwrap_or(NonZeroU32::MIN);
        RateLimiter {
            limits,
            buckets: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        }
    }

    /// The limits the buckets follow.
    pub fn limits(&self) -> RateLimits {
        self.limits
    }

    /// Takes one request from `key`'s bucket, or says how long until one is
    /// there (never less than a second, the unit of `Retry-After`).
    pub fn check(&self, key: &RateKey) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % FORGET_EVERY == FORGET_EVERY - 1 {
            self.forget_idle();
        }
        self.buckets.check_key(key).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Drops the keys whose bucket is full again (they would start afresh anyway).
    pub fn forget_idle(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }

    /// How many keys are held now.
    pub fn keys(&self) -> usize {
        self.buckets.len()
    }
}

/// `Retry-After` for a wait: whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let whole = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    whole.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> RateKey {
        RateKey::User(UserId::parse(name).unwrap())
    }

    #[test]
    fn a_burst_passes_then_the_next_request_waits_about_one_refill() {
        let limiter = RateLimiter::new(RateLimits { requests_per_second: 2, burst: 3, max_waiting_polls: 1 });
        for i in 0..3 {
            assert!(limiter.check(&user("alice")).is_ok(), "request {i} is within the burst");
        }
        let wait = limiter.check(&user("alice")).expect_err("the fourth request finds the bucket empty");
        assert!(wait > Duration::from_millis(300) && wait <= Duration::from_millis(500), "{wait:?}");
        assert_eq!(retry_after_secs(wait), 1);
    }

    #[test]
    fn one_key_emptying_its_bucket_leaves_the_others_whole() {
        let limiter = RateLimiter::new(RateLimits { requests_per_second: 1, burst: 2, max_waiting_polls: 1 });
        while limiter.check(&user("alice")).is_ok() {}
        assert!(limiter.check(&user("bob")).is_ok());
        assert!(limiter.check(&RateKey::Address("127.0.0.1".parse().unwrap())).is_ok());
        assert!(limiter.check(&RateKey::Address("127.0.0.2".parse().unwrap())).is_ok());
    }

    #[test]
    fn keys_whose_bucket_refilled_are_forgotten() {
        let limiter = RateLimiter::new(RateLimits { requests_per_second: 1000, burst: 1, max_waiting_polls: 1 });
        for i in 0..100u8 {
            limiter.check(&RateKey::Address(IpAddr::from([10, 0, 0, i]))).unwrap();
        }
        assert_eq!(limiter.keys(), 100);
        std::thread::sleep(Duration::from_millis(20));
        limiter.forget_idle();
        assert_eq!(limiter.keys(), 0);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(7)), 7);
    }
}
