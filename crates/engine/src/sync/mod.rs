//! Sync: push the outbox, pull every page, verify the chain and the digest at
//! every page, and heal by re-bootstrapping when they do not match.
//!
//! - [`batch`]: which outbox entries go in the next request;
//! - [`results`]: what the server said about each, in one transaction;
//! - [`page`]: a page of the log applied and verified in one transaction;
//! - [`heal`]: re-bootstrapping after a mismatch or a `410`, and the long poll.

mod batch;
mod heal;
mod page;
mod results;

use std::collections::HashSet;

use deltasync_protocol::wire::SyncResponse;
use deltasync_protocol::{Change, Collection, Conflict, EntityId, StateDigest, StateHash};
use serde::Serialize;

use crate::clock::Clock;
use crate::engine::{Engine, Progress};
use crate::error::{Error, Result};
use crate::replica::{self, keys};
use crate::store::{Access, LocalStore, OutboxEntry, StoreTx};
use crate::transport::{SyncBody, Transport};

pub use page::Page;

/// By default, a replica's first sync fetches the server's state as a
/// snapshot (a bootstrap) instead of page by page when the log holds more
/// changes than this. A snapshot carries each entity once, in key order, and the log every
/// change in the order it was made, so past a page or so the snapshot is
/// never more to receive and is cheaper to store: its rows arrive sorted.
pub const FIRST_SYNC_SNAPSHOT_AFTER: u64 = 10_000;

/// A change of this device that lost or was refused, as reported by a sync.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LostChange {
    /// The change's id.
    pub change_id: String,
    /// Its collection.
    pub collection: Collection,
    /// Its entity.
    pub entity_id: EntityId,
    /// Why it lost, with the fields and the entity's state (absent when the
    /// server refused the change as invalid rather than losing a merge).
    pub conflict: Option<Conflict>,
    /// The server's last refusal message, for a change set aside after repeated refusals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl LostChange {
    fn new(change: &Change, conflict: Option<Conflict>, message: Option<String>) -> Self {
        LostChange {
            change_id: change.change_id.as_str().to_owned(),
            collection: change.collection.clone(),
            entity_id: change.entity_id.clone(),
            conflict,
            message,
        }
    }
}

/// What one sync did. The command line prints it as JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyncReport {
    /// This device's changes the server accepted (applied or duplicate).
    pub pushed: u64,
    /// Of those, the ones the server logged now.
    pub applied: u64,
    /// Of those, the ones the server already held (a retry of a push whose answer was lost).
    pub duplicate: u64,
    /// Of the applied ones, the changes a heal put back from the journal: the
    /// server had acknowledged them once and lost them (it was restored from
    /// a backup).
    pub restored: u64,
    /// Changes received from the server.
    pub pulled: u64,
    /// This device's changes that lost (in part or whole) or were refused for good.
    pub conflicts: u64,
    /// Changes set aside as failed by this sync.
    pub failed: u64,
    /// Changes re-stamped after a `clock_skew` refusal.
    pub restamped: u64,
    /// Local changes not yet in the confirmed state after the sync.
    pub pending: u64,
    /// The seq the confirmed state stands at.
    pub cursor: u64,
    /// The chain head at `cursor`, verified against the server's.
    pub state_hash: StateHash,
    /// The confirmed state's digest, verified against the server's.
    pub state_digest: StateDigest,
    /// False exactly when a mismatch between local and server state was found.
    pub verified: bool,
    /// True exactly when the confirmed state was replaced by a bootstrap (mismatch or `410`).
    pub healed: bool,
    /// Entities loaded by bootstraps during this sync.
    pub bootstrapped: u64,
    /// What made the sync heal, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mismatch: Option<String>,
    /// The changes counted in `conflicts`.
    pub lost: Vec<LostChange>,
}

impl Default for SyncReport {
    fn default() -> Self {
        Self {
            pushed: 0,
            applied: 0,
            duplicate: 0,
            restored: 0,
            pulled: 0,
            conflicts: 0,
            failed: 0,
            restamped: 0,
            pending: 0,
            cursor: 0,
            state_hash: Default::default(),
            state_digest: Default::default(),
            verified: true,
            healed: false,
            bootstrapped: 0,
            mismatch: None,
            lost: Vec::new(),
        }
    }
}

