//! `deltasync client`: act as a device, with a local database as its only state.
//!
//! Every command prints JSON on stdout: one line, or for `watch` one line per
//! sync. On failure it exits 1 and prints `{"error", "message"}` as the last
//! line of stderr; local writes are never lost by a failed sync. A reader that
//! closes stdout early (`| head`) ends the command quietly.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod import;

use clap::{Args, Subcommand};
use deltasync_client::engine::transport::CONFLICTS;
use deltasync_client::{
    Client, ClientError, ClientOptions, Progress, RunnerOptions, SyncReport, SyncRunner, TimeoutKind,
};
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
deltasync client --db laptop.db --server http://127.0.0.1:8787 sync && deltasync client --db laptop.db get tasks t1\n  \
deltasync client --db phone.db watch --live\n  \
deltasync client --db tablet.db --store file:///mnt/nas/tasks sync   (no server: a folder, webdav:// or s3://)\n  \
deltasync client --db phone.db conflicts --limit 50\n  \
deltasync client --db phone.db export-pending > failed.json && deltasync client --db phone.db discard-failed"
)]
pub struct ClientArgs {
    /// The device's local database (created on first use; it keeps the device id, server URL and outbox).
    #[arg(long, value_name = "PATH")]
    db: PathBuf,
    /// The server's base URL, e.g. http://127.0.0.1:8787 (kept in the database for later commands).
    #[arg(long, env = "DELTASYNC_SERVER", value_name = "URL", conflicts_with = "store")]
    server: Option<String>,
    /// Sync through a file store instead of a server (kept in the database like --server):
    /// file:///dir, webdav://host/path or webdavs://host/path (user and password from
    /// DELTASYNC_STORE_USER / DELTASYNC_STORE_PASSWORD), or s3://bucket/prefix (endpoint and
    /// keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).
    /// No server runs: devices write numbered log segments with create-only writes; see
    /// docs/file-store.md.
    #[arg(long, env = "DELTASYNC_STORE", value_name = "URL")]
    store: Option<String>,
    /// Bearer token for a server running with --auth jwt (see `deltasync token`).
    #[arg(long, env = "DELTASYNC_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A shell command that prints a fresh bearer token on stdout (e.g. `gcloud auth
    /// print-identity-token`), run whenever the server refuses the token (401): the request
    /// is then sent once more with the new one. Without --token, the first request asks it.
    #[arg(long, env = "DELTASYNC_TOKEN_COMMAND", value_name = "CMD")]
    token_command: Option<String>,
    /// Speak HTTP/2 to an http:// server directly (h2c with prior knowledge; smaller requests).
    #[arg(long, env = "DELTASYNC_HTTP2")]
    http2: bool,
    /// Give up a network command (sync, conflicts) after this many seconds,
    /// exiting 1 with error "timeout"; nothing local is lost. With watch, each
    /// sync gets this long. 0: no limit.
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
    /// Make many writes from NDJSON, one per line, in few local transactions, or
    /// put a full-state snapshot into the outbox once. Prints {"lines", "written",
    /// "unchanged"} for writes, {"entities", "written", "unchanged"} for a snapshot.
    ///
    /// Each line is {"op": "put" | "patch" | "delete", "collection", "id", "data"}
    /// (`data`, an object, for put and patch), the shape of the browser client's
    /// db.write. Every --batch lines are one transaction, kept whole or not at
    /// all: a bad line stops the import before its batch is written, and the
    /// error says which lines were imported, so the rest can follow once it is
    /// fixed. The writes wait in the outbox for `sync`, as any local write.
    ///
    /// A snapshot is one JSON object {collection: {entity_id: data}}, or NDJSON
    /// lines {"collection", "entity_id", "data"}. It is checked whole first (a
    /// bad line is reported with its number and nothing is written); then each
    /// entity becomes one upsert of its fields, --batch entities per
    /// transaction. Entities whose local data already holds those fields are
    /// skipped, so importing the same snapshot again writes nothing.
    ///
    /// The first non-blank line tells the format: an object with a string
    /// `op` starts write lines, one with a string `entity_id` snapshot lines;
    /// any other file starting with `{` must be one snapshot document.
    Import {
        /// The NDJSON or JSON file; `-` reads stdin.
        #[arg(default_value = "-")]
        file: PathBuf,
        /// Lines (or snapshot entities) per local transaction.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        batch: u32,
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
    ///
    /// A sync you run gives changes the server refused a fresh start: their
    /// retry counts go back to 0. With --scheduled (for cron jobs and
    /// scripts), they keep their backoff and counts, as the background runner
    /// does, so a change refused 5 times is set aside as failed.
    Sync {
        /// Sync as a scheduled job: honour the backoff of refused changes and keep counting their refusals.
        #[arg(long)]
        scheduled: bool,
    },
    /// Delete the replica (confirmed state, outbox, journal, sync state and the
    /// user it belongs to) to start over, for example with another user's
    /// token. Prints {"reset": true}.
    ///
    /// The device keeps its id and the server URL. Refused (error
    /// pending_changes) while changes are not synced or were refused: save
    /// them with `export-pending > pending.json` first, then pass --force.
    Reset {
        /// Reset even though changes are pending or failed: they are lost.
        #[arg(long)]
        force: bool,
    },
    /// Print the device id, pending and failed counts, cursor, state hash and digest, last sync time.
    Status,
    /// Print the pending and failed changes as a JSON array.
    ExportPending,
    /// Print one page of the server's conflict records (changes that lost, from
    /// every device) as {"conflicts":[...],"cursor":N,"has_more":bool}.
    ///
    /// Records come oldest first. While has_more is true, pass --since <cursor>
    /// (the cursor just printed) to read the next page.
    Conflicts {
        /// Print the records after this record id: the cursor of the previous page (0: from the first).
        #[arg(long, value_name = "CURSOR", default_value_t = 0)]
        since: u64,
        /// At most this many records (the server's default is 100, its maximum 1000).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// Send every failed change back to the outbox, to go with the next sync;
    /// prints {"requeued": n}.
    ///
    /// For changes set aside after repeated refusals once the cause is fixed (a
    /// server limit raised). A change refused with version_mismatch keeps the
    /// version it was based on, so the server refuses it again: make the edit
    /// anew instead.
    RetryFailed,
    /// Forget every failed change for good; prints {"discarded": n}.
    ///
    /// Run export-pending first to keep a copy of them.
    DiscardFailed,
    /// Keep syncing (at start and every --interval) and print one JSON line per
    /// finished sync: its report, or {"error", "message"} when it failed.
    ///
    /// A failed sync is retried with backoff (from 1 s up to --interval) and
    /// watching goes on. With --live, other devices' changes are also pulled
    /// as soon as they reach the server, between syncs (they print no line). Stops with exit 0 on SIGINT or SIGTERM, after --count
    /// syncs, or when stdout is closed. --timeout bounds each sync.
    Watch {
        /// Sync at least this often, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        interval: u64,
        /// Hold a long poll open between syncs, so other devices' changes arrive at once (no line is printed for them).
        #[arg(long)]
        live: bool,
        /// Stop after this many syncs (failed ones included).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },
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
    /// The command printed what it had to say itself, and succeeded.
    Printed,
}

fn json_line(value: &impl serde::Serialize) -> Output {
    Output::Json(serde_json::to_string(value).expect("output serialises"))
}

/// Writes one line on stdout and flushes it. `Ok(false)` when stdout is
/// closed (the reader went away, as `head` does).
fn write_line(line: &str) -> std::io::Result<bool> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}

/// Prints the command's line on stdout. A closed stdout ends the command
/// quietly and successfully: what it did is done, and nobody is left to read
/// about it.
fn print(line: &str) -> ExitCode {
    match write_line(line) {
        Ok(_) => ExitCode::SUCCESS,
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
    // Warnings (a damaged snapshot skipped, …) go to stderr; RUST_LOG shows more.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).without_time().try_init();
    match execute(args) {
        Ok(Output::Json(line)) => print(&line),
        Ok(Output::Fail(code, message)) => fail(code, &message),
        Ok(Output::Printed) => ExitCode::SUCCESS,
        Err(e) => fail(e.code(), &message(&e)),
    }
}

fn execute(args: ClientArgs) -> Result<Output, ClientError> {
    // A spinner on stderr for long syncs; indicatif draws nothing when stderr is not a terminal.
    let bar = ProgressBar::new_spinner();
    let progress = matches!(args.command, ClientCommand::Sync { .. }).then(|| spinner(&bar));
    if matches!(args.command, ClientCommand::Import { .. }) {
        bar.set_message("import: reading");
    }
    let deadline = (args.timeout > 0).then(|| Duration::from_secs(args.timeout));
    let options = ClientOptions {
        server: args.server,
        store: args.store,
        token: args.token,
        token_provider: args.token_command.map(token_command),
        http2_prior_knowledge: args.http2,
        sync_timeout: deadline,
        progress,
        ..Default::default()
    };
    let client = Client::open(&args.db, options)?;
    dispatch(&client, args.command, &bar, deadline)
}

/// A token provider that runs `command` with `sh -c` and takes what it prints.
fn token_command(command: String) -> deltasync_client::TokenProvider {
    Arc::new(move || {
        let command = command.clone();
        Box::pin(async move {
            let run = command.clone();
            let out = tokio::task::spawn_blocking(move || std::process::Command::new("sh").arg("-c").arg(run).output())
                .await
                .map_err(|e| format!("--token-command {command:?} did not finish: {e}"))?
                .map_err(|e| format!("cannot run --token-command {command:?}: {e}"))?;
            if !out.status.success() {
                let said = String::from_utf8_lossy(&out.stderr);
                return Err(format!("--token-command {command:?} failed ({}): {}", out.status, said.trim()));
            }
            let token = String::from_utf8(out.stdout)
                .map_err(|_| format!("--token-command {command:?} printed something that is not text"))?;
            match token.trim() {
                "" => Err(format!("--token-command {command:?} printed no token")),
                token => Ok(token.to_owned()),
            }
        })
    })
}

/// Shows each step of a sync on `bar`.
fn spinner(bar: &ProgressBar) -> Arc<dyn Fn(Progress) + Send + Sync> {
    let shown = bar.clone();
    Arc::new(move |p: Progress| {
        shown.set_message(match p {
            Progress::Sync { pushed, pulled, cursor } => {
                format!("sync: pushed {pushed}, pulled {pulled}, at seq {cursor}")
            }
            Progress::Bootstrap { entities } => format!("bootstrap: {entities} entities loaded"),
        });
        shown.tick();
    })
}

/// Runs `command` on `client`; `deadline` bounds a network command.
fn dispatch(
    client: &Client,
    command: ClientCommand,
    bar: &ProgressBar,
    deadline: Option<Duration>,
) -> Result<Output, ClientError> {
    Ok(match command {
        ClientCommand::Put { collection, id, json } => json_line(&client.put(&collection, &id, object(&json)?)?),
        ClientCommand::Patch { collection, id, json } => json_line(&client.patch(&collection, &id, object(&json)?)?),
        ClientCommand::Delete { collection, id } => json_line(&client.delete(&collection, &id)?),
        ClientCommand::Append { collection, id, json } => {
            let value: Value =
                serde_json::from_str(&json).map_err(|e| ClientError::Invalid(format!("not valid JSON: {e}")))?;
            json_line(&client.append(&collection, &id, value)?)
        }
        ClientCommand::Import { file, batch } => json_line(&import::import(client, &file, batch as usize, bar)?),
        ClientCommand::Get { collection, id } => match client.get(&collection, &id)? {
            Some(entity) => json_line(&entity.data),
            None => Output::Fail("not_found", format!("{collection}/{id} is absent or deleted")),
        },
        ClientCommand::List { collection } => {
            let items: Vec<Value> =
                client.list(&collection)?.into_iter().map(|e| json!({"id": e.id, "data": e.data})).collect();
            json_line(&items)
        }
        ClientCommand::Sync { scheduled } => sync(client, bar, scheduled)?,
        ClientCommand::Reset { force } => {
            runtime()?.block_on(client.reset(force))?;
            json_line(&json!({"reset": true}))
        }
        ClientCommand::Status => json_line(&client.stats()?),
        ClientCommand::ExportPending => json_line(&client.export_pending()?),
        ClientCommand::Conflicts { since, limit } => {
            json_line(&runtime()?.block_on(within(deadline, CONFLICTS, client.conflicts(since, limit)))?)
        }
        ClientCommand::RetryFailed => json_line(&json!({"requeued": client.retry_failed()?})),
        ClientCommand::DiscardFailed => json_line(&json!({"discarded": client.discard_failed()?})),
        ClientCommand::Watch { interval, live, count } => {
            // Every sync would fail the same way: say so once, not once per sync.
            if client.stats()?.server.is_none() {
                return Err(ClientError::NoServer);
            }
            let options = RunnerOptions { interval: Duration::from_secs(interval), live, ..Default::default() };
            runtime()?.block_on(watch(client.clone(), options, count))?
        }
    })
}

/// A runtime for one network command, on this thread.
fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Invalid(format!("cannot start the async runtime: {e}")))
}

/// Runs `work` (named `operation` in the error), failing with a `timeout` past `deadline`.
async fn within<T>(
    deadline: Option<Duration>,
    operation: &str,
    work: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    let Some(after) = deadline else { return work.await };
    tokio::time::timeout(after, work).await.unwrap_or_else(|_| {
        Err(ClientError::Timeout { kind: TimeoutKind::Sync, operation: operation.to_owned(), after })
    })
}

/// `sync`: one sync, its report on stdout and its warnings on stderr.
fn sync(client: &Client, bar: &ProgressBar, scheduled: bool) -> Result<Output, ClientError> {
    let report =
        runtime()?.block_on(async { if scheduled { client.sync_scheduled().await } else { client.sync().await } });
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
            "warning: the server had lost {} change(s) of this device that it once acknowledged (restored from a \
             backup?); they were sent again",
            report.restored
        );
    }
    Ok(json_line(&report))
}

