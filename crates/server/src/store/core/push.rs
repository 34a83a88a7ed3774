//! The skeleton of a push, the same in every store: load, decide, write.
//!
//! Inside its write transaction a store reads the dataset head, asks
//! [`reset_required`] whether the push may go on, loads what
//! [`crate::batch::batch_keys`] names into a [`Snapshot`], lets [`plan`]
//! decide everything, writes the plan, and answers [`committed`] once the
//! transaction committed.

use deltasync_protocol::wire::Policies;

use super::reset::needs_reset;
use crate::batch::{DatasetHead, PushPlan, Rules, Snapshot, plan_push};
use crate::store::{PushBatch, PushOutcome};

/// The answer to a push whose required cursor lies outside the log (nothing is applied), if it does.
pub fn reset_required(batch: &PushBatch, head: DatasetHead) -> Option<PushOutcome> {
    let cursor = batch.require_cursor?;
    needs_reset(cursor, &head).then_some(PushOutcome::ResetRequired { head })
}

/// Decides what `batch` does to the dataset the store loaded into `snapshot`.
pub fn plan(batch: &PushBatch, policies: &Policies, snapshot: Snapshot) -> PushPlan {
    let rules = Rules { now: batch.now, max_clock_drift_ms: batch.max_clock_drift_ms, policies };
    plan_push(snapshot, &batch.device, &batch.changes, rules)
}

/// The answer to a push whose plan is committed.
pub fn committed(plan: PushPlan) -> PushOutcome {
    PushOutcome::Committed { results: plan.results, head: plan.head }
}

#[cfg(test)]
mod tests {
    use deltasync_protocol::{DeviceId, UserId};

    use super::*;

    fn batch(require_cursor: Option<u64>) -> PushBatch {
        PushBatch {
            user: UserId::parse("u").unwrap(),
            device: DeviceId::parse("d").unwrap(),
            changes: Vec::new(),
            now: 1,
            max_clock_drift_ms: 0,
            require_cursor,
        }
    }

    fn head(horizon: u64, seq: u64) -> DatasetHead {
        DatasetHead { seq, horizon, ..DatasetHead::default() }
    }

    #[test]
    fn a_push_without_a_required_cursor_always_goes_on() {
        assert!(reset_required(&batch(None), head(5, 9)).is_none());
    }

    #[test]
    fn a_push_whose_cursor_lies_outside_the_log_is_refused_with_the_head() {
        let Some(PushOutcome::ResetRequired { head: h }) = reset_required(&batch(Some(10)), head(5, 9)) else {
            panic!("a cursor above the head was accepted");
        };
        assert_eq!(h, head(5, 9));
        assert!(reset_required(&batch(Some(4)), head(5, 9)).is_some());
        assert!(reset_required(&batch(Some(5)), head(5, 9)).is_none());
        assert!(reset_required(&batch(Some(9)), head(5, 9)).is_none());
    }
}
