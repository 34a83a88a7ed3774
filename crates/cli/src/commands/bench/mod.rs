//! `deltasync bench`: a load generator that measures the server end to end.
//!
//! It starts `deltasync serve` itself (child processes, so their memory can
//! be read from /proc) unless `--url` names a running server: one on a fresh
//! SQLite file in a temporary directory by default, or `--instances N` on a
//! fresh schema of the PostgreSQL database `--database postgres://…` names
//! (dropped at the end). It runs each workload with a progress bar, then
//! prints a table against the project's targets; `--out FILE` also writes the
//! figures as JSON.

mod compaction;
mod floor;
mod live;
mod many_users;
mod postgres;
mod server;
mod wire;
mod workloads;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use serde_json::{Map, Value, json};

use postgres::BenchSchema;

use server::Servers;

/// A workload of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Bytes on the wire of a one-field edit synced through POST /v1/sync by the client SDK.
    Wire,
    /// New entities pushed in batches from 1 device, then from --devices devices at once.
    Push,
    /// One-field patches to existing entities.
    Update,
    /// A fresh device pulls the whole log, 10,000 changes per page.
    Pull,
    /// Device A pushes one change while device B waits in a long poll.
    Propagation,
    /// Device A pushes one change while device B holds a live WebSocket (GET /v1/live).
    Live,
    /// --live-connections idle live WebSockets held open at once: the server's memory, and
    /// propagation to one of them meanwhile.
    LiveIdle,
    /// A fresh device streams a snapshot of --bootstrap-entities entities.
    Bootstrap,
    /// SQLite only: the database file's size while 4 devices update 1,000 entities
    /// --compaction-updates times, with compaction every --compact-interval and without.
    Compaction,
    /// --users users with two devices each, every device syncing 1-3 small changes at a time over
    /// --connections connections in all, for --many-users-seconds (servers of its own, --auth jwt).
    ManyUsers,
    /// No server: the rows a push of --entities new entities writes, inserted straight into a
    /// fresh SQLite file with the server's schema, in transactions of --batch: SQLite's own rate.
    SqliteFloor,
    /// The client SDK: a first sync of --client-changes changes into a fresh
    /// replica, then the sync of a --client-outbox change outbox.
    Client,
}

/// Flags of `deltasync bench`.
#[derive(Args, Debug)]
#[command(after_help = "Every push is acknowledged only after it is durable (on SQLite, the server's group \
commit with synchronous=FULL; on PostgreSQL, its COMMIT).\nThe bench client runs on the same machine as the server and shares its cores.\n\
With --database postgres://…, the bench creates a schema bench_<random> in that database, gives it to every \
server it starts (options=-csearch_path=…), prints its name, and drops it with everything in it at the end, \
also after an error or Ctrl-C.\n\
Examples:\n  deltasync bench --out bench.json    (all workloads, about two minutes in a release build)\n  \
deltasync bench --database postgres://postgres@127.0.0.1:5432/test --instances 2 --out bench-pg2.json")]
pub struct BenchArgs {
    /// Benchmark a running server instead of starting one (its memory is then not measured).
    #[arg(long, value_name = "URL", conflicts_with_all = ["database", "instances"])]
    url: Option<String>,
    /// The database of the servers the bench starts: postgres://USER@HOST:PORT/DB (a fresh schema is made in
    /// it for the run and dropped after), or sqlite://PATH (a file that must not exist yet; it is left behind).
    /// Without it: a fresh SQLite file in a temporary directory.
    #[arg(long, value_name = "URL")]
    database: Option<String>,
    /// How many `deltasync serve` processes to start on that database (more than 1 needs postgres://). The
    /// multi-device push and the bootstrap fill spread their devices round-robin over them; propagation waits
    /// on instance 0 and pushes through instance 1; every other workload uses instance 0.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    instances: u32,
    /// Which workloads to run (comma-separated); all but `sqlite-floor`, `compaction` and `client` by default.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Workload::Wire, Workload::Push, Workload::Update, Workload::Pull, Workload::Propagation, Workload::Live, Workload::LiveIdle, Workload::Bootstrap, Workload::ManyUsers])]
    workloads: Vec<Workload>,
    /// How many entities each push workload creates.
    #[arg(long, default_value_t = 100_000)]
    entities: usize,
    /// Changes per push request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// The change ids and entity ids the push, update, pull and bootstrap workloads send: `random`
    /// (version 4 UUIDs, as real clients send them), or `time-ordered` (ids that arrive in key order,
    /// the shape that favours the server) to compare. Figures measured with time-ordered ids say so
    /// in their name.
    #[arg(long, value_enum, default_value_t = workloads::Ids::Random)]
    ids: workloads::Ids,
    /// Concurrent devices of the multi-device push.
    #[arg(long, default_value_t = 8)]
    devices: usize,
    /// One-field patches of the update workload.
    #[arg(long, default_value_t = 20_000)]
    updates: usize,
    /// Entities in the dataset the bootstrap workload streams (the dataset is filled up to it first).
    #[arg(long, default_value_t = 1_000_000)]
    bootstrap_entities: usize,
    /// Trials of the propagation workloads (long poll, live, and live among idle sockets).
    #[arg(long, default_value_t = 500)]
    trials: usize,
    /// Idle live WebSockets the live-idle workload holds open at once.
    #[arg(long, default_value_t = 10_000)]
    live_connections: usize,
    /// Changes in the log (filled up to it first) that the client workload's fresh replica syncs.
    #[arg(long, default_value_t = 100_000)]
    client_changes: usize,
    /// Local writes the client workload then makes (write_batch, 10,000 per transaction) and syncs as one outbox.
    #[arg(long, default_value_t = 100_000)]
    client_outbox: usize,
    /// Updates the compaction workload makes (4 devices, 1,000 entities).
    #[arg(long, default_value_t = 1_000_000)]
    compaction_updates: usize,
    /// How often the compaction workload's server compacts (the `compact_interval` syntax: 30s, 1m, 1h).
    #[arg(long, default_value = "1m")]
    compact_interval: String,
    /// Updates per second the compaction workload's devices make in all (0: as fast as the
    /// server takes them). Pacing them makes the run a steady load that lasts many passes.
    #[arg(long, default_value_t = 0)]
    compaction_rate: u32,
    /// Users of the many-users workload (each with two devices).
    #[arg(long, default_value_t = 1_000)]
    users: usize,
    /// Concurrent connections of the many-users workload, in all.
    #[arg(long, default_value_t = 256)]
    connections: usize,
    /// How long the many-users workload's devices sync.
    #[arg(long, default_value_t = 15.0)]
    many_users_seconds: f64,
    /// Write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// What a figure should reach.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// At least this much.
    AtLeast(f64),
    /// At most this much.
    AtMost(f64),
}

