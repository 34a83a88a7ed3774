//! Shared harness for end-to-end tests: start real `deltasync serve` processes
//! on port 0, each on a fresh store (a SQLite file in its own directory, or a
//! schema of its own in the PostgreSQL database named by
//! `DELTASYNC_TEST_POSTGRES`), and talk to them over HTTP.
//!
//! [`store_test!`] runs a test written once against both stores.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deltasync_server::store::core::pending::FOLD_ROWS_VAR;
use serde_json::{Value, json};

/// The `deltasync` binary built for these tests.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_deltasync")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// The environment variable naming the PostgreSQL database of the tests,
/// e.g. `postgres://postgres@127.0.0.1:5432/test`.
pub const POSTGRES_ENV: &str = "DELTASYNC_TEST_POSTGRES";

/// Runs a test written once, as `fn name(backend: &Backend)` (sync or async),
/// against both stores: as `name::sqlite` on a fresh SQLite file, and as
/// `name::postgres` on the database named by `DELTASYNC_TEST_POSTGRES`; without
/// that variable, `name::postgres` says it is skipped and passes. So
/// `cargo test postgres` selects the PostgreSQL pass. Put it just above the function, with the test
/// attribute the function would have had:
///
/// ```ignore
/// store_test!(#[tokio::test] async fn pushes_round_trip);
/// async fn pushes_round_trip(backend: &Backend) {
///     let server = Server::start(backend);
///     …
/// }
/// ```
///
/// The body stays a plain function, outside the macro, so that rustfmt and the
/// compiler's diagnostics treat it as any other code.
#[macro_export]
macro_rules! store_test {
    ($(#[$attr:meta])* async fn $name:ident) => {
        mod $name {
            $(#[$attr])*
            async fn sqlite() {
                super::$name(&$crate::common::Backend::Sqlite).await
            }

            $(#[$attr])*
            async fn postgres() {
                let Some(backend) = $crate::common::Backend::postgres() else { return };
                super::$name(&backend).await
            }
        }
    };
    ($(#[$attr:meta])* fn $name:ident) => {
        mod $name {
            $(#[$attr])*
            fn sqlite() {
                super::$name(&$crate::common::Backend::Sqlite)
            }

            $(#[$attr])*
            fn postgres() {
                let Some(backend) = $crate::common::Backend::postgres() else { return };
                super::$name(&backend)
            }
        }
    };
}

/// The store a test server runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A fresh SQLite file in the server's temporary directory.
    Sqlite,
    /// A fresh schema in the PostgreSQL database at `base_url`.
    Postgres {
        /// A `postgres://` URL without a search path, from `DELTASYNC_TEST_POSTGRES`.
        base_url: String,
    },
}

impl Backend {
    /// The PostgreSQL backend named by `DELTASYNC_TEST_POSTGRES`; `None` (after
    /// saying that the calling test is skipped) when that is unset or empty.
    pub fn postgres() -> Option<Backend> {
        match std::env::var(POSTGRES_ENV) {
            Ok(url) if !url.trim().is_empty() => Some(Backend::Postgres { base_url: url.trim().to_owned() }),
            _ => {
                let thread = std::thread::current();
                let test = thread.name().filter(|n| *n != "main").map(|n| format!(": {n}")).unwrap_or_default();
                eprintln!("skipped: {POSTGRES_ENV} is not set{test}");
                None
            }
        }
    }

    /// Whether this is the PostgreSQL backend.
    pub fn is_postgres(&self) -> bool {
        matches!(self, Backend::Postgres { .. })
    }

    /// A `--database` URL for a fresh, empty store, and for PostgreSQL the guard
    /// that drops its schema. SQLite: `sqlite://<dir>/test.db`. PostgreSQL: a new
    /// schema `t_<random hex>`, selected with `options=-csearch_path%3D…`.
    pub fn fresh_database(&self, dir: &Path) -> (String, Option<PgSchema>) {
        match self {
            Backend::Sqlite => (format!("sqlite://{}", dir.join("test.db").display()), None),
            Backend::Postgres { base_url } => {
                let schema = PgSchema::create(base_url);
                let sep = if base_url.contains('?') { '&' } else { '?' };
                (format!("{base_url}{sep}options=-csearch_path%3D{}", schema.name), Some(schema))
            }
        }
    }
}

/// A schema created for one test server; dropping the guard drops the schema
/// and everything in it.
#[derive(Debug)]
pub struct PgSchema {
    base_url: String,
    name: String,
}

impl PgSchema {
    /// Creates a schema with a fresh random name `t_<16 hex digits>`.
    fn create(base_url: &str) -> PgSchema {
        let name = format!("t_{:016x}", random_u64());
        pg_execute(base_url, format!("CREATE SCHEMA {name}"))
            .unwrap_or_else(|e| panic!("cannot create schema {name} in {base_url} ({POSTGRES_ENV}): {e}"));
        PgSchema { base_url: base_url.to_owned(), name }
    }

    /// The schema's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // A killed server's sessions may still hold locks for a moment: wait for them, not forever.
        let _ = pg_execute(
            &self.base_url,
            format!("SET lock_timeout = '60s'; DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        );
    }
}

/// A random number: the std hasher's random keys over the time, the process and a counter.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos());
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// Runs `sql` (one or more statements) on a connection of its own. The work is done
/// on a thread of its own, with a runtime of its own, since callers may be inside a
/// tokio runtime (where `block_on` panics).
pub fn pg_execute(url: &str, sql: String) -> Result<(), String> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let (client, connection) =
                tokio_postgres::connect(&url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
            let connection = tokio::spawn(connection);
            let result = client.batch_execute(&sql).await.map_err(|e| e.to_string());
            drop(client);
            let _ = connection.await;
            result
        })
    })
    .join()
    .map_err(|_| "the PostgreSQL thread panicked".to_owned())?
}

/// A running server process with its own temporary directory.
pub struct Server {
    pub child: Child,
    pub url: String,
    /// The `--database` URL it serves (pass it in [`Options::database`] to start
    /// another server on the same data).
    pub database: String,
    pub dir: tempfile::TempDir,
    pub args: Vec<String>,
    /// Where the server's log goes when [`Options::capture_log`] is set.
    log: Option<PathBuf>,
    /// The fresh PostgreSQL schema this server made, dropped after the process
    /// (fields drop after [`Server`]'s own `Drop`, which kills it).
    schema: Option<PgSchema>,
}

/// How often test servers with `--auth oidc` may fetch an issuer's keys.
pub const OIDC_REFETCH_SECS: u64 = 2;
const OIDC_REFETCH_VAR: &str = "DELTASYNC_OIDC_REFETCH_SECS";

/// A `[limits]` section no test outside the rate-limit tests reaches.
pub const UNSPENDABLE_LIMITS: &str =
    "[limits]\nrequests_per_second = 1000000\nburst = 1000000\nmax_waiting_polls = 100000\n";

/// Options for starting a server.
#[derive(Default, Clone)]
pub struct Options {
    /// TOML config text, written to a file and passed with --config.
    pub config: Option<String>,
    /// HS256 secret: starts the server with --auth jwt.
    pub jwt_secret: Option<String>,
    /// Serve this `--database` URL (e.g. another server's [`Server::database`])
    /// instead of a fresh store.
    pub database: Option<String>,
    /// Write the server's stderr (its log, at `info`) to a file that
    /// [`Server::log`] reads, instead of the test's stderr.
    pub capture_log: bool,
    /// More arguments for `deltasync serve`.
    pub extra_args: Vec<String>,
}

impl Server {
    /// Starts a server with defaults (--auth none, a fresh store of `backend`).
    pub fn start(backend: &Backend) -> Server {
        Server::start_with(backend, Options::default())
    }

    /// Starts a server with options.
    pub fn start_with(backend: &Backend, opts: Options) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let (database, schema) = match &opts.database {
            Some(database) => (database.clone(), None),
            None => backend.fresh_database(dir.path()),
        };
        let mut args = vec![
            "serve".to_owned(),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--database".to_owned(),
            database.clone(),
        ];
        // Tests that are not about request rates send as fast as they can
        // from one address: they get budgets they cannot spend, unless
        // their config has a `[limits]` section of its own.
        let config = match &opts.config {
            Some(config) if config.contains("[limits]") => config.clone(),
            Some(config) => format!("{config}\n{UNSPENDABLE_LIMITS}"),
            None => UNSPENDABLE_LIMITS.to_owned(),
        };
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config).unwrap();
        args.push("--config".into());
        args.push(path.display().to_string());
        if let Some(secret) = &opts.jwt_secret {
            let path = dir.path().join("secret.txt");
            std::fs::write(&path, format!("{secret}\n")).unwrap();
            args.push("--auth".into());
            args.push("jwt".into());
            args.push("--jwt-secret-file".into());
            args.push(path.display().to_string());
        }
        args.extend(opts.extra_args.iter().cloned());
        let log = opts.capture_log.then(|| dir.path().join("server.log"));
        let (child, url) = spawn(&args, log.as_deref());
        Server { child, url, database, dir, args, log, schema }
    }

    /// The SQLite file it serves, if its store is SQLite.
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        self.database.strip_prefix("sqlite://").map(PathBuf::from)
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
        let (child, url) = spawn(&self.args, self.log.as_deref());
        self.child = child;
        self.url = url;
    }

    /// What the server has logged so far (needs [`Options::capture_log`]).
    pub fn log(&self) -> String {
        let path = self.log.as_ref().expect("start the server with Options { capture_log: true, .. }");
        std::fs::read_to_string(path).unwrap_or_default()
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

fn spawn(args: &[String], log: Option<&Path>) -> (Child, String) {
    let (level, stderr) = match log {
        None => ("warn", Stdio::inherit()),
        Some(path) => {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open the server log");
            ("info", Stdio::from(file))
        }
    };
    let mut child = Command::new(binary())
        .args(args)
        .env("RUST_LOG", level)
        // SQLite servers fold their pending rows every few rows instead of
        // every 50,000, so that every test runs on a mix of folded and
        // pending entity states, and crashes land between folds and in them.
        .env(FOLD_ROWS_VAR, "5")
        // `--auth oidc` servers may fetch an issuer's keys every 2 s instead
        // of every minute, so that key rotation is tested in seconds.
        .env(OIDC_REFETCH_VAR, OIDC_REFETCH_SECS.to_string())
        .stdout(Stdio::piped())
        .stderr(stderr)
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
    get_as(c, url, path_and_query, None).await
}

/// GETs with an optional bearer token and returns (status, body as JSON).
pub async fn get_as(c: &reqwest::Client, url: &str, path_and_query: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = c.get(format!("{url}{path_and_query}"));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let r = req.send().await.unwrap();
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
/// A random version-4 UUID in its usual text form, for entity ids.
pub fn random_uuid() -> String {
    let a = (random_u64() & 0xffff_ffff_ffff_0fff) | 0x4000;
    let b = (random_u64() & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// An HS256 token for `user`, valid for an hour, signed with `secret` (for a
/// server started with [`Options::jwt_secret`] set to the same secret).
pub fn token_for(secret: &str, user: &str) -> String {
    let exp = now_ms() / 1000 + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A document-like JSON object whose compact (and canonical) text is exactly
/// `bytes` long (at least 400): a few short fields and a long `body` of
/// pseudo-random lowercase words, different for every `seed`. Only ASCII
/// letters, digits and spaces, integer numbers and ASCII keys, so that
/// `serde_json::to_string` of it (keys sorted, no escapes) is its JCS form.
pub fn document(seed: u64, bytes: usize) -> Value {
    const WORDS: [&str; 16] = [
        "sync", "offline", "device", "ledger", "merge", "cursor", "replica", "change", "digest", "vector", "window",
        "harbor", "signal", "quartz", "meadow", "copper",
    ];
    let mut doc = json!({
        "title": format!("Quarterly notes {seed}"),
        "owner": format!("user-{:04}", seed % 9973),
        "kind": "document",
        "tags": ["notes", "draft", format!("batch-{}", seed % 7)],
        "revision": seed % 1000,
        "created_ms": 1_700_000_000_000u64 + seed,
        "body": "",
    });
    let fixed = serde_json::to_string(&doc).unwrap().len();
    assert!(bytes >= fixed + 16, "document({seed}, {bytes}): too small, the fields alone take {fixed} bytes");
    let want = bytes - fixed;
    let mut body = String::with_capacity(want + 16);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while body.len() < want {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        body.push_str(WORDS[(x % 16) as usize]);
        body.push(' ');
    }
    body.truncate(want);
    doc["body"] = Value::String(body);
    debug_assert_eq!(serde_json::to_string(&doc).unwrap().len(), bytes);
    doc
}

pub mod devices;
pub mod pg_cluster;
