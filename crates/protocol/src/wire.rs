//! Request and answer bodies of the HTTP endpoints (§6), for servers and clients alike.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chain::StateHash;
use crate::change::{Op, StoredChange};
use crate::digest::StateDigest;
use crate::merge::{Conflict, ConflictReason, EntityState, Policy};

/// The default `limit` of pull and sync.
pub const DEFAULT_PULL_LIMIT: u64 = 1000;
/// The largest `limit` of pull and sync; larger values are clamped.
pub const MAX_PULL_LIMIT: u64 = 10_000;
/// The largest `wait` of a pull, in seconds; larger values are clamped.
pub const MAX_WAIT_SECS: u64 = 60;
/// The default `limit` of `/v1/conflicts`.
pub const DEFAULT_CONFLICTS_LIMIT: u64 = 100;
/// The largest `limit` of `/v1/conflicts`.
pub const MAX_CONFLICTS_LIMIT: u64 = 1000;

/// `POST /v1/push` body. Changes stay raw JSON so that each can be validated with its index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushRequest {
    /// The pushing device.
    pub device_id: String,
    /// The changes, in order.
    pub changes: Vec<Value>,
}

/// The outcome of one pushed change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    /// Logged now, at `seq`.
    Applied,
    /// Already held: `seq` is the one it was first given.
    Duplicate,
    /// Refused (`version_mismatch` or `clock_skew`): not logged.
    Rejected,
}

/// One entry of `results`, in the order of the request's changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushResult {
    /// The change's id.
    pub change_id: String,
    /// What happened to it.
    pub status: ResultStatus,
    /// Its seq (applied and duplicate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// What lost or why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<Conflict>,
}

/// `POST /v1/push` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushResponse {
    /// One result per change, in request order.
    pub results: Vec<PushResult>,
    /// The dataset's head after the push.
    pub cursor: u64,
    /// The chain head at `cursor`.
    pub state_hash: StateHash,
    /// The state digest at `cursor`.
    pub state_digest: StateDigest,
    /// The server's clock, ms since the epoch.
    pub server_time: u64,
}

/// `GET /v1/pull` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullResponse {
    /// Changes with `seq > cursor`, in order.
    pub changes: Vec<StoredChange>,
    /// The seq of the last change returned, or the request's cursor.
    pub cursor: u64,
    /// Whether more changes follow.
    pub has_more: bool,
    /// The chain head at `cursor`.
    pub state_hash: StateHash,
    /// The state digest at `cursor`.
    pub state_digest: StateDigest,
    /// The server's clock.
    pub server_time: u64,
}

/// `POST /v1/sync` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncRequest {
    /// The syncing device.
    pub device_id: String,
    /// The device's cursor.
    #[serde(default)]
    pub cursor: Option<u64>,
    /// The changes to push.
    #[serde(default)]
    pub changes: Vec<Value>,
    /// The most seqs the answer may cover.
    #[serde(default)]
    pub limit: Option<u64>,
}

/// `POST /v1/sync` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// One result per pushed change.
    pub results: Vec<PushResult>,
    /// Changes after the request's cursor, less the ones this request pushed.
    pub changes: Vec<StoredChange>,
    /// The highest seq the answer covers, returned or left out.
    pub cursor: u64,
    /// Whether more changes follow.
    pub has_more: bool,
    /// The chain head at `cursor`.
    pub state_hash: StateHash,
    /// The state digest at `cursor`.
    pub state_digest: StateDigest,
    /// The server's clock.
    pub server_time: u64,
}

/// The merge policies in force: the default and the collections the configuration names.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Policies {
    /// The policy of collections the configuration does not name.
    pub default: Policy,
    /// The collections the configuration names, with their policies.
    pub collections: BTreeMap<String, Policy>,
}

impl Policies {
    /// The policy of `collection`.
    pub fn of(&self, collection: &str) -> Policy {
        self.collections.get(collection).copied().unwrap_or(self.default)
    }
}

/// A message of a live socket (`GET /v1/live`): the dataset's head, sent
/// when the socket opens and whenever the head moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveHead {
    /// The dataset's head seq.
    pub cursor: u64,
    /// The chain head at `cursor`.
    pub state_hash: StateHash,
    /// The state digest at `cursor`.
    pub state_digest: StateDigest,
}

/// The first line of a bootstrap stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootstrapHeader {
    /// The seq the snapshot stands at.
    pub cursor: u64,
    /// The chain head at `cursor`.
    pub state_hash: StateHash,
    /// The state digest at `cursor`.
    pub state_digest: StateDigest,
    /// The server's clock.
    pub server_time: u64,
    /// The policies in force.
    pub policies: Policies,
}

/// A line of a bootstrap stream after the header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootstrapLine {
    /// An entity that has state, deleted ones included.
    Entity(EntityState),
    /// A logged `append`, in seq order.
    Change(StoredChange),
}

/// The last line of a bootstrap stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapEnd {
    /// Always true.
    pub end: bool,
    /// The number of lines between the header and this one.
    pub count: u64,
}

/// A device as `/v1/status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// The device.
    pub device_id: String,
    /// The highest cursor it was given.
    pub cursor: u64,
    /// When it was last seen, ms since the epoch.
    pub last_seen: u64,
}

/// `GET /v1/status` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    /// The dataset's owner.
    pub user_id: String,
    /// The highest seq.
    pub head: u64,
    /// The chain head at `head`.
    pub state_hash: StateHash,
    /// The state digest at `head`.
    pub state_digest: StateDigest,
    /// The highest seq compacted away (0 when none).
    pub horizon: u64,
    /// The policies in force.
    pub policies: Policies,
    /// The dataset's devices.
    pub devices: Vec<DeviceStatus>,
    /// The server's clock.
    pub server_time: u64,
}

/// A conflict record, as `/v1/conflicts` serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictRecord {
    /// Increasing record id, the paging key.
    pub id: u64,
    /// The losing change's id.
    pub change_id: String,
    /// The device that sent it.
    pub device_id: String,
    /// Its collection.
    pub collection: String,
    /// Its entity.
    pub entity_id: String,
    /// Its operation.
    pub op: Op,
    /// Its data.
    #[serde(default)]
    pub data: Option<Value>,
    /// Its HLC.
    pub hlc: String,
    /// Its seq, when it was logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Why it lost.
    pub reason: ConflictReason,
    /// The fields that lost or survive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
    /// The entity right after the change was merged (or unchanged, for `version_mismatch`).
    #[serde(default)]
    pub current: Option<Value>,
    /// When the conflict happened.
    pub server_time: u64,
}

/// `GET /v1/conflicts` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictsResponse {
    /// Records oldest first.
    pub conflicts: Vec<ConflictRecord>,
    /// The id of the last record returned, to pass as `since`.
    pub cursor: u64,
    /// Whether more records follow.
    pub has_more: bool,
}

/// One offending change of a refused request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// The change's position in the request.
    pub index: usize,
    /// The change's id, when it had a readable one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id: Option<String>,
    /// What is wrong with it.
    pub message: String,
}

/// Every error answer's body (§8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error code (`invalid_request`, `unauthorized`, …).
    pub error: String,
    /// What a person can do about it.
    pub message: String,
    /// The offending changes, when the error is about some of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<ErrorDetail>>,
}
