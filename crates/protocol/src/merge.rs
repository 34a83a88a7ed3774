//! Entity state and the merge policies (§4), shared by server and clients.
//!
//! [`merge`] takes an entity's current state and one incoming change and
//! returns the new state, or says the change is refused. Server and client
//! both call it, in `seq` order, so they compute the same state from the same
//! log.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::change::{Change, Op};
use crate::digest;
use crate::hlc::Hlc;
use crate::ids::{Collection, EntityId};

/// A collection's merge policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Field-level last-writer-wins by HLC (the default).
    #[default]
    Fields,
    /// Whole-entity last-writer-wins by HLC.
    Entity,
    /// Arrival order wins; never a conflict.
    Server,
    /// Optimistic concurrency on `base_version`.
    Reject,
}

impl Policy {
    /// The policy's configuration and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Fields => "fields",
            Policy::Entity => "entity",
            Policy::Server => "server",
            Policy::Reject => "reject",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fields" => Ok(Policy::Fields),
            "entity" => Ok(Policy::Entity),
            "server" => Ok(Policy::Server),
            "reject" => Ok(Policy::Reject),
            other => Err(format!("unknown merge policy {other:?}: expected fields, entity, server or reject")),
        }
    }
}

/// The metadata a policy keeps per entity to merge later changes. As JSON,
/// the variant's fields without a tag: the keys present tell them apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Meta {
    /// `fields` policy: the HLC of every visible field, the tombstone and the latest upsert.
    Fields {
        /// The HLC of each visible field.
        fields: BTreeMap<String, Hlc>,
        /// The greatest delete HLC, if any.
        t: Option<Hlc>,
        /// The greatest upsert HLC, if any.
        u: Option<Hlc>,
    },
    /// Other policies: the HLC of the last change applied.
    Last {
        /// The HLC of the last change applied.
        hlc: Hlc,
    },
}

/// Read in one pass: serde's untagged enums buffer the whole value first and
/// then try each variant, which made reading `meta` most of the cost of
/// reading a bootstrap line.
impl<'de> Deserialize<'de> for Meta {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// Every variant's keys; `fields` makes it [`Meta::Fields`], `hlc` alone [`Meta::Last`].
        #[derive(Deserialize)]
        struct Keys {
            fields: Option<BTreeMap<String, Hlc>>,
            #[serde(default)]
            t: Option<Hlc>,
            #[serde(default)]
            u: Option<Hlc>,
            hlc: Option<Hlc>,
        }
        let keys = Keys::deserialize(deserializer)?;
        match (keys.fields, keys.hlc) {
            (Some(fields), _) => Ok(Meta::Fields { fields, t: keys.t, u: keys.u }),
            (None, Some(hlc)) => Ok(Meta::Last { hlc }),
            (None, None) => Err(serde::de::Error::custom("meta has neither `fields` nor `hlc`")),
        }
    }
}

/// An entity's state: its visible data, version, deletion flag and merge metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityState {
    /// The entity's collection.
    pub collection: Collection,
    /// The entity's id.
    pub entity_id: EntityId,
    /// The visible data (`{}` when deleted).
    pub data: Map<String, Value>,
    /// The `seq` of the last upsert or delete logged for the entity.
    pub version: u64,
    /// Whether the entity is deleted (a tombstone).
    pub deleted: bool,
    /// What the policy needs to merge later changes.
    pub meta: Meta,
}

impl EntityState {
    /// The entity's contribution to the state digest: `None` when deleted.
    pub fn entity_hash(&self) -> Option<[u8; 32]> {
        (!self.deleted).then(|| digest::entity_hash(self.collection.as_str(), self.entity_id.as_str(), &self.data))
    }

    /// The entity as a JSON value (the shape of bootstrap lines and conflict `current`).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("entity state serialises")
    }
}

/// Why a change lost or was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictReason {
    /// Some or all of an upsert's fields lost to newer writes, or a delete left the entity alive.
    Superseded,
    /// An upsert lost to a newer delete.
    Deleted,
    /// Refused by the `reject` policy: `base_version` is not the entity's version.
    VersionMismatch,
    /// Refused: the HLC is too far ahead of the server's clock.
    ClockSkew,
}

impl ConflictReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictReason::Superseded => "superseded",
            ConflictReason::Deleted => "deleted",
            ConflictReason::VersionMismatch => "version_mismatch",
            ConflictReason::ClockSkew => "clock_skew",
        }
    }
}

/// A conflict reported for an incoming change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    /// Why the change lost or was refused.
    pub reason: ConflictReason,
    /// The fields that lost (upsert), or that survive (delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
    /// The entity after the change was merged, or for `version_mismatch` the
    /// unchanged entity (`null` when it never existed). Absent for `clock_skew`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<Value>,
}

impl Conflict {
    /// A `clock_skew` refusal.
    pub fn clock_skew() -> Self {
        Conflict { reason: ConflictReason::ClockSkew, fields: None, current: None }
    }
}

/// The outcome of merging one change.
#[derive(Debug, Clone, PartialEq)]
pub enum Merge {
    /// The change is logged and the entity takes `state`; `conflict` says what lost, if anything.
    Applied {
        /// The entity's new state.
        state: EntityState,
        /// What lost, if anything.
        conflict: Option<Conflict>,
    },
    /// An `append`: logged, entity state untouched.
    Logged,
    /// Refused by the policy: not logged, consumes no seq.
    Rejected(Conflict),
}

