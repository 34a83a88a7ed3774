//! The engine's [`Transport`] over a file store: every request a server
//! would answer is answered from the store's objects, with the ledger of
//! `deltasync_engine::file_store` doing what the server's tables and
//! planner do. See `docs/file-store.md` for the layout and why it is safe.
//!
//! - A sync with nothing to push and a cursor this device was given before
//!   costs one small read: the segment after the cursor, absent.
//! - Anything else reads the ledger in (the newest fitting snapshot and the
//!   segments after it, each verified) once per process, then only the
//!   segments that appear after it.
//! - A push plans on the ledger, writes its segment create-only at its first
//!   seq, and, when another device took that seq first, reads the winner's
//!   segment and plans again on top of it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltasync_engine::file_store::{Descriptor, FORMAT, HeadHint, Ledger, Segment, layout, snapshot};
use deltasync_engine::transport::{ByteStream, SyncBody, Transport};
use deltasync_engine::{Error, Result};
use deltasync_protocol::wire::{ConflictsResponse, Policies, PullResponse, StatusResponse, SyncResponse};
use deltasync_protocol::{DeviceId, StateDigest, StateHash};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::metered::{Metered, Traffic};
use super::objects::{Created, ObjectError, ObjectStore, Replaced};

/// How far ahead of the device's clock a change's HLC may be (the server's default).
const MAX_CLOCK_DRIFT_MS: u64 = 300_000;
/// How many times a push re-plans after losing its seqs to another device
/// before it gives up for this sync (the changes stay in the outbox).
const MAX_RACES: u32 = 64;
/// A long poll looks for the next segment this often.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// The page size when the request names none (the server's).
const DEFAULT_LIMIT: u64 = 1000;
/// Staged leftovers older than this are deleted when a snapshot is written
/// (a live writer links its staged file within a request's time).
const ORPHAN_AGE: Duration = Duration::from_secs(3600);
/// How many snapshots are kept; older ones are deleted.
const SNAPSHOTS_KEPT: usize = 2;

/// The chain head and digest this device was last given at a seq: enough to
/// answer a sync with nothing new without reading the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct KnownHead {
    store: String,
    seq: u64,
    state_hash: StateHash,
    state_digest: StateDigest,
}

#[derive(Default)]
struct State {
    descriptor: Option<Descriptor>,
    ledger: Option<Ledger>,
    /// The seq of the newest snapshot seen, once snapshots were listed.
    newest_snapshot: Option<u64>,
    probed: bool,
    known_head: Option<KnownHead>,
}

/// A file store, seen as a deltasync server.
pub struct FileStoreApi {
    objects: Metered,
    url: String,
    /// Where [`KnownHead`] is kept between processes (beside the local database).
    head_file: Option<PathBuf>,
    wall: Arc<dyn Fn() -> u64 + Send + Sync>,
    state: Mutex<State>,
    /// Fault injection for the crash tests: abort the process right after a
    /// segment is written, before anything else (`DELTASYNC_FAULT=abort-after-segment`).
    abort_after_segment: bool,
}

impl std::fmt::Debug for FileStoreApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStoreApi").field("url", &self.url).finish_non_exhaustive()
    }
}

/// The engine's error for a store operation that failed.
fn store_error(url: &str, e: ObjectError) -> Error {
    if e.is_retryable() {
        Error::Unreachable { url: url.to_owned(), message: e.to_string() }
    } else {
        Error::FileStore { url: url.to_owned(), message: e.to_string() }
    }
}

/// `url` without the `user:password@` part, if it has one.
fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// The answer a server gives to a cursor outside its log.
fn reset_required(cursor: u64, head: u64) -> Error {
    Error::Server {
        status: 410,
        code: "reset_required".into(),
        message: format!("cursor {cursor} is not in the file store's log (head {head}): bootstrap again"),
        retry_after: None,
        details: Vec::new(),
    }
}

