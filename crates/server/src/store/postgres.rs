//! The PostgreSQL store: for teams, and for several server instances behind
//! a load balancer sharing one database.
//!
//! # How several instances stay correct
//!
//! - **One writer per dataset at a time.** A push opens a transaction and
//!   first locks its dataset's row (`INSERT … ON CONFLICT DO UPDATE …
//!   RETURNING` takes the row lock and reads the newest committed head). Seqs
//!   are taken from that head, inside the committing transaction, so every
//!   dataset gets strictly increasing, gapless seqs and one hash chain,
//!   whichever instance a push reaches. Pushes for other users lock other
//!   rows and run in parallel; a push locks one dataset row and then one
//!   device row, and a cursor update locks only one device row, so no two
//!   transactions can wait on each other in a cycle.
//! - **Pulls never skip a change.** Because the dataset lock is held until
//!   commit, the commits of one dataset happen in seq order: once a head is
//!   visible, every change up to it is visible too. A page reads the head
//!   first and then only changes up to it.
//! - **Long polls wake across instances.** The pushing transaction sends
//!   `NOTIFY` on a channel named after the schema; PostgreSQL delivers it at
//!   commit to every instance, where one dedicated `LISTEN` connection wakes
//!   the local waiters. If that connection drops, it is re-opened with
//!   backoff and every waiter is woken once, in case a notification was lost.
//! - **Connection loss is transient.** Any failure to reach PostgreSQL maps
//!   to [`StoreError::Unavailable`] (HTTP 503); the pool drops broken
//!   connections and opens new ones when the database is back. A push is
//!   acknowledged only after `COMMIT` returned, and a push whose commit
//!   outcome is unknown is retried by clients under the same change ids,
//!   which the log answers as duplicates.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use deltasync_protocol::change::WireParts;
use deltasync_protocol::wire::{DeviceStatus, Policies};
use deltasync_protocol::{ChangeId, DeviceId, StateDigest, StateHash, UserId};
use futures_util::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::{AsyncMessage, IsolationLevel, NoTls, Row};

use super::chunks::ChunkSink;
use super::notify::Notifier;
use super::page::{PageAssembler, PageLimit, needs_reset, range_end};
use super::rows::{self, ConflictRow};
use super::schema::POSTGRES_MIGRATIONS;
use super::{
    BootstrapStream, BoxFuture, ConflictPage, DatasetHead, DatasetStatus, Migrated, PageOutcome, PushBatch,
    PushOutcome, Store, StoreError,
};
use crate::batch::{EntityKey, PushPlan, Rules, Snapshot, batch_keys, plan_push};

/// Connections each instance keeps at most.
const POOL_SIZE: usize = 16;
/// How long to wait for a connection (new or from the pool) before answering 503.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The advisory lock that serialises migrations of one database.
const MIGRATION_LOCK: i64 = 0x6465_6c74_6173_796e; // "deltasyn"
/// The longest channel name PostgreSQL keeps (NAMEDATALEN - 1).
const MAX_CHANNEL_BYTES: usize = 63;

/// Maps a PostgreSQL error to the store's kinds: anything that means "the
/// database cannot be reached right now" is [`StoreError::Unavailable`].
fn map_err(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let msg = format!("PostgreSQL said: {} (SQLSTATE {code})", db.message());
        // 08: connection exception; 53: insufficient resources; 57P: shutdown
        // or restart in progress; 40001/40P01: serialization failure or deadlock.
        return if code.starts_with("08") || code.starts_with("53") || code.starts_with("57P") || code.starts_with("40")
        {
            StoreError::Unavailable(msg)
        } else if code.starts_with("XX") {
            StoreError::Corrupt(msg)
        } else {
            StoreError::Internal(msg)
        };
    }
    let mut text = e.to_string();
    if let Some(cause) = std::error::Error::source(&e) {
        text = format!("{text}: {cause}");
    }
    if text.starts_with("error connecting") || text.starts_with("timeout waiting") {
        StoreError::Unavailable(format!("cannot connect to PostgreSQL ({text})"))
    } else if e.is_closed() || text.starts_with("error communicating") {
        StoreError::Unavailable(format!("lost the connection to PostgreSQL ({text})"))
    } else {
        StoreError::Internal(format!("PostgreSQL client error: {text}"))
    }
}

fn map_pool_err(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => map_err(e),
        PoolError::Timeout(_) => StoreError::Unavailable(format!(
            "no PostgreSQL connection could be had within {} s",
            CONNECT_TIMEOUT.as_secs()
        )),
        PoolError::Closed => StoreError::ShuttingDown,
        other => StoreError::Internal(format!("connection pool: {other}")),
    }
}

fn corrupt_column(e: tokio_postgres::Error) -> StoreError {
    rows::corrupt(format!("unexpected column value: {e}"))
}

