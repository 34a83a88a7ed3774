//! The SQL of compaction on PostgreSQL. Every statement commits on its own:
//! raising a horizon takes the dataset's row lock only for one `UPDATE`, and
//! each chunk of deletes touches rows no push writes, so pushes never wait
//! behind a pass for longer than one short statement.

use deltasync_protocol::UserId;

use super::reads::read_head;
use super::{PostgresStore, map_err};
use crate::store::core::compact::{CompactionSql, DeviceMark, Marks};
use crate::store::rows::Columns;
use crate::store::{BoxFuture, StoreError, StoreFuture};

impl CompactionSql for PostgresStore {
    fn datasets<'a>(&'a self, after: Option<&'a UserId>, limit: u64) -> StoreFuture<'a, Vec<UserId>> {
        Box::pin(async move {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("SELECT user_id FROM datasets WHERE user_id > $1 ORDER BY user_id LIMIT $2")
                .await
                .map_err(map_err)?;
            let after = after.map_or("", |u| u.as_str());
            let rows = client.query(&stmt, &[&after, &(limit as i64)]).await.map_err(map_err)?;
            rows.iter()
                .map(|r| {
                    let id = r.text(0)?;
                    UserId::parse(id).map_err(|e| StoreError::Corrupt(format!("dataset {id:?}: {e}")))
                })
                .collect()
        })
    }

    fn marks<'a>(&'a self, user: &'a UserId) -> StoreFuture<'a, Marks> {
        Box::pin(async move {
            let client = self.client().await?;
            let head = read_head(&client, user).await?;
            let stmt =
                client.prepare_cached("SELECT dropped_to FROM datasets WHERE user_id = $1").await.map_err(map_err)?;
            let dropped_to = match client.query_opt(&stmt, &[&user.as_str()]).await.map_err(map_err)? {
                Some(r) => r.int(0)? as u64,
                None => 0,
            };
            let stmt = client
                .prepare_cached("SELECT cursor, last_seen FROM devices WHERE user_id = $1")
                .await
                .map_err(map_err)?;
            let rows = client.query(&stmt, &[&user.as_str()]).await.map_err(map_err)?;
            let devices = rows
                .iter()
                .map(|r| Ok(DeviceMark { cursor: r.int(0)? as u64, last_seen: r.int(1)? as u64 }))
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(Marks { head, dropped_to, devices })
        })
    }

    fn first_young<'a>(
        &'a self,
        user: &'a UserId,
        after: u64,
        up_to: u64,
        logged_by: u64,
    ) -> StoreFuture<'a, Option<u64>> {
        Box::pin(async move {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT seq FROM changes WHERE user_id = $1 AND seq > $2 AND seq <= $3 AND server_time > $4
                     ORDER BY seq LIMIT 1",
                )
                .await
                .map_err(map_err)?;
            let row = client
                .query_opt(&stmt, &[&user.as_str(), &(after as i64), &(up_to as i64), &(logged_by as i64)])
                .await
                .map_err(map_err)?;
            row.map(|r| r.int(0).map(|s| s as u64)).transpose()
        })
    }

    fn raise_horizon<'a>(&'a self, user: &'a UserId, horizon: u64) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("UPDATE datasets SET horizon = $2 WHERE user_id = $1 AND horizon < $2")
                .await
                .map_err(map_err)?;
            Ok(client.execute(&stmt, &[&user.as_str(), &(horizon as i64)]).await.map_err(map_err)? > 0)
        })
    }

    fn drop_history<'a>(&'a self, user: &'a UserId, after: u64, up_to: u64) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let client = self.client().await?;
            // One statement: the rows and the mark go together, or neither does.
            let stmt = client
                .prepare_cached(
                    "WITH gone AS (
                         DELETE FROM changes WHERE user_id = $1 AND seq > $2 AND seq <= $3 AND op <> 'append'
                         RETURNING 1),
                     mark AS (UPDATE datasets SET dropped_to = $3 WHERE user_id = $1 AND dropped_to < $3)
                     SELECT COUNT(*) FROM gone",
                )
                .await
                .map_err(map_err)?;
            let row =
                client.query_one(&stmt, &[&user.as_str(), &(after as i64), &(up_to as i64)]).await.map_err(map_err)?;
            Ok(row.int(0)? as u64)
        })
    }

    /// PostgreSQL's autovacuum makes the space of deleted rows reusable; nothing to do here.
    fn reclaim_space(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
}