impl FileStoreApi {
    /// A transport over the store at `url` (see [`ObjectStore::open`] for
    /// the URL forms). `head_file` keeps the last head this device was given,
    /// so that a sync with nothing new costs one read in a new process too;
    /// `wall` is the device's clock (ms since the epoch), which stamps the
    /// changes it logs as a server's clock would.
    pub fn new(url: &str, head_file: Option<PathBuf>, wall: Arc<dyn Fn() -> u64 + Send + Sync>) -> Result<Self> {
        let objects =
            ObjectStore::open(url).map_err(|e| Error::FileStore { url: url.to_owned(), message: e.to_string() })?;
        let known_head = head_file
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<KnownHead>(&b).ok());
        // Kept in the local database and reopened from there: the URL as
        // given, less any user:password (credentials come from the environment).
        let url = without_credentials(url.trim_end_matches('/'));
        let known_head = known_head.filter(|k| k.store == url);
        Ok(FileStoreApi {
            objects: Metered::new(objects),
            url,
            head_file,
            wall,
            state: Mutex::new(State { known_head, ..State::default() }),
            abort_after_segment: std::env::var("DELTASYNC_FAULT").is_ok_and(|v| v == "abort-after-segment"),
        })
    }

    /// What this device asked of the store so far.
    pub fn traffic(&self) -> Traffic {
        self.objects.traffic()
    }

    fn fail(&self, e: ObjectError) -> Error {
        store_error(&self.url, e)
    }

    async fn read(&self, object: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.objects.read(object).await.map_err(|e| self.fail(e))?.map(|o| o.bytes))
    }

    /// Checks once per process, before the first write, that the store's
    /// conditional writes hold (see [`ObjectStore::probe`]).
    async fn probe(&self, st: &mut State) -> Result<()> {
        if !st.probed {
            if let Some(folder) = self.url.strip_prefix("file://")
                && let Some((tool, marker)) = super::replicated::replicated_by(Path::new(folder))
            {
                return Err(Error::FileStore {
                    url: self.url.clone(),
                    message: format!(
                        "this folder is replicated by {tool} (found {}): a create-only write here cannot stop \
                         another computer from writing the same log segment on its own copy, so changes could \
                         be lost. Sync through a deltasync server, or through WebDAV or S3 storage with \
                         conditional writes, instead (docs/file-store.md)",
                        marker.display()
                    ),
                });
            }
            self.objects.probe().await.map_err(|e| self.fail(e))?;
            st.probed = true;
        }
        Ok(())
    }

    /// The store's descriptor; the first device to use the store writes it.
    async fn descriptor(&self, st: &mut State) -> Result<Descriptor> {
        if let Some(d) = &st.descriptor {
            return Ok(d.clone());
        }
        let bytes = match self.read(layout::DESCRIPTOR).await? {
            Some(bytes) => bytes,
            None => {
                self.probe(st).await?;
                let fresh = Descriptor {
                    format: FORMAT.to_owned(),
                    user_id: uuid::Uuid::new_v4().to_string(),
                    policies: Policies::default(),
                    created: (self.wall)(),
                };
                let bytes = serde_json::to_vec_pretty(&fresh).expect("a descriptor serialises");
                match self.objects.create(layout::DESCRIPTOR, bytes.clone()).await.map_err(|e| self.fail(e))? {
                    Created::Written => bytes,
                    Created::Taken => self.read(layout::DESCRIPTOR).await?.unwrap_or_default(),
                }
            }
        };
        let descriptor: Descriptor = serde_json::from_slice(&bytes).map_err(|e| Error::FileStore {
            url: self.url.clone(),
            message: format!("{} is not a deltasync file store descriptor: {e}", layout::DESCRIPTOR),
        })?;
        if descriptor.format != FORMAT {
            return Err(Error::FileStore {
                url: self.url.clone(),
                message: format!(
                    "{} says format {:?}; this deltasync reads {FORMAT:?}: upgrade deltasync",
                    layout::DESCRIPTOR,
                    descriptor.format
                ),
            });
        }
        st.descriptor = Some(descriptor.clone());
        Ok(descriptor)
    }

    /// Makes sure the ledger is loaded, reaching back to `cursor` (a
    /// snapshot at or before it, or the log's start), and caught up.
    async fn ledger<'s>(&self, st: &'s mut State, cursor: Option<u64>) -> Result<&'s mut Ledger> {
        let descriptor = self.descriptor(st).await?;
        let reload = match (&st.ledger, cursor) {
            (None, _) => true,
            (Some(l), Some(c)) => c < l.base(),
            (Some(_), None) => false,
        };
        if reload {
            let mut snapshots: Vec<u64> = self
                .objects
                .list(layout::SNAPSHOT_DIR)
                .await
                .map_err(|e| self.fail(e))?
                .iter()
                .filter_map(|n| layout::snapshot_seq(n))
                .collect();
            snapshots.sort_unstable();
            st.newest_snapshot = snapshots.last().copied();
            let mut ledger = None;
            for &seq in snapshots.iter().rev().filter(|&&s| cursor.is_none_or(|c| s <= c)) {
                let name = layout::snapshot(seq);
                let Some(bytes) = self.read(&name).await? else { continue };
                match self.read_snapshot(&name, &bytes, &descriptor).await? {
                    Ok(l) => {
                        ledger = Some(l);
                        break;
                    }
                    // A damaged snapshot is not trusted: an older one, or the log itself, serves.
                    Err(e) => tracing::warn!("skipping a snapshot: {e}"),
                }
            }
            st.ledger = Some(ledger.unwrap_or_else(|| Ledger::new(descriptor.policies.clone())));
        }
        let ledger = st.ledger.as_mut().expect("loaded above");
        // The hint is read first: a device writes it only after its segment,
        // so every segment up to the hinted head is in the store by then.
        let hinted = self.hinted_head().await?;
        self.catch_up(ledger).await?;
        self.check_hint(ledger, hinted)?;
        Ok(ledger)
    }

    /// The head `meta.json` names, if it reads.
    async fn hinted_head(&self) -> Result<Option<u64>> {
        let Some(hint) = self.read(layout::HEAD_HINT).await? else { return Ok(None) };
        match serde_json::from_slice::<HeadHint>(&hint) {
            Ok(hint) => Ok(Some(hint.head)),
            Err(e) => {
                tracing::warn!("{} is unreadable ({e}); ignoring it", layout::HEAD_HINT);
                Ok(None)
            }
        }
    }

    /// Refuses a log that ends before the head hint says it does: a segment
    /// is missing (deleted, or not yet arrived in a folder that a sync tool
    /// replicates). Taking the gap for the end would let this device log its
    /// own changes under seqs another device already used, forking the log.
    fn check_hint(&self, ledger: &Ledger, hinted: Option<u64>) -> Result<()> {
        let Some(hinted) = hinted else { return Ok(()) };
        let head = ledger.head().seq;
        if hinted > head {
            return Err(Error::FileStore {
                url: self.url.clone(),
                message: format!(
                    "the log ends at seq {head}, but {} says a device logged up to seq {}: {} is missing. \
                     If the store is a folder a sync tool replicates, wait until it has copied everything; \
                     otherwise restore the missing segment. Nothing is written until then.",
                    layout::HEAD_HINT,
                    hinted,
                    layout::segment(head + 1)
                ),
            });
        }
        Ok(())
    }

    /// Reads the snapshot `name` and checks its head against the segment
    /// that ends there. The outer error is the store's; the inner one says
    /// the snapshot cannot be trusted.
    async fn read_snapshot(
        &self,
        name: &str,
        bytes: &[u8],
        descriptor: &Descriptor,
    ) -> Result<std::result::Result<Ledger, deltasync_engine::file_store::FileStoreError>> {
        let ledger = match Ledger::from_snapshot(name, bytes, descriptor.policies.clone()) {
            Ok(l) => l,
            Err(e) => return Ok(Err(e)),
        };
        let segment_name = layout::segment(ledger.last_segment());
        let segment = match self.read(&segment_name).await? {
            Some(b) => match Segment::decode(&segment_name, &b) {
                Ok(s) => Some(s),
                Err(e) => return Ok(Err(e)),
            },
            None => None,
        };
        Ok(ledger.check_snapshot_end(name, segment.as_ref()).map(|()| ledger))
    }

    /// Reads and applies the segments after the ledger's head.
    async fn catch_up(&self, ledger: &mut Ledger) -> Result<()> {
        loop {
            let name = layout::segment(ledger.head().seq + 1);
            let Some(bytes) = self.read(&name).await? else { return Ok(()) };
            let segment = Segment::decode(&name, &bytes)?;
            ledger.apply(&name, &segment)?;
        }
    }

    /// Remembers the head this device was given at `seq`, here and beside the local database.
    fn remember(&self, st: &mut State, seq: u64, state_hash: StateHash, state_digest: StateDigest) {
        let known = KnownHead { store: self.url.clone(), seq, state_hash, state_digest };
        if st.known_head.as_ref() == Some(&known) {
            return;
        }
        if let Some(path) = &self.head_file {
            let tmp = path.with_extension("tmp");
            let written = std::fs::write(&tmp, serde_json::to_vec(&known).expect("serialises"))
                .and_then(|()| std::fs::rename(&tmp, path));
            if let Err(e) = written {
                tracing::debug!(%e, path = %path.display(), "could not keep the file store head");
            }
        }
        st.known_head = Some(known);
    }

    /// Pushes `body`'s changes: plan, write the segment create-only, and on
    /// a lost race read the winner and plan again. Returns the results. The
    /// ledger is loaded and caught up already (the sync did it).
    async fn push(&self, st: &mut State, body: &SyncBody<'_>) -> Result<Vec<deltasync_protocol::wire::PushResult>> {
        let device = DeviceId::parse(body.device_id).map_err(|e| Error::Invalid(e.to_string()))?;
        for race in 0..MAX_RACES {
            if race > 0 {
                // Another device logged these seqs first: read its segment(s), plan again.
                let hinted = self.hinted_head().await?;
                let ledger = st.ledger.as_mut().expect("loaded by the sync");
                self.catch_up(ledger).await?;
                self.check_hint(ledger, hinted)?;
            }
            let now = (self.wall)();
            let ledger = st.ledger.as_ref().expect("loaded by the sync");
            let planned = ledger.plan(&device, body.changes, now, MAX_CLOCK_DRIFT_MS);
            let Some(segment) = planned.segment else { return Ok(planned.results) };
            self.probe(st).await?;
            let name = layout::segment(segment.first());
            match self.objects.create(&name, segment.encode()).await.map_err(|e| self.fail(e))? {
                Created::Written => {
                    if self.abort_after_segment {
                        std::process::abort();
                    }
                    // Applied through the same checks as anyone's segment.
                    st.ledger.as_mut().expect("loaded").apply(&name, &segment)?;
                    self.after_write(st).await;
                    return Ok(planned.results);
                }
                Created::Taken => continue,
            }
        }
        Err(Error::Unreachable {
            url: self.url.clone(),
            message: format!(
                "other devices took the next seqs {MAX_RACES} times in a row; the changes stay in the outbox for the next sync"
            ),
        })
    }

    /// After a segment is written: the head hint, and a snapshot when the
    /// log has grown enough. Both are optimisations: a failure is logged, never returned.
    async fn after_write(&self, st: &mut State) {
        let ledger = st.ledger.as_ref().expect("loaded");
        let head = ledger.head();
        let mut snapshot_at = None;
        if snapshot::is_due(head.seq, st.newest_snapshot, ledger.entity_count()) {
            let name = layout::snapshot(head.seq);
            match self.objects.create(&name, ledger.snapshot_body()).await {
                Ok(_) => snapshot_at = Some(head.seq),
                Err(e) => tracing::warn!(%e, "could not write a snapshot"),
            }
        }
        if let Some(seq) = snapshot_at {
            st.newest_snapshot = Some(seq);
            self.clean_snapshots().await;
            // Rare enough to tidy up here: what crashed writers left staged.
            if let Err(e) = self.objects.clean_orphans(ORPHAN_AGE).await {
                tracing::debug!(%e, "could not clean staged leftovers");
            }
        }
        let hint = HeadHint {
            format: FORMAT.to_owned(),
            head: head.seq,
            state_hash: head.state_hash,
            state_digest: head.state_digest,
            snapshot: st.newest_snapshot,
            updated: (self.wall)(),
        };
        if let Err(e) = self.write_hint(&hint).await {
            tracing::debug!(%e, "could not update the head hint");
        }
    }

    /// Replaces `meta.json` with `hint` unless it already says as much or
    /// more, with a compare-and-swap so that a slower device never moves it back.
    async fn write_hint(&self, hint: &HeadHint) -> std::result::Result<(), ObjectError> {
        for _ in 0..3 {
            let current = self.objects.read(layout::HEAD_HINT).await?;
            let version = match &current {
                Some(o) => {
                    if let Ok(old) = serde_json::from_slice::<HeadHint>(&o.bytes)
                        && old.head >= hint.head
                        && old.snapshot >= hint.snapshot
                    {
                        return Ok(());
                    }
                    o.version.clone()
                }
                None => None,
            };
            let bytes = serde_json::to_vec(hint).expect("a hint serialises");
            match self.objects.replace(layout::HEAD_HINT, bytes, version.as_deref()).await? {
                Replaced::Written => return Ok(()),
                Replaced::Changed => continue,
            }
        }
        Ok(())
    }

    /// Deletes all but the newest [`SNAPSHOTS_KEPT`] snapshots.
    async fn clean_snapshots(&self) {
        let Ok(names) = self.objects.list(layout::SNAPSHOT_DIR).await else { return };
        let mut seqs: Vec<u64> = names.iter().filter_map(|n| layout::snapshot_seq(n)).collect();
        seqs.sort_unstable();
        let old = seqs.len().saturating_sub(SNAPSHOTS_KEPT);
        for seq in &seqs[..old] {
            if let Err(e) = self.objects.delete(&layout::snapshot(*seq)).await {
                tracing::debug!(%e, "could not delete an old snapshot");
            }
        }
    }

    /// A page after `cursor`, leaving out `left_out`, remembered as given.
    async fn page(&self, st: &mut State, cursor: u64, limit: u64, left_out: &HashSet<u64>) -> Result<PageAnswer> {
        self.ledger(st, Some(cursor)).await?;
        self.loaded_page(st, cursor, limit, left_out)
    }

    /// [`Self::page`] from the ledger as loaded, reading nothing.
    fn loaded_page(&self, st: &mut State, cursor: u64, limit: u64, left_out: &HashSet<u64>) -> Result<PageAnswer> {
        let ledger = st.ledger.as_ref().expect("loaded by the caller");
        let head = ledger.head().seq;
        let page = ledger.page(cursor, limit, left_out).ok_or_else(|| reset_required(cursor, head))?;
        self.remember(st, page.cursor, page.state_hash, page.state_digest);
        Ok(page)
    }

    /// The answer to a sync or pull with nothing new, from one read, when
    /// this device was given the head at `cursor` before.
    async fn nothing_new(&self, st: &State, cursor: u64) -> Result<Option<(StateHash, StateDigest)>> {
        let Some(known) = st.known_head.as_ref().filter(|k| k.seq == cursor) else { return Ok(None) };
        if st.ledger.as_ref().is_some_and(|l| l.head().seq > cursor) {
            return Ok(None);
        }
        let next = self.objects.read(&layout::segment(cursor + 1)).await.map_err(|e| self.fail(e))?;
        Ok(next.is_none().then_some((known.state_hash, known.state_digest)))
    }
}

