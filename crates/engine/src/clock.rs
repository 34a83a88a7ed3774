//! Time and chance, as the engine sees them: a [`Clock`] the embedder gives,
//! and the device's hybrid logical clock kept on top of it.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use deltasync_protocol::{DeviceId, Hlc, HlcClock};

/// A local clock further ahead of the server's than this is corrected.
pub const CLOCK_CORRECTION_THRESHOLD_MS: i64 = 60_000;

/// The engine's source of time and randomness. The engine never reads the
/// system clock itself, so it runs anywhere (a browser, a test with a fake
/// clock).
pub trait Clock {
    /// Wall-clock time in ms since the Unix epoch.
    fn wall_ms(&self) -> u64;
    /// A monotonic time in ms (from any origin); never goes back.
    fn monotonic_ms(&self) -> u64;
    /// 64 random bits, for ids and backoff jitter (need not be cryptographic).
    fn random_u64(&self) -> u64;
}

/// A random number in `[0, 1)` from `clock`.
pub fn unit_random(clock: &impl Clock) -> f64 {
    (clock.random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Randomness for clocks that have no source of their own: the standard
/// library's per-process hash keys, a counter and the given time mixed.
pub fn mixed_random(time: u64) -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(time);
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// The device's hybrid logical clock and the correction applied to the wall
/// clock, as the engine keeps them between calls.
#[derive(Debug, Clone)]
pub struct DeviceClock {
    device: DeviceId,
    /// The hybrid logical clock.
    pub hlc: HlcClock,
    /// Added to the wall clock (negative when it runs ahead of the server's).
    pub offset_ms: i64,
}

impl DeviceClock {
    /// The clock of `device`, resumed from its last stamp when there is one.
    pub fn resume(device: DeviceId, last: Option<&Hlc>, offset_ms: i64) -> Self {
        let hlc = match last {
            Some(last) => HlcClock::resume(device.clone(), last),
            None => HlcClock::new(device.clone()),
        };
        Self { device, hlc, offset_ms }
    }

    /// The wall clock corrected by what the server's clock told us.
    pub fn corrected(&self, wall_ms: u64) -> u64 {
        wall_ms.saturating_add_signed(self.offset_ms)
    }

    /// A new stamp at `wall_ms`.
    pub fn tick(&mut self, wall_ms: u64) -> Hlc {
        let now = self.corrected(wall_ms);
        self.hlc.tick(now)
    }

    /// Takes in the server's time: the HLC never falls behind it, and a wall
    /// clock running far ahead of it is corrected. Returns the new offset when
    /// it changed (to persist).
    pub fn observe_server_time(&mut self, wall_ms: u64, server_time: u64) -> Option<i64> {
        let ahead = wall_ms as i64 - server_time as i64;
        let offset = if ahead > CLOCK_CORRECTION_THRESHOLD_MS { -ahead } else { 0 };
        self.hlc.observe(server_time);
        (self.offset_ms != offset).then(|| {
            self.offset_ms = offset;
            offset
        })
    }

    /// A fresh stamp after a `clock_skew` refusal: the clock restarts from the
    /// server's time, so it no longer runs ahead.
    pub fn restamp(&mut self, wall_ms: u64, server_time: u64) -> Hlc {
        if self.hlc.physical_ms() > server_time {
            let restart = Hlc::new(server_time, 0, &self.device);
            self.hlc = HlcClock::resume(self.device.clone(), &restart);
        }
        let now = self.corrected(wall_ms).min(server_time.max(1));
        self.hlc.tick(now)
    }

    /// Takes in stamps received from the server, so later local stamps are
    /// greater; returns the clock's position to persist.
    pub fn observe_stamps<'a>(&mut self, stamps: impl IntoIterator<Item = &'a Hlc>) -> Hlc {
        for stamp in stamps {
            self.hlc.observe_stamp(stamp);
        }
        self.hlc.position()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> DeviceId {
        DeviceId::parse("dev-1").unwrap()
    }

    #[test]
    fn a_wall_clock_far_ahead_of_the_server_is_corrected() {
        let mut c = DeviceClock::resume(device(), None, 0);
        assert_eq!(c.observe_server_time(1_000_000, 1_000_000 - 30_000), None, "30 s ahead is tolerated");
        assert_eq!(c.observe_server_time(1_000_000, 1_000_000 - 120_000), Some(-120_000));
        assert_eq!(c.corrected(1_000_000), 1_000_000 - 120_000);
        assert_eq!(c.observe_server_time(1_000_000, 1_000_000), Some(0));
    }

    #[test]
    fn a_restamp_never_runs_ahead_of_the_server() {
        let mut c = DeviceClock::resume(device(), None, 0);
        c.tick(5_000_000);
        let stamp = c.restamp(5_000_000, 1_000_000);
        assert!(stamp.physical_ms() <= 1_000_000, "{stamp}");
    }

    #[test]
    fn mixed_randomness_varies() {
        let values: std::collections::HashSet<u64> = (0..50).map(|_| mixed_random(7)).collect();
        assert_eq!(values.len(), 50);
    }
}
