//! `deltasync bench`: a load generator that measures the server end to end.
//!
//! It starts `deltasync serve` itself (a child process on a fresh SQLite file
//! in a temporary directory, so its memory can be read from /proc) unless
//! `--url` names a running server, then runs each workload and prints a
//! table; `--out FILE` also writes the figures as JSON.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use serde_json::{Value, json};

/// Flags of `deltasync bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Benchmark a running server instead of starting one (its memory is then not measured).
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// How many entities the push workloads create.
    #[arg(long, default_value_t = 100_000)]
    entities: usize,
    /// Changes per push request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Concurrent devices of the multi-device push.
    #[arg(long, default_value_t = 8)]
    devices: usize,
    /// Write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// One measured workload.
#[derive(Debug, Serialize)]
struct Figure {
    workload: String,
    changes: usize,
    seconds: f64,
    changes_per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    mb_per_sec: Option<f64>,
}

struct ChildServer {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> anyhow::Result<ChildServer> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.db");
    let mut child = Command::new(std::env::current_exe()?)
        .args(["serve", "--listen", "127.0.0.1:0", "--database"])
        .arg(format!("sqlite://{}", db.display()))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start deltasync serve")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let url = line.trim().strip_prefix("deltasync listening on ").context("unexpected serve output")?.to_owned();
    Ok(ChildServer { child, url, _dir: dir })
}

fn entity_data(i: usize) -> Value {
    json!({"title": format!("Task number {i} with a reasonably long title"), "done": i % 3 == 0,
           "priority": i % 5, "tags": ["work", "home", format!("t{}", i % 17)], "estimate": (i % 100) as f64 / 4.0})
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

async fn push_all(
    c: &reqwest::Client,
    url: &str,
    device: &str,
    prefix: &str,
    count: usize,
    batch: usize,
) -> anyhow::Result<()> {
    let mut counter = 0u32;
    let mut ms = now_ms();
    for start in (0..count).step_by(batch) {
        let changes: Vec<Value> = (start..(start + batch).min(count))
            .map(|i| {
                counter += 1;
                if counter > 99_999 {
                    counter = 0;
                    ms += 1;
                }
                json!({"change_id": format!("{prefix}-{i}"), "collection": "tasks", "entity_id": format!("{prefix}-{i}"),
                       "op": "upsert", "data": entity_data(i), "hlc": format!("{ms:013}-{counter:05}-{device}")})
            })
            .collect();
        let r = c.post(format!("{url}/v1/push")).json(&json!({"device_id": device, "changes": changes})).send().await?;
        if !r.status().is_success() {
            bail!("push answered {}: {}", r.status(), r.text().await?);
        }
        r.bytes().await?;
    }
    Ok(())
}

fn figure(workload: &str, changes: usize, elapsed: Duration, bytes: Option<usize>) -> Figure {
    let seconds = elapsed.as_secs_f64();
    Figure {
        workload: workload.to_owned(),
        changes,
        seconds,
        changes_per_sec: changes as f64 / seconds,
        mb_per_sec: bytes.map(|b| b as f64 / 1e6 / seconds),
    }
}

/// Runs the benchmark.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let server = if args.url.is_none() { Some(start_server()?) } else { None };
        let url = args.url.clone().or_else(|| server.as_ref().map(|s| s.url.clone())).expect("a url");
        let url = url.trim_end_matches('/').to_owned();
        let c = reqwest::Client::new();
        let run_id = now_ms();
        let mut figures = Vec::new();

        eprintln!("push: {} entities from 1 device, batches of {}", args.entities, args.batch);
        let t = Instant::now();
        push_all(&c, &url, "bench-1", &format!("a{run_id}"), args.entities, args.batch).await?;
        figures.push(figure("push, 1 device", args.entities, t.elapsed(), None));

        eprintln!("push: {} entities from {} devices at once", args.entities, args.devices);
        let per_device = args.entities / args.devices.max(1);
        let t = Instant::now();
        let tasks: Vec<_> = (0..args.devices)
            .map(|d| {
                let c = c.clone();
                let url = url.clone();
                let batch = args.batch;
                tokio::spawn(async move {
                    push_all(&c, &url, &format!("bench-d{d}"), &format!("b{run_id}-{d}"), per_device, batch).await
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        figures.push(figure(&format!("push, {} devices", args.devices), per_device * args.devices, t.elapsed(), None));

        eprintln!("pull: the whole log, pages of 10000");
        let t = Instant::now();
        let (mut cursor, mut pulled, mut bytes) = (0u64, 0usize, 0usize);
        loop {
            let r = c.get(format!("{url}/v1/pull?device_id=bench-reader&cursor={cursor}&limit=10000")).send().await?;
            if !r.status().is_success() {
                bail!("pull answered {}", r.status());
            }
            let body = r.bytes().await?;
            bytes += body.len();
            let page: Value = serde_json::from_slice(&body)?;
            pulled += page["changes"].as_array().map_or(0, Vec::len);
            cursor = page["cursor"].as_u64().context("no cursor")?;
            if !page["has_more"].as_bool().unwrap_or(false) {
                break;
            }
        }
        figures.push(figure("pull, 10000 per page", pulled, t.elapsed(), Some(bytes)));

        println!("{:<24} {:>10} {:>10} {:>14} {:>8}", "workload", "changes", "seconds", "changes/s", "MB/s");
        for f in &figures {
            let mb = f.mb_per_sec.map_or(String::from("-"), |m| format!("{m:.1}"));
            println!("{:<24} {:>10} {:>10.2} {:>14.0} {:>8}", f.workload, f.changes, f.seconds, f.changes_per_sec, mb);
        }
        if let Some(path) = &args.out {
            std::fs::write(path, serde_json::to_vec_pretty(&json!({"figures": figures}))?)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        drop(server);
        Ok(())
    })
}
