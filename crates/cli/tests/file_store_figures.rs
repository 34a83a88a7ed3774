//! Figures, not checks: what syncing through a file store costs on each kind
//! of store (a folder, WebDAV served by wsgidav, S3 served by moto), with the
//! data real apps send (random UUID ids, ~150-byte documents). Every test is
//! ignored; run them by hand, in release mode, one at a time:
//!
//! ```sh
//! cargo test --release -p deltasync-cli --test file_store_figures -- --ignored --nocapture --test-threads=1
//! ```
//!
//! - `bootstrap_100k`: one device imports 100,000 entities and pushes them
//!   (the command line's batches); a new device's first sync (a bootstrap
//!   from the newest snapshot and the segments after it), its peak RSS; a
//!   sync with nothing new; a one-field edit.
//! - `small_syncs`: four devices in one process, each writing one entity and
//!   syncing, in a loop for 10 s: syncs per second and the latency of each.

mod common;
#[path = "../../client/tests/support/stores.rs"]
mod stores;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{binary, random_uuid};
use deltasync_client::{Client, ClientOptions};
use serde_json::{Value, json};

/// The stores measured, started fresh for each figure.
fn stores() -> Vec<stores::TestStore> {
    let mut out = Vec::new();
    for started in [stores::folder(), stores::wsgidav(), stores::moto()] {
        match started {
            Ok(s) => out.push(s),
            Err(why) => eprintln!("skipped: {why}"),
        }
    }
    out
}

/// Runs `deltasync client --db DB ARGS…` with the store's environment;
/// returns its stdout, the wall time and the peak RSS in KiB (sampled from /proc every 10 ms).
fn client(store: &stores::TestStore, db: &Path, args: &[&str]) -> (String, Duration, u64) {
    let start = Instant::now();
    let mut child = Command::new(binary())
        .args(["client", "--db"])
        .arg(db)
        .args(["--store", &store.url, "--timeout", "0"])
        .args(args)
        .envs(store.env.iter().cloned())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status_file)
            && let Some(line) = text.lines().find(|l| l.starts_with("VmHWM:"))
        {
            peak = peak.max(line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0));
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let elapsed = start.elapsed();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    (String::from_utf8(out.stdout).unwrap(), elapsed, peak)
}

/// 100,000 entities with random UUID ids and ~150-byte documents, as NDJSON snapshot lines.
fn snapshot_file(dir: &Path, entities: usize) -> (std::path::PathBuf, String) {
    let path = dir.join("snapshot.ndjson");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut first = String::new();
    for i in 0..entities {
        let id = random_uuid();
        if i == 0 {
            first = id.clone();
        }
        let data = json!({"title": format!("task {i} {}", "x".repeat(60)), "done": i % 2 == 0, "priority": i % 5, "tags": ["home", "work"]});
        writeln!(file, "{}", json!({"collection": "tasks", "entity_id": id, "data": data})).unwrap();
    }
    file.flush().unwrap();
    (path, first)
}

fn report(out: &str) -> Value {
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

#[test]
#[ignore = "figures: run by hand in release mode"]
fn bootstrap_100k() {
    const ENTITIES: usize = 100_000;
    for store in stores() {
        let dir = tempfile::tempdir().unwrap();
        let (file, first) = snapshot_file(dir.path(), ENTITIES);
        let writer = dir.path().join("w.db");
        client(&store, &writer, &["import", file.to_str().unwrap()]);
        let (out, push, push_rss) = client(&store, &writer, &["sync"]);
        assert_eq!(report(&out)["applied"], ENTITIES);
        let fresh = dir.path().join("n.db");
        let (out, boot, boot_rss) = client(&store, &fresh, &["sync"]);
        let r = report(&out);
        assert_eq!((&r["bootstrapped"], &r["verified"]), (&json!(ENTITIES), &json!(true)), "{r}");
        let (_, quiet, _) = client(&store, &fresh, &["sync"]);
        client(&store, &fresh, &["patch", "tasks", &first, r#"{"priority":4}"#]);
        let (out, edit, _) = client(&store, &fresh, &["sync"]);
        assert_eq!(report(&out)["applied"], 1);
        println!(
            "{:8} push {ENTITIES} from one device: {:.1} s ({:.0} changes/s, peak {} MiB) | new device: {:.2} s, peak {} MiB | nothing new: {} ms | one-field edit (new process): {} ms",
            store.name,
            push.as_secs_f64(),
            ENTITIES as f64 / push.as_secs_f64(),
            push_rss / 1024,
            boot.as_secs_f64(),
            boot_rss / 1024,
            quiet.as_millis(),
            edit.as_millis(),
        );
    }
}

#[test]
#[ignore = "figures: run by hand in release mode"]
fn small_syncs() {
    // Each store is measured in a child test process that gets the store's
    // credentials in its environment (clients read them from there).
    for store in stores() {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "small_syncs_on_one_store", "--nocapture"])
            .env("DELTASYNC_FIGURES_STORE", &store.url)
            .env("DELTASYNC_FIGURES_NAME", store.name)
            .envs(store.env.iter().cloned())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        for line in text.lines().filter(|l| l.contains("devices, one write")) {
            println!("{line}");
        }
    }
}

#[test]
#[ignore = "figures: run by small_syncs"]
fn small_syncs_on_one_store() {
    const DEVICES: usize = 4;
    const SECONDS: u64 = 10;
    let (Ok(url), Ok(name)) = (std::env::var("DELTASYNC_FIGURES_STORE"), std::env::var("DELTASYNC_FIGURES_NAME"))
    else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let latencies = runtime.block_on(async {
        let clients: Vec<Client> = (0..DEVICES)
            .map(|i| {
                let options = ClientOptions { store: Some(url.clone()), ..Default::default() };
                Client::open(dir.path().join(format!("d{i}.db")), options).unwrap()
            })
            .collect();
        for c in &clients {
            c.sync().await.unwrap();
        }
        let end = Instant::now() + Duration::from_secs(SECONDS);
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|c| {
                tokio::spawn(async move {
                    let mut took = Vec::new();
                    while Instant::now() < end {
                        let data = json!({"title": "a small change", "done": false});
                        c.put("tasks", &random_uuid(), data.as_object().unwrap().clone()).unwrap();
                        let start = Instant::now();
                        c.sync().await.unwrap();
                        took.push(start.elapsed());
                    }
                    took
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    let mut sorted = latencies;
    sorted.sort();
    let pct = |p: f64| sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1000.0;
    println!(
        "{name:8} {DEVICES} devices, one write + sync each, in a loop for {SECONDS} s: {} syncs ({:.0}/s), p50 {:.1} ms, p99 {:.1} ms",
        sorted.len(),
        sorted.len() as f64 / SECONDS as f64,
        pct(0.5),
        pct(0.99),
    );
}
