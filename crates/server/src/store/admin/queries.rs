//! The SQL of the admin reports and what its rows mean, written once for
//! both stores.
//!
//! Queries use `?1`, `?2`… placeholders (a PostgreSQL source turns them into
//! `$1`, `$2`…) and only SQL both databases read alike; every integer column
//! they answer is a 64-bit integer on PostgreSQL (no `NUMERIC` sums).

use std::collections::HashMap;

use serde_json::value::RawValue;

use super::{DatasetHorizon, DayVolume, DeviceSummary, HistoryEntry, Row, UserSummary, utc_date};
use crate::store::StoreError;
use crate::store::rows::{Columns, corrupt};

/// Every user (with a dataset, a device, or both) at a glance, read by [`user_summary`].
pub const USERS: &str = "
    SELECT u.user_id, COALESCE(d.head, 0), COALESCE(d.horizon, 0),
        (SELECT COUNT(*) FROM changes c WHERE c.user_id = u.user_id),
        (SELECT COUNT(*) FROM devices v WHERE v.user_id = u.user_id),
        (SELECT COUNT(*) FROM conflicts k WHERE k.user_id = u.user_id),
        (SELECT MAX(v.last_seen) FROM devices v WHERE v.user_id = u.user_id),
        (SELECT c.server_time FROM changes c WHERE c.user_id = u.user_id ORDER BY c.seq DESC LIMIT 1)
    FROM (SELECT user_id FROM datasets UNION SELECT user_id FROM devices) AS u
    LEFT JOIN datasets d ON d.user_id = u.user_id
    ORDER BY u.user_id";

/// Live entities and tombstones per user: `user_id, live, deleted`.
///
/// An entity's newest state is its newest row in `pending_entities` (on
/// SQLite, what pushes decided since the last fold; empty on PostgreSQL),
/// else its row in `entities`: an entity may be in both, and the pending row wins.
pub const ENTITY_COUNTS: &str = "
    WITH pending AS (
        SELECT user_id, collection, entity_id, deleted,
            ROW_NUMBER() OVER (PARTITION BY user_id, collection, entity_id ORDER BY id DESC) AS newest
        FROM pending_entities
    ),
    latest AS (SELECT user_id, collection, entity_id, deleted FROM pending WHERE newest = 1)
    SELECT user_id,
        SUM(CASE WHEN deleted THEN 0 ELSE 1 END),
        SUM(CASE WHEN deleted THEN 1 ELSE 0 END)
    FROM (
        SELECT user_id, deleted FROM latest
        UNION ALL
        SELECT e.user_id, e.deleted FROM entities e
        WHERE NOT EXISTS (
            SELECT 1 FROM latest l
            WHERE l.user_id = e.user_id AND l.collection = e.collection AND l.entity_id = e.entity_id
        )
    ) AS merged
    GROUP BY user_id";

/// A dataset's `head, horizon` (`?1`: the user).
pub const DATASET: &str = "SELECT head, horizon FROM datasets WHERE user_id = ?1";

/// One row if the user (`?1`) has a device.
pub const HAS_DEVICE: &str = "SELECT 1 FROM devices WHERE user_id = ?1 LIMIT 1";

/// A user's devices (`?1`), read by [`device_summary`].
pub const DEVICES: &str = "SELECT device_id, cursor, last_seen FROM devices WHERE user_id = ?1 ORDER BY device_id";

/// A user's changes (`?1`), newest first, at most `?2`, read by [`history_entry`].
pub const HISTORY: &str = "
    SELECT seq, change_id, device_id, collection, entity_id, op, data, hlc, base_version, server_time
    FROM changes WHERE user_id = ?1 ORDER BY seq DESC LIMIT ?2";

/// [`HISTORY`] of one entity: collection `?3`, entity id `?4`.
pub const ENTITY_HISTORY: &str = "
    SELECT seq, change_id, device_id, collection, entity_id, op, data, hlc, base_version, server_time
    FROM changes WHERE user_id = ?1 AND collection = ?3 AND entity_id = ?4 ORDER BY seq DESC LIMIT ?2";

/// How many conflict records a user (`?1`) has.
pub const CONFLICT_COUNT: &str = "SELECT COUNT(*) FROM conflicts WHERE user_id = ?1";

/// A user's conflict records (`?1`), newest first, at most `?2`, in the
/// columns of [`CONFLICT_COLUMNS`](crate::store::core::conflicts::CONFLICT_COLUMNS).
pub const CONFLICTS: &str = "
    SELECT id, change_id, device_id, collection, entity_id, op, data, hlc, seq, reason, fields, current, server_time
    FROM conflicts WHERE user_id = ?1 ORDER BY id DESC LIMIT ?2";

/// A user's (`?1`) changes per UTC day (`server_time / 86400000`), oldest
/// first: `day, changes, bytes of data`, read by [`day_volume`].
pub const VOLUME_BY_DAY: &str = "
    SELECT server_time / 86400000 AS day, COUNT(*), COALESCE(SUM(octet_length(data)), 0)
    FROM changes WHERE user_id = ?1
    GROUP BY server_time / 86400000 ORDER BY day";

/// Totals: `users, changes, devices, conflicts`.
pub const TOTALS: &str = "
    SELECT (SELECT COUNT(*) FROM (SELECT user_id FROM datasets UNION SELECT user_id FROM devices) AS u),
        (SELECT COUNT(*) FROM changes),
        (SELECT COUNT(*) FROM devices),
        (SELECT COUNT(*) FROM conflicts)";

