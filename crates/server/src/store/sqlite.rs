//! The embedded SQLite store: one writer thread with group commit, a pool of
//! readers, WAL so that readers never block the writer.
//!
//! Every push is a job on a bounded channel. The writer takes all the jobs
//! that are waiting (up to a bound), runs each inside its own savepoint of
//! one transaction, commits once with `synchronous = FULL`, and only then
//! answers every job: an acknowledgement always means durable, and many
//! devices share one fsync. A checkpointer thread copies committed WAL frames
//! into the database file in the background, so the writer never pauses for it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use deltasync_protocol::change::WireParts;
use deltasync_protocol::json;
use deltasync_protocol::wire::{DeviceStatus, Policies};
use deltasync_protocol::{DeviceId, EntityState, StateDigest, StateHash, UserId};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::sync::{mpsc, oneshot, watch};

use super::chunks::ChunkSink;
use super::notify::Notifier;
use super::page::{PageAssembler, PageLimit, needs_reset, range_end};
use super::rows::{self, ConflictRow, corrupt};
use super::schema::SQLITE_MIGRATIONS as MIGRATIONS;
use super::{
    BootstrapStream, BoxFuture, ConflictPage, DatasetHead, DatasetStatus, Migrated, PageOutcome, PushBatch,
    PushOutcome, Store, StoreError,
};
use crate::batch::{EntityKey, PushPlan, Rules, Snapshot, batch_keys, plan_push};

/// How many jobs one group commit takes at most.
const MAX_GROUP_JOBS: usize = 256;
/// How many changes one group commit takes at most (beyond the first job).
const MAX_GROUP_CHANGES: usize = 20_000;
/// How many reads (each on a blocking thread with its own connection) run at once.
const MAX_READERS: usize = 32;
/// How long a read waits for a free reader before answering 503.
const READER_WAIT: Duration = Duration::from_secs(5);

fn map_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked) => StoreError::Unavailable(e.to_string()),
        Some(CannotOpen | ReadOnly | DiskFull | PermissionDenied) => StoreError::Unavailable(e.to_string()),
        Some(DatabaseCorrupt | NotADatabase) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Internal(e.to_string()),
    }
}

fn text<'r>(r: &'r rusqlite::Row<'_>, i: usize) -> Result<&'r str, StoreError> {
    r.get_ref(i).map_err(map_err)?.as_str().map_err(corrupt)
}

/// Reads a change row whose first ten columns are
/// `seq, change_id, device_id, collection, entity_id, op, data, hlc, base_version, server_time`.
fn wire_parts<'r>(r: &'r rusqlite::Row<'_>) -> Result<WireParts<'r>, StoreError> {
    Ok(WireParts {
        seq: r.get::<_, i64>(0).map_err(map_err)? as u64,
        change_id: text(r, 1)?,
        device_id: text(r, 2)?,
        collection: text(r, 3)?,
        entity_id: text(r, 4)?,
        op: text(r, 5)?,
        data_json: r.get_ref(6).map_err(map_err)?.as_str_or_null().map_err(corrupt)?,
        hlc: text(r, 7)?,
        base_version: r.get::<_, Option<i64>>(8).map_err(map_err)?.map(|v| v as u64),
        server_time: r.get::<_, i64>(9).map_err(map_err)? as u64,
    })
}

