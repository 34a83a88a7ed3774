//! The embedded SQLite store: one writer thread with group commit, a pool of
//! readers, WAL so that readers never block the writer.
//!
//! Every push is a job on a bounded channel. The writer takes all the jobs
//! that are waiting (up to a bound), runs each inside its own savepoint of
//! one transaction, commits once with `synchronous = FULL`, and only then
//! answers every job: an acknowledgement always means durable, and many
//! devices share one fsync. A checkpointer thread copies committed WAL frames
//! into the database file in the background, so the writer never pauses for it.
//!
//! A push appends its log rows and, instead of writing entity states and
//! receipts in place (two random page writes per change with the random ids
//! real clients send), appends them to two pending tables that the writer
//! folds into `entities` and `receipts` in key order every few tens of
//! thousands of rows (see [`super::core::pending`]).
//!
//! The store is split by concept: [`writer`] (the writer thread and the SQL
//! of a push), [`reads`] (the read pool and every read), [`checkpoint`] (the
//! checkpointer thread), [`compact`] (the SQL of compaction, as reads and
//! writer jobs), [`admin`] (the read-only connection of admin reports). What the rows mean and every decision that does not
//! depend on SQLite are shared with PostgreSQL (see [`crate::store::core`]).

mod admin;
mod checkpoint;
mod compact;
mod reads;
mod writer;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use deltasync_protocol::UserId;
use deltasync_protocol::wire::Policies;
use rusqlite::Connection;
use rusqlite::types::ValueRef;
use tokio::sync::{mpsc, oneshot, watch};

pub use self::admin::SqliteAdminSource;
pub(crate) use self::admin::admin_source;
use self::checkpoint::{Checkpointer, WRITER_AUTOCHECKPOINT_PAGES, WriteFailure};
use self::reads::{ReadPool, read_collection_policies, read_conflicts, read_head, read_page, read_status};
use self::writer::{Job, writer_loop};
use super::core::compact::{CompactRules, run_pass};
use super::core::migrations::MigrationPlan;
use super::core::pending::fold_rows_from_env;
use super::notify::Notifier;
use super::page::PageLimit;
use super::rows::{self, ColumnValue, Columns, corrupt};
use super::schema::SQLITE_MIGRATIONS;
use super::{
    BootstrapStream, BoxFuture, Compacted, ConflictPage, DatasetStatus, DeviceTouch, Migrated, PageOutcome, PushBatch,
    PushOutcome, Store, StoreError, StoreFuture,
};

/// How many jobs one group commit takes at most.
const MAX_GROUP_JOBS: usize = 256;
/// How many changes one group commit takes at most (beyond the first job).
const MAX_GROUP_CHANGES: usize = 20_000;
/// How many reads (each on a blocking thread with its own connection) run at once.
const MAX_READERS: usize = 32;
/// How long a read waits for a free reader before answering 503.
const READER_WAIT: Duration = Duration::from_secs(5);

/// Maps a SQLite error to the store's kinds: a busy, locked, full or
/// unopenable database is [`StoreError::Unavailable`].
fn map_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked) => StoreError::Unavailable(e.to_string()),
        Some(CannotOpen | ReadOnly | DiskFull | PermissionDenied) => StoreError::Unavailable(e.to_string()),
        Some(DatabaseCorrupt | NotADatabase) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Internal(e.to_string()),
    }
}

impl Columns for rusqlite::Row<'_> {
    fn value(&self, i: usize) -> Result<ColumnValue<'_>, StoreError> {
        Ok(match self.get_ref(i).map_err(map_err)? {
            ValueRef::Null => ColumnValue::Null,
            ValueRef::Integer(v) => ColumnValue::Int(v),
            ValueRef::Text(v) => ColumnValue::Text(std::str::from_utf8(v).map_err(corrupt)?),
            ValueRef::Blob(v) => ColumnValue::Bytes(v),
            ValueRef::Real(v) => return Err(corrupt(format!("column {i} holds the real number {v}"))),
        })
    }
}

