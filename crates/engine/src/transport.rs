//! The transport: how the engine reaches a deltasync server (protocol §6).
//! The native client speaks HTTP with reqwest, a browser with `fetch`; tests
//! may call a server in-process.

use std::time::Duration;

use deltasync_protocol::Change;
use deltasync_protocol::wire::{ConflictsResponse, PullResponse, StatusResponse, SyncResponse};
use serde::Serialize;

use crate::error::Result;

/// `POST /v1/sync`, as named in errors.
pub const SYNC: &str = "POST /v1/sync";
/// `GET /v1/pull`, as named in errors.
pub const PULL: &str = "GET /v1/pull";
/// `GET /v1/status`, as named in errors.
pub const STATUS: &str = "GET /v1/status";
/// `GET /v1/bootstrap`, as named in errors.
pub const BOOTSTRAP: &str = "GET /v1/bootstrap";
/// `GET /v1/conflicts`, as named in errors.
pub const CONFLICTS: &str = "GET /v1/conflicts";
/// The name of the live socket's upgrade request.
pub const LIVE: &str = "GET /v1/live";

/// The body of `POST /v1/sync`.
#[derive(Debug, Serialize)]
pub struct SyncBody<'a> {
    /// The syncing device.
    pub device_id: &'a str,
    /// The device's cursor.
    pub cursor: u64,
    /// The changes to push.
    pub changes: &'a [Change],
    /// The most seqs the answer may cover (the server's default, 1000, when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

/// A connection to one deltasync server. Errors are the engine's: network
/// failures as [`crate::Error::Unreachable`] or [`crate::Error::Timeout`], error
/// answers as [`crate::Error::Server`], unreadable answers as
/// [`crate::Error::Protocol`].
#[allow(async_fn_in_trait)] // Send-ness follows the concrete transport.
pub trait Transport {
    /// A streamed answer's body.
    type Stream: ByteStream;

    /// The server's base URL, for messages.
    fn base(&self) -> &str;
    /// The bearer token requests carry now, if any (a transport may renew it).
    fn token(&self) -> Option<String>;

    /// `GET /v1/status`.
    /// (`device_id` absent: the server records no device, as when asking whose a token is.)
    async fn status(&self, device_id: Option<&str>) -> Result<StatusResponse>;
    /// `POST /v1/sync`.
    async fn sync(&self, body: &SyncBody<'_>) -> Result<SyncResponse>;
    /// `GET /v1/pull`, waiting up to `wait` for a change when there is none.
    async fn pull(&self, device_id: &str, cursor: u64, limit: u64, wait: Duration) -> Result<PullResponse>;
    /// `GET /v1/bootstrap`: the answer's head; the body is read from the stream.
    async fn bootstrap(&self, device_id: &str) -> Result<Self::Stream>;
    /// `GET /v1/conflicts`.
    async fn conflicts(&self, since: u64, limit: Option<u64>) -> Result<ConflictsResponse>;
}

/// A streamed body, read chunk by chunk.
#[allow(async_fn_in_trait)]
pub trait ByteStream {
    /// The next chunk: `None` at the end, an error when the stream broke or stalled.
    async fn next_chunk(&mut self) -> Option<Result<Vec<u8>>>;
}

/// The transport of a device that has no server: it cannot be made, so an
/// `Engine<_, NoServer, _>` works offline only (every server call answers
/// [`crate::Error::NoServer`]).
#[derive(Debug, Clone, Copy)]
pub enum NoServer {}

impl ByteStream for NoServer {
    async fn next_chunk(&mut self) -> Option<Result<Vec<u8>>> {
        match *self {}
    }
}

impl Transport for NoServer {
    type Stream = NoServer;

    fn base(&self) -> &str {
        match *self {}
    }

    fn token(&self) -> Option<String> {
        match *self {}
    }

    async fn status(&self, _: Option<&str>) -> Result<StatusResponse> {
        match *self {}
    }

    async fn sync(&self, _: &SyncBody<'_>) -> Result<SyncResponse> {
        match *self {}
    }

    async fn pull(&self, _: &str, _: u64, _: u64, _: Duration) -> Result<PullResponse> {
        match *self {}
    }

    async fn bootstrap(&self, _: &str) -> Result<NoServer> {
        match *self {}
    }

    async fn conflicts(&self, _: u64, _: Option<u64>) -> Result<ConflictsResponse> {
        match *self {}
    }
}
