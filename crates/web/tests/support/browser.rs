//! What the Rust tests that run the web package in headless Chromium share
//! (`crates/web/tests/browser_conformance.rs`, `crates/cli/tests/browser_client.rs`,
//! each including this file with `#[path]`): the skip switch, what must be
//! installed, the wasm build and running a node script.
//!
//! The wasm is built in its own target directory, so the build never waits
//! for the lock of the build running the test.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("the workspace root")
}

/// The target directory for the wasm build: never the one this test was built in.
fn wasm_target_dir(root: &Path) -> PathBuf {
    let ours = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let shared = root.join("target/wasm");
    if ours.starts_with(&shared) { root.join("target/wasm-browser") } else { shared }
}

/// The Chromium to drive (`CHROMIUM`, or Debian's).
pub fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// What is missing to run a browser test, with how to install it.
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
pub fn run(root: &Path, what: &str, command: &mut Command) {
    let output = command.current_dir(root).output().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{what} failed ({}):\n{text}", output.status);
    println!("{text}");
}

/// Builds the web package (`web/build.sh BUILD_ARGS`) for the browser test
/// `test` and returns the workspace root; `None` (and says so) when
/// `DELTASYNC_SKIP_BROWSER=1`. Panics, listing how to install it, when
/// something the test needs is missing.
pub fn build(test: &str, build_args: &[&str]) -> Option<PathBuf> {
    if std::env::var("DELTASYNC_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        println!("skipped: DELTASYNC_SKIP_BROWSER=1");
        return None;
    }
    let root = workspace();
    let missing = missing(&root);
    assert!(
        missing.is_empty(),
        "the {test} needs (set DELTASYNC_SKIP_BROWSER=1 to skip it):\n- {}",
        missing.join("\n- ")
    );
    let target = wasm_target_dir(&root);
    run(
        &root,
        "web/build.sh",
        Command::new("bash").arg("web/build.sh").args(build_args).env("CARGO_TARGET_DIR", &target),
    );
    Some(root)
}
