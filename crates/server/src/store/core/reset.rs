//! When a device must bootstrap again: its cursor lies outside the log.
//!
//! A pull, a sync's page and a sync's push all ask the same question of the
//! same head; this is the one answer.

use crate::batch::DatasetHead;

/// Whether `cursor` lies outside the log (below the horizon, whose changes
/// are compacted away, or above the head, which this server never reached):
/// the device must bootstrap.
pub fn needs_reset(cursor: u64, head: &DatasetHead) -> bool {
    cursor < head.horizon || cursor > head.seq
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(horizon: u64, seq: u64) -> DatasetHead {
        DatasetHead { seq, horizon, ..DatasetHead::default() }
    }

    #[test]
    fn a_cursor_within_horizon_and_head_needs_no_reset() {
        assert!(!needs_reset(3, &head(3, 9)));
        assert!(!needs_reset(6, &head(3, 9)));
        assert!(!needs_reset(9, &head(3, 9)));
        assert!(!needs_reset(0, &head(0, 0)));
    }

    #[test]
    fn a_cursor_below_the_horizon_needs_a_reset() {
        assert!(needs_reset(2, &head(3, 9)));
        assert!(needs_reset(0, &head(1, 1)));
    }

    #[test]
    fn a_cursor_above_the_head_needs_a_reset() {
        assert!(needs_reset(10, &head(3, 9)));
        assert!(needs_reset(1, &head(0, 0)));
        assert!(needs_reset(u64::MAX, &head(0, u64::MAX - 1)));
    }
}
