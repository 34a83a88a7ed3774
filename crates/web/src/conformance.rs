//! `run_conformance`: the engine's store conformance suite on [`IdbStore`],
//! for a page to call. A failed check panics; the panic hook records its
//! message in `globalThis.conformanceResult` (`{ ok: false, message }`)
//! before wasm traps, since the trap cannot reject the returned promise.

use std::cell::Cell;

use wasm_bindgen::JsValue;
use wasm_bindgen::prelude::*;

use deltasync_engine::{Access, LocalStore, StoreTx};
use deltasync_protocol::{Collection, EntityId, EntityState, Hlc, Meta};
use serde_json::json;

use crate::idb::IdbStore;

thread_local! {
    static NEXT: Cell<u64> = const { Cell::new(0) };
}

/// A database name no earlier run used.
fn unique_name() -> String {
    let n = NEXT.with(|next| {
        let n = next.get();
        next.set(n + 1);
        n
    });
    format!("deltasync-conformance-{}-{n}", js_sys::Date::now())
}

/// Records a failure where the page looks for the outcome.
fn report_failure(message: &str) {
    web_sys::console::error_1(&message.into());
    let result = js_sys::Object::new();
    let global = js_sys::global();
    // Setting plain properties on plain objects cannot fail.
    let _ = js_sys::Reflect::set(&result, &"ok".into(), &JsValue::FALSE);
    let _ = js_sys::Reflect::set(&result, &"message".into(), &message.into());
    let _ = js_sys::Reflect::set(&global, &"conformanceResult".into(), &result);
}

/// Runs the store conformance suite on fresh IndexedDB databases. Resolves
/// when every check passed; a failed check panics, which records
/// `globalThis.conformanceResult = { ok: false, message }` and traps.
#[wasm_bindgen]
pub async fn run_conformance() -> Result<(), JsValue> {
    std::panic::set_hook(Box::new(|info| report_failure(&info.to_string())));
    deltasync_engine::conformance::run(|| IdbStore::new(&unique_name())).await;
    segments_fold_and_tabs_see_the_same_entities().await;
    Ok(())
}

fn entity(id: &str, version: u64) -> EntityState {
    let hlc = Hlc::parse(format!("1763800000000-{version:05}-dev-1")).expect("valid hlc");
    EntityState {
        collection: Collection::parse("tasks").expect("valid collection"),
        entity_id: EntityId::parse(id).expect("valid entity id"),
        data: json!({ "v": version }).as_object().cloned().unwrap_or_default(),
        version,
        deleted: false,
        meta: Meta::Last { hlc },
    }
}

/// Every entity's version as `store` reads it, one at a time, many at once and listed.
async fn versions(store: &IdbStore, ids: &[String]) -> Vec<u64> {
    let mut tx = store.begin(Access::Read).await.expect("begin");
    let mut one = Vec::new();
    for id in ids {
        one.push(tx.confirmed("tasks", id).await.expect("confirmed").map_or(0, |c| c.state.version));
    }
    let keys: Vec<(&str, &str)> = ids.iter().map(|id| ("tasks", id.as_str())).collect();
    let many: Vec<u64> = tx
        .confirmed_many(&keys)
        .await
        .expect("confirmed_many")
        .iter()
        .map(|c| c.as_ref().map_or(0, |c| c.state.version))
        .collect();
    assert_eq!(many, one, "confirmed_many reads as confirmed does");
    let listed: Vec<u64> = tx.confirmed_in("tasks").await.expect("confirmed_in").iter().map(|s| s.version).collect();
    assert_eq!(listed, one.iter().copied().filter(|v| *v > 0).collect::<Vec<_>>(), "confirmed_in lists them by id");
    one
}

/// Two stores on one database (two tabs): segments one writes the other
/// reads; folds by either leave both reading the same entities; once all is
/// folded, small transactions write rows again.
async fn segments_fold_and_tabs_see_the_same_entities() {
    let name = unique_name();
    let (a, b) = (IdbStore::new(&name), IdbStore::new(&name));
    let ids: Vec<String> = (0..2_500).map(|n| format!("t{n:05}")).collect();
    let mut tx = a.begin(Access::Refetchable).await.expect("begin");
    for id in &ids {
        tx.put_confirmed(&entity(id, 1), None).await.expect("put_confirmed");
    }
    tx.commit().await.expect("commit");
    assert_eq!(a.unfolded(), 2_500, "a big transaction writes segments");
    assert_eq!(versions(&b, &ids).await, vec![1; 2_500], "another tab reads the segments");

    // While segments are live, a small write from the other tab overrides them.
    let mut tx = b.begin(Access::Write).await.expect("begin");
    tx.put_confirmed(&entity("t00007", 2), None).await.expect("put_confirmed");
    tx.commit().await.expect("commit");
    let mut want = vec![1; 2_500];
    want[7] = 2;
    assert_eq!(versions(&a, &ids).await, want, "a small write after a segment is read, not the segment");

    // Folds by both tabs, in turns, to the end.
    let mut turn = 0;
    loop {
        let left = if turn % 2 == 0 { a.fold_segment().await } else { b.fold_segment().await };
        turn += 1;
        if left.expect("fold_segment") == 0 {
            break;
        }
        assert!(turn < 10, "folds end: 2,501 entities in segments of at most 1,000");
    }
    assert_eq!(versions(&a, &ids).await, want, "tab a reads the folded rows");
    assert_eq!(versions(&b, &ids).await, want, "tab b reads the folded rows");
    assert_eq!((a.unfolded(), b.unfolded()), (0, 0), "both tabs know the segments are gone");
    assert_eq!(a.fold_segment().await.expect("fold_segment"), 0, "nothing left to fold");

    // No live segment: a small transaction writes rows, which folds need not touch.
    let mut tx = a.begin(Access::Write).await.expect("begin");
    tx.put_confirmed(&entity("t00008", 3), None).await.expect("put_confirmed");
    tx.commit().await.expect("commit");
    want[8] = 3;
    assert_eq!(versions(&b, &ids).await, want);
    assert_eq!(b.unfolded(), 0, "a small transaction wrote a row, not a segment");
}
