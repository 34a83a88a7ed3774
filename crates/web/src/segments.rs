//! Segments: many confirmed entities written as one IndexedDB record.
//!
//! IndexedDB costs about the same per record whatever its size: a page of a
//! first sync written one record per entity runs at the browser's record
//! rate (some 10,000 a second on a small machine), the same page written as
//! a few records in a few milliseconds. So the store writes the confirmed
//! entities of a big transaction as segments, and folds them into the
//! per-entity rows later, oldest first, one segment per transaction, while
//! the page is idle ([`crate::IdbStore::fold_segment`]).
//!
//! The rules that keep reads right:
//! - a segment's entity overrides the entity's row, and a newer segment an
//!   older one (segment keys come from a key generator: a later segment has a
//!   higher key, and a key is never reused);
//! - while any segment is live, every confirmed write goes to a new segment,
//!   so a row is never newer than a live segment;
//! - a fold writes the oldest segment's entities to their rows and deletes
//!   it in one transaction.
//!
//! Each tab keeps the live segments in memory ([`SegmentCache`]) and brings
//! it up to date with the keys in the database at the first confirmed read
//! of each transaction: segments another tab wrote are read in, folded ones
//! dropped. Nothing here touches IndexedDB, so it is tested natively.

use std::collections::HashMap;

/// An entity's key: `(collection, entity_id)`.
pub type EntityKey = (String, String);

/// The most entities in one segment record: a fold writes one segment per
/// transaction, and this bounds how long that holds the database.
pub const SEGMENT_ENTITIES: usize = 1_000;

/// A transaction confirming at least this many entities writes segments,
/// not rows (below it, rows cost little and need no fold).
pub const SEGMENT_THRESHOLD: usize = 64;

/// How many live entities a tab keeps in memory before a page waits for
/// folds: bounds the memory a long first sync holds.
pub const MAX_LIVE_ENTITIES: usize = 250_000;

/// The live segments a tab knows, and for each entity in them the newest.
/// (Vectors and hash maps, not B-trees: what a page downloads is smaller.)
#[derive(Debug, Default)]
pub struct SegmentCache {
    /// Each live segment's key and entities (key and encoded state), oldest first.
    segments: Vec<(u64, Vec<(EntityKey, String)>)>,
    /// Each entity in a live segment, by collection then id: the newest
    /// segment holding it (its place in `segments` is found by key), and its
    /// place in that segment. Two levels, so a lookup borrows its key.
    newest: HashMap<String, HashMap<String, (u64, usize)>>,
    /// Entities in all live segments, counted once per segment.
    entries: usize,
}

impl SegmentCache {
    /// Whether no segment is live.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Entities in all live segments (an entity in two counts twice): what the cache holds.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// The keys of the live segments, oldest first.
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.segments.iter().map(|(k, _)| *k)
    }

    /// Where segment `key` is in `segments`, or where it would go.
    fn place(&self, key: u64) -> Result<usize, usize> {
        self.segments.binary_search_by_key(&key, |(k, _)| *k)
    }

    /// Whether segment `key` is known.
    pub fn contains(&self, key: u64) -> bool {
        self.place(key).is_ok()
    }

    /// Of `live` (the segment keys in the database), those not known yet.
    pub fn missing(&self, live: &[u64]) -> Vec<u64> {
        live.iter().copied().filter(|k| !self.contains(*k)).collect()
    }

    /// Forgets every segment not in `live` (folded or cleared since).
    pub fn retain(&mut self, live: &[u64]) {
        let gone: Vec<u64> = self.keys().filter(|k| !live.contains(k)).collect();
        for key in gone {
            self.remove(key);
        }
    }

    /// Adds segment `key` with its entities (encoded states). Adding a known
    /// segment again changes nothing.
    pub fn insert(&mut self, key: u64, entities: Vec<(EntityKey, String)>) {
        let Err(at) = self.place(key) else { return };
        self.entries += entities.len();
        if at == self.segments.len() {
            index(&mut self.newest, key, &entities);
            self.segments.push((key, entities));
        } else {
            // Read in out of order (another tab's segment): index again.
            self.segments.insert(at, (key, entities));
            self.reindex();
        }
    }

    /// Forgets segment `key` (folded or cleared).
    pub fn remove(&mut self, key: u64) {
        let Ok(at) = self.place(key) else { return };
        let (_, entities) = self.segments.remove(at);
        self.entries -= entities.len();
        if at == 0 {
            // No older segment holds these entities: those it held newest are in no segment now.
            for ((collection, entity_id), _) in entities {
                if let Some(ids) = self.newest.get_mut(&collection)
                    && ids.get(&entity_id).is_some_and(|(k, _)| *k == key)
                {
                    ids.remove(&entity_id);
                }
            }
            self.newest.retain(|_, ids| !ids.is_empty());
        } else {
            self.reindex();
        }
    }

    /// Forgets every segment.
    pub fn clear(&mut self) {
        *self = SegmentCache::default();
    }

    fn reindex(&mut self) {
        self.newest.clear();
        for (key, entities) in &self.segments {
            index(&mut self.newest, *key, entities);
        }
    }

    /// The encoded state an entry of `newest` points at.
    fn state(&self, (key, place): (u64, usize)) -> &str {
        let at = self.place(key).expect("newest points at live segments");
        self.segments[at].1[place].1.as_str()
    }

    /// The encoded state of an entity in a live segment (the newest one holding it).
    pub fn get(&self, collection: &str, entity_id: &str) -> Option<&str> {
        let found = self.newest.get(collection)?.get(entity_id)?;
        Some(self.state(*found))
    }

    /// Every entity of `collection` in a live segment, in no order: `(id, encoded state)`.
    pub fn in_collection(&self, collection: &str) -> Vec<(&str, &str)> {
        let Some(ids) = self.newest.get(collection) else { return Vec::new() };
        ids.iter().map(|(id, at)| (id.as_str(), self.state(*at))).collect()
    }

    /// The oldest live segment: its key and entities.
    pub fn oldest(&self) -> Option<(u64, &[(EntityKey, String)])> {
        self.segments.first().map(|(k, v)| (*k, v.as_slice()))
    }
}