/// Parses a `postgres://` URL, filling in deltasync's defaults.
fn parse_url(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
        StoreError::InvalidDatabaseUrl(format!(
            "{e}; expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?options=-csearch_path%3DSCHEMA]"
        ))
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("deltasync");
    }
    Ok(config)
}

/// Opens one connection outside the pool, driving it on its own task.
async fn connect_once(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, StoreError> {
    let (client, connection) = config.connect(NoTls).await.map_err(map_err)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// Applies the missing migrations in one transaction, under an advisory lock
/// so that instances starting together migrate once.
async fn migrate_on(client: &mut tokio_postgres::Client) -> Result<Migrated, StoreError> {
    let tx = client.transaction().await.map_err(map_err)?;
    tx.batch_execute("SET LOCAL client_min_messages = warning").await.map_err(map_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(map_err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)").await.map_err(map_err)?;
    let from: i64 =
        tx.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[]).await.map_err(map_err)?.get(0);
    let known = POSTGRES_MIGRATIONS.len() as i64;
    if from > known {
        return Err(StoreError::SchemaTooNew { found: from, known });
    }
    for (i, sql) in POSTGRES_MIGRATIONS.iter().enumerate().skip(from as usize) {
        let version = i as i64 + 1;
        tx.batch_execute(sql).await.map_err(map_err)?;
        tx.execute("DELETE FROM schema_version", &[]).await.map_err(map_err)?;
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&version]).await.map_err(map_err)?;
        tracing::info!(version, "applied schema migration");
    }
    tx.commit().await.map_err(map_err)?;
    Ok(Migrated { from, to: known })
}

