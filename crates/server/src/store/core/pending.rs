//! What pushes decided about entities and receipts before it reaches their
//! tables, and when to fold it in.
//!
//! Real clients name changes and entities with random UUIDs. Written one
//! push at a time, every new receipt and every new entity lands on a
//! different page of its table, so each change costs two random page writes
//! (about 20 KB written per change on SQLite, WAL and checkpoint together).
//! A store that folds instead appends what a push decided to two pending
//! tables in commit order (a handful of pages per commit), keeps the same
//! rows in a [`Pending`] index in memory for the lookups of later pushes,
//! and every [`FOLD_ROWS`] rows writes them into `entities` and `receipts`
//! in key order, where neighbouring rows share pages.
//!
//! The pending tables are the truth; the index only mirrors them. A store
//! rebuilds it from the tables when it starts, and whenever another
//! connection may have written them. A reader that needs entities (a
//! bootstrap) reads the pending rows of its user in the same transaction
//! and lets them win over the folded ones ([`PendingLines`]).

use std::collections::{BTreeMap, HashMap};

use deltasync_protocol::{ChangeId, EntityState, UserId};

use crate::batch::EntityKey;
use crate::store::StoreError;
use crate::store::rows::{self, ColumnValue, Columns};

/// How many pending rows (entity states and receipts) make the writer fold,
/// unless told otherwise. Larger folds share more pages per row (measured
/// with random ids: 6.3 KB written per change folding 10,000 at a time,
/// 1.7 KB at 50,000).
pub const FOLD_ROWS: usize = 50_000;

/// The environment variable that sets how many pending rows make the SQLite
/// writer fold (1 to 1,000,000; [`FOLD_ROWS`] when unset). Smaller folds
/// keep less in memory and write more per change; tests set it low so that
/// folds happen all the time.
pub const FOLD_ROWS_VAR: &str = "DELTASYNC_SQLITE_FOLD_ROWS";

/// The fold threshold [`FOLD_ROWS_VAR`] asks for, or a message saying what is wrong with it.
pub fn fold_rows_from_env() -> Result<usize, String> {
    match std::env::var(FOLD_ROWS_VAR) {
        Err(_) => Ok(FOLD_ROWS),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
            _ => Err(format!("{FOLD_ROWS_VAR} is {v:?}: it must be a whole number of rows from 1 to 1000000")),
        },
    }
}

/// How many bytes of pending entity data and meta make the writer fold,
/// whatever the row count: what bounds the index's memory when entities are large.
pub const FOLD_BYTES: usize = 32 * 1024 * 1024;

/// An entity's state as stored: data and meta as the JSON text of their columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntity {
    /// The data object, canonical JSON.
    pub data: String,
    /// The seq of the last upsert or delete logged for the entity.
    pub version: u64,
    /// Whether the entity is a tombstone.
    pub deleted: bool,
    /// The merge metadata, JSON.
    pub meta: String,
    /// The entity's contribution to the state digest (`None` when deleted).
    pub entity_hash: Option<[u8; 32]>,
}

impl StoredEntity {
    /// The entity's state, decoded.
    pub fn state(&self, key: &EntityKey) -> Result<EntityState, StoreError> {
        rows::decode_entity(key, &self.data, self.version as i64, self.deleted, &self.meta)
    }

    fn size(&self) -> usize {
        self.data.len() + self.meta.len()
    }
}

/// One user's pending rows.
#[derive(Debug, Default)]
struct UserPending {
    receipts: HashMap<ChangeId, u64>,
    entities: HashMap<EntityKey, StoredEntity>,
}

/// The pending rows of every user, indexed for the lookups of a push. See the module documentation.
#[derive(Debug, Default)]
pub struct Pending {
    users: HashMap<UserId, UserPending>,
    rows: usize,
    bytes: usize,
}

impl Pending {
    /// The seq of `user`'s pending change `id`, if it is pending.
    pub fn receipt(&self, user: &UserId, id: &ChangeId) -> Option<u64> {
        self.users.get(user)?.receipts.get(id).copied()
    }

    /// The pending state of `user`'s entity `key`, if it has one.
    pub fn entity(&self, user: &UserId, key: &EntityKey) -> Option<&StoredEntity> {
        self.users.get(user)?.entities.get(key)
    }