/// One sync's bookkeeping between its requests.
struct SyncRun {
    report: SyncReport,
    /// Whether this sync ignores (and has reset) the backoff of refused changes.
    manual: bool,
    /// Entries set aside for the rest of this sync.
    excluded: HashSet<i64>,
    /// Entries already re-stamped once in this sync.
    restamped: HashSet<i64>,
    /// The most changes per request (halved when the server cannot take a batch).
    batch_size: usize,
    /// Re-bootstraps so far.
    heals: u32,
    /// Whether the server may hold changes this device has not pulled yet:
    /// true until an answer says otherwise, and again after every heal.
    more_to_pull: bool,
    /// The next page, asked for while the one before it was applied: the
    /// cursor it starts after, and the server's answer.
    prefetched: Option<(u64, Result<SyncResponse>)>,
}

impl<S: LocalStore, T: Transport, C: Clock> Engine<S, T, C> {
    /// Syncs: pushes the whole outbox, pulls every page, verifies, and heals if
    /// needed; then records the outcome (see [`Engine::record_outcome`]).
    /// `manual` (a sync the user asked for) ignores and resets the backoff and
    /// retry counts of refused changes.
    pub async fn sync(&self, manual: bool) -> Result<SyncReport> {
        let outcome = self.sync_once(manual).await;
        self.record_outcome(&outcome).await;
        outcome
    }

    /// One sync, without recording its outcome (for a caller that puts a time
    /// limit around it, then calls [`Engine::record_outcome`]).
    pub async fn sync_once(&self, manual: bool) -> Result<SyncReport> {
        let transport = self.bound_transport().await?;
        let _guard = self.sync_lock.lock().await;
        if manual {
            let mut tx = self.store.begin(Access::Write).await?;
            tx.reset_retries().await?;
            tx.commit().await?;
        }
        let head = self.learn_server(transport).await?;
        // A heal interrupted before it checked the journal finishes that first.
        self.restore_journal(transport).await?;
        let mut run = SyncRun {
            report: SyncReport::default(),
            manual,
            excluded: HashSet::new(),
            restamped: HashSet::new(),
            batch_size: self.options.batch_size.max(1),
            heals: 0,
            more_to_pull: true,
            prefetched: None,
        };
        run.report.bootstrapped += self.start_from_snapshot(transport, head).await?;
        while self.sync_step(transport, &mut run).await? {}
        self.finish_sync(run.report).await
    }

    /// A replica that has never pulled fetches a long log's state as a
    /// snapshot (more changes than
    /// [`crate::EngineOptions::first_sync_snapshot_after`]); the sync then pulls what
    /// follows it. Returns the entities loaded. `head` is the server's head
    /// when this sync already asked for it.
    async fn start_from_snapshot(&self, transport: &T, head: Option<u64>) -> Result<u64> {
        let state = replica::sync_state(&mut self.store.begin(Access::Read).await?).await?;
        if state.cursor != 0 {
            return Ok(0);
        }
        let head = match head {
            Some(head) => head,
            None => transport.status(Some(self.device.as_str())).await?.head,
        };
        if head <= self.options.first_sync_snapshot_after {
            return Ok(0);
        }
        let entities = self.bootstrap(transport).await?;
        // A bootstrap leaves the journal to check: it is empty, or holds
        // changes the server acknowledged before this replica forgot them.
        self.restore_journal(transport).await?;
        Ok(entities)
    }

    /// Keeps a sync's outcome in the store: the failure until a sync succeeds
    /// (see [`crate::Stats::last_error`]). A store that cannot record it is logged by the caller.
    pub async fn record_outcome(&self, outcome: &Result<SyncReport>) -> Option<Error> {
        let recorded = async {
            let mut tx = self.store.begin(Access::Write).await?;
            match outcome {
                Ok(_) => tx.remove_meta(keys::SYNC_FAILURE).await?,
                Err(e) => drop(replica::record_sync_failure(&mut tx, e.code(), &e.to_string(), self.wall_ms()).await?),
            }
            tx.commit().await
        };
        recorded.await.err()
    }

