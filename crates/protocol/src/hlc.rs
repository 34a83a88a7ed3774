//! Hybrid logical clock stamps (§2).
//!
//! A stamp is `<physical ms, 13 digits>-<counter, 5 digits>-<device_id>`.
//! Comparing two stamps byte by byte orders them by time, then counter, then
//! device id, so [`Hlc`] derives its ordering from the string.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, check_name};

/// Why an HLC string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HlcError {
    /// The string does not have the `<13 digits>-<5 digits>-<device_id>` shape (caller's fault).
    #[error(
        "hlc must look like <13-digit milliseconds>-<5-digit counter>-<device_id>, e.g. 1763800000000-00000-phone-7f3a; got {0:?}"
    )]
    Shape(String),
}

/// A validated HLC stamp. Ordering is the byte order of the string, as the protocol says.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Hlc(String);

/// The largest counter value a stamp can hold.
pub const MAX_COUNTER: u32 = 99_999;

impl Hlc {
    /// Parses and validates a stamp.
    pub fn parse(s: impl Into<String>) -> Result<Self, HlcError> {
        let s = s.into();
        let b = s.as_bytes();
        let ok = b.len() > 20
            && b[..13].iter().all(u8::is_ascii_digit)
            && b[13] == b'-'
            && b[14..19].iter().all(u8::is_ascii_digit)
            && b[19] == b'-'
            && check_name("hlc device part", &s[20..], DeviceId::MAX_LEN).is_ok();
        if ok { Ok(Self(s)) } else { Err(HlcError::Shape(s)) }
    }

    /// Builds a stamp from its parts.
    ///
    /// # Panics
    /// When `physical_ms` has more than 13 digits or `counter` more than 5.
    pub fn new(physical_ms: u64, counter: u32, device: &DeviceId) -> Self {
        assert!(physical_ms <= 9_999_999_999_999, "physical time out of range");
        assert!(counter <= MAX_COUNTER, "counter out of range");
        Self(format!("{physical_ms:013}-{counter:05}-{device}"))
    }

    /// The physical part, in milliseconds since the Unix epoch.
    pub fn physical_ms(&self) -> u64 {
        self.0[..13].parse().expect("validated digits")
    }

    /// The counter part.
    pub fn counter(&self) -> u32 {
        self.0[14..19].parse().expect("validated digits")
    }

    /// The device part.
    pub fn device(&self) -> &str {
        &self.0[20..]
    }

    /// The stamp as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Hlc {
    type Error = HlcError;
    fn try_from(s: String) -> Result<Self, HlcError> {
        Self::parse(s)
    }
}

impl From<Hlc> for String {
    fn from(h: Hlc) -> String {
        h.0
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A device's clock: issues strictly increasing stamps and follows the server's time.
///
/// The caller passes the wall time in, so the clock is deterministic in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HlcClock {
    device: DeviceId,
    physical_ms: u64,
    counter: u32,
}

impl HlcClock {
    /// A clock for `device` that has issued nothing yet.
    pub fn new(device: DeviceId) -> Self {
        Self { device, physical_ms: 0, counter: 0 }
    }

    /// Restores a clock from the last stamp it issued or observed.
    pub fn resume(device: DeviceId, last: &Hlc) -> Self {
        Self { device, physical_ms: last.physical_ms(), counter: last.counter() }
    }

    /// The next stamp at wall time `now_ms`: greater than every stamp issued or observed.
    ///
    /// When the counter would pass 99999 within one millisecond, the clock
    /// moves its physical part on by one millisecond instead (the stamp stays
    /// unique and ordered; it runs at most a few milliseconds ahead).
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        if now_ms > self.physical_ms {
            self.physical_ms = now_ms;
            self.counter = 0;
        } else if self.counter >= MAX_COUNTER {
            self.physical_ms += 1;
            self.counter = 0;
        } else {
            self.counter += 1;
        }
        Hlc::new(self.physical_ms, self.counter, &self.device)
    }

    /// Takes in a time seen from elsewhere (a server's `server_time`, or a received stamp's physical part).
    pub fn observe(&mut self, physical_ms: u64) {
        if physical_ms > self.physical_ms {
            self.physical_ms = physical_ms;
            self.counter = 0;
        }
    }

    /// Takes in a stamp received from elsewhere (a pulled change): later
    /// stamps of this clock are greater than it, so an edit made after reading
    /// a value always wins over that value.
    pub fn observe_stamp(&mut self, stamp: &Hlc) {
        let theirs = (stamp.physical_ms(), stamp.counter());
        if theirs > (self.physical_ms, self.counter) {
            (self.physical_ms, self.counter) = theirs;
        }
    }

    /// The clock's position as a stamp of this device (the last issued, or
    /// newer if a later time or stamp was observed); resume from it after a restart.
    pub fn position(&self) -> Hlc {
        Hlc::new(self.physical_ms, self.counter, &self.device)
    }

    /// The physical part of the last stamp issued or time observed.
    pub fn physical_ms(&self) -> u64 {
        self.physical_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_example() {
        let h = Hlc::parse("1763800000000-00000-phone-7f3a").unwrap();
        assert_eq!(h.physical_ms(), 1_763_800_000_000);
        assert_eq!(h.counter(), 0);
        assert_eq!(h.device(), "phone-7f3a");
    }

    #[test]
    fn refuses_bad_shapes() {
        for bad in [
            "",
            "1763800000000-00000-",
            "176380000000-00000-a",
            "1763800000000-0000-a",
            "1763800000000_00000-a",
            "1763800000000-00000-a b",
            "x763800000000-00000-a",
            "1763800000000-00000-é",
        ] {
            assert!(Hlc::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn order_is_time_then_counter_then_device() {
        let a = Hlc::parse("1763800000000-00001-a").unwrap();
        let b = Hlc::parse("1763800000000-00002-a").unwrap();
        let c = Hlc::parse("1763800000001-00000-a").unwrap();
        let d = Hlc::parse("1763800000001-00000-b").unwrap();
        assert!(a < b && b < c && c < d);
    }

    #[test]
    fn clock_is_strictly_increasing_and_follows_observed_time() {
        let dev = DeviceId::parse("d1").unwrap();
        let mut clock = HlcClock::new(dev);
        let a = clock.tick(1000);
        let b = clock.tick(1000);
        let c = clock.tick(999);
        assert!(a < b && b < c);
        clock.observe(5000);
        let d = clock.tick(1001);
        assert_eq!(d.physical_ms(), 5000);
        assert!(c < d);
    }

    #[test]
    fn a_stamp_issued_after_observing_one_is_greater() {
        let mut clock = HlcClock::new(DeviceId::parse("zz").unwrap());
        clock.tick(1000);
        let seen = Hlc::parse("0000000005000-00007-aa").unwrap();
        clock.observe_stamp(&seen);
        let next = clock.tick(1000);
        assert!(next > seen, "{next} should be greater than {seen}");
        assert_eq!(next.as_str(), "0000000005000-00008-zz");
        let older = Hlc::parse("0000000004000-00009-aa").unwrap();
        clock.observe_stamp(&older);
        assert_eq!(clock.position().as_str(), "0000000005000-00008-zz");
    }

    #[test]
    fn counter_overflow_moves_to_next_millisecond() {
        let dev = DeviceId::parse("d1").unwrap();
        let mut clock = HlcClock::resume(dev, &Hlc::parse("0000000001000-99999-d1").unwrap());
        let next = clock.tick(1000);
        assert_eq!(next.as_str(), "0000000001001-00000-d1");
    }
}
