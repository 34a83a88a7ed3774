//! The journal: this device's own changes that the server acknowledged and
//! that left the outbox, kept (the newest `ClientOptions::journal_limit`, and
//! none at or below the server's horizon) so that a server restored from a
//! backup can be given back the ones it lost. A heal puts the entries the
//! server no longer holds back into the outbox under their original outbox
//! ids and change ids.

use deltasync_protocol::{Change, Collection, EntityId, Op};
use rusqlite::{Connection, params};

use super::outbox;
use crate::error::{ClientError, Result};

/// A journal entry as a heal checks it against the server: the change id and
/// the seq the server gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journaled {
    /// The outbox id the change had.
    pub id: i64,
    /// The change's id.
    pub change_id: String,
    /// The seq the server acknowledged it at.
    pub seq: u64,
}

/// Every journal entry, by seq.
pub fn journal_by_seq(conn: &Connection) -> Result<Vec<Journaled>> {
    let mut stmt = conn.prepare_cached("SELECT id, change_id, seq FROM journal ORDER BY seq, id")?;
    let rows = stmt.query_map([], |r| Ok(Journaled { id: r.get(0)?, change_id: r.get(1)?, seq: r.get(2)? }))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// How many entries the journal holds.
pub fn journal_len(conn: &Connection) -> Result<u64> {
    Ok(conn.query_row("SELECT COUNT(*) FROM journal", [], |r| r.get(0))?)
}

/// Drops the entries at or below the server's `horizon`, then all but the
/// newest `limit` (newest by outbox id: the order the changes were made in).
/// Returns how many were dropped.
pub fn trim_journal(conn: &Connection, limit: u64, horizon: u64) -> Result<u64> {
    let mut dropped = 0;
    if horizon > 0 {
        dropped += conn.prepare_cached("DELETE FROM journal WHERE seq <= ?1")?.execute([horizon])?;
    }
    dropped += conn
        .prepare_cached("DELETE FROM journal WHERE id <= (SELECT id FROM journal ORDER BY id DESC LIMIT 1 OFFSET ?1)")?
        .execute([limit.min(i64::MAX as u64)])?;
    Ok(dropped as u64)
}

/// Puts the journal entries acknowledged at `from_seq` or above back into the
/// outbox as pending (marked requeued), under their original outbox ids so
/// they keep their place ahead of newer changes of the same entity, and
/// removes them from the journal. Returns the entities they touch.
///
/// A pending change made on top of a requeued one carries that one's old seq
/// as its `base_version`; it is set back to the requeued change's own base, so
/// that it is rebased again on the seq the change is given now.
pub fn requeue_journal(conn: &Connection, from_seq: u64) -> Result<Vec<(Collection, EntityId)>> {
    let mut stmt = conn.prepare_cached("SELECT id, change, seq FROM journal WHERE seq >= ?1 ORDER BY id")?;
    let rows = stmt
        .query_map([from_seq.min(i64::MAX as u64)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, u64>(2)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut touched = Vec::new();
    for (id, change_json, old_seq) in rows {
        let change: Change = serde_json::from_str(&change_json)
            .map_err(|e| ClientError::LocalCorrupt(format!("journal change {id}: {e}")))?;
        conn.prepare_cached(
            "INSERT OR IGNORE INTO outbox (id, change_id, collection, entity_id, change, status, created_at, requeued)
             SELECT id, change_id, collection, entity_id, change, 'pending', created_at, 1 FROM journal WHERE id = ?1",
        )?
        .execute([id])?;
        conn.prepare_cached("DELETE FROM journal WHERE id = ?1")?.execute([id])?;
        if change.op != Op::Append {
            base_followers_on(conn, id, &change, old_seq)?;
        }
        touched.push((change.collection, change.entity_id));
    }
    touched.sort();
    touched.dedup();
    Ok(touched)
}

/// Sets the pending followers of outbox entry `id` (same entity, made after
/// it) that were based on `old_seq` back to `change`'s own `base_version`.
fn base_followers_on(conn: &Connection, id: i64, change: &Change, old_seq: u64) -> Result<()> {
    for mut follower in outbox::active_for_entity(conn, &change.collection, &change.entity_id)? {
        if follower.id > id
            && follower.seq.is_none()
            && follower.change.op != Op::Append
            && follower.change.base_version == Some(old_seq)
        {
            follower.change.base_version = change.base_version;
            outbox::replace_change(conn, follower.id, &follower.change)?;
        }
    }
    Ok(())
}

/// Marks the journal as not yet checked against the server (set by a heal in
/// the same transaction as the bootstrap, cleared once the check is done), so
/// that a crash between the two never loses the check.
pub fn set_journal_unchecked(conn: &Connection, unchecked: bool) -> Result<()> {
    if unchecked {
        super::set_meta(conn, "journal_unchecked", "1")
    } else {
        conn.prepare_cached("DELETE FROM meta WHERE key = 'journal_unchecked'")?.execute(params![])?;
        Ok(())
    }
}

/// Whether a heal left the journal to be checked against the server.
pub fn journal_unchecked(conn: &Connection) -> Result<bool> {
    Ok(super::meta(conn, "journal_unchecked")?.is_some())
}

#[cfg(test)]
mod tests {
    use deltasync_protocol::{ChangeId, Hlc};
    use serde_json::json;

    use super::*;
    use crate::local::{OutboxStatus, all_entries, confirm, confirm_up_to, mark_sent, open, push_outbox};

    fn change(n: u32, entity: &str, base_version: u64) -> Change {
        Change {
            change_id: ChangeId::parse(format!("c{n:03}")).unwrap(),
            collection: Collection::parse("tasks").unwrap(),
            entity_id: EntityId::parse(entity).unwrap(),
            op: Op::Upsert,
            data: Some(json!({ "n": n })),
            hlc: Hlc::parse(format!("1763800000000-{n:05}-dev-1")).unwrap(),
            base_version: Some(base_version),
        }
    }

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("d.db")).unwrap();
        (dir, conn)
    }

    fn ids(conn: &Connection) -> Vec<(i64, String, u64)> {
        journal_by_seq(conn).unwrap().into_iter().map(|j| (j.id, j.change_id, j.seq)).collect()
    }

    #[test]
    fn acknowledged_entries_leaving_the_outbox_are_journaled_with_their_seq() {
        let (_dir, conn) = db();
        for n in 1..=4 {
            push_outbox(&conn, &change(n, "t1", 0), 100).unwrap();
        }
        mark_sent(&conn, 1, 10).unwrap();
        mark_sent(&conn, 2, 11).unwrap();
        confirm_up_to(&conn, 10).unwrap();
        assert!(confirm(&conn, "c003", 12).unwrap());
        assert!(!confirm(&conn, "someone-elses", 13).unwrap());
        assert_eq!(ids(&conn), vec![(1, "c001".into(), 10), (3, "c003".into(), 12)]);
        let left: Vec<i64> = all_entries(&conn).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(left, vec![2, 4]);
    }

    #[test]
    fn the_journal_keeps_the_newest_entries_and_none_below_the_horizon() {
        let (_dir, conn) = db();
        for n in 1..=6 {
            push_outbox(&conn, &change(n, &format!("t{n}"), 0), 100).unwrap();
            assert!(confirm(&conn, &format!("c{n:03}"), 10 + n as u64).unwrap());
        }
        assert_eq!(trim_journal(&conn, 4, 0).unwrap(), 2);
        assert_eq!(ids(&conn).iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 4, 5, 6]);
        assert_eq!(trim_journal(&conn, 4, 14).unwrap(), 2);
        assert_eq!(ids(&conn).iter().map(|e| e.0).collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(trim_journal(&conn, 0, 0).unwrap(), 2);
        assert_eq!(journal_len(&conn).unwrap(), 0);
    }

    #[test]
    fn requeued_entries_come_back_pending_in_their_old_place_and_rebase_their_followers() {
        let (_dir, conn) = db();
        push_outbox(&conn, &change(1, "t1", 0), 100).unwrap();
        push_outbox(&conn, &change(2, "t2", 0), 100).unwrap();
        assert!(confirm(&conn, "c001", 10).unwrap());
        assert!(confirm(&conn, "c002", 11).unwrap());
        // Made after c001 was acknowledged: based on its seq.
        push_outbox(&conn, &change(3, "t1", 10), 100).unwrap();

        let touched = requeue_journal(&conn, 10).unwrap();
        assert_eq!(touched.len(), 2);
        assert_eq!(journal_len(&conn).unwrap(), 0);
        let entries = all_entries(&conn).unwrap();
        let summary: Vec<_> = entries
            .iter()
            .map(|e| (e.id, e.change.change_id.as_str().to_owned(), e.status, e.requeued, e.change.base_version))
            .collect();
        assert_eq!(
            summary,
            vec![
                (1, "c001".into(), OutboxStatus::Pending, true, Some(0)),
                (2, "c002".into(), OutboxStatus::Pending, true, Some(0)),
                (3, "c003".into(), OutboxStatus::Pending, false, Some(0)),
            ]
        );
    }

    #[test]
    fn only_entries_from_the_given_seq_are_requeued() {
        let (_dir, conn) = db();
        for n in 1..=3 {
            push_outbox(&conn, &change(n, &format!("t{n}"), 0), 100).unwrap();
            assert!(confirm(&conn, &format!("c{n:03}"), 10 * n as u64).unwrap());
        }
        requeue_journal(&conn, 20).unwrap();
        assert_eq!(ids(&conn), vec![(1, "c001".into(), 10)]);
        let back: Vec<i64> = all_entries(&conn).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(back, vec![2, 3]);
        requeue_journal(&conn, u64::MAX).unwrap();
        assert_eq!(journal_len(&conn).unwrap(), 1);
    }
}