impl Target {
    fn met(self, value: f64) -> bool {
        match self {
            Target::AtLeast(t) => value >= t,
            Target::AtMost(t) => value <= t,
        }
    }

    fn show(self, unit: &str) -> String {
        match self {
            Target::AtLeast(t) => format!("≥ {} {unit}", human(t)),
            Target::AtMost(t) => format!("≤ {} {unit}", human(t)),
        }
    }
}

fn human(v: f64) -> String {
    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
}

/// One measured figure.
#[derive(Debug, Serialize)]
pub struct Figure {
    /// What was measured.
    pub workload: String,
    /// The headline number.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// The project's target for it, if any.
    pub target: Option<Target>,
    /// Whether the target is met.
    pub met: Option<bool>,
    /// Every other number measured with it.
    pub details: Map<String, Value>,
}

impl Figure {
    /// A figure with its target.
    pub fn new(
        workload: impl Into<String>,
        value: f64,
        unit: &'static str,
        target: Option<Target>,
        details: Value,
    ) -> Self {
        let details = match details {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        Figure { workload: workload.into(), value, unit, target, met: target.map(|t| t.met(value)), details }
    }
}

/// Where the child servers keep their data.
enum Store {
    /// A fresh SQLite file in a temporary directory.
    TempSqlite,
    /// A SQLite file named on the command line, which must not exist yet.
    Sqlite(PathBuf),
    /// A PostgreSQL database, in which the run makes a schema of its own.
    Postgres(String),
    /// A running server named by --url: unknown.
    External,
}

impl Store {
    fn parse(args: &BenchArgs) -> anyhow::Result<Store> {
        let store = match args.database.as_deref() {
            _ if args.url.is_some() => Store::External,
            None | Some("sqlite://") => Store::TempSqlite,
            Some(url) if crate::commands::database::is_postgres(url) => Store::Postgres(url.to_owned()),
            Some(url) => match url.strip_prefix("sqlite://") {
                Some(path) => {
                    let path = PathBuf::from(path);
                    if path.exists() {
                        bail!(
                            "--database {url}: the file exists; the bench needs an empty database (name a new file, \
                             or leave --database out for a temporary one)"
                        );
                    }
                    Store::Sqlite(path)
                }
                None => bail!("--database must be postgres://USER@HOST:PORT/DB or sqlite://PATH, got {url:?}"),
            },
        };
        if args.instances > 1 && !matches!(store, Store::Postgres(_)) {
            bail!(
                "--instances {} needs --database postgres://…: several servers can share only a PostgreSQL database",
                args.instances
            );
        }
        Ok(store)
    }

    /// `sqlite`, `postgres`, or `unknown` (a running server).
    fn kind(&self) -> &'static str {
        match self {
            Store::TempSqlite | Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
            Store::External => "unknown",
        }
    }
}

