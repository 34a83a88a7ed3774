//! The sync state, typed: what the device knows about its place in the
//! dataset, kept as meta values of the [`StoreTx`] so that every store keeps
//! it the same way.

use deltasync_protocol::wire::Policies;
use deltasync_protocol::{DeviceId, Hlc, StateDigest, StateHash};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::StoreTx;

/// The meta keys the engine uses.
pub mod keys {
    /// The device id, made once.
    pub const DEVICE_ID: &str = "device_id";
    /// The server's base URL.
    pub const SERVER_URL: &str = "server_url";
    /// The user whose data the replica holds, from the server's first answer.
    pub const USER_ID: &str = "user_id";
    /// The seq the confirmed state stands at.
    pub const CURSOR: &str = "cursor";
    /// The chain head at the cursor.
    pub const STATE_HASH: &str = "state_hash";
    /// The digest of the confirmed state.
    pub const STATE_DIGEST: &str = "state_digest";
    /// When the last sync finished.
    pub const LAST_SYNC_AT: &str = "last_sync_at";
    /// The policies learned from the server, as JSON.
    pub const POLICIES: &str = "policies";
    /// The last stamp this device issued.
    pub const CLOCK: &str = "clock";
    /// The correction of the wall clock, in ms.
    pub const CLOCK_OFFSET_MS: &str = "clock_offset_ms";
    /// The last sync's failure, as JSON.
    pub const SYNC_FAILURE: &str = "sync_failure";
    /// The server's horizon.
    pub const HORIZON: &str = "horizon";
    /// Set while a heal's journal check is unfinished.
    pub const JOURNAL_UNCHECKED: &str = "journal_unchecked";
}

/// What the device knows about its place in the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncState {
    /// The device id, made once and kept.
    pub device_id: DeviceId,
    /// The server's base URL, once known.
    pub server_url: Option<String>,
    /// The user whose data the replica holds, once a server said.
    pub user_id: Option<String>,
    /// The seq the confirmed state stands at.
    pub cursor: u64,
    /// The chain head at `cursor`.
    pub state_hash: StateHash,
    /// The digest of the confirmed state.
    pub state_digest: StateDigest,
    /// When the last sync finished, ms since the epoch.
    pub last_sync_at: Option<u64>,
    /// The policies learned from the server.
    pub policies: Option<Policies>,
}

/// A new device id from 48 random bits: `dev-` and 12 hex digits.
pub fn new_device_id(random: u64) -> DeviceId {
    DeviceId::parse(format!("dev-{:012x}", random & 0xffff_ffff_ffff)).expect("valid device id")
}

async fn parse_meta<T: std::str::FromStr>(tx: &mut impl StoreTx, key: &str) -> Result<Option<T>> {
    match tx.meta(key).await? {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| Error::LocalCorrupt(format!("meta {key} holds {s:?}"))),
    }
}

async fn json_meta<T: serde::de::DeserializeOwned>(tx: &mut impl StoreTx, key: &str) -> Result<Option<T>> {
    tx.meta(key)
        .await?
        .map(|s| serde_json::from_str(&s).map_err(|e| Error::LocalCorrupt(format!("{key}: {e}"))))
        .transpose()
}

/// The device id; made (from `random`) when the store has none yet.
pub async fn device_id(tx: &mut impl StoreTx, random: u64) -> Result<DeviceId> {
    match tx.meta(keys::DEVICE_ID).await? {
        Some(id) => DeviceId::parse(id).map_err(|e| Error::LocalCorrupt(format!("device id: {e}"))),
        None => {
            let id = new_device_id(random);
            tx.set_meta(keys::DEVICE_ID, id.as_str()).await?;
            Ok(id)
        }
    }
}

