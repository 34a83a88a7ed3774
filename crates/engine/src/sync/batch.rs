//! Which outbox entries go in the next request.

use std::collections::HashSet;

use deltasync_protocol::wire::Policies;
use deltasync_protocol::{Change, Policy};

use super::SyncRun;
use crate::clock::Clock;
use crate::engine::Engine;
use crate::error::Result;
use crate::replica;
use crate::store::{Access, LocalStore, OutboxEntry, StoreTx};
use crate::transport::Transport;

/// How many outbox entries are read at a time while choosing a batch.
const SCAN_CHUNK: u32 = 1000;

/// The change as sent: `base_version` only where the `reject` policy reads it.
pub(super) fn sendable(change: &Change, policies: &Policies) -> Change {
    let mut c = change.clone();
    if policies.of(c.collection.as_str()) != Policy::Reject {
        c.base_version = None;
    }
    c
}

/// Chooses a batch among outbox entries, in outbox order.
struct Chooser<'a> {
    policies: &'a Policies,
    run: &'a SyncRun,
    now: u64,
    max: usize,
    /// Entities whose next change cannot go in this request.
    blocked: HashSet<(String, String)>,
    /// Entities with a change in the batch.
    in_batch: HashSet<(String, String)>,
    batch: Vec<OutboxEntry>,
}

impl Chooser<'_> {
    /// Considers the next entry; returns false once the batch is full.
    fn offer(&mut self, entry: OutboxEntry) -> bool {
        if self.batch.len() >= self.max {
            return false;
        }
        let key = (entry.change.collection.as_str().to_owned(), entry.change.entity_id.as_str().to_owned());
        if self.blocked.contains(&key) {
            return true;
        }
        let waiting = !self.run.manual && entry.next_attempt_at > self.now;
        let one_per_entity = self.policies.of(&key.0) == Policy::Reject && self.in_batch.contains(&key);
        if waiting || self.run.excluded.contains(&entry.id) || one_per_entity {
            self.blocked.insert(key);
        } else {
            self.in_batch.insert(key);
            self.batch.push(entry);
        }
        true
    }
}

impl<S: LocalStore, T: Transport, C: Clock> Engine<S, T, C> {
    /// Picks the next changes to send, in outbox order, with the cursor and
    /// the policies. A change waits while an earlier change of the same entity
    /// cannot go (backoff, set aside), so one entity's changes always reach the
    /// server in the order they were made; under `reject`, one change per
    /// entity per request, so that each is sent with the `base_version` its
    /// predecessor's seq gave it.
    pub(super) async fn next_batch(&self, run: &SyncRun) -> Result<(Vec<OutboxEntry>, u64, Policies)> {
        let mut tx = self.store.begin(Access::Read).await?;
        let state = replica::sync_state(&mut tx).await?;
        let policies = state.policies.unwrap_or_default();
        let mut chooser = Chooser {
            policies: &policies,
            run,
            now: self.wall_ms(),
            max: run.batch_size,
            blocked: HashSet::new(),
            in_batch: HashSet::new(),
            batch: Vec::new(),
        };
        let mut after = 0;
        // Read the outbox a chunk at a time: a batch needs only its first few
        // hundred eligible entries, however long the outbox is.
        'scan: loop {
            let chunk = tx.pending_after(after, SCAN_CHUNK).await?;
            let Some(last) = chunk.last() else { break };
            after = last.id;
            for entry in chunk {
                if !chooser.offer(entry) {
                    break 'scan;
                }
            }
        }
        let batch = chooser.batch;
        Ok((batch, state.cursor, policies))
    }
}
