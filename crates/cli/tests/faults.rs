//! A randomized fault test: devices write and sync through fault proxies
//! (latency, drops, resets, partitions) while servers are killed with SIGKILL,
//! client processes are killed mid-command, one device's clock is skewed, the
//! PostgreSQL cluster is restarted (when allowed), and a hostile user holds
//! stalled connections while another user's syncs are timed. When the faults
//! stop, every device must deliver its outbox, and:
//!
//! - every change a write acknowledged is in the log exactly once (or failed
//!   for good under `reject`), and the log's chain verifies;
//! - every device's state equals a replay of the log under the policies, with
//!   the server's `state_digest` and chain head, and its last sync `verified`;
//! - the other user's syncs stayed within a bound while the hostile user
//!   stalled the server (outside the server's own outages).
//!
//! The SQLite pass (one server) always runs; the PostgreSQL pass (two servers
//! on one database) when `DELTASYNC_TEST_POSTGRES` is set, with a cluster
//! restart only when `DELTASYNC_TEST_PG_RESTART=1`. `DELTASYNC_FAULT_SEED`
//! replays a run's choices (printed at the start of each pass);
//! `DELTASYNC_FAULT_SOAK_SECS=N` runs the faults for N seconds instead of 45.
//! See docs/reliability.md.

mod common;
mod verify;

mod faults {
    pub mod chaos;
    pub mod check;
    pub mod hostile;
    pub mod probe;
    pub mod proxy;
    pub mod rng;
    pub mod workload;
}

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::devices::Device;
use common::{Backend, now_ms, run_cli};
use faults::chaos::Cluster;
use faults::check::{DeviceEnd, check_acknowledged, check_chain, check_device, policies, replay};
use faults::hostile::{Hostile, HostileShape, HostileStats, seed_dataset};
use faults::probe::{Sample, probe, quantile};
use faults::rng::Rng;
use faults::workload::{COLLECTIONS, Ended, FaultDevice, Record, TRANSIENT_ERRORS, Written, drive, finish};
use serde_json::Value;

/// The seed when `DELTASYNC_FAULT_SEED` is not set.
const DEFAULT_SEED: u64 = 20_261_130;
/// How long faults run in CI, per pass.
const CI_FAULT_SECS: u64 = 45;
/// Devices of the workload's user (the first has a skewed clock).
const DEVICES: usize = 4;
/// The bound on another user's sync while the hostile user stalls the server.
const PROBE_BOUND: Duration = Duration::from_secs(5);
/// After a server's outage ends, its first answers are not held to the bound for this long.
const OUTAGE_SETTLE: Duration = Duration::from_secs(2);
/// The deadlines the test servers run with (short, so that a run sees many of them).
const HEADER_TIMEOUT_SECS: u64 = 5;
const BODY_TIMEOUT_SECS: u64 = 10;
const WRITE_TIMEOUT_SECS: u64 = 10;
/// How long the workload, the probe and the hostile user go on after the other faults
/// stop: time for fresh unread bootstraps to meet the write deadline with no server killed.
const QUIET: Duration = Duration::from_secs(WRITE_TIMEOUT_SECS + 10);
/// How long a connection of the hostile user may live past its deadline (a loaded machine).
const DEADLINE_SLACK: Duration = Duration::from_secs(5);
/// Sync rounds allowed, once faults stop, for every outbox to drain.
const SETTLE_ROUNDS: usize = 8;
const SECRET: &str = "fault-test-secret";

/// The passes share two cores: one at a time.
static ONE_PASS_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The run's seed and length, from the environment.
struct Settings {
    seed: u64,
    faults_for: Duration,
}