/// The SQLite store. See the module documentation.
pub struct SqliteStore {
    readers: Arc<ReadPool>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    notifier: Arc<Notifier>,
    failure: WriteFailure,
}

/// The size the WAL file is cut back to when the writer starts it over
/// after a checkpoint (`journal_size_limit`): without it the file stays as
/// large as it ever grew, which under a steady load of pushes and pulls was
/// five times the database itself.
const WAL_SIZE_LIMIT_BYTES: i64 = 16 * 1024 * 1024;

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, migrates it and
    /// starts the writer, which folds pending rows every
    /// [`FOLD_ROWS`](super::core::pending::FOLD_ROWS) rows unless
    /// [`FOLD_ROWS_VAR`](super::core::pending::FOLD_ROWS_VAR) says otherwise.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_folding_every(path, fold_rows_from_env().map_err(StoreError::InvalidSetting)?)
    }

    /// [`open`](Self::open), with the writer folding every `fold_rows` pending rows.
    pub fn open_folding_every(path: &Path, fold_rows: usize) -> Result<SqliteStore, StoreError> {
        let conn = open_wal(path)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(map_err)?;
        // Checkpoints run on their own thread (see `checkpoint`); the writer
        // only checkpoints itself if the WAL grows past about 80 MiB.
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES).map_err(map_err)?;
        // The WAL file keeps the size of its largest burst unless told
        // otherwise: when the writer starts it over, it is cut back to this.
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES).map_err(map_err)?;
        migrate(&conn)?;
        if auto_vacuum(&conn)? != AutoVacuum::Incremental {
            tracing::warn!(
                database = %path.display(),
                "this database was created without incremental auto-vacuum: the space compaction frees is reused \
                 but not returned to the file system; run `deltasync migrate` once, with the server stopped, to convert it"
            );
        }
        let failure = WriteFailure::default();
        let checkpoints = Checkpointer::start(path, failure.clone())?;
        let writer_failure = failure.clone();
        let notifier = Arc::new(Notifier::default());
        let (tx, rx) = mpsc::channel(1024);
        let writer_notifier = notifier.clone();
        let writer = std::thread::Builder::new()
            .name("deltasync-writer".into())
            .spawn(move || {
                writer_loop(conn, rx, &writer_notifier, &checkpoints, &writer_failure, fold_rows);
                checkpoints.finish();
            })
            .map_err(|e| StoreError::Internal(format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore {
            readers: Arc::new(ReadPool::new(path)),
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            notifier,
            failure,
        })
    }

    /// Applies missing migrations to the database at `path` (creating it if needed) and says which.
    pub fn migrate(path: &Path) -> Result<Migrated, StoreError> {
        migrate(&open_wal(path)?)
    }

    /// Turns on incremental auto-vacuum for a database created without it,
    /// so that compaction returns freed pages to the file system: one
    /// `VACUUM`, which rewrites the whole file (it needs free disk space of
    /// the database's size, and holds the write lock while it runs: run it
    /// with the server stopped). Answers whether it converted anything.
    pub fn enable_incremental_vacuum(path: &Path) -> Result<bool, StoreError> {
        let conn = open_wal(path)?;
        if auto_vacuum(&conn)? == AutoVacuum::Incremental {
            return Ok(false);
        }
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL").map_err(map_err)?;
        conn.execute_batch("VACUUM").map_err(map_err)?;
        if auto_vacuum(&conn)? != AutoVacuum::Incremental {
            return Err(StoreError::Internal("VACUUM did not turn on incremental auto-vacuum".into()));
        }
        Ok(true)
    }

    /// Queues a job for the writer and waits for its answer, which comes after commit.
    async fn submit<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Job,
    ) -> Result<T, StoreError> {
        let sender = self.jobs.lock().expect("jobs lock").clone().ok_or(StoreError::ShuttingDown)?;
        let (reply, answer) = oneshot::channel();
        sender.send(job(reply)).await.map_err(|_| StoreError::ShuttingDown)?;
        answer.await.map_err(|_| StoreError::Internal("the writer stopped before answering".into()))?
    }
}