/// Every dataset's `user_id, head, horizon`, read by [`dataset_horizon`].
pub const HORIZONS: &str = "SELECT user_id, head, horizon FROM datasets ORDER BY user_id";

/// A row of [`USERS`], with the user's counts from [`ENTITY_COUNTS`].
pub fn user_summary(r: &Row, entities: &HashMap<String, (u64, u64)>) -> Result<UserSummary, StoreError> {
    let user_id = r.text(0)?.to_owned();
    let last_seen = r.opt_int(6)?.map(|v| v as u64);
    let last_change = r.opt_int(7)?.map(|v| v as u64);
    Ok(UserSummary {
        head: r.int(1)? as u64,
        horizon: r.int(2)? as u64,
        changes: r.int(3)? as u64,
        entities: entities.get(&user_id).map_or(0, |c| c.0),
        devices: r.int(4)? as u64,
        conflicts: r.int(5)? as u64,
        last_activity: last_seen.max(last_change),
        user_id,
    })
}

/// A row of [`DEVICES`], measured against the dataset's head and horizon.
pub fn device_summary(r: &Row, head: u64, horizon: u64) -> Result<DeviceSummary, StoreError> {
    let cursor = r.int(1)? as u64;
    Ok(DeviceSummary {
        device_id: r.text(0)?.to_owned(),
        cursor,
        last_seen: r.int(2)? as u64,
        behind: head.saturating_sub(cursor),
        needs_bootstrap: cursor < horizon,
    })
}

/// A row of [`HISTORY`] or [`ENTITY_HISTORY`].
pub fn history_entry(r: &Row) -> Result<HistoryEntry, StoreError> {
    let data = r
        .opt_text(6)?
        .map(|d| RawValue::from_string(d.to_owned()))
        .transpose()
        .map_err(|e| corrupt(format!("change data is not JSON: {e}")))?;
    Ok(HistoryEntry {
        seq: r.int(0)? as u64,
        change_id: r.text(1)?.to_owned(),
        device_id: r.text(2)?.to_owned(),
        collection: r.text(3)?.to_owned(),
        entity_id: r.text(4)?.to_owned(),
        op: r.text(5)?.to_owned(),
        data,
        hlc: r.text(7)?.to_owned(),
        base_version: r.opt_int(8)?.map(|v| v as u64),
        server_time: r.int(9)? as u64,
    })
}

/// A row of [`VOLUME_BY_DAY`].
pub fn day_volume(r: &Row) -> Result<DayVolume, StoreError> {
    Ok(DayVolume { date: utc_date(r.int(0)?), changes: r.int(1)? as u64, bytes: r.int(2)? as u64 })
}

/// A row of [`HORIZONS`].
pub fn dataset_horizon(r: &Row) -> Result<DatasetHorizon, StoreError> {
    Ok(DatasetHorizon { user_id: r.text(0)?.to_owned(), head: r.int(1)? as u64, horizon: r.int(2)? as u64 })
}

/// The one count a `SELECT COUNT(*)` answers.
pub fn single_count(rows: &[Row]) -> Result<u64, StoreError> {
    Ok(rows.first().ok_or_else(|| corrupt("a count answered no row"))?.int(0)? as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::admin::{Cell, DAY_MS};
    use crate::store::core::conflicts::CONFLICT_COLUMNS;

    /// The columns [`history_entry`] reads.
    const HISTORY_COLUMNS: &str =
        "seq, change_id, device_id, collection, entity_id, op, data, hlc, base_version, server_time";

    #[test]
    fn the_queries_read_the_columns_their_readers_expect() {
        assert!(CONFLICTS.contains(CONFLICT_COLUMNS));
        assert!(HISTORY.contains(HISTORY_COLUMNS));
        assert!(ENTITY_HISTORY.contains(HISTORY_COLUMNS));
        assert!(VOLUME_BY_DAY.contains(&(DAY_MS.to_string() + " AS day")));
    }

    #[test]
    fn a_user_was_last_active_at_the_later_of_its_devices_and_its_log() {
        let row = |seen: Cell, change: Cell| {
            Row(vec![
                Cell::Text("alice".into()),
                Cell::Int(5),
                Cell::Int(2),
                Cell::Int(3),
                Cell::Int(1),
                Cell::Int(0),
                seen,
                change,
            ])
        };
        let counts = HashMap::from([("alice".to_owned(), (4, 1))]);
        let s = user_summary(&row(Cell::Int(10), Cell::Int(20)), &counts).unwrap();
        assert_eq!((s.head, s.horizon, s.changes, s.entities, s.devices), (5, 2, 3, 4, 1));
        assert_eq!(s.last_activity, Some(20));
        assert_eq!(user_summary(&row(Cell::Int(30), Cell::Null), &counts).unwrap().last_activity, Some(30));
        assert_eq!(user_summary(&row(Cell::Null, Cell::Null), &HashMap::new()).unwrap().last_activity, None);
    }

    #[test]
    fn a_device_below_the_horizon_needs_a_bootstrap() {
        let row = |cursor| Row(vec![Cell::Text("phone".into()), Cell::Int(cursor), Cell::Int(1)]);
        let d = device_summary(&row(3), 10, 5).unwrap();
        assert_eq!((d.behind, d.needs_bootstrap), (7, true));
        let d = device_summary(&row(5), 10, 5).unwrap();
        assert_eq!((d.behind, d.needs_bootstrap), (5, false));
        assert_eq!(device_summary(&row(12), 10, 0).unwrap().behind, 0);
    }
}
