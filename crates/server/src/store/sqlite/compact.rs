//! The SQL of compaction on SQLite. Reads go to the read pool; every write
//! (raising a horizon, one chunk of deletes, one step of incremental vacuum)
//! is an ordinary job of the single writer, so it shares a group commit with
//! the pushes queued beside it and never holds the writer for longer.

use deltasync_protocol::UserId;
use rusqlite::{Connection, OptionalExtension, params};

use super::reads::read_head;
use super::writer::{Job, Maintenance};
use super::{AutoVacuum, SqliteStore, auto_vacuum, map_err};
use crate::store::core::compact::{CompactionSql, DeviceMark, Marks};
use crate::store::{BoxFuture, StoreError, StoreFuture};

/// How many free pages one step of incremental vacuum returns (4 MiB of 4 KiB pages).
const VACUUM_STEP_PAGES: i64 = 1024;

/// The most steps of incremental vacuum after one pass (4 GiB at most).
const VACUUM_MAX_STEPS: u32 = 1024;

impl SqliteStore {
    /// Runs a maintenance write as a job of the writer and waits for its commit.
    pub(super) async fn maintain(
        &self,
        work: impl FnOnce(&Connection) -> Result<u64, StoreError> + Send + 'static,
    ) -> Result<u64, StoreError> {
        let work: Maintenance = Box::new(work);
        self.submit(|reply| Job::Run { work, reply }).await
    }
}

impl CompactionSql for SqliteStore {
    fn datasets<'a>(&'a self, after: Option<&'a UserId>, limit: u64) -> StoreFuture<'a, Vec<UserId>> {
        let after = after.map(|u| u.as_str().to_owned()).unwrap_or_default();
        Box::pin(self.readers.run(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT user_id FROM datasets WHERE user_id > ?1 ORDER BY user_id LIMIT ?2")
                .map_err(map_err)?;
            let ids = stmt
                .query_map(params![after, limit as i64], |r| r.get::<_, String>(0))
                .map_err(map_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(map_err)?;
            ids.into_iter()
                .map(|id| UserId::parse(id.as_str()).map_err(|e| StoreError::Corrupt(format!("dataset {id:?}: {e}"))))
                .collect()
        }))
    }

    fn marks<'a>(&'a self, user: &'a UserId) -> StoreFuture<'a, Marks> {
        let user = user.clone();
        Box::pin(self.readers.run(move |conn| {
            let tx = conn.transaction().map_err(map_err)?;
            let head = read_head(&tx, &user)?;
            let dropped_to = tx
                .prepare_cached("SELECT dropped_to FROM datasets WHERE user_id = ?1")
                .map_err(map_err)?
                .query_row([user.as_str()], |r| r.get::<_, i64>(0))
                .optional()
                .map_err(map_err)?
                .unwrap_or(0) as u64;
            let mut stmt =
                tx.prepare_cached("SELECT cursor, last_seen FROM devices WHERE user_id = ?1").map_err(map_err)?;
            let devices = stmt
                .query_map([user.as_str()], |r| {
                    Ok(DeviceMark { cursor: r.get::<_, i64>(0)? as u64, last_seen: r.get::<_, i64>(1)? as u64 })
                })
                .map_err(map_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(map_err)?;
            Ok(Marks { head, dropped_to, devices })
        }))
    }

    fn first_young<'a>(
        &'a self,
        user: &'a UserId,
        after: u64,
        up_to: u64,
        logged_by: u64,
    ) -> StoreFuture<'a, Option<u64>> {
        let user = user.clone();
        Box::pin(self.readers.run(move |conn| {
            conn.prepare_cached(
                "SELECT seq FROM changes WHERE user_id = ?1 AND seq > ?2 AND seq <= ?3 AND server_time > ?4
                 ORDER BY seq LIMIT 1",
            )
            .map_err(map_err)?
            .query_row(params![user.as_str(), after as i64, up_to as i64, logged_by as i64], |r| r.get::<_, i64>(0))
            .optional()
            .map(|s| s.map(|s| s as u64))
            .map_err(map_err)
        }))
    }

    fn raise_horizon<'a>(&'a self, user: &'a UserId, horizon: u64) -> StoreFuture<'a, bool> {
        let user = user.clone();
        Box::pin(async move {
            let moved = self
                .maintain(move |conn| {
                    conn.prepare_cached("UPDATE datasets SET horizon = ?2 WHERE user_id = ?1 AND horizon < ?2")
                        .map_err(map_err)?
                        .execute(params![user.as_str(), horizon as i64])
                        .map(|n| n as u64)
                        .map_err(map_err)
                })
                .await?;
            Ok(moved > 0)
        })
    }

    fn drop_history<'a>(&'a self, user: &'a UserId, after: u64, up_to: u64) -> StoreFuture<'a, u64> {
        let user = user.clone();
        Box::pin(self.maintain(move |conn| {
            let gone = conn
                .prepare_cached("DELETE FROM changes WHERE user_id = ?1 AND seq > ?2 AND seq <= ?3 AND op <> 'append'")
                .map_err(map_err)?
                .execute(params![user.as_str(), after as i64, up_to as i64])
                .map_err(map_err)?;
            conn.prepare_cached("UPDATE datasets SET dropped_to = ?2 WHERE user_id = ?1 AND dropped_to < ?2")
                .map_err(map_err)?
                .execute(params![user.as_str(), up_to as i64])
                .map_err(map_err)?;
            Ok(gone as u64)
        }))
    }

    fn reclaim_space(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            for _ in 0..VACUUM_MAX_STEPS {
                let left = self.maintain(vacuum_step).await?;
                if left == 0 {
                    break;
                }
            }
            Ok(())
        })
    }
}

/// Returns up to [`VACUUM_STEP_PAGES`] free pages to the file system; answers
/// how many free pages are left (0 as well when the database cannot return
/// them, because it was created without `auto_vacuum`).
fn vacuum_step(conn: &Connection) -> Result<u64, StoreError> {
    if auto_vacuum(conn)? != AutoVacuum::Incremental {
        return Ok(0);
    }
    // The pragma frees one page per step of its statement: step it to its end.
    let mut stmt = conn.prepare(&format!("PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})")).map_err(map_err)?;
    let mut freed = stmt.query([]).map_err(map_err)?;
    while freed.next().map_err(map_err)?.is_some() {}
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0)).map_err(map_err)?;
    Ok(free as u64)
}
