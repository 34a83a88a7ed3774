//! `deltasync bench` runs every workload end to end at a small size and writes
//! a report with a figure for each. It checks the harness, not the speed: on a
//! fresh SQLite file, and on PostgreSQL (two server instances sharing the
//! database named by `DELTASYNC_TEST_POSTGRES`, in a schema the bench makes and
//! drops).

mod common;

use std::path::Path;

use common::binary;
use serde_json::{Value, json};

/// Runs `deltasync bench` at a small size with `extra` flags; returns its JSON report and its stderr.
fn run_bench(dir: &Path, extra: &[&str]) -> (Value, String) {
    let out = dir.join("bench.json");
    let output = std::process::Command::new(binary())
        .args([
            "bench",
            "--entities",
            "800",
            "--batch",
            "100",
            "--devices",
            "4",
            "--updates",
            "300",
            "--bootstrap-entities",
            "2500",
            "--trials",
            "10",
            "--live-connections",
            "50",
            "--users",
            "20",
            "--connections",
            "8",
            "--many-users-seconds",
            "1",
        ])
        .args(extra)
        .arg("--out")
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "deltasync bench failed: {}\nstderr:\n{stderr}", output.status);
    (serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap(), stderr)
}

/// Checks that every workload reported its figure; `instances` servers shared the database.
fn check_figures(report: &Value, instances: usize) {
    let figures = report["figures"].as_array().unwrap();
    let figure = |name: &str| {
        figures
            .iter()
            .find(|f| f["workload"] == name)
            .unwrap_or_else(|| panic!("no figure {name:?} in {report}"))
            .clone()
    };
    let (multi_push, propagation, rss) = match instances {
        1 => ("push, 4 devices".to_owned(), "long poll".to_owned(), "server peak RSS, whole run".to_owned()),
        n => (
            format!("push, 4 devices over {n} instances"),
            "long poll (instance 1 → 0)".to_owned(),
            format!("server peak RSS, whole run (max of {n})"),
        ),
    };
    for name in ["push, 1 device", &multi_push, "update, one field", "pull, 10000 per page"] {
        let f = figure(name);
        assert!(f["value"].as_f64().unwrap() > 0.0, "{f}");
        assert_eq!(f["unit"], "changes/s");
    }
    assert_eq!(figure(&multi_push)["details"]["instances"], instances);
    let many = |what: &str| match instances {
        1 => figure(&format!("many users, {what}")),
        n => figure(&format!("many users, {what} over {n} instances")),
    };
    let (syncs, changes) = (many("syncs"), many("changes"));
    assert_eq!(syncs["details"]["users"], 20, "{syncs}");
    assert_eq!(syncs["details"]["instances"], instances, "{syncs}");
    let done = syncs["details"]["syncs"].as_u64().unwrap();
    // Every sync carries one to three changes.
    let carried = changes["details"]["changes"].as_u64().unwrap();
    assert!(done > 0 && carried >= done && carried <= 3 * done, "{syncs}");
    assert!(many("sync p99")["value"].as_f64().unwrap() >= many("sync p50")["value"].as_f64().unwrap());
    assert!(many("server peak RSS")["value"].as_f64().unwrap() > 0.0);
    // Real clients' ids unless asked otherwise.
    assert_eq!(figure("push, 1 device")["details"]["ids"], "random");
    // Every change pushed is pulled: 800 + 800 new entities, 300 updates, and the two wire syncs' 4 changes.
    assert_eq!(figure("pull, 10000 per page")["details"]["changes"], 800 + 800 + 300 + 4);
    let boot = figure("bootstrap");
    // Filled up to 2500 bench entities, plus the two wire entities and the propagation one.
    assert_eq!(boot["details"]["entities"], 2500 + 3, "{boot}");
    let p50 = figure(&format!("propagation p50, {propagation}"));
    let p99 = figure(&format!("propagation p99, {propagation}"));
    let (p50, p99) = (p50["value"].as_f64().unwrap(), p99["value"].as_f64().unwrap());
    assert!(p50 > 0.0 && p99 >= p50);
    let details = &figure(&format!("propagation p50, {propagation}"))["details"];
    assert_eq!(details["wait_instance"], 0);
    assert_eq!(details["push_instance"], usize::from(instances > 1));
    let live = if instances == 1 { "live".to_owned() } else { "live (instance 1 → 0)".to_owned() };
    for name in [
        format!("propagation, {live} p50"),
        format!("propagation, {live} p99"),
        "propagation, live, 50 open p99".to_owned(),
    ] {
        let f = figure(&name);
        assert!(f["value"].as_f64().unwrap() > 0.0, "{f}");
        assert_eq!(f["details"]["trials"], 10, "{f}");
    }
    let idle = figure("server RSS with 50 idle live sockets");
    assert!(idle["value"].as_f64().unwrap() > 1.0, "{idle}");
    assert_eq!(idle["details"]["connections"], 50);
    for name in ["wire, one-field edit, HTTP/1.1", "wire, one-field edit, HTTP/2"] {
        let bytes = figure(name)["value"].as_f64().unwrap();
        assert!((200.0..5000.0).contains(&bytes), "{name}: {bytes} bytes");
    }
    let rss = figure(&rss);
    assert!(rss["value"].as_f64().unwrap() > 1.0);
    assert_eq!(rss["details"]["per_instance_mib"].as_array().unwrap().len(), instances);
    assert!(figure("bootstrap, server RSS growth")["met"].is_boolean());
    assert_eq!(report["instances"], instances);
}