/// Opens (creating if needed) the database at `path` in WAL mode, waiting up
/// to 5 s on locks. A new database gets incremental auto-vacuum first: it can
/// only be chosen before the file is first written (switching to WAL writes
/// it), or later by a `VACUUM`.
fn open_wal(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open SQLite database {}: {e}", path.display())))?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(map_err)?;
    let tables: i64 = conn.query_row("SELECT COUNT(*) FROM sqlite_schema", [], |r| r.get(0)).map_err(map_err)?;
    if tables == 0 {
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL").map_err(map_err)?;
    }
    conn.pragma_update(None, "journal_mode", "WAL").map_err(map_err)?;
    Ok(conn)
}

/// A database's `auto_vacuum` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AutoVacuum {
    /// Free pages stay in the file (the default of SQLite).
    None,
    /// Every commit truncates the file.
    Full,
    /// `PRAGMA incremental_vacuum` returns free pages when asked.
    Incremental,
}

fn auto_vacuum(conn: &Connection) -> Result<AutoVacuum, StoreError> {
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).map_err(map_err)?;
    Ok(match mode {
        1 => AutoVacuum::Full,
        2 => AutoVacuum::Incremental,
        _ => AutoVacuum::None,
    })
}

/// Applies the missing migrations, each in its own transaction.
fn migrate(conn: &Connection) -> Result<Migrated, StoreError> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)").map_err(map_err)?;
    let found: i64 =
        conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0)).map_err(map_err)?;
    let plan = MigrationPlan::new(found, SQLITE_MIGRATIONS)?;
    for step in plan.steps() {
        let tx = conn.unchecked_transaction().map_err(map_err)?;
        tx.execute_batch(step.sql).map_err(map_err)?;
        tx.execute("DELETE FROM schema_version", []).map_err(map_err)?;
        tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [step.version]).map_err(map_err)?;
        tx.commit().map_err(map_err)?;
        step.applied();
    }
    Ok(plan.migrated())
}

impl Store for SqliteStore {
    fn check_policies<'a>(&'a self, policies: &'a Policies) -> StoreFuture<'a, ()> {
        Box::pin(async move { rows::check_policies(self.readers.run(read_collection_policies).await?, policies) })
    }

