//! Turning stored rows into protocol values and back, the same for every store.
//!
//! Each store reads columns its own way; what the columns mean, how entity
//! state is encoded, and how a bootstrap line is written live here once, so
//! that SQLite and PostgreSQL answer byte for byte alike.

use deltasync_protocol::change::{WireParts, write_wire_json};
use deltasync_protocol::json;
use deltasync_protocol::merge::ConflictReason;
use deltasync_protocol::wire::{ConflictRecord, Policies};
use deltasync_protocol::{EntityState, Meta, Op, StateDigest, StateHash};

use super::StoreError;
use crate::batch::EntityKey;

/// A [`StoreError::Corrupt`] saying what is wrong.
pub fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// The chain head and digest stored in `table`, checked to be 32 bytes each.
pub fn hashes(hash: &[u8], digest: &[u8], table: &str) -> Result<(StateHash, StateDigest), StoreError> {
    Ok((
        StateHash::from_slice(hash).ok_or_else(|| corrupt(format!("{table}.state_hash is not 32 bytes")))?,
        StateDigest::from_slice(digest).ok_or_else(|| corrupt(format!("{table}.state_digest is not 32 bytes")))?,
    ))
}

/// The chain head and digest at `seq` when they need no lookup: at the
/// dataset's head, or at 0 (the empty log).
pub fn hashes_without_lookup(seq: u64, head: &crate::batch::DatasetHead) -> Option<(StateHash, StateDigest)> {
    if seq == head.seq {
        Some((head.state_hash, head.state_digest))
    } else if seq == 0 {
        Some((StateHash::ZERO, StateDigest::ZERO))
    } else {
        None
    }
}

/// An entity as stored: its data and meta as JSON text.
pub struct EncodedEntity {
    /// The data object, canonical JSON.
    pub data: String,
    /// The merge metadata, JSON.
    pub meta: String,
}

/// Encodes an entity's data and meta for storage.
pub fn encode_entity(e: &EntityState) -> Result<EncodedEntity, StoreError> {
    let mut data = Vec::with_capacity(64);
    json::write_object(&mut data, &e.data);
    let meta = serde_json::to_string(&e.meta).map_err(|e| StoreError::Internal(e.to_string()))?;
    Ok(EncodedEntity { data: String::from_utf8(data).expect("JSON is UTF-8"), meta })
}

/// Decodes a stored entity row.
pub fn decode_entity(
    key: &EntityKey,
    data: &str,
    version: i64,
    deleted: bool,
    meta: &str,
) -> Result<EntityState, StoreError> {
    let data = serde_json::from_str(data).map_err(|e| corrupt(format!("entity data: {e}")))?;
    let meta: Meta = serde_json::from_str(meta).map_err(|e| corrupt(format!("entity meta: {e}")))?;
    Ok(EntityState {
        collection: key.0.clone(),
        entity_id: key.1.clone(),
        data,
        version: version as u64,
        deleted,
        meta,
    })
}

/// Appends one bootstrap line for a stored entity; `data` and `meta` are the stored JSON texts.
pub fn write_entity_line(
    out: &mut Vec<u8>,
    collection: &str,
    entity_id: &str,
    data: &[u8],
    version: i64,
    deleted: bool,
    meta: &[u8],
) {
    out.extend_from_slice(b"{\"entity\":{\"collection\":");
    json::write_str(out, collection);
    out.extend_from_slice(b",\"entity_id\":");
    json::write_str(out, entity_id);
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data);
    out.extend_from_slice(b",\"version\":");
    out.extend_from_slice(version.to_string().as_bytes());
    out.extend_from_slice(if deleted { b",\"deleted\":true,\"meta\":" } else { b",\"deleted\":false,\"meta\":" });
    out.extend_from_slice(meta);
    out.extend_from_slice(b"}}\n");
}

/// Appends one bootstrap line for a logged append.
pub fn write_append_line(out: &mut Vec<u8>, parts: &WireParts<'_>) {
    out.extend_from_slice(b"{\"change\":");
    write_wire_json(out, parts);
    out.extend_from_slice(b"}\n");
}

/// A conflict record's columns, as stored.
pub struct ConflictRow {
    /// `id`
    pub id: i64,
    /// `change_id`
    pub change_id: String,
    /// `device_id`
    pub device_id: String,
    /// `collection`
    pub collection: String,
    /// `entity_id`
    pub entity_id: String,
    /// `op`
    pub op: String,
    /// `data` (JSON text)
    pub data: Option<String>,
    /// `hlc`
    pub hlc: String,
    /// `seq`
    pub seq: Option<i64>,
    /// `reason`
    pub reason: String,
    /// `fields` (JSON array text)
    pub fields: Option<String>,
    /// `current` (JSON text)
    pub current: Option<String>,
    /// `server_time`
    pub server_time: i64,
}

/// The columns of a conflict record, in the order [`ConflictRow`] reads them.
pub const CONFLICT_COLUMNS: &str =
    "id, change_id, device_id, collection, entity_id, op, data, hlc, seq, reason, fields, current, server_time";

impl ConflictRow {
    /// Decodes the row into the record the API serves.
    pub fn decode(self) -> Result<ConflictRecord, StoreError> {
        let parse = |s: Option<String>| -> Result<Option<serde_json::Value>, StoreError> {
            s.map(|s| serde_json::from_str(&s)).transpose().map_err(|e| corrupt(format!("conflict record: {e}")))
        };
        let reason: ConflictReason = serde_json::from_value(serde_json::Value::String(self.reason.clone()))
            .map_err(|_| corrupt(format!("conflict reason {:?}", self.reason)))?;
        Ok(ConflictRecord {
            id: self.id as u64,
            op: Op::parse(&self.op).ok_or_else(|| corrupt(format!("conflict record op {:?}", self.op)))?,
            change_id: self.change_id,
            device_id: self.device_id,
            collection: self.collection,
            entity_id: self.entity_id,
            data: parse(self.data)?,
            hlc: self.hlc,
            seq: self.seq.map(|s| s as u64),
            reason,
            fields: self
                .fields
                .map(|f| serde_json::from_str(&f))
                .transpose()
                .map_err(|e| corrupt(format!("conflict fields: {e}")))?,
            current: parse(self.current)?,
            server_time: self.server_time as u64,
        })
    }
}

/// Checks the configured policies against the `(collection, policy)` pairs a store holds.
pub fn check_policies(stored: Vec<(String, String)>, policies: &Policies) -> Result<(), StoreError> {
    for (collection, policy) in stored {
        let configured = policies.of(&collection);
        if configured.as_str() != policy {
            return Err(StoreError::PolicyChanged { collection, stored: policy, configured: configured.to_string() });
        }
    }
    Ok(())
}
