//! After a heal: give a server restored from a backup the changes of this
//! device that it acknowledged once and no longer holds.
//!
//! Every acknowledged change that leaves the outbox goes to the journal with
//! the seq the server gave it (see [`crate::local::journal`]). A heal marks the
//! journal unchecked in the bootstrap's transaction; then the check finds the
//! first journaled change the server no longer holds, and puts it and every
//! later one back into the outbox as pending, under their original ids. The
//! next push gets `applied` for those the restore lost (counted as
//! `restored`) and `duplicate` for any it still had.
//!
//! The check relies on what a restore does to the log: it keeps a prefix
//! (`1..=h` for the backup's head `h`) and forgets the rest, so the server
//! holds a journaled change exactly when its seq is still at or below `h`:
//! that is, when the change the server now has at that seq has the same id.
//! A binary search over the journal (one `GET /v1/pull?limit=1` per step)
//! finds the boundary; when the server was not restored (a local mismatch) the
//! first probe, of the newest entry, finds it held and nothing is re-sent.

use std::future::Future;
use std::time::Duration;

use crate::client::{Client, Origin};
use crate::error::{ClientError, Result};
use crate::http::ServerApi;
use crate::local::{self, Journaled};

impl Client {
    /// If a heal left the journal unchecked, puts the journaled changes the
    /// server no longer holds back into the outbox. Returns how many.
    pub(crate) async fn restore_journal(&self, api: &ServerApi) -> Result<u64> {
        if !local::journal_unchecked(&self.db())? {
            return Ok(0);
        }
        let status = api.status(self.device_id().as_str()).await?;
        self.observe_server_time(status.server_time)?;
        let entries = {
            let db = self.db();
            local::set_horizon(&db, status.horizon)?;
            local::trim_journal(&db, self.inner.options.journal_limit, status.horizon)?;
            local::journal_by_seq(&db)?
        };
        // Entries above the head are certainly gone; the others are checked.
        let known = entries.partition_point(|e| e.seq <= status.head);
        let held = held_prefix(known, |i| self.holds(api, &entries[i])).await?;
        let from_seq = entries.get(held).map_or(u64::MAX, |first_lost| first_lost.seq);
        let touched = {
            let mut db = self.db();
            let tx = db.transaction()?;
            let touched = local::requeue_journal(&tx, from_seq)?;
            local::set_journal_unchecked(&tx, false)?;
            tx.commit()?;
            touched
        };
        let requeued = entries.iter().filter(|e| e.seq >= from_seq).count() as u64;
        if requeued > 0 {
            tracing::warn!(
                device = %self.device_id(),
                "the server no longer holds {requeued} change(s) it had acknowledged (restored from a backup?); \
                 sending them again"
            );
            self.emit(Origin::Local, touched);
            self.inner.local_writes.notify_one();
        }
        Ok(requeued)
    }

    /// Whether the server's log holds `entry` at the seq it was acknowledged at.
    async fn holds(&self, api: &ServerApi, entry: &Journaled) -> Result<bool> {
        match api.pull(self.device_id().as_str(), entry.seq - 1, 1, Duration::ZERO).await {
            Ok(page) => Ok(page
                .changes
                .first()
                .is_some_and(|c| c.seq == entry.seq && c.change.change_id.as_str() == entry.change_id)),
            // Below the horizon or above the head: not there to be found.
            Err(ClientError::Server { status: 410, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
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

    use super::*;

    #[tokio::test]
    async fn finds_the_held_prefix_with_few_questions() {
        for n in 0..40usize {
            for boundary in 0..=n {
                let asked = Cell::new(0u32);
                let found = held_prefix(n, |i| {
                    asked.set(asked.get() + 1);
                    assert!(i < n, "asked about {i} of {n}");
                    std::future::ready(Ok(i < boundary))
                })
                .await
                .unwrap();
                assert_eq!(found, boundary, "n {n}");
                let bound = 1 + (n as f64).log2().ceil() as u32;
                assert!(asked.get() <= bound.max(1), "n {n}, boundary {boundary}: {} questions", asked.get());
            }
        }
    }

    #[tokio::test]
    async fn everything_held_costs_one_question() {
        let asked = Cell::new(0u32);
        let found = held_prefix(10_000, |_| {
            asked.set(asked.get() + 1);
            std::future::ready(Ok(true))
        })
        .await
        .unwrap();
        assert_eq!((found, asked.get()), (10_000, 1));
    }

    #[tokio::test]
    async fn an_error_stops_the_search() {
        let err =
            held_prefix(8, |i| std::future::ready(if i == 7 { Ok(false) } else { Err(ClientError::NoServer) })).await;
        assert!(matches!(err, Err(ClientError::NoServer)), "{err:?}");
    }
}
