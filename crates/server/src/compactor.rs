//! The background compactor of `deltasync serve`: one compaction pass over
//! every dataset each `compact_interval`, until shutdown.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::clock::Clock;
use crate::config::Compaction;
use crate::store::Store;

/// Runs a pass every `compaction.compact_interval` (the first one interval
/// after start) until `shutdown` turns true. A failed pass is logged and the
/// next one runs on time; nothing here stops the server. A pass in progress
/// when shutdown comes is finished first (the server closes its store only
/// after this returns), so its rows are not left for the next pass.
pub async fn run_compactor(
    store: Arc<dyn Store>,
    compaction: Compaction,
    clock: Clock,
    mut shutdown: watch::Receiver<bool>,
) {
    let every = compaction.compact_interval;
    let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            _ = ticks.tick() => {}
        }
        let rules = compaction.rules(clock.now_ms());
        match store.compact(&rules).await {
            Ok(done) if done.compacted > 0 => tracing::info!(
                datasets = done.datasets,
                compacted = done.compacted,
                dropped = done.dropped,
                horizon = done.horizon,
                "compaction pass dropped history"
            ),
            Ok(done) => tracing::debug!(datasets = done.datasets, "compaction pass: nothing to drop"),
            Err(e) => tracing::warn!(error = %e, "compaction pass failed; the next one runs in {every:?}"),
        }
    }
    tracing::debug!("compactor stopped");
}