/// The notification channel of the schema the connection works in: one per
/// deployment, so that deployments sharing a database never wake each other.
fn channel_name(schema: &str) -> String {
    let name = format!("deltasync_{schema}");
    if name.len() <= MAX_CHANNEL_BYTES {
        return name;
    }
    let digest = Sha256::digest(schema.as_bytes());
    format!("deltasync_{}", &hex::encode(digest)[..32])
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The PostgreSQL store. See the module documentation.
pub struct PostgresStore {
    pool: Pool,
    notifier: Arc<Notifier>,
    channel: String,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl PostgresStore {
    /// Connects to the database at `url`, applies missing migrations and
    /// starts listening for pushes made through other instances.
    pub async fn connect(url: &str) -> Result<PostgresStore, StoreError> {
        let config = parse_url(url)?;
        let mut client = connect_once(&config).await?;
        migrate_on(&mut client).await?;
        let schema: Option<String> = client.query_one("SELECT current_schema()", &[]).await.map_err(map_err)?.get(0);
        let schema = schema.ok_or_else(|| {
            StoreError::InvalidDatabaseUrl("the search_path names no existing schema; create it first".into())
        })?;
        drop(client);
        let channel = channel_name(&schema);
        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Internal(format!("cannot build the connection pool: {e}")))?;
        let notifier = Arc::new(Notifier::default());
        let listener = tokio::spawn(listen(config, channel.clone(), notifier.clone()));
        tracing::info!(%schema, %channel, "PostgreSQL store ready");
        Ok(PostgresStore { pool, notifier, channel, listener: Mutex::new(Some(listener)) })
    }

    /// Applies missing migrations to the database at `url` and says which.
    pub async fn migrate(url: &str) -> Result<Migrated, StoreError> {
        let mut client = connect_once(&parse_url(url)?).await?;
        migrate_on(&mut client).await
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(map_pool_err)
    }

    async fn push_batch(&self, batch: PushBatch, policies: Policies) -> Result<PushOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_err)?;
        let user = batch.user.as_str();
        let zero = vec![0u8; 32];
        // Lock the dataset (creating it on the first push) and read its newest head.
        let lock = tx
            .prepare_cached(
                "INSERT INTO datasets (user_id, head, state_hash, state_digest) VALUES ($1, 0, $2, $2)
                 ON CONFLICT (user_id) DO UPDATE SET head = datasets.head
                 RETURNING head, state_hash, state_digest, horizon, conflict_seq",
            )
            .await
            .map_err(map_err)?;
        let head = head_of(&tx.query_one(&lock, &[&user, &zero]).await.map_err(map_err)?)?;
        if let Some(cursor) = batch.require_cursor
            && (cursor < head.horizon || cursor > head.seq)
        {
            tx.rollback().await.map_err(map_err)?;
            return Ok(PushOutcome::ResetRequired { head });
        }
        let (ids, keys) = batch_keys(&batch.changes);
        // Each key is looked up through its unique index (a LATERAL lookup per
        // key, kept from being flattened into a join by its LIMIT), whatever
        // the planner believes about the table: with one large dataset and
        // statistics lagging behind its growth (or never gathered, with
        // autovacuum off), `= ANY(…)` or a join is planned as a scan of the
        // whole dataset.
        let known_stmt = tx
            .prepare_cached(
                "SELECT k.change_id, c.seq FROM unnest($2::text[]) AS k (change_id)
                 CROSS JOIN LATERAL (SELECT seq FROM changes WHERE user_id = $1 AND change_id = k.change_id LIMIT 1) c",
            )
            .await
            .map_err(map_err)?;
        let entity_stmt = tx
            .prepare_cached(
                "SELECT k.collection, k.entity_id, e.data, e.version, e.deleted, e.meta
                 FROM unnest($2::text[], $3::text[]) AS k (collection, entity_id)
                 CROSS JOIN LATERAL (SELECT data, version, deleted, meta FROM entities
                     WHERE user_id = $1 AND collection = k.collection AND entity_id = k.entity_id LIMIT 1) e",
            )
            .await
            .map_err(map_err)?;
        let id_strs: Vec<&str> = ids.iter().map(|id| id.as_str()).collect();
        let collections: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let entity_ids: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
        // Both reads go out together (pipelined on the connection).
        let (known_rows, entity_rows) =
            tokio::try_join!(async { tx.query(&known_stmt, &[&user, &id_strs]).await }, async {
                tx.query(&entity_stmt, &[&user, &collections, &entity_ids]).await
            },)
            .map_err(map_err)?;
        let mut snapshot = Snapshot { head, ..Snapshot::default() };
        let by_id: HashMap<&str, &ChangeId> = ids.iter().map(|id| (id.as_str(), id)).collect();
        for row in &known_rows {
            let id: &str = row.try_get(0).map_err(corrupt_column)?;
            let seq: i64 = row.try_get(1).map_err(corrupt_column)?;
            if let Some(id) = by_id.get(id) {
                snapshot.known.insert((*id).clone(), seq as u64);
            }
        }
        let by_key: HashMap<(&str, &str), &EntityKey> =
            keys.iter().map(|k| ((k.0.as_str(), k.1.as_str()), k)).collect();
        for row in &entity_rows {
            let collection: &str = row.try_get(0).map_err(corrupt_column)?;
            let entity_id: &str = row.try_get(1).map_err(corrupt_column)?;
            let Some(key) = by_key.get(&(collection, entity_id)) else { continue };
            let state = rows::decode_entity(
                key,
                row.try_get(2).map_err(corrupt_column)?,
                row.try_get(3).map_err(corrupt_column)?,
                row.try_get(4).map_err(corrupt_column)?,
                row.try_get(5).map_err(corrupt_column)?,
            )?;
            snapshot.entities.insert((*key).clone(), state);
        }
        let rules = Rules { now: batch.now, max_clock_drift_ms: batch.max_clock_drift_ms, policies: &policies };
        let plan = plan_push(snapshot, &batch.device, &batch.changes, rules);
        let moved = plan.head.seq != head.seq;
        write_plan(&tx, &batch.user, &batch.device, batch.now, &plan, moved.then_some(self.channel.as_str())).await?;
        tx.commit().await.map_err(map_err)?;
        if moved {
            self.notifier.publish(&batch.user, plan.head.seq);
        }
        Ok(PushOutcome::Committed { results: plan.results, head: plan.head })
    }
}

fn head_of(row: &Row) -> Result<DatasetHead, StoreError> {
    let (state_hash, state_digest) =
        rows::hashes(row.try_get(1).map_err(corrupt_column)?, row.try_get(2).map_err(corrupt_column)?, "datasets")?;
    Ok(DatasetHead {
        seq: row.try_get::<_, i64>(0).map_err(corrupt_column)? as u64,
        state_hash,
        state_digest,
        horizon: row.try_get::<_, i64>(3).map_err(corrupt_column)? as u64,
        conflict_seq: row.try_get::<_, i64>(4).map_err(corrupt_column)? as u64,
    })
}

