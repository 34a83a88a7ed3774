//! Where a device syncs to: a deltasync server over HTTP, or a file store
//! (a folder, WebDAV, S3) with no server. The engine sees one [`Transport`].

use std::time::Duration;

use deltasync_engine::transport::{ByteStream, SyncBody, Transport};
use deltasync_engine::{Error, Result};
use deltasync_protocol::wire::{ConflictsResponse, PullResponse, StatusResponse, SyncResponse};

use crate::filestore::FileStoreApi;
use crate::filestore::transport::BodyChunks;
use crate::http::{BodyStream, ServerApi};

/// A server or a file store.
#[derive(Debug)]
pub enum Remote {
    /// A deltasync server.
    Server(ServerApi),
    /// A file store, synced through with no server.
    Files(Box<FileStoreApi>),
}

impl Remote {
    /// The server, when this is one (the live channel needs one).
    pub fn server(&self) -> Result<&ServerApi> {
        match self {
            Remote::Server(api) => Ok(api),
            Remote::Files(_) => Err(Error::Server {
                status: 404,
                code: "no_endpoint".into(),
                message: "a file store has no live channel: devices find new changes by polling it".into(),
                retry_after: None,
                details: Vec::new(),
            }),
        }
    }
}

/// A bootstrap body from either.
pub enum RemoteStream {
    /// A server's streamed answer.
    Server(BodyStream),
    /// A file store's snapshot, built in memory.
    Files(BodyChunks),
}

impl ByteStream for RemoteStream {
    async fn next_chunk(&mut self) -> Option<Result<Vec<u8>>> {
        match self {
            RemoteStream::Server(s) => s.next_chunk().await,
            RemoteStream::Files(s) => s.next_chunk().await,
        }
    }
}

impl Transport for Remote {
    type Stream = RemoteStream;

    fn base(&self) -> &str {
        match self {
            Remote::Server(a) => a.base(),
            Remote::Files(a) => a.base(),
        }
    }

    fn token(&self) -> Option<String> {
        match self {
            Remote::Server(a) => a.token(),
            Remote::Files(a) => a.token(),
        }
    }

    async fn status(&self, device_id: Option<&str>) -> Result<StatusResponse> {
        match self {
            Remote::Server(a) => a.status(device_id).await,
            Remote::Files(a) => a.status(device_id).await,
        }
    }

    async fn sync(&self, body: &SyncBody<'_>) -> Result<SyncResponse> {
        match self {
            Remote::Server(a) => a.sync(body).await,
            Remote::Files(a) => a.sync(body).await,
        }
    }

    async fn pull(&self, device_id: &str, cursor: u64, limit: u64, wait: Duration) -> Result<PullResponse> {
        match self {
            Remote::Server(a) => a.pull(device_id, cursor, limit, wait).await,
            Remote::Files(a) => a.pull(device_id, cursor, limit, wait).await,
        }
    }

    async fn bootstrap(&self, device_id: &str) -> Result<RemoteStream> {
        match self {
            Remote::Server(a) => a.bootstrap(device_id).await.map(RemoteStream::Server),
            Remote::Files(a) => a.bootstrap(device_id).await.map(RemoteStream::Files),
        }
    }

    async fn conflicts(&self, since: u64, limit: Option<u64>) -> Result<ConflictsResponse> {
        match self {
            Remote::Server(a) => a.conflicts(since, limit).await,
            Remote::Files(a) => a.conflicts(since, limit).await,
        }
    }
}