/// `watch`: a [`SyncRunner`] whose every finished sync is one line on stdout,
/// until SIGINT or SIGTERM, `count` syncs, or a closed stdout.
async fn watch(client: Client, options: RunnerOptions, count: Option<u64>) -> Result<Output, ClientError> {
    // The handlers go in before the first sync, so a signal never kills the process midway.
    let stop = stop_signal().map_err(|e| ClientError::Invalid(format!("cannot install the signal handlers: {e}")))?;
    let mut stop = std::pin::pin!(stop);
    let runner = SyncRunner::start(client, options);
    let mut outcomes = runner.outcomes();
    let mut printed = 0;
    let output = loop {
        tokio::select! {
            () = &mut stop => break Output::Printed,
            changed = outcomes.changed() => {
                if changed.is_err() {
                    break Output::Printed; // the runner ended: nothing more will come
                }
                let line = outcome_line(outcomes.borrow_and_update().as_deref());
                let Some(line) = line else { continue };
                match write_line(&line) {
                    Ok(true) => {}
                    Ok(false) => break Output::Printed,
                    Err(e) => break Output::Fail("output", format!("cannot write a sync's outcome on stdout: {e}")),
                }
                printed += 1;
                if count == Some(printed) {
                    break Output::Printed;
                }
            }
        }
    };
    runner.stop().await;
    Ok(output)
}

/// A sync's outcome as `watch` prints it: the report, or `{"error", "message"}`.
fn outcome_line(outcome: Option<&Result<SyncReport, ClientError>>) -> Option<String> {
    Some(match outcome? {
        Ok(report) => serde_json::to_string(report).expect("a report serialises"),
        Err(e) => json!({"error": e.code(), "message": message(e)}).to_string(),
    })
}

/// Resolves on SIGINT or SIGTERM (on other systems, Ctrl-C). The handlers are
/// installed when this is called, not when it is first polled.
fn stop_signal() -> std::io::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
