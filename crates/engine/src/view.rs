//! The optimistic view: the confirmed state with every pending change merged
//! on top, by the same merge function the server uses.

use deltasync_protocol::wire::Policies;
use deltasync_protocol::{Change, Collection, EntityId, EntityState, Merge, Policy, merge};
use serde::Serialize;
use serde_json::{Map, Value};

/// An entity as the app sees it: confirmed state plus pending local changes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entity {
    /// The entity's collection.
    pub collection: Collection,
    /// The entity's id.
    pub id: EntityId,
    /// Its visible data (`{}` when deleted).
    pub data: Map<String, Value>,
    /// The `seq` of the last confirmed upsert or delete (0 if none is confirmed).
    pub version: u64,
    /// Whether it is deleted.
    pub deleted: bool,
    /// How many local changes not yet confirmed by the server are merged in.
    pub pending: usize,
}

/// The policy a pending change is merged with locally.
///
/// Under `reject` a pending change is shown as if the server will accept it
/// (arrival order, like `server`); if the server refuses it, it becomes a
/// failed change and stops being shown.
fn local_policy(policies: &Policies, collection: &str) -> Policy {
    match policies.of(collection) {
        Policy::Reject => Policy::Server,
        p => p,
    }
}

/// Merges `pending` (in outbox order) on top of `confirmed`.
pub fn overlay<'a>(
    policies: &Policies,
    confirmed: Option<EntityState>,
    pending: impl IntoIterator<Item = &'a Change>,
) -> (Option<EntityState>, usize) {
    let mut current = confirmed;
    let mut count = 0;
    for change in pending {
        count += 1;
        let policy = local_policy(policies, change.collection.as_str());
        let version = current.as_ref().map_or(0, |c| c.version);
        if let Merge::Applied { state, .. } = merge(policy, current.as_ref(), change, version) {
            current = Some(state);
        }
    }
    (current, count)
}

/// The app's view of an entity, or `None` when it has no state at all.
pub fn to_entity(state: Option<EntityState>, pending: usize) -> Option<Entity> {
    state.map(|s| Entity {
        collection: s.collection,
        id: s.entity_id,
        data: s.data,
        version: s.version,
        deleted: s.deleted,
        pending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltasync_protocol::{ChangeId, Hlc, Op};
    use serde_json::json;

    fn change(id: &str, op: Op, data: Option<Value>, hlc: &str) -> Change {
        Change {
            change_id: ChangeId::parse(id).unwrap(),
            collection: Collection::parse("tasks").unwrap(),
            entity_id: EntityId::parse("t1").unwrap(),
            op,
            data,
            hlc: Hlc::parse(hlc).unwrap(),
            base_version: Some(0),
        }
    }

    #[test]
    fn pending_changes_apply_in_order_on_nothing() {
        let a = change("a", Op::Upsert, Some(json!({"title": "x", "done": false})), "1763800000000-00000-d");
        let b = change("b", Op::Upsert, Some(json!({"done": true})), "1763800000001-00000-d");
        let (state, n) = overlay(&Policies::default(), None, [&a, &b]);
        let state = state.unwrap();
        assert_eq!(n, 2);
        assert_eq!(Value::Object(state.data), json!({"title": "x", "done": true}));
        assert!(!state.deleted);
    }

    #[test]
    fn a_pending_delete_hides_the_entity() {
        let a = change("a", Op::Upsert, Some(json!({"title": "x"})), "1763800000000-00000-d");
        let b = change("b", Op::Delete, None, "1763800000001-00000-d");
        let (state, _) = overlay(&Policies::default(), None, [&a, &b]);
        assert!(state.unwrap().deleted);
    }

    #[test]
    fn reject_policy_shows_pending_changes_whatever_their_base_version() {
        let mut policies = Policies::default();
        policies.collections.insert("tasks".into(), Policy::Reject);
        let mut a = change("a", Op::Upsert, Some(json!({"title": "x"})), "1763800000000-00000-d");
        a.base_version = Some(7);
        let (state, _) = overlay(&policies, None, [&a]);
        assert_eq!(Value::Object(state.unwrap().data), json!({"title": "x"}));
    }
}
