//! Sync: push the outbox, pull every page, verify the chain and the digest at
//! every page, and heal by re-bootstrapping when they do not match.

use std::collections::HashSet;
use std::time::Duration;

use deltasync_protocol::wire::{Policies, PushResult, ResultStatus};
use deltasync_protocol::{
    Change, Collection, Conflict, ConflictReason, EntityId, Hlc, HlcClock, Merge, Op, StateDigest, StoredChange, merge,
};
use rusqlite::{Connection, TransactionBehavior};
use serde::Serialize;

use crate::backoff::{self, MAX_RETRIES};
use crate::client::{Client, Origin, Progress};
use crate::error::{ClientError, Result, TimeoutKind};
use crate::http::{self, ServerApi, SyncBody};
use crate::local::{self, OutboxEntry};

/// The most times one sync re-bootstraps before it gives up.
const MAX_HEALS_PER_SYNC: u32 = 2;
/// Backoff base and cap for changes the server refuses.
const REFUSAL_BASE: Duration = Duration::from_secs(1);
const REFUSAL_CAP: Duration = Duration::from_secs(300);
/// A local clock further ahead of the server's than this is corrected.
const CLOCK_CORRECTION_THRESHOLD_MS: i64 = 60_000;

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
    pub state_hash: deltasync_protocol::StateHash,
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

/// Why a page could not be applied: the local state no longer matches the server's.
struct Mismatch(String);

/// Per-sync bookkeeping of changes set aside or re-stamped.
#[derive(Default)]
struct RunState {
    /// Entries set aside for the rest of this sync.
    excluded: HashSet<i64>,
    /// Entries already re-stamped once in this sync.
    restamped: HashSet<i64>,
}

impl Client {
    /// Syncs now: pushes the whole outbox, pulls every page, verifies, and heals
    /// if needed. A manual sync ignores the backoff of refused changes.
    pub async fn sync(&self) -> Result<SyncReport> {
        self.sync_with(true).await
    }

    /// Syncs; `manual` ignores (and resets) the backoff of refused changes.
    /// The outcome is kept in the local database: an error until a sync
    /// succeeds (see [`crate::Stats::last_error`]).
    pub(crate) async fn sync_with(&self, manual: bool) -> Result<SyncReport> {
        let outcome = match self.inner.options.sync_timeout {
            None => self.sync_once(manual).await,
            Some(limit) => match tokio::time::timeout(limit, self.sync_once(manual)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(ClientError::Timeout { kind: TimeoutKind::Sync, operation: "sync".into(), after: limit }),
            },
        };
        let recorded = match &outcome {
            Ok(_) => local::clear_sync_failure(&self.db()),
            Err(e) => local::record_sync_failure(&self.db(), e.code(), &e.to_string(), self.wall_ms()).map(drop),
        };
        if let Err(e) = recorded {
            tracing::warn!(device = %self.device_id(), "cannot record the sync's outcome: {e}");
        }
        outcome
    }