/// Writes everything a plan decided, as pipelined statements of the open
/// transaction, and (when the head moved) queues the notification that
/// PostgreSQL delivers to every instance at commit.
async fn write_plan(
    tx: &deadpool_postgres::Transaction<'_>,
    user: &UserId,
    device: &DeviceId,
    now: u64,
    plan: &PushPlan,
    notify_channel: Option<&str>,
) -> Result<(), StoreError> {
    let u = user.as_str();
    let log = &plan.log;
    let seqs: Vec<i64> = log.iter().map(|e| e.change.seq as i64).collect();
    let change_ids: Vec<&str> = log.iter().map(|e| e.change.change.change_id.as_str()).collect();
    let devices: Vec<&str> = log.iter().map(|e| e.change.device_id.as_str()).collect();
    let collections: Vec<&str> = log.iter().map(|e| e.change.change.collection.as_str()).collect();
    let entity_ids: Vec<&str> = log.iter().map(|e| e.change.change.entity_id.as_str()).collect();
    let ops: Vec<&str> = log.iter().map(|e| e.change.change.op.as_str()).collect();
    let datas: Vec<Option<String>> = log.iter().map(|e| e.change.change.data_jcs()).collect();
    let hlcs: Vec<&str> = log.iter().map(|e| e.change.change.hlc.as_str()).collect();
    let bases: Vec<Option<i64>> = log.iter().map(|e| e.change.change.base_version.map(|v| v as i64)).collect();
    let times: Vec<i64> = log.iter().map(|e| e.change.server_time as i64).collect();
    let hashes: Vec<&[u8]> = log.iter().map(|e| &e.state_hash.0[..]).collect();
    let digests: Vec<&[u8]> = log.iter().map(|e| &e.state_digest.0[..]).collect();

    let encoded = plan.entities.iter().map(|(e, _)| rows::encode_entity(e)).collect::<Result<Vec<_>, _>>()?;
    let e_collections: Vec<&str> = plan.entities.iter().map(|(e, _)| e.collection.as_str()).collect();
    let e_ids: Vec<&str> = plan.entities.iter().map(|(e, _)| e.entity_id.as_str()).collect();
    let e_datas: Vec<&str> = encoded.iter().map(|e| e.data.as_str()).collect();
    let e_versions: Vec<i64> = plan.entities.iter().map(|(e, _)| e.version as i64).collect();
    let e_deleted: Vec<bool> = plan.entities.iter().map(|(e, _)| e.deleted).collect();
    let e_metas: Vec<&str> = encoded.iter().map(|e| e.meta.as_str()).collect();
    let e_hashes: Vec<Option<&[u8]>> = plan.entities.iter().map(|(_, h)| h.as_ref().map(|h| &h[..])).collect();

    let cf = &plan.conflicts;
    let c_ids: Vec<i64> = cf.iter().map(|c| c.id as i64).collect();
    let c_change_ids: Vec<&str> = cf.iter().map(|c| c.change.change_id.as_str()).collect();
    let c_devices: Vec<&str> = cf.iter().map(|c| c.device_id.as_str()).collect();
    let c_collections: Vec<&str> = cf.iter().map(|c| c.change.collection.as_str()).collect();
    let c_entity_ids: Vec<&str> = cf.iter().map(|c| c.change.entity_id.as_str()).collect();
    let c_ops: Vec<&str> = cf.iter().map(|c| c.change.op.as_str()).collect();
    let c_datas: Vec<Option<String>> = cf.iter().map(|c| c.change.data_jcs()).collect();
    let c_hlcs: Vec<&str> = cf.iter().map(|c| c.change.hlc.as_str()).collect();
    let c_seqs: Vec<Option<i64>> = cf.iter().map(|c| c.seq.map(|s| s as i64)).collect();
    let c_reasons: Vec<&str> = cf.iter().map(|c| c.conflict.reason.as_str()).collect();
    let c_fields: Vec<Option<String>> = cf
        .iter()
        .map(|c| c.conflict.fields.as_ref().map(|f| serde_json::to_string(f).expect("strings serialise")))
        .collect();
    let c_currents: Vec<Option<String>> =
        cf.iter().map(|c| c.conflict.current.as_ref().map(deltasync_protocol::json::to_jcs)).collect();
    let c_times: Vec<i64> = cf.iter().map(|c| c.server_time as i64).collect();

    let p_collections: Vec<&str> = plan.collections.iter().map(|(c, _)| c.as_str()).collect();
    let p_policies: Vec<&str> = plan.collections.iter().map(|(_, p)| p.as_str()).collect();

    let insert_changes = tx
        .prepare_cached(
            "INSERT INTO changes (user_id, seq, change_id, device_id, collection, entity_id, op, data, hlc,
                                  base_version, server_time, state_hash, state_digest)
             SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                                      $8::text[], $9::text[], $10::bigint[], $11::bigint[], $12::bytea[], $13::bytea[])",
        )
        .await
        .map_err(map_err)?;
    let upsert_entities = tx
        .prepare_cached(
            "INSERT INTO entities (user_id, collection, entity_id, data, version, deleted, meta, entity_hash)
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::bool[], $7::text[], $8::bytea[])
             ON CONFLICT (user_id, collection, entity_id) DO UPDATE SET data = excluded.data,
                 version = excluded.version, deleted = excluded.deleted, meta = excluded.meta,
                 entity_hash = excluded.entity_hash",
        )
        .await
        .map_err(map_err)?;
    let insert_conflicts = tx
        .prepare_cached(
            "INSERT INTO conflicts (user_id, id, change_id, device_id, collection, entity_id, op, data, hlc, seq,
                                    reason, fields, current, server_time)
             SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                                      $8::text[], $9::text[], $10::bigint[], $11::text[], $12::text[], $13::text[],
                                      $14::bigint[])",
        )
        .await
        .map_err(map_err)?;
    let insert_collections = tx
        .prepare_cached(
            "INSERT INTO collections (user_id, collection, policy) SELECT $1, * FROM unnest($2::text[], $3::text[])
             ON CONFLICT (user_id, collection) DO NOTHING",
        )
        .await
        .map_err(map_err)?;
    let touch = tx.prepare_cached(TOUCH_DEVICE).await.map_err(map_err)?;
    let update_head = tx
        .prepare_cached(
            "UPDATE datasets SET head = $2, state_hash = $3, state_digest = $4, conflict_seq = $5 WHERE user_id = $1",
        )
        .await
        .map_err(map_err)?;
    let notify = tx.prepare_cached("SELECT pg_notify($1, $2)").await.map_err(map_err)?;

    let h = &plan.head;
    let (head_seq, conflict_seq, cursor, now) = (h.seq as i64, h.conflict_seq as i64, 0i64, now as i64);
    let payload = format!("{} {}", h.seq, u);
    // Every statement is sent at once and answered in order; a failure aborts the transaction.
    let changes = async {
        if log.is_empty() {
            return Ok(0);
        }
        tx.execute(
            &insert_changes,
            &[
                &u,
                &seqs,
                &change_ids,
                &devices,
                &collections,
                &entity_ids,
                &ops,
                &datas,
                &hlcs,
                &bases,
                &times,
                &hashes,
                &digests,
            ],
        )
        .await
    };
    let entities = async {
        if plan.entities.is_empty() {
            return Ok(0);
        }
        tx.execute(
            &upsert_entities,
            &[&u, &e_collections, &e_ids, &e_datas, &e_versions, &e_deleted, &e_metas, &e_hashes],
        )
        .await
    };
    let conflicts = async {
        if cf.is_empty() {
            return Ok(0);
        }
        tx.execute(
            &insert_conflicts,
            &[
                &u,
                &c_ids,
                &c_change_ids,
                &c_devices,
                &c_collections,
                &c_entity_ids,
                &c_ops,
                &c_datas,
                &c_hlcs,
                &c_seqs,
                &c_reasons,
                &c_fields,
                &c_currents,
                &c_times,
            ],
        )
        .await
    };
    let policies = async {
        if p_collections.is_empty() {
            return Ok(0);
        }
        tx.execute(&insert_collections, &[&u, &p_collections, &p_policies]).await
    };
    let device_row = async { tx.execute(&touch, &[&u, &device.as_str(), &cursor, &now]).await };
    let dataset_row = async {
        tx.execute(&update_head, &[&u, &head_seq, &&h.state_hash.0[..], &&h.state_digest.0[..], &conflict_seq]).await
    };
    let notified = async {
        match notify_channel {
            Some(channel) => tx.execute(&notify, &[&channel, &payload]).await,
            None => Ok(0),
        }
    };
    tokio::try_join!(changes, entities, conflicts, policies, device_row, dataset_row, notified).map_err(map_err)?;
    Ok(())
}

