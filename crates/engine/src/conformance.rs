//! The store conformance suite: the rules of [`crate::store`] as checks that
//! any [`LocalStore`] must pass. Run it from a test with a function that
//! makes an empty store:
//!
//! ```
//! # futures_executor::block_on(async {
//! deltasync_engine::conformance::run(deltasync_engine::MemoryStore::new).await;
//! # });
//! ```
//!
//! Each check starts from a fresh store and panics, naming the rule, when
//! the store breaks it. The last checks drive the engine itself (local
//! writes, reads, a sync's records) on the store, offline.

use std::sync::atomic::{AtomicU64, Ordering};

use deltasync_protocol::{Change, ChangeId, Collection, Conflict, EntityId, EntityState, Hlc, Meta, Op};
use serde_json::{Map, json};

use crate::clock::Clock;
use crate::engine::{Engine, EngineOptions};
use crate::store::{Access, LocalStore, OutboxStatus, StoreTx};
use crate::transport::NoServer;

/// A clock for checks: the time stands still unless moved, randomness is a counter.
#[derive(Debug)]
pub struct TestClock {
    now: AtomicU64,
    next: AtomicU64,
}

impl TestClock {
    /// A clock standing at `ms`.
    pub fn at(ms: u64) -> Self {
        Self::seeded(ms, 1)
    }

    /// A clock standing at `ms` whose random numbers start from `seed` (two
    /// devices need different ones, or they make the same change ids).
    pub fn seeded(ms: u64, seed: u64) -> Self {
        TestClock { now: AtomicU64::new(ms), next: AtomicU64::new(seed) }
    }
}

impl Clock for TestClock {
    fn wall_ms(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    fn monotonic_ms(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    fn random_u64(&self) -> u64 {
        self.next.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::SeqCst)
    }
}

/// Runs every check, each on a store made by `fresh`.
pub async fn run<S: LocalStore>(fresh: impl Fn() -> S) {
    meta_is_kept_by_commit_and_undone_by_drop(&fresh()).await;
    a_batch_of_writes_is_one_transaction(fresh()).await;
    reads_and_confirmations_of_many_match_one_at_a_time(&fresh()).await;
    engines_sharing_a_replica_stamp_in_order(fresh()).await;
    confirmed_state_is_replaced_and_listed(&fresh()).await;
    many_confirmed_entities_read_back_as_few_do(&fresh()).await;
    a_staged_snapshot_replaces_the_confirmed_state_only_when_adopted(&fresh()).await;
    outbox_keeps_order_and_status(&fresh()).await;
    refusals_and_retries_are_recorded(&fresh()).await;
    acknowledged_changes_move_to_the_journal(&fresh()).await;
    the_journal_is_trimmed_and_gives_entries_back(&fresh()).await;
    clear_all_keeps_only_the_named_meta(&fresh()).await;
    the_engine_writes_and_reads_offline(fresh()).await;
}

fn change(n: u32, entity: &str, base_version: u64) -> Change {
    Change {
        change_id: ChangeId::parse(format!("c{n:03}")).expect("valid id"),
        collection: Collection::parse("tasks").expect("valid collection"),
        entity_id: EntityId::parse(entity).expect("valid entity id"),
        op: Op::Upsert,
        data: Some(json!({ "n": n })),
        hlc: Hlc::parse(format!("1763800000000-{n:05}-dev-1")).expect("valid hlc"),
        base_version: Some(base_version),
    }
}

/// A state as a snapshot carries it.
fn text_of(state: &EntityState) -> String {
    serde_json::to_string(state).expect("entity state serialises")
}

fn entity(id: &str, version: u64) -> EntityState {
    let mut data = Map::new();
    data.insert("v".into(), json!(version));
    EntityState {
        collection: Collection::parse("tasks").expect("valid collection"),
        entity_id: EntityId::parse(id).expect("valid entity id"),
        data,
        version,
        deleted: false,
        meta: Meta::Last { hlc: Hlc::parse(format!("1763800000000-{version:05}-dev-1")).expect("valid hlc") },
    }
}

/// A write transaction, or a panic naming the check.
async fn write<S: LocalStore>(store: &S) -> S::Tx<'_> {
    store.begin(Access::Write).await.expect("begin a write transaction")
}