/// Merges `change`, to be logged at `seq`, into the entity's `current` state under `policy`.
pub fn merge(policy: Policy, current: Option<&EntityState>, change: &Change, seq: u64) -> Merge {
    if change.op == Op::Append {
        return Merge::Logged;
    }
    if policy == Policy::Reject {
        let version = current.map_or(0, |c| c.version);
        if change.base_version != Some(version) {
            return Merge::Rejected(Conflict {
                reason: ConflictReason::VersionMismatch,
                fields: None,
                current: Some(current.map_or(Value::Null, EntityState::to_value)),
            });
        }
    }
    let (state, conflict) = match policy {
        Policy::Fields => merge_fields(current, change, seq),
        Policy::Entity | Policy::Server | Policy::Reject => merge_last(policy, current, change, seq),
    };
    let conflict =
        conflict.map(|(reason, fields)| Conflict { reason, fields: Some(fields), current: Some(state.to_value()) });
    Merge::Applied { state, conflict }
}

type Lost = Option<(ConflictReason, Vec<String>)>;

fn merge_fields(current: Option<&EntityState>, change: &Change, seq: u64) -> (EntityState, Lost) {
    let (mut data, mut fields, mut t, mut u) = match current {
        Some(EntityState { data, meta: Meta::Fields { fields, t, u }, .. }) => {
            (data.clone(), fields.clone(), t.clone(), u.clone())
        }
        Some(EntityState { data, meta: Meta::Last { hlc }, deleted, .. }) => {
            // Only reachable if a collection's policy changed, which the server refuses.
            let fields = data.keys().map(|k| (k.clone(), hlc.clone())).collect();
            let (t, u) = if *deleted { (Some(hlc.clone()), None) } else { (None, Some(hlc.clone())) };
            (data.clone(), fields, t, u)
        }
        None => (Map::new(), BTreeMap::new(), None, None),
    };
    let h = &change.hlc;
    let mut lost = None;
    match change.op {
        Op::Upsert => {
            let incoming = change.fields().cloned().unwrap_or_default();
            if u.as_ref().is_none_or(|u| h > u) {
                u = Some(h.clone());
            }
            if t.as_ref().is_some_and(|t| h <= t) {
                lost = Some((ConflictReason::Deleted, incoming.keys().cloned().collect()));
            } else {
                let mut lost_fields = Vec::new();
                for (name, value) in incoming {
                    if fields.get(&name).is_some_and(|fh| fh >= h) {
                        lost_fields.push(name);
                    } else {
                        fields.insert(name.clone(), h.clone());
                        data.insert(name, value);
                    }
                }
                if !lost_fields.is_empty() {
                    lost = Some((ConflictReason::Superseded, lost_fields));
                }
            }
        }
        Op::Delete => {
            if t.as_ref().is_none_or(|t| h > t) {
                t = Some(h.clone());
            }
            let tomb = t.clone().expect("just set");
            fields.retain(|_, fh| *fh > tomb);
            data.retain(|name, _| fields.contains_key(name));
            let alive = u.as_ref().is_some_and(|u| *u > tomb);
            if alive {
                lost = Some((ConflictReason::Superseded, fields.keys().cloned().collect()));
            }
        }
        Op::Append => unreachable!("appends never reach the merge"),
    }
    let alive = match (&t, &u) {
        (None, _) => true,
        (Some(t), Some(u)) => u > t,
        (Some(_), None) => false,
    };
    if !alive {
        data.clear();
        fields.clear();
    }
    let state = EntityState {
        collection: change.collection.clone(),
        entity_id: change.entity_id.clone(),
        data,
        version: seq,
        deleted: !alive,
        meta: Meta::Fields { fields, t, u },
    };
    (state, lost)
}

fn merge_last(policy: Policy, current: Option<&EntityState>, change: &Change, seq: u64) -> (EntityState, Lost) {
    let last_hlc = current.map(|c| match &c.meta {
        Meta::Last { hlc } => hlc.clone(),
        Meta::Fields { t, u, .. } => t.clone().max(u.clone()).expect("a fields entity has t or u"),
    });
    let applies = policy != Policy::Entity || last_hlc.as_ref().is_none_or(|last| change.hlc > *last);
    let (mut data, mut deleted) = current.map_or((Map::new(), false), |c| (c.data.clone(), c.deleted));
    let mut hlc = last_hlc.unwrap_or_else(|| change.hlc.clone());
    let mut lost = None;
    if applies {
        hlc = change.hlc.clone();
        match change.op {
            Op::Upsert => {
                if deleted || current.is_none() {
                    data.clear();
                    deleted = false;
                }
                for (name, value) in change.fields().cloned().unwrap_or_default() {
                    data.insert(name, value);
                }
            }
            Op::Delete => {
                data.clear();
                deleted = true;
            }
            Op::Append => unreachable!("appends never reach the merge"),
        }
    } else {
        match change.op {
            Op::Upsert => {
                let names: Vec<String> = change.fields().map(|f| f.keys().cloned().collect()).unwrap_or_default();
                let reason = if deleted { ConflictReason::Deleted } else { ConflictReason::Superseded };
                lost = Some((reason, names));
            }
            Op::Delete if !deleted => {
                lost = Some((ConflictReason::Superseded, data.keys().cloned().collect()));
            }
            Op::Delete | Op::Append => {}
        }
    }
    let state = EntityState {
        collection: change.collection.clone(),
        entity_id: change.entity_id.clone(),
        data,
        version: seq,
        deleted,
        meta: Meta::Last { hlc },
    };
    (state, lost)
}

#[cfg(test)]
mod tests;