impl Settings {
    fn from_env() -> Settings {
        let seed = match std::env::var("DELTASYNC_FAULT_SEED") {
            Ok(s) => s.trim().parse().unwrap_or_else(|_| panic!("DELTASYNC_FAULT_SEED={s:?} is not an integer")),
            Err(_) => DEFAULT_SEED,
        };
        let secs = match std::env::var("DELTASYNC_FAULT_SOAK_SECS") {
            Ok(s) => s
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("DELTASYNC_FAULT_SOAK_SECS={s:?} is not a number of seconds")),
            Err(_) => CI_FAULT_SECS,
        };
        Settings { seed, faults_for: Duration::from_secs(secs) }
    }
}

/// The servers' configuration: the workload's policies and short connection deadlines.
fn server_config() -> String {
    format!(
        "{}\n",
        faults::workload::server_config().replacen(
            "[server]\n",
            &format!(
                "[server]\nheader_read_timeout_secs = {HEADER_TIMEOUT_SECS}\nbody_read_timeout_secs = {BODY_TIMEOUT_SECS}\n\
                 write_timeout_secs = {WRITE_TIMEOUT_SECS}\n"
            ),
            1
        )
    )
}

/// Sets `stop` when dropped, so that a panic in the fault loop still ends the device threads.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A token for `user`, minted by `deltasync token` with the servers' secret.
fn token(secret_file: &std::path::Path, user: &str) -> String {
    let (status, out, err) =
        run_cli(&["token", "--user", user, "--secret-file", &secret_file.display().to_string(), "--ttl", "2h"]);
    assert!(status.success(), "deltasync token failed: {err}");
    out.trim().to_owned()
}

