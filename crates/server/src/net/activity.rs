//! What one connection is doing, and when it has been quiet for too long.
//!
//! A connection is either serving requests (one or more in flight) or idle.
//! While idle, one deadline applies:
//!
//! - before its first request, and from the first byte of any later request
//!   until that request's header is complete: `header_read_timeout`;
//! - between requests, with nothing received yet: `keep_alive_timeout`.
//!
//! Requests in flight have deadlines of their own (the body read deadline,
//! the write timeout), so a connection serving a long poll is never cut here.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The deadlines [`Activity::expired`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct IdleDeadlines {
    /// Time to send a whole request header.
    pub header_read_timeout: Duration,
    /// Time a connection may sit idle between requests.
    pub keep_alive_timeout: Duration,
}

/// Why a connection was closed for being quiet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The header of a request did not arrive in time.
    HeaderTimeout,
    /// The connection sat idle between requests for too long.
    KeepAliveTimeout,
}

impl Expiry {
    /// The configuration key whose deadline passed.
    pub fn key(self) -> &'static str {
        match self {
            Expiry::HeaderTimeout => "header_read_timeout_secs",
            Expiry::KeepAliveTimeout => "keep_alive_timeout_secs",
        }
    }
}

#[derive(Debug)]
struct State {
    in_flight: usize,
    /// When the connection last became idle (its start, or the end of its last answer).
    idle_since: Instant,
    /// When the first byte arrived since it became idle.
    first_byte_at: Option<Instant>,
    /// Whether a request has been answered on this connection.
    served_any: bool,
}

/// Shared by a connection's socket wrapper, its service and its watchdog.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<State>,
    /// True while idle with no byte received: the socket wrapper then reports the first byte.
    awaiting_first_byte: AtomicBool,
    changed: Notify,
}

impl Activity {
    /// A new connection, idle from now.
    pub fn new() -> Activity {
        Activity {
            state: Mutex::new(State {
                in_flight: 0,
                idle_since: Instant::now(),
                first_byte_at: None,
                served_any: false,
            }),
            awaiting_first_byte: AtomicBool::new(true),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes arrived on the socket. Cheap unless the connection is idle and this is its first byte.
    pub fn bytes_received(&self) {
        if self.awaiting_first_byte.swap(false, Ordering::Relaxed) {
            let mut s = self.lock();
            if s.in_flight == 0 && s.first_byte_at.is_none() {
                s.first_byte_at = Some(Instant::now());
                drop(s);
                self.changed.notify_one();
            }
        }
    }

    /// A request's header was read and handed to the service.
    pub fn request_started(&self) {
        let mut s = self.lock();
        s.in_flight += 1;
        s.first_byte_at = None;
        self.awaiting_first_byte.store(false, Ordering::Relaxed);
        drop(s);
        self.changed.notify_one();
    }

    /// A request's answer was sent (or abandoned).
    pub fn request_finished(&self) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            s.idle_since = Instant::now();
            s.first_byte_at = None;
            s.served_any = true;
            self.awaiting_first_byte.store(true, Ordering::Relaxed);
        }
        drop(s);
        self.changed.notify_one();
    }

    /// The deadline that applies now and what passing it means, or `None` while a request is in flight.
    fn deadline(&self, limits: &IdleDeadlines) -> Option<(Instant, Expiry)> {
        let s = self.lock();
        if s.in_flight > 0 {
            return None;
        }
        Some(match s.first_byte_at {
            Some(at) => (at + limits.header_read_timeout, Expiry::HeaderTimeout),
            None if !s.served_any => (s.idle_since + limits.header_read_timeout, Expiry::HeaderTimeout),
            None => (s.idle_since + limits.keep_alive_timeout, Expiry::KeepAliveTimeout),
        })
    }

    /// Resolves when the connection has been quiet past its deadline.
    pub async fn expired(&self, limits: IdleDeadlines) -> Expiry {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.deadline(&limits) {
                None => changed.await,
                Some((at, why)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {
                            if self.deadline(&limits).is_some_and(|(now_at, _)| now_at <= Instant::now()) {
                                return why;
                            }
                        }
                        _ = changed => {}
                    }
                }
            }
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

/// Marks a request finished when dropped: held by the request's future and then its answer's body.
#[derive(Debug)]
pub struct InFlight(std::sync::Arc<Activity>);

impl InFlight {
    /// Counts a request as in flight until the guard is dropped.
    pub fn start(activity: std::sync::Arc<Activity>) -> InFlight {
        activity.request_started();
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const LIMITS: IdleDeadlines =
        IdleDeadlines { header_read_timeout: Duration::from_secs(10), keep_alive_timeout: Duration::from_secs(60) };

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_must_send_its_header_in_time() {
        let a = Activity::new();
        let started = Instant::now();
        assert_eq!(a.expired(LIMITS).await, Expiry::HeaderTimeout);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_header_gets_the_header_time() {
        let a = Arc::new(Activity::new());
        drop(InFlight::start(a.clone()));
        tokio::time::sleep(Duration::from_secs(30)).await;
        a.bytes_received();
        let header_started = Instant::now();
        assert_eq!(a.expired(LIMITS).await, Expiry::HeaderTimeout);
        assert_eq!(header_started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_gets_the_keep_alive_time() {
        let a = Arc::new(Activity::new());
        drop(InFlight::start(a.clone()));
        let idle = Instant::now();
        assert_eq!(a.expired(LIMITS).await, Expiry::KeepAliveTimeout);
        assert_eq!(idle.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_cut() {
        let a = Arc::new(Activity::new());
        let guard = InFlight::start(a.clone());
        let watchdog = tokio::spawn({
            let a = a.clone();
            async move { a.expired(LIMITS).await }
        });
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!watchdog.is_finished());
        drop(guard);
        let finished = Instant::now();
        assert_eq!(watchdog.await.unwrap(), Expiry::KeepAliveTimeout);
        assert_eq!(finished.elapsed(), Duration::from_secs(60));
    }
}
