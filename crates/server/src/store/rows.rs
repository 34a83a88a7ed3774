//! Turning stored rows into protocol values and back, the same for every store.
//!
//! Each store reads columns its own way; what the columns mean, how entity
//! state is encoded, and how a bootstrap line is written live here once, so
//! that SQLite and PostgreSQL answer byte for byte alike.

use deltasync_protocol::change::{WireParts, write_wire_json};
use deltasync_protocol::json;
use deltasync_protocol::wire::{DeviceStatus, Policies};
use deltasync_protocol::{EntityState, Meta, StateDigest, StateHash};

use super::StoreError;
use crate::batch::{DatasetHead, EntityKey};

/// A column's value, as a driver hands it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnValue<'r> {
    /// SQL `NULL`.
    Null,
    /// An integer.
    Int(i64),
    /// A boolean (SQLite stores booleans as integers).
    Bool(bool),
    /// Text.
    Text(&'r str),
    /// Binary data.
    Bytes(&'r [u8]),
}

impl ColumnValue<'_> {
    fn kind(&self) -> &'static str {
        match self {
            ColumnValue::Null => "NULL",
            ColumnValue::Int(_) => "an integer",
            ColumnValue::Bool(_) => "a boolean",
            ColumnValue::Text(_) => "text",
            ColumnValue::Bytes(_) => "binary data",
        }
    }
}

/// One row of a query result, read by column index. Each store says only
/// what value a column holds ([`value`](Self::value)); what the column must
/// hold, and what the row means, is decided here, once.
pub trait Columns {
    /// The value of column `i`.
    fn value(&self, i: usize) -> Result<ColumnValue<'_>, StoreError>;

    /// An integer column.
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        match self.value(i)? {
            ColumnValue::Int(v) => Ok(v),
            other => Err(unexpected(i, "an integer", &other)),
        }
    }

    /// A nullable integer column.
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.value(i)? {
            ColumnValue::Null => Ok(None),
            ColumnValue::Int(v) => Ok(Some(v)),
            other => Err(unexpected(i, "an integer or NULL", &other)),
        }
    }

    /// A boolean column (an integer, non-zero for true, where the database has no booleans).
    fn flag(&self, i: usize) -> Result<bool, StoreError> {
        match self.value(i)? {
            ColumnValue::Bool(v) => Ok(v),
            ColumnValue::Int(v) => Ok(v != 0),
            other => Err(unexpected(i, "a boolean", &other)),
        }
    }

    /// A text column.
    fn text(&self, i: usize) -> Result<&str, StoreError> {
        match self.value(i)? {
            ColumnValue::Text(v) => Ok(v),
            other => Err(unexpected(i, "text", &other)),
        }
    }

    /// A nullable text column.
    fn opt_text(&self, i: usize) -> Result<Option<&str>, StoreError> {
        match self.value(i)? {
            ColumnValue::Null => Ok(None),
            ColumnValue::Text(v) => Ok(Some(v)),
            other => Err(unexpected(i, "text or NULL", &other)),
        }
    }

    /// A binary column (text is taken as its bytes).
    fn bytes(&self, i: usize) -> Result<&[u8], StoreError> {
        match self.value(i)? {
            ColumnValue::Bytes(v) => Ok(v),
            ColumnValue::Text(v) => Ok(v.as_bytes()),
            other => Err(unexpected(i, "binary data", &other)),
        }
    }
}

/// A column that does not hold what the schema says it holds.
fn unexpected(i: usize, expected: &str, found: &ColumnValue<'_>) -> StoreError {
    corrupt(format!("column {i} holds {}, not {expected}", found.kind()))
}

/// The columns of a logged change, in the order [`wire_parts`] and [`change_hashes`] read them.
pub const CHANGE_COLUMNS: &str = "seq, change_id, device_id, collection, entity_id, op, data, hlc, base_version, server_time, state_hash, state_digest";

/// The columns of a dataset head, in the order [`dataset_head`] reads them.
pub const HEAD_COLUMNS: &str = "head, state_hash, state_digest, horizon, conflict_seq";

/// The columns of a device, in the order [`device_status`] reads them.
pub const DEVICE_COLUMNS: &str = "device_id, cursor, last_seen";

/// The columns of an entity's state, in the order [`entity_state`] reads them.
pub const ENTITY_STATE_COLUMNS: &str = "data, version, deleted, meta";

/// The columns of a bootstrap entity line, in the order [`write_entity_row`] reads them.
pub const ENTITY_LINE_COLUMNS: &str = "collection, entity_id, data, version, deleted, meta";

