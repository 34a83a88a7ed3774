//! The workload: devices that put, patch, delete and append on a few hot
//! entities and sync through fault proxies, as real `deltasync client`
//! processes, some of them killed with SIGKILL at random points. Each device
//! records what it may claim: the change ids its finished writes printed.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::rng::Rng;
use crate::common::devices::Device;

/// The collections of the workload with their merge policies (the server's
/// configuration names all but the default one).
pub const COLLECTIONS: [(&str, &str); 4] =
    [("tasks", "fields"), ("notes", "entity"), ("feed", "server"), ("claims", "reject")];

/// The hot entities every device writes, in every collection.
pub const ENTITIES: [&str; 3] = ["h0", "h1", "h2"];

/// The fields writes choose from.
const FIELDS: [&str; 4] = ["title", "done", "n", "tag"];

/// The `[server]` configuration of the workload's servers: the collections' policies.
pub fn server_config() -> String {
    let mut config = String::from("[server]\ndefault_policy = \"fields\"\n");
    for (collection, policy) in COLLECTIONS.iter().filter(|(_, p)| *p != "fields") {
        config.push_str(&format!("\n[collections.{collection}]\npolicy = \"{policy}\"\n"));
    }
    config
}

/// Sync errors a device may meet while faults are on: the network failed, or
/// the server said to come back later. Anything else is a finding.
pub const TRANSIENT_ERRORS: [&str; 3] = ["unreachable", "unavailable", "rate_limited"];

/// A change a finished local write printed.
#[derive(Debug, Clone)]
pub struct Written {
    /// The change id printed.
    pub change_id: String,
    /// Its collection.
    pub collection: String,
    /// Its entity.
    pub entity_id: String,
    /// `put`, `patch`, `delete` or `append`.
    pub command: &'static str,
}

/// What one device did during the run.
#[derive(Debug, Default, Clone)]
pub struct Record {
    /// Every change id a finished write printed.
    pub written: Vec<Written>,
    /// Writes that printed `null` (nothing to change).
    pub no_ops: u64,
    /// Writes killed before they printed anything: each may or may not be in the outbox.
    pub killed_writes: u64,
    /// Syncs that finished.
    pub syncs_ok: u64,
    /// Syncs killed.
    pub syncs_killed: u64,
    /// Syncs that failed, by error code.
    pub sync_errors: BTreeMap<String, u64>,
    /// Sync reports with `verified: false` (a mismatch found and healed).
    pub mismatches: Vec<Value>,
    /// Anything a correct system never does (a write that failed, an unknown error).
    pub unexpected: Vec<String>,
}

/// A device of the workload: a local database, optionally with its clock skewed by libfaketime.
#[derive(Debug, Clone)]
pub struct FaultDevice {
    /// The device.
    pub device: Device,
    /// A libfaketime offset such as `+10m`, for a device whose clock is wrong.
    pub skew: Option<String>,
}

/// The libfaketime library, which `LD_PRELOAD` puts under a process to shift its clock.
pub fn libfaketime() -> &'static str {
    const CANDIDATES: [&str; 3] = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    CANDIDATES.iter().find(|p| Path::new(p).exists()).copied().unwrap_or_else(|| {
        panic!(
            "libfaketime is not installed (looked in {CANDIDATES:?}): the fault test skews one device's clock with it; \
             install it with `apt-get install -y --no-install-recommends faketime` (.ci/run does)"
        )
    })
}

