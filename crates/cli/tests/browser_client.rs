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

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("the workspace root")
}

/// The target directory for the wasm build: never the one this test was built in.
fn wasm_target_dir(root: &Path) -> PathBuf {
    let ours = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let shared = root.join("target/wasm");
    if ours.starts_with(&shared) { root.join("target/wasm-browser") } else { shared }
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// What is missing to run the browser test, with how to install it.
fn missing(root: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    if Command::new("node").arg("--version").output().map_or(true, |o| !o.status.success()) {
        missing.push("node 20 or later, with npm (Debian 12's nodejs package is 18)".to_owned());
    }
    if !chromium().exists() {
        missing.push(format!(
            "Chromium at {}: apt-get install -y --no-install-recommends chromium (or set CHROMIUM)",
            chromium().display()
        ));
    }
    if !root.join("web/node_modules/playwright-core/package.json").exists() {
        missing.push("playwright-core: cd web && npm ci".to_owned());
    }
    missing
}

/// Runs a command in the workspace, printing its output, and panicking with it when it fails.
fn run(root: &Path, what: &str, command: &mut Command) {
    let output = command.current_dir(root).output().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{what} failed ({}):\n{text}", output.status);
    println!("{text}");
}

#[test]
fn the_browser_client_syncs_with_real_servers_and_devices_in_chromium() {
    if std::env::var("DELTASYNC_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        println!("skipped: DELTASYNC_SKIP_BROWSER=1");
        return;
    }
    let root = workspace();
    let missing = missing(&root);
    assert!(
        missing.is_empty(),
        "the browser end-to-end test needs (set DELTASYNC_SKIP_BROWSER=1 to skip it):\n- {}",
        missing.join("\n- ")
    );
    let target = wasm_target_dir(&root);
    run(&root, "web/build.sh", Command::new("bash").arg("web/build.sh").env("CARGO_TARGET_DIR", &target));
    let mut node = Command::new("node");
    run(
        &root,
        "web/tests/e2e.mjs",
        node.arg("web/tests/e2e.mjs")
            .env("DELTASYNC_BIN", env!("CARGO_BIN_EXE_deltasync"))
            .env("CHROMIUM", chromium())
            .env_remove("DELTASYNC_SERVER")
            .env_remove("DELTASYNC_TOKEN"),
    );
}
