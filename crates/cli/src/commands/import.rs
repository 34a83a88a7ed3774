//! `deltasync import`: load a full-state snapshot into one user's dataset,
//! each entity one upsert through the store's push, so the hash chain, the
//! digest and the merge policies are exactly the server's.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Args;
use deltasync_protocol::snapshot::{self, SnapshotEntry, SnapshotError};
use deltasync_protocol::wire::ResultStatus;
use deltasync_protocol::{Change, DeviceId, HlcClock, Op, UserId};
use deltasync_server::Config;
use deltasync_server::store::{DeviceTouch, PushBatch, PushOutcome};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use serde_json::{Value, json};

use super::database::Database;

/// Flags of `deltasync import`.
#[derive(Args, Debug)]
#[command(after_help = "FILE (`-`: stdin) is a full-state snapshot: one JSON object {collection: {entity_id: data}}, \
or NDJSON lines {\"collection\", \"entity_id\", \"data\"}. The whole file is checked first (names, data an object \
within max_data_bytes and max_depth, no entity twice); a bad line is reported with its number and nothing is \
imported.

Each entity becomes one upsert of its fields, pushed in batches of max_batch through the same store code as \
POST /v1/push. Its change id is derived from the content (`import-` + SHA-256 of user, collection, entity id and \
canonical data), so running the same import again imports nothing: every change is answered `duplicate`. An \
import cut short can simply be run again.

Under the `reject` merge policy an entity that exists already is refused (counted in `rejected`).

The server may keep running meanwhile, on SQLite as on PostgreSQL: the import commits through the store's own \
transactions and devices get the imported changes at their next sync. (On SQLite, long polls and live sockets \
waiting on the running server are not woken by another process's commits; they see them at their next sync.)

Prints one JSON object: {\"entities\", \"imported\": applied now, \"duplicates\": imported before, \"rejected\", \
\"elapsed_ms\", \"rate_per_sec\"}. A progress bar goes to stderr when it is a terminal.")]
pub struct ImportArgs {
    /// The database: sqlite://PATH or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE.
    #[arg(long, value_name = "URL", env = "DELTASYNC_DATABASE", hide_env_values = true)]
    database: String,
    /// The user whose dataset receives the entities (the token's `sub`; `local` for a server without auth).
    #[arg(long, value_name = "USER")]
    user: String,
    /// The device the upserts are pushed as (their HLCs carry it): an id of its own, such as
    /// `importer`, not a real device's (its cursor is set to the head at the end).
    #[arg(long, value_name = "DEVICE")]
    device: String,
    /// TOML configuration file of the server: its limits and merge policies apply (the defaults without it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The snapshot file, or `-` for stdin.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// What an import did.
#[derive(Debug, Default)]
struct Tally {
    /// Upserts applied now.
    imported: u64,
    /// Upserts the dataset already held (an earlier import of the same content).
    duplicates: u64,
    /// Upserts the merge policy refused.
    rejected: u64,
}

/// Checks the whole file, then pushes it, and prints the figures.
pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let user = UserId::parse(args.user.as_str()).context("--user")?;
    let device = DeviceId::parse(args.device.as_str()).context("--device")?;
    let database = Database::parse(&args.database)?;
    let started = Instant::now();
    let text = read(&args.file)?;
    let limits = config.limits.change_limits();
    // Two passes over the text: every entry checked first, then read again
    // batch by batch, so only the entity keys and one batch are held.
    let total = snapshot::check(&text, &limits)
        .map_err(|e| anyhow::anyhow!("{}: {e}; nothing was imported", args.file.display()))?;
    let entries = snapshot::entries(&text, &limits)?;
    let bar = progress_bar(total);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let tally = runtime.block_on(async {
        let store = database.open().await?;
        let pushed = async {
            store.check_policies(&config.policies).await?;
            push_all(&*store, &config, &user, &device, entries, &bar).await
        }
        .await;
        store.close().await;
        pushed
    })?;
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    if tally.rejected > 0 {
        eprintln!(
            "{} entities were rejected by the `reject` merge policy of their collection (they exist already)",
            tally.rejected
        );
    }
    if total == 0 {
        eprintln!("nothing imported: the snapshot holds no entities");
    } else if tally.imported == 0 && tally.duplicates == total {
        eprintln!("nothing imported: all {total} entities were imported before with the same content");
    }
    println!("{}", summary(total, &tally, elapsed));
    Ok(())
}