enum Job {
    Push {
        batch: PushBatch,
        policies: Policies,
        reply: oneshot::Sender<Result<PushOutcome, StoreError>>,
    },
    Touch {
        user: UserId,
        device: DeviceId,
        cursor: Option<u64>,
        now: u64,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// A write that changes nothing, committed to learn whether writes work.
    Probe {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl Job {
    fn weight(&self) -> usize {
        match self {
            Job::Push { batch, .. } => batch.changes.len().max(1),
            Job::Touch { .. } | Job::Probe { .. } => 1,
        }
    }
}

/// Read connections, opened on demand and kept for reuse, at most
/// [`MAX_READERS`] in use at once so that reads never take every blocking thread.
struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl ReadPool {
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

/// The SQLite store. See the module documentation.
pub struct SqliteStore {
    readers: Arc<ReadPool>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    notifier: Arc<Notifier>,
    failure: WriteFailure,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, migrates it and starts the writer.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = open_wal(path)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(map_err)?;
        // Checkpoints run on their own thread (see `checkpointer`); the writer
        // only checkpoints itself if the WAL grows past about 80 MiB.
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES).map_err(map_err)?;
        migrate(&conn)?;
        let failure = WriteFailure::default();
        let checkpoints = Checkpointer::start(path, failure.clone())?;
        let writer_failure = failure.clone();
        let notifier = Arc::new(Notifier::default());
        let (tx, rx) = mpsc::channel(1024);
        let writer_notifier = notifier.clone();
        let writer = std::thread::Builder::new()
            .name("deltasync-writer".into())
            .spawn(move || {
                writer_loop(conn, rx, &writer_notifier, &checkpoints, &writer_failure);
                checkpoints.finish();
            })
            .map_err(|e| StoreError::Internal(format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore {
            readers: Arc::new(ReadPool {
                path: path.to_owned(),
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(MAX_READERS)),
            }),
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            notifier,
            failure,
        })
    }

    fn sender(&self) -> Result<mpsc::Sender<Job>, StoreError> {
        self.jobs.lock().expect("jobs lock").clone().ok_or(StoreError::ShuttingDown)
    }

    /// Applies missing migrations to the database at `path` (creating it if needed) and says which.
    pub fn migrate(path: &Path) -> Result<Migrated, StoreError> {
        migrate(&open_wal(path)?)
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let pool = self.readers.clone();
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
}

/// Opens (creating if needed) the database at `path` in WAL mode, waiting up to 5 s on locks.
fn open_wal(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open SQLite database {}: {e}", path.display())))?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(map_err)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(map_err)?;
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<Migrated, StoreError> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)").map_err(map_err)?;
    let current: i64 =
        conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0)).map_err(map_err)?;
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(StoreError::SchemaTooNew { found: current, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i64 + 1;
        let tx = conn.unchecked_transaction().map_err(map_err)?;
        tx.execute_batch(sql).map_err(map_err)?;
        tx.execute("DELETE FROM schema_version", []).map_err(map_err)?;
        tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [version]).map_err(map_err)?;
        tx.commit().map_err(map_err)?;
        tracing::info!(version, "applied schema migration");
    }
    Ok(Migrated { from: current, to: known })
}

/// WAL pages past which the writer checkpoints by itself (a safety valve; the
/// checkpointer thread normally keeps the WAL far smaller).
const WRITER_AUTOCHECKPOINT_PAGES: i64 = 20_000;
/// How long the checkpointer lets commits accumulate before copying them.
const CHECKPOINT_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// Copies committed WAL frames into the database file on its own thread and
/// connection, so that the writer never stops to do it between commits. A
/// checkpoint moves data that is already durable in the WAL: acknowledgements
/// do not wait for it.
struct Checkpointer {
    wake: std::sync::mpsc::SyncSender<()>,
    thread: JoinHandle<()>,
}

/// Whether the disk takes writes, as the last real write said: set by a
/// group commit or checkpoint that failed, cleared by a commit of pushes or a
/// checkpoint that succeeded. A no-op commit (the health probe) can succeed
/// on a full disk, because its frame fits in WAL space already allocated, so
/// it neither sets nor clears this; the checkpoint that follows it does.
#[derive(Clone, Default)]
struct WriteFailure(Arc<Mutex<Option<String>>>);

impl WriteFailure {
    fn set(&self, error: String) {
        *self.0.lock().expect("write failure lock") = Some(error);
    }

    fn clear(&self) {
        *self.0.lock().expect("write failure lock") = None;
    }

    fn get(&self) -> Option<String> {
        self.0.lock().expect("write failure lock").clone()
    }
}

impl Checkpointer {
    fn start(path: &Path, failure: WriteFailure) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open SQLite database {}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(map_err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(map_err)?;
        let (wake, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("deltasync-checkpoint".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    std::thread::sleep(CHECKPOINT_DELAY);
                    while rx.try_recv().is_ok() {}
                    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        Ok(()) => failure.clear(),
                        Err(e) => {
                            tracing::warn!(error = %e, "WAL checkpoint failed; it will be retried after the next commit");
                            failure.set(format!("the WAL checkpoint failed: {e}"));
                        }
                    }
                }
                let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
            })
            .map_err(|e| StoreError::Internal(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Checkpointer { wake, thread })
    }

    /// Says that a commit added frames to the WAL.
    fn committed(&self) {
        let _ = self.wake.try_send(());
    }

    /// Runs a last checkpoint and stops the thread.
    fn finish(self) {
        drop(self.wake);
        let _ = self.thread.join();
    }
}

