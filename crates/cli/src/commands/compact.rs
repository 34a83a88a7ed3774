//! `deltasync compact`: run one compaction pass now, print what it did as JSON, then exit.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use deltasync_server::Config;
use serde_json::json;

use super::database::Database;

/// Flags of `deltasync compact`.
#[derive(Args, Debug)]
#[command(after_help = "Drops the changes that every active device has pulled and that are older than \
`compact_after`; a device not seen for `device_expiry` no longer holds them back (it heals by bootstrap when \
it returns). Logged appends and the receipts that answer re-pushed changes as duplicates are kept. \
`deltasync serve` runs the same pass every `compact_interval`; this one may run beside it.

Prints one JSON object: {\"datasets\": looked at, \"compacted\": whose history was dropped, \"dropped\": log rows \
deleted, \"horizon\": the highest horizon reached, \"compact_after_secs\", \"device_expiry_secs\", \"elapsed_ms\"}.")]
pub struct CompactArgs {
    /// The database: sqlite://PATH or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE.
    #[arg(long, value_name = "URL", env = "DELTASYNC_DATABASE", hide_env_values = true)]
    database: String,
    /// TOML configuration file whose `[server]` keys `compact_after` and `device_expiry` apply
    /// (the defaults, 30d and 90d, without it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Runs one pass and prints its figures.
pub fn run(args: CompactArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let database = Database::parse(&args.database)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let started = Instant::now();
    let done = runtime.block_on(async {
        let store = database.open().await?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
        let done = store.compact(&config.compaction.rules(now)).await;
        store.close().await;
        anyhow::Ok(done?)
    })?;
    let c = &config.compaction;
    let report = json!({
        "datasets": done.datasets,
        "compacted": done.compacted,
        "dropped": done.dropped,
        "horizon": done.horizon,
        "compact_after_secs": c.compact_after.as_secs(),
        "device_expiry_secs": c.device_expiry.as_secs(),
        "elapsed_ms": started.elapsed().as_millis() as u64,
    });
    println!("{report}");
    Ok(())
}
