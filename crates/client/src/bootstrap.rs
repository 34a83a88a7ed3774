//! Bootstrap: replace the confirmed state by the server's streamed snapshot,
//! in one transaction, verified against the snapshot's digest, keeping every
//! pending and failed change.

use deltasync_protocol::Meta;
use deltasync_protocol::StateDigest;
use deltasync_protocol::wire::{BootstrapEnd, BootstrapHeader, BootstrapLine};
use rusqlite::TransactionBehavior;

use crate::client::{Client, Origin, Progress};
use crate::error::{ClientError, Result};
use crate::http::{self, ServerApi};
use crate::local;

impl Client {
    /// Replaces the confirmed state by the server's streamed snapshot, in one
    /// transaction, keeping every pending and failed change. Returns the
    /// number of entities loaded.
    pub(crate) async fn bootstrap(&self, api: &ServerApi) -> Result<u64> {
        let resp = api.bootstrap(self.device_id().as_str()).await?;
        let mut stream = std::pin::pin!(resp.bytes_stream());
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes_chunk::Chunk>(64);
        let client = self.clone();
        let writer = tokio::task::spawn_blocking(move || client.load_snapshot(rx));
        while let Some(chunk) = api.next_chunk(http::BOOTSTRAP, &mut stream).await {
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                break;
            }
        }
        drop(tx);
        let loaded = writer.await.map_err(|e| ClientError::Protocol {
            request: http::BOOTSTRAP,
            message: format!("the task writing the snapshot failed: {e}"),
        })??;
        self.emit(Origin::Reset, Vec::new());
        Ok(loaded)
    }

    /// Reads the NDJSON snapshot from `rx` and writes it in one transaction.
    fn load_snapshot(&self, mut rx: tokio::sync::mpsc::Receiver<bytes_chunk::Chunk>) -> Result<u64> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        local::clear_confirmed(&tx)?;
        let mut buf: Vec<u8> = Vec::new();
        let mut header: Option<BootstrapHeader> = None;
        let mut end: Option<BootstrapEnd> = None;
        let mut lines = 0u64;
        let mut entities = 0u64;
        let mut digest = StateDigest::ZERO;
        let mut handle_line = |line: &[u8]| -> Result<()> {
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                return Ok(());
            }
            if end.is_some() {
                return Err(bootstrap_error("lines after the end line".into()));
            }
            let line_no = lines + 2;
            let bad = |e: serde_json::Error| bootstrap_error(format!("cannot read line {line_no}: {e}"));
            if header.is_none() {
                header = Some(serde_json::from_slice(line).map_err(bad)?);
                return Ok(());
            }
            if line.starts_with(br#"{"end""#) {
                end = Some(serde_json::from_slice(line).map_err(bad)?);
                return Ok(());
            }
            lines += 1;
            match serde_json::from_slice::<BootstrapLine>(line).map_err(bad)? {
                BootstrapLine::Entity(state) => {
                    let newest = match &state.meta {
                        Meta::Fields { t, u, .. } => t.as_ref().max(u.as_ref()),
                        Meta::Last { hlc } => Some(hlc),
                    };
                    self.observe_stamps(newest);
                    let h = state.entity_hash();
                    if let Some(h) = &h {
                        digest.add(h);
                    }
                    local::put_confirmed(&tx, &state, h.as_ref())?;
                    entities += 1;
                    if entities.is_multiple_of(10_000) {
                        self.progress(Progress::Bootstrap { entities });
                    }
                }
                BootstrapLine::Change(c) => local::put_append(&tx, c.seq, &c.to_wire_json())?,
            }
            Ok(())
        };
        while let Some(chunk) = rx.blocking_recv() {
            buf.extend_from_slice(&chunk?);
            let mut start = 0;
            while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
                handle_line(&buf[start..start + nl])?;
                start += nl + 1;
            }
            buf.drain(..start);
        }
        handle_line(&buf)?;
        let header = header.ok_or_else(|| bootstrap_error("the answer was empty".into()))?;
        let end = end.ok_or_else(|| ClientError::Unreachable {
            url: self.api().map(|a| a.base().to_owned()).unwrap_or_default(),
            message: "the bootstrap stream ended before its last line".into(),
        })?;
        if end.count != lines {
            return Err(bootstrap_error(format!("the end line counts {} lines, {lines} were sent", end.count)));
        }
        if digest != header.state_digest {
            return Err(ClientError::Integrity(format!(
                "the server's snapshot at seq {} has digest {digest}, but the server says {}",
                header.cursor, header.state_digest
            )));
        }
        local::set_position(&tx, header.cursor, &header.state_hash, &digest)?;
        local::set_meta(&tx, "clock", self.observe_stamps(None).as_str())?;
        local::set_policies(&tx, &header.policies)?;
        local::confirm_up_to(&tx, header.cursor)?;
        // Acknowledged at seqs the server no longer has: it was restored.
        local::unsend_above(&tx, header.cursor)?;
        local::set_journal_unchecked(&tx, true)?;
        tx.commit()?;
        Ok(entities)
    }
}

mod bytes_chunk {
    /// A chunk of a streamed body, or the error that ended it.
    pub type Chunk = crate::error::Result<bytes::Bytes>;
}

/// An unreadable bootstrap answer.
fn bootstrap_error(message: String) -> ClientError {
    ClientError::Protocol { request: http::BOOTSTRAP, message }
}