fn writer_loop(
    conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    notifier: &Notifier,
    checkpoints: &Checkpointer,
    failure: &WriteFailure,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut weight = first.weight();
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP_JOBS && weight < MAX_GROUP_CHANGES {
            match rx.try_recv() {
                Ok(job) => {
                    weight += job.weight();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let pushes = jobs.iter().any(|j| matches!(j, Job::Push { .. }));
        match run_group(&conn, jobs, notifier) {
            Ok(()) if pushes => failure.clear(),
            Ok(()) => {}
            Err(e) => failure.set(e),
        }
        checkpoints.committed();
    }
    tracing::debug!("writer stopped: every queued write is committed");
}

enum Done {
    Push(oneshot::Sender<Result<PushOutcome, StoreError>>, Result<PushOutcome, StoreError>),
    Touch(oneshot::Sender<Result<(), StoreError>>, Result<(), StoreError>),
}

/// Runs a group of jobs in one transaction; `Err` when the transaction itself failed.
fn run_group(conn: &Connection, jobs: Vec<Job>, notifier: &Notifier) -> Result<(), String> {
    // A group of cursor updates only is committed without an fsync: a cursor
    // lost to a power cut only makes compaction keep more. The next push's
    // FULL commit syncs the WAL, these frames included.
    let touches_only = jobs.iter().all(|j| matches!(j, Job::Touch { .. }));
    if touches_only {
        let _ = conn.execute_batch("PRAGMA synchronous = NORMAL");
    }
    let outcome = run_group_in_transaction(conn, jobs, notifier);
    if touches_only {
        let _ = conn.execute_batch("PRAGMA synchronous = FULL");
    }
    outcome
}

fn run_group_in_transaction(conn: &Connection, jobs: Vec<Job>, notifier: &Notifier) -> Result<(), String> {
    let mut done = Vec::with_capacity(jobs.len());
    let mut heads: HashMap<UserId, u64> = HashMap::new();
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let msg = e.to_string();
        for job in jobs {
            fail_job(job, || StoreError::Unavailable(msg.clone()));
        }
        return Err(msg);
    }
    for job in jobs {
        let savepoint = conn.execute_batch("SAVEPOINT job");
        match job {
            Job::Push { batch, policies, reply } => {
                let out = savepoint.map_err(map_err).and_then(|_| apply_push(conn, &batch, &policies));
                finish_savepoint(conn, out.is_ok());
                if let Ok(PushOutcome::Committed { head, .. }) = &out {
                    heads.insert(batch.user.clone(), head.seq);
                }
                done.push(Done::Push(reply, out));
            }
            Job::Touch { user, device, cursor, now, reply } => {
                let out = savepoint.map_err(map_err).and_then(|_| touch(conn, &user, &device, cursor, now));
                finish_savepoint(conn, out.is_ok());
                done.push(Done::Touch(reply, out));
            }
            Job::Probe { reply } => {
                let out = savepoint.map_err(map_err).and_then(|_| {
                    conn.execute("UPDATE schema_version SET version = version", []).map(drop).map_err(map_err)
                });
                finish_savepoint(conn, out.is_ok());
                done.push(Done::Touch(reply, out));
            }
        }
    }
    if let Err(e) = conn.execute_batch("COMMIT") {
        tracing::error!(error = %e, "group commit failed; every write in it is refused");
        let _ = conn.execute_batch("ROLLBACK");
        let msg = e.to_string();
        for d in done {
            match d {
                Done::Push(reply, _) => drop(reply.send(Err(StoreError::Unavailable(msg.clone())))),
                Done::Touch(reply, _) => drop(reply.send(Err(StoreError::Unavailable(msg.clone())))),
            }
        }
        return Err(msg);
    }
    for d in done {
        match d {
            Done::Push(reply, out) => drop(reply.send(out)),
            Done::Touch(reply, out) => drop(reply.send(out)),
        }
    }
    for (user, head) in heads {
        notifier.publish(&user, head);
    }
    Ok(())
}

fn finish_savepoint(conn: &Connection, ok: bool) {
    let sql = if ok { "RELEASE job" } else { "ROLLBACK TO job; RELEASE job" };
    if let Err(e) = conn.execute_batch(sql) {
        tracing::error!(error = %e, "savepoint handling failed");
    }
}

fn fail_job(job: Job, err: impl Fn() -> StoreError) {
    match job {
        Job::Push { reply, .. } => drop(reply.send(Err(err()))),
        Job::Touch { reply, .. } | Job::Probe { reply } => drop(reply.send(Err(err()))),
    }
}

fn read_head(conn: &Connection, user: &UserId) -> Result<DatasetHead, StoreError> {
    let row = conn
        .prepare_cached("SELECT head, state_hash, state_digest, horizon, conflict_seq FROM datasets WHERE user_id = ?1")
        .map_err(map_err)?
        .query_row([user.as_str()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .optional()
        .map_err(map_err)?;
    let Some((head, hash, digest, horizon, conflict_seq)) = row else {
        return Ok(DatasetHead::default());
    };
    let (state_hash, state_digest) = rows::hashes(&hash, &digest, "datasets")?;
    Ok(DatasetHead {
        seq: head as u64,
        state_hash,
        state_digest,
        horizon: horizon as u64,
        conflict_seq: conflict_seq as u64,
    })
}

fn load_entity(conn: &Connection, user: &UserId, key: &EntityKey) -> Result<Option<EntityState>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT data, version, deleted, meta FROM entities WHERE user_id = ?1 AND collection = ?2 AND entity_id = ?3",
        )
        .map_err(map_err)?;
    let row = stmt
        .query_row(params![user.as_str(), key.0.as_str(), key.1.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, bool>(2)?, r.get::<_, String>(3)?))
        })
        .optional()
        .map_err(map_err)?;
    let Some((data, version, deleted, meta)) = row else { return Ok(None) };
    rows::decode_entity(key, &data, version, deleted, &meta).map(Some)
}

