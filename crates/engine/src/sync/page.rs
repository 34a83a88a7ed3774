//! A page of the log, applied in seq order in one transaction and kept only
//! if the seqs are gapless and the chain head and digest match the server's.

use std::collections::HashMap;

use deltasync_protocol::wire::Policies;
use deltasync_protocol::{Collection, EntityId, Merge, Op, StateDigest, StateHash, StoredChange, merge};

use crate::clock::Clock;
use crate::engine::{Engine, Origin};
use crate::error::Result;
use crate::replica::{self, keys};
use crate::store::{Access, Confirmed, LocalStore, StoreTx};
use crate::transport::Transport;

/// One page of the log (`from < seq <= to`) and the server's hashes at its end.
#[derive(Debug, Clone)]
pub struct Page {
    /// The cursor the page starts after.
    pub from: u64,
    /// The seq it ends at.
    pub to: u64,
    /// The server's chain head at `to`.
    pub state_hash: StateHash,
    /// The server's state digest at `to`.
    pub state_digest: StateDigest,
}

/// Why a page could not be applied: the local state no longer matches the server's.
pub(crate) struct Mismatch(pub(crate) String);

/// The chain head and digest as a page is folded in.
struct Fold {
    hash: StateHash,
    digest: StateDigest,
    expected: u64,
}

impl Fold {
    /// The mismatch between the folded state and the server's, if any.
    fn check(&self, page: &Page) -> Option<Mismatch> {
        let end = self.expected - 1;
        if end != page.to {
            return Some(Mismatch(format!(
                "the page ends at seq {end} but the server says it covers up to {}",
                page.to
            )));
        }
        if self.hash != page.state_hash {
            let (hash, server) = (&self.hash, &page.state_hash);
            return Some(Mismatch(format!("state hash at seq {}: local {hash}, server {server}", page.to)));
        }
        if self.digest != page.state_digest {
            let (digest, server) = (&self.digest, &page.state_digest);
            return Some(Mismatch(format!("state digest at seq {}: local {digest}, server {server}", page.to)));
        }
        None
    }
}

impl<S: LocalStore, T: Transport, C: Clock> Engine<S, T, C> {
    /// Applies one page of the log (every seq present) in one transaction:
    /// merges each change into the confirmed state, folds the chain and the
    /// digest, and commits only if both match the server's.
    pub(crate) async fn apply_page(&self, mut log: Vec<StoredChange>, page: &Page) -> Result<Result<(), Mismatch>> {
        log.sort_by_key(|c| c.seq);
        // The page can be pulled again: the store may keep it less durably.
        let mut tx = self.store.begin(Access::Refetchable).await?;
        let state = replica::sync_state(&mut tx).await?;
        if state.cursor != page.from {
            // Another task moved the cursor while this page was on its way: drop it.
            return Ok(Ok(()));
        }
        if page.to < page.from {
            return Ok(Err(Mismatch(format!("the server answered cursor {} below ours, {}", page.to, page.from))));
        }
        let policies = state.policies.unwrap_or_default();
        let mut fold = Fold { hash: state.state_hash, digest: state.state_digest, expected: page.from + 1 };
        let mut states = confirmed_states(&mut tx, &log).await?;
        for c in &log {
            if c.seq != fold.expected {
                return Ok(Err(Mismatch(format!("the page skips from seq {} to {}", fold.expected - 1, c.seq))));
            }
            fold.expected += 1;
            fold.hash = fold.hash.fold(c);
            if let Err(m) = apply_change(&mut tx, &policies, c, &mut fold.digest, &mut states).await? {
                return Ok(Err(m));
            }
        }
        let confirmations: Vec<(&str, u64)> = log.iter().map(|c| (c.change.change_id.as_str(), c.seq)).collect();
        tx.confirm_many(&confirmations).await?;
        if let Some(m) = fold.check(page) {
            return Ok(Err(m));
        }
        replica::set_position(&mut tx, page.to, &fold.hash, &fold.digest).await?;
        let clock = self.device_clock().observe_stamps(log.iter().map(|c| &c.change.hlc));
        tx.set_meta(keys::CLOCK, clock.as_str()).await?;
        tx.commit().await?;
        let mut touched: Vec<(&Collection, &EntityId)> =
            log.iter().map(|c| (&c.change.collection, &c.change.entity_id)).collect();
        if !touched.is_empty() {
            touched.sort_unstable();
            touched.dedup();
            self.emit(Origin::Server, touched.into_iter().map(|(c, e)| (c.clone(), e.clone())).collect());
        }
        Ok(Ok(()))
    }
}

/// The confirmed states of a page's entities, keyed by `(collection, entity_id)`
/// as the page's changes name them, read at once.
type States<'a> = HashMap<(&'a str, &'a str), Option<Confirmed>>;

async fn confirmed_states<'a>(tx: &mut impl StoreTx, log: &'a [StoredChange]) -> Result<States<'a>> {
    let mut keys: Vec<(&str, &str)> = log
        .iter()
        .filter(|c| c.change.op != Op::Append)
        .map(|c| (c.change.collection.as_str(), c.change.entity_id.as_str()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let found = tx.confirmed_many(&keys).await?;
    Ok(keys.into_iter().zip(found).collect())
}

/// Merges one logged change into the confirmed state (and `states`) and the digest.
async fn apply_change<'a>(
    tx: &mut impl StoreTx,
    policies: &Policies,
    c: &'a StoredChange,
    digest: &mut StateDigest,
    states: &mut States<'a>,
) -> Result<Result<(), Mismatch>> {
    if c.change.op == Op::Append {
        tx.put_append(c.seq, &c.to_wire_json()).await?;
        return Ok(Ok(()));
    }
    let key = (c.change.collection.as_str(), c.change.entity_id.as_str());
    // Taken out, not cloned: it is put back below, merged or as it was.
    let current = states.remove(&key).flatten();
    let policy = policies.of(c.change.collection.as_str());
    match merge(policy, current.as_ref().map(|c| &c.state), &c.change, c.seq) {
        Merge::Applied { state, .. } => {
            let new_hash = state.entity_hash();
            digest.replace(current.as_ref().and_then(|c| c.hash.as_ref()), new_hash.as_ref());
            tx.put_confirmed(&state, new_hash.as_ref()).await?;
            states.insert(key, Some(Confirmed { state, hash: new_hash }));
            Ok(Ok(()))
        }
        Merge::Logged => {
            states.insert(key, current);
            Ok(Ok(()))
        }
        Merge::Rejected(_) => {
            Ok(Err(Mismatch(format!("change seq {} is logged by the server but refused by the local merge", c.seq))))
        }
    }
}
