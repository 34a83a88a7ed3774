//! The socket of one connection, as hyper sees it: reads report activity,
//! writes that make no progress for `write_timeout` fail, and hyper's own
//! bodiless error answers become the protocol's JSON errors.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::activity::Activity;

/// A socket wrapped for one connection. See the module documentation.
pub struct WatchedSocket<T> {
    inner: T,
    activity: Arc<Activity>,
    write_timeout: Duration,
    /// Running while a write is blocked because the client does not read.
    stalled: Option<Pin<Box<Sleep>>>,
    /// A JSON answer being written in place of hyper's bodiless one:
    /// the bytes, how many are written, and how many of hyper's bytes they stand for.
    replacement: Option<(Vec<u8>, usize, usize)>,
}

impl<T> WatchedSocket<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, activity: Arc<Activity>, write_timeout: Duration) -> Self {
        WatchedSocket { inner, activity, write_timeout, stalled: None, replacement: None }
    }

    /// Fails the write once it has been blocked for `write_timeout`.
    fn on_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let timeout = self.write_timeout;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {} s (write_timeout_secs)", timeout.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Hyper answers requests it cannot parse with a bodiless 400, 414 or 431
/// before any handler runs. Our own answers always carry a JSON body, so an
/// error status with `content-length: 0` can only be one of those.
fn json_for_bodiless_error(head: &[u8]) -> Option<Vec<u8>> {
    let (status, reason, message) = match head.get(..13)? {
        b"HTTP/1.1 400 " => {
            (400, "Bad Request", "the request is not valid HTTP/1.1 (request line or a header is malformed)")
        }
        b"HTTP/1.1 414 " => {
            (414, "URI Too Long", "the request's URI (path and query) is longer than the server accepts")
        }
        b"HTTP/1.1 431 " => (
            431,
            "Request Header Fields Too Large",
            "the request's header is larger than the server accepts (64 KiB, at most 100 fields)",
        ),
        _ => return None,
    };
    let lower = head.to_ascii_lowercase();
    if !lower.windows(21).any(|w| w == b"\r\ncontent-length: 0\r\n") || !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    let body = serde_json::json!({"error": "invalid_request", "message": message}).to_string();
    Some(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchedSocket<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.activity.bytes_received();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> WatchedSocket<T> {
    /// Writes the pending replacement; ready with hyper's length once all of it is out.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            let Some((bytes, written, stands_for)) = self.replacement.as_mut() else {
                unreachable!("called with a replacement")
            };
            if *written == bytes.len() {
                let n = *stands_for;
                self.replacement = None;
                return Poll::Ready(Ok(n));
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    if let Some((_, written, _)) = self.replacement.as_mut() {
                        *written += n;
                    }
                    self.stalled = None;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return self.on_pending(cx),
            }
        }
    }

    fn finish_write(&mut self, cx: &mut Context<'_>, result: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match result {
            Poll::Pending => self.on_pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedSocket<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.replacement.is_none()
            && let Some(json) = json_for_bodiless_error(buf)
        {
            this.replacement = Some((json, 0, buf.len()));
        }
        if this.replacement.is_some() {
            return this.poll_replacement(cx);
        }
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.finish_write(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.replacement.is_none()
            && let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && let Some(json) = json_for_bodiless_error(first)
        {
            this.replacement = Some((json, 0, first.len()));
        }
        if this.replacement.is_some() {
            return this.poll_replacement(cx);
        }
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.finish_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.on_pending(cx).map_ok(|_| ()),
            ready => {
                this.stalled = None;
                ready
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bodiless_parse_errors_are_replaced() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 22:00:00 GMT\r\n\r\n";
        let json = String::from_utf8(json_for_bodiless_error(hyper_431).unwrap()).unwrap();
        assert!(json.starts_with("HTTP/1.1 431 "), "{json}");
        let body = json.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "invalid_request");
        assert!(json.contains(&format!("content-length: {}", body.len())));

        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 57\r\n\r\n";
        assert!(json_for_bodiless_error(ours).is_none());
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert!(json_for_bodiless_error(ok).is_none());
        assert!(json_for_bodiless_error(b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n").is_some());
    }
}