async fn ids<S: LocalStore>(store: &S) -> Vec<(i64, OutboxStatus, Option<u64>)> {
    let mut tx = store.begin(Access::Read).await.expect("begin a read transaction");
    tx.all_entries().await.expect("all_entries").iter().map(|e| (e.id, e.status, e.seq)).collect()
}

async fn meta_is_kept_by_commit_and_undone_by_drop<S: LocalStore>(store: &S) {
    let mut tx = write(store).await;
    tx.set_meta("k", "1").await.unwrap();
    tx.set_meta("gone", "x").await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = write(store).await;
    tx.set_meta("k", "2").await.unwrap();
    tx.remove_meta("gone").await.unwrap();
    tx.push_outbox(&change(1, "t1", 0), 5).await.unwrap();
    assert_eq!(tx.meta("k").await.unwrap().as_deref(), Some("2"), "a transaction reads its own writes");
    drop(tx);
    let mut tx = write(store).await;
    assert_eq!(tx.meta("k").await.unwrap().as_deref(), Some("1"), "a dropped transaction leaves nothing");
    assert_eq!(tx.meta("gone").await.unwrap().as_deref(), Some("x"), "a dropped removal is undone");
    assert_eq!(tx.all_entries().await.unwrap(), vec![], "a dropped outbox write is undone");
    tx.remove_meta("gone").await.unwrap();
    tx.remove_meta("never-set").await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.begin(Access::Read).await.unwrap();
    assert_eq!(tx.meta("gone").await.unwrap(), None, "a committed removal stays");
    drop(tx);

    // A refetchable write transaction commits and undoes as a write does.
    let mut tx = store.begin(Access::Refetchable).await.unwrap();
    tx.set_meta("k", "3").await.unwrap();
    drop(tx);
    let mut tx = store.begin(Access::Refetchable).await.unwrap();
    assert_eq!(tx.meta("k").await.unwrap().as_deref(), Some("1"), "a dropped refetchable write leaves nothing");
    tx.set_meta("k", "4").await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.begin(Access::Read).await.unwrap();
    assert_eq!(tx.meta("k").await.unwrap().as_deref(), Some("4"), "a committed refetchable write stays");
}