/// Reads the sync state.
pub async fn sync_state(tx: &mut impl StoreTx) -> Result<SyncState> {
    let device_id = match tx.meta(keys::DEVICE_ID).await? {
        Some(id) => DeviceId::parse(id).map_err(|e| Error::LocalCorrupt(format!("device id: {e}")))?,
        None => return Err(Error::LocalCorrupt("the replica has no device id".into())),
    };
    Ok(SyncState {
        device_id,
        server_url: tx.meta(keys::SERVER_URL).await?,
        user_id: tx.meta(keys::USER_ID).await?,
        cursor: parse_meta(tx, keys::CURSOR).await?.unwrap_or(0),
        state_hash: parse_meta(tx, keys::STATE_HASH).await?.unwrap_or(StateHash::ZERO),
        state_digest: parse_meta(tx, keys::STATE_DIGEST).await?.unwrap_or(StateDigest::ZERO),
        last_sync_at: parse_meta(tx, keys::LAST_SYNC_AT).await?,
        policies: policies(tx).await?,
    })
}

/// Records where the confirmed state stands.
pub async fn set_position(tx: &mut impl StoreTx, cursor: u64, hash: &StateHash, digest: &StateDigest) -> Result<()> {
    tx.set_meta(keys::CURSOR, &cursor.to_string()).await?;
    tx.set_meta(keys::STATE_HASH, &hash.to_hex()).await?;
    tx.set_meta(keys::STATE_DIGEST, &digest.to_hex()).await
}

/// The policies learned from the server, if any yet.
pub async fn policies(tx: &mut impl StoreTx) -> Result<Option<Policies>> {
    json_meta(tx, keys::POLICIES).await
}

/// Records the policies learned from the server.
pub async fn set_policies(tx: &mut impl StoreTx, policies: &Policies) -> Result<()> {
    tx.set_meta(keys::POLICIES, &serde_json::to_string(policies).expect("policies serialise")).await
}

/// The last stamp this device issued, to resume its clock.
pub async fn clock(tx: &mut impl StoreTx) -> Result<Option<Hlc>> {
    tx.meta(keys::CLOCK)
        .await?
        .map(|s| Hlc::parse(s).map_err(|e| Error::LocalCorrupt(format!("clock: {e}"))))
        .transpose()
}

/// The wall-clock correction, in ms (0 before the server said otherwise).
pub async fn clock_offset(tx: &mut impl StoreTx) -> Result<i64> {
    Ok(parse_meta(tx, keys::CLOCK_OFFSET_MS).await?.unwrap_or(0))
}

/// The server's horizon, as last seen in `/v1/status` (0 before).
pub async fn horizon(tx: &mut impl StoreTx) -> Result<u64> {
    Ok(parse_meta(tx, keys::HORIZON).await?.unwrap_or(0))
}

/// The last sync error, kept until a sync succeeds, so that a failure that
/// repeats (a server answer this client cannot read, an expired token) is
/// visible instead of retried silently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncFailure {
    /// The error's code, as the command line prints it (`protocol`, `unreachable`, …).
    pub code: String,
    /// The error's message.
    pub message: String,
    /// When the first of the failed syncs in a row ended, ms since the epoch.
    pub since: u64,
    /// When the last one ended.
    pub at: u64,
    /// How many syncs in a row failed.
    pub count: u64,
}

/// The last sync error, if the last sync failed.
pub async fn sync_failure(tx: &mut impl StoreTx) -> Result<Option<SyncFailure>> {
    json_meta(tx, keys::SYNC_FAILURE).await
}

/// Records a failed sync at `now`, continuing the run of failures if there is one.
pub async fn record_sync_failure(tx: &mut impl StoreTx, code: &str, message: &str, now: u64) -> Result<SyncFailure> {
    let previous = sync_failure(tx).await?;
    let failure = SyncFailure {
        code: code.to_owned(),
        message: message.to_owned(),
        since: previous.as_ref().map_or(now, |p| p.since),
        at: now,
        count: previous.map_or(0, |p| p.count) + 1,
    };
    tx.set_meta(keys::SYNC_FAILURE, &serde_json::to_string(&failure).expect("failure serialises")).await?;
    Ok(failure)
}