type PageAnswer = deltasync_engine::file_store::ledger::LogPage;

/// A bootstrap body held in memory, handed out in chunks.
#[derive(Debug)]
pub struct BodyChunks {
    body: Vec<u8>,
    at: usize,
}

impl ByteStream for BodyChunks {
    async fn next_chunk(&mut self) -> Option<Result<Vec<u8>>> {
        const CHUNK: usize = 256 << 10;
        if self.at >= self.body.len() {
            return None;
        }
        let end = (self.at + CHUNK).min(self.body.len());
        let chunk = self.body[self.at..end].to_vec();
        self.at = end;
        Some(Ok(chunk))
    }
}

impl Transport for FileStoreApi {
    type Stream = BodyChunks;

    fn base(&self) -> &str {
        &self.url
    }

    fn token(&self) -> Option<String> {
        None
    }

    async fn status(&self, _device_id: Option<&str>) -> Result<StatusResponse> {
        let mut st = self.state.lock().await;
        let user_id = self.descriptor(&mut st).await?.user_id;
        let ledger = self.ledger(&mut st, None).await?;
        let head = ledger.head();
        Ok(StatusResponse {
            user_id,
            head: head.seq,
            state_hash: head.state_hash,
            state_digest: head.state_digest,
            horizon: 0,
            policies: ledger.policies().clone(),
            devices: ledger.devices(),
            server_time: (self.wall)(),
        })
    }

