//! `deltasync bench`: a load generator that measures the server end to end.
//!
//! It starts `deltasync serve` itself (a child process on a fresh SQLite file
//! in a temporary directory, so its memory can be read from /proc) unless
//! `--url` names a running server, runs each workload with a progress bar,
//! then prints a table against the project's targets; `--out FILE` also
//! writes the figures as JSON.

mod server;
mod wire;
mod workloads;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::Serialize;
use serde_json::{Map, Value, json};

use server::ChildServer;

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
    /// A fresh device streams a snapshot of --bootstrap-entities entities.
    Bootstrap,
}

/// Flags of `deltasync bench`.
#[derive(Args, Debug)]
#[command(after_help = "Every push is acknowledged only after it is durable (the server's group commit with \
synchronous=FULL).\nThe bench client runs on the same machine as the server and shares its cores.\n\
Example: deltasync bench --out bench.json    (all workloads, about two minutes in a release build)")]
pub struct BenchArgs {
    /// Benchmark a running server instead of starting one (its memory is then not measured).
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Which workloads to run (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Workload::Wire, Workload::Push, Workload::Update, Workload::Pull, Workload::Propagation, Workload::Bootstrap])]
    workloads: Vec<Workload>,
    /// How many entities each push workload creates.
    #[arg(long, default_value_t = 100_000)]
    entities: usize,
    /// Changes per push request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Concurrent devices of the multi-device push.
    #[arg(long, default_value_t = 8)]
    devices: usize,
    /// One-field patches of the update workload.
    #[arg(long, default_value_t = 20_000)]
    updates: usize,
    /// Entities in the dataset the bootstrap workload streams (the dataset is filled up to it first).
    #[arg(long, default_value_t = 1_000_000)]
    bootstrap_entities: usize,
    /// Trials of the propagation workload.
    #[arg(long, default_value_t = 500)]
    trials: usize,
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

/// Runs the benchmark.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let server = if args.url.is_none() { Some(ChildServer::start()?) } else { None };
        let url = args.url.clone().or_else(|| server.as_ref().map(|s| s.url.clone())).expect("a url");
        let mut bench = workloads::Bench::new(url.trim_end_matches('/'), server.as_ref().map(ChildServer::pid));
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
        if has(Workload::Bootstrap) {
            bench.bootstrap(args.bootstrap_entities, args.batch, args.devices).await?;
        }
        bench.memory();
        print_table(&bench.figures);
        if let Some(path) = &args.out {
            let machine = json!({
                "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
                "os": std::env::consts::OS,
                "arch": std::env::consts::ARCH,
            });
            let report = json!({"machine": machine, "figures": bench.figures});
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("figures written to {}", path.display());
        }
        drop(server);
        Ok(())
    })
}

fn print_table(figures: &[Figure]) {
    println!("{:<34} {:>16} {:>18}  met", "workload", "measured", "target");
    for f in figures {
        let measured = format!("{} {}", human(f.value), f.unit);
        let target = f.target.map_or(String::from("-"), |t| t.show(f.unit));
        let met = match f.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!("{:<34} {:>16} {:>18}  {met}", f.workload, measured, target);
    }
}