    /// One request of a sync; returns whether the sync goes on.
    async fn sync_step(&self, transport: &T, run: &mut SyncRun) -> Result<bool> {
        let (batch, cursor, policies) = self.next_batch(run).await?;
        if batch.is_empty() && !run.more_to_pull {
            return Ok(false);
        }
        // A page asked for ahead is used when nothing is to be pushed and it
        // starts at the cursor; one that failed is asked for again.
        let prefetched = run.prefetched.take().filter(|(from, _)| batch.is_empty() && *from == cursor);
        let resp = match prefetched {
            Some((_, Ok(resp))) => resp,
            _ => {
                let changes: Vec<Change> = batch.iter().map(|e| batch::sendable(&e.change, &policies)).collect();
                let body = SyncBody {
                    device_id: self.device.as_str(),
                    cursor,
                    changes: &changes,
                    // Pages while pushing use the server's default; catching up uses the largest.
                    limit: batch.is_empty().then_some(self.options.page_limit),
                };
                match transport.sync(&body).await {
                    Ok(resp) => resp,
                    Err(e) => return self.sync_refused(transport, run, &batch, e).await.map(|()| true),
                }
            }
        };
        self.observe_server_time(resp.server_time).await?;
        let page = Page { from: cursor, to: resp.cursor, state_hash: resp.state_hash, state_digest: resp.state_digest };
        let own = self.record_results(&batch, &resp.results, &page, resp.server_time, run).await?;
        run.report.pulled += resp.changes.len() as u64;
        let has_more = resp.has_more;
        let mut log = resp.changes;
        log.extend(own);
        let applying = self.apply_page(log, &page);
        // Catching up: the next page travels while this one is applied.
        let applied = if batch.is_empty() && has_more {
            let next = SyncBody {
                device_id: self.device.as_str(),
                cursor: page.to,
                changes: &[],
                limit: Some(self.options.page_limit),
            };
            let (applied, next) = futures_util::future::join(applying, transport.sync(&next)).await;
            run.prefetched = Some((page.to, next));
            applied
        } else {
            applying.await
        };
        if let Err(page::Mismatch(reason)) = applied? {
            run.prefetched = None;
            self.heal(transport, &mut run.report, &mut run.heals, Some(reason.clone()), &reason).await?;
            run.more_to_pull = true;
            return Ok(true);
        }
        let r = &run.report;
        self.progress(Progress::Sync { pushed: r.pushed, pulled: r.pulled, cursor: page.to });
        run.more_to_pull = has_more;
        Ok(true)
    }

    /// The server refused a whole request: heal on `410`, send less at a time
    /// when the batch was too much, set aside the changes it named, or give up.
    async fn sync_refused(&self, transport: &T, run: &mut SyncRun, batch: &[OutboxEntry], e: Error) -> Result<()> {
        match e {
            Error::Server { status: 410, message, .. } if e.is_reset_required() => {
                self.heal(transport, &mut run.report, &mut run.heals, None, &message).await?;
                run.more_to_pull = true;
                Ok(())
            }
            // The server gave up reading the body (too slow a link for its
            // size): send less at a time; a single change failing so is transient.
            e @ Error::Server { status: 408, .. } if batch.len() <= 1 => Err(e),
            Error::Server { status: 408, .. } => {
                run.batch_size = (batch.len() / 2).max(1);
                Ok(())
            }
            Error::Server { status: 400 | 413, message, details, .. }
                if !batch.is_empty() && e.is_refused_request() =>
            {
                let mut tx = self.store.begin(Access::Write).await?;
                if !details.is_empty() {
                    for d in details {
                        if let Some(entry) = batch.get(d.index) {
                            self.refused(&mut tx, entry, &d.message, run).await?;
                        }
                    }
                } else if batch.len() > 1 {
                    run.batch_size = (batch.len() / 2).max(1);
                } else {
                    self.refused(&mut tx, &batch[0], &message, run).await?;
                }
                tx.commit().await
            }
            e => Err(e),
        }
    }

    /// The end of a sync: the time it finished, acknowledged changes the
    /// confirmed state covers moved to the journal, the journal trimmed.
    async fn finish_sync(&self, mut report: SyncReport) -> Result<SyncReport> {
        let mut tx = self.store.begin(Access::Write).await?;
        tx.set_meta(keys::LAST_SYNC_AT, &self.wall_ms().to_string()).await?;
        let state = replica::sync_state(&mut tx).await?;
        tx.confirm_up_to(state.cursor).await?;
        let horizon = replica::horizon(&mut tx).await?;
        tx.trim_journal(self.options.journal_limit, horizon).await?;
        report.pending = tx.outbox_counts().await?.0;
        tx.commit().await?;
        report.cursor = state.cursor;
        report.state_hash = state.state_hash;
        report.state_digest = state.state_digest;
        Ok(report)
    }
}
