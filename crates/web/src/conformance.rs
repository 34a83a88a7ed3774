//! `run_conformance`: the engine's store conformance suite on [`IdbStore`],
//! for a page to call. A failed check panics; the panic hook records its
//! message in `globalThis.conformanceResult` (`{ ok: false, message }`)
//! before wasm traps, since the trap cannot reject the returned promise.

use std::cell::Cell;

use wasm_bindgen::JsValue;
use wasm_bindgen::prelude::*;

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
    Ok(())
}