/// Runs the benchmark.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let store = Store::parse(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let schema = match &store {
            Store::Postgres(url) => {
                let schema = BenchSchema::create(url).await?;
                eprintln!("bench schema: {} (dropped at the end)", schema.name);
                Some(schema)
            }
            _ => None,
        };
        // The servers are stopped when `bench` ends or is abandoned on a signal,
        // before the schema is dropped.
        let outcome = tokio::select! {
            r = bench(&args, &store, schema.as_ref()) => r,
            signal = interrupted() => Err(anyhow::anyhow!("interrupted by {signal}")),
        };
        if let Some(schema) = schema {
            let name = schema.name.clone();
            match schema.drop_schema().await {
                Ok(()) => eprintln!("bench schema {name} dropped"),
                Err(e) if outcome.is_ok() => return Err(e),
                Err(e) => eprintln!("bench: {e:#}"),
            }
        }
        outcome
    })
}

/// Starts the servers, runs the workloads, prints and writes the figures.
async fn bench(args: &BenchArgs, store: &Store, schema: Option<&BenchSchema>) -> anyhow::Result<()> {
    let instances = args.instances as usize;
    let servers = match store {
        Store::External => None,
        Store::TempSqlite => {
            let dir = tempfile::tempdir()?;
            let db = format!("sqlite://{}", dir.path().join("bench.db").display());
            Some(Servers::start(&db, 1, Some(dir))?)
        }
        Store::Sqlite(path) => Some(Servers::start(&format!("sqlite://{}", path.display()), 1, None)?),
        Store::Postgres(_) => {
            let url = &schema.context("no schema")?.server_url;
            Some(Servers::start(url, instances, None)?)
        }
    };
    let urls = match (&servers, &args.url) {
        (Some(s), _) => s.urls(),
        (None, Some(url)) => vec![url.trim_end_matches('/').to_owned()],
        (None, None) => bail!("no server to benchmark"),
    };
    let pids = servers.as_ref().map(Servers::pids).unwrap_or_default();
    let mut bench = workloads::Bench::new(urls, pids);
    bench.ids = args.ids;
    let has = |w| args.workloads.contains(&w);
    if has(Workload::Wire) {
        bench.wire().await?;
    }
    if has(Workload::Push) {
        bench.push(args.entities, args.batch, args.devices).await?;
    }
    if has(Workload::Update) {
        bench.update(args.updates, args.batch).await?;
    }
    if has(Workload::Pull) {
        bench.pull().await?;
    }
    if has(Workload::Propagation) {
        bench.propagation(args.trials).await?;
    }
    if has(Workload::Live) {
        bench.live_propagation(args.trials).await?;
    }
    if has(Workload::LiveIdle) {
        bench.live_idle(args.live_connections, args.trials).await?;
    }
    if has(Workload::ManyUsers) {
        let database = match store {
            Store::External => {
                bail!("the many-users workload starts servers of its own (with --auth jwt): run it without --url")
            }
            Store::TempSqlite | Store::Sqlite(_) => String::new(),
            Store::Postgres(_) => schema.context("no schema")?.server_url.clone(),
        };
        let shape = many_users::ManyUsers {
            users: args.users,
            connections: args.connections,
            seconds: args.many_users_seconds,
        };
        bench.figures.extend(many_users::many_users(&database, instances, &shape).await?);
    }
    if has(Workload::SqliteFloor) {
        let dir = tempfile::tempdir()?;
        bench.figures.push(floor::sqlite_floor(dir.path(), args.entities, args.batch, args.ids)?);
    }
    if has(Workload::Compaction) {
        if !matches!(store, Store::TempSqlite) {
            bail!("the compaction workload measures a SQLite file of its own: run it without --url and --database");
        }
        bench.figures.extend(
            compaction::compaction(args.compaction_updates, args.compaction_rate, &args.compact_interval).await?,
        );
    }
    if has(Workload::Client) {
        bench.client(args.client_changes, args.client_outbox, args.batch).await?;
    }
    if has(Workload::Bootstrap) {
        bench.bootstrap(args.bootstrap_entities, args.batch, args.devices).await?;
    }
    bench.memory();
    let instances = servers.as_ref().map_or(1, |s| s.instances.len());
    drop(servers);
    let plural = if instances == 1 { "" } else { "s" };
    let title = match schema {
        Some(s) => format!("store: {}, {instances} instance{plural}, schema {}", store.kind(), s.name),
        None => format!("store: {}, {instances} instance{plural}", store.kind()),
    };
    println!("{title}");
    print_table(&bench.figures);
    if let Some(path) = &args.out {
        let machine = json!({
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
        });
        let report = json!({
            "machine": machine,
            "store": store.kind(),
            "instances": instances,
            "schema": schema.map(|s| s.name.as_str()),
            "figures": bench.figures,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("figures written to {}", path.display());
    }
    Ok(())
}

/// Waits for SIGINT or SIGTERM; returns its name.
async fn interrupted() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

fn print_table(figures: &[Figure]) {
    println!("{:<44} {:>16} {:>18}  met", "workload", "measured", "target");
    for f in figures {
        let measured = format!("{} {}", human(f.value), f.unit);
        let target = f.target.map_or(String::from("-"), |t| t.show(f.unit));
        let met = match f.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!("{:<44} {:>16} {:>18}  {met}", f.workload, measured, target);
    }
}
