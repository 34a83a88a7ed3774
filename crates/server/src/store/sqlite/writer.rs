//! The writer thread: group commit of pushes, cursor updates, probes and
//! maintenance writes (the steps of compaction), the SQL that loads and
//! writes a push, and the fold of pending rows into their tables (see
//! [`crate::store::core::pending`]).

use std::collections::HashMap;

use deltasync_protocol::wire::Policies;
use deltasync_protocol::{ChangeId, DeviceId, EntityState, UserId};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::checkpoint::{Checkpointer, WriteFailure};
use super::reads::read_head;
use super::{MAX_GROUP_CHANGES, MAX_GROUP_JOBS, map_err};
use crate::batch::{EntityKey, PushPlan, Snapshot, batch_keys};
use crate::store::core::conflicts::encode_conflict;
use crate::store::core::pending::{Pending, StoredEntity};
use crate::store::core::push;
use crate::store::notify::Notifier;
use crate::store::rows::{self, ENTITY_STATE_COLUMNS};
use crate::store::{DeviceTouch, PushBatch, PushOutcome, StoreError};

/// A write for the writer thread, with where to send its answer.
pub(super) enum Job {
    /// A push.
    Push { batch: PushBatch, policies: Policies, reply: oneshot::Sender<Result<PushOutcome, StoreError>> },
    /// A device's `last_seen` and cursor.
    Touch { touch: DeviceTouch, reply: oneshot::Sender<Result<(), StoreError>> },
    /// A write that changes nothing, committed to learn whether writes work.
    Probe { reply: oneshot::Sender<Result<(), StoreError>> },
    /// A short maintenance write (a step of compaction), answering a count.
    Run { work: Maintenance, reply: oneshot::Sender<Result<u64, StoreError>> },
}

/// A maintenance write, run by the writer in its own savepoint of a group.
pub(super) type Maintenance = Box<dyn FnOnce(&Connection) -> Result<u64, StoreError> + Send>;

impl Job {
    fn weight(&self) -> usize {
        match self {
            Job::Push { batch, .. } => batch.changes.len().max(1),
            Job::Touch { .. } | Job::Probe { .. } | Job::Run { .. } => 1,
        }
    }
}

/// Takes the queued jobs in groups, each group one transaction, until the queue closes.
pub(super) fn writer_loop(
    conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    notifier: &Notifier,
    checkpoints: &Checkpointer,
    failure: &WriteFailure,
    fold_rows: usize,
) {
    let mut state = WriterState { fold_rows, ..WriterState::default() };
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
        match run_group(&conn, jobs, notifier, &mut state) {
            Ok(()) if pushes => failure.clear(),
            Ok(()) => {}
            Err(e) => failure.set(e),
        }
        if state.pending.should_fold(state.fold_rows)
            && let Err(e) = fold(&conn, &mut state)
        {
            failure.set(e);
        }
        checkpoints.committed();
    }
    tracing::debug!("writer stopped: every queued write is committed");
}

/// What the writer keeps between groups: the index of the pending rows, and
/// the `data_version` it mirrors (another connection's commit changes it).
#[derive(Default)]
struct WriterState {
    pending: Pending,
    /// `None` until the index is built, and after a rollback that it may not mirror.
    seen_version: Option<i64>,
    /// How many pending rows make a fold.
    fold_rows: usize,
}

impl WriterState {
    /// Rebuilds the index from the pending tables if they may have changed
    /// behind it: at the start, after a rollback, or after another
    /// connection's commit. Runs inside the write transaction.
    fn sync(&mut self, conn: &Connection) -> Result<(), StoreError> {
        let version: i64 = conn.query_row("PRAGMA data_version", [], |r| r.get(0)).map_err(map_err)?;
        if self.seen_version == Some(version) {
            return Ok(());
        }
        self.pending = load_pending(conn)?;
        self.seen_version = Some(version);
        if !self.pending.is_empty() {
            tracing::debug!(rows = self.pending.rows(), "pending entity states and receipts loaded");
        }
        Ok(())
    }
}

