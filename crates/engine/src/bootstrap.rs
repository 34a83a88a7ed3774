//! Bootstrap: replace the confirmed state by the server's streamed snapshot,
//! verified against the snapshot's digest, keeping every pending and failed
//! change. The snapshot is staged as it arrives and adopted in one
//! transaction once it is whole and verified.

use deltasync_protocol::wire::{BootstrapEnd, BootstrapHeader};
use deltasync_protocol::{EntityState, Meta, StateDigest, StoredChange};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::clock::Clock;
use crate::engine::{Engine, Origin, Progress};
use crate::error::{Error, Result};
use crate::replica::{self, keys};
use crate::store::{Access, LocalStore, StoreTx};
use crate::transport::{self, ByteStream, Transport};

/// Progress is reported every this many entities.
const PROGRESS_EVERY: u64 = 10_000;

/// The snapshot is staged once this many bytes of it have arrived (or at its
/// end), in one transaction: few enough commits that their cost (the B-tree's
/// edge pages written again, a sync) stays small beside the rows', and no
/// more held in memory than this and one chunk.
const STAGE_BYTES: usize = 1 << 20;

/// The longest snapshot line read (one entity's state). A server that sends
/// a longer one is refused rather than held in memory: a change's data is at
/// most a few megabytes (the server's `max_body_bytes`), and a state merges
/// few of them.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// An unreadable bootstrap answer.
fn bootstrap_error(message: String) -> Error {
    Error::Protocol { request: transport::BOOTSTRAP, message }
}

/// The snapshot as read so far.
#[derive(Default)]
struct Snapshot {
    header: Option<BootstrapHeader>,
    end: Option<BootstrapEnd>,
    /// Entity and change lines read.
    lines: u64,
    entities: u64,
    digest: StateDigest,
}

/// What one line of the snapshot is.
enum Line<'a> {
    Blank,
    Header(BootstrapHeader),
    /// An entity, with its JSON text as it came (stores may keep it as is).
    Entity(EntityState, &'a str),
    Change(StoredChange),
    End(BootstrapEnd),
}

/// A body line as read first: [`deltasync_protocol::wire::BootstrapLine`]'s shape, the entity left as
/// its text.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawBody<'a> {
    Entity(#[serde(borrow)] &'a RawValue),
    Change(StoredChange),
}

impl Snapshot {
    /// Reads one NDJSON line in its place: the header first, the end line last.
    fn read<'a>(&mut self, line: &'a [u8]) -> Result<Line<'a>> {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(Line::Blank);
        }
        if self.end.is_some() {
            return Err(bootstrap_error("lines after the end line".into()));
        }
        let line_no = self.lines + 2;
        let bad = |e: serde_json::Error| bootstrap_error(format!("cannot read line {line_no}: {e}"));
        if self.header.is_none() {
            return Ok(Line::Header(serde_json::from_slice(line).map_err(bad)?));
        }
        if line.starts_with(br#"{"end""#) {
            return Ok(Line::End(serde_json::from_slice(line).map_err(bad)?));
        }
        self.lines += 1;
        // The server writes `{"entity":STATE}`: read STATE alone, and fall
        // back to reading the whole line when that is not what came.
        if let Some(text) = line.strip_prefix(br#"{"entity":"#).and_then(|l| l.strip_suffix(b"}"))
            && let Ok(text) = std::str::from_utf8(text)
            && let Ok(state) = serde_json::from_str(text)
        {
            return Ok(Line::Entity(state, text));
        }
        match serde_json::from_slice(line).map_err(bad)? {
            RawBody::Change(change) => Ok(Line::Change(change)),
            RawBody::Entity(text) => {
                let text = text.get();
                Ok(Line::Entity(serde_json::from_str(text).map_err(bad)?, text))
            }
        }
    }

    /// The header and the checks of a whole snapshot: an end line counting
    /// every line, and the digest the header promised.
    fn finish(self, url: &str) -> Result<(BootstrapHeader, StateDigest, u64)> {
        let header = self.header.ok_or_else(|| bootstrap_error("the answer was empty".into()))?;
        let end = self.end.ok_or_else(|| Error::Unreachable {
            url: url.to_owned(),
            message: "the bootstrap stream ended before its last line".into(),
        })?;
        if end.count != self.lines {
            let lines = self.lines;
            return Err(bootstrap_error(format!("the end line counts {} lines, {lines} were sent", end.count)));
        }
        if self.digest != header.state_digest {
            return Err(Error::Integrity(format!(
                "the server's snapshot at seq {} has digest {}, but the server says {}",
                header.cursor, self.digest, header.state_digest
            )));
        }
        Ok((header, self.digest, self.entities))
    }
}

