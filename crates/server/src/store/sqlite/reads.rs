//! Reads: pages of the log, status, conflicts and bootstrap snapshots, on pooled read connections.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deltasync_protocol::{StateDigest, StateHash, UserId};
use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{MAX_READERS, READER_WAIT, map_err};
use crate::store::core::bootstrap::{SnapshotFeed, SnapshotPart, bootstrap_channel};
use crate::store::core::conflicts::{CONFLICT_COLUMNS, ConflictPaging, read_conflict};
use crate::store::core::pending::{PendingLines, StoredEntity};
use crate::store::page::{PageAssembler, PageLimit};
use crate::store::rows::{self, CHANGE_COLUMNS, Columns, DEVICE_COLUMNS, HEAD_COLUMNS};
use crate::store::{BootstrapStream, ConflictPage, DatasetHead, DatasetStatus, PageOutcome, StoreError};

/// Read connections, opened on demand and kept for reuse, at most
/// [`MAX_READERS`] in use at once so that reads never take every blocking thread.
pub(super) struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl ReadPool {
    /// A pool of read connections to the database at `path`.
    pub(super) fn new(path: &Path) -> ReadPool {
        ReadPool { path: path.to_owned(), idle: Mutex::new(Vec::new()), permits: Arc::new(Semaphore::new(MAX_READERS)) }
    }

    /// Waits (at most [`READER_WAIT`]) for a reader to be free.
    async fn permit(&self) -> Result<OwnedSemaphorePermit, StoreError> {
        match tokio::time::timeout(READER_WAIT, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(StoreError::ShuttingDown),
            Err(_) => Err(StoreError::Unavailable(format!(
                "all {MAX_READERS} database readers stayed busy for {} s",
                READER_WAIT.as_secs()
            ))),
        }
    }

    /// Runs `f` on a free reader, on a blocking thread.
    pub(super) async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let pool = self.clone();
        let permit = pool.permit().await?;
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.get()?;
            let out = f(&mut conn);
            pool.put(conn);
            drop(permit);
            out
        })
        .await
        .map_err(|e| StoreError::Internal(format!("reader task failed: {e}")))?
    }

    /// Streams a snapshot of `user`'s dataset from a reader of its own, held
    /// until the stream ends (see [`SnapshotFeed`]).
    pub(super) async fn bootstrap(
        self: &Arc<Self>,
        user: UserId,
        stall: Duration,
    ) -> Result<BootstrapStream, StoreError> {
        let pool = self.clone();
        let permit = pool.permit().await?;
        let (mut feed, start) = bootstrap_channel(stall);
        tokio::task::spawn_blocking(move || {
            let outcome = pool.get().and_then(|mut conn| {
                let streamed = stream_snapshot(&mut conn, &user, &mut feed);
                pool.put(conn);
                streamed
            });
            feed.blocking_end(outcome);
            drop(permit);
        });
        start.stream().await
    }

    fn get(&self) -> Result<Connection, StoreError> {
        if let Some(c) = self.idle.lock().expect("pool lock").pop() {
            return Ok(c);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(map_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(map_err)?;
        Ok(conn)
    }

    fn put(&self, conn: Connection) {
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < 16 {
            idle.push(conn);
        }
    }
}

/// The dataset head of `user` (the empty head when it has no dataset yet).
pub(super) fn read_head(conn: &Connection, user: &UserId) -> Result<DatasetHead, StoreError> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {HEAD_COLUMNS} FROM datasets WHERE user_id = ?1")).map_err(map_err)?;
    let mut found = stmt.query([user.as_str()]).map_err(map_err)?;
    match found.next().map_err(map_err)? {
        Some(r) => rows::dataset_head(r),
        None => Ok(DatasetHead::default()),
    }
}

/// The chain head and digest stored with the change `seq`.
fn hashes_at(conn: &Connection, user: &UserId, seq: u64) -> Result<(StateHash, StateDigest), StoreError> {
    let (hash, digest) = conn
        .prepare_cached("SELECT state_hash, state_digest FROM changes WHERE user_id = ?1 AND seq = ?2")
        .map_err(map_err)?
        .query_row(params![user.as_str(), seq as i64], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?)))
        .map_err(map_err)?;
    rows::hashes(&hash, &digest, "changes")
}

/// The changes after `cursor` within `limit`, read in one transaction with the head.
pub(super) fn read_page(
    conn: &mut Connection,
    user: &UserId,
    cursor: u64,
    limit: PageLimit,
) -> Result<PageOutcome, StoreError> {
    let tx = conn.transaction().map_err(map_err)?;
    let head = read_head(&tx, user)?;
    let Some(mut page) = PageAssembler::start(cursor, limit, &head) else {
        return Ok(PageOutcome::ResetRequired { head });
    };
    let (from, to) = page.range();
    if to > from {
        let mut stmt = tx
            .prepare_cached(&format!(
                "SELECT {CHANGE_COLUMNS} FROM changes WHERE user_id = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq"
            ))
            .map_err(map_err)?;
        let mut found = stmt.query(params![user.as_str(), from as i64, to as i64]).map_err(map_err)?;
        while let Some(r) = found.next().map_err(map_err)? {
            if !page.offer_row(user, r)? {
                break;
            }
        }
    }
    let looked_up = page.hashes_to_look_up(&head).map(|seq| hashes_at(&tx, user, seq)).transpose()?;
    Ok(PageOutcome::Page(page.finish(user, &head, looked_up)?))
}

