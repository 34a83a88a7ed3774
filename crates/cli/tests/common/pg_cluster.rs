//! The machine's PostgreSQL cluster, for tests that stop and start it.
//!
//! Stopping the cluster disturbs every other user of it, so such tests run
//! only when `DELTASYNC_TEST_PG_RESTART=1` says that may be done (`.ci/run`
//! sets it on its own machine); see [`restart_allowed`].
#![allow(dead_code)]

use std::process::Command;

/// The environment variable that allows tests to stop and start the local cluster.
pub const PG_RESTART_ENV: &str = "DELTASYNC_TEST_PG_RESTART";

/// Whether tests may stop and start the local PostgreSQL cluster (`DELTASYNC_TEST_PG_RESTART=1`).
pub fn restart_allowed() -> bool {
    std::env::var(PG_RESTART_ENV).as_deref() == Ok("1")
}

/// A PostgreSQL cluster of this machine, as `pg_lsclusters` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgCluster {
    /// The major version, e.g. `15`.
    pub version: String,
    /// The cluster's name, e.g. `main`.
    pub name: String,
}

impl PgCluster {
    /// The first online cluster that `pg_lsclusters` lists, if any.
    pub fn local() -> Option<PgCluster> {
        let out = Command::new("pg_lsclusters").arg("--no-header").output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.split_whitespace().nth(3) == Some("online"))?;
        let mut fields = line.split_whitespace();
        Some(PgCluster { version: fields.next()?.to_owned(), name: fields.next()?.to_owned() })
    }

    /// Stops the cluster (fast mode: open sessions are ended), panicking if that fails.
    pub fn stop(&self) {
        self.ctl("stop");
    }

    /// Starts the cluster, panicking if that fails.
    pub fn start(&self) {
        self.ctl("start");
    }

    fn ctl(&self, action: &str) {
        let mut cmd = Command::new("pg_ctlcluster");
        cmd.args(["--skip-systemctl-redirect", &self.version, &self.name, action]);
        if action == "stop" {
            cmd.args(["-m", "fast"]);
        }
        let status = cmd.status().expect("run pg_ctlcluster");
        assert!(status.success(), "pg_ctlcluster {} {} {action} failed", self.version, self.name);
    }
}
