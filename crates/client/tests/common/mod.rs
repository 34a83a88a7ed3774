//! Test harness: a real deltasync server in-process (tokio listener on
//! 127.0.0.1:0, SQLite file in a tempdir), clients on temp database files,
//! fake clocks, and helpers that read the server over HTTP.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deltasync_client::{Client, ClientOptions};
use deltasync_protocol::EntityState;
use deltasync_protocol::wire::{BootstrapHeader, StatusResponse};
use deltasync_server::rate::RateLimits;
use deltasync_server::store::sqlite::SqliteStore;
use deltasync_server::{Auth, Clock, Config, ServeError, Store};
use serde_json::{Map, Value};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The system clock in ms since the epoch.
pub fn system_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A server configuration from TOML text (the `--config` file format).
pub fn config(toml: &str) -> Config {
    Config::parse(toml).expect("valid test config")
}

/// A JSON object from a `json!` literal.
pub fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

/// A manually advanced clock (ms since the epoch), shareable by the server and clients.
#[derive(Clone, Debug)]
pub struct FakeClock(Arc<AtomicU64>);

impl FakeClock {
    /// A clock standing at `start_ms`.
    pub fn new(start_ms: u64) -> Self {
        FakeClock(Arc::new(AtomicU64::new(start_ms)))
    }

    /// A clock standing at the real time now.
    pub fn at_system_time() -> Self {
        FakeClock::new(system_ms())
    }

    /// The time it stands at.
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Moves it forward by `ms`.
    pub fn advance(&self, ms: u64) -> u64 {
        self.0.fetch_add(ms, Ordering::SeqCst) + ms
    }

    /// A wall clock for [`ClientOptions::wall_clock`], offset by `skew_ms`.
    pub fn wall(&self, skew_ms: i64) -> Arc<dyn Fn() -> u64 + Send + Sync> {
        let inner = self.0.clone();
        Arc::new(move || inner.load(Ordering::SeqCst).saturating_add_signed(skew_ms))
    }

    /// The same time as a server [`Clock`].
    pub fn server_clock(&self) -> Clock {
        let inner = self.0.clone();
        Clock::from_fn(move || inner.load(Ordering::SeqCst))
    }
}