/// Registers a device or raises its `last_seen` and cursor (never lowers them).
const TOUCH_DEVICE: &str = "INSERT INTO devices (user_id, device_id, cursor, last_seen) VALUES ($1, $2, $3, $4)
     ON CONFLICT (user_id, device_id) DO UPDATE SET last_seen = GREATEST(devices.last_seen, excluded.last_seen),
         cursor = GREATEST(devices.cursor, excluded.cursor)";

/// The same as [`TOUCH_DEVICE`], committed without waiting for the WAL flush:
/// a cursor lost to a crash only makes compaction keep more, so it is not
/// worth an fsync on every pull. (`set_config(…, true)` applies to the
/// statement's own transaction, and `synchronous_commit` is read at commit.)
const TOUCH_DEVICE_ASYNC: &str = "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true))
     INSERT INTO devices (user_id, device_id, cursor, last_seen) SELECT $1, $2, $3, $4 FROM relaxed
     ON CONFLICT (user_id, device_id) DO UPDATE SET last_seen = GREATEST(devices.last_seen, excluded.last_seen),
         cursor = GREATEST(devices.cursor, excluded.cursor)";

const READ_HEAD: &str = "SELECT head, state_hash, state_digest, horizon, conflict_seq FROM datasets WHERE user_id = $1";

