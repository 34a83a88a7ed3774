//! Reads: the dataset head, pages of the log, status, conflicts and bootstrap snapshots.

use std::time::Duration;

use deadpool_postgres::{Client, GenericClient, Pool};
use deltasync_protocol::{StateDigest, StateHash, UserId};
use futures_util::TryStreamExt;
use tokio_postgres::IsolationLevel;

use super::{corrupt_column, map_err, map_pool_err};
use crate::store::core::bootstrap::{SnapshotFeed, SnapshotPart, bootstrap_channel};
use crate::store::core::conflicts::{CONFLICT_COLUMNS, ConflictPaging, read_conflict};
use crate::store::page::{self, PageAssembler, PageLimit};
use crate::store::rows::{self, CHANGE_COLUMNS, Columns, DEVICE_COLUMNS, HEAD_COLUMNS};
use crate::store::{BootstrapStream, ConflictPage, DatasetHead, DatasetStatus, PageOutcome, StoreError};

/// The dataset head of `user` (the empty head when it has no dataset yet).
pub(super) async fn read_head(client: &impl GenericClient, user: &UserId) -> Result<DatasetHead, StoreError> {
    let stmt = client
        .prepare_cached(&format!("SELECT {HEAD_COLUMNS} FROM datasets WHERE user_id = $1"))
        .await
        .map_err(map_err)?;
    match client.query_opt(&stmt, &[&user.as_str()]).await.map_err(map_err)? {
        Some(row) => rows::dataset_head(&row),
        None => Ok(DatasetHead::default()),
    }
}

/// The changes after `cursor` within `limit`.
///
/// The head and the rows are read by separate statements, so a compaction
/// pass may raise the horizon and drop rows in between: a page that finds a
/// gap reads the head again, and answers a reset when the cursor has fallen
/// below the horizon meanwhile (see [`page::after_gap`]).
pub(super) async fn read_page(
    client: &Client,
    user: &UserId,
    cursor: u64,
    limit: PageLimit,
) -> Result<PageOutcome, StoreError> {
    match read_page_once(client, user, cursor, limit).await {
        Err(e) if page::is_gap(&e) => page::after_gap(cursor, read_head(client, user).await?, e),
        outcome => outcome,
    }
}

/// [`read_page`], without a second look after a gap.
async fn read_page_once(
    client: &Client,
    user: &UserId,
    cursor: u64,
    limit: PageLimit,
) -> Result<PageOutcome, StoreError> {
    // The head is read first: every change up to a visible head is visible
    // (commits of one dataset are serialised in seq order), so the page
    // below never has a hole, whatever other instances commit meanwhile.
    let head = read_head(client, user).await?;
    let Some(requested) = PageAssembler::start(cursor, limit, &head) else {
        return Ok(PageOutcome::ResetRequired { head });
    };
    let (from, to) = requested.range();
    if to == from {
        return finish_page(client, user, requested, &head).await;
    }
    // First the sizes (a few bytes per change, without reading the data),
    // so that only the changes that fit are fetched.
    let sizes = client
        .prepare_cached(
            "SELECT seq, COALESCE(octet_length(data), 0) FROM changes
             WHERE user_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq",
        )
        .await
        .map_err(map_err)?;
    let last = {
        let mut reach = requested;
        for r in client.query(&sizes, &[&user.as_str(), &(from as i64), &(to as i64)]).await.map_err(map_err)? {
            let bytes = usize::try_from(r.try_get::<_, i32>(1).map_err(corrupt_column)?).unwrap_or(0);
            if !reach.admits(bytes) {
                break;
            }
            reach.charge(user, r.try_get::<_, i64>(0).map_err(corrupt_column)? as u64, bytes)?;
        }
        reach.reach(user)?
    };
    let mut page = PageAssembler::new(from, last, limit.bytes);
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {CHANGE_COLUMNS} FROM changes WHERE user_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq"
        ))
        .await
        .map_err(map_err)?;
    for r in client.query(&stmt, &[&user.as_str(), &(from as i64), &(last as i64)]).await.map_err(map_err)? {
        if !page.offer_row(user, &r)? {
            break;
        }
    }
    finish_page(client, user, page, &head).await
}

/// The page, with the hashes at its end, looked up when no row held them.
async fn finish_page(
    client: &Client,
    user: &UserId,
    page: PageAssembler,
    head: &DatasetHead,
) -> Result<PageOutcome, StoreError> {
    let looked_up = match page.hashes_to_look_up(head) {
        Some(seq) => Some(hashes_at(client, user, seq).await?),
        None => None,
    };
    Ok(PageOutcome::Page(page.finish(user, head, looked_up)?))
}