/// The head and devices of `user`'s dataset, read in one transaction.
pub(super) fn read_status(conn: &mut Connection, user: &UserId) -> Result<DatasetStatus, StoreError> {
    let tx = conn.transaction().map_err(map_err)?;
    let head = read_head(&tx, user)?;
    let mut stmt = tx
        .prepare_cached(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE user_id = ?1 ORDER BY device_id"))
        .map_err(map_err)?;
    let mut found = stmt.query([user.as_str()]).map_err(map_err)?;
    let mut devices = Vec::new();
    while let Some(r) = found.next().map_err(map_err)? {
        devices.push(rows::device_status(r)?);
    }
    Ok(DatasetStatus { head, devices })
}

/// The conflict records of `user` with `id > since`, at most `limit`.
pub(super) fn read_conflicts(
    conn: &mut Connection,
    user: &UserId,
    since: u64,
    limit: u64,
) -> Result<ConflictPage, StoreError> {
    let paging = ConflictPaging::new(limit);
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {CONFLICT_COLUMNS} FROM conflicts WHERE user_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
        ))
        .map_err(map_err)?;
    let mut found = stmt.query(params![user.as_str(), since as i64, paging.rows_to_fetch()]).map_err(map_err)?;
    let mut records = Vec::new();
    while let Some(r) = found.next().map_err(map_err)? {
        records.push(read_conflict(r)?);
    }
    Ok(paging.page(records))
}

/// Streams one consistent snapshot: entities, then appends, as NDJSON lines.
/// Stops (releasing the snapshot) as soon as the feed says the reader is gone.
fn stream_snapshot(conn: &mut Connection, user: &UserId, feed: &mut SnapshotFeed) -> Result<(), StoreError> {
    let tx = conn.transaction().map_err(map_err)?;
    if !feed.begin(read_head(&tx, user)?) {
        return Ok(());
    }
    for part in SnapshotPart::IN_ORDER {
        let mut pending = match part {
            SnapshotPart::Entities => pending_lines(&tx, user)?,
            SnapshotPart::Appends => PendingLines::default(),
        };
        let mut stmt = tx.prepare(&part.query("?1")).map_err(map_err)?;
        let mut found = stmt.query([user.as_str()]).map_err(map_err)?;
        while let Some(r) = found.next().map_err(map_err)? {
            if part == SnapshotPart::Entities {
                let (newer, replaced) = pending.take_through(r.text(0)?, r.text(1)?);
                for line in newer {
                    if !feed.blocking_line(part, &line)? {
                        return Ok(());
                    }
                }
                if replaced {
                    continue;
                }
            }
            if !feed.blocking_line(part, r)? {
                return Ok(());
            }
        }
        while let Some(line) = pending.pop() {
            if !feed.blocking_line(part, &line)? {
                return Ok(());
            }
        }
    }
    feed.blocking_finish();
    Ok(())
}

/// `user`'s entity states not folded into `entities` yet (see
/// [`crate::store::core::pending`]), newest per key. The pending table is
/// small (the writer folds it every few tens of thousands of rows) and is
/// read whole: an index on it would cost the random page writes that
/// folding saves.
fn pending_lines(conn: &Connection, user: &UserId) -> Result<PendingLines, StoreError> {
    let mut lines = PendingLines::default();
    let mut stmt = conn
        .prepare_cached(
            "SELECT collection, entity_id, data, version, deleted, meta FROM pending_entities WHERE user_id = ?1 ORDER BY id",
        )
        .map_err(map_err)?;
    let mut found = stmt.query([user.as_str()]).map_err(map_err)?;
    while let Some(r) = found.next().map_err(map_err)? {
        let entity = StoredEntity {
            data: r.text(2)?.to_owned(),
            version: r.int(3)? as u64,
            deleted: r.flag(4)?,
            meta: r.text(5)?.to_owned(),
            entity_hash: None,
        };
        lines.insert(r.text(0)?.to_owned(), r.text(1)?.to_owned(), entity);
    }
    Ok(lines)
}

/// Every `(collection, policy)` pair the database holds.
pub(super) fn read_collection_policies(conn: &mut Connection) -> Result<Vec<(String, String)>, StoreError> {
    let mut stmt = conn.prepare("SELECT DISTINCT collection, policy FROM collections").map_err(map_err)?;
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(map_err)?.collect::<Result<Vec<_>, _>>().map_err(map_err)
}