/// Reads the pending tables into an index, in the order they were written.
fn load_pending(conn: &Connection) -> Result<Pending, StoreError> {
    let mut pending = Pending::default();
    let mut stmt = conn
        .prepare("SELECT user_id, collection, entity_id, data, version, deleted, meta, entity_hash FROM pending_entities ORDER BY id")
        .map_err(map_err)?;
    let mut found = stmt.query([]).map_err(map_err)?;
    while let Some(r) = found.next().map_err(map_err)? {
        let user = UserId::parse(&r.get::<_, String>(0).map_err(map_err)?).map_err(rows::corrupt)?;
        let key = (
            deltasync_protocol::Collection::parse(&r.get::<_, String>(1).map_err(map_err)?).map_err(rows::corrupt)?,
            deltasync_protocol::EntityId::parse(&r.get::<_, String>(2).map_err(map_err)?).map_err(rows::corrupt)?,
        );
        let hash: Option<Vec<u8>> = r.get(7).map_err(map_err)?;
        let entity_hash = match hash {
            None => None,
            Some(h) => Some(
                <[u8; 32]>::try_from(h.as_slice())
                    .map_err(|_| rows::corrupt("pending_entities.entity_hash is not 32 bytes"))?,
            ),
        };
        let entity = StoredEntity {
            data: r.get(3).map_err(map_err)?,
            version: r.get::<_, i64>(4).map_err(map_err)? as u64,
            deleted: r.get(5).map_err(map_err)?,
            meta: r.get(6).map_err(map_err)?,
            entity_hash,
        };
        pending.add_entity(&user, key, entity);
    }
    let mut stmt = conn.prepare("SELECT user_id, change_id, seq FROM pending_receipts ORDER BY id").map_err(map_err)?;
    let mut found = stmt.query([]).map_err(map_err)?;
    while let Some(r) = found.next().map_err(map_err)? {
        let user = UserId::parse(&r.get::<_, String>(0).map_err(map_err)?).map_err(rows::corrupt)?;
        let id = ChangeId::parse(&r.get::<_, String>(1).map_err(map_err)?).map_err(rows::corrupt)?;
        pending.add_receipt(&user, id, r.get::<_, i64>(2).map_err(map_err)? as u64);
    }
    Ok(pending)
}

/// Writes every pending row into `entities` and `receipts` in key order and
/// empties the pending tables, in one transaction of its own. On failure
/// nothing changed: the rows stay pending and the next fold tries again.
fn fold(conn: &Connection, state: &mut WriterState) -> Result<(), String> {
    let started = std::time::Instant::now();
    conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| e.to_string())?;
    let folded = state.sync(conn).and_then(|()| write_fold(conn, &state.pending));
    let outcome = folded.map_err(|e| e.to_string()).and_then(|rows| {
        conn.execute_batch("COMMIT").map_err(|e| e.to_string())?;
        Ok(rows)
    });
    match outcome {
        Ok(rows) => {
            state.pending.clear();
            tracing::debug!(rows, ms = started.elapsed().as_millis() as u64, "pending rows folded");
            Ok(())
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            state.seen_version = None;
            tracing::error!(error = %e, "folding pending rows failed; they stay pending");
            Err(e)
        }
    }
}

/// The SQL of a fold; answers how many rows it moved.
fn write_fold(conn: &Connection, pending: &Pending) -> Result<usize, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT OR REPLACE INTO entities (user_id, collection, entity_id, data, version, deleted, meta, entity_hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .map_err(map_err)?;
    for (user, key, e) in pending.entities_in_key_order() {
        stmt.execute(params![
            user.as_str(),
            key.0.as_str(),
            key.1.as_str(),
            e.data,
            e.version as i64,
            e.deleted,
            e.meta,
            e.entity_hash.as_ref().map(|h| &h[..]),
        ])
        .map_err(map_err)?;
    }
    let mut stmt =
        conn.prepare_cached("INSERT INTO receipts (user_id, change_id, seq) VALUES (?1, ?2, ?3)").map_err(map_err)?;
    for (user, id, seq) in pending.receipts_in_key_order() {
        stmt.execute(params![user.as_str(), id.as_str(), seq as i64]).map_err(map_err)?;
    }
    conn.execute_batch("DELETE FROM pending_entities; DELETE FROM pending_receipts;").map_err(map_err)?;
    Ok(pending.rows())
}

/// A job that ran in the group, with its answer held until the commit.
enum Done {
    Push(oneshot::Sender<Result<PushOutcome, StoreError>>, Result<PushOutcome, StoreError>),
    Touch(oneshot::Sender<Result<(), StoreError>>, Result<(), StoreError>),
    Run(oneshot::Sender<Result<u64, StoreError>>, Result<u64, StoreError>),
}

/// Runs a group of jobs in one transaction; `Err` when the transaction itself failed.
fn run_group(conn: &Connection, jobs: Vec<Job>, notifier: &Notifier, state: &mut WriterState) -> Result<(), String> {
    // A group of cursor updates only is committed without an fsync: a cursor
    // lost to a power cut only makes compaction keep more. The next push's
    // FULL commit syncs the WAL, these frames included.
    let touches_only = jobs.iter().all(|j| matches!(j, Job::Touch { .. }));
    if touches_only {
        let _ = conn.execute_batch("PRAGMA synchronous = NORMAL");
    }
    let outcome = run_group_in_transaction(conn, jobs, notifier, state);
    if touches_only {
        let _ = conn.execute_batch("PRAGMA synchronous = FULL");
    }
    outcome
}