async fn confirmed_state_is_replaced_and_listed<S: LocalStore>(store: &S) {
    let mut tx = write(store).await;
    tx.put_confirmed(&entity("a", 1), Some(&[1; 32])).await.unwrap();
    tx.put_confirmed(&entity("b", 2), None).await.unwrap();
    tx.put_confirmed(&entity("a", 3), Some(&[3; 32])).await.unwrap();
    tx.put_append(7, r#"{"seq":7}"#).await.unwrap();
    tx.put_append(7, r#"{"seq":7,"again":true}"#).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = write(store).await;
    let a = tx.confirmed("tasks", "a").await.unwrap().expect("a is confirmed");
    assert_eq!((a.state, a.hash), (entity("a", 3), Some([3; 32])), "put_confirmed replaces");
    assert_eq!(tx.confirmed("tasks", "b").await.unwrap().expect("b").hash, None);
    assert_eq!(tx.confirmed("other", "a").await.unwrap(), None, "entities are per collection");
    let mut all = tx.confirmed_in("tasks").await.unwrap();
    all.sort_by(|x, y| x.entity_id.cmp(&y.entity_id));
    assert_eq!(all, vec![entity("a", 3), entity("b", 2)]);
    assert_eq!(tx.confirmed_in("other").await.unwrap(), vec![]);
    tx.commit().await.unwrap();
}

/// Enough entities in one transaction that a store may write them another
/// way (the IndexedDB store writes them as segments), overridden by small and
/// big transactions after: every read answers as if each were one row.
async fn many_confirmed_entities_read_back_as_few_do<S: LocalStore>(store: &S) {
    let ids: Vec<String> = (0..300).map(|n| format!("e{n:03}")).collect();
    let mut tx = store.begin(Access::Refetchable).await.unwrap();
    for (n, id) in ids.iter().enumerate() {
        tx.put_confirmed(&entity(id, n as u64 + 1), Some(&[1; 32])).await.unwrap();
    }
    let own = tx.confirmed("tasks", "e007").await.unwrap().map(|c| c.state);
    assert_eq!(own, Some(entity("e007", 8)), "a transaction reads the many entities it confirmed");
    tx.commit().await.unwrap();
    let mut tx = store.begin(Access::Refetchable).await.unwrap();
    for id in &ids {
        tx.put_confirmed(&entity(id, 999), None).await.unwrap();
    }
    drop(tx);
    let mut tx = write(store).await;
    tx.put_confirmed(&entity("e005", 500), None).await.unwrap();
    tx.put_confirmed(&entity("new", 1), None).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.begin(Access::Refetchable).await.unwrap();
    for id in &ids[100..200] {
        tx.put_confirmed(&entity(id, 2000), None).await.unwrap();
    }
    tx.commit().await.unwrap();

    let expected = |n: usize| match n {
        5 => (entity(&ids[n], 500), None),
        100..200 => (entity(&ids[n], 2000), None),
        _ => (entity(&ids[n], n as u64 + 1), Some([1; 32])),
    };
    let mut tx = store.begin(Access::Read).await.unwrap();
    for (n, id) in ids.iter().enumerate() {
        let found = tx.confirmed("tasks", id).await.unwrap().map(|c| (c.state, c.hash));
        assert_eq!(found, Some(expected(n)), "{id}: the last committed state, whichever way it was written");
    }
    let keys: Vec<(&str, &str)> =
        ids.iter().map(|id| ("tasks", id.as_str())).chain([("tasks", "none"), ("other", "e001")]).collect();
    let many = tx.confirmed_many(&keys).await.unwrap();
    for (n, found) in many.iter().enumerate() {
        let want = (n < ids.len()).then(|| expected(n));
        assert_eq!(found.clone().map(|c| (c.state, c.hash)), want, "confirmed_many, key {n}");
    }
    let mut listed = tx.confirmed_in("tasks").await.unwrap();
    listed.sort_by(|x, y| x.entity_id.cmp(&y.entity_id));
    let mut want: Vec<EntityState> = (0..ids.len()).map(|n| expected(n).0).chain([entity("new", 1)]).collect();
    want.sort_by(|x, y| x.entity_id.cmp(&y.entity_id));
    assert_eq!(listed, want, "confirmed_in lists each entity once, in its last state");
    drop(tx);

    // Replaced wholesale by an adopted snapshot, and by clear_all.
    let mut tx = write(store).await;
    tx.clear_staged().await.unwrap();
    tx.stage_entity(&entity("s", 1), &text_of(&entity("s", 1)), None).await.unwrap();
    tx.adopt_staged().await.unwrap();
    assert_eq!(tx.confirmed("tasks", "e001").await.unwrap(), None, "adopted: the old entities are gone");
    assert_eq!(tx.confirmed_in("tasks").await.unwrap(), vec![entity("s", 1)]);
    tx.commit().await.unwrap();
    let mut tx = store.begin(Access::Refetchable).await.unwrap();
    for id in &ids {
        tx.put_confirmed(&entity(id, 7), None).await.unwrap();
    }
    tx.commit().await.unwrap();
    let mut tx = write(store).await;
    tx.clear_all(&[]).await.unwrap();
    assert_eq!(tx.confirmed_in("tasks").await.unwrap(), vec![], "clear_all drops every entity");
    tx.commit().await.unwrap();
    let mut tx = store.begin(Access::Read).await.unwrap();
    assert_eq!(tx.confirmed("tasks", "e001").await.unwrap(), None, "cleared for good");
}

async fn a_staged_snapshot_replaces_the_confirmed_state_only_when_adopted<S: LocalStore>(store: &S) {
    let mut tx = write(store).await;
    tx.put_confirmed(&entity("old", 1), Some(&[1; 32])).await.unwrap();
    tx.put_append(3, r#"{"seq":3}"#).await.unwrap();
    tx.clear_staged().await.unwrap();
    tx.stage_entity(&entity("gone", 9), &text_of(&entity("gone", 9)), None).await.unwrap();
    tx.commit().await.unwrap();
    // A new bootstrap starts over: what an unfinished one staged is dropped.
    let mut tx = write(store).await;
    tx.clear_staged().await.unwrap();
    tx.stage_entity(&entity("a", 5), &text_of(&entity("a", 5)), Some(&[5; 32])).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = write(store).await;
    tx.stage_entity(&entity("b", 6), &text_of(&entity("b", 6)), None).await.unwrap();
    tx.stage_append(6, r#"{"seq":6}"#).await.unwrap();
    assert_eq!(tx.confirmed_in("tasks").await.unwrap(), vec![entity("old", 1)], "staged entities are not confirmed");
    tx.commit().await.unwrap();
    let mut tx = write(store).await;
    tx.stage_entity(&entity("c", 7), &text_of(&entity("c", 7)), None).await.unwrap();
    drop(tx);
    let mut tx = write(store).await;
    tx.adopt_staged().await.unwrap();
    drop(tx);
    let mut tx = write(store).await;
    assert_eq!(tx.confirmed_in("tasks").await.unwrap(), vec![entity("old", 1)], "a dropped adoption is undone");
    tx.adopt_staged().await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = write(store).await;
    let mut all = tx.confirmed_in("tasks").await.unwrap();
    all.sort_by(|x, y| x.entity_id.cmp(&y.entity_id));
    assert_eq!(all, vec![entity("a", 5), entity("b", 6)], "adopted: the staged entities of committed stagings only");
    assert_eq!(tx.confirmed("tasks", "a").await.unwrap().unwrap().hash, Some([5; 32]));
    assert_eq!(tx.confirmed("tasks", "old").await.unwrap(), None, "the old confirmed state is gone");
    tx.adopt_staged().await.unwrap();
    assert_eq!(tx.confirmed_in("tasks").await.unwrap(), vec![], "adopting empties the staging area");
}

async fn outbox_keeps_order_and_status<S: LocalStore>(store: &S) {
    let mut tx = write(store).await;
    for (n, e) in [(1, "t1"), (2, "t2"), (3, "t1"), (4, "t3")] {
        tx.push_outbox(&change(n, e, 0), 100 + n as u64).await.unwrap();
    }
    let all = tx.all_entries().await.unwrap();
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "ids increase in the order changes were made");
    assert!(all.iter().all(|e| e.status == OutboxStatus::Pending && e.retries == 0 && !e.requeued));
    assert_eq!(all[0].created_at, 101);
    let (id1, id2, id3) = (all[0].id, all[1].id, all[2].id);
    tx.mark_failed(id3, "no", Some(&Conflict::clock_skew())).await.unwrap();
    tx.mark_sent(id1, 10).await.unwrap();
    let (t1, e1) = (Collection::parse("tasks").unwrap(), EntityId::parse("t1").unwrap());
    let active: Vec<i64> = tx.active_for_entity(&t1, &e1).await.unwrap().iter().map(|e| e.id).collect();
    assert_eq!(active, vec![id1], "failed entries are not active; sent ones are");
    assert_eq!(tx.active_in("tasks").await.unwrap().len(), 3);
    let pending: Vec<i64> = tx.pending_after(0, 10).await.unwrap().iter().map(|e| e.id).collect();
    assert_eq!(pending, vec![id2, all[3].id], "pending_after lists pending entries only");
    assert_eq!(tx.pending_after(id2, 10).await.unwrap().len(), 1, "pending_after starts after the id");
    assert_eq!(tx.pending_after(0, 1).await.unwrap().len(), 1, "pending_after keeps to its limit");
    assert!(!tx.has_pending_after(&t1, &e1, id1).await.unwrap(), "a failed follower is not pending");
    let t2 = EntityId::parse("t2").unwrap();
    assert!(tx.has_pending_after(&t1, &t2, 0).await.unwrap());
    assert!(!tx.has_pending_after(&t1, &t2, id2).await.unwrap());
    assert_eq!(tx.outbox_counts().await.unwrap(), (3, 1), "(active, failed)");
    let failed = tx.all_entries().await.unwrap().into_iter().find(|e| e.id == id3).unwrap();
    assert_eq!((failed.last_error.as_deref(), failed.conflict), (Some("no"), Some(Conflict::clock_skew())));
    tx.commit().await.unwrap();
}

async fn refusals_and_retries_are_recorded<S: LocalStore>(store: &S) {
    let mut tx = write(store).await;
    for n in 1..=3 {
        tx.push_outbox(&change(n, "t1", 0), 100).await.unwrap();
    }
    let ids: Vec<i64> = tx.all_entries().await.unwrap().iter().map(|e| e.id).collect();
    tx.mark_retry(ids[0], 2, 5_000, "later").await.unwrap();
    tx.mark_retry(ids[1], 4, 6_000, "later").await.unwrap();
    tx.mark_failed(ids[1], "set aside", None).await.unwrap();
    let mut restamped = change(3, "t1", 9);
    restamped.hlc = Hlc::parse("1763800009999-00000-dev-1").unwrap();
    tx.replace_change(ids[2], &restamped).await.unwrap();
    tx.reset_retries().await.unwrap();
    let all = tx.all_entries().await.unwrap();
    assert_eq!((all[0].retries, all[0].next_attempt_at), (0, 0), "reset_retries clears pending entries");
    assert_eq!(all[0].last_error.as_deref(), Some("later"), "the last error stays for the app to show");
    assert_eq!((all[1].retries, all[1].status), (4, OutboxStatus::Failed), "failed entries keep their count");
    assert_eq!(all[2].change, restamped, "replace_change replaces the change");
    assert_eq!(tx.requeue_failed().await.unwrap(), 1);
    let back = &tx.all_entries().await.unwrap()[1];
    assert_eq!((back.status, back.retries, back.conflict.clone()), (OutboxStatus::Pending, 0, None));
    tx.mark_failed(ids[1], "again", None).await.unwrap();
    assert_eq!(tx.discard_failed().await.unwrap(), 1);
    assert_eq!(tx.all_entries().await.unwrap().len(), 2);
    tx.mark_sent(ids[0], 20).await.unwrap();
    tx.mark_sent(ids[2], 21).await.unwrap();
    assert_eq!(tx.unsend_above(20).await.unwrap(), 1, "unsend_above takes back seqs above the cursor");
    let e = tx.all_entries().await.unwrap()[1].clone();
    assert_eq!((e.status, e.seq, e.requeued, e.next_attempt_at), (OutboxStatus::Pending, None, true, 0));
    tx.commit().await.unwrap();
    tx = write(store).await;
    tx.push_outbox(&change(9, "t9", 0), 100).await.unwrap();
    let newest = tx.all_entries().await.unwrap().last().unwrap().id;
    assert!(newest > ids[2], "ids are never reused, not even after a discard");
}

async fn acknowledged_changes_move_to_the_journal<S: LocalStore>(store: &S) {
    let mut tx = write(store).await;
    for n in 1..=4 {
        tx.push_outbox(&change(n, "t1", 0), 100).await.unwrap();
    }
    let ids: Vec<i64> = tx.all_entries().await.unwrap().iter().map(|e| e.id).collect();
    tx.mark_sent(ids[0], 10).await.unwrap();
    tx.mark_sent(ids[1], 11).await.unwrap();
    tx.confirm_up_to(10).await.unwrap();
    assert!(tx.confirm("c003", 12).await.unwrap(), "confirm moves a pending entry by change id");
    assert!(!tx.confirm("someone-elses", 13).await.unwrap());
    tx.mark_failed(ids[3], "no", None).await.unwrap();
    assert!(!tx.confirm("c004", 14).await.unwrap(), "a failed entry is not confirmed");
    let journal: Vec<(i64, String, u64)> = tx
        .journal_by_seq()
        .await
        .unwrap()
        .into_iter()
        .map(|j| (j.id, j.change.change_id.as_str().to_owned(), j.seq))
        .collect();
    assert_eq!(journal, vec![(ids[0], "c001".into(), 10), (ids[2], "c003".into(), 12)]);
    assert_eq!(tx.journal_len().await.unwrap(), 2);
    tx.commit().await.unwrap();
    let left: Vec<i64> = self::ids(store).await.iter().map(|e| e.0).collect();
    assert_eq!(left, vec![ids[1], ids[3]], "journaled entries leave the outbox");
}

async fn the_journal_is_trimmed_and_gives_entries_back<S: LocalStore>(store: &S) {
    let mut tx = write(store).await;
    for n in 1..=6 {
        tx.push_outbox(&change(n, &format!("t{n}"), 0), 100 + n as u64).await.unwrap();
        assert!(tx.confirm(&format!("c{n:03}"), 10 + n as u64).await.unwrap());
    }
    let journal_ids = |j: Vec<crate::store::Journaled>| j.iter().map(|e| e.id).collect::<Vec<_>>();
    let all = journal_ids(tx.journal_by_seq().await.unwrap());
    assert_eq!(tx.trim_journal(4, 0).await.unwrap(), 2, "the newest 4 are kept");
    assert_eq!(journal_ids(tx.journal_by_seq().await.unwrap()), all[2..].to_vec());
    assert_eq!(tx.trim_journal(4, 14).await.unwrap(), 2, "none at or below the horizon");
    assert_eq!(journal_ids(tx.journal_by_seq().await.unwrap()), all[4..].to_vec());
    tx.journal_to_outbox(all[4]).await.unwrap();
    let back = tx.all_entries().await.unwrap();
    assert_eq!(back.len(), 1);
    let e = &back[0];
    assert_eq!((e.id, e.status, e.requeued, e.seq), (all[4], OutboxStatus::Pending, true, None), "{e:?}");
    assert_eq!((e.change.change_id.as_str(), e.created_at), ("c005", 105), "the change and its time come back");
    assert_eq!(tx.journal_len().await.unwrap(), 1);
    assert_eq!(tx.trim_journal(0, 0).await.unwrap(), 1);
    assert_eq!(tx.journal_len().await.unwrap(), 0);
    tx.commit().await.unwrap();
}

async fn clear_all_keeps_only_the_named_meta<S: LocalStore>(store: &S) {
    let mut tx = write(store).await;
    tx.set_meta("device_id", "dev-1").await.unwrap();
    tx.set_meta("cursor", "9").await.unwrap();
    tx.put_confirmed(&entity("a", 1), None).await.unwrap();
    tx.push_outbox(&change(1, "t1", 0), 1).await.unwrap();
    tx.push_outbox(&change(2, "t2", 0), 1).await.unwrap();
    assert!(tx.confirm("c002", 3).await.unwrap());
    let last = tx.all_entries().await.unwrap()[0].id;
    tx.clear_all(&["device_id"]).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = write(store).await;
    assert_eq!(tx.meta("device_id").await.unwrap().as_deref(), Some("dev-1"));
    assert_eq!(tx.meta("cursor").await.unwrap(), None);
    assert_eq!(tx.confirmed_in("tasks").await.unwrap(), vec![]);
    assert_eq!((tx.all_entries().await.unwrap(), tx.journal_len().await.unwrap()), (vec![], 0));
    tx.push_outbox(&change(3, "t3", 0), 1).await.unwrap();
    assert!(tx.all_entries().await.unwrap()[0].id > last, "ids are not reused after clear_all");
}

async fn the_engine_writes_and_reads_offline<S: LocalStore>(store: S) {
    let engine: Engine<S, NoServer, TestClock> =
        Engine::open(store, None, TestClock::at(1_763_800_000_000), EngineOptions::default()).await.unwrap();
    let fields = |v: serde_json::Value| v.as_object().unwrap().clone();
    let first = engine.put("tasks", "t1", fields(json!({"title": "x", "done": false}))).await.unwrap();
    assert!(first.is_some());
    assert_eq!(engine.patch("tasks", "t1", fields(json!({"done": false}))).await.unwrap(), None, "no change, no write");
    engine.patch("tasks", "t1", fields(json!({"done": true}))).await.unwrap().expect("a write");
    engine.put("tasks", "t0", fields(json!({"n": 1.0}))).await.unwrap();
    engine.delete("tasks", "gone").await.unwrap();
    let t1 = engine.get("tasks", "t1").await.unwrap().expect("t1 is visible");
    assert_eq!((t1.data, t1.pending), (fields(json!({"title": "x", "done": true})), 2));
    assert_eq!(engine.get("tasks", "gone").await.unwrap(), None, "a deleted entity reads as absent");
    let listed: Vec<String> = engine.list("tasks").await.unwrap().iter().map(|e| e.id.as_str().to_owned()).collect();
    assert_eq!(listed, vec!["t0", "t1"], "list is sorted by id and skips deleted entities");
    let stats = engine.stats().await.unwrap();
    assert_eq!((stats.pending, stats.failed, stats.cursor), (4, 0, 0));
    let exported = engine.export_pending().await.unwrap();
    assert_eq!(exported[2]["data"], json!({"n": 1}), "data is kept in canonical form");
    assert_eq!(engine.sync(true).await.unwrap_err().code(), "no_server");
    assert_eq!(engine.stats().await.unwrap().last_error.expect("the failure is recorded").code, "no_server");
    let err = engine.reset(false).await.unwrap_err();
    assert_eq!(err.code(), "pending_changes");
    engine.reset(true).await.unwrap();
    assert_eq!(engine.list("tasks").await.unwrap(), vec![]);
}

async fn reads_and_confirmations_of_many_match_one_at_a_time<S: LocalStore>(store: &S) {
    let mut tx = write(store).await;
    tx.put_confirmed(&entity("a", 1), Some(&[1; 32])).await.unwrap();
    tx.put_confirmed(&entity("b", 2), None).await.unwrap();
    for (n, e) in [(1, "a"), (2, "b"), (3, "a"), (4, "c")] {
        tx.push_outbox(&change(n, e, 0), 1).await.unwrap();
    }
    let keys = [("tasks", "b"), ("tasks", "none"), ("tasks", "a")];
    let many = tx.confirmed_many(&keys).await.unwrap();
    let mut one = Vec::new();
    for (c, e) in keys {
        one.push(tx.confirmed(c, e).await.unwrap());
    }
    assert_eq!(many, one, "confirmed_many answers as confirmed, in order");
    assert!(many[1].is_none() && many[2].as_ref().is_some_and(|a| a.state.version == 1));

    let (tasks, a, x) =
        (Collection::parse("tasks").unwrap(), EntityId::parse("a").unwrap(), EntityId::parse("x").unwrap());
    let active = tx.active_for_entities(&[(&tasks, &x), (&tasks, &a)]).await.unwrap();
    assert!(active[0].is_empty());
    let ids: Vec<&str> = active[1].iter().map(|e| e.change.change_id.as_str()).collect();
    assert_eq!(ids, ["c001", "c003"], "each entity's active entries, in outbox order");

    let found = tx.confirm_many(&[("c003", 10), ("unknown", 11), ("c002", 12)]).await.unwrap();
    assert_eq!(found, 2, "only changes in the outbox are confirmed");
    let left: Vec<String> =
        tx.all_entries().await.unwrap().iter().map(|e| e.change.change_id.as_str().to_owned()).collect();
    assert_eq!(left, ["c001", "c004"]);
    let journal: Vec<u64> = tx.journal_by_seq().await.unwrap().iter().map(|j| j.seq).collect();
    assert_eq!(journal, [10, 12], "confirmed changes go to the journal at their seq");

    // Many keys (a store may then read everything at once): the same answers.
    let names: Vec<String> = (0..100).map(|i| format!("m{i:03}")).collect();
    for (i, name) in names.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        tx.put_confirmed(&entity(name, i as u64 + 1), None).await.unwrap();
        tx.push_outbox(&change(100 + i as u32, name, 0), 1).await.unwrap();
    }
    let keys: Vec<(&str, &str)> = names.iter().map(|n| ("tasks", n.as_str())).collect();
    let many = tx.confirmed_many(&keys).await.unwrap();
    for (i, found) in many.iter().enumerate() {
        assert_eq!(found.as_ref().map(|c| c.state.version), (i % 2 == 0).then_some(i as u64 + 1), "m{i:03}");
    }
    let ids: Vec<EntityId> = names.iter().map(|n| EntityId::parse(n.as_str()).unwrap()).collect();
    let pairs: Vec<(&Collection, &EntityId)> = ids.iter().map(|e| (&tasks, e)).collect();
    let active = tx.active_for_entities(&pairs).await.unwrap();
    for (i, entries) in active.iter().enumerate() {
        assert_eq!(entries.len(), usize::from(i % 2 == 0), "m{i:03}");
    }
    let change_ids: Vec<String> = (0..100).map(|i| format!("c{:03}", 100 + i)).collect();
    let confirmations: Vec<(&str, u64)> =
        change_ids.iter().enumerate().map(|(i, c)| (c.as_str(), 100 + i as u64)).collect();
    assert_eq!(tx.confirm_many(&confirmations).await.unwrap(), 50, "the 50 changes in the outbox");
    assert_eq!(tx.all_entries().await.unwrap().len(), 2, "c001 and c004 stay");
}

async fn a_batch_of_writes_is_one_transaction<S: LocalStore>(store: S) {
    use crate::local::{LocalWrite, WriteKind};
    let engine: Engine<S, NoServer, TestClock> =
        Engine::open(store, None, TestClock::at(1_763_800_000_000), EngineOptions::default()).await.unwrap();
    let fields = |v: serde_json::Value| v.as_object().unwrap().clone();
    let write = |id: &str, edit| LocalWrite { collection: "tasks".into(), entity_id: id.into(), edit };
    engine.put("tasks", "t1", fields(json!({"title": "x"}))).await.unwrap();
    let ids = engine
        .write_batch(vec![
            write("t2", WriteKind::Put(fields(json!({"title": "y"})))),
            write("t2", WriteKind::Patch(fields(json!({"done": true})))),
            write("t1", WriteKind::Patch(fields(json!({"title": "x"})))),
            write("t1", WriteKind::Delete),
        ])
        .await
        .unwrap();
    assert!(ids[0].is_some() && ids[1].is_some() && ids[3].is_some());
    assert_eq!(ids[2], None, "a write that changes nothing in the batch's view makes no change");
    let t2 = engine.get("tasks", "t2").await.unwrap().expect("t2 was written");
    assert_eq!(t2.data, fields(json!({"title": "y", "done": true})), "later writes see earlier ones");
    assert_eq!(engine.get("tasks", "t1").await.unwrap(), None);
    let stamps: Vec<String> = engine.outbox().await.unwrap().iter().map(|e| e.change.hlc.as_str().to_owned()).collect();
    assert_eq!(stamps.len(), 4);
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "stamps increase in outbox order: {stamps:?}");

    let before = engine.outbox().await.unwrap().len();
    let bad = engine
        .write_batch(vec![
            write("t3", WriteKind::Put(fields(json!({"a": 1})))),
            write("t4", WriteKind::Put(fields(json!({"a": "x".repeat(300_000)})))),
        ])
        .await;
    assert_eq!(bad.unwrap_err().code(), "invalid_input");
    assert_eq!(engine.outbox().await.unwrap().len(), before, "a batch that fails part-way writes nothing");
}

/// Two engines on one replica (two browser tabs, two processes): each
/// stamps after the other's last stamp, since the clock is read from the
/// store within the write's transaction.
async fn engines_sharing_a_replica_stamp_in_order<S: LocalStore>(store: S) {
    let open = |clock| Engine::<&S, NoServer, TestClock>::open(&store, None, clock, EngineOptions::default());
    let first = open(TestClock::at(1_763_800_000_000)).await.unwrap();
    let second = open(TestClock::seeded(1_763_800_000_000, 0x5eed)).await.unwrap();
    assert_eq!(first.device_id(), second.device_id(), "one replica, one device");
    let fields = |v: serde_json::Value| v.as_object().unwrap().clone();
    for i in 0..3 {
        first.put("tasks", "t", fields(json!({"n": i}))).await.unwrap();
        second.put("tasks", "t", fields(json!({"n": i + 10}))).await.unwrap();
    }
    let stamps: Vec<String> = first.outbox().await.unwrap().iter().map(|e| e.change.hlc.as_str().to_owned()).collect();
    assert_eq!(stamps.len(), 6);
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "every stamp follows the one before: {stamps:?}");
}
