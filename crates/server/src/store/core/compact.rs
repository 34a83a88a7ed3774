//! Compaction: which part of a dataset's log may go, and how a pass drops
//! it, decided the same way in every store.
//!
//! A change may leave the log once it is older than `compact_after` and every
//! active device (seen within `device_expiry`) has pulled past it. The new
//! horizon of a dataset is the highest seq `s` such that
//!
//! - `s` is at or below every active device's cursor (the head when no
//!   device is active), and
//! - every change `horizon < seq <= s` was logged at least `compact_after`
//!   ago (the first younger change stops it).
//!
//! When that is above the current horizon, a pass first raises the horizon
//! (from then on a cursor below it is answered `410 reset_required`, and no
//! read touches the rows below it any more), then deletes the rows
//! `dropped_to < seq <= new horizon` in chunks of at most [`DROP_CHUNK`]
//! seqs, each its own short write that also moves the dataset's `dropped_to`
//! mark, so a push never waits behind more than one chunk, and a pass cut
//! short (a crash) is finished by the next one even when the horizon stays.
//! `append` changes stay: they are state that bootstrap serves. The receipts
//! of the dropped changes stay too, so a change pushed again is still
//! answered `duplicate` with its seq. The chain head and digest of the rows
//! above the horizon stay with them, so a page from a cursor at the horizon
//! ends on hashes the store holds (a page that ends at the horizon is empty
//! and only exists when the horizon is the head, whose hashes the dataset row
//! holds).
//!
//! A store says how to read and write each step ([`CompactionSql`]); [`run_pass`]
//! walks every dataset with it.

use std::time::Duration;

use deltasync_protocol::UserId;

use crate::batch::DatasetHead;
use crate::store::{BoxFuture, Compacted, StoreError, StoreFuture};

/// The most seqs one chunk of a pass deletes, each chunk its own write.
pub const DROP_CHUNK: u64 = 2_000;

/// How many dataset ids a pass reads at a time.
pub const DATASET_PAGE: u64 = 500;

/// The rules of one compaction pass, with the time it runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactRules {
    /// The server's time for the pass, in ms since the Unix epoch.
    pub now: u64,
    /// How old a change must be before it may leave the log (`compact_after`).
    pub compact_after: Duration,
    /// How long a device may stay unseen before it stops holding back compaction (`device_expiry`).
    pub device_expiry: Duration,
}

impl CompactRules {
    /// The earliest `last_seen` (ms) of a device that still holds back compaction.
    pub fn seen_since(&self) -> u64 {
        self.now.saturating_sub(millis(self.device_expiry))
    }

    /// The latest `server_time` (ms) of a change old enough to leave the log.
    pub fn logged_by(&self) -> u64 {
        self.now.saturating_sub(millis(self.compact_after))
    }

    /// Whether a device last seen at `last_seen` still holds back compaction.
    pub fn is_active(&self, last_seen: u64) -> bool {
        last_seen >= self.seen_since()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A device as compaction sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMark {
    /// The highest seq the device has pulled.
    pub cursor: u64,
    /// When the server last heard from it, in ms.
    pub last_seen: u64,
}

/// What a pass reads of one dataset before it decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marks {
    /// The dataset head, with its horizon.
    pub head: DatasetHead,
    /// The highest seq below which every row but the appends is deleted
    /// (below the horizon only when a pass was cut short).
    pub dropped_to: u64,
    /// Its devices.
    pub devices: Vec<DeviceMark>,
}

/// The highest seq no active device still needs: the lowest cursor of the
/// active devices, capped at the head (the head when none is active).
pub fn held_back_at(head: &DatasetHead, devices: &[DeviceMark], rules: &CompactRules) -> u64 {
    devices
        .iter()
        .filter(|d| rules.is_active(d.last_seen))
        .map(|d| d.cursor)
        .min()
        .map_or(head.seq, |c| c.min(head.seq))
}

/// The new horizon, given how far devices allow ([`held_back_at`]) and the
/// first change above the horizon that is too young to go (`first_young`,
/// looked up among `horizon < seq <= held_back_at`): `None` when the horizon
/// stays where it is.
pub fn new_horizon(head: &DatasetHead, held_back_at: u64, first_young: Option<u64>) -> Option<u64> {
    let by_age = first_young.map_or(held_back_at, |s| s.saturating_sub(1).min(held_back_at));
    (by_age > head.horizon).then_some(by_age)
}

/// The chunks `(after, up_to]` that drop the seqs `after < seq <= up_to`, each at most [`DROP_CHUNK`] long.
pub fn chunks(after: u64, up_to: u64) -> impl Iterator<Item = (u64, u64)> {
    let mut from = after;
    std::iter::from_fn(move || {
        if from >= up_to {
            return None;
        }
        let to = from.saturating_add(DROP_CHUNK).min(up_to);
        let chunk = (from, to);
        from = to;
        Some(chunk)
    })
}

/// The reads and writes of a compaction pass, in one store's SQL. Each is a
/// short statement or transaction of its own; [`run_pass`] decides the order.
pub trait CompactionSql: Send + Sync {
    /// At most `limit` dataset ids greater than `after` (all when `None`), in order.
    fn datasets<'a>(&'a self, after: Option<&'a UserId>, limit: u64) -> StoreFuture<'a, Vec<UserId>>;