    async fn sync_once(&self, manual: bool) -> Result<SyncReport> {
        let api = self.api()?.clone();
        let _guard = self.inner.sync_lock.lock().await;
        let mut report = SyncReport::default();
        if manual {
            self.db().execute("UPDATE outbox SET next_attempt_at = 0 WHERE status = 'pending'", [])?;
        }
        if local::sync_state(&self.db())?.policies.is_none() {
            let status = api.status(self.device_id().as_str()).await?;
            self.observe_server_time(status.server_time)?;
            local::set_policies(&self.db(), &status.policies)?;
            local::set_horizon(&self.db(), status.horizon)?;
        }
        // A heal interrupted before it checked the journal finishes that first.
        self.restore_journal(&api).await?;
        let mut run = RunState::default();
        let mut batch_size = self.inner.options.batch_size.max(1);
        let mut heals = 0;
        // Whether the server may hold changes this device has not pulled yet:
        // true until an answer says otherwise, and again after every heal.
        let mut more_to_pull = true;
        loop {
            let (batch, cursor) = self.next_batch(batch_size, manual, &run)?;
            if batch.is_empty() && !more_to_pull {
                break;
            }
            let policies = Self::policies(&self.db())?;
            let changes: Vec<Change> = batch.iter().map(|e| sendable(&e.change, &policies)).collect();
            let body = SyncBody {
                device_id: self.device_id().as_str(),
                cursor,
                changes: &changes,
                // Pages while pushing use the server's default; catching up uses the largest.
                limit: batch.is_empty().then_some(self.inner.options.page_limit),
            };
            let resp = match api.sync(&body).await {
                Ok(resp) => resp,
                Err(ClientError::Server { status: 410, message, .. }) => {
                    self.heal_or_give_up(&api, &mut report, &mut heals, None, &message).await?;
                    more_to_pull = true;
                    continue;
                }
                // The server gave up reading the body (too slow a link for its
                // size): send less at a time; a single change failing so is transient.
                Err(e @ ClientError::Server { status: 408, .. }) => {
                    if batch.len() <= 1 {
                        return Err(e);
                    }
                    batch_size = (batch.len() / 2).max(1);
                    continue;
                }
                Err(ClientError::Server { status: 400 | 413, message, details, .. }) if !batch.is_empty() => {
                    if !details.is_empty() {
                        for d in details {
                            if let Some(entry) = batch.get(d.index) {
                                self.refused(&self.db(), entry, &d.message, &mut report, &mut run)?;
                            }
                        }
                    } else if batch.len() > 1 {
                        batch_size = (batch.len() / 2).max(1);
                    } else {
                        self.refused(&self.db(), &batch[0], &message, &mut report, &mut run)?;
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.observe_server_time(resp.server_time)?;
            let own = self.record_results(
                &batch,
                &resp.results,
                cursor,
                resp.cursor,
                resp.server_time,
                &mut report,
                &mut run,
            )?;
            report.pulled += resp.changes.len() as u64;
            let has_more = resp.has_more;
            let page =
                Page { from: cursor, to: resp.cursor, state_hash: resp.state_hash, state_digest: resp.state_digest };
            let mut log = resp.changes;
            log.extend(own);
            match self.apply_page(log, &page)? {
                Ok(()) => {}
                Err(Mismatch(reason)) => {
                    self.heal_or_give_up(&api, &mut report, &mut heals, Some(reason.clone()), &reason).await?;
                    more_to_pull = true;
                    continue;
                }
            }
            self.progress(Progress::Sync { pushed: report.pushed, pulled: report.pulled, cursor: page.to });
            more_to_pull = has_more;
        }
        let now = self.wall_ms();
        let db = self.db();
        local::set_meta(&db, "last_sync_at", &now.to_string())?;
        let state = local::sync_state(&db)?;
        local::confirm_up_to(&db, state.cursor)?;
        local::trim_journal(&db, self.inner.options.journal_limit, local::horizon(&db)?)?;
        report.pending = local::outbox_counts(&db)?.0;
        report.cursor = state.cursor;
        report.state_hash = state.state_hash;
        report.state_digest = state.state_digest;
        Ok(report)
    }

    /// Picks the next changes to send, in outbox order. A change waits while an
    /// earlier change of the same entity cannot go (backoff, set aside), so one
    /// entity's changes always reach the server in the order they were made;
    /// under `reject`, one change per entity per request, so that each is sent
    /// with the `base_version` its predecessor's seq gave it.
    fn next_batch(&self, max: usize, manual: bool, run: &RunState) -> Result<(Vec<OutboxEntry>, u64)> {
        let db = self.db();
        let state = local::sync_state(&db)?;
        let policies = state.policies.unwrap_or_default();
        let now = self.wall_ms();
        let mut blocked: HashSet<(String, String)> = HashSet::new();
        let mut in_batch: HashSet<(String, String)> = HashSet::new();
        let mut batch = Vec::new();
        let mut after = 0;
        'scan: loop {
            // Read the outbox a chunk at a time: a batch needs only its first
            // few hundred eligible entries, however long the outbox is.
            let chunk = local::pending_entries_after(&db, after, 1000)?;
            let Some(last) = chunk.last() else { break };
            after = last.id;
            for entry in chunk {
                if batch.len() >= max {
                    break 'scan;
                }
                let key = (entry.change.collection.as_str().to_owned(), entry.change.entity_id.as_str().to_owned());
                if blocked.contains(&key) {
                    continue;
                }
                let waiting = !manual && entry.next_attempt_at > now;
                let one_per_entity =
                    policies.of(&key.0) == deltasync_protocol::Policy::Reject && in_batch.contains(&key);
                if waiting || run.excluded.contains(&entry.id) || one_per_entity {
                    blocked.insert(key);
                    continue;
                }
                in_batch.insert(key);
                batch.push(entry);
            }
        }
        Ok((batch, state.cursor))
    }

    /// The server refused a change (invalid for it, or a refusal that persists):
    /// count a retry, back off, and set it aside as failed after [`MAX_RETRIES`].
    fn refused(
        &self,
        db: &Connection,
        entry: &OutboxEntry,
        message: &str,
        report: &mut SyncReport,
        run: &mut RunState,
    ) -> Result<()> {
        run.excluded.insert(entry.id);
        let retries = entry.retries + 1;
        if retries >= MAX_RETRIES {
            let message = format!("refused {retries} times; last: {message}");
            local::mark_retry(db, entry.id, retries, 0, &message)?;
            local::mark_failed(db, entry.id, &message, None)?;
            report.failed += 1;
            report.conflicts += 1;
            report.lost.push(LostChange {
                change_id: entry.change.change_id.as_str().to_owned(),
                collection: entry.change.collection.clone(),
                entity_id: entry.change.entity_id.clone(),
                conflict: None,
                message: Some(message),
            });
        } else {
            let wait = backoff::delay(retries, REFUSAL_BASE, REFUSAL_CAP);
            local::mark_retry(db, entry.id, retries, self.wall_ms() + wait.as_millis() as u64, message)?;
        }
        Ok(())
    }

    /// Takes in the server's clock: the HLC never falls behind it, and a wall
    /// clock running far ahead of it is corrected.
    pub(crate) fn observe_server_time(&self, server_time: u64) -> Result<()> {
        let wall = self.wall_ms() as i64;
        let ahead = wall - server_time as i64;
        let offset = if ahead > CLOCK_CORRECTION_THRESHOLD_MS { -ahead } else { 0 };
        let mut c = self.inner.clock.lock().unwrap_or_else(|p| p.into_inner());
        c.clock.observe(server_time);
        if c.offset_ms != offset {
            c.offset_ms = offset;
            local::set_meta(&self.db(), "clock_offset_ms", &offset.to_string())?;
        }
        Ok(())
    }

    /// A fresh stamp after a `clock_skew` refusal: the clock restarts from the
    /// server's time, so it no longer runs ahead.
    fn restamp(&self, server_time: u64) -> Hlc {
        let mut c = self.inner.clock.lock().unwrap_or_else(|p| p.into_inner());
        let device = self.device_id().clone();
        if c.clock.physical_ms() > server_time {
            c.clock = HlcClock::resume(device.clone(), &Hlc::new(server_time, 0, &device));
        }
        let now = self.corrected_now(&c).min(server_time.max(1));
        c.clock.tick(now)
    }

    /// Records the push results in one transaction and returns this device's
    /// changes that the answer covers (`from < seq <= to`) as stored changes,
    /// to fold into the chain at their seqs.
    #[allow(clippy::too_many_arguments)]
    fn record_results(
        &self,
        batch: &[OutboxEntry],
        results: &[PushResult],
        from: u64,
        to: u64,
        server_time: u64,
        report: &mut SyncReport,
        run: &mut RunState,
    ) -> Result<Vec<StoredChange>> {
        if results.len() != batch.len() {
            return Err(ClientError::Protocol {
                request: http::SYNC,
                message: format!("sent {} changes, got {} results", batch.len(), results.len()),
            });
        }
        let mut own = Vec::new();
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (entry, result) in batch.iter().zip(results) {
            if result.change_id != entry.change.change_id.as_str() {
                return Err(ClientError::Protocol {
                    request: http::SYNC,
                    message: format!("result for {} where {} was sent", result.change_id, entry.change.change_id),
                });
            }
            match result.status {
                ResultStatus::Applied | ResultStatus::Duplicate => {
                    let seq = result.seq.ok_or_else(|| ClientError::Protocol {
                        request: http::SYNC,
                        message: format!("accepted change {} has no seq", result.change_id),
                    })?;
                    report.pushed += 1;
                    if result.status == ResultStatus::Applied {
                        report.applied += 1;
                        if entry.requeued {
                            report.restored += 1;
                        }
                    } else {
                        report.duplicate += 1;
                    }
                    if let Some(conflict) = &result.conflict {
                        report.conflicts += 1;
                        report.lost.push(lost(&entry.change, conflict.clone()));
                    }
                    rebase_followers(&tx, entry, seq)?;
                    if seq <= from {
                        local::confirm(&tx, entry.change.change_id.as_str(), seq)?;
                    } else {
                        local::mark_sent(&tx, entry.id, seq)?;
                        if seq <= to {
                            own.push(StoredChange {
                                seq,
                                device_id: self.device_id().clone(),
                                server_time,
                                change: entry.change.clone(),
                            });
                        }
                    }
                }
                ResultStatus::Rejected => {
                    let conflict = result.conflict.clone().unwrap_or_else(Conflict::clock_skew);
                    if conflict.reason == ConflictReason::ClockSkew {
                        if run.restamped.insert(entry.id) {
                            let mut change = entry.change.clone();
                            change.hlc = self.restamp(server_time);
                            local::replace_change(&tx, entry.id, &change)?;
                            local::set_meta(&tx, "clock", change.hlc.as_str())?;
                            report.restamped += 1;
                        } else {
                            let message = "clock_skew: the change's clock is still ahead of the server's";
                            self.refused(&tx, entry, message, report, run)?;
                        }
                    } else {
                        let message = format!("refused by the server: {}", conflict.reason.as_str());
                        local::mark_failed(&tx, entry.id, &message, Some(&conflict))?;
                        report.failed += 1;
                        report.conflicts += 1;
                        report.lost.push(lost(&entry.change, conflict));
                    }
                }
            }
        }
        tx.commit()?;
        Ok(own)
    }

    /// Applies one page of the log (`from < seq <= to`, every seq present) in
    /// one transaction: merges each change into the confirmed state, folds the
    /// chain and the digest, and commits only if both match the server's.
    fn apply_page(&self, mut log: Vec<StoredChange>, page: &Page) -> Result<Result<(), Mismatch>> {
        log.sort_by_key(|c| c.seq);
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let state = local::sync_state(&tx)?;
        if state.cursor != page.from {
            // Another task moved the cursor while this page was on its way: drop it.
            return Ok(Ok(()));
        }
        if page.to < page.from {
            return Ok(Err(Mismatch(format!("the server answered cursor {} below ours, {}", page.to, page.from))));
        }
        let policies = state.policies.unwrap_or_default();
        let mut hash = state.state_hash;
        let mut digest = state.state_digest;
        let mut expected = page.from + 1;
        let mut touched = Vec::new();
        for c in &log {
            if c.seq != expected {
                return Ok(Err(Mismatch(format!("the page skips from seq {} to {}", expected - 1, c.seq))));
            }
            expected += 1;
            hash = hash.fold(c);
            if let Err(m) = apply_change(&tx, &policies, c, &mut digest)? {
                return Ok(Err(m));
            }
            local::confirm(&tx, c.change.change_id.as_str(), c.seq)?;
            touched.push((c.change.collection.clone(), c.change.entity_id.clone()));
        }
        if expected - 1 != page.to {
            return Ok(Err(Mismatch(format!(
                "the page ends at seq {} but the server says it covers up to {}",
                expected - 1,
                page.to
            ))));
        }
        if hash != page.state_hash {
            return Ok(Err(Mismatch(format!(
                "state hash at seq {}: local {hash}, server {}",
                page.to, page.state_hash
            ))));
        }
        if digest != page.state_digest {
            return Ok(Err(Mismatch(format!(
                "state digest at seq {}: local {digest}, server {}",
                page.to, page.state_digest
            ))));
        }
        local::set_position(&tx, page.to, &hash, &digest)?;
        let clock = self.observe_stamps(log.iter().map(|c| &c.change.hlc));
        local::set_meta(&tx, "clock", clock.as_str())?;
        tx.commit()?;
        drop(db);
        if !touched.is_empty() {
            touched.dedup();
            self.emit(Origin::Server, touched);
        }
        Ok(Ok(()))
    }

    /// Heals after a mismatch or a `410`, unless this sync already healed too often.
    async fn heal_or_give_up(
        &self,
        api: &ServerApi,
        report: &mut SyncReport,
        heals: &mut u32,
        mismatch: Option<String>,
        why: &str,
    ) -> Result<()> {
        if let Some(m) = mismatch {
            tracing::warn!(device = %self.device_id(), "local state does not match the server's: {m}; re-bootstrapping");
            report.verified = false;
            report.mismatch = Some(m);
        } else {
            tracing::info!(device = %self.device_id(), "server asked for a reset ({why}); re-bootstrapping");
        }
        *heals += 1;
        if *heals > MAX_HEALS_PER_SYNC {
            return Err(ClientError::Integrity(format!(
                "the state still does not match after {MAX_HEALS_PER_SYNC} re-bootstraps: {why}"
            )));
        }
        report.healed = true;
        report.bootstrapped += self.bootstrap(api).await?;
        self.restore_journal(api).await?;
        Ok(())
    }

    /// Waits up to `wait` for changes from other devices (a long-poll pull) and
    /// applies them, verified. Returns whether any arrived. The sync lock is
    /// not held while waiting, so a manual sync is never delayed by it.
    pub async fn wait_for_changes(&self, wait: Duration) -> Result<bool> {
        let api = self.api()?.clone();
        let cursor = local::sync_state(&self.db())?.cursor;
        let resp = match api.pull(self.device_id().as_str(), cursor, self.inner.options.page_limit, wait).await {
            Ok(resp) => resp,
            Err(ClientError::Server { status: 410, .. }) => {
                let _guard = self.inner.sync_lock.lock().await;
                self.bootstrap(&api).await?;
                self.restore_journal(&api).await?;
                return Ok(true);
            }
            Err(e) => return Err(e),
        };
        self.observe_server_time(resp.server_time)?;
        let _guard = self.inner.sync_lock.lock().await;
        let arrived = !resp.changes.is_empty();
        let page = Page { from: cursor, to: resp.cursor, state_hash: resp.state_hash, state_digest: resp.state_digest };
        if let Err(Mismatch(m)) = self.apply_page(resp.changes, &page)? {
            tracing::warn!(device = %self.device_id(), "local state does not match the server's: {m}; re-bootstrapping");
            self.bootstrap(&api).await?;
            self.restore_journal(&api).await?;
        } else {
            let db = self.db();
            local::trim_journal(&db, self.inner.options.journal_limit, local::horizon(&db)?)?;
        }
        Ok(arrived || resp.has_more)
    }
}

/// One page of the log and the server's hashes at its end.
struct Page {
    from: u64,
    to: u64,
    state_hash: deltasync_protocol::StateHash,
    state_digest: StateDigest,
}

/// The change as sent: `base_version` only where the `reject` policy reads it.
fn sendable(change: &Change, policies: &Policies) -> Change {
    let mut c = change.clone();
    if policies.of(c.collection.as_str()) != deltasync_protocol::Policy::Reject {
        c.base_version = None;
    }
    c
}

fn lost(change: &Change, conflict: Conflict) -> LostChange {
    LostChange {
        change_id: change.change_id.as_str().to_owned(),
        collection: change.collection.clone(),
        entity_id: change.entity_id.clone(),
        conflict: Some(conflict),
        message: None,
    }
}

/// Once `entry` has its seq, the pending changes of the same entity made on
/// top of it (same `base_version`) are based on that seq.
fn rebase_followers(conn: &Connection, entry: &OutboxEntry, seq: u64) -> Result<()> {
    if entry.change.op == Op::Append || !local::has_pending_after(conn, entry)? {
        return Ok(());
    }
    for mut follower in local::active_for_entity(conn, &entry.change.collection, &entry.change.entity_id)? {
        if follower.id > entry.id
            && follower.seq.is_none()
            && follower.change.op != Op::Append
            && follower.change.base_version == entry.change.base_version
        {
            follower.change.base_version = Some(seq);
            local::replace_change(conn, follower.id, &follower.change)?;
        }
    }
    Ok(())
}

/// Merges one logged change into the confirmed state and the digest.
fn apply_change(
    conn: &Connection,
    policies: &Policies,
    c: &StoredChange,
    digest: &mut StateDigest,
) -> Result<Result<(), Mismatch>> {
    if c.change.op == Op::Append {
        local::put_append(conn, c.seq, &c.to_wire_json())?;
        return Ok(Ok(()));
    }
    let current = local::confirmed(conn, c.change.collection.as_str(), c.change.entity_id.as_str())?;
    let policy = policies.of(c.change.collection.as_str());
    match merge(policy, current.as_ref().map(|c| &c.state), &c.change, c.seq) {
        Merge::Applied { state, .. } => {
            let new_hash = state.entity_hash();
            digest.replace(current.as_ref().and_then(|c| c.hash.as_ref()), new_hash.as_ref());
            local::put_confirmed(conn, &state, new_hash.as_ref())?;
            Ok(Ok(()))
        }
        Merge::Logged => Ok(Ok(())),
        Merge::Rejected(_) => {
            Ok(Err(Mismatch(format!("change seq {} is logged by the server but refused by the local merge", c.seq))))
        }
    }
}
