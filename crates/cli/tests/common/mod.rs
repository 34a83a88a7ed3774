//! Shared harness for end-to-end tests: start real `deltasync serve` processes
//! on port 0 with their own SQLite files, and talk to them over HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// The `deltasync` binary built for these tests.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_deltasync")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A running server process with its own temporary directory.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub args: Vec<String>,
}

/// Options for starting a server.
#[derive(Default, Clone)]
pub struct Options {
    /// TOML config text, written to a file and passed with --config.
    pub config: Option<String>,
    /// HS256 secret: starts the server with --auth jwt.
    pub jwt_secret: Option<String>,
    /// Use this database file instead of a fresh one.
    pub db: Option<PathBuf>,
}

impl Server {
    /// Starts a server with defaults (--auth none, fresh SQLite file).
    pub fn start() -> Server {
        Server::start_with(Options::default())
    }

    /// Starts a server with options.
    pub fn start_with(opts: Options) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let db = opts.db.clone().unwrap_or_else(|| dir.path().join("test.db"));
        let mut args = vec![
            "serve".to_owned(),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--database".to_owned(),
            format!("sqlite://{}", db.display()),
        ];
        if let Some(config) = &opts.config {
            let path = dir.path().join("config.toml");
            std::fs::write(&path, config).unwrap();
            args.push("--config".into());
            args.push(path.display().to_string());
        }
        if let Some(secret) = &opts.jwt_secret {
            let path = dir.path().join("secret.txt");
            std::fs::write(&path, format!("{secret}\n")).unwrap();
            args.push("--auth".into());
            args.push("jwt".into());
            args.push("--jwt-secret-file".into());
            args.push(path.display().to_string());
        }
        let (child, url) = spawn(&args);
        Server { child, url, dir, db, args }
    }

    /// The path of the secret file (jwt servers only).
    pub fn secret_file(&self) -> PathBuf {
        self.dir.path().join("secret.txt")
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        self.child.wait().unwrap()
    }

    /// Starts a new process on the same database and arguments (after kill or terminate).
    pub fn restart(&mut self) {
        let (child, url) = spawn(&self.args);
        self.child = child;
        self.url = url;
    }

    /// The server's resident memory in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn spawn(args: &[String]) -> (Child, String) {
    let mut child = Command::new(binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start deltasync serve");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read the listening line");
    let url = line
        .trim()
        .strip_prefix("deltasync listening on ")
        .unwrap_or_else(|| panic!("unexpected first line from deltasync serve: {line:?}"))
        .to_owned();
    (child, url)
}

/// Runs `deltasync` with arguments and returns (status, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = Command::new(binary()).args(args).output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// An HTTP client for tests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

/// An HLC string at `ms` with `counter` for `device`.
pub fn hlc(ms: u64, counter: u32, device: &str) -> String {
    format!("{ms:013}-{counter:05}-{device}")
}

/// An upsert change.
pub fn upsert(change_id: &str, collection: &str, entity_id: &str, data: Value, hlc: &str) -> Value {
    json!({"change_id": change_id, "collection": collection, "entity_id": entity_id, "op": "upsert", "data": data, "hlc": hlc})
}

/// A delete change.
pub fn delete(change_id: &str, collection: &str, entity_id: &str, hlc: &str) -> Value {
    json!({"change_id": change_id, "collection": collection, "entity_id": entity_id, "op": "delete", "hlc": hlc})
}

/// POSTs JSON and returns (status, body as JSON).
pub async fn post(c: &reqwest::Client, url: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = c.post(format!("{url}{path}")).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} answered non-JSON ({e}): {text}")))
}

/// GETs and returns (status, body as JSON).
pub async fn get(c: &reqwest::Client, url: &str, path_and_query: &str) -> (u16, Value) {
    let r = c.get(format!("{url}{path_and_query}")).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path_and_query} answered non-JSON ({e}): {text}")))
}

/// Pushes changes for a device; returns the answer body (asserting 200).
pub async fn push(c: &reqwest::Client, url: &str, device: &str, changes: Vec<Value>) -> Value {
    let (status, body) = post(c, url, "/v1/push", &json!({"device_id": device, "changes": changes})).await;
    assert_eq!(status, 200, "push failed: {body}");
    body
}

/// GETs a bootstrap stream and returns its lines parsed.
pub async fn bootstrap_lines(c: &reqwest::Client, url: &str, device: &str) -> Vec<Value> {
    let r = c.get(format!("{url}/v1/bootstrap?device_id={device}")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Path helper for a fresh temp file inside a dir.
pub fn temp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
pub mod devices;
