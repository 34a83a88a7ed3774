//! The IndexedDB store passes the engine's store conformance suite in
//! headless Chromium: builds the wasm with `web/build.sh` (in its own target
//! directory, so it never waits for the lock of the build running this test)
//! and runs `web/tests/conformance.mjs`.
//!
//! Needs node, Chromium and `npm ci` in web/ (`.ci/run` installs them); it
//! fails, saying how to install what is missing, unless
//! `DELTASYNC_SKIP_BROWSER=1` is set, which skips it.

#[path = "support/browser.rs"]
mod browser;

use std::process::Command;

#[test]
fn the_indexeddb_store_passes_the_conformance_suite_in_chromium() {
    let Some(root) = browser::build("browser conformance test", &["--conformance"]) else { return };
    let mut node = Command::new("node");
    browser::run(
        &root,
        "web/tests/conformance.mjs",
        node.arg("web/tests/conformance.mjs").env("CHROMIUM", browser::chromium()),
    );
}
