//! Real object stores for tests: a folder, wsgidav (WebDAV, one worker
//! thread), rclone's WebDAV server and moto (S3), each started on a free
//! 127.0.0.1 port in a temporary folder and killed when dropped.
//!
//! Self-contained (std and tempfile only), so any test crate can use it:
//! `#[path = "../../client/tests/support/stores.rs"] mod stores;`.
//!
//! Nothing global is set: each [`TestStore`] carries its URL and the
//! environment variables a client needs for it (`DELTASYNC_STORE_USER` /
//! `DELTASYNC_STORE_PASSWORD` for WebDAV, `AWS_*` for S3). Pass
//! [`TestStore::env`] to a child process with `Command::envs`, or in process
//! to `ObjectStore::open_with(&store.url, &StoreEnv::from_pairs(store.env.clone()))`.
//!
//! A starter returns `Err(reason)` when its server program is missing (or
//! does not come up), and the test should print that it is skipped.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The WebDAV user the test servers accept.
pub const DAV_USER: &str = "deltasync";
/// The WebDAV password the test servers accept.
pub const DAV_PASSWORD: &str = "test-password";
/// The S3 bucket the moto server holds.
pub const BUCKET: &str = "deltasync-test";

/// How long a server may take to answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running store, stopped (and its folder removed) when dropped.
pub struct TestStore {
    /// Which server this is, for messages.
    pub name: &'static str,
    /// The store URL (`file://`, `webdav://`, `s3://`).
    pub url: String,
    /// The environment variables a client needs for this store.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    log: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl TestStore {
    /// The server's output so far (empty for a folder), for a failing test's message.
    pub fn log(&self) -> String {
        self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A folder store in a fresh temporary folder.
pub fn folder() -> Result<TestStore, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temporary folder: {e}"))?;
    let root = dir.path().join("store");
    Ok(TestStore {
        name: "folder",
        url: format!("file://{}", root.display()),
        env: Vec::new(),
        child: None,
        log: None,
        _dir: dir,
    })
}

/// wsgidav 4 (cheroot) with ONE worker thread, which makes its conditional
/// writes atomic, and basic auth for [`DAV_USER`].
pub fn wsgidav() -> Result<TestStore, String> {
    let program = find_program("wsgidav")?;
    let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temporary folder: {e}"))?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let port = free_port()?;
    let config = format!(
        r#"{{
  "host": "127.0.0.1",
  "port": {port},
  "server": "cheroot",
  "server_args": {{ "numthreads": 1 }},
  "provider_mapping": {{ "/": {root:?} }},
  "http_authenticator": {{ "domain_controller": null, "accept_basic": true, "accept_digest": false, "default_to_digest": false }},
  "simple_dc": {{ "user_mapping": {{ "*": {{ {DAV_USER:?}: {{ "password": {DAV_PASSWORD:?} }} }} }} }},
  "verbose": 1,
  "logging": {{ "enable_loggers": [] }}
}}"#,
        root = root.display().to_string()
    );
    let config_path = dir.path().join("wsgidav.json");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let mut command = Command::new(program);
    command.arg("--config").arg(&config_path);
    start("wsgidav", command, dir, port, format!("webdav://127.0.0.1:{port}/deltasync"), dav_env())
}

/// `rclone serve webdav`, which ignores conditional headers (the store a
/// probe must refuse), with basic auth for [`DAV_USER`].
pub fn rclone() -> Result<TestStore, String> {
    let program = find_program("rclone")?;
    let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temporary folder: {e}"))?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let port = free_port()?;
    let mut command = Command::new(program);
    command
        .args(["serve", "webdav"])
        .arg(&root)
        .args(["--addr", &format!("127.0.0.1:{port}"), "--user", DAV_USER, "--pass", DAV_PASSWORD])
        .args(["--config", "/dev/null"]);
    start("rclone", command, dir, port, format!("webdav://127.0.0.1:{port}/deltasync"), dav_env())
}

/// moto's S3 app (the one `moto_server` serves) on a single-threaded server.
const MOTO_ONE_THREAD: &str = "\
import os, sys
from werkzeug.serving import run_simple
from moto.server import DomainDispatcherApplication, create_backend_app
os.environ.setdefault('MOTO_PORT', sys.argv[2])
run_simple(sys.argv[1], int(sys.argv[2]), DomainDispatcherApplication(create_backend_app), threaded=False)
";

/// moto's S3 server with the bucket [`BUCKET`] created.
pub fn moto() -> Result<TestStore, String> {
    // moto_server serves requests on many threads, and its conditional
    // PutObject is then not atomic: under load (four devices probing at once)
    // two of four racing create-only writes both won. moto's own app is
    // served here on one thread, as wsgidav is, so its checks are atomic the
    // way AWS S3 documents its own.
    find_program("moto_server")?;
    let python = find_program("python3")?;
    let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temporary folder: {e}"))?;
    let port = free_port()?;
    let mut command = Command::new(python);
    command.arg("-c").arg(MOTO_ONE_THREAD).args(["127.0.0.1", &port.to_string()]);
    let env = vec![
        ("AWS_ENDPOINT_URL".to_string(), format!("http://127.0.0.1:{port}")),
        ("AWS_ACCESS_KEY_ID".to_string(), "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), "testing".to_string()),
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
    ];
    let store = start("moto", command, dir, port, format!("s3://{BUCKET}/deltasync"), env)?;
    // moto accepts an unsigned CreateBucket.
    let status = http_status(
        port,
        &format!("PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    )
    .map_err(|e| format!("cannot create the bucket on moto: {e}"))?;
    if status != 200 {
        return Err(format!("moto answered {status} to creating the bucket; its log:\n{}", store.log()));
    }
    Ok(store)
}

fn dav_env() -> Vec<(String, String)> {
    vec![
        ("DELTASYNC_STORE_USER".to_string(), DAV_USER.to_string()),
        ("DELTASYNC_STORE_PASSWORD".to_string(), DAV_PASSWORD.to_string()),
    ]
}

/// Starts `command` with its output in a log file and waits until its port
/// answers HTTP.
fn start(
    name: &'static str,
    mut command: Command,
    dir: tempfile::TempDir,
    port: u16,
    url: String,
    env: Vec<(String, String)>,
) -> Result<TestStore, String> {
    let log = dir.path().join(format!("{name}.log"));
    let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let child = command
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let mut store = TestStore { name, url, env, child: Some(child), log: Some(log), _dir: dir };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let request = format!("OPTIONS / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        if http_status(port, &request).is_ok() {
            return Ok(store);
        }
        if let Some(child) = &mut store.child
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(format!("{name} exited ({status}) before answering; its log:\n{}", store.log()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{name} did not answer on port {port} within {START_TIMEOUT:?}; its log:\n{}",
                store.log()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends one raw HTTP/1.1 request to 127.0.0.1:`port` and returns the status.
fn http_status(port: u16, request: &str) -> Result<u16, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let _ = stream.shutdown(Shutdown::Write);
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        match stream.read(&mut head[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => return Err(e.to_string()),
        }
    }
    let text = String::from_utf8_lossy(&head[..read]);
    text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| format!("not an HTTP answer: {text:?}"))
}

/// A port that was free a moment ago.
fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| format!("cannot find a free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// The program on PATH, or why not.
fn find_program(name: &str) -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| format!("{name} is not installed (not on PATH)"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}
