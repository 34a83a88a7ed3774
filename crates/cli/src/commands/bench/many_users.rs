//! The many-users workload (`--workloads many-users`): real traffic is not
//! 500-change batches but many devices of many users, each syncing a few
//! changes at a time.
//!
//! `--users` users (1,000), each with two devices, on servers of its own
//! started with `--auth jwt` (a token per user; the bench's own servers run
//! with `--auth none`, where every device would be the one user's), on the
//! bench's store: a fresh SQLite file, or the run's PostgreSQL schema with
//! `--instances` servers (device `d` talks to instance `d % instances`).
//! `--connections` workers (256) share the devices; each worker takes its
//! devices in turn, and each turn is one `POST /v1/sync` carrying 1–3 small
//! upserts (a random UUID change id, one of the user's 100 entities) and
//! the device's cursor, so it also pulls what the user's other device
//! pushed. The figures: syncs/s and changes/s over `--many-users-seconds`,
//! the p50 and p99 of a sync's round trip, and the servers' peak RSS.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::server::{BENCH_CONFIG, Servers, proc_status_kib};
use super::workloads::{Stamps, bar, percentile};
use super::{Figure, Target};

/// Entities each user's devices update.
const ENTITIES_PER_USER: u64 = 100;
/// Devices per user.
const DEVICES_PER_USER: usize = 2;

/// The shape of the workload.
pub struct ManyUsers {
    /// Users (each with two devices).
    pub users: usize,
    /// Concurrent connections (workers) in all.
    pub connections: usize,
    /// How long the devices sync.
    pub seconds: f64,
}

/// One simulated device.
struct Device {
    user: usize,
    name: String,
    token: Arc<str>,
    url: Arc<str>,
    cursor: u64,
    stamps: Stamps,
    syncs: u64,
}

/// What one worker measured.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    changes: u64,
}

/// One `POST /v1/sync` of 1–3 changes for `device`; returns how many changes it carried.
async fn sync_once(http: &reqwest::Client, device: &mut Device) -> anyhow::Result<u64> {
    let count = 1 + device.syncs % 3;
    let changes: Vec<Value> = (0..count)
        .map(|k| {
            let entity = (device.syncs * 7 + k) % ENTITIES_PER_USER;
            json!({
                "change_id": uuid::Uuid::new_v4().to_string(),
                "collection": "tasks",
                "entity_id": uuid::Uuid::from_u64_pair(device.user as u64, entity).to_string(),
                "op": "upsert",
                "data": {"done": device.syncs.is_multiple_of(2), "n": device.syncs},
                "hlc": device.stamps.next(),
            })
        })
        .collect();
    let body = json!({"device_id": device.name, "cursor": device.cursor, "changes": changes, "limit": 1000});
    let r = http.post(format!("{}/v1/sync", device.url)).bearer_auth(&*device.token).json(&body).send().await?;
    let status = r.status();
    let answer: Value = serde_json::from_slice(&r.bytes().await?)?;
    if !status.is_success() {
        bail!("{}: sync answered {status}: {answer}", device.name);
    }
    device.cursor = answer["cursor"].as_u64().context("a sync answer without cursor")?;
    device.syncs += 1;
    Ok(count)
}

/// Runs the workload on servers of its own on `database` (`instances` of them).
pub async fn many_users(database: &str, instances: usize, shape: &ManyUsers) -> anyhow::Result<Vec<Figure>> {
    let dir = tempfile::tempdir()?;
    let secret = b"many-users bench secret";
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, secret)?;
    let database = match database {
        "" => format!("sqlite://{}", dir.path().join("many-users.db").display()),
        url => url.to_owned(),
    };
    let extra =
        ["--auth".to_owned(), "jwt".to_owned(), "--jwt-secret-file".to_owned(), secret_file.display().to_string()];
    let servers = Servers::start_with(&database, instances, None, BENCH_CONFIG, &extra)?;
    let urls: Vec<Arc<str>> = servers.urls().into_iter().map(Arc::from).collect();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let run = now;
    let mut devices = Vec::with_capacity(shape.users * DEVICES_PER_USER);
    for user in 0..shape.users {
        let id = deltasync_protocol::UserId::parse(format!("bench-many-{run}-{user}")).expect("a bench user id");
        let token: Arc<str> = deltasync_server::auth::mint_token(secret, &id, now, 3600).into();
        for d in 0..DEVICES_PER_USER {
            let n = devices.len();
            let name = format!("bench-many-{user}-{d}");
            devices.push(Device {
                user,
                stamps: Stamps::new(&name),
                name,
                token: token.clone(),
                url: urls[n % urls.len()].clone(),
                cursor: 0,
                syncs: 0,
            });
        }
    }
    let connections = shape.connections.clamp(1, devices.len().max(1));
    let http = reqwest::Client::builder().tcp_nodelay(true).pool_max_idle_per_host(connections).build()?;
    // Worker w takes devices w, w + connections, w + 2 × connections, …
    let mut shares: Vec<Vec<Device>> = (0..connections).map(|_| Vec::new()).collect();
    for (n, device) in devices.into_iter().enumerate() {
        shares[n % connections].push(device);
    }
    let syncs = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let progress = bar((shape.seconds * 10.0) as u64, &format!("many users, {} devices", shape.users * 2));
    let started = Instant::now();
    let workers: Vec<_> = shares
        .into_iter()
        .map(|mut share| {
            let (http, syncs, stop) = (http.clone(), syncs.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                'run: loop {
                    for device in &mut share {
                        if stop.load(Ordering::Relaxed) {
                            break 'run;
                        }
                        let sent = Instant::now();
                        tally.changes += sync_once(&http, device).await?;
                        tally.latencies.push(sent.elapsed());
                        syncs.fetch_add(1, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(tally)
            })
        })
        .collect();
    while started.elapsed().as_secs_f64() < shape.seconds {
        tokio::time::sleep(Duration::from_millis(100)).await;
        progress.set_position((started.elapsed().as_secs_f64() * 10.0) as u64);
    }
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut changes = 0;
    for worker in workers {
        let tally = worker.await??;
        latencies.extend(tally.latencies);
        changes += tally.changes;
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    let peak_kib = servers.pids().into_iter().map(|pid| proc_status_kib(pid, "VmHWM:")).max().unwrap_or(0);
    drop(servers);
    let done = latencies.len();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (p50, p99) = (ms(percentile(&mut latencies, 0.50)), ms(percentile(&mut latencies, 0.99)));
    let suffix = if instances > 1 { format!(" over {instances} instances") } else { String::new() };
    let details = json!({
        "users": shape.users, "devices": shape.users * DEVICES_PER_USER, "connections": connections,
        "instances": instances, "seconds": seconds, "syncs": done, "changes": changes,
        "p50_ms": p50, "p99_ms": p99, "max_ms": ms(percentile(&mut latencies, 1.0)),
    });
    Ok(vec![
        Figure::new(
            format!("many users, syncs{suffix}"),
            done as f64 / seconds,
            "syncs/s",
            Some(Target::AtLeast(15_000.0)),
            details.clone(),
        ),
        Figure::new(
            format!("many users, changes{suffix}"),
            changes as f64 / seconds,
            "changes/s",
            None,
            details.clone(),
        ),
        Figure::new(format!("many users, sync p50{suffix}"), p50, "ms", None, details.clone()),
        Figure::new(format!("many users, sync p99{suffix}"), p99, "ms", Some(Target::AtMost(20.0)), details.clone()),
        Figure::new(format!("many users, server peak RSS{suffix}"), peak_kib as f64 / 1024.0, "MiB", None, details),
    ])
}