async fn read_head(client: &impl GenericClient, user: &str) -> Result<DatasetHead, StoreError> {
    let stmt = client.prepare_cached(READ_HEAD).await.map_err(map_err)?;
    match client.query_opt(&stmt, &[&user]).await.map_err(map_err)? {
        Some(row) => head_of(&row),
        None => Ok(DatasetHead::default()),
    }
}

/// Reads a change row whose first ten columns are
/// `seq, change_id, device_id, collection, entity_id, op, data, hlc, base_version, server_time`.
fn wire_parts(r: &Row) -> Result<WireParts<'_>, StoreError> {
    Ok(WireParts {
        seq: r.try_get::<_, i64>(0).map_err(corrupt_column)? as u64,
        change_id: r.try_get(1).map_err(corrupt_column)?,
        device_id: r.try_get(2).map_err(corrupt_column)?,
        collection: r.try_get(3).map_err(corrupt_column)?,
        entity_id: r.try_get(4).map_err(corrupt_column)?,
        op: r.try_get(5).map_err(corrupt_column)?,
        data_json: r.try_get(6).map_err(corrupt_column)?,
        hlc: r.try_get(7).map_err(corrupt_column)?,
        base_version: r.try_get::<_, Option<i64>>(8).map_err(corrupt_column)?.map(|v| v as u64),
        server_time: r.try_get::<_, i64>(9).map_err(corrupt_column)? as u64,
    })
}

const CHANGE_COLUMNS: &str = "seq, change_id, device_id, collection, entity_id, op, data, hlc, base_version, server_time, state_hash, state_digest";

