//! `deltasync`: serve, migrate, compact, import, report (admin), mint dev tokens, act as a client, and benchmark.

mod commands;

use clap::{Parser, Subcommand};

/// deltasync: an offline-first, delta-based data sync engine.
#[derive(Parser)]
#[command(name = "deltasync", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sync server (embedded SQLite by default; no set-up needed).
    Serve(commands::serve::ServeArgs),
    /// Apply missing schema migrations to a database and exit (serve also does it at start).
    Migrate(commands::migrate::MigrateArgs),
    /// Run one compaction pass now: drop the history every active device has, print JSON figures.
    Compact(commands::compact::CompactArgs),
    /// Load a full-state snapshot into a user's dataset: one upsert per entity, a re-run imports nothing.
    Import(commands::import::ImportArgs),
    /// Read-only reports from the database: users, devices, history, conflicts, volume, stats.
    Admin(commands::admin::AdminArgs),
    /// Mint an HS256 token for a server running with `--auth jwt`.
    Token(commands::token::TokenArgs),
    /// Act as a device: local writes and reads, sync, status (JSON on stdout).
    Client(commands::client::ClientArgs),
    /// Measure push and pull throughput against a server it starts (or --url).
    Bench(commands::bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Client(args) => return commands::client::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Migrate(args) => commands::migrate::run(args),
        Command::Compact(args) => commands::compact::run(args),
        Command::Import(args) => commands::import::run(args),
        Command::Admin(args) => commands::admin::run(args),
        Command::Token(args) => commands::token::run(args),
        Command::Bench(args) => commands::bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
