//! Healing: re-bootstrapping after a mismatch or a `410`; and the long poll,
//! which heals the same way.

use std::time::Duration;

use super::{Page, SyncReport, page::Mismatch};
use crate::clock::Clock;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::replica;
use crate::store::{Access, LocalStore, StoreTx};
use crate::transport::Transport;

/// The most times one sync re-bootstraps before it gives up.
pub const MAX_HEALS_PER_SYNC: u32 = 2;

impl<S: LocalStore, T: Transport, C: Clock> Engine<S, T, C> {
    /// Heals after a mismatch or a `410`, unless this sync already healed too often.
    pub(super) async fn heal(
        &self,
        transport: &T,
        report: &mut SyncReport,
        heals: &mut u32,
        mismatch: Option<String>,
        why: &str,
    ) -> Result<()> {
        if let Some(m) = mismatch {
            tracing::warn!(device = %self.device, "local state does not match the server's: {m}; re-bootstrapping");
            report.verified = false;
            report.mismatch = Some(m);
        } else {
            tracing::info!(device = %self.device, "server asked for a reset ({why}); re-bootstrapping");
        }
        *heals += 1;
        if *heals > MAX_HEALS_PER_SYNC {
            return Err(Error::Integrity(format!(
                "the state still does not match after {MAX_HEALS_PER_SYNC} re-bootstraps: {why}"
            )));
        }
        report.healed = true;
        report.bootstrapped += self.bootstrap(transport).await?;
        self.restore_journal(transport).await?;
        Ok(())
    }

    /// Waits up to `wait` for changes from other devices (a long-poll pull) and
    /// applies them, verified. Returns whether any arrived. The sync lock is
    /// not held while waiting, so a manual sync is never delayed by it.
    pub async fn wait_for_changes(&self, wait: Duration) -> Result<bool> {
        let transport = self.bound_transport().await?;
        let cursor = replica::sync_state(&mut self.store.begin(Access::Read).await?).await?.cursor;
        let device = self.device.as_str();
        let resp = match transport.pull(device, cursor, self.options.page_limit, wait).await {
            Ok(resp) => resp,
            Err(e) if e.is_reset_required() => {
                let _guard = self.sync_lock.lock().await;
                self.bootstrap(transport).await?;
                self.restore_journal(transport).await?;
                return Ok(true);
            }
            Err(e) => return Err(e),
        };
        self.observe_server_time(resp.server_time).await?;
        let _guard = self.sync_lock.lock().await;
        let arrived = !resp.changes.is_empty();
        let page = Page { from: cursor, to: resp.cursor, state_hash: resp.state_hash, state_digest: resp.state_digest };
        if let Err(Mismatch(m)) = self.apply_page(resp.changes, &page).await? {
            tracing::warn!(device = %self.device, "local state does not match the server's: {m}; re-bootstrapping");
            self.bootstrap(transport).await?;
            self.restore_journal(transport).await?;
        } else {
            let mut tx = self.store.begin(Access::Write).await?;
            let horizon = replica::horizon(&mut tx).await?;
            tx.trim_journal(self.options.journal_limit, horizon).await?;
            tx.commit().await?;
        }
        Ok(arrived || resp.has_more)
    }

    /// Whether the server's head, as the live channel (`GET /v1/live`) sent
    /// it, is not where this replica's confirmed state stands: then a sync
    /// has something to fetch (or, for a head behind the replica's or with
    /// another chain hash at the same cursor, something to heal).
    pub async fn is_behind(&self, head: &deltasync_protocol::wire::LiveHead) -> Result<bool> {
        let state = replica::sync_state(&mut self.store.begin(Access::Read).await?).await?;
        Ok(head.cursor != state.cursor || head.state_hash != state.state_hash)
    }
}