/// Runs every job in its own savepoint of one transaction, commits, then answers them all.
fn run_group_in_transaction(
    conn: &Connection,
    jobs: Vec<Job>,
    notifier: &Notifier,
    state: &mut WriterState,
) -> Result<(), String> {
    let mut done = Vec::with_capacity(jobs.len());
    let mut heads: HashMap<UserId, u64> = HashMap::new();
    let begun = conn.execute_batch("BEGIN IMMEDIATE").map_err(map_err).and_then(|()| {
        state.sync(conn).inspect_err(|_| {
            let _ = conn.execute_batch("ROLLBACK");
        })
    });
    if let Err(e) = begun {
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
                let out = savepoint.map_err(map_err).and_then(|_| apply_push(conn, &batch, &policies, &state.pending));
                finish_savepoint(conn, out.is_ok());
                let out = out.map(|(outcome, written)| {
                    written.record(&batch.user, &mut state.pending);
                    outcome
                });
                if let Ok(PushOutcome::Committed { head, .. }) = &out {
                    heads.insert(batch.user.clone(), head.seq);
                }
                done.push(Done::Push(reply, out));
            }
            Job::Touch { touch, reply } => {
                let out = savepoint.map_err(map_err).and_then(|_| touch_device(conn, &touch));
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
            Job::Run { work, reply } => {
                let out = savepoint.map_err(map_err).and_then(|_| work(conn));
                finish_savepoint(conn, out.is_ok());
                done.push(Done::Run(reply, out));
            }
        }
    }
    let committing = std::time::Instant::now();
    let committed = conn.execute_batch("COMMIT");
    crate::telemetry::commit_took(committing.elapsed());
    if let Err(e) = committed {
        tracing::error!(error = %e, "group commit failed; every write in it is refused");
        let _ = conn.execute_batch("ROLLBACK");
        // The index took the group's rows; the tables did not keep them.
        state.seen_version = None;
        let msg = e.to_string();
        for d in done {
            match d {
                Done::Push(reply, _) => drop(reply.send(Err(StoreError::Unavailable(msg.clone())))),
                Done::Touch(reply, _) => drop(reply.send(Err(StoreError::Unavailable(msg.clone())))),
                Done::Run(reply, _) => drop(reply.send(Err(StoreError::Unavailable(msg.clone())))),
            }
        }
        return Err(msg);
    }
    for d in done {
        match d {
            Done::Push(reply, out) => drop(reply.send(out)),
            Done::Touch(reply, out) => drop(reply.send(out)),
            Done::Run(reply, out) => drop(reply.send(out)),
        }
    }
    for (user, head) in heads {
        notifier.publish(&user, head);
    }
    Ok(())
}

/// Releases a job's savepoint, rolling back to it first when the job failed.
fn finish_savepoint(conn: &Connection, ok: bool) {
    let sql = if ok { "RELEASE job" } else { "ROLLBACK TO job; RELEASE job" };
    if let Err(e) = conn.execute_batch(sql) {
        tracing::error!(error = %e, "savepoint handling failed");
    }
}

/// Answers a job that never ran with an error.
fn fail_job(job: Job, err: impl Fn() -> StoreError) {
    match job {
        Job::Push { reply, .. } => drop(reply.send(Err(err()))),
        Job::Touch { reply, .. } | Job::Probe { reply } => drop(reply.send(Err(err()))),
        Job::Run { reply, .. } => drop(reply.send(Err(err()))),
    }
}

/// The stored state of the entity `key`, if it has one.
fn load_entity(conn: &Connection, user: &UserId, key: &EntityKey) -> Result<Option<EntityState>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {ENTITY_STATE_COLUMNS} FROM entities WHERE user_id = ?1 AND collection = ?2 AND entity_id = ?3"
        ))
        .map_err(map_err)?;
    let mut found = stmt.query(params![user.as_str(), key.0.as_str(), key.1.as_str()]).map_err(map_err)?;
    found.next().map_err(map_err)?.map(|r| rows::entity_state(key, r, 0)).transpose()
}