    /// The dataset's head, how far its history is dropped, and its devices.
    fn marks<'a>(&'a self, user: &'a UserId) -> StoreFuture<'a, Marks>;

    /// The lowest seq `after < seq <= up_to` whose change was logged after `logged_by` (ms).
    fn first_young<'a>(
        &'a self,
        user: &'a UserId,
        after: u64,
        up_to: u64,
        logged_by: u64,
    ) -> StoreFuture<'a, Option<u64>>;

    /// Sets the horizon to `horizon` if it is below it; answers whether it moved.
    fn raise_horizon<'a>(&'a self, user: &'a UserId, horizon: u64) -> StoreFuture<'a, bool>;

    /// Deletes the log rows `after < seq <= up_to` that are not `append`s and
    /// raises the dataset's `dropped_to` mark to `up_to`, in one write; answers
    /// how many rows went.
    fn drop_history<'a>(&'a self, user: &'a UserId, after: u64, up_to: u64) -> StoreFuture<'a, u64>;

    /// Gives freed space back after a pass that dropped rows (SQLite: incremental vacuum).
    fn reclaim_space(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// One pass over every dataset: raises each horizon as far as the rules allow
/// and drops the history below it. Stops at the first error, keeping what is done.
pub async fn run_pass(sql: &impl CompactionSql, rules: &CompactRules) -> Result<Compacted, StoreError> {
    let mut report = Compacted::default();
    let mut after: Option<UserId> = None;
    loop {
        let users = sql.datasets(after.as_ref(), DATASET_PAGE).await?;
        for user in &users {
            report.datasets += 1;
            if let Some((horizon, dropped)) = compact_dataset(sql, user, rules).await? {
                report.compacted += 1;
                report.dropped += dropped;
                report.horizon = report.horizon.max(horizon);
            }
        }
        if (users.len() as u64) < DATASET_PAGE {
            break;
        }
        after = users.last().cloned();
    }
    if report.dropped > 0 {
        sql.reclaim_space().await?;
    }
    Ok(report)
}

/// Compacts one dataset: its new horizon and how many rows went, or `None` when it stays.
async fn compact_dataset(
    sql: &impl CompactionSql,
    user: &UserId,
    rules: &CompactRules,
) -> Result<Option<(u64, u64)>, StoreError> {
    let Marks { head, dropped_to, devices } = sql.marks(user).await?;
    let allowed = held_back_at(&head, &devices, rules);
    let raised = if allowed > head.horizon {
        new_horizon(&head, allowed, sql.first_young(user, head.horizon, allowed, rules.logged_by()).await?)
    } else {
        None
    };
    let horizon = match raised {
        Some(horizon) if sql.raise_horizon(user, horizon).await? => horizon,
        _ if dropped_to < head.horizon => head.horizon,
        _ => return Ok(None),
    };
    let mut dropped = 0;
    for (from, to) in chunks(dropped_to.min(head.horizon), horizon) {
        dropped += sql.drop_history(user, from, to).await?;
    }
    tracing::debug!(%user, horizon, dropped, "compacted");
    Ok(Some((horizon, dropped)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    fn rules(now: u64, after_days: u64, expiry_days: u64) -> CompactRules {
        CompactRules {
            now,
            compact_after: Duration::from_millis(after_days * DAY),
            device_expiry: Duration::from_millis(expiry_days * DAY),
        }
    }

    fn head(horizon: u64, seq: u64) -> DatasetHead {
        DatasetHead { seq, horizon, ..DatasetHead::default() }
    }

    fn device(cursor: u64, last_seen: u64) -> DeviceMark {
        DeviceMark { cursor, last_seen }
    }

    #[test]
    fn an_active_device_holds_back_the_horizon_at_its_cursor() {
        let r = rules(100 * DAY, 30, 90);
        let devices = [device(40, 99 * DAY), device(70, 100 * DAY)];
        assert_eq!(held_back_at(&head(0, 100), &devices, &r), 40);
        assert_eq!(new_horizon(&head(0, 100), 40, None), Some(40));
    }

    #[test]
    fn an_expired_device_holds_back_nothing() {
        let r = rules(100 * DAY, 30, 90);
        let devices = [device(3, 9 * DAY), device(70, 11 * DAY)];
        assert!(!r.is_active(9 * DAY));
        assert!(r.is_active(10 * DAY));
        assert_eq!(held_back_at(&head(0, 100), &devices, &r), 70);
        assert_eq!(held_back_at(&head(0, 100), &[device(3, 9 * DAY)], &r), 100, "no active device: the head");
    }

    #[test]
    fn a_cursor_is_never_trusted_past_the_head() {
        let r = rules(DAY, 0, 1);
        assert_eq!(held_back_at(&head(0, 5), &[device(9, DAY)], &r), 5);
    }

    #[test]
    fn a_young_change_stops_the_horizon_just_below_it() {
        let r = rules(100 * DAY, 30, 90);
        assert_eq!(r.logged_by(), 70 * DAY);
        assert_eq!(new_horizon(&head(0, 100), 100, Some(61)), Some(60));
        assert_eq!(new_horizon(&head(0, 100), 50, Some(61)), Some(50), "devices allow less than age");
        assert_eq!(new_horizon(&head(0, 100), 100, Some(1)), None, "the first change is too young");
        assert_eq!(new_horizon(&head(20, 100), 100, Some(21)), None);
    }

    #[test]
    fn the_horizon_never_goes_down_or_stays_put_as_a_move() {
        assert_eq!(new_horizon(&head(50, 100), 40, None), None);
        assert_eq!(new_horizon(&head(50, 100), 50, None), None);
        assert_eq!(new_horizon(&head(50, 100), 51, None), Some(51));
    }

    #[test]
    fn zero_durations_mean_at_once() {
        let r = rules(5_000, 0, 0);
        assert_eq!(r.logged_by(), 5_000);
        assert_eq!(r.seen_since(), 5_000);
        assert!(!r.is_active(4_999));
        assert_eq!(held_back_at(&head(0, 9), &[device(2, 4_999)], &r), 9);
        assert_eq!(new_horizon(&head(0, 9), 9, None), Some(9));
    }

    #[test]
    fn durations_longer_than_the_clock_keep_everything() {
        let r = CompactRules { now: 10, compact_after: Duration::MAX, device_expiry: Duration::MAX };
        assert_eq!((r.logged_by(), r.seen_since()), (0, 0));
        assert!(r.is_active(0));
    }

    /// One dataset in memory, recording the writes a pass makes, in order.
    struct Fake {
        head: DatasetHead,
        dropped_to: u64,
        devices: Vec<DeviceMark>,
        /// `server_time` of each seq (index 0 is seq 1).
        times: Vec<u64>,
        writes: std::sync::Mutex<Vec<String>>,
    }

    impl CompactionSql for Fake {
        fn datasets<'a>(&'a self, after: Option<&'a UserId>, _: u64) -> StoreFuture<'a, Vec<UserId>> {
            let all = if after.is_none() { vec![UserId::parse("u").unwrap()] } else { Vec::new() };
            Box::pin(async move { Ok(all) })
        }
        fn marks<'a>(&'a self, _: &'a UserId) -> StoreFuture<'a, Marks> {
            Box::pin(async move {
                Ok(Marks { head: self.head, dropped_to: self.dropped_to, devices: self.devices.clone() })
            })
        }
        fn first_young<'a>(&'a self, _: &'a UserId, after: u64, up_to: u64, by: u64) -> StoreFuture<'a, Option<u64>> {
            let found = (after + 1..=up_to).find(|s| self.times[*s as usize - 1] > by);
            Box::pin(async move { Ok(found) })
        }
        fn raise_horizon<'a>(&'a self, _: &'a UserId, horizon: u64) -> StoreFuture<'a, bool> {
            self.writes.lock().unwrap().push(format!("horizon {horizon}"));
            Box::pin(async { Ok(true) })
        }
        fn drop_history<'a>(&'a self, _: &'a UserId, after: u64, up_to: u64) -> StoreFuture<'a, u64> {
            self.writes.lock().unwrap().push(format!("drop {after}..{up_to}"));
            Box::pin(async move { Ok(up_to - after) })
        }
        fn reclaim_space(&self) -> BoxFuture<'_, Result<(), StoreError>> {
            self.writes.lock().unwrap().push("reclaim".into());
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn a_pass_raises_the_horizon_before_it_drops_anything_then_reclaims() {
        let seqs = 2 * DROP_CHUNK + 10;
        let mut times = vec![DAY; seqs as usize];
        times[(2 * DROP_CHUNK + 5) as usize] = 99 * DAY; // seq 2 * DROP_CHUNK + 6 is young
        let fake = Fake {
            head: head(3, seqs),
            dropped_to: 3,
            devices: vec![device(seqs, 100 * DAY), device(1, DAY)],
            times,
            writes: Default::default(),
        };
        let done = run_pass(&fake, &rules(100 * DAY, 30, 90)).await.unwrap();
        let top = 2 * DROP_CHUNK + 5;
        assert_eq!(done, Compacted { datasets: 1, compacted: 1, dropped: top - 3, horizon: top });
        assert_eq!(
            *fake.writes.lock().unwrap(),
            [
                format!("horizon {top}"),
                format!("drop 3..{}", 3 + DROP_CHUNK),
                format!("drop {}..{}", 3 + DROP_CHUNK, 3 + 2 * DROP_CHUNK),
                format!("drop {}..{top}", 3 + 2 * DROP_CHUNK),
                "reclaim".to_owned(),
            ]
        );
    }

    #[tokio::test]
    async fn a_pass_with_nothing_to_drop_writes_nothing() {
        let fake = Fake {
            head: head(0, 5),
            dropped_to: 0,
            devices: vec![device(0, 100 * DAY)],
            times: vec![DAY; 5],
            writes: Default::default(),
        };
        let done = run_pass(&fake, &rules(100 * DAY, 30, 90)).await.unwrap();
        assert_eq!(done, Compacted { datasets: 1, ..Compacted::default() });
        assert!(fake.writes.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_pass_cut_short_is_finished_by_the_next_even_when_the_horizon_stays() {
        let fake = Fake {
            head: head(10, 12),
            dropped_to: 4,
            devices: vec![device(10, 100 * DAY)],
            times: vec![DAY; 12],
            writes: Default::default(),
        };
        let done = run_pass(&fake, &rules(100 * DAY, 30, 90)).await.unwrap();
        assert_eq!(done, Compacted { datasets: 1, compacted: 1, dropped: 6, horizon: 10 });
        assert_eq!(*fake.writes.lock().unwrap(), ["drop 4..10", "reclaim"]);
    }

    #[test]
    fn history_goes_in_bounded_chunks() {
        assert_eq!(chunks(0, 0).count(), 0);
        assert_eq!(chunks(5, 3).count(), 0);
        assert_eq!(chunks(0, 10).collect::<Vec<_>>(), [(0, 10)]);
        let all: Vec<_> = chunks(100, 100 + 2 * DROP_CHUNK + 1).collect();
        assert_eq!(
            all,
            [
                (100, 100 + DROP_CHUNK),
                (100 + DROP_CHUNK, 100 + 2 * DROP_CHUNK),
                (100 + 2 * DROP_CHUNK, 101 + 2 * DROP_CHUNK)
            ]
        );
    }
}