/// The chain head and digest stored with the change `seq`.
async fn hashes_at(client: &Client, user: &UserId, seq: u64) -> Result<(StateHash, StateDigest), StoreError> {
    let stmt = client
        .prepare_cached("SELECT state_hash, state_digest FROM changes WHERE user_id = $1 AND seq = $2")
        .await
        .map_err(map_err)?;
    let row = client.query_one(&stmt, &[&user.as_str(), &(seq as i64)]).await.map_err(map_err)?;
    rows::hashes(row.bytes(0)?, row.bytes(1)?, "changes")
}

/// The head and devices of `user`'s dataset.
pub(super) async fn read_status(client: &Client, user: &UserId) -> Result<DatasetStatus, StoreError> {
    let head = read_head(client, user).await?;
    let stmt = client
        .prepare_cached(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE user_id = $1 ORDER BY device_id"))
        .await
        .map_err(map_err)?;
    let found = client.query(&stmt, &[&user.as_str()]).await.map_err(map_err)?;
    let devices = found.iter().map(rows::device_status).collect::<Result<Vec<_>, StoreError>>()?;
    Ok(DatasetStatus { head, devices })
}

/// The conflict records of `user` with `id > since`, at most `limit`.
pub(super) async fn read_conflicts(
    client: &Client,
    user: &UserId,
    since: u64,
    limit: u64,
) -> Result<ConflictPage, StoreError> {
    let paging = ConflictPaging::new(limit);
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {CONFLICT_COLUMNS} FROM conflicts WHERE user_id = $1 AND id > $2 ORDER BY id LIMIT $3"
        ))
        .await
        .map_err(map_err)?;
    let found =
        client.query(&stmt, &[&user.as_str(), &(since as i64), &paging.rows_to_fetch()]).await.map_err(map_err)?;
    let records = found.iter().map(read_conflict).collect::<Result<Vec<_>, StoreError>>()?;
    Ok(paging.page(records))
}

/// Every `(collection, policy)` pair the database holds.
pub(super) async fn read_collection_policies(client: &Client) -> Result<Vec<(String, String)>, StoreError> {
    let found = client.query("SELECT DISTINCT collection, policy FROM collections", &[]).await.map_err(map_err)?;
    found.iter().map(|r| Ok((r.try_get(0).map_err(corrupt_column)?, r.try_get(1).map_err(corrupt_column)?))).collect()
}

/// Streams a snapshot of `user`'s dataset on a task and connection of its
/// own, held until the stream ends (see [`SnapshotFeed`]).
pub(super) async fn bootstrap(pool: Pool, user: UserId, stall: Duration) -> Result<BootstrapStream, StoreError> {
    let (mut feed, start) = bootstrap_channel(stall);
    tokio::spawn(async move {
        let outcome = stream_snapshot(&pool, &user, &mut feed, stall).await;
        feed.end(outcome).await;
    });
    start.stream().await
}

/// Streams one consistent snapshot (a repeatable-read transaction): entities,
/// then appends, as NDJSON lines, read row by row through portals so that
/// memory holds one row and one chunk, whatever the rows' sizes.
/// Stops (ending the transaction and freeing the connection) as soon as the
/// feed says the reader is gone.
async fn stream_snapshot(
    pool: &Pool,
    user: &UserId,
    feed: &mut SnapshotFeed,
    stall: Duration,
) -> Result<(), StoreError> {
    let mut client = pool.get().await.map_err(map_pool_err)?;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(map_err)?;
    // Entities stream in key order straight off the primary key: a sort of
    // the whole dataset (which the planner picks when statistics are stale)
    // would spill to disk before the first line goes out. Should this task
    // ever stop without ending the transaction, PostgreSQL ends it itself.
    let idle_ms = stall.as_millis().clamp(1_000, i32::MAX as u128);
    tx.batch_execute(&format!(
        "SET LOCAL enable_sort = off; SET LOCAL idle_in_transaction_session_timeout = {idle_ms}"
    ))
    .await
    .map_err(map_err)?;
    if !feed.begin(read_head(&tx, user).await?) {
        return Ok(());
    }
    let u = user.as_str();
    for part in SnapshotPart::IN_ORDER {
        let stmt = tx.prepare(&part.query("$1")).await.map_err(map_err)?;
        let portal = tx.bind(&stmt, &[&u]).await.map_err(map_err)?;
        let found = tx.query_portal_raw(&portal, 0).await.map_err(map_err)?;
        futures_util::pin_mut!(found);
        while let Some(r) = found.try_next().await.map_err(map_err)? {
            if !feed.line(part, &r).await? {
                return Ok(());
            }
        }
    }
    if feed.finish().await {
        tx.commit().await.map_err(map_err)?;
    }
    Ok(())
}