    async fn sync(&self, body: &SyncBody<'_>) -> Result<SyncResponse> {
        let mut st = self.state.lock().await;
        let server_time = (self.wall)();
        if body.changes.is_empty()
            && let Some((state_hash, state_digest)) = self.nothing_new(&st, body.cursor).await?
        {
            return Ok(SyncResponse {
                results: Vec::new(),
                changes: Vec::new(),
                cursor: body.cursor,
                has_more: false,
                state_hash,
                state_digest,
                server_time,
            });
        }
        // A cursor outside the log refuses the push too, as a server does.
        let head = self.ledger(&mut st, Some(body.cursor)).await?.head().seq;
        if body.cursor > head {
            return Err(reset_required(body.cursor, head));
        }
        let results = if body.changes.is_empty() { Vec::new() } else { self.push(&mut st, body).await? };
        // Every pushed change the log holds is left out, duplicates too, as a server does.
        let pushed: HashSet<u64> = results.iter().filter_map(|r| r.seq).collect();
        let page = self.loaded_page(&mut st, body.cursor, body.limit.unwrap_or(DEFAULT_LIMIT), &pushed)?;
        Ok(SyncResponse {
            results,
            changes: page.changes,
            cursor: page.cursor,
            has_more: page.has_more,
            state_hash: page.state_hash,
            state_digest: page.state_digest,
            server_time,
        })
    }

