//! What the server said about each change sent, recorded in one transaction.

use std::time::Duration;

use deltasync_protocol::wire::{PushResult, ResultStatus};
use deltasync_protocol::{Conflict, ConflictReason, Op, StoredChange};

use super::{LostChange, Page, SyncReport, SyncRun};
use crate::backoff::{self, MAX_RETRIES};
use crate::clock::{Clock, unit_random};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::replica::keys;
use crate::store::{Access, LocalStore, OutboxEntry, StoreTx};
use crate::transport::{self, Transport};

/// Backoff base and cap for changes the server refuses.
const REFUSAL_BASE: Duration = Duration::from_secs(1);
const REFUSAL_CAP: Duration = Duration::from_secs(300);

fn protocol(message: String) -> Error {
    Error::Protocol { request: transport::SYNC, message }
}

impl<S: LocalStore, T: Transport, C: Clock> Engine<S, T, C> {
    /// Records the push results in one transaction and returns this device's
    /// changes that the page covers (`from < seq <= to`) as stored changes, to
    /// fold into the chain at their seqs.
    pub(super) async fn record_results(
        &self,
        batch: &[OutboxEntry],
        results: &[PushResult],
        page: &Page,
        server_time: u64,
        run: &mut SyncRun,
    ) -> Result<Vec<StoredChange>> {
        if results.len() != batch.len() {
            return Err(protocol(format!("sent {} changes, got {} results", batch.len(), results.len())));
        }
        let mut own = Vec::new();
        let mut tx = self.store.begin(Access::Write).await?;
        for (entry, result) in batch.iter().zip(results) {
            if result.change_id != entry.change.change_id.as_str() {
                let sent = &entry.change.change_id;
                return Err(protocol(format!("result for {} where {sent} was sent", result.change_id)));
            }
            match result.status {
                ResultStatus::Applied | ResultStatus::Duplicate => {
                    let seq = self.accepted(&mut tx, entry, result, page, &mut run.report).await?;
                    if seq > page.from && seq <= page.to {
                        let device_id = self.device.clone();
                        own.push(StoredChange { seq, device_id, server_time, change: entry.change.clone() });
                    }
                }
                ResultStatus::Rejected => {
                    let conflict = result.conflict.clone().unwrap_or_else(Conflict::clock_skew);
                    self.rejected(&mut tx, entry, conflict, server_time, run).await?;
                }
            }
        }
        tx.commit().await?;
        Ok(own)
    }

    /// An accepted change: counted, its followers rebased on its seq, and
    /// confirmed at once when the cursor already covers it. Returns its seq.
    async fn accepted(
        &self,
        tx: &mut S::Tx<'_>,
        entry: &OutboxEntry,
        result: &PushResult,
        page: &Page,
        report: &mut SyncReport,
    ) -> Result<u64> {
        let seq = result.seq.ok_or_else(|| protocol(format!("accepted change {} has no seq", result.change_id)))?;
        report.pushed += 1;
        if result.status == ResultStatus::Applied {
            report.applied += 1;
            report.restored += u64::from(entry.requeued);
        } else {
            report.duplicate += 1;
        }
        if let Some(conflict) = &result.conflict {
            report.conflicts += 1;
            report.lost.push(LostChange::new(&entry.change, Some(conflict.clone()), None));
        }
        rebase_followers(tx, entry, seq).await?;
        if seq <= page.from {
            tx.confirm(entry.change.change_id.as_str(), seq).await?;
        } else {
            tx.mark_sent(entry.id, seq).await?;
        }
        Ok(seq)
    }

    /// A refused change: re-stamped once after `clock_skew`, otherwise failed
    /// with the server's conflict.
    async fn rejected(
        &self,
        tx: &mut S::Tx<'_>,
        entry: &OutboxEntry,
        conflict: Conflict,
        server_time: u64,
        run: &mut SyncRun,
    ) -> Result<()> {
        if conflict.reason == ConflictReason::ClockSkew {
            if !run.restamped.insert(entry.id) {
                let message = "clock_skew: the change's clock is still ahead of the server's";
                return self.refused(tx, entry, message, run).await;
            }
            let mut change = entry.change.clone();
            change.hlc = self.device_clock().restamp(self.wall_ms(), server_time);
            tx.replace_change(entry.id, &change).await?;
            tx.set_meta(keys::CLOCK, change.hlc.as_str()).await?;
            run.report.restamped += 1;
            return Ok(());
        }
        let message = format!("refused by the server: {}", conflict.reason.as_str());
        tx.mark_failed(entry.id, &message, Some(&conflict)).await?;
        run.report.failed += 1;
        run.report.conflicts += 1;
        run.report.lost.push(LostChange::new(&entry.change, Some(conflict), None));
        Ok(())
    }

    /// The server refused a change (invalid for it, or a refusal that persists):
    /// count a retry, back off, and set it aside as failed after [`MAX_RETRIES`].
    pub(super) async fn refused(
        &self,
        tx: &mut S::Tx<'_>,
        entry: &OutboxEntry,
        message: &str,
        run: &mut SyncRun,
    ) -> Result<()> {
        run.excluded.insert(entry.id);
        let retries = entry.retries + 1;
        if retries < MAX_RETRIES {
            let wait = backoff::delay(retries, REFUSAL_BASE, REFUSAL_CAP, unit_random(&self.clock));
            return tx.mark_retry(entry.id, retries, self.wall_ms() + wait.as_millis() as u64, message).await;
        }
        let message = format!("refused {retries} times; last: {message}");
        tx.mark_retry(entry.id, retries, 0, &message).await?;
        tx.mark_failed(entry.id, &message, None).await?;
        run.report.failed += 1;
        run.report.conflicts += 1;
        run.report.lost.push(LostChange::new(&entry.change, None, Some(message)));
        Ok(())
    }
}

/// Once `entry` has its seq, the pending changes of the same entity made on
/// top of it (same `base_version`) are based on that seq.
async fn rebase_followers(tx: &mut impl StoreTx, entry: &OutboxEntry, seq: u64) -> Result<()> {
    let (collection, entity) = (&entry.change.collection, &entry.change.entity_id);
    if entry.change.op == Op::Append || !tx.has_pending_after(collection, entity, entry.id).await? {
        return Ok(());
    }
    for mut follower in tx.active_for_entity(collection, entity).await? {
        if follower.id > entry.id
            && follower.seq.is_none()
            && follower.change.op != Op::Append
            && follower.change.base_version == entry.change.base_version
        {
            follower.change.base_version = Some(seq);
            tx.replace_change(follower.id, &follower.change).await?;
        }
    }
    Ok(())
}