fn apply_push(conn: &Connection, batch: &PushBatch, policies: &Policies) -> Result<PushOutcome, StoreError> {
    let user = &batch.user;
    let head = read_head(conn, user)?;
    if let Some(cursor) = batch.require_cursor
        && (cursor < head.horizon || cursor > head.seq)
    {
        return Ok(PushOutcome::ResetRequired { head });
    }
    let (ids, keys) = batch_keys(&batch.changes);
    let mut snapshot = Snapshot { head, ..Snapshot::default() };
    {
        let mut stmt =
            conn.prepare_cached("SELECT seq FROM changes WHERE user_id = ?1 AND change_id = ?2").map_err(map_err)?;
        for id in ids {
            if let Some(seq) = stmt
                .query_row(params![user.as_str(), id.as_str()], |r| r.get::<_, i64>(0))
                .optional()
                .map_err(map_err)?
            {
                snapshot.known.insert(id, seq as u64);
            }
        }
    }
    for key in keys {
        if let Some(state) = load_entity(conn, user, &key)? {
            snapshot.entities.insert(key, state);
        }
    }
    let rules = Rules { now: batch.now, max_clock_drift_ms: batch.max_clock_drift_ms, policies };
    let plan = plan_push(snapshot, &batch.device, &batch.changes, rules);
    write_plan(conn, user, &batch.device, batch.now, &plan)?;
    Ok(PushOutcome::Committed { results: plan.results, head: plan.head })
}

