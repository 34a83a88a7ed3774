//! How a bootstrap's lines reach the HTTP body, the same way in every store:
//! in chunks of about [`CHUNK_BYTES`], through a short queue, and never
//! waiting longer than the stall deadline for the client to take one.
//!
//! A bootstrap holds a database snapshot (a SQLite read transaction, a
//! PostgreSQL connection in a repeatable-read transaction) for as long as it
//! streams. A client that stops reading must not pin it forever: when a chunk
//! cannot be handed over within the deadline, the producer gives up, the
//! snapshot is released, and the body ends without its end line, so the
//! client knows the bootstrap is incomplete: the stream ends with an error
//! unless the producer called [`ChunkSink::finish`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream};
use tokio::sync::mpsc;

use super::StoreError;

/// How many bytes of lines go to the body in one chunk.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// How many chunks wait between the producer and the body.
const QUEUE_CHUNKS: usize = 4;

/// The producer's end: builds chunks and hands them over.
pub struct ChunkSink {
    tx: mpsc::Sender<Result<Bytes, StoreError>>,
    stall: Duration,
    buf: Vec<u8>,
    gone: bool,
    complete: Arc<AtomicBool>,
}

/// The body's end: the chunks as a stream.
pub type ChunkStream = BoxStream<'static, Result<Bytes, StoreError>>;

impl ChunkSink {
    /// A sink that gives up when the reader takes no chunk for `stall`, and its stream.
    pub fn new(stall: Duration) -> (ChunkSink, ChunkStream) {
        let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
        let complete = Arc::new(AtomicBool::new(false));
        let sink = ChunkSink {
            tx,
            stall,
            buf: Vec::with_capacity(CHUNK_BYTES + 1024),
            gone: false,
            complete: complete.clone(),
        };
        let chunks = tokio_stream::wrappers::ReceiverStream::new(rx).map(Some);
        let verdict = stream::once(async move {
            (!complete.load(Ordering::Acquire))
                .then(|| Err(StoreError::Internal("the snapshot stopped before its end".into())))
        });
        (sink, Box::pin(chunks.chain(verdict).filter_map(std::future::ready)))
    }

    /// The chunk being built; write whole lines to it.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Whether the reader went away or stalled past the deadline; the producer should stop.
    pub fn is_gone(&self) -> bool {
        self.gone
    }

    /// Hands the chunk over once it is full; false when the producer should stop.
    pub async fn flush_if_full(&mut self) -> bool {
        if self.buf.len() < CHUNK_BYTES {
            return !self.gone;
        }
        self.flush().await
    }

    /// Hands over what is buffered; false when the producer should stop.
    pub async fn flush(&mut self) -> bool {
        if self.gone {
            return false;
        }
        if self.buf.is_empty() {
            return true;
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES + 1024)));
        match tokio::time::timeout(self.stall, self.tx.send(Ok(chunk))).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => {
                self.gone = true;
                false
            }
            Err(_) => {
                tracing::warn!(
                    stall_secs = self.stall.as_secs(),
                    "bootstrap abandoned: the client read nothing for the write timeout; its snapshot is released"
                );
                self.gone = true;
                false
            }
        }
    }

    /// Hands over the rest and marks the stream complete; false when the reader is gone.
    pub async fn finish(&mut self) -> bool {
        let handed = self.flush().await;
        if handed {
            self.complete.store(true, Ordering::Release);
        }
        handed
    }

    /// [`finish`](Self::finish) from a blocking thread of the runtime.
    pub fn blocking_finish(&mut self) -> bool {
        tokio::runtime::Handle::current().block_on(self.finish())
    }

    /// [`flush_if_full`](Self::flush_if_full) from a blocking thread of the runtime.
    pub fn blocking_flush_if_full(&mut self) -> bool {
        if self.buf.len() < CHUNK_BYTES {
            return !self.gone;
        }
        self.blocking_flush()
    }

    /// [`flush`](Self::flush) from a blocking thread of the runtime.
    pub fn blocking_flush(&mut self) -> bool {
        tokio::runtime::Handle::current().block_on(self.flush())
    }

    /// Ends the stream with an error (the body then ends without its end line).
    pub async fn fail(&mut self, error: StoreError) {
        if !self.gone {
            let _ = tokio::time::timeout(self.stall, self.tx.send(Err(error))).await;
        }
    }

    /// [`fail`](Self::fail) from a blocking thread of the runtime.
    pub fn blocking_fail(&mut self, error: StoreError) {
        tokio::runtime::Handle::current().block_on(self.fail(error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_takes_nothing_is_abandoned_after_the_stall_deadline() {
        let (mut sink, _stream) = ChunkSink::new(Duration::from_secs(30));
        let mut handed = 0;
        loop {
            sink.buf().extend_from_slice(&[b'x'; CHUNK_BYTES]);
            if !sink.flush_if_full().await {
                break;
            }
            handed += 1;
        }
        assert_eq!(handed, QUEUE_CHUNKS);
        assert!(sink.is_gone());
    }

    #[tokio::test]
    async fn chunks_arrive_in_order_and_small_lines_wait_for_a_full_chunk() {
        let (mut sink, stream) = ChunkSink::new(Duration::from_secs(5));
        sink.buf().extend_from_slice(b"a\n");
        assert!(sink.flush_if_full().await);
        sink.buf().extend_from_slice(b"b\n");
        assert!(sink.finish().await);
        drop(sink);
        let chunks: Vec<_> = stream.map(|c| c.unwrap()).collect().await;
        assert_eq!(chunks, vec![Bytes::from_static(b"a\nb\n")]);
    }

    #[tokio::test]
    async fn a_stream_whose_producer_stopped_early_ends_with_an_error() {
        let (mut sink, stream) = ChunkSink::new(Duration::from_secs(5));
        sink.buf().extend_from_slice(b"a\n");
        assert!(sink.flush().await);
        drop(sink);
        let items: Vec<_> = stream.collect().await;
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok() && items[1].is_err());
    }

    #[tokio::test]
    async fn a_reader_that_went_away_stops_the_producer() {
        let (mut sink, stream) = ChunkSink::new(Duration::from_secs(5));
        drop(stream);
        sink.buf().extend_from_slice(b"a\n");
        assert!(!sink.flush().await);
        assert!(sink.is_gone());
    }
}