/// Points `newest` at segment `key`'s entities (it is newer than any indexed so far).
fn index(newest: &mut HashMap<String, HashMap<String, (u64, usize)>>, key: u64, entities: &[(EntityKey, String)]) {
    for (place, ((collection, entity_id), _)) in entities.iter().enumerate() {
        let ids = match newest.get_mut(collection) {
            Some(ids) => ids,
            None => newest.entry(collection.clone()).or_default(),
        };
        ids.insert(entity_id.clone(), (key, place));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(entries: &[(&str, &str)]) -> Vec<(EntityKey, String)> {
        entries.iter().map(|(id, v)| (("tasks".to_owned(), (*id).to_owned()), (*v).to_owned())).collect()
    }

    #[test]
    fn the_newest_segment_holding_an_entity_wins() {
        let mut cache = SegmentCache::default();
        cache.insert(1, seg(&[("a", "a1"), ("b", "b1")]));
        cache.insert(2, seg(&[("a", "a2")]));
        assert_eq!(cache.get("tasks", "a"), Some("a2"));
        assert_eq!(cache.get("tasks", "b"), Some("b1"));
        assert_eq!(cache.get("tasks", "c"), None);
        assert_eq!(cache.get("other", "a"), None, "entities are per collection");
        assert_eq!(cache.entries(), 3);
    }

    #[test]
    fn a_segment_read_in_out_of_order_does_not_hide_a_newer_one() {
        let mut cache = SegmentCache::default();
        cache.insert(5, seg(&[("a", "a5")]));
        cache.insert(3, seg(&[("a", "a3"), ("b", "b3")]));
        assert_eq!(cache.get("tasks", "a"), Some("a5"));
        assert_eq!(cache.get("tasks", "b"), Some("b3"));
        cache.insert(5, seg(&[("a", "other")]));
        assert_eq!(cache.get("tasks", "a"), Some("a5"), "a known segment is not added twice");
        assert_eq!(cache.entries(), 3);
    }

    #[test]
    fn folding_the_oldest_leaves_what_newer_segments_hold() {
        let mut cache = SegmentCache::default();
        cache.insert(1, seg(&[("a", "a1"), ("b", "b1")]));
        cache.insert(2, seg(&[("a", "a2")]));
        cache.remove(1);
        assert_eq!(cache.get("tasks", "a"), Some("a2"));
        assert_eq!(cache.get("tasks", "b"), None, "b is in its row now");
        assert_eq!(cache.oldest().map(|(k, _)| k), Some(2));
        cache.remove(2);
        assert!(cache.is_empty());
        assert_eq!(cache.entries(), 0);
    }

    #[test]
    fn removing_a_newer_segment_uncovers_the_older_entity() {
        let mut cache = SegmentCache::default();
        cache.insert(1, seg(&[("a", "a1")]));
        cache.insert(2, seg(&[("a", "a2")]));
        cache.remove(2);
        assert_eq!(cache.get("tasks", "a"), Some("a1"));
    }

    #[test]
    fn retain_drops_what_the_database_no_longer_holds() {
        let mut cache = SegmentCache::default();
        cache.insert(1, seg(&[("a", "a1")]));
        cache.insert(2, seg(&[("b", "b2")]));
        assert_eq!(cache.missing(&[2, 3]), vec![3]);
        cache.retain(&[2, 3]);
        assert_eq!(cache.keys().collect::<Vec<_>>(), vec![2]);
        assert_eq!(cache.get("tasks", "a"), None);
        cache.retain(&[]);
        assert!(cache.is_empty());
    }

    #[test]
    fn a_collection_lists_each_entity_once_in_its_newest_state() {
        let mut cache = SegmentCache::default();
        cache.insert(1, seg(&[("b", "b1"), ("a", "a1")]));
        cache.insert(2, vec![(("notes".to_owned(), "n".to_owned()), "n2".to_owned())]);
        cache.insert(3, seg(&[("b", "b3")]));
        let mut listed = cache.in_collection("tasks");
        listed.sort_unstable();
        assert_eq!(listed, vec![("a", "a1"), ("b", "b3")]);
        assert_eq!(cache.in_collection("notes"), vec![("n", "n2")]);
        assert_eq!(cache.in_collection("none"), vec![]);
    }
}