impl FaultDevice {
    /// The command `deltasync client … ARGS`, under libfaketime when the device is skewed.
    /// The library is preloaded into the `deltasync` process itself (not run through the
    /// `faketime` wrapper), so that killing the child kills the client.
    pub fn command(&self, server: Option<&str>, args: &[&str]) -> Command {
        let mut cmd = self.device.command(server, args);
        if let Some(offset) = &self.skew {
            cmd.env("LD_PRELOAD", libfaketime()).env("FAKETIME", offset).env("DONT_FAKE_MONOTONIC", "1");
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    }
}

/// How a process ended.
pub enum Ended {
    /// Exited 0 with this stdout.
    Ok(String),
    /// Exited non-zero: the error code of the last stderr line, and all of stderr.
    Failed(String, String),
    /// Killed by the harness.
    Killed,
}

/// Waits for `child`, killing it with SIGKILL after `kill_after` if it is still running.
pub fn finish(mut child: Child, kill_after: Option<Duration>) -> Ended {
    if let Some(after) = kill_after {
        let started = Instant::now();
        while started.elapsed() < after {
            if child.try_wait().expect("poll a client process").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("wait for a client process");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    match out.status.code() {
        None => Ended::Killed,
        Some(0) => Ended::Ok(stdout),
        Some(_) => {
            let code = stderr
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<Value>(l).ok())
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "no_error_line".to_owned());
            Ended::Failed(code, stderr)
        }
    }
}

/// A random small value for a field.
fn value(rng: &mut Rng) -> Value {
    match rng.below(3) {
        0 => json!(rng.below(100)),
        1 => json!(rng.chance(500)),
        _ => json!(format!("v{}", rng.below(1000))),
    }
}

/// An object of `1..=max` random fields.
fn fields(rng: &mut Rng, max: u64) -> Map<String, Value> {
    let mut map = Map::new();
    for _ in 0..rng.between(1, max) {
        map.insert((*rng.pick(&FIELDS)).to_owned(), value(rng));
    }
    map
}

/// One device's loop: until `stop`, one command at a time, each a write (put,
/// patch, delete, append on a hot entity) or a sync through one of `urls`;
/// writes are killed with a 10% chance within 25 ms, syncs with 15% within 600 ms.
pub fn drive(device: &FaultDevice, urls: &[String], mut rng: Rng, stop: &AtomicBool) -> Record {
    let mut record = Record::default();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        // put, patch, delete, append, sync
        let action = rng.weighted(&[20, 30, 8, 15, 27]);
        if action == 4 {
            let url = rng.pick(urls).clone();
            let kill = rng.chance(150).then(|| Duration::from_millis(rng.below(600)));
            let child = device.command(Some(&url), &["sync"]).spawn().expect("start a sync");
            match finish(child, kill) {
                Ended::Ok(stdout) => {
                    record.syncs_ok += 1;
                    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
                    if report["verified"] != true {
                        record.mismatches.push(report);
                    }
                }
                Ended::Failed(code, stderr) => {
                    if !TRANSIENT_ERRORS.contains(&code.as_str()) {
                        record.unexpected.push(format!("sync failed with {code}: {stderr}"));
                    }
                    *record.sync_errors.entry(code).or_insert(0) += 1;
                }
                Ended::Killed => record.syncs_killed += 1,
            }
        } else {
            let (collection, _) = *rng.pick(&COLLECTIONS);
            let entity = *rng.pick(&ENTITIES);
            let (command, payload) = match action {
                0 => ("put", Some(Value::Object(fields(&mut rng, 3)))),
                1 => ("patch", Some(Value::Object(fields(&mut rng, 2)))),
                2 => ("delete", None),
                _ => ("append", Some(json!({"op": "add", "n": n, "by": device.device.name}))),
            };
            let text = payload.map(|p| p.to_string());
            let mut args = vec![command, collection, entity];
            args.extend(text.as_deref());
            let kill = rng.chance(100).then(|| Duration::from_millis(rng.below(25)));
            let child = device.command(None, &args).spawn().expect("start a write");
            match finish(child, kill) {
                Ended::Ok(stdout) => match serde_json::from_str::<Value>(stdout.trim()) {
                    Ok(Value::String(change_id)) => record.written.push(Written {
                        change_id,
                        collection: collection.to_owned(),
                        entity_id: entity.to_owned(),
                        command,
                    }),
                    Ok(Value::Null) if command == "put" || command == "patch" => record.no_ops += 1,
                    other => record.unexpected.push(format!("{command} printed {other:?}: {stdout:?}")),
                },
                Ended::Failed(code, stderr) => {
                    record.unexpected.push(format!("{command} {collection} {entity} failed with {code}: {stderr}"))
                }
                Ended::Killed => record.killed_writes += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(rng.below(40)));
    }
    record
}