/// A running deltasync server on a real socket and a real SQLite file.
pub struct TestServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The address it listens on (kept across restarts).
    pub addr: SocketAddr,
    dir: TempDir,
    config: Config,
    clock: Clock,
    http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl TestServer {
    /// A server with the default configuration and the system clock.
    pub async fn start() -> TestServer {
        TestServer::start_with(Config::default(), None).await
    }

    /// A server with `config` and, when given, a fake clock.
    pub async fn start_with(config: Config, clock: Option<Clock>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        TestServer::start_on(listener, config, clock).await
    }

    /// A server on a given address (for example one where a client already
    /// failed to connect), with the default configuration and the system clock.
    pub async fn start_at(url: &str) -> TestServer {
        let addr: SocketAddr = url.trim_start_matches("http://").parse().expect("a http://IP:PORT url");
        let listener = bind_retrying(addr).await;
        TestServer::start_on(listener, Config::default(), None).await
    }

    async fn start_on(listener: TcpListener, mut config: Config, clock: Option<Clock>) -> TestServer {
        // Tests send as fast as the server answers, from one address: unless
        // a test sets `[limits]` itself, its server's budgets cannot be spent.
        if config.rate == RateLimits::default() {
            config.rate = RateLimits { requests_per_second: 1_000_000, burst: 1_000_000, max_waiting_polls: 100_000 };
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = listener.local_addr().expect("local addr");
        let mut server = TestServer {
            url: format!("http://{addr}"),
            addr,
            dir,
            config,
            clock: clock.unwrap_or_else(Clock::system),
            http: reqwest::Client::new(),
            shutdown: None,
            task: None,
        };
        server.serve(listener).await;
        server
    }

    /// The server's SQLite file.
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("server.db")
    }

    async fn serve(&mut self, listener: TcpListener) {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&self.db_path()).expect("open server store"));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(deltasync_server::run(
            listener,
            store,
            self.config.clone(),
            Auth::None,
            self.clock.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        self.shutdown = Some(tx);
        self.task = Some(task);
        // Wait until it answers.
        for _ in 0..200 {
            if let Ok(r) = self.http.get(format!("{}/healthz", self.url)).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the test server at {} never became healthy", self.url);
    }

    /// Stops the server (gracefully) and waits for it; the database file stays.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(Duration::from_secs(30), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => panic!("the server failed: {e}"),
                Ok(Err(e)) => panic!("the server task failed: {e}"),
                Err(_) => panic!("the server did not stop within 30 s"),
            }
        }
    }

    /// Copies the stopped server's database (its file and any WAL) into `dir`: a backup.
    pub fn back_up_to(&self, dir: &Path) {
        assert!(self.task.is_none(), "stop the server before backing it up");
        for suffix in ["", "-wal"] {
            let from = PathBuf::from(format!("{}{suffix}", self.db_path().display()));
            if from.exists() {
                std::fs::copy(&from, dir.join(format!("server.db{suffix}"))).expect("copy the database");
            }
        }
    }

    /// Replaces the stopped server's database by a backup made with [`TestServer::back_up_to`].
    pub fn restore_from(&self, dir: &Path) {
        assert!(self.task.is_none(), "stop the server before restoring it");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.db_path().display()));
        }
        for suffix in ["", "-wal"] {
            let from = dir.join(format!("server.db{suffix}"));
            if from.exists() {
                std::fs::copy(&from, format!("{}{suffix}", self.db_path().display())).expect("restore the database");
            }
        }
    }

    /// Starts the server again on the same address and database.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = bind_retrying(self.addr).await;
        self.serve(listener).await;
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> StatusResponse {
        let resp = self.http.get(format!("{}/v1/status", self.url)).send().await.expect("status request");
        assert!(resp.status().is_success(), "status answered {}", resp.status());
        resp.json().await.expect("status body")
    }

    /// The dataset's head seq.
    pub async fn head(&self) -> u64 {
        self.status().await.head
    }

    /// Every logged change (`GET /v1/pull` from 0, all pages), as JSON, for an observer device.
    pub async fn log(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = 0u64;
        loop {
            let resp = self
                .http
                .get(format!("{}/v1/pull", self.url))
                .query(&[("device_id", "observer"), ("cursor", &cursor.to_string()), ("limit", "10000")])
                .send()
                .await
                .expect("pull request");
            assert!(resp.status().is_success(), "pull answered {}", resp.status());
            let body: Value = resp.json().await.expect("pull body");
            out.extend(body["changes"].as_array().expect("changes").iter().cloned());
            cursor = body["cursor"].as_u64().expect("cursor");
            if !body["has_more"].as_bool().expect("has_more") {
                return out;
            }
        }
    }

    /// The server's snapshot (`GET /v1/bootstrap`): its header and every entity with state.
    pub async fn snapshot(&self) -> (BootstrapHeader, Vec<EntityState>) {
        let resp = self.http.get(format!("{}/v1/bootstrap", self.url)).send().await.expect("bootstrap request");
        assert!(resp.status().is_success(), "bootstrap answered {}", resp.status());
        let text = resp.text().await.expect("bootstrap body");
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header: BootstrapHeader = serde_json::from_str(lines.next().expect("header line")).expect("header");
        let mut entities = Vec::new();
        for line in lines {
            let v: Value = serde_json::from_str(line).expect("bootstrap line");
            if let Some(e) = v.get("entity") {
                entities.push(serde_json::from_value(e.clone()).expect("entity state"));
            }
        }
        (header, entities)
    }

    /// GETs `path_and_query`, returning the status and the JSON answer.
    pub async fn get(&self, path_and_query: &str) -> (u16, Value) {
        let resp = self.http.get(format!("{}{path_and_query}", self.url)).send().await.expect("get request");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("json answer"))
    }

    /// POSTs a raw JSON body to `path`, returning the status and the JSON answer.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self.http.post(format!("{}{path}", self.url)).json(body).send().await.expect("post request");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("json answer"))
    }
}

/// Binds `addr`, retrying for a while if it is still held.
async fn bind_retrying(addr: SocketAddr) -> TcpListener {
    let mut last_err = None;
    for _ in 0..100 {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e) => last_err = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("cannot bind {addr}: {last_err:?}");
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A URL where nothing listens (a port just freed).
pub fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

/// Temp database files for a test's devices.
pub struct Devices {
    dir: TempDir,
}

impl Default for Devices {
    fn default() -> Self {
        Self::new()
    }
}

impl Devices {
    /// A fresh directory.
    pub fn new() -> Self {
        Devices { dir: tempfile::tempdir().expect("tempdir") }
    }

    /// The database path of device `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.db"))
    }

    /// Opens device `name` on `url` with default options.
    pub fn open(&self, name: &str, url: &str) -> Client {
        self.open_with(name, ClientOptions { server: Some(url.to_owned()), ..Default::default() })
    }

    /// Opens device `name` with `options`.
    pub fn open_with(&self, name: &str, options: ClientOptions) -> Client {
        open_client(&self.path(name), options)
    }

    /// Opens device `name` on `url` with a wall clock.
    pub fn open_clocked(&self, name: &str, url: &str, wall: Arc<dyn Fn() -> u64 + Send + Sync>) -> Client {
        self.open_with(name, ClientOptions { server: Some(url.to_owned()), wall_clock: wall, ..Default::default() })
    }
}