/// Reads a change row whose first ten columns are those of [`CHANGE_COLUMNS`]
/// (`seq, change_id, device_id, collection, entity_id, op, data, hlc, base_version, server_time`).
pub fn wire_parts(r: &impl Columns) -> Result<WireParts<'_>, StoreError> {
    Ok(WireParts {
        seq: r.int(0)? as u64,
        change_id: r.text(1)?,
        device_id: r.text(2)?,
        collection: r.text(3)?,
        entity_id: r.text(4)?,
        op: r.text(5)?,
        data_json: r.opt_text(6)?,
        hlc: r.text(7)?,
        base_version: r.opt_int(8)?.map(|v| v as u64),
        server_time: r.int(9)? as u64,
    })
}

/// The chain head and digest after a change, from a row of all [`CHANGE_COLUMNS`].
pub fn change_hashes(r: &impl Columns) -> Result<(StateHash, StateDigest), StoreError> {
    hashes(r.bytes(10)?, r.bytes(11)?, "changes")
}

/// A dataset head, from a row of [`HEAD_COLUMNS`].
pub fn dataset_head(r: &impl Columns) -> Result<DatasetHead, StoreError> {
    let (state_hash, state_digest) = hashes(r.bytes(1)?, r.bytes(2)?, "datasets")?;
    Ok(DatasetHead {
        seq: r.int(0)? as u64,
        state_hash,
        state_digest,
        horizon: r.int(3)? as u64,
        conflict_seq: r.int(4)? as u64,
    })
}

/// A device's status, from a row of [`DEVICE_COLUMNS`].
pub fn device_status(r: &impl Columns) -> Result<DeviceStatus, StoreError> {
    Ok(DeviceStatus { device_id: r.text(0)?.to_owned(), cursor: r.int(1)? as u64, last_seen: r.int(2)? as u64 })
}

/// The stored state of the entity `key`, from a row whose columns from `first` on are [`ENTITY_STATE_COLUMNS`].
pub fn entity_state(key: &EntityKey, r: &impl Columns, first: usize) -> Result<EntityState, StoreError> {
    decode_entity(key, r.text(first)?, r.int(first + 1)?, r.flag(first + 2)?, r.text(first + 3)?)
}

/// Appends the bootstrap line of an entity, from a row of [`ENTITY_LINE_COLUMNS`].
pub fn write_entity_row(out: &mut Vec<u8>, r: &impl Columns) -> Result<(), StoreError> {
    write_entity_line(out, r.text(0)?, r.text(1)?, r.text(2)?.as_bytes(), r.int(3)?, r.flag(4)?, r.text(5)?.as_bytes());
    Ok(())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    struct Row(Vec<ColumnValue<'static>>);

    impl Columns for Row {
        fn value(&self, i: usize) -> Result<ColumnValue<'_>, StoreError> {
            self.0.get(i).copied().ok_or_else(|| corrupt(format!("no column {i}")))
        }
    }

    #[test]
    fn columns_read_what_the_schema_says_they_hold() {
        let row = Row(vec![
            ColumnValue::Int(7),
            ColumnValue::Null,
            ColumnValue::Int(1),
            ColumnValue::Bool(false),
            ColumnValue::Text("t"),
            ColumnValue::Bytes(b"b"),
        ]);
        assert_eq!(row.int(0).unwrap(), 7);
        assert_eq!((row.opt_int(0).unwrap(), row.opt_int(1).unwrap()), (Some(7), None));
        assert!(row.flag(2).unwrap() && !row.flag(3).unwrap());
        assert_eq!((row.text(4).unwrap(), row.opt_text(1).unwrap()), ("t", None));
        assert_eq!((row.bytes(5).unwrap(), row.bytes(4).unwrap()), (&b"b"[..], &b"t"[..]));
    }

    #[test]
    fn a_column_holding_something_else_is_corrupt() {
        let row = Row(vec![ColumnValue::Null, ColumnValue::Text("7"), ColumnValue::Bytes(b"x")]);
        assert!(matches!(row.int(0), Err(StoreError::Corrupt(_))));
        assert!(matches!(row.int(1), Err(StoreError::Corrupt(_))));
        assert!(matches!(row.text(2), Err(StoreError::Corrupt(_))));
        assert!(matches!(row.flag(1), Err(StoreError::Corrupt(_))));
        assert!(matches!(row.text(0), Err(StoreError::Corrupt(_))));
    }
}
