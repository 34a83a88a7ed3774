//! `deltasync bench` runs every workload end to end at a small size and writes
//! a report with a figure for each. It checks the harness, not the speed.

mod common;

use common::binary;
use serde_json::Value;

#[test]
fn bench_runs_every_workload_and_reports_each_figure() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let status = std::process::Command::new(binary())
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
            "--out",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "deltasync bench failed: {status}");
    let report: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let figures = report["figures"].as_array().unwrap();
    let figure = |name: &str| {
        figures
            .iter()
            .find(|f| f["workload"] == name)
            .unwrap_or_else(|| panic!("no figure {name:?} in {report}"))
            .clone()
    };
    for name in ["push, 1 device", "push, 4 devices", "update, one field", "pull, 10000 per page"] {
        let f = figure(name);
        assert!(f["value"].as_f64().unwrap() > 0.0, "{f}");
        assert_eq!(f["unit"], "changes/s");
    }
    // Every change pushed is pulled: 800 + 800 new entities, 300 updates, and the two wire syncs' 4 changes.
    assert_eq!(figure("pull, 10000 per page")["details"]["changes"], 800 + 800 + 300 + 4);
    let boot = figure("bootstrap");
    // Filled up to 2500 bench entities, plus the two wire entities and the propagation one.
    assert_eq!(boot["details"]["entities"], 2500 + 3, "{boot}");
    let p50 = figure("propagation p50, long poll")["value"].as_f64().unwrap();
    let p99 = figure("propagation p99, long poll")["value"].as_f64().unwrap();
    assert!(p50 > 0.0 && p99 >= p50);
    for name in ["wire, one-field edit, HTTP/1.1", "wire, one-field edit, HTTP/2"] {
        let bytes = figure(name)["value"].as_f64().unwrap();
        assert!((200.0..5000.0).contains(&bytes), "{name}: {bytes} bytes");
    }
    assert!(figure("server peak RSS, whole run")["value"].as_f64().unwrap() > 1.0);
    assert!(figure("bootstrap, server RSS growth")["met"].is_boolean());
}