/// Opens a client on `path`.
pub fn open_client(path: &Path, options: ClientOptions) -> Client {
    Client::open(path, options).unwrap_or_else(|e| panic!("cannot open client at {}: {e}", path.display()))
}

/// The live entities of `collection` as `(id, data)` pairs, from a client.
pub fn listing(client: &Client, collection: &str) -> Vec<(String, Map<String, Value>)> {
    client.list(collection).expect("list").into_iter().map(|e| (e.id.as_str().to_owned(), e.data)).collect()
}

/// The live entities of `collection` as `(id, data)` pairs, from a server snapshot, sorted by id.
pub fn server_listing(entities: &[EntityState], collection: &str) -> Vec<(String, Map<String, Value>)> {
    let mut out: Vec<_> = entities
        .iter()
        .filter(|e| e.collection.as_str() == collection && !e.deleted)
        .map(|e| (e.entity_id.as_str().to_owned(), e.data.clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Runs `f` until it is true or `timeout` passes; returns whether it became true.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request as a [`ScriptedServer`] received it.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path and query, e.g. `/v1/pull?cursor=3`.
    pub target: String,
    /// The body.
    pub body: Vec<u8>,
}

impl Request {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
}

/// How a [`ScriptedServer`] answers one request (always closing the connection after).
pub enum Reply {
    /// A whole HTTP answer, written at once.
    Now(Vec<u8>),
    /// A whole HTTP answer, written one byte every `every`.
    Trickle {
        /// The answer's bytes.
        bytes: Vec<u8>,
        /// The pause after each byte.
        every: Duration,
    },
    /// These bytes, then nothing more while the connection stays open.
    Stall(Vec<u8>),
}

/// An HTTP/1.1 answer with `Content-Length` and `Connection: close`.
pub fn http_answer(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A `200` JSON answer.
pub fn json_answer(body: &Value) -> Vec<u8> {
    http_answer(200, "application/json", body.to_string().as_bytes())
}

/// A valid `/v1/status` answer of an empty dataset, at the real time.
pub fn empty_status() -> Value {
    serde_json::json!({
        "user_id": "local", "head": 0, "state_hash": "0".repeat(64), "state_digest": "0".repeat(64),
        "horizon": 0, "policies": {"default": "fields", "collections": {}}, "devices": [], "server_time": system_ms(),
    })
}

type Handler = Arc<dyn Fn(Request) -> futures_util::future::BoxFuture<'static, Reply> + Send + Sync>;

/// A tiny HTTP server on a real socket whose answers a test scripts: for
/// servers that misbehave in ways a deltasync server never would.
pub struct ScriptedServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Every request received, in order.
    pub requests: Arc<std::sync::Mutex<Vec<Request>>>,
    task: JoinHandle<()>,
}

impl ScriptedServer {
    /// Starts a server that answers each request with `answer(request)`.
    pub async fn start<F, Fut>(answer: F) -> ScriptedServer
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Reply> + Send + 'static,
    {
        use futures_util::FutureExt;
        let handler: Handler = Arc::new(move |r| answer(r).boxed());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (handler, seen) = (handler.clone(), seen.clone());
                tokio::spawn(async move {
                    let _ = serve_one(stream, handler, seen).await;
                });
            }
        });
        ScriptedServer { url, requests, task }
    }

    /// The requests received so far, as `METHOD path`.
    pub fn seen(&self) -> Vec<String> {
        self.requests.lock().unwrap().iter().map(|r| format!("{} {}", r.method, r.path())).collect()
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_one(
    mut stream: tokio::net::TcpStream,
    handler: Handler,
    seen: Arc<std::sync::Mutex<Vec<Request>>>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or_default().to_owned(), words.next().unwrap_or_default().to_owned());
    let length: usize = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request = Request { method, target, body: buf[head_end..].to_vec() };
    seen.lock().unwrap().push(request.clone());
    match handler(request).await {
        Reply::Now(bytes) => stream.write_all(&bytes).await?,
        Reply::Trickle { bytes, every } => {
            for b in bytes {
                stream.write_all(&[b]).await?;
                tokio::time::sleep(every).await;
            }
        }
        Reply::Stall(bytes) => {
            stream.write_all(&bytes).await?;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
    stream.shutdown().await
}
