//! After a heal: give a server restored from a backup the changes of this
//! device that it acknowledged once and no longer holds.
//!
//! Every acknowledged change that leaves the outbox goes to the journal with
//! the seq the server gave it. A heal marks the journal unchecked in the
//! bootstrap's transaction; then the check finds the first journaled change
//! the server no longer holds, and puts it and every later one back into the
//! outbox as pending, under their original ids. The next push gets `applied`
//! for those the restore lost (counted as `restored`) and `duplicate` for any
//! it still had.
//!
//! The check relies on what a restore does to the log: it keeps a prefix
//! (`1..=h` for the backup's head `h`) and forgets the rest, so the server
//! holds a journaled change exactly when the change the server now has at its
//! seq has the same id. A binary search over the journal (one
//! `GET /v1/pull?limit=1` per step) finds the boundary; when the server was
//! not restored (a local mismatch) the first probe, of the newest entry, finds
//! it held and nothing is re-sent.

use std::future::Future;
use std::time::Duration;

use deltasync_protocol::{Change, Collection, EntityId, Op};

use crate::clock::Clock;
use crate::engine::{Engine, Notice, Origin};
use crate::error::Result;
use crate::replica::keys;
use crate::store::{Access, Journaled, LocalStore, StoreTx};
use crate::transport::Transport;

impl<S: LocalStore, T: Transport, C: Clock> Engine<S, T, C> {
    /// If a heal left the journal unchecked, puts the journaled changes the
    /// server no longer holds back into the outbox. Returns how many.
    pub(crate) async fn restore_journal(&self, transport: &T) -> Result<u64> {
        if self.store.begin(Access::Read).await?.meta(keys::JOURNAL_UNCHECKED).await?.is_none() {
            return Ok(0);
        }
        let status = transport.status(Some(self.device.as_str())).await?;
        self.observe_server_time(status.server_time).await?;
        self.bind_user(&status.user_id, transport).await?;
        let entries = {
            let mut tx = self.store.begin(Access::Write).await?;
            tx.set_meta(keys::HORIZON, &status.horizon.to_string()).await?;
            tx.trim_journal(self.options.journal_limit, status.horizon).await?;
            let entries = tx.journal_by_seq().await?;
            tx.commit().await?;
            entries
        };
        // Entries above the head are certainly gone; the others are checked.
        let known = entries.partition_point(|e| e.seq <= status.head);
        let held = held_prefix(known, |i| self.holds(transport, &entries[i])).await?;
        let lost = &entries[held..];
        let mut tx = self.store.begin(Access::Write).await?;
        let touched = requeue(&mut tx, lost).await?;
        tx.remove_meta(keys::JOURNAL_UNCHECKED).await?;
        tx.commit().await?;
        if !lost.is_empty() {
            tracing::warn!(
                device = %self.device,
                "the server no longer holds {} change(s) it had acknowledged (restored from a backup?); sending \
                 them again",
                lost.len()
            );
            self.emit(Origin::Local, touched);
            self.notify(Notice::LocalWrite);
        }
        Ok(lost.len() as u64)
    }

    /// Whether the server's log holds `entry` at the seq it was acknowledged at.
    async fn holds(&self, transport: &T, entry: &Journaled) -> Result<bool> {
        match transport.pull(self.device.as_str(), entry.seq - 1, 1, Duration::ZERO).await {
            Ok(page) => Ok(page
                .changes
                .first()
                .is_some_and(|c| c.seq == entry.seq && c.change.change_id == entry.change.change_id)),
            // Below the horizon or above the head: not there to be found.
            Err(e) if e.is_reset_required() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Puts `lost` journal entries back into the outbox (in outbox-id order, so
/// they keep their place ahead of newer changes of the same entity). Returns
/// the entities they touch.
async fn requeue(tx: &mut impl StoreTx, lost: &[Journaled]) -> Result<Vec<(Collection, EntityId)>> {
    let mut lost: Vec<&Journaled> = lost.iter().collect();
    lost.sort_by_key(|j| j.id);
    let mut touched = Vec::new();
    for entry in lost {
        tx.journal_to_outbox(entry.id).await?;
        if entry.change.op != Op::Append {
            base_followers_on(tx, entry.id, &entry.change, entry.seq).await?;
        }
        touched.push((entry.change.collection.clone(), entry.change.entity_id.clone()));
    }
    touched.sort();
    touched.dedup();
    Ok(touched)
}

/// A pending change made on top of a requeued one carries that one's old seq
/// as its `base_version`; it is set back to the requeued change's own base, so
/// that it is rebased again on the seq the change is given now.
async fn base_followers_on(tx: &mut impl StoreTx, id: i64, change: &Change, old_seq: u64) -> Result<()> {
    for mut follower in tx.active_for_entity(&change.collection, &change.entity_id).await? {
        if follower.id > id
            && follower.seq.is_none()
            && follower.change.op != Op::Append
            && follower.change.base_version == Some(old_seq)
        {
            follower.change.base_version = change.base_version;
            tx.replace_change(follower.id, &follower.change).await?;
        }
    }
    Ok(())
}

/// The length of the longest prefix of `0..n` for which `held` is true, given
/// that `held` is true on a prefix and false after it. Asks about the last
/// index first (the common answer: everything is held), then bisects: at most
/// `1 + ⌈log2 n⌉` questions.
async fn held_prefix<F, Fut>(n: usize, mut held: F) -> Result<usize>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    if n == 0 || held(n - 1).await? {
        return Ok(n);
    }
    // Every index below `lo` is held; `hi` is not.
    let (mut lo, mut hi) = (0, n - 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if held(mid).await? {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use futures_executor::block_on;

    use crate::error::Error;

    use super::*;

    #[test]
    fn finds_the_held_prefix_with_few_questions() {
        for n in 0..40usize {
            for boundary in 0..=n {
                let asked = Cell::new(0u32);
                let found = block_on(held_prefix(n, |i| {
                    asked.set(asked.get() + 1);
                    assert!(i < n, "asked about {i} of {n}");
                    std::future::ready(Ok(i < boundary))
                }))
                .unwrap();
                assert_eq!(found, boundary, "n {n}");
                let bound = 1 + (n as f64).log2().ceil() as u32;
                assert!(asked.get() <= bound.max(1), "n {n}, boundary {boundary}: {} questions", asked.get());
            }
        }
    }

    #[test]
    fn everything_held_costs_one_question() {
        let asked = Cell::new(0u32);
        let found = block_on(held_prefix(10_000, |_| {
            asked.set(asked.get() + 1);
            std::future::ready(Ok(true))
        }))
        .unwrap();
        assert_eq!((found, asked.get()), (10_000, 1));
    }

    #[test]
    fn an_error_stops_the_search() {
        let err =
            block_on(held_prefix(8, |i| std::future::ready(if i == 7 { Ok(false) } else { Err(Error::NoServer) })));
        assert!(matches!(err, Err(Error::NoServer)), "{err:?}");
    }
}