/// Loads what a push needs (pending rows first, then the folded tables),
/// plans it and writes the plan, inside the group's transaction. Answers
/// with the rows it made pending, for the index once the job's savepoint is released.
fn apply_push(
    conn: &Connection,
    batch: &PushBatch,
    policies: &Policies,
    pending: &Pending,
) -> Result<(PushOutcome, Written), StoreError> {
    let user = &batch.user;
    let head = read_head(conn, user)?;
    if let Some(reset) = push::reset_required(batch, head) {
        return Ok((reset, Written::default()));
    }
    let (ids, keys) = batch_keys(&batch.changes);
    let mut snapshot = Snapshot { head, ..Snapshot::default() };
    {
        let mut stmt =
            conn.prepare_cached("SELECT seq FROM receipts WHERE user_id = ?1 AND change_id = ?2").map_err(map_err)?;
        for id in ids {
            let seq = match pending.receipt(user, &id) {
                Some(seq) => Some(seq),
                None => stmt
                    .query_row(params![user.as_str(), id.as_str()], |r| r.get::<_, i64>(0))
                    .optional()
                    .map_err(map_err)?
                    .map(|seq| seq as u64),
            };
            if let Some(seq) = seq {
                snapshot.known.insert(id, seq);
            }
        }
    }
    for key in keys {
        let state = match pending.entity(user, &key) {
            Some(stored) => Some(stored.state(&key)?),
            None => load_entity(conn, user, &key)?,
        };
        if let Some(state) = state {
            snapshot.entities.insert(key, state);
        }
    }
    let plan = push::plan(batch, policies, snapshot);
    let written = write_plan(conn, user, &batch.device, batch.now, &plan)?;
    Ok((push::committed(plan), written))
}

/// The rows a push made pending, to add to the index once they are part of the transaction.
#[derive(Default)]
struct Written {
    receipts: Vec<(ChangeId, u64)>,
    entities: Vec<(EntityKey, StoredEntity)>,
}

impl Written {
    fn record(self, user: &UserId, pending: &mut Pending) {
        for (id, seq) in self.receipts {
            pending.add_receipt(user, id, seq);
        }
        for (key, entity) in self.entities {
            pending.add_entity(user, key, entity);
        }
    }
}

/// Writes everything a plan decided: log rows, pending receipts and entity
/// states, conflicts, collections, the device and the head.
fn write_plan(
    conn: &Connection,
    user: &UserId,
    device: &DeviceId,
    now: u64,
    plan: &PushPlan,
) -> Result<Written, StoreError> {
    let u = user.as_str();
    let mut written = Written::default();
    {
        let mut stmt = conn
            .prepare_cached(
                "INSERT INTO changes (user_id, seq, change_id, device_id, collection, entity_id, op, data, hlc, base_version, server_time, state_hash, state_digest)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )
            .map_err(map_err)?;
        let mut receipt = conn
            .prepare_cached("INSERT INTO pending_receipts (user_id, change_id, seq) VALUES (?1, ?2, ?3)")
            .map_err(map_err)?;
        for entry in &plan.log {
            let s = &entry.change;
            let c = &s.change;
            receipt.execute(params![u, c.change_id.as_str(), s.seq as i64]).map_err(map_err)?;
            written.receipts.push((c.change_id.clone(), s.seq));
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
                "INSERT INTO pending_entities (user_id, collection, entity_id, data, version, deleted, meta, entity_hash)
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
                hash.as_ref().map(|h| &h[..]),
            ])
            .map_err(map_err)?;
            let stored = StoredEntity {
                data: encoded.data,
                version: e.version,
                deleted: e.deleted,
                meta: encoded.meta,
                entity_hash: *hash,
            };
            written.entities.push(((e.collection.clone(), e.entity_id.clone()), stored));
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
            let encoded = encode_conflict(c);
            stmt.execute(params![
                u,
                c.id as i64,
                ch.change_id.as_str(),
                c.device_id.as_str(),
                ch.collection.as_str(),
                ch.entity_id.as_str(),
                ch.op.as_str(),
                encoded.data,
                ch.hlc.as_str(),
                c.seq.map(|s| s as i64),
                c.conflict.reason.as_str(),
                encoded.fields,
                encoded.current,
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
    touch_device(conn, &DeviceTouch::new(user, device, None, now))?;
    let h = &plan.head;
    conn.prepare_cached(
        "INSERT INTO datasets (user_id, head, state_hash, state_digest, horizon, conflict_seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (user_id) DO UPDATE SET head = excluded.head, state_hash = excluded.state_hash,
             state_digest = excluded.state_digest, conflict_seq = excluded.conflict_seq",
    )
    .map_err(map_err)?
    .execute(params![u, h.seq as i64, &h.state_hash.0[..], &h.state_digest.0[..], h.horizon as i64, h.conflict_seq as i64])
    .map_err(map_err)?;
    Ok(written)
}

/// Registers a device or raises its `last_seen` and cursor (never lowers them).
fn touch_device(conn: &Connection, touch: &DeviceTouch) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO devices (user_id, device_id, cursor, last_seen) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (user_id, device_id) DO UPDATE SET last_seen = MAX(last_seen, excluded.last_seen),
             cursor = MAX(cursor, excluded.cursor)",
    )
    .map_err(map_err)?
    .execute(params![touch.user.as_str(), touch.device.as_str(), touch.cursor.unwrap_or(0) as i64, touch.now as i64])
    .map_err(map_err)?;
    Ok(())
}