    /// Records that `user`'s change `id` was logged at `seq`.
    pub fn add_receipt(&mut self, user: &UserId, id: ChangeId, seq: u64) {
        self.user(user).receipts.insert(id, seq);
        self.rows += 1;
    }

    /// Records the new state of `user`'s entity `key` (replacing an older pending one).
    pub fn add_entity(&mut self, user: &UserId, key: EntityKey, entity: StoredEntity) {
        self.bytes += entity.size();
        self.rows += 1;
        self.user(user).entities.insert(key, entity);
    }

    fn user(&mut self, user: &UserId) -> &mut UserPending {
        if !self.users.contains_key(user) {
            self.users.insert(user.clone(), UserPending::default());
        }
        self.users.get_mut(user).expect("inserted above")
    }

    /// How many rows the pending tables hold (a replaced entity state still counts until the fold).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Whether the pending rows are `fold_rows` or more, or large enough, to fold now.
    pub fn should_fold(&self, fold_rows: usize) -> bool {
        self.rows >= fold_rows || self.bytes >= FOLD_BYTES
    }

    /// Forgets everything (after a fold emptied the tables, or before a rebuild).
    pub fn clear(&mut self) {
        *self = Pending::default();
    }

    /// Every pending entity state once (the newest), in key order: user, collection, entity id.
    pub fn entities_in_key_order(&self) -> Vec<(&UserId, &EntityKey, &StoredEntity)> {
        let mut all: Vec<_> =
            self.users.iter().flat_map(|(u, p)| p.entities.iter().map(move |(k, e)| (u, k, e))).collect();
        all.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        all
    }

    /// Every pending receipt, in key order: user, change id.
    pub fn receipts_in_key_order(&self) -> Vec<(&UserId, &ChangeId, u64)> {
        let mut all: Vec<_> =
            self.users.iter().flat_map(|(u, p)| p.receipts.iter().map(move |(id, seq)| (u, id, *seq))).collect();
        all.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        all
    }
}

/// One user's pending entity states, newest per key, in key order: what a
/// bootstrap streams in place of (or between) the folded rows of `entities`.
#[derive(Debug, Default)]
pub struct PendingLines {
    lines: BTreeMap<(String, String), StoredEntity>,
}

impl PendingLines {
    /// Adds a pending state; rows must come in the order they were written, so that the newest wins.
    pub fn insert(&mut self, collection: String, entity_id: String, entity: StoredEntity) {
        self.lines.insert((collection, entity_id), entity);
    }

    /// Takes the pending lines that sort before the folded row
    /// `(collection, entity_id)` or replace it, in key order; the bool says
    /// whether the last one replaces it (the folded row is stale: skip it).
    pub fn take_through(&mut self, collection: &str, entity_id: &str) -> (Vec<PendingRow>, bool) {
        let mut taken = Vec::new();
        while let Some((first, _)) = self.lines.first_key_value() {
            let order = (first.0.as_str(), first.1.as_str()).cmp(&(collection, entity_id));
            if order.is_gt() {
                break;
            }
            taken.push(self.pop().expect("seen above"));
            if order.is_eq() {
                return (taken, true);
            }
        }
        (taken, false)
    }

    /// Takes the next pending line, in key order.
    pub fn pop(&mut self) -> Option<PendingRow> {
        let ((collection, entity_id), entity) = self.lines.pop_first()?;
        Some(PendingRow { collection, entity_id, entity })
    }
}

/// A pending entity state as a row of [`rows::ENTITY_LINE_COLUMNS`], for the bootstrap line writer.
#[derive(Debug)]
pub struct PendingRow {
    collection: String,
    entity_id: String,
    entity: StoredEntity,
}