fn write_plan(
    conn: &Connection,
    user: &UserId,
    device: &DeviceId,
    now: u64,
    plan: &PushPlan,
) -> Result<(), StoreError> {
    let u = user.as_str();
    {
        let mut stmt = conn
            .prepare_cached(
                "INSERT INTO changes (user_id, seq, change_id, device_id, collection, entity_id, op, data, hlc, base_version, server_time, state_hash, state_digest)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )
            .map_err(map_err)?;
        for entry in &plan.log {
            let s = &entry.change;
            let c = &s.change;
            stmt.execute(params![
                u,
                s.seq as i64,
                c.change_id.as_str(),
                s.device_id.as_str(),
                c.collection.as_str(),
                c.entity_id.as_str(),
                c.op.as_str(),
                c.data_jcs(),
                c.hlc.as_str(),
                c.base_version.map(|v| v as i64),
                s.server_time as i64,
                &entry.state_hash.0[..],
                &entry.state_digest.0[..],
            ])
            .map_err(map_err)?;
        }
    }
    {
        let mut stmt = conn
            .prepare_cached(
                "INSERT OR REPLACE INTO entities (user_id, collection, entity_id, data, version, deleted, meta, entity_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(map_err)?;
        for (e, hash) in &plan.entities {
            let encoded = rows::encode_entity(e)?;
            stmt.execute(params![
                u,
                e.collection.as_str(),
                e.entity_id.as_str(),
                encoded.data,
                e.version as i64,
                e.deleted,
                encoded.meta,
                hash.map(|h| h.to_vec()),
            ])
            .map_err(map_err)?;
        }
    }
    if !plan.conflicts.is_empty() {
        let mut stmt = conn
            .prepare_cached(
                "INSERT INTO conflicts (user_id, id, change_id, device_id, collection, entity_id, op, data, hlc, seq, reason, fields, current, server_time)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )
            .map_err(map_err)?;
        for c in &plan.conflicts {
            let ch = &c.change;
            stmt.execute(params![
                u,
                c.id as i64,
                ch.change_id.as_str(),
                c.device_id.as_str(),
                ch.collection.as_str(),
                ch.entity_id.as_str(),
                ch.op.as_str(),
                ch.data_jcs(),
                ch.hlc.as_str(),
                c.seq.map(|s| s as i64),
                c.conflict.reason.as_str(),
                c.conflict.fields.as_ref().map(|f| serde_json::to_string(f).expect("strings serialise")),
                c.conflict.current.as_ref().map(json::to_jcs),
                c.server_time as i64,
            ])
            .map_err(map_err)?;
        }
    }
    {
        let mut stmt = conn
            .prepare_cached("INSERT OR IGNORE INTO collections (user_id, collection, policy) VALUES (?1, ?2, ?3)")
            .map_err(map_err)?;
        for (collection, policy) in &plan.collections {
            stmt.execute(params![u, collection, policy.as_str()]).map_err(map_err)?;
        }
    }
    touch(conn, user, device, None, now)?;
    let h = &plan.head;
    conn.prepare_cached(
        "INSERT INTO datasets (user_id, head, state_hash, state_digest, horizon, conflict_seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (user_id) DO UPDATE SET head = excluded.head, state_hash = excluded.state_hash,
             state_digest = excluded.state_digest, conflict_seq = excluded.conflict_seq",
    )
    .map_err(map_err)?
    .execute(params![u, h.seq as i64, &h.state_hash.0[..], &h.state_digest.0[..], h.horizon as i64, h.conflict_seq as i64])
    .map_err(map_err)?;
    Ok(())
}

fn touch(conn: &Connection, user: &UserId, device: &DeviceId, cursor: Option<u64>, now: u64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO devices (user_id, device_id, cursor, last_seen) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (user_id, device_id) DO UPDATE SET last_seen = MAX(last_seen, excluded.last_seen),
             cursor = MAX(cursor, excluded.cursor)",
    )
    .map_err(map_err)?
    .execute(params![user.as_str(), device.as_str(), cursor.unwrap_or(0) as i64, now as i64])
    .map_err(map_err)?;
    Ok(())
}

/// The chain head and digest at `seq` (which must be within `horizon..=head`).
fn hashes_at(
    conn: &Connection,
    user: &UserId,
    seq: u64,
    head: &DatasetHead,
) -> Result<(StateHash, StateDigest), StoreError> {
    if let Some(known) = rows::hashes_without_lookup(seq, head) {
        return Ok(known);
    }
    let (hash, digest) = conn
        .prepare_cached("SELECT state_hash, state_digest FROM changes WHERE user_id = ?1 AND seq = ?2")
        .map_err(map_err)?
        .query_row(params![user.as_str(), seq as i64], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?)))
        .map_err(map_err)?;
    rows::hashes(&hash, &digest, "changes")
}

