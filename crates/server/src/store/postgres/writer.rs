//! Pushes: one transaction per push, under the dataset's row lock, written as pipelined statements.

use std::collections::HashMap;

use deltasync_protocol::wire::Policies;
use deltasync_protocol::{ChangeId, DeviceId, UserId};

use super::{PostgresStore, map_err};
use crate::batch::{EntityKey, PushPlan, Snapshot, batch_keys};
use crate::store::core::conflicts::encode_conflict;
use crate::store::core::push;
use crate::store::rows::{self, Columns, HEAD_COLUMNS};
use crate::store::{PushBatch, PushOutcome, StoreError};

impl PostgresStore {
    /// Applies a push in one transaction, under its dataset's row lock, and answers after commit.
    pub(super) async fn push_batch(&self, batch: PushBatch, policies: Policies) -> Result<PushOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(map_err)?;
        let user = batch.user.as_str();
        let zero = vec![0u8; 32];
        // Lock the dataset (creating it on the first push) and read its newest head.
        let lock = tx
            .prepare_cached(&format!(
                "INSERT INTO datasets (user_id, head, state_hash, state_digest) VALUES ($1, 0, $2, $2)
                 ON CONFLICT (user_id) DO UPDATE SET head = datasets.head
                 RETURNING {HEAD_COLUMNS}"
            ))
            .await
            .map_err(map_err)?;
        let head = rows::dataset_head(&tx.query_one(&lock, &[&user, &zero]).await.map_err(map_err)?)?;
        if let Some(reset) = push::reset_required(&batch, head) {
            tx.rollback().await.map_err(map_err)?;
            return Ok(reset);
        }
        let (ids, keys) = batch_keys(&batch.changes);
        // Each key is looked up through the receipts' primary key (a LATERAL lookup per
        // key, kept from being flattened into a join by its LIMIT), whatever
        // the planner believes about the table: with one large dataset and
        // statistics lagging behind its growth (or never gathered, with
        // autovacuum off), `= ANY(…)` or a join is planned as a scan of the
        // whole dataset.
        let known_stmt = tx
            .prepare_cached(
                "SELECT k.change_id, c.seq FROM unnest($2::text[]) AS k (change_id)
                 CROSS JOIN LATERAL (SELECT seq FROM receipts WHERE user_id = $1 AND change_id = k.change_id LIMIT 1) c",
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
            if let Some(id) = by_id.get(row.text(0)?) {
                snapshot.known.insert((*id).clone(), row.int(1)? as u64);
            }
        }
        let by_key: HashMap<(&str, &str), &EntityKey> =
            keys.iter().map(|k| ((k.0.as_str(), k.1.as_str()), k)).collect();
        for row in &entity_rows {
            let Some(key) = by_key.get(&(row.text(0)?, row.text(1)?)) else { continue };
            snapshot.entities.insert((*key).clone(), rows::entity_state(key, row, 2)?);
        }
        let plan = push::plan(&batch, &policies, snapshot);
        let moved = plan.head.seq != head.seq;
        write_plan(&tx, &batch.user, &batch.device, batch.now, &plan, moved.then_some(self.channel.as_str())).await?;
        let committing = std::time::Instant::now();
        let committed = tx.commit().await;
        crate::telemetry::commit_took(committing.elapsed());
        committed.map_err(map_err)?;
        if moved {
            self.notifier.publish(&batch.user, plan.head.seq);
        }
        Ok(push::committed(plan))
    }
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
    let c_encoded: Vec<_> = cf.iter().map(encode_conflict).collect();
    let c_datas: Vec<Option<&str>> = c_encoded.iter().map(|e| e.data.as_deref()).collect();
    let c_hlcs: Vec<&str> = cf.iter().map(|c| c.change.hlc.as_str()).collect();
    let c_seqs: Vec<Option<i64>> = cf.iter().map(|c| c.seq.map(|s| s as i64)).collect();
    let c_reasons: Vec<&str> = cf.iter().map(|c| c.conflict.reason.as_str()).collect();
    let c_fields: Vec<Option<&str>> = c_encoded.iter().map(|e| e.fields.as_deref()).collect();
    let c_currents: Vec<Option<&str>> = c_encoded.iter().map(|e| e.current.as_deref()).collect();
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
    let insert_receipts = tx
        .prepare_cached(
            "INSERT INTO receipts (user_id, change_id, seq) SELECT $1, * FROM unnest($2::text[], $3::bigint[])",
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
    let receipts = async {
        if log.is_empty() {
            return Ok(0);
        }
        tx.execute(&insert_receipts, &[&u, &change_ids, &seqs]).await
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
    tokio::try_join!(changes, receipts, entities, conflicts, policies, device_row, dataset_row, notified)
        .map_err(map_err)?;
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
pub(super) const TOUCH_DEVICE_ASYNC: &str = "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true))
     INSERT INTO devices (user_id, device_id, cursor, last_seen) SELECT $1, $2, $3, $4 FROM relaxed
     ON CONFLICT (user_id, device_id) DO UPDATE SET last_seen = GREATEST(devices.last_seen, excluded.last_seen),
         cursor = GREATEST(devices.cursor, excluded.cursor)";
