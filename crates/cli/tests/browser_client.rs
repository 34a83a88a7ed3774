//! The browser client end to end: builds it with `web/build.sh` (in its own
//! target directory, so it never waits for the lock of the build running this
//! test) and runs `web/tests/e2e.mjs`, which drives headless Chromium pages
//! against real `deltasync serve` processes and `deltasync client` devices of
//! this build: two browsers and a CLI converging, offline edits across a
//! reload, two tabs of one database, a refused token, a server restored from
//! an older copy, and the example app in `examples/web-tasks`.
//!
//! Needs node, Chromium and `npm ci` in web/ (`.ci/run` installs them); it
//! fails, saying how to install what is missing, unless
//! `DELTASYNC_SKIP_BROWSER=1` is set, which skips it. e2e.mjs bounds itself
//! (5 minutes) and kills the processes it started when it exits.

#[path = "../../web/tests/support/browser.rs"]
mod browser;

use std::process::Command;

#[test]
fn the_browser_client_syncs_with_real_servers_and_devices_in_chromium() {
    let Some(root) = browser::build("browser end-to-end test", &[]) else { return };
    let mut node = Command::new("node");
    browser::run(
        &root,
        "web/tests/e2e.mjs",
        node.arg("web/tests/e2e.mjs")
            .env("DELTASYNC_BIN", env!("CARGO_BIN_EXE_deltasync"))
            .env("CHROMIUM", browser::chromium())
            .env_remove("DELTASYNC_SERVER")
            .env_remove("DELTASYNC_TOKEN"),
    );
}