impl Columns for PendingRow {
    fn value(&self, i: usize) -> Result<ColumnValue<'_>, StoreError> {
        Ok(match i {
            0 => ColumnValue::Text(&self.collection),
            1 => ColumnValue::Text(&self.entity_id),
            2 => ColumnValue::Text(&self.entity.data),
            3 => ColumnValue::Int(self.entity.version as i64),
            4 => ColumnValue::Int(self.entity.deleted as i64),
            5 => ColumnValue::Text(&self.entity.meta),
            _ => return Err(rows::corrupt(format!("a pending entity row has no column {i}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use deltasync_protocol::{Collection, EntityId};

    use super::*;

    fn user(u: &str) -> UserId {
        UserId::parse(u).unwrap()
    }

    fn key(c: &str, e: &str) -> EntityKey {
        (Collection::parse(c).unwrap(), EntityId::parse(e).unwrap())
    }

    fn stored(version: u64, data: &str) -> StoredEntity {
        StoredEntity { data: data.into(), version, deleted: false, meta: "{}".into(), entity_hash: None }
    }

    #[test]
    fn lookups_see_the_newest_state_of_their_own_user_only() {
        let mut p = Pending::default();
        p.add_entity(&user("a"), key("notes", "n1"), stored(1, r#"{"v":1}"#));
        p.add_entity(&user("a"), key("notes", "n1"), stored(2, r#"{"v":2}"#));
        p.add_receipt(&user("a"), ChangeId::parse("c1").unwrap(), 1);
        assert_eq!(p.entity(&user("a"), &key("notes", "n1")).unwrap().version, 2);
        assert!(p.entity(&user("b"), &key("notes", "n1")).is_none());
        assert_eq!(p.receipt(&user("a"), &ChangeId::parse("c1").unwrap()), Some(1));
        assert_eq!(p.receipt(&user("b"), &ChangeId::parse("c1").unwrap()), None);
        assert_eq!(p.rows(), 3, "a replaced state is still a row of the table until the fold");
    }

    #[test]
    fn folding_order_is_key_order_across_users() {
        let mut p = Pending::default();
        p.add_entity(&user("b"), key("notes", "a"), stored(1, "{}"));
        p.add_entity(&user("a"), key("tasks", "a"), stored(1, "{}"));
        p.add_entity(&user("a"), key("notes", "z"), stored(2, "{}"));
        let order: Vec<_> =
            p.entities_in_key_order().iter().map(|(u, k, _)| format!("{}/{}/{}", u.as_str(), k.0, k.1)).collect();
        assert_eq!(order, ["a/notes/z", "a/tasks/a", "b/notes/a"]);
        p.add_receipt(&user("b"), ChangeId::parse("x").unwrap(), 1);
        p.add_receipt(&user("a"), ChangeId::parse("y").unwrap(), 2);
        p.add_receipt(&user("a"), ChangeId::parse("b").unwrap(), 3);
        let order: Vec<_> = p.receipts_in_key_order().iter().map(|(u, id, _)| format!("{}/{id}", u.as_str())).collect();
        assert_eq!(order, ["a/b", "a/y", "b/x"]);
    }

    #[test]
    fn a_fold_is_due_by_rows_or_by_bytes() {
        let mut p = Pending::default();
        assert!(p.is_empty() && !p.should_fold(1));
        p.add_entity(&user("a"), key("notes", "big"), stored(1, &"x".repeat(FOLD_BYTES)));
        assert!(p.should_fold(FOLD_ROWS), "one huge entity is enough");
        p.clear();
        for i in 0..9 {
            p.add_receipt(&user("a"), ChangeId::parse(format!("c{i}")).unwrap(), i as u64);
            assert_eq!(p.should_fold(9), i == 8);
        }
    }

    #[test]
    fn pending_lines_interleave_with_folded_rows_and_replace_equal_keys() {
        let mut lines = PendingLines::default();
        lines.insert("notes".into(), "b".into(), stored(1, "{}"));
        lines.insert("notes".into(), "d".into(), stored(2, "{}"));
        lines.insert("notes".into(), "d".into(), stored(3, "{}"));
        lines.insert("tasks".into(), "a".into(), stored(4, "{}"));
        let mut streamed = Vec::new();
        for folded in ["a", "d", "e"] {
            let (rows, replaced) = lines.take_through("notes", folded);
            for row in rows {
                streamed.push(format!("pending {} v{}", row.text(1).unwrap(), row.int(3).unwrap()));
            }
            if !replaced {
                streamed.push(format!("folded {folded}"));
            }
        }
        while let Some(row) = lines.pop() {
            streamed.push(format!("pending {}/{}", row.text(0).unwrap(), row.text(1).unwrap()));
        }
        assert_eq!(streamed, ["folded a", "pending b v1", "pending d v3", "folded e", "pending tasks/a"]);
    }
}
