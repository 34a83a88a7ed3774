//! Background sync: a task that syncs on start, at an interval, shortly after
//! local writes (debounced), on demand, and, in live mode, as soon as another
//! device's change reaches the server: the live channel (`GET /v1/live`, a
//! WebSocket that sends the server's head) says so, and the runner syncs; a
//! server without the live channel (404) gets a long-poll pull instead.
//!
//! A failed sync is retried with backoff and logged as a warning; once syncs
//! have failed the same way (the same error code) [`PERSISTENT_FAILURES`]
//! times in a row, the failure is logged at error level instead, since it
//! will not pass by itself (a server answer this client cannot read, a token
//! that expired), and then again at error level each time the run of
//! failures doubles. The last error is also kept in the local database
//! ([`crate::Stats::last_error`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

pub use deltasync_engine::schedule::PERSISTENT_FAILURES;
use deltasync_engine::schedule::{self, FailureStreak};

use crate::client::Client;
use crate::error::{ClientError, Result};
use crate::live::LiveSocket;
use crate::sync::SyncReport;

/// When the runner syncs.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// Sync at least this often (default 30 s).
    pub interval: Duration,
    /// Syncs caused by local writes are at least this far apart (default 5 s).
    pub debounce: Duration,
    /// Hold the live channel (or, on a server without it, a long-poll pull)
    /// open between syncs, so other devices' changes arrive within
    /// milliseconds (default off).
    pub live: bool,
    /// How long each long poll waits on the server (default 30 s; the server
    /// counts whole seconds, so it is taken as at least 1 s and at most 60 s).
    pub wait: Duration,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        Self {
            interval: schedule::DEFAULT_INTERVAL,
            debounce: schedule::DEFAULT_DEBOUNCE,
            live: false,
            wait: schedule::DEFAULT_WAIT,
        }
    }
}

/// The outcome of the runner's last sync.
pub type LastSync = Option<Arc<Result<SyncReport>>>;

/// A running background sync. Dropping it stops the task.
pub struct SyncRunner {
    manual: Arc<Notify>,
    stop: watch::Sender<bool>,
    last: watch::Receiver<LastSync>,
    task: Option<JoinHandle<()>>,
}

impl SyncRunner {
    /// Starts syncing `client` in the background on the current tokio runtime.
    pub fn start(client: Client, options: RunnerOptions) -> SyncRunner {
        let manual = Arc::new(Notify::new());
        let (stop, stop_rx) = watch::channel(false);
        let (last_tx, last) = watch::channel(None);
        let task = tokio::spawn(run(client, options, manual.clone(), stop_rx, last_tx));
        SyncRunner { manual, stop, last, task: Some(task) }
    }

    /// Syncs now, bypassing the debounce and resetting every backoff.
    pub fn sync_now(&self) {
        self.manual.notify_one();
    }

    /// A receiver of each sync's outcome, as it finishes.
    pub fn outcomes(&self) -> watch::Receiver<LastSync> {
        self.last.clone()
    }

    /// Stops the runner and waits for its task to end (a sync in progress is cancelled
    /// between requests; nothing local is lost).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SyncRunner {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn run(
    client: Client,
    options: RunnerOptions,
    manual: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    last: watch::Sender<LastSync>,
) {
    let mut failures = 0u32;
    let mut streak = FailureStreak::default();
    let mut manual_pending = false;
    let mut live = Live::default();
    loop {
        let outcome = tokio::select! {
            r = client.sync_with(manual_pending) => r,
            _ = stop.changed() => return,
        };
        manual_pending = false;
        let synced_at = Instant::now();
        let ok = outcome.is_ok();
        match &outcome {
            Ok(_) => streak.succeeded(),
            Err(e) => streak.log(client.device_id(), "sync", e.code(), e),
        }
        let told = outcome.as_ref().err().and_then(ClientError::retry_after);
        let _ = last.send(Some(Arc::new(outcome)));
        failures = if ok { 0 } else { failures + 1 };
        let mut deadline = synced_at
            + if ok { options.interval } else { client.network_backoff(failures - 1, options.interval, told) };
        loop {
            let watch = async {
                if options.live && failures == 0 {
                    live.next_move(&client, options.wait).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                _ = stop.changed() => {
                    live.close().await;
                    return;
                }
                _ = manual.notified() => {
                    manual_pending = true;
                    failures = 0;
                    break;
                }
                _ = sleep_until(deadline) => break,
                _ = client.local_write() => {
                    if failures == 0 {
                        deadline = deadline.min((synced_at + options.debounce).max(Instant::now()));
                    }
                }
                r = watch => match r {
                    Ok(Moved::Behind) => break,
                    Ok(Moved::Applied) => {}
                    Err(e) => {
                        streak.log(client.device_id(), "live", e.code(), &e);
                        failures += 1;
                        deadline = Instant::now() + client.network_backoff(failures - 1, options.interval, e.retry_after());
                    }
                },
            }
        }
    }
}

/// What the live watch saw.
enum Moved {
    /// The server's head moved past this replica: sync now.
    Behind,
    /// A long poll applied what arrived (or nothing arrived): watch on.
    Applied,
}

/// The live channel, kept open across syncs, or the knowledge that the
/// server lacks it.
#[derive(Default)]
struct Live {
    socket: Option<LiveSocket>,
    /// The server answered the upgrade 404: long-poll instead.
    unsupported: bool,
}

impl Live {
    /// Waits for the server's head to move past this replica (live
    /// channel), or for one long poll (server without it).
    async fn next_move(&mut self, client: &Client, wait: Duration) -> Result<Moved> {
        if self.unsupported {
            client.wait_for_changes(wait.max(Duration::from_secs(1))).await?;
            return Ok(Moved::Applied);
        }
        let socket = match &mut self.socket {
            Some(socket) => socket,
            None => match client.open_live().await {
                Ok(socket) => self.socket.insert(socket),
                Err(ClientError::Server { status: 404, .. }) => {
                    tracing::info!(device = %client.device_id(), "the server has no live channel (GET /v1/live is 404); long-polling instead");
                    self.unsupported = true;
                    return Ok(Moved::Applied);
                }
                Err(e) => return Err(e),
            },
        };
        loop {
            match socket.next_head().await {
                Ok(Some(head)) => {
                    if client.is_behind(&head).await? {
                        return Ok(Moved::Behind);
                    }
                }
                Ok(None) => {
                    self.socket = None;
                    return Err(ClientError::Unreachable {
                        url: "GET /v1/live".into(),
                        message: "the server closed the live channel".into(),
                    });
                }
                Err(e) => {
                    self.socket = None;
                    return Err(e.into());
                }
            }
        }
    }

    async fn close(&mut self) {
        if let Some(socket) = self.socket.take() {
            socket.close().await;
        }
    }
}