fn read_page(conn: &mut Connection, user: &UserId, cursor: u64, limit: PageLimit) -> Result<PageOutcome, StoreError> {
    let tx = conn.transaction().map_err(map_err)?;
    let head = read_head(&tx, user)?;
    if needs_reset(cursor, &head) {
        return Ok(PageOutcome::ResetRequired { head });
    }
    let mut page = PageAssembler::new(cursor, range_end(cursor, limit.rows, &head), limit.bytes);
    let mut last_hashes = None;
    let (from, to) = page.range();
    if to > from {
        let mut stmt = tx
            .prepare_cached(
                "SELECT seq, change_id, device_id, collection, entity_id, op, data, hlc, base_version, server_time, state_hash, state_digest
                 FROM changes WHERE user_id = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq",
            )
            .map_err(map_err)?;
        let mut found = stmt.query(params![user.as_str(), from as i64, to as i64]).map_err(map_err)?;
        while let Some(r) = found.next().map_err(map_err)? {
            let before = page.end();
            let more = page.offer(user, &wire_parts(r)?)?;
            if page.end() != before {
                let hash: Vec<u8> = r.get(10).map_err(map_err)?;
                let digest: Vec<u8> = r.get(11).map_err(map_err)?;
                last_hashes = Some((hash, digest));
            }
            if !more {
                break;
            }
        }
    }
    let hashes = match last_hashes {
        Some((hash, digest)) => rows::hashes(&hash, &digest, "changes")?,
        None => hashes_at(&tx, user, page.end(), &head)?,
    };
    Ok(PageOutcome::Page(page.finish(user, &head, hashes)?))
}

fn read_status(conn: &mut Connection, user: &UserId) -> Result<DatasetStatus, StoreError> {
    let tx = conn.transaction().map_err(map_err)?;
    let head = read_head(&tx, user)?;
    let mut stmt = tx
        .prepare_cached("SELECT device_id, cursor, last_seen FROM devices WHERE user_id = ?1 ORDER BY device_id")
        .map_err(map_err)?;
    let devices = stmt
        .query_map([user.as_str()], |r| {
            Ok(DeviceStatus {
                device_id: r.get(0)?,
                cursor: r.get::<_, i64>(1)? as u64,
                last_seen: r.get::<_, i64>(2)? as u64,
            })
        })
        .map_err(map_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err)?;
    Ok(DatasetStatus { head, devices })
}

fn read_conflicts(conn: &mut Connection, user: &UserId, since: u64, limit: u64) -> Result<ConflictPage, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {} FROM conflicts WHERE user_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            rows::CONFLICT_COLUMNS
        ))
        .map_err(map_err)?;
    let found = stmt
        .query_map(params![user.as_str(), since as i64, (limit + 1) as i64], |r| {
            Ok(ConflictRow {
                id: r.get(0)?,
                change_id: r.get(1)?,
                device_id: r.get(2)?,
                collection: r.get(3)?,
                entity_id: r.get(4)?,
                op: r.get(5)?,
                data: r.get(6)?,
                hlc: r.get(7)?,
                seq: r.get(8)?,
                reason: r.get(9)?,
                fields: r.get(10)?,
                current: r.get(11)?,
                server_time: r.get(12)?,
            })
        })
        .map_err(map_err)?;
    let mut records = Vec::new();
    for row in found {
        records.push(row.map_err(map_err)?.decode()?);
    }
    let has_more = records.len() as u64 > limit;
    records.truncate(limit as usize);
    Ok(ConflictPage { records, has_more })
}

/// Streams one consistent snapshot: entities, then appends, as NDJSON lines.
/// Stops (releasing the snapshot) as soon as the sink says the reader is gone.
fn stream_snapshot(
    conn: &mut Connection,
    user: &UserId,
    head_tx: oneshot::Sender<Result<DatasetHead, StoreError>>,
    sink: &mut ChunkSink,
) -> Result<(), StoreError> {
    let tx = conn.transaction().map_err(map_err)?;
    let head = read_head(&tx, user)?;
    if head_tx.send(Ok(head)).is_err() {
        return Ok(());
    }
    {
        let mut stmt = tx
            .prepare(
                "SELECT collection, entity_id, data, version, deleted, meta FROM entities WHERE user_id = ?1
                 ORDER BY collection, entity_id",
            )
            .map_err(map_err)?;
        let mut found = stmt.query([user.as_str()]).map_err(map_err)?;
        while let Some(r) = found.next().map_err(map_err)? {
            rows::write_entity_line(
                sink.buf(),
                text(r, 0)?,
                text(r, 1)?,
                r.get_ref(2).map_err(map_err)?.as_bytes().map_err(corrupt)?,
                r.get(3).map_err(map_err)?,
                r.get(4).map_err(map_err)?,
                r.get_ref(5).map_err(map_err)?.as_bytes().map_err(corrupt)?,
            );
            if !sink.blocking_flush_if_full() {
                return Ok(());
            }
        }
    }
    {
        let mut stmt = tx
            .prepare(
                "SELECT seq, change_id, device_id, collection, entity_id, op, data, hlc, base_version, server_time
                 FROM changes WHERE user_id = ?1 AND op = 'append' ORDER BY seq",
            )
            .map_err(map_err)?;
        let mut found = stmt.query([user.as_str()]).map_err(map_err)?;
        while let Some(r) = found.next().map_err(map_err)? {
            rows::write_append_line(sink.buf(), &wire_parts(r)?);
            if !sink.blocking_flush_if_full() {
                return Ok(());
            }
        }
    }
    sink.blocking_finish();
    Ok(())
}

