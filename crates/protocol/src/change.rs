//! Changes: as a client sends them (§3), validated, and as the server stores and serves them.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::hlc::{Hlc, HlcError};
use crate::ids::{ChangeId, Collection, DeviceId, EntityId, NameError};
use crate::json::{self, JsonError};

/// What a change does to its entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Writes the given top-level fields (a delta).
    Upsert,
    /// Deletes the entity (leaves a tombstone).
    Delete,
    /// An opaque value, logged and served but never merged into entity state.
    Append,
}

impl Op {
    /// The wire name of the operation.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Delete => "delete",
            Op::Append => "append",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Op> {
        match s {
            "upsert" => Some(Op::Upsert),
            "delete" => Some(Op::Delete),
            "append" => Some(Op::Append),
            _ => None,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a change was refused as malformed. All are the sender's fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// The change is not a JSON object.
    #[error("a change must be a JSON object")]
    NotObject,
    /// A required member is absent or null.
    #[error("member `{0}` is required")]
    Missing(&'static str),
    /// A member has the wrong JSON type.
    #[error("member `{field}` must be {expected}")]
    WrongType {
        /// The member.
        field: &'static str,
        /// What it must be, in words.
        expected: &'static str,
    },
    /// A name breaks its rule.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The HLC stamp is malformed.
    #[error(transparent)]
    Hlc(#[from] HlcError),
    /// `op` is not one of the three operations.
    #[error("op must be \"upsert\", \"delete\" or \"append\"; got {0:?}")]
    UnknownOp(String),
    /// An upsert whose `data` is not an object.
    #[error("an upsert's `data` must be a JSON object of the fields to write")]
    UpsertDataNotObject,
    /// A delete that carries data.
    #[error("a delete must not carry `data` (leave it out or send null)")]
    DeleteWithData,
    /// A number or string JCS cannot represent without loss.
    #[error("in `data`: {0}")]
    Json(#[from] JsonError),
    /// `data` is larger than the server allows (answered 413, not 400).
    #[error("`data` is {size} bytes in canonical form; max_data_bytes is {limit}")]
    DataTooLarge {
        /// The canonical size of the data.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// `data` nests deeper than the server allows (answered 413, not 400).
    #[error("`data` nests {depth} levels deep; max_depth is {limit}")]
    TooDeep {
        /// How deeply the data nests (see [`json::depth`]).
        depth: usize,
        /// The configured limit.
        limit: usize,
    },
}

impl ChangeError {
    /// True when the change broke a size limit (HTTP 413) rather than being malformed (HTTP 400).
    pub fn is_size_limit(&self) -> bool {
        matches!(self, ChangeError::DataTooLarge { .. } | ChangeError::TooDeep { .. })
    }
}

/// The bounds a change's `data` must keep (server configuration keys
/// `max_data_bytes` and `max_depth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeLimits {
    /// The largest canonical (JCS) size of `data`, in bytes.
    pub max_data_bytes: usize,
    /// The deepest nesting of `data` (see [`json::depth`]).
    pub max_depth: usize,
}

impl Default for ChangeLimits {
    /// The protocol's defaults: 256 KiB and 64 levels.
    fn default() -> Self {
        ChangeLimits { max_data_bytes: 262_144, max_depth: json::DEFAULT_MAX_DEPTH }
    }
}

/// A validated change as sent by a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The idempotency key, unique per dataset.
    pub change_id: ChangeId,
    /// The entity's collection.
    pub collection: Collection,
    /// The entity's id within its collection.
    pub entity_id: EntityId,
    /// What the change does.
    pub op: Op,
    /// For upsert, the fields to write (an object); for append, any value; for delete, none.
    #[serde(default)]
    pub data: Option<Value>,
    /// The change's clock stamp.
    pub hlc: Hlc,
    /// The entity version the device last saw (used by the `reject` policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u64>,
}

fn member<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn required_str<'a>(obj: &'a Map<String, Value>, name: &'static str) -> Result<&'a str, ChangeError> {
    match member(obj, name) {
        None => Err(ChangeError::Missing(name)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ChangeError::WrongType { field: name, expected: "a string" }),
    }
}

impl Change {
    /// Validates a change received as JSON; `limits` bound the size and depth of `data`.
    pub fn from_json(value: &Value, limits: &ChangeLimits) -> Result<Change, ChangeError> {
        let obj = value.as_object().ok_or(ChangeError::NotObject)?;
        let change_id = ChangeId::parse(required_str(obj, "change_id")?)?;
        let collection = Collection::parse(required_str(obj, "collection")?)?;
        let entity_id = EntityId::parse(required_str(obj, "entity_id")?)?;
        let op_name = required_str(obj, "op")?;
        let op = Op::parse(op_name).ok_or_else(|| ChangeError::UnknownOp(op_name.to_owned()))?;
        let hlc = Hlc::parse(required_str(obj, "hlc")?)?;
        let base_version = match member(obj, "base_version") {
            None => None,
            Some(Value::Number(n)) => Some(
                n.as_u64()
                    .filter(|v| *v <= 1 << 53)
                    .ok_or(ChangeError::WrongType { field: "base_version", expected: "a non-negative integer" })?,
            ),
            Some(_) => {
                return Err(ChangeError::WrongType { field: "base_version", expected: "a non-negative integer" });
            }
        };
        let data = member(obj, "data");
        Change::check_data(op, data, limits)?;
        Ok(Change { change_id, collection, entity_id, op, data: data.cloned(), hlc, base_version })
    }

    /// Checks a change's `data` as [`Change::from_json`] does: present, and
    /// an object, exactly for an upsert (any JSON for an append, none for a
    /// delete), within the limits' depth and canonical size, with no number
    /// or string JSON cannot carry. Returns its canonical (JCS) text.
    pub fn check_data(op: Op, data: Option<&Value>, limits: &ChangeLimits) -> Result<Option<String>, ChangeError> {
        match (op, data) {
            (Op::Upsert, None) => return Err(ChangeError::Missing("data")),
            (Op::Upsert, Some(d)) if !d.is_object() => return Err(ChangeError::UpsertDataNotObject),
            (Op::Delete, Some(_)) => return Err(ChangeError::DeleteWithData),
            _ => {}
        }
        let Some(d) = data else { return Ok(None) };
        let depth = json::depth(d);
        if depth > limits.max_depth {
            return Err(ChangeError::TooDeep { depth, limit: limits.max_depth });
        }
        json::check_value(d)?;
        let text = json::to_jcs(d);
        if text.len() > limits.max_data_bytes {
            return Err(ChangeError::DataTooLarge { size: text.len(), limit: limits.max_data_bytes });
        }
        Ok(Some(text))
    }

    /// The upsert's fields, or an empty map for other operations.
    pub fn fields(&self) -> Option<&Map<String, Value>> {
        self.data.as_ref().and_then(Value::as_object)
    }

    /// The canonical (JCS) text of `data`, or `None` when absent.
    pub fn data_jcs(&self) -> Option<String> {
        self.data.as_ref().map(json::to_jcs)
    }
}

/// A change as the server stores and serves it: the sent change plus `seq`,
/// the pushing `device_id` and the `server_time` it was accepted at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredChangeWire", into = "StoredChangeWire")]
pub struct StoredChange {
    /// The change's position in the dataset's log.
    pub seq: u64,
    /// The device that pushed the change.
    pub device_id: DeviceId,
    /// When the server accepted it, in ms since the Unix epoch.
    pub server_time: u64,
    /// The change as sent.
    pub change: Change,
}

/// The flat wire shape of [`StoredChange`] (serde's `flatten` cannot carry
/// `arbitrary_precision` numbers, so the members are spelled out).
#[derive(Serialize, Deserialize)]
struct StoredChangeWire {
    seq: u64,
    change_id: ChangeId,
    device_id: DeviceId,
    collection: Collection,
    entity_id: EntityId,
    op: Op,
    #[serde(default)]
    data: Option<Value>,
    hlc: Hlc,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_version: Option<u64>,
    server_time: u64,
}

impl From<StoredChangeWire> for StoredChange {
    fn from(w: StoredChangeWire) -> Self {
        StoredChange {
            seq: w.seq,
            device_id: w.device_id,
            server_time: w.server_time,
            change: Change {
                change_id: w.change_id,
                collection: w.collection,
                entity_id: w.entity_id,
                op: w.op,
                data: w.data,
                hlc: w.hlc,
                base_version: w.base_version,
            },
        }
    }
}

impl From<StoredChange> for StoredChangeWire {
    fn from(s: StoredChange) -> Self {
        let c = s.change;
        StoredChangeWire {
            seq: s.seq,
            change_id: c.change_id,
            device_id: s.device_id,
            collection: c.collection,
            entity_id: c.entity_id,
            op: c.op,
            data: c.data,
            hlc: c.hlc,
            base_version: c.base_version,
            server_time: s.server_time,
        }
    }
}

impl StoredChange {
    /// The stored change's wire JSON (§3), with `data` in canonical form.
    pub fn to_wire_json(&self) -> String {
        let c = &self.change;
        let data = c.data.as_ref().map(json::to_jcs);
        let mut out = Vec::with_capacity(256);
        write_wire_json(
            &mut out,
            &WireParts {
                seq: self.seq,
                change_id: c.change_id.as_str(),
                device_id: self.device_id.as_str(),
                collection: c.collection.as_str(),
                entity_id: c.entity_id.as_str(),
                op: c.op.as_str(),
                data_json: data.as_deref(),
                hlc: c.hlc.as_str(),
                base_version: c.base_version,
                server_time: self.server_time,
            },
        );
        String::from_utf8(out).expect("UTF-8")
    }
}

/// The members of a stored change, borrowed, with `data` as ready JSON text.
#[derive(Debug, Clone, Copy)]
pub struct WireParts<'a> {
    /// The change's seq.
    pub seq: u64,
    /// Its id.
    pub change_id: &'a str,
    /// The pushing device.
    pub device_id: &'a str,
    /// Its collection.
    pub collection: &'a str,
    /// Its entity.
    pub entity_id: &'a str,
    /// Its operation's wire name.
    pub op: &'a str,
    /// Its data as JSON text, or `None` for null.
    pub data_json: Option<&'a str>,
    /// Its HLC.
    pub hlc: &'a str,
    /// Its base version, if sent.
    pub base_version: Option<u64>,
    /// When the server accepted it.
    pub server_time: u64,
}

/// Appends a stored change's wire JSON, splicing `data` in as given (no re-parse).
pub fn write_wire_json(out: &mut Vec<u8>, p: &WireParts<'_>) {
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(p.seq.to_string().as_bytes());
    out.extend_from_slice(b",\"change_id\":");
    json::write_str(out, p.change_id);
    out.extend_from_slice(b",\"device_id\":");
    json::write_str(out, p.device_id);
    out.extend_from_slice(b",\"collection\":");
    json::write_str(out, p.collection);
    out.extend_from_slice(b",\"entity_id\":");
    json::write_str(out, p.entity_id);
    out.extend_from_slice(b",\"op\":");
    json::write_str(out, p.op);
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(p.data_json.unwrap_or("null").as_bytes());
    out.extend_from_slice(b",\"hlc\":");
    json::write_str(out, p.hlc);
    if let Some(b) = p.base_version {
        out.extend_from_slice(b",\"base_version\":");
        out.extend_from_slice(b.to_string().as_bytes());
    }
    out.extend_from_slice(b",\"server_time\":");
    out.extend_from_slice(p.server_time.to_string().as_bytes());
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn small() -> ChangeLimits {
        ChangeLimits { max_data_bytes: 1000, max_depth: 64 }
    }

    fn valid() -> Value {
        json!({"change_id": "c1", "collection": "tasks", "entity_id": "t1", "op": "upsert",
               "data": {"title": "Buy milk"}, "hlc": "1763800000000-00000-phone", "base_version": 3})
    }

    #[test]
    fn accepts_a_valid_change_and_ignores_unknown_members() {
        let mut v = valid();
        v["extra"] = json!(1);
        let c = Change::from_json(&v, &small()).unwrap();
        assert_eq!(c.base_version, Some(3));
        assert_eq!(c.op, Op::Upsert);
    }

    #[test]
    fn refuses_each_malformed_member() {
        let cases: Vec<(&str, Value)> = vec![
            ("change_id", Value::Null),
            ("change_id", json!(5)),
            ("collection", json!("bad name")),
            ("entity_id", json!("")),
            ("op", json!("merge")),
            ("hlc", json!("yesterday")),
            ("data", json!([1])),
            ("base_version", json!(-1)),
            ("base_version", json!(1.5)),
            ("data", json!({"n": serde_json::from_str::<Value>("9007199254740993").unwrap()})),
        ];
        for (field, bad) in cases {
            let mut v = valid();
            v[field] = bad.clone();
            assert!(Change::from_json(&v, &small()).is_err(), "{field} = {bad} should be refused");
        }
    }

    #[test]
    fn delete_must_not_carry_data_and_upsert_must() {
        let mut v = valid();
        v["op"] = json!("delete");
        assert_eq!(Change::from_json(&v, &small()), Err(ChangeError::DeleteWithData));
        v["data"] = Value::Null;
        assert!(Change::from_json(&v, &small()).is_ok());
        let mut u = valid();
        u.as_object_mut().unwrap().remove("data");
        assert_eq!(Change::from_json(&u, &small()), Err(ChangeError::Missing("data")));
    }

    #[test]
    fn data_size_is_measured_in_canonical_form() {
        let mut v = valid();
        v["data"] = json!({"s": "x".repeat(100)});
        let err = Change::from_json(&v, &ChangeLimits { max_data_bytes: 50, max_depth: 64 }).unwrap_err();
        assert!(err.is_size_limit());
    }

    #[test]
    fn data_depth_is_bounded() {
        let mut nested = json!(1);
        for _ in 0..5 {
            nested = json!([nested]);
        }
        let mut v = valid();
        v["data"] = json!({ "a": nested });
        assert_eq!(json::depth(&v["data"]), 6);
        let limits = |max_depth| ChangeLimits { max_data_bytes: 1000, max_depth };
        assert!(Change::from_json(&v, &limits(6)).is_ok());
        let err = Change::from_json(&v, &limits(5)).unwrap_err();
        assert_eq!(err, ChangeError::TooDeep { depth: 6, limit: 5 });
        assert!(err.is_size_limit());
        assert!(err.to_string().contains("max_depth is 5"), "{err}");
    }

    #[test]
    fn wire_json_round_trips() {
        let c = Change::from_json(&valid(), &small()).unwrap();
        let s = StoredChange { seq: 7, device_id: DeviceId::parse("phone").unwrap(), server_time: 99, change: c };
        let text = s.to_wire_json();
        let back: StoredChange = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
    }
}
