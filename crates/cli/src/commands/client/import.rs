//! `deltasync client import`: many local writes from a file, in few local
//! transactions. The file is either of:
//!
//! - NDJSON writes, one per line, in the shape of the browser client's
//!   `db.write`: `{"op": "put" | "patch" | "delete", "collection", "id",
//!   "data"}`. Lines are written in batches of `--batch`, each batch one
//!   transaction of the local database, kept whole or not at all. A bad line
//!   stops the import before its batch is written; the error says which lines
//!   were imported, so the rest can be imported after fixing it.
//! - A full-state snapshot (a document `{collection: {entity_id: data}}` or
//!   NDJSON `{"collection", "entity_id", "data"}`, see
//!   [`deltasync_protocol::snapshot`]): checked whole first, then put into the
//!   outbox through [`Client::import`], `--batch` entities per transaction. An
//!   entity whose view already holds its fields is skipped, so a second run
//!   writes nothing.
//!
//! The first non-blank line decides, by the rule of [`snapshot::detect`].

use std::io::{BufRead, Read};
use std::path::Path;

use deltasync_client::{Client, ClientError, LocalWrite};
use deltasync_protocol::ChangeLimits;
use deltasync_protocol::snapshot::{self, Format};
use indicatif::ProgressBar;
use serde_json::{Value, json};

/// What an import did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    /// Lines read (blank ones included).
    pub lines: u64,
    /// Writes that made a change.
    pub written: u64,
    /// `put`s and `patch`es that changed nothing.
    pub unchanged: u64,
}

impl Imported {
    /// The JSON the command prints.
    pub fn to_json(&self) -> Value {
        json!({"lines": self.lines, "written": self.written, "unchanged": self.unchanged})
    }
}

/// Imports the writes or the snapshot at `file` (`-`: stdin) into `client`,
/// `batch` writes per transaction; returns the JSON to print.
pub fn import(client: &Client, file: &Path, batch: usize, bar: &ProgressBar) -> Result<Value, ClientError> {
    let cannot_read = |e: std::io::Error| ClientError::Invalid(format!("cannot read {}: {e}", file.display()));
    let mut input: Box<dyn BufRead> = if file == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(file).map_err(cannot_read)?))
    };
    // Blank lines, then the first line that is not: it tells the format.
    let mut head = String::new();
    while head.trim().is_empty() {
        if input.read_line(&mut head).map_err(cannot_read)? == 0 {
            break;
        }
    }
    let first = head.lines().find(|l| !l.trim().is_empty()).unwrap_or_default();
    if first.is_empty() || snapshot::detect(first) == Ok(Format::Writes) {
        // Write lines stream: they are imported batch by batch (an empty file is none).
        let done = import_from(client, std::io::Cursor::new(head).chain(input), batch.max(1), bar)?;
        return Ok(done.to_json());
    }
    let mut text = head;
    input.read_to_string(&mut text).map_err(cannot_read)?;
    import_snapshot(client, &text, batch.max(1), bar)
}

/// Checks the whole snapshot `text`, then imports it `batch` entities per transaction.
fn import_snapshot(client: &Client, text: &str, batch: usize, bar: &ProgressBar) -> Result<Value, ClientError> {
    let limits = ChangeLimits::default();
    let refused = |e: snapshot::SnapshotError| ClientError::Invalid(format!("{e}; nothing was imported"));
    let entities = snapshot::check(text, &limits).map_err(refused)?;
    let (mut written, mut unchanged) = (0, 0);
    let mut entries = snapshot::entries(text, &limits).map_err(refused)?.peekable();
    while entries.peek().is_some() {
        let slice = entries.by_ref().take(batch).collect::<Result<Vec<_>, _>>();
        let slice = slice.map_err(|e| ClientError::Invalid(format!("{e} (the file changed while importing)")))?;
        let done = client.import(slice)?;
        written += done.written;
        unchanged += done.unchanged;
        bar.set_message(format!("import: {} of {entities} entities, {written} written", written + unchanged));
        bar.tick();
    }
    bar.finish_and_clear();
    if written == 0 {
        eprintln!("nothing imported: all {entities} entities are in the local data already");
    }
    Ok(json!({"entities": entities, "written": written, "unchanged": unchanged}))
}

/// Imports from `input`: see [`import`].
fn import_from(client: &Client, input: impl BufRead, batch: usize, bar: &ProgressBar) -> Result<Imported, ClientError> {
    let mut done = Imported::default();
    let mut writes = Vec::with_capacity(batch);
    // The first line of the batch being gathered (1-based).
    let mut batch_from = 1;
    let mut number = 0;
    for line in input.lines() {
        number += 1;
        let stop = |e: String| ClientError::Invalid(format!("{e}; {}", imported_so_far(&done, batch_from)));
        let line = line.map_err(|e| stop(format!("line {number}: cannot be read: {e}")))?;
        if !line.trim().is_empty() {
            let value: Value =
                serde_json::from_str(&line).map_err(|e| stop(format!("line {number}: not valid JSON: {e}")))?;
            let write = LocalWrite::from_json(value, &format!("line {number}")).map_err(|e| match e {
                deltasync_client::engine::Error::Invalid(m) => stop(m),
                other => other.into(),
            })?;
            writes.push(write);
        }
        if writes.len() >= batch {
            write(client, &mut writes, &mut done).map_err(|e| stop_at(e, &done, batch_from, number))?;
            batch_from = number + 1;
            bar.set_message(format!("import: {} lines, {} written", number, done.written));
            bar.tick();
        }
    }
    write(client, &mut writes, &mut done).map_err(|e| stop_at(e, &done, batch_from, number))?;
    done.lines = number;
    bar.finish_and_clear();
    Ok(done)
}

/// Writes `writes` in one transaction and counts them into `done`.
fn write(client: &Client, writes: &mut Vec<LocalWrite>, done: &mut Imported) -> Result<(), ClientError> {
    if writes.is_empty() {
        return Ok(());
    }
    let ids = client.write_batch(std::mem::take(writes))?;
    let written = ids.iter().filter(|id| id.is_some()).count() as u64;
    done.written += written;
    done.unchanged += ids.len() as u64 - written;
    Ok(())
}

/// `e`, the error of the batch of lines `from` to `to`, with what was imported before it.
fn stop_at(e: ClientError, done: &Imported, from: u64, to: u64) -> ClientError {
    match e {
        ClientError::Invalid(m) => {
            ClientError::Invalid(format!("{m} (in the batch of lines {from} to {to}); {}", imported_so_far(done, from)))
        }
        other => other,
    }
}

/// What an import stopped in the batch from line `from` kept.
fn imported_so_far(done: &Imported, from: u64) -> String {
    match from {
        1 => "nothing was imported".to_owned(),
        _ => format!(
            "lines 1 to {} were imported ({} written, {} unchanged) and nothing after: import again from line {from} \
             (tail -n +{from} FILE)",
            from - 1,
            done.written,
            done.unchanged
        ),
    }
}
