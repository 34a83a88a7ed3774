//! The servers under test: `deltasync serve` children on one database (a
//! fresh SQLite file, or a PostgreSQL schema made for the run), and a sampler
//! of their resident memory.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

/// A `deltasync serve` child process.
pub struct ChildServer {
    child: Child,
    /// Its base URL.
    pub url: String,
}

impl ChildServer {
    /// Starts a server on port 0 and `database` (a `--database` URL), and waits until it listens.
    pub fn start(database: &str, config: &std::path::Path, extra: &[String]) -> anyhow::Result<ChildServer> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["serve", "--listen", "127.0.0.1:0", "--database", database])
            .arg("--config")
            .arg(config)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start deltasync serve")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
        let Some(url) = line.trim().strip_prefix("deltasync listening on ") else {
            let _ = child.kill();
            let status = child.wait()?;
            bail!("deltasync serve did not start ({status}; its messages are above); it printed {line:?}");
        };
        Ok(ChildServer { url: url.to_owned(), child })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child servers of a run, all on one database, and the temporary
/// directory of its SQLite file if there is one.
pub struct Servers {
    /// The servers, instance 0 first. Dropped (killed) before the directory.
    pub instances: Vec<ChildServer>,
    _dir: Option<tempfile::TempDir>,
    _config: tempfile::TempDir,
}

/// The request rates of the servers the bench starts: more than it sends.
pub const BENCH_LIMITS: &str =
    "[limits]\nrequests_per_second = 10000000\nburst = 10000000\nmax_waiting_polls = 100000\n";

/// The configuration the bench's servers run with: the defaults, but room
/// for the live-idle workload's sockets, which all belong to one user
/// (`--auth none`). `max_connections` is lowered to the open-file limit.
pub const BENCH_CONFIG: &str = "[server]\nmax_live_per_user = 20000\nmax_connections = 16384\n";

impl Servers {
    /// Starts `count` servers on `database`, one after the other (so the
    /// first has created the tables before the others open them).
    /// `dir` is kept until the servers are stopped.
    pub fn start(database: &str, count: usize, dir: Option<tempfile::TempDir>) -> anyhow::Result<Servers> {
        Servers::start_with(database, count, dir, BENCH_CONFIG, &[])
    }

    /// As [`Servers::start`], with the configuration file's text `config`
    /// and `extra` arguments for `deltasync serve`.
    pub fn start_with(
        database: &str,
        count: usize,
        dir: Option<tempfile::TempDir>,
        config: &str,
        extra: &[String],
    ) -> anyhow::Result<Servers> {
        let config_dir = tempfile::tempdir()?;
        // The bench measures throughput: its devices send as fast as the
        // server answers, from one address, so it lifts the request rates
        // unless told otherwise.
        let config_text =
            if config.contains("[limits]") { config.to_owned() } else { format!("{config}\n{BENCH_LIMITS}") };
        let config = config_dir.path().join("bench.toml");
        std::fs::write(&config, config_text)?;
        let mut servers = Servers { instances: Vec::with_capacity(count), _dir: dir, _config: config_dir };
        for i in 0..count {
            let server = ChildServer::start(database, &config, extra).with_context(|| format!("instance {i}"))?;
            servers.instances.push(server);
        }
        Ok(servers)
    }

    /// Their base URLs, instance 0 first.
    pub fn urls(&self) -> Vec<String> {
        self.instances.iter().map(|s| s.url.clone()).collect()
    }

    /// Their process ids, instance 0 first.
    pub fn pids(&self) -> Vec<u32> {
        self.instances.iter().map(ChildServer::pid).collect()
    }
}

/// A `VmRSS`-style field of /proc/PID/status, in KiB (0 when unreadable).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Samples a process's RSS every 5 ms on a thread and keeps the highest value.
pub struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    /// Starts sampling `pid`.
    pub fn start(pid: u32) -> RssSampler {
        let peak = Arc::new(AtomicU64::new(proc_status_kib(pid, "VmRSS:")));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(proc_status_kib(pid, "VmRSS:"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssSampler { peak, stop, thread: Some(thread) }
    }

    /// Stops and returns the peak RSS seen, in KiB.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}