#[test]
fn bench_runs_every_workload_and_reports_each_figure() {
    let dir = tempfile::tempdir().unwrap();
    let (report, _) = run_bench(dir.path(), &[]);
    assert_eq!(report["store"], "sqlite");
    assert!(report["schema"].is_null());
    check_figures(&report, 1);
}

#[test]
fn bench_on_postgres_with_two_instances_reports_each_figure_and_drops_its_schema() {
    let url = match std::env::var("DELTASYNC_TEST_POSTGRES") {
        Ok(url) if !url.trim().is_empty() => url.trim().to_owned(),
        _ => {
            eprintln!("skipped: DELTASYNC_TEST_POSTGRES is not set");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let (report, stderr) = run_bench(dir.path(), &["--database", &url, "--instances", "2"]);
    assert_eq!(report["store"], "postgres");
    check_figures(&report, 2);
    let schema = report["schema"].as_str().unwrap_or_else(|| panic!("no schema in the report: {report}"));
    assert!(schema.starts_with("bench_"), "{schema}");
    assert!(stderr.contains(&format!("bench schema {schema} dropped")), "stderr:\n{stderr}");
    let left = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
            .query("SELECT schema_name::text FROM information_schema.schemata WHERE schema_name = $1", &[&schema])
            .await
            .unwrap()
            .len()
    });
    assert_eq!(left, 0, "schema {schema} is still in the database after the bench");
}

#[test]
fn bench_measures_the_client_sdk_first_sync_and_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let (report, stderr) =
        run_bench(dir.path(), &["--workloads", "client", "--client-changes", "1500", "--client-outbox", "300"]);
    let figures = report["figures"].as_array().unwrap();
    let figure = |name: &str| {
        figures.iter().find(|f| f["workload"] == name).unwrap_or_else(|| {
            panic!(
                "no {name:?}: {report}
{stderr}"
            )
        })
    };
    let first = figure("client, first sync into a fresh replica");
    let received = first["details"]["pulled"].as_u64().unwrap() + first["details"]["bootstrapped"].as_u64().unwrap();
    assert_eq!(received, 1500, "{first}");
    assert_eq!(first["details"]["verified"], true, "{first}");
    assert!(first["value"].as_f64().unwrap() > 0.0);
    // Measured in a `deltasync client sync` process of its own.
    let rss = figure("client, peak RSS of that first sync");
    assert!(rss["value"].as_f64().unwrap() > 1.0, "{rss}");
    let pulling = figure("client, first sync pulling the log (comparison)");
    assert_eq!((pulling["details"]["pulled"].as_u64(), &pulling["details"]["verified"]), (Some(1500), &json!(true)));
    let writes = figure("client, 300 local writes, write_batch of 10000");
    assert_eq!(writes["details"]["writes"], 300, "{writes}");
    assert!(writes["value"].as_f64().unwrap() > 0.0);
    let outbox = figure("client, sync of a 300-change outbox");
    assert_eq!(outbox["details"]["verified"], true, "{outbox}");
    assert!(outbox["value"].as_f64().unwrap() > 0.0);
}