/// The newest stamp an entity's state carries.
fn newest_stamp(state: &EntityState) -> Option<&deltasync_protocol::Hlc> {
    match &state.meta {
        Meta::Fields { t, u, .. } => t.as_ref().max(u.as_ref()),
        Meta::Last { hlc } => Some(hlc),
    }
}

impl<S: LocalStore, T: Transport, C: Clock> Engine<S, T, C> {
    /// Replaces the confirmed state by the server's streamed snapshot (staged,
    /// then adopted in one transaction), keeping every pending and failed
    /// change. Returns the number of entities loaded.
    pub(crate) async fn bootstrap(&self, transport: &T) -> Result<u64> {
        let mut stream = transport.bootstrap(self.device.as_str()).await?;
        let mut tx = self.store.begin(Access::Write).await?;
        tx.clear_staged().await?;
        tx.commit().await?;
        let mut snapshot = Snapshot::default();
        let mut buf: Vec<u8> = Vec::with_capacity(2 * STAGE_BYTES);
        // Whole lines are staged a megabyte at a time, each batch in a
        // transaction of its own: none stays open while the network is awaited.
        // `scanned` bytes of `buf` are known to hold no newline.
        let mut scanned = 0;
        while let Some(chunk) = stream.next_chunk().await {
            buf.extend_from_slice(&chunk?);
            if buf.len() < STAGE_BYTES {
                continue;
            }
            let Some(last) = buf[scanned..].iter().rposition(|b| *b == b'\n') else {
                scanned = buf.len();
                if scanned > MAX_LINE_BYTES {
                    let (line, mib) = (snapshot.lines + 2, MAX_LINE_BYTES >> 20);
                    return Err(bootstrap_error(format!("line {line} is longer than {mib} MiB")));
                }
                continue;
            };
            // Staged rows are the server's snapshot, fetched again if lost.
            let mut tx = self.store.begin(Access::Refetchable).await?;
            let start = self.load_lines(&mut tx, &mut snapshot, &buf[..=scanned + last]).await?;
            tx.commit().await?;
            buf.drain(..start);
            scanned = buf.len();
        }
        // The rest, and a last line without its newline, with the adoption.
        let mut tx = self.store.begin(Access::Write).await?;
        let start = self.load_lines(&mut tx, &mut snapshot, &buf).await?;
        self.load_line(&mut tx, &mut snapshot, &buf[start..]).await?;
        let (header, digest, entities) = snapshot.finish(transport.base())?;
        tx.adopt_staged().await?;
        replica::set_position(&mut tx, header.cursor, &header.state_hash, &digest).await?;
        let clock = self.device_clock().observe_stamps(None);
        tx.set_meta(keys::CLOCK, clock.as_str()).await?;
        replica::set_policies(&mut tx, &header.policies).await?;
        tx.confirm_up_to(header.cursor).await?;
        // Acknowledged at seqs the server no longer has: it was restored.
        tx.unsend_above(header.cursor).await?;
        tx.set_meta(keys::JOURNAL_UNCHECKED, "1").await?;
        tx.commit().await?;
        self.emit(Origin::Reset, Vec::new());
        Ok(entities)
    }

    /// Reads and writes every whole line of `buf`; returns the length read.
    async fn load_lines(&self, tx: &mut S::Tx<'_>, snapshot: &mut Snapshot, buf: &[u8]) -> Result<usize> {
        let mut start = 0;
        while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
            self.load_line(tx, snapshot, &buf[start..start + nl]).await?;
            start += nl + 1;
        }
        Ok(start)
    }

    /// Reads one line of the snapshot and writes what it holds.
    async fn load_line(&self, tx: &mut S::Tx<'_>, snapshot: &mut Snapshot, line: &[u8]) -> Result<()> {
        match snapshot.read(line)? {
            Line::Blank => {}
            Line::Header(h) => snapshot.header = Some(h),
            Line::End(e) => snapshot.end = Some(e),
            Line::Change(c) => tx.stage_append(c.seq, &c.to_wire_json()).await?,
            Line::Entity(state, text) => {
                self.device_clock().observe_stamps(newest_stamp(&state));
                let h = state.entity_hash();
                if let Some(h) = &h {
                    snapshot.digest.add(h);
                }
                tx.stage_entity(&state, text, h.as_ref()).await?;
                snapshot.entities += 1;
                if snapshot.entities.is_multiple_of(PROGRESS_EVERY) {
                    self.progress(Progress::Bootstrap { entities: snapshot.entities });
                }
            }
        }
        Ok(())
    }
}
