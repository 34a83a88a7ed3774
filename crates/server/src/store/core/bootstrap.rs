//! How a bootstrap starts and streams, the same way in every store.
//!
//! A store reads its snapshot on a task of its own (a blocking thread for
//! SQLite, an async task for PostgreSQL), which holds a [`SnapshotFeed`]: it
//! first says where the snapshot stands ([`SnapshotFeed::begin`]), then
//! writes one line per row, in chunks (see [`crate::store::chunks`]). The
//! request holds the [`SnapshotStart`], which answers with the head and the
//! stream of lines, or with the error that stopped the snapshot before it
//! had a head: a database that is unavailable stays a retryable failure.

use std::time::Duration;

use tokio::sync::oneshot;

use crate::batch::DatasetHead;
use crate::store::chunks::{ChunkSink, ChunkStream};
use crate::store::rows::{self, Columns};
use crate::store::{BootstrapStream, StoreError};

/// The snapshot reader's end of a bootstrap.
pub struct SnapshotFeed {
    head: Option<oneshot::Sender<Result<DatasetHead, StoreError>>>,
    sink: ChunkSink,
}

/// The request's end of a bootstrap: the head, then the lines.
pub struct SnapshotStart {
    head: oneshot::Receiver<Result<DatasetHead, StoreError>>,
    lines: ChunkStream,
}

/// A bootstrap whose reader gives up when the client takes no chunk for `stall`.
pub fn bootstrap_channel(stall: Duration) -> (SnapshotFeed, SnapshotStart) {
    let (head_tx, head_rx) = oneshot::channel();
    let (sink, lines) = ChunkSink::new(stall);
    (SnapshotFeed { head: Some(head_tx), sink }, SnapshotStart { head: head_rx, lines })
}

impl SnapshotStart {
    /// Waits for the snapshot's head; the error that stopped the reader before it had one, if any.
    pub async fn stream(self) -> Result<BootstrapStream, StoreError> {
        let head = self
            .head
            .await
            .map_err(|_| StoreError::Internal("the bootstrap reader stopped before reading the head".into()))??;
        Ok(BootstrapStream { head, lines: self.lines })
    }
}

impl SnapshotFeed {
    /// Says where the snapshot stands; false when the request is gone (the reader should stop).
    pub fn begin(&mut self, head: DatasetHead) -> bool {
        self.head.take().is_some_and(|tx| tx.send(Ok(head)).is_ok())
    }

    /// Writes the bootstrap line of an entity row (see [`rows::write_entity_row`]);
    /// false when the client is gone and the reader should stop.
    pub async fn entity(&mut self, r: &impl Columns) -> Result<bool, StoreError> {
        rows::write_entity_row(self.sink.buf(), r)?;
        Ok(self.sink.flush_if_full().await)
    }

    /// [`entity`](Self::entity) from a blocking thread of the runtime.
    pub fn blocking_entity(&mut self, r: &impl Columns) -> Result<bool, StoreError> {
        rows::write_entity_row(self.sink.buf(), r)?;
        Ok(self.sink.blocking_flush_if_full())
    }

    /// Writes the bootstrap line of a logged append (a row of [`rows::CHANGE_COLUMNS`]);
    /// false when the client is gone and the reader should stop.
    pub async fn append(&mut self, r: &impl Columns) -> Result<bool, StoreError> {
        rows::write_append_line(self.sink.buf(), &rows::wire_parts(r)?);
        Ok(self.sink.flush_if_full().await)
    }

    /// [`append`](Self::append) from a blocking thread of the runtime.
    pub fn blocking_append(&mut self, r: &impl Columns) -> Result<bool, StoreError> {
        rows::write_append_line(self.sink.buf(), &rows::wire_parts(r)?);
        Ok(self.sink.blocking_flush_if_full())
    }

    /// Hands over the last lines and marks the stream complete; false when the client is gone.
    pub async fn finish(&mut self) -> bool {
        self.sink.finish().await
    }

    /// [`finish`](Self::finish) from a blocking thread of the runtime.
    pub fn blocking_finish(&mut self) -> bool {
        self.sink.blocking_finish()
    }

    /// Ends the reader with its outcome: an error before the head goes to the
    /// request, an error after it ends the stream (without its end line).
    pub async fn end(mut self, outcome: Result<(), StoreError>) {
        if let Some(error) = self.report(outcome) {
            self.sink.fail(error).await;
        }
    }

    /// [`end`](Self::end) from a blocking thread of the runtime.
    pub fn blocking_end(mut self, outcome: Result<(), StoreError>) {
        if let Some(error) = self.report(outcome) {
            self.sink.blocking_fail(error);
        }
    }

    /// Sends an error to the request if it still waits for the head; else
    /// gives it back, for the stream.
    fn report(&mut self, outcome: Result<(), StoreError>) -> Option<StoreError> {
        let error = outcome.err()?;
        tracing::error!(error = %error, "bootstrap stream failed");
        match self.head.take() {
            Some(tx) => tx.send(Err(error)).err().and_then(Result::err),
            None => Some(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn an_error_before_the_head_reaches_the_request_as_it_was() {
        let (feed, start) = bootstrap_channel(Duration::from_secs(5));
        feed.end(Err(StoreError::Unavailable("busy".into()))).await;
        assert!(matches!(start.stream().await, Err(StoreError::Unavailable(_))));
    }

    #[tokio::test]
    async fn an_error_after_the_head_ends_the_stream_with_it() {
        let (mut feed, start) = bootstrap_channel(Duration::from_secs(5));
        assert!(feed.begin(DatasetHead { seq: 3, ..DatasetHead::default() }));
        feed.end(Err(StoreError::Corrupt("bad row".into()))).await;
        let stream = start.stream().await.unwrap();
        assert_eq!(stream.head.seq, 3);
        let items: Vec<_> = stream.lines.collect().await;
        assert!(matches!(items.as_slice(), [Err(StoreError::Corrupt(_)), ..]), "{items:?}");
    }

    #[tokio::test]
    async fn a_reader_that_stops_without_a_head_is_an_internal_error() {
        let (feed, start) = bootstrap_channel(Duration::from_secs(5));
        drop(feed);
        assert!(matches!(start.stream().await, Err(StoreError::Internal(_))));
    }

    #[tokio::test]
    async fn a_finished_snapshot_streams_to_its_end() {
        let (mut feed, start) = bootstrap_channel(Duration::from_secs(5));
        assert!(feed.begin(DatasetHead::default()));
        assert!(feed.finish().await);
        feed.end(Ok(())).await;
        let stream = start.stream().await.unwrap();
        let items: Vec<_> = stream.lines.collect().await;
        assert!(items.iter().all(Result::is_ok));
    }
}