/// Writes once on the skewed device before it ever syncs and checks that its stamp
/// is off by the skew: libfaketime really moves the Rust binary's clock.
fn check_skew(device: &FaultDevice, offset_ms: i64) -> Written {
    let out = device.command(None, &["patch", "tasks", "h0", r#"{"title":"skewed"}"#]).output().unwrap();
    assert!(out.status.success(), "the skewed device's first write failed: {out:?}");
    let change_id: Value = serde_json::from_slice(&out.stdout).unwrap();
    let change_id = change_id.as_str().expect("a change id").to_owned();
    let pending = device.device.export_pending();
    let hlc = pending[0]["hlc"].as_str().unwrap();
    let stamped: i64 = hlc[..13].parse().unwrap();
    let off = stamped - now_ms() as i64;
    assert!(
        (off - offset_ms).abs() < 30_000,
        "the skewed device stamped {hlc}, {off} ms from now, not about {offset_ms} ms: libfaketime did not take"
    );
    Written { change_id, collection: "tasks".into(), entity_id: "h0".into(), command: "patch" }
}

/// Syncs every device until none has anything pending (at most `SETTLE_ROUNDS` rounds),
/// then once more each, so that every device holds what the others pushed last.
/// Returns each device's last sync report.
fn settle(devices: &[FaultDevice], urls: &[String]) -> Vec<Value> {
    let sync = |i: usize, d: &FaultDevice, url: &str| -> Result<Value, (String, String)> {
        match finish(d.command(Some(url), &["sync"]).spawn().unwrap(), None) {
            Ended::Ok(stdout) => Ok(serde_json::from_str(stdout.trim()).unwrap()),
            Ended::Failed(code, stderr) => Err((code, stderr)),
            Ended::Killed => panic!("device {i}'s sync was killed after faults stopped"),
        }
    };
    let mut clear = false;
    for round in 0..SETTLE_ROUNDS {
        clear = true;
        for (i, d) in devices.iter().enumerate() {
            match sync(i, d, &urls[(i + round) % urls.len()]) {
                Ok(report) => clear &= report["pending"] == 0,
                Err((code, stderr)) => {
                    assert!(
                        TRANSIENT_ERRORS.contains(&code.as_str()),
                        "{}: sync failed with {code}: {stderr}",
                        d.device.name
                    );
                    clear = false;
                }
            }
        }
        if clear {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if !clear {
        let stuck: Vec<(String, Value, Vec<Value>)> =
            devices.iter().map(|d| (d.device.name.clone(), d.device.status(), d.device.export_pending())).collect();
        panic!("outboxes still hold changes {SETTLE_ROUNDS} sync rounds after faults stopped: {stuck:#?}");
    }
    devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            sync(i, d, &urls[i % urls.len()])
                .unwrap_or_else(|(code, e)| panic!("{}: final sync failed with {code}: {e}", d.device.name))
        })
        .collect()
}

/// What a device shows now.
fn device_end(d: &FaultDevice, record: Record, last_report: Value) -> DeviceEnd {
    let lists: BTreeMap<String, Value> = COLLECTIONS.iter().map(|(c, _)| ((*c).to_owned(), d.device.list(c))).collect();
    DeviceEnd {
        name: d.device.name.clone(),
        device_id: d.device.device_id(),
        record,
        status: d.device.status(),
        failed: d.device.export_pending().into_iter().filter(|c| c["state"] == "failed").collect(),
        lists,
        last_report,
    }
}

/// Checks and prints the other user's sync latencies: outside the server's outages,
/// every sync succeeded within [`PROBE_BOUND`].
fn check_probe(samples: &[Sample], cluster: &Cluster, quiet_from: Instant) {
    let (during_outage, clear): (Vec<&Sample>, Vec<&Sample>) =
        samples.iter().partition(|s| cluster.outages.overlaps(0, s.start, s.end(), OUTAGE_SETTLE));
    let failed: Vec<&&Sample> = clear.iter().filter(|s| s.error.is_some()).collect();
    let mut took: Vec<Duration> = clear.iter().map(|s| s.took).collect();
    took.sort();
    println!(
        "probe (user bob, sync through a clean proxy): {} syncs outside outages, p50 {:?}, p99 {:?}, max {:?}; \
         {} during outages (not held to the bound), {} failed outside outages",
        took.len(),
        quantile(&took, 0.5),
        quantile(&took, 0.99),
        took.last().copied().unwrap_or_default(),
        during_outage.len(),
        failed.len()
    );
    let mut quiet: Vec<Duration> = clear.iter().filter(|s| s.start >= quiet_from).map(|s| s.took).collect();
    quiet.sort();
    println!(
        "probe, of which after the other faults stopped (workload and hostile user only): {} syncs, p50 {:?}, p99 {:?}, max {:?}",
        quiet.len(),
        quantile(&quiet, 0.5),
        quantile(&quiet, 0.99),
        quiet.last().copied().unwrap_or_default()
    );
    assert!(took.len() >= 20, "too few probe syncs outside outages to measure: {}", took.len());
    assert!(failed.is_empty(), "another user's syncs failed while only the hostile user stalled: {failed:?}");
    let max = *took.last().unwrap();
    assert!(max <= PROBE_BOUND, "another user's sync took {max:?}, over the bound of {PROBE_BOUND:?}");
}

/// Checks that the server let go of every stalled connection within its deadline.
fn check_hostile(stats: &HostileStats) {
    println!("hostile user: endless headers: {}", stats.headers.summary());
    println!("hostile user: trickled bodies: {}", stats.bodies.summary());
    println!("hostile user: silent connections: {}", stats.idle.summary());
    println!(
        "hostile user: unread bootstraps: {}; {} refused (over the per-user cap); bytes sent before the server gave up: {:?}",
        stats.bootstraps.summary(),
        stats.bootstraps_refused,
        stats.bootstrap_bytes_after_close
    );
    let kinds = [
        ("endless header", &stats.headers, HEADER_TIMEOUT_SECS),
        ("silent connection", &stats.idle, HEADER_TIMEOUT_SECS),
        ("trickled body", &stats.bodies, BODY_TIMEOUT_SECS),
    ];
    for (what, kind, secs) in kinds {
        assert!(kind.closed_by_server > 0, "the server never closed a {what}: {kind:?}");
        let longest = kind.longest();
        let deadline = Duration::from_secs(secs) + DEADLINE_SLACK;
        assert!(longest <= deadline, "a {what} was held {longest:?}, past its deadline of {secs} s (+ slack)");
    }
    assert!(
        stats.bootstraps.closed_by_server > 0,
        "no unread bootstrap was abandoned by the server (write_timeout_secs = {WRITE_TIMEOUT_SECS}): {:?}",
        stats.bootstraps
    );
    assert!(
        stats.bootstraps_refused > 0,
        "3 bootstraps of one user were streamed at once, over max_bootstraps_per_user (2): {:?}",
        stats.bootstraps
    );
}

/// Prints what the faults did and what each device did; checks that nothing
/// unexpected happened during the faults.
fn summarize_run(cluster: &Cluster, devices: &[FaultDevice], records: &[Record], faults_for: Duration) {
    println!(
        "faults ran {:?}, then {QUIET:?} without: {} server kills, {} partitions, PostgreSQL restarted: {}, proxies: {:?}",
        faults_for,
        cluster.kills,
        cluster.partitions,
        cluster.pg_restarted,
        cluster.proxies.iter().map(|p| p.stats()).collect::<Vec<_>>()
    );
    for o in cluster.outages.list() {
        println!("outage: {} ({:?})", o.what, o.end.map(|e| e - o.start));
    }
    for (d, r) in devices.iter().zip(records) {
        println!(
            "{}: {} writes acknowledged, {} no-ops, {} writes killed, {} syncs ok, {} killed, errors {:?}",
            d.device.name,
            r.written.len(),
            r.no_ops,
            r.killed_writes,
            r.syncs_ok,
            r.syncs_killed,
            r.sync_errors
        );
        assert!(r.unexpected.is_empty(), "{}: {:#?}", d.device.name, r.unexpected);
        assert!(
            r.mismatches.is_empty(),
            "{}: a sync found a mismatch under faults: {:#?}",
            d.device.name,
            r.mismatches
        );
    }
    assert!(cluster.kills > 0, "no server was killed");
    assert!(cluster.pg.is_none() || cluster.pg_restarted, "the PostgreSQL restart was due but not done");
}

/// Once faults have stopped: every outbox drains, the log is whole, and every
/// device converges on the replayed log with the servers' hashes.
fn check_convergence(cluster: &Cluster, devices: &[FaultDevice], records: Vec<Record>, urls: &[String], token: &str) {
    let reports = settle(devices, urls);
    let ends: Vec<DeviceEnd> =
        devices.iter().zip(records).zip(reports).map(|((d, record), report)| device_end(d, record, report)).collect();
    let server = common::devices::server_status(&cluster.servers[0].url, Some(token));
    for other in &cluster.servers[1..] {
        let st = common::devices::server_status(&other.url, Some(token));
        for key in ["head", "state_hash", "state_digest"] {
            assert_eq!(st[key], server[key], "the two servers disagree on {key}");
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (log, pages) =
        rt.block_on(verify::pull_all_as(&common::client(), &cluster.servers[0].url, "auditor", 500, Some(token)));
    check_chain(&log, &pages, &server);
    check_acknowledged(&log, &ends);
    let replayed = replay(&log, &policies());
    for end in &ends {
        check_device(end, &replayed, &server);
    }
    let failed: usize = ends.iter().map(|e| e.failed.len()).sum();
    println!(
        "log: {} changes ({} appends), {failed} changes failed for good under reject; every device at head {} with digest {}",
        log.len(),
        log.iter().filter(|c| c["op"] == "append").count(),
        server["head"],
        server["state_digest"]
    );
}

/// The other user's device drains its outbox and stands at the server's hashes.
fn check_other_user(cluster: &Cluster, prober: &FaultDevice, url: String, token: &str) {
    let bob_report = settle(std::slice::from_ref(prober), &[url]);
    let bob_server = common::devices::server_status(&cluster.servers[0].url, Some(token));
    let bob_status = prober.device.status();
    for (key, server_key) in [("cursor", "head"), ("state_hash", "state_hash"), ("state_digest", "state_digest")] {
        assert_eq!(bob_status[key], bob_server[server_key], "bob: {key}");
    }
    assert_eq!(bob_report[0]["verified"], true, "bob: {}", bob_report[0]);
}

store_test!(#[test] fn faults_lose_no_acknowledged_change_and_every_device_converges);
fn faults_lose_no_acknowledged_change_and_every_device_converges(backend: &Backend) {
    let _one = ONE_PASS_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let settings = Settings::from_env();
    let store = if backend.is_postgres() { "postgres" } else { "sqlite" };
    println!(
        "fault run on {store}: DELTASYNC_FAULT_SEED={} DELTASYNC_FAULT_SOAK_SECS={}",
        settings.seed,
        settings.faults_for.as_secs()
    );
    let mut rng = Rng::new(settings.seed ^ if backend.is_postgres() { 0x5047 } else { 0x5351 });
    let servers = if backend.is_postgres() { 2 } else { 1 };
    let mut cluster = Cluster::start(backend, servers, &server_config(), SECRET, &mut rng);
    let secret_file = cluster.servers[0].secret_file();
    let (alice, bob, mallory) =
        (token(&secret_file, "alice"), token(&secret_file, "bob"), token(&secret_file, "mallory"));
    seed_dataset(&cluster.servers[0].url, &mallory, 4000);

    let dir = tempfile::tempdir().unwrap();
    let skew_ms: i64 = if rng.chance(500) { 10 * 60_000 } else { -10 * 60_000 };
    let devices: Vec<FaultDevice> = (0..DEVICES)
        .map(|i| FaultDevice {
            device: Device { token: Some(alice.clone()), ..Device::new(dir.path(), &format!("d{i}")) },
            skew: (i == 0).then(|| format!("{:+}m", skew_ms / 60_000)),
        })
        .collect();
    let skewed_write = check_skew(&devices[0], skew_ms);
    println!("device d0 runs {} minutes off under libfaketime", skew_ms / 60_000);
    let prober =
        FaultDevice { device: Device { token: Some(bob.clone()), ..Device::new(dir.path(), "bob") }, skew: None };
    let hostile = Hostile::start(
        cluster.clean.clone(),
        mallory.clone(),
        HostileShape {
            headers: 4,
            bodies: 4,
            bootstraps: 3,
            bootstrap_hold: Duration::from_secs(WRITE_TIMEOUT_SECS + 5),
            idle: 100,
        },
        cluster.outages.clone(),
    );

    let urls = cluster.urls();
    let clean_url = cluster.clean.url().to_owned();
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let until = started + settings.faults_for;
    let mut fault_rng = rng.fork();
    let mut quiet_from = Instant::now();
    let (mut records, samples) = std::thread::scope(|s| {
        let (urls, stop) = (&urls, &stop);
        let workers: Vec<_> = devices
            .iter()
            .map(|d| {
                let rng = rng.fork();
                s.spawn(move || drive(d, urls, rng, stop))
            })
            .collect();
        let probe = s.spawn(|| probe(&prober, &clean_url, Duration::from_millis(150), stop));
        let _stop = StopOnDrop(stop);
        cluster.run_faults(&mut fault_rng, until);
        quiet_from = Instant::now();
        hostile.restart_bootstraps();
        std::thread::sleep(QUIET);
        stop.store(true, Ordering::SeqCst);
        let records: Vec<Record> = workers.into_iter().map(|w| w.join().expect("a device thread panicked")).collect();
        (records, probe.join().expect("the probe panicked"))
    });
    let hostile = hostile.stop();
    records[0].written.push(skewed_write);
    cluster.calm();
    summarize_run(&cluster, &devices, &records, quiet_from - started);
    check_convergence(&cluster, &devices, records, &urls, &alice);
    check_other_user(&cluster, &prober, clean_url, &bob);

    // The hostile user was let go, and did not delay the other user.
    check_probe(&samples, &cluster, quiet_from);
    check_hostile(&hostile);
}