/// The file's text (`-`: stdin).
fn read(file: &Path) -> anyhow::Result<String> {
    let mut text = String::new();
    if file == Path::new("-") {
        std::io::stdin().read_to_string(&mut text).context("cannot read the snapshot from stdin")?;
    } else {
        text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    }
    Ok(text)
}

/// A bar of `len` entities on stderr, hidden when stderr is not a terminal.
fn progress_bar(len: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template("import {bar:40} {human_pos}/{human_len} entities, {rate}, eta {eta}")
        .expect("a valid template")
        .with_key("rate", |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0}/s", state.per_sec());
        });
    bar.set_style(style);
    bar
}

/// Pushes `entries` in batches of `max_batch`, one store transaction each.
async fn push_all(
    store: &dyn deltasync_server::Store,
    config: &Config,
    user: &UserId,
    device: &DeviceId,
    entries: impl Iterator<Item = Result<SnapshotEntry, SnapshotError>>,
    bar: &ProgressBar,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let mut clock = HlcClock::new(device.clone());
    let batch_size = config.limits.max_batch.max(1);
    let mut entries = entries.peekable();
    let mut last_head = 0;
    while entries.peek().is_some() {
        let now = now_ms()?;
        let mut changes = Vec::with_capacity(batch_size);
        for entry in entries.by_ref().take(batch_size) {
            let entry = entry.context("the snapshot changed between its check and its import")?;
            changes.push(Change {
                change_id: entry.change_id(user),
                hlc: clock.tick(now),
                collection: entry.collection,
                entity_id: entry.entity_id,
                op: Op::Upsert,
                data: Some(Value::Object(entry.data)),
                // Based on no version: under the `reject` policy an entity is
                // created, and one that exists already is refused.
                base_version: Some(0),
            });
        }
        let n = changes.len() as u64;
        let batch = PushBatch {
            user: user.clone(),
            device: device.clone(),
            changes,
            now,
            max_clock_drift_ms: config.limits.max_clock_drift_ms,
            require_cursor: None,
        };
        let outcome = store.push(batch, config.policies.clone()).await.with_context(|| {
            format!(
                "the push after {} entities failed; those are kept, and running the same import again \
                 imports the rest",
                tally.imported + tally.duplicates + tally.rejected
            )
        })?;
        let PushOutcome::Committed { results, head } = outcome else {
            bail!("the store asked for a reset on a push without a cursor");
        };
        last_head = head.seq;
        for result in results {
            match result.status {
                ResultStatus::Applied => tally.imported += 1,
                ResultStatus::Duplicate => tally.duplicates += 1,
                ResultStatus::Rejected => tally.rejected += 1,
            }
        }
        bar.inc(n);
    }
    // The push registered the device at cursor 0; it never pulls, so place it
    // at the head it wrote up to, lest it hold compaction back until it expires.
    let touch = DeviceTouch::new(user, device, Some(last_head), now_ms()?);
    store.touch_device(touch).await.context("cannot record the import's device at the head")?;
    Ok(tally)
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> anyhow::Result<u64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH).context("the system clock is before 1970")?.as_millis() as u64)
}

/// The JSON the command prints.
fn summary(entities: u64, tally: &Tally, elapsed: Duration) -> Value {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { (entities as f64 / secs).round() as u64 } else { entities };
    json!({
        "entities": entities,
        "imported": tally.imported,
        "duplicates": tally.duplicates,
        "rejected": tally.rejected,
        "elapsed_ms": elapsed.as_millis() as u64,
        "rate_per_sec": rate,
    })
}