    async fn pull(&self, _device_id: &str, cursor: u64, limit: u64, wait: Duration) -> Result<PullResponse> {
        let deadline = Instant::now() + wait;
        loop {
            let mut st = self.state.lock().await;
            let server_time = (self.wall)();
            let quiet = self.nothing_new(&st, cursor).await?;
            let page = match quiet {
                Some((state_hash, state_digest)) => {
                    PageAnswer { changes: Vec::new(), cursor, has_more: false, state_hash, state_digest }
                }
                None => self.page(&mut st, cursor, limit, &HashSet::new()).await?,
            };
            if !page.changes.is_empty() || Instant::now() >= deadline {
                return Ok(PullResponse {
                    changes: page.changes,
                    cursor: page.cursor,
                    has_more: page.has_more,
                    state_hash: page.state_hash,
                    state_digest: page.state_digest,
                    server_time,
                });
            }
            drop(st);
            tokio::time::sleep(POLL_EVERY.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }

    async fn bootstrap(&self, _device_id: &str) -> Result<BodyChunks> {
        let mut st = self.state.lock().await;
        let ledger = self.ledger(&mut st, None).await?;
        let body = ledger.bootstrap_body((self.wall)());
        let head = ledger.head();
        self.remember(&mut st, head.seq, head.state_hash, head.state_digest);
        Ok(BodyChunks { body, at: 0 })
    }

    async fn conflicts(&self, since: u64, limit: Option<u64>) -> Result<ConflictsResponse> {
        let mut st = self.state.lock().await;
        let ledger = self.ledger(&mut st, None).await?;
        let (conflicts, has_more) = ledger.conflicts(since, limit.unwrap_or(100).min(1000));
        let cursor = conflicts.last().map_or(since, |r| r.id);
        Ok(ConflictsResponse { conflicts, cursor, has_more })
    }
}

#[cfg(test)]
mod tests {
    use super::without_credentials;

    #[test]
    fn the_kept_url_has_no_credentials() {
        assert_eq!(
            without_credentials("webdavs://me:secret@cloud.example.com/dav/x"),
            "webdavs://cloud.example.com/dav/x"
        );
        assert_eq!(without_credentials("s3://bucket/prefix"), "s3://bucket/prefix");
        assert_eq!(without_credentials("file:///a/b@c"), "file:///a/b@c");
    }
}