async fn read_page(
    client: &deadpool_postgres::Client,
    user: &UserId,
    cursor: u64,
    limit: PageLimit,
) -> Result<PageOutcome, StoreError> {
    // The head is read first: every change up to a visible head is visible
    // (commits of one dataset are serialised in seq order), so the page
    // below never has a hole, whatever other instances commit meanwhile.
    let head = read_head(client, user.as_str()).await?;
    if needs_reset(cursor, &head) {
        return Ok(PageOutcome::ResetRequired { head });
    }
    let (from, to) = (cursor, range_end(cursor, limit.rows, &head));
    if to == from {
        let hashes = hashes_at(client, user, from, &head).await?;
        return Ok(PageOutcome::Page(PageAssembler::new(from, to, limit.bytes).finish(user, &head, hashes)?));
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
        let mut reach = PageAssembler::new(from, to, limit.bytes);
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
    let found = client.query(&stmt, &[&user.as_str(), &(from as i64), &(last as i64)]).await.map_err(map_err)?;
    let mut end_row = None;
    for r in &found {
        let more = page.offer(user, &wire_parts(r)?)?;
        if page.end() == r.try_get::<_, i64>(0).map_err(corrupt_column)? as u64 {
            end_row = Some(r);
        }
        if !more {
            break;
        }
    }
    let hashes = match end_row {
        Some(r) => {
            rows::hashes(r.try_get(10).map_err(corrupt_column)?, r.try_get(11).map_err(corrupt_column)?, "changes")?
        }
        None => hashes_at(client, user, page.end(), &head).await?,
    };
    Ok(PageOutcome::Page(page.finish(user, &head, hashes)?))
}

/// The chain head and digest at `seq` (which must be within `horizon..=head`).
async fn hashes_at(
    client: &deadpool_postgres::Client,
    user: &UserId,
    seq: u64,
    head: &DatasetHead,
) -> Result<(StateHash, StateDigest), StoreError> {
    if let Some(known) = rows::hashes_without_lookup(seq, head) {
        return Ok(known);
    }
    let stmt = client
        .prepare_cached("SELECT state_hash, state_digest FROM changes WHERE user_id = $1 AND seq = $2")
        .await
        .map_err(map_err)?;
    let row = client.query_one(&stmt, &[&user.as_str(), &(seq as i64)]).await.map_err(map_err)?;
    rows::hashes(row.try_get(0).map_err(corrupt_column)?, row.try_get(1).map_err(corrupt_column)?, "changes")
}

/// Streams one consistent snapshot (a repeatable-read transaction): entities,
/// then appends, as NDJSON lines, read row by row through portals so that
/// memory holds one row and one chunk, whatever the rows' sizes.
/// Stops (ending the transaction and freeing the connection) as soon as the
/// sink says the reader is gone.
async fn stream_snapshot(
    pool: Pool,
    user: UserId,
    head_tx: oneshot::Sender<Result<DatasetHead, StoreError>>,
    sink: &mut ChunkSink,
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
    let u = user.as_str();
    let head = read_head(&tx, u).await?;
    if head_tx.send(Ok(head)).is_err() {
        return Ok(());
    }
    let entities = tx
        .prepare(
            "SELECT collection, entity_id, data, version, deleted, meta FROM entities WHERE user_id = $1
             ORDER BY collection, entity_id",
        )
        .await
        .map_err(map_err)?;
    let portal = tx.bind(&entities, &[&u]).await.map_err(map_err)?;
    let found = tx.query_portal_raw(&portal, 0).await.map_err(map_err)?;
    futures_util::pin_mut!(found);
    while let Some(r) = found.try_next().await.map_err(map_err)? {
        let data: &str = r.try_get(2).map_err(corrupt_column)?;
        let meta: &str = r.try_get(5).map_err(corrupt_column)?;
        rows::write_entity_line(
            sink.buf(),
            r.try_get(0).map_err(corrupt_column)?,
            r.try_get(1).map_err(corrupt_column)?,
            data.as_bytes(),
            r.try_get(3).map_err(corrupt_column)?,
            r.try_get(4).map_err(corrupt_column)?,
            meta.as_bytes(),
        );
        if !sink.flush_if_full().await {
            return Ok(());
        }
    }
    let appends = tx
        .prepare(&format!("SELECT {CHANGE_COLUMNS} FROM changes WHERE user_id = $1 AND op = 'append' ORDER BY seq"))
        .await
        .map_err(map_err)?;
    let portal = tx.bind(&appends, &[&u]).await.map_err(map_err)?;
    let found = tx.query_portal_raw(&portal, 0).await.map_err(map_err)?;
    futures_util::pin_mut!(found);
    while let Some(r) = found.try_next().await.map_err(map_err)? {
        rows::write_append_line(sink.buf(), &wire_parts(&r)?);
        if !sink.flush_if_full().await {
            return Ok(());
        }
    }
    if sink.finish().await {
        tx.commit().await.map_err(map_err)?;
    }
    Ok(())
}

/// Keeps one connection listening on `channel` and wakes local waiters for
/// every push another instance commits; re-opens the connection with backoff.
async fn listen(config: tokio_postgres::Config, channel: String, notifier: Arc<Notifier>) {
    let mut delay = Duration::from_millis(100);
    loop {
        match listen_once(&config, &channel, &notifier).await {
            Ok(()) => {
                tracing::warn!("the PostgreSQL notification connection closed; re-opening it");
                delay = Duration::from_millis(100);
            }
            Err(e) => tracing::warn!(error = %e, retry_in = ?delay, "cannot listen for pushes from other instances"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    channel: &str,
    notifier: &Notifier,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            let sent = match message? {
                AsyncMessage::Notification(n) => tx.send(n).is_ok(),
                AsyncMessage::Notice(n) => {
                    tracing::debug!(notice = %n, "PostgreSQL notice");
                    true
                }
                _ => true,
            };
            if !sent {
                break;
            }
        }
        Ok::<(), tokio_postgres::Error>(())
    });
    client.batch_execute(&format!("LISTEN {}", quote_ident(channel))).await?;
    // Pushes committed while nobody listened may have gone unnoticed.
    notifier.wake_all();
    while let Some(n) = rx.recv().await {
        let Some((head, user)) = n.payload().split_once(' ') else { continue };
        let (Ok(head), Ok(user)) = (head.parse::<u64>(), UserId::parse(user)) else { continue };
        notifier.publish(&user, head);
    }
    drop(client);
    match driver.await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

impl Store for PostgresStore {
    fn check_policies<'a>(&'a self, policies: &'a Policies) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let found =
                client.query("SELECT DISTINCT collection, policy FROM collections", &[]).await.map_err(map_err)?;
            let stored = found
                .iter()
                .map(|r| Ok((r.try_get(0).map_err(corrupt_column)?, r.try_get(1).map_err(corrupt_column)?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            rows::check_policies(stored, policies)
        })
    }

    fn push(&self, batch: PushBatch, policies: Policies) -> BoxFuture<'_, Result<PushOutcome, StoreError>> {
        Box::pin(self.push_batch(batch, policies))
    }

    fn changes_since<'a>(
        &'a self,
        user: &'a UserId,
        cursor: u64,
        limit: PageLimit,
    ) -> BoxFuture<'a, Result<PageOutcome, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            read_page(&client, user, cursor, limit).await
        })
    }

    fn touch_device<'a>(
        &'a self,
        user: &'a UserId,
        device: &'a DeviceId,
        cursor: Option<u64>,
        now: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let stmt = client.prepare_cached(TOUCH_DEVICE_ASYNC).await.map_err(map_err)?;
            let cursor = cursor.unwrap_or(0) as i64;
            client
                .execute(&stmt, &[&user.as_str(), &device.as_str(), &cursor, &(now as i64)])
                .await
                .map_err(map_err)?;
            Ok(())
        })
    }

    fn status<'a>(&'a self, user: &'a UserId) -> BoxFuture<'a, Result<DatasetStatus, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let head = read_head(&client, user.as_str()).await?;
            let stmt = client
                .prepare_cached(
                    "SELECT device_id, cursor, last_seen FROM devices WHERE user_id = $1 ORDER BY device_id",
                )
                .await
                .map_err(map_err)?;
            let devices = client
                .query(&stmt, &[&user.as_str()])
                .await
                .map_err(map_err)?
                .iter()
                .map(|r| {
                    Ok(DeviceStatus {
                        device_id: r.try_get(0).map_err(corrupt_column)?,
                        cursor: r.try_get::<_, i64>(1).map_err(corrupt_column)? as u64,
                        last_seen: r.try_get::<_, i64>(2).map_err(corrupt_column)? as u64,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(DatasetStatus { head, devices })
        })
    }

    fn conflicts<'a>(
        &'a self,
        user: &'a UserId,
        since: u64,
        limit: u64,
    ) -> BoxFuture<'a, Result<ConflictPage, StoreError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT {} FROM conflicts WHERE user_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                    rows::CONFLICT_COLUMNS
                ))
                .await
                .map_err(map_err)?;
            let found = client
                .query(&stmt, &[&user.as_str(), &(since as i64), &(limit.saturating_add(1) as i64)])
                .await
                .map_err(map_err)?;
            let mut records = Vec::with_capacity(found.len());
            for r in &found {
                let row = ConflictRow {
                    id: r.try_get(0).map_err(corrupt_column)?,
                    change_id: r.try_get(1).map_err(corrupt_column)?,
                    device_id: r.try_get(2).map_err(corrupt_column)?,
                    collection: r.try_get(3).map_err(corrupt_column)?,
                    entity_id: r.try_get(4).map_err(corrupt_column)?,
                    op: r.try_get(5).map_err(corrupt_column)?,
                    data: r.try_get(6).map_err(corrupt_column)?,
                    hlc: r.try_get(7).map_err(corrupt_column)?,
                    seq: r.try_get(8).map_err(corrupt_column)?,
                    reason: r.try_get(9).map_err(corrupt_column)?,
                    fields: r.try_get(10).map_err(corrupt_column)?,
                    current: r.try_get(11).map_err(corrupt_column)?,
                    server_time: r.try_get(12).map_err(corrupt_column)?,
                };
                records.push(row.decode()?);
            }
            let has_more = records.len() as u64 > limit;
            records.truncate(limit as usize);
            Ok(ConflictPage { records, has_more })
        })
    }

    fn bootstrap<'a>(
        &'a self,
        user: &'a UserId,
        stall: Duration,
    ) -> BoxFuture<'a, Result<BootstrapStream, StoreError>> {
        let user = user.clone();
        let pool = self.pool.clone();
        Box::pin(async move {
            let (head_tx, head_rx) = oneshot::channel();
            let (error_tx, error_rx) = oneshot::channel();
            let (mut sink, lines) = ChunkSink::new(stall);
            tokio::spawn(async move {
                if let Err(e) = stream_snapshot(pool, user, head_tx, &mut sink, stall).await {
                    tracing::error!(error = %e, "bootstrap stream failed");
                    if let Err(e) = error_tx.send(e) {
                        sink.fail(e).await;
                    }
                }
            });
            let head = match head_rx.await {
                Ok(head) => head?,
                // The task ended before reading the head: it sent its error.
                Err(_) => {
                    return Err(error_rx.await.unwrap_or_else(|_| {
                        StoreError::Internal("the bootstrap reader stopped before reading the head".into())
                    }));
                }
            };
            Ok(BootstrapStream { head, lines })
        })
    }

    fn subscribe(&self, user: &UserId) -> watch::Receiver<u64> {
        self.notifier.subscribe(user)
    }

    fn health(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.client().await?.simple_query("SELECT 1").await.map_err(map_err)?;
            Ok(())
        })
    }

    fn write_probe(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.client().await?.simple_query("UPDATE schema_version SET version = version").await.map_err(map_err)?;
            Ok(())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(listener) = self.listener.lock().expect("listener lock").take() {
                listener.abort();
            }
            self.pool.close();
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_fit_postgres_identifiers() {
        assert_eq!(channel_name("public"), "deltasync_public");
        let long = "s".repeat(80);
        let name = channel_name(&long);
        assert!(name.len() <= MAX_CHANNEL_BYTES, "{name}");
        assert_ne!(name, channel_name(&"t".repeat(80)));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn bad_urls_are_refused_with_the_expected_form() {
        let Err(StoreError::InvalidDatabaseUrl(msg)) = parse_url("postgres://host:notaport/db") else {
            panic!("a bad port was accepted");
        };
        assert!(msg.contains("postgres://USER"), "{msg}");
    }
}