fn read_collection_policies(conn: &mut Connection) -> Result<Vec<(String, String)>, StoreError> {
    let mut stmt = conn.prepare("SELECT DISTINCT collection, policy FROM collections").map_err(map_err)?;
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(map_err)?.collect::<Result<Vec<_>, _>>().map_err(map_err)
}

impl Store for SqliteStore {
    fn check_policies<'a>(&'a self, policies: &'a Policies) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { rows::check_policies(self.read(read_collection_policies).await?, policies) })
    }

    fn push(&self, batch: PushBatch, policies: Policies) -> BoxFuture<'_, Result<PushOutcome, StoreError>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            self.sender()?.send(Job::Push { batch, policies, reply }).await.map_err(|_| StoreError::ShuttingDown)?;
            rx.await.map_err(|_| StoreError::Internal("the writer stopped before answering".into()))?
        })
    }

    fn changes_since<'a>(
        &'a self,
        user: &'a UserId,
        cursor: u64,
        limit: PageLimit,
    ) -> BoxFuture<'a, Result<PageOutcome, StoreError>> {
        let user = user.clone();
        Box::pin(self.read(move |conn| read_page(conn, &user, cursor, limit)))
    }

    fn touch_device<'a>(
        &'a self,
        user: &'a UserId,
        device: &'a DeviceId,
        cursor: Option<u64>,
        now: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            let job = Job::Touch { user: user.clone(), device: device.clone(), cursor, now, reply };
            self.sender()?.send(job).await.map_err(|_| StoreError::ShuttingDown)?;
            rx.await.map_err(|_| StoreError::Internal("the writer stopped before answering".into()))?
        })
    }

    fn status<'a>(&'a self, user: &'a UserId) -> BoxFuture<'a, Result<DatasetStatus, StoreError>> {
        let user = user.clone();
        Box::pin(self.read(move |conn| read_status(conn, &user)))
    }

    fn conflicts<'a>(
        &'a self,
        user: &'a UserId,
        since: u64,
        limit: u64,
    ) -> BoxFuture<'a, Result<ConflictPage, StoreError>> {
        let user = user.clone();
        Box::pin(self.read(move |conn| read_conflicts(conn, &user, since, limit)))
    }

    fn bootstrap<'a>(
        &'a self,
        user: &'a UserId,
        stall: Duration,
    ) -> BoxFuture<'a, Result<BootstrapStream, StoreError>> {
        let user = user.clone();
        let pool = self.readers.clone();
        Box::pin(async move {
            let permit = pool.permit().await?;
            let (head_tx, head_rx) = oneshot::channel();
            let (mut sink, lines) = ChunkSink::new(stall);
            tokio::task::spawn_blocking(move || {
                let mut conn = match pool.get() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = head_tx.send(Err(e));
                        return;
                    }
                };
                if let Err(e) = stream_snapshot(&mut conn, &user, head_tx, &mut sink) {
                    tracing::error!(error = %e, "bootstrap stream failed");
                    sink.blocking_fail(e);
                }
                pool.put(conn);
                drop(permit);
            });
            let head = head_rx.await.map_err(|_| StoreError::Internal("bootstrap reader stopped".into()))??;
            Ok(BootstrapStream { head, lines })
        })
    }

    fn subscribe(&self, user: &UserId) -> watch::Receiver<u64> {
        self.notifier.subscribe(user)
    }

    fn health(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(map_err)))
    }

    fn write_probe(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            self.sender()?.send(Job::Probe { reply }).await.map_err(|_| StoreError::ShuttingDown)?;
            rx.await.map_err(|_| StoreError::Internal("the writer stopped before answering".into()))??;
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
