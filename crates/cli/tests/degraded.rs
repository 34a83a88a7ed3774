//! A server whose writes fail (here: its SQLite file on a full 8 MiB tmpfs)
//! says so: pushes answer 503 `unavailable`, `/healthz` answers 503 with
//! `"status": "degraded"`; once the disk has room again, `/healthz` is ok
//! within seconds and pushes succeed. Needs root (to mount the tmpfs);
//! otherwise the test says it is skipped and passes.

mod common;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Unmounts the tmpfs when dropped (lazily, so that nothing still open can keep it).
struct Mount {
    dir: PathBuf,
}

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Option<Mount> {
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| Mount { dir: dir.to_owned() })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Writes a file until the file system is full (ENOSPC); returns its size.
fn fill(path: &Path) -> u64 {
    let mut f = File::create(path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut written = 0u64;
    for size in [chunk.len(), 4096, 512, 1] {
        loop {
            match f.write(&chunk[..size]) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    written
}

/// GET /healthz: status and body.
async fn healthz(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.get(format!("{url}/healthz")).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("/healthz answered non-JSON ({e}): {text}")))
}

/// Polls /healthz every 100 ms until it answers `status`, for at most `limit`.
async fn healthz_becomes(c: &reqwest::Client, url: &str, status: u16, limit: Duration) -> (Duration, Value) {
    let started = Instant::now();
    loop {
        let (s, body) = healthz(c, url).await;
        if s == status {
            return (started.elapsed(), body);
        }
        assert!(started.elapsed() < limit, "/healthz still answers {s} {body} after {limit:?}, not {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_degrades_health_and_the_server_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_mount) = Mount::tmpfs(dir.path(), "8m") else {
        eprintln!("skipped: cannot mount tmpfs (needs root)");
        return;
    };
    let database = format!("sqlite://{}", dir.path().join("test.db").display());
    let server = Server::start_with(
        &Backend::Sqlite,
        Options {
            database: Some(database),
            config: Some("[server]\nmax_data_bytes = 1048576\n".into()),
            ..Options::default()
        },
    );
    let (c, url) = (reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(), server.url.as_str());
    let base = now_ms() - 60_000;
    let small = upsert("small-1", "notes", "n1", json!({"text": "before the disk filled"}), &hlc(base, 0, "d1"));
    push(&c, url, "d1", vec![small]).await;
    assert_eq!(healthz(&c, url).await, (200, json!({"status": "ok"})));

    let filler = dir.path().join("filler");
    let filled = fill(&filler);
    eprintln!("filled the tmpfs with {filled} bytes");

    // A push that needs more room than any the database file or its journal already holds.
    let data = document(7, 600_000);
    let big = upsert("big-1", "notes", &random_uuid(), data.clone(), &hlc(base + 1, 0, "d1"));
    let r = c.post(format!("{url}/v1/push")).json(&json!({"device_id": "d1", "changes": [big.clone()]})).send().await;
    let r = r.expect("a push on a full disk got no answer");
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").cloned();
    let text = r.text().await.unwrap();
    assert_eq!(status, 503, "a push on a full disk: {text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"], "unavailable", "{body}");
    assert!(retry_after.is_some(), "a 503 without Retry-After: {body}");

    // /healthz probes a write at most once a second: it turns within a few seconds.
    let (took, body) = healthz_becomes(&c, url, 503, Duration::from_secs(5)).await;
    eprintln!("/healthz answered 503 {took:?} after the push failed: {body}");
    assert_eq!(body["error"], "unavailable", "{body}");
    assert_eq!(body["status"], "degraded", "{body}");

    // Room again: healthy within seconds, and the same push goes through.
    std::fs::remove_file(&filler).unwrap();
    let (took, body) = healthz_becomes(&c, url, 200, Duration::from_secs(10)).await;
    eprintln!("/healthz answered 200 {took:?} after the disk had room again");
    assert_eq!(body, json!({"status": "ok"}));
    let answer = push(&c, url, "d1", vec![big]).await;
    assert_eq!(answer["results"][0]["status"], "applied", "the retried push: {answer}");
    assert_eq!(answer["results"][0]["seq"], 2, "the failed push must not have consumed a seq: {answer}");
    let (s, page) = get(&c, url, "/v1/pull?device_id=d2&cursor=0").await;
    assert_eq!(s, 200, "{page}");
    let changes = page["changes"].as_array().unwrap();
    let ids: Vec<&str> = changes.iter().map(|ch| ch["change_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["small-1", "big-1"]);
    assert!(changes[1]["data"] == data, "the change pushed after recovery came back with other data");
}
