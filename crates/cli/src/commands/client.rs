//! `deltasync client`: act as a device, with a local database as its only state.
//!
//! Every command prints JSON on stdout. On failure it exits 1 and prints
//! `{"error", "message"}` as the last line of stderr; local writes are never
//! lost by a failed sync.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use std::sync::Arc;

use deltasync_client::{Client, ClientError, ClientOptions, Progress};
use indicatif::ProgressBar;
use serde_json::{Map, Value, json};

/// Flags of `deltasync client`.
#[derive(Args, Debug)]
#[command(
    after_help = "Local writes (put, patch, delete) work with no server: they wait in the outbox until `sync`.\n\
Reads (get, list) show the confirmed state with every pending change merged on top.\n\
Examples:\n  \
deltasync client --db phone.db --server http://127.0.0.1:8787 put tasks t1 '{\"title\":\"Buy milk\",\"done\":false}'\n  \
deltasync client --db phone.db sync\n  \
deltasync client --db laptop.db --server http://127.0.0.1:8787 sync && deltasync client --db laptop.db get tasks t1"
)]
pub struct ClientArgs {
    /// The device's local database (created on first use; it keeps the device id, server URL and outbox).
    #[arg(long, value_name = "PATH")]
    db: PathBuf,
    /// The server's base URL, e.g. http://127.0.0.1:8787 (kept in the database for later commands).
    #[arg(long, env = "DELTASYNC_SERVER", value_name = "URL")]
    server: Option<String>,
    /// Bearer token for a server running with --auth jwt (see `deltasync token`).
    #[arg(long, env = "DELTASYNC_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Speak HTTP/2 to an http:// server directly (h2c with prior knowledge; smaller requests).
    #[arg(long, env = "DELTASYNC_HTTP2")]
    http2: bool,
    #[command(subcommand)]
    command: ClientCommand,
}

#[derive(Subcommand, Debug)]
enum ClientCommand {
    /// Make JSON the entity's whole data (fields it lacks are set to null). Prints the change id or null.
    Put {
        /// The collection, e.g. tasks.
        collection: String,
        /// The entity's id.
        id: String,
        /// A JSON object.
        json: String,
    },
    /// Write the given fields (creating or reviving the entity). Prints the change id or null.
    Patch {
        /// The collection.
        collection: String,
        /// The entity's id.
        id: String,
        /// A JSON object of the fields to write.
        json: String,
    },
    /// Delete the entity (also one never seen: it becomes a tombstone). Prints the change id.
    Delete {
        /// The collection.
        collection: String,
        /// The entity's id.
        id: String,
    },
    /// Log an opaque JSON value for the entity (a CRDT operation, an event); it is
    /// served to every device but never changes the entity's data. Prints the change id.
    Append {
        /// The collection.
        collection: String,
        /// The entity's id.
        id: String,
        /// Any JSON value.
        json: String,
    },
    /// Print the entity's data as a JSON object; exit 1 if it is absent or deleted.
    Get {
        /// The collection.
        collection: String,
        /// The entity's id.
        id: String,
    },
    /// Print the live entities of a collection as a JSON array of {"id", "data"}, sorted by id.
    List {
        /// The collection.
        collection: String,
    },
    /// Push the outbox, pull every page, verify the state hashes, and print a JSON report.
    Sync,
    /// Print the device id, pending and failed counts, cursor, state hash and digest, last sync time.
    Status,
    /// Print the pending and failed changes as a JSON array.
    ExportPending,
}

fn print(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string(value).expect("output serialises"));
}

fn fail(code: &str, message: &str) -> ExitCode {
    eprintln!("{}", json!({"error": code, "message": message}));
    ExitCode::FAILURE
}

fn object(text: &str) -> Result<Map<String, Value>, ClientError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ClientError::Invalid(format!("expected a JSON object, got {other}"))),
        Err(e) => Err(ClientError::Invalid(format!("not valid JSON: {e}"))),
    }
}

/// Runs one client command and returns the process's exit code.
pub fn run(args: ClientArgs) -> ExitCode {
    match execute(args) {
        Ok(code) => code,
        Err(e) => fail(e.code(), &e.to_string()),
    }
}

fn execute(args: ClientArgs) -> Result<ExitCode, ClientError> {
    // A spinner on stderr for long syncs; indicatif draws nothing when stderr is not a terminal.
    let bar = ProgressBar::new_spinner();
    let shown = bar.clone();
    let progress = move |p: Progress| {
        shown.set_message(match p {
            Progress::Sync { pushed, pulled, cursor } => {
                format!("sync: pushed {pushed}, pulled {pulled}, at seq {cursor}")
            }
            Progress::Bootstrap { entities } => format!("bootstrap: {entities} entities loaded"),
        });
        shown.tick();
    };
    let options = ClientOptions {
        server: args.server,
        token: args.token,
        http2_prior_knowledge: args.http2,
        progress: Some(Arc::new(progress)),
        ..Default::default()
    };
    let client = Client::open(&args.db, options)?;
    match args.command {
        ClientCommand::Put { collection, id, json } => print(&client.put(&collection, &id, object(&json)?)?),
        ClientCommand::Patch { collection, id, json } => print(&client.patch(&collection, &id, object(&json)?)?),
        ClientCommand::Delete { collection, id } => print(&client.delete(&collection, &id)?),
        ClientCommand::Append { collection, id, json } => {
            let value: Value =
                serde_json::from_str(&json).map_err(|e| ClientError::Invalid(format!("not valid JSON: {e}")))?;
            print(&client.append(&collection, &id, value)?)
        }
        ClientCommand::Get { collection, id } => match client.get(&collection, &id)? {
            Some(entity) => print(&entity.data),
            None => return Ok(fail("not_found", &format!("{collection}/{id} is absent or deleted"))),
        },
        ClientCommand::List { collection } => {
            let items: Vec<Value> =
                client.list(&collection)?.into_iter().map(|e| json!({"id": e.id, "data": e.data})).collect();
            print(&items);
        }
        ClientCommand::Sync => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ClientError::Invalid(format!("cannot start the async runtime: {e}")))?;
            let report = runtime.block_on(client.sync());
            bar.finish_and_clear();
            let report = report?;
            if let Some(m) = &report.mismatch {
                eprintln!("warning: local state did not match the server's ({m}); healed by re-bootstrapping");
            }
            print(&report);
        }
        ClientCommand::Status => print(&client.stats()?),
        ClientCommand::ExportPending => print(&client.export_pending()?),
    }
    Ok(ExitCode::SUCCESS)
}
