//! `deltasync client`: act as a device, with a local database as its only state.
//!
//! Every command prints JSON on stdout. On failure it exits 1 and prints
//! `{"error", "message"}` as the last line of stderr; local writes are never
//! lost by a failed sync. A reader that closes stdout early (`| head`) ends
//! the command quietly.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use deltasync_client::{Client, ClientError, ClientOptions, Progress, TimeoutKind};
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
    /// Give up a network command (sync) after this many seconds, exiting 1 with
    /// error "timeout"; nothing local is lost. 0: no limit.
    #[arg(long, env = "DELTASYNC_TIMEOUT", value_name = "SECS", default_value_t = DEFAULT_TIMEOUT_SECS)]
    timeout: u64,
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

/// The default of `--timeout`: long enough for a large first sync on a slow
/// link, short enough that a stuck server or proxy does not hold a script.
const DEFAULT_TIMEOUT_SECS: u64 = 120;

/// What a command has to say: one line of JSON for stdout, or a failure.
enum Output {
    /// Printed on stdout; the command succeeded.
    Json(String),
    /// `{"error": code, "message"}` on stderr; the command failed.
    Fail(&'static str, String),
}

fn json_line(value: &impl serde::Serialize) -> Output {
    Output::Json(serde_json::to_string(value).expect("output serialises"))
}

/// Prints the command's line on stdout. A closed stdout (the reader went away,
/// as `head` does) ends the command quietly and successfully: what it did is
/// done, and nobody is left to read about it.
fn print(line: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail("output", &format!("cannot write the result on stdout: {e}")),
    }
}

/// Reports a failure as the last line of stderr (if stderr is still open) and exits 1.
fn fail(code: &str, message: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "{}", json!({"error": code, "message": message}));
    ExitCode::FAILURE
}

/// The message for an error; the whole-command deadline is named by its flag.
fn message(e: &ClientError) -> String {
    match e {
        ClientError::Timeout { kind: TimeoutKind::Sync, operation, after } => format!(
            "{operation} did not finish within {} s (the limit set by --timeout SECS or DELTASYNC_TIMEOUT; 0 for \
             none); nothing local was lost: run it again, or allow it longer",
            after.as_secs()
        ),
        e => e.to_string(),
    }
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
        Ok(Output::Json(line)) => print(&line),
        Ok(Output::Fail(code, message)) => fail(code, &message),
        Err(e) => fail(e.code(), &message(&e)),
    }
}

fn execute(args: ClientArgs) -> Result<Output, ClientError> {
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
        sync_timeout: (args.timeout > 0).then(|| Duration::from_secs(args.timeout)),
        progress: Some(Arc::new(progress)),
        ..Default::default()
    };
    let client = Client::open(&args.db, options)?;
    Ok(match args.command {
        ClientCommand::Put { collection, id, json } => json_line(&client.put(&collection, &id, object(&json)?)?),
        ClientCommand::Patch { collection, id, json } => json_line(&client.patch(&collection, &id, object(&json)?)?),
        ClientCommand::Delete { collection, id } => json_line(&client.delete(&collection, &id)?),
        ClientCommand::Append { collection, id, json } => {
            let value: Value =
                serde_json::from_str(&json).map_err(|e| ClientError::Invalid(format!("not valid JSON: {e}")))?;
            json_line(&client.append(&collection, &id, value)?)
        }
        ClientCommand::Get { collection, id } => match client.get(&collection, &id)? {
            Some(entity) => json_line(&entity.data),
            None => Output::Fail("not_found", format!("{collection}/{id} is absent or deleted")),
        },
        ClientCommand::List { collection } => {
            let items: Vec<Value> =
                client.list(&collection)?.into_iter().map(|e| json!({"id": e.id, "data": e.data})).collect();
            json_line(&items)
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
                let _ = writeln!(
                    std::io::stderr(),
                    "warning: local state did not match the server's ({m}); healed by re-bootstrapping"
                );
            }
            if report.restored > 0 {
                let _ = writeln!(
                    std::io::stderr(),
                    "warning: the server had lost {} change(s) of this device that it once acknowledged (restored \
                     from a backup?); they were sent again",
                    report.restored
                );
            }
            json_line(&report)
        }
        ClientCommand::Status => json_line(&client.stats()?),
        ClientCommand::ExportPending => json_line(&client.export_pending()?),
    })
}