#[test]
fn time_ordered_ids_are_measured_under_their_own_names() {
    let dir = tempfile::tempdir().unwrap();
    let (report, _) = run_bench(dir.path(), &["--workloads", "push,update", "--ids", "time-ordered"]);
    let figures = report["figures"].as_array().unwrap();
    for name in [
        "push, 1 device (time-ordered ids)",
        "push, 4 devices (time-ordered ids)",
        "update, one field (time-ordered ids)",
    ] {
        let f = figures.iter().find(|f| f["workload"] == name).unwrap_or_else(|| panic!("no figure {name:?}"));
        assert_eq!(f["details"]["ids"], "time-ordered", "{f}");
        assert!(f["value"].as_f64().unwrap() > 0.0, "{f}");
    }
    assert!(
        !figures.iter().any(|f| f["workload"] == "push, 1 device"),
        "a time-ordered figure under the realistic name"
    );
}

#[test]
fn the_sqlite_floor_inserts_the_rows_of_a_push_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let (report, _) = run_bench(dir.path(), &["--workloads", "sqlite-floor"]);
    let figures = report["figures"].as_array().unwrap();
    let floor = figures.iter().find(|f| f["workload"] == "SQLite floor, batches of 100").expect("a floor figure");
    assert_eq!(floor["details"]["changes"], 800, "{floor}");
    assert_eq!(floor["details"]["ids"], "random", "{floor}");
    assert!(floor["value"].as_f64().unwrap() > 0.0, "{floor}");
    // Each change writes at least its row of about 150 bytes of data, WAL and checkpoint included.
    assert!(floor["details"]["kib_written_per_change"].as_f64().unwrap() > 0.1, "{floor}");
}

#[test]
fn bench_measures_the_database_file_with_and_without_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let (report, _) = run_bench(
        dir.path(),
        &[
            "--workloads",
            "compaction",
            "--compaction-updates",
            "2000",
            "--compact-interval",
            "1s",
            "--compaction-rate",
            "4000",
        ],
    );
    let figures = report["figures"].as_array().unwrap();
    for name in [
        "database file peak, compaction every 1s",
        "database file at the end, compaction every 1s",
        "database file peak, no compaction",
        "database file at the end, no compaction",
    ] {
        let f = figures.iter().find(|f| f["workload"] == name).unwrap_or_else(|| panic!("no figure {name:?}"));
        assert!(f["value"].as_f64().unwrap() > 0.0, "{f}");
        assert_eq!(f["details"]["updates"], 2000, "{f}");
        // Paced at 4,000 a second, each device's fifth and last sync of 100 starts 0.4 s in.
        assert!(f["details"]["seconds"].as_f64().unwrap() >= 0.4, "{f}");
    }
    assert!(figures.iter().any(|f| f["workload"] == "database file peak, with / without compaction"));
    // Without compaction the file ends with every change in the log, each with its receipt.
    let end = figures.iter().find(|f| f["workload"] == "receipts at the end, no compaction").unwrap();
    assert_eq!(end["details"]["at_the_end"]["log_rows"], 2000, "{end}");
    assert_eq!(end["details"]["at_the_end"]["receipts"], 2000, "{end}");
    assert!(end["value"].as_f64().unwrap() > 16.0, "a receipt holds at least its change id: {end}");
}