    fn push(&self, batch: PushBatch, policies: Policies) -> StoreFuture<'_, PushOutcome> {
        Box::pin(self.submit(|reply| Job::Push { batch, policies, reply }))
    }

    fn changes_since<'a>(&'a self, user: &'a UserId, cursor: u64, limit: PageLimit) -> StoreFuture<'a, PageOutcome> {
        let user = user.clone();
        Box::pin(self.readers.run(move |conn| read_page(conn, &user, cursor, limit)))
    }

    fn touch_device(&self, touch: DeviceTouch) -> StoreFuture<'_, ()> {
        Box::pin(self.submit(move |reply| Job::Touch { touch, reply }))
    }

    fn status<'a>(&'a self, user: &'a UserId) -> StoreFuture<'a, DatasetStatus> {
        let user = user.clone();
        Box::pin(self.readers.run(move |conn| read_status(conn, &user)))
    }

    fn user_for_identity<'a>(&'a self, issuer: &'a str, subject: &'a str, now: u64) -> StoreFuture<'a, UserId> {
        use super::core::users::{CREATE_USER, FIND_USER, new_user_id, user_id};
        fn find(conn: &Connection, issuer: &str, subject: &str) -> Result<Option<UserId>, StoreError> {
            use rusqlite::OptionalExtension;
            let found: Option<String> = conn
                .prepare_cached(FIND_USER)
                .and_then(|mut s| s.query_row(rusqlite::params![issuer, subject], |r| r.get(0)).optional())
                .map_err(map_err)?;
            found.as_deref().map(user_id).transpose()
        }
        Box::pin(async move {
            let (i, s) = (issuer.to_owned(), subject.to_owned());
            if let Some(user) = self.readers.run(move |conn| find(conn, &i, &s)).await? {
                return Ok(user);
            }
            let (i, s) = (issuer.to_owned(), subject.to_owned());
            self.maintain(move |conn| {
                conn.execute(CREATE_USER, rusqlite::params![new_user_id(), i, s, now as i64])
                    .map(|n| n as u64)
                    .map_err(map_err)
            })
            .await?;
            let (i, s) = (issuer.to_owned(), subject.to_owned());
            self.readers.run(move |conn| find(conn, &i, &s)).await?.ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "the user of issuer {issuer:?} and subject {subject:?} was made and is gone"
                ))
            })
        })
    }

    fn head<'a>(&'a self, user: &'a UserId) -> StoreFuture<'a, crate::batch::DatasetHead> {
        let user = user.clone();
        Box::pin(self.readers.run(move |conn| read_head(conn, &user)))
    }

    fn conflicts<'a>(&'a self, user: &'a UserId, since: u64, limit: u64) -> StoreFuture<'a, ConflictPage> {
        let user = user.clone();
        Box::pin(self.readers.run(move |conn| read_conflicts(conn, &user, since, limit)))
    }

    fn bootstrap<'a>(&'a self, user: &'a UserId, stall: Duration) -> StoreFuture<'a, BootstrapStream> {
        Box::pin(self.readers.bootstrap(user.clone(), stall))
    }

    fn subscribe(&self, user: &UserId) -> watch::Receiver<u64> {
        self.notifier.subscribe(user)
    }

    fn compact<'a>(&'a self, rules: &'a CompactRules) -> StoreFuture<'a, Compacted> {
        Box::pin(run_pass(self, rules))
    }

    fn health(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.readers.run(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(map_err)))
    }

    fn write_probe(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.submit(|reply| Job::Probe { reply }).await?;
            match self.failure.get() {
                Some(e) => Err(StoreError::Unavailable(e)),
                None => Ok(()),
            }
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            drop(self.jobs.lock().expect("jobs lock").take());
            let writer = self.writer.lock().expect("writer lock").take();
            if let Some(handle) = writer {
                let _ = tokio::task::spawn_blocking(move || handle.join()).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database at schema version 1 (as the version before compaction made
    /// it: no auto-vacuum), holding one logged change.
    fn version_1(path: &Path) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch(SQLITE_MIGRATIONS[0]).unwrap();
        conn.execute_batch(
            "CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);
             INSERT INTO changes (user_id, seq, change_id, device_id, collection, entity_id, op, data, hlc,
                                  base_version, server_time, state_hash, state_digest)
             VALUES ('u', 1, 'c1', 'd', 'notes', 'e', 'upsert', '{}', 'h', NULL, 1, zeroblob(32), zeroblob(32));",
        )
        .unwrap();
        conn
    }

    #[test]
    fn a_new_database_gets_incremental_auto_vacuum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        assert_eq!(SqliteStore::migrate(&path).unwrap(), Migrated { from: 0, to: SQLITE_MIGRATIONS.len() as i64 });
        assert_eq!(auto_vacuum(&open_wal(&path).unwrap()).unwrap(), AutoVacuum::Incremental);
        assert!(!SqliteStore::enable_incremental_vacuum(&path).unwrap(), "nothing to convert");
    }

    #[test]
    fn migration_2_gives_every_logged_change_a_receipt_and_drops_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        drop(version_1(&path));
        assert_eq!(SqliteStore::migrate(&path).unwrap(), Migrated { from: 1, to: SQLITE_MIGRATIONS.len() as i64 });
        let conn = open_wal(&path).unwrap();
        let seq: i64 = conn
            .query_row("SELECT seq FROM receipts WHERE user_id = 'u' AND change_id = 'c1'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seq, 1);
        let index: i64 = conn
            .query_row("SELECT COUNT(*) FROM sqlite_schema WHERE name = 'changes_by_change_id'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(index, 0);
        let dropped_to: i64 = conn.query_row("SELECT COUNT(dropped_to) FROM datasets", [], |r| r.get(0)).unwrap();
        assert_eq!(dropped_to, 0, "a new column, on no dataset yet");
    }

    /// A change as a client sends it.
    fn change(id: &str, entity: &str, data: serde_json::Value, ms: u64) -> deltasync_protocol::Change {
        let value = serde_json::json!({
            "change_id": id, "collection": "notes", "entity_id": entity, "op": "upsert", "data": data,
            "hlc": format!("{ms:013}-00000-dev"),
        });
        deltasync_protocol::Change::from_json(&value, &Default::default()).unwrap()
    }

    fn batch(user: &str, changes: Vec<deltasync_protocol::Change>) -> PushBatch {
        PushBatch {
            user: UserId::parse(user).unwrap(),
            device: deltasync_protocol::DeviceId::parse("dev").unwrap(),
            changes,
            now: 2_000_000_000_000,
            max_clock_drift_ms: 60_000,
            require_cursor: None,
        }
    }

    /// The answers (status and seq per change) and head of a push.
    async fn push(store: &SqliteStore, b: PushBatch) -> (Vec<(String, Option<u64>)>, u64) {
        match store.push(b, Policies::default()).await.unwrap() {
            PushOutcome::Committed { results, head } => {
                (results.into_iter().map(|r| (format!("{:?}", r.status), r.seq)).collect(), head.seq)
            }
            other => panic!("push not committed: {other:?}"),
        }
    }

    async fn bootstrap_text(store: &SqliteStore, user: &str) -> String {
        use futures_util::StreamExt;
        let stream = store.bootstrap(&UserId::parse(user).unwrap(), Duration::from_secs(5)).await.unwrap();
        let chunks: Vec<_> = stream.lines.map(|c| c.unwrap()).collect().await;
        String::from_utf8(chunks.concat()).unwrap()
    }

    fn count(path: &Path, table: &str) -> i64 {
        open_wal(path).unwrap().query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0)).unwrap()
    }

    /// Pushes that create, update and repeat changes over random-looking
    /// ids, for two users, in small batches.
    fn workload() -> Vec<PushBatch> {
        let mut pushes = Vec::new();
        let entity = |i: u64| format!("{:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for round in 0..6u64 {
            for user in ["alice", "bob"] {
                let mut changes = Vec::new();
                for i in 0..5u64 {
                    let e = entity((round * 3 + i) % 11);
                    let data = serde_json::json!({ format!("f{}", i % 3): round * 10 + i });
                    changes.push(change(&format!("{user}-{round}-{i}"), &e, data, 1_000_000 + round * 100 + i));
                }
                if round > 0 {
                    // A retry of a change pushed earlier (folded or pending by now).
                    changes.push(change(&format!("{user}-{}-1", round - 1), "ignored", serde_json::json!({}), 1));
                }
                pushes.push(batch(user, changes));
            }
        }
        pushes
    }

    #[tokio::test]
    async fn folding_changes_no_answer_and_no_bootstrap_line() {
        let dir = tempfile::tempdir().unwrap();
        let folding = SqliteStore::open_folding_every(&dir.path().join("folding.db"), 4).unwrap();
        let pending = SqliteStore::open_folding_every(&dir.path().join("pending.db"), 1_000_000).unwrap();
        for b in workload() {
            let again = PushBatch { changes: b.changes.clone(), user: b.user.clone(), ..batch("x", Vec::new()) };
            assert_eq!(push(&folding, b).await, push(&pending, again).await);
        }
        for user in ["alice", "bob"] {
            let lines = bootstrap_text(&folding, user).await;
            assert_eq!(lines, bootstrap_text(&pending, user).await);
            assert_eq!(lines.lines().filter(|l| l.starts_with("{\"entity\"")).count(), 11);
        }
        assert!(count(&dir.path().join("folding.db"), "entities") > 0, "the folding store folded");
        assert!(count(&dir.path().join("folding.db"), "pending_receipts") < 4);
        assert_eq!(count(&dir.path().join("pending.db"), "entities"), 0, "the other one never did");
        assert_eq!(count(&dir.path().join("pending.db"), "receipts"), 0);
    }

    #[tokio::test]
    async fn pending_rows_outlive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("restart.db");
        let store = SqliteStore::open_folding_every(&path, 1_000_000).unwrap();
        let (results, _) = push(&store, batch("u", vec![change("c1", "e1", serde_json::json!({"a": 1}), 1_000)])).await;
        assert_eq!(results, [("Applied".to_owned(), Some(1))]);
        let before = bootstrap_text(&store, "u").await;
        store.close().await;
        drop(store);

        let store = SqliteStore::open_folding_every(&path, 1_000_000).unwrap();
        assert_eq!(bootstrap_text(&store, "u").await, before);
        let retry = batch("u", vec![change("c1", "e1", serde_json::json!({"a": 1}), 1_000)]);
        assert_eq!(push(&store, retry).await.0, [("Duplicate".to_owned(), Some(1))]);
        // The field merge starts from the pending state, not from nothing.
        push(&store, batch("u", vec![change("c2", "e1", serde_json::json!({"b": 2}), 2_000)])).await;
        let lines = bootstrap_text(&store, "u").await;
        assert!(lines.contains(r#""data":{"a":1,"b":2}"#), "{lines}");
    }

    #[tokio::test]
    async fn a_second_writer_on_the_same_file_sees_the_first_ones_pending_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.db");
        let first = SqliteStore::open_folding_every(&path, 1_000_000).unwrap();
        let second = SqliteStore::open_folding_every(&path, 1_000_000).unwrap();
        // Both build their index before the other writes.
        push(&first, batch("u", vec![change("c0", "e0", serde_json::json!({"x": 0}), 500)])).await;
        push(&second, batch("u", vec![change("c0", "e0", serde_json::json!({"x": 0}), 500)])).await;

        push(&first, batch("u", vec![change("c1", "e1", serde_json::json!({"a": 1}), 1_000)])).await;
        let retry = batch("u", vec![change("c1", "e1", serde_json::json!({"a": 1}), 1_000)]);
        assert_eq!(push(&second, retry).await.0, [("Duplicate".to_owned(), Some(2))]);
        push(&second, batch("u", vec![change("c2", "e1", serde_json::json!({"b": 2}), 2_000)])).await;
        let lines = bootstrap_text(&first, "u").await;
        assert!(lines.contains(r#""data":{"a":1,"b":2}"#), "{lines}");
    }

    #[test]
    fn an_old_database_is_converted_to_incremental_vacuum_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        drop(version_1(&path));
        SqliteStore::migrate(&path).unwrap();
        assert_eq!(auto_vacuum(&open_wal(&path).unwrap()).unwrap(), AutoVacuum::None, "migrations alone keep the mode");
        assert!(SqliteStore::enable_incremental_vacuum(&path).unwrap());
        assert!(!SqliteStore::enable_incremental_vacuum(&path).unwrap());
        let conn = open_wal(&path).unwrap();
        assert_eq!(auto_vacuum(&conn).unwrap(), AutoVacuum::Incremental);
        let kept: i64 = conn.query_row("SELECT COUNT(*) FROM changes", [], |r| r.get(0)).unwrap();
        assert_eq!(kept, 1);
    }
}
