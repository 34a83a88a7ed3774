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

/// The parts of a snapshot, each read with one query, streamed one after the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotPart {
    /// Every entity, in key order (straight off the primary key).
    Entities,
    /// Every logged append, in seq order.
    Appends,
}

impl SnapshotPart {
    /// The parts, in the order a bootstrap streams them.
    pub const IN_ORDER: [SnapshotPart; 2] = [SnapshotPart::Entities, SnapshotPart::Appends];

    /// The query that reads this part of `user`'s dataset, the user id bound
    /// to `user_param` (`?1` on SQLite, `$1` on PostgreSQL).
    pub fn query(self, user_param: &str) -> String {
        match self {
            SnapshotPart::Entities => format!(
                "SELECT {} FROM entities WHERE user_id = {user_param} ORDER BY collection, entity_id",
                rows::ENTITY_LINE_COLUMNS
            ),
            SnapshotPart::Appends => format!(
                "SELECT {} FROM changes WHERE user_id = {user_param} AND op = 'append' ORDER BY seq",
                rows::CHANGE_COLUMNS
            ),
        }
    }
}

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

    /// Writes the bootstrap line of a row of `part`; false when the client
    /// is gone and the reader should stop.
    pub async fn line(&mut self, part: SnapshotPart, r: &impl Columns) -> Result<bool, StoreError> {
        self.write_line(part, r)?;
        Ok(self.sink.flush_if_full().await)
    }

    /// [`line`](Self::line) from a blocking thread of the runtime.
    pub fn blocking_line(&mut self, part: SnapshotPart, r: &impl Columns) -> Result<bool, StoreError> {
        self.write_line(part, r)?;
        Ok(self.sink.blocking_flush_if_full())
    }

    fn write_line(&mut self, part: SnapshotPart, r: &impl Columns) -> Result<(), StoreError> {
        match part {
            SnapshotPart::Entities => rows::write_entity_row(self.sink.buf(), r)?,
            SnapshotPart::Appends => rows::write_append_line(self.sink.buf(), &rows::wire_parts(r)?),
        }
        Ok(())
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

    #[test]
    fn entities_stream_before_appends_each_in_its_order() {
        assert_eq!(SnapshotPart::IN_ORDER, [SnapshotPart::Entities, SnapshotPart::Appends]);
        let entities = SnapshotPart::Entities.query("$1");
        assert!(entities.contains("user_id = $1") && entities.ends_with("ORDER BY collection, entity_id"));
        let appends = SnapshotPart::Appends.query("?1");
        assert!(appends.contains("user_id = ?1 AND op = 'append'") && appends.ends_with("ORDER BY seq"));
    }

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
