//! The engine's errors, each with a message a person can act on.

use std::time::Duration;

use deltasync_protocol::wire::ErrorDetail;
use deltasync_protocol::{ChangeError, NameError};

/// Everything that can go wrong in the engine. Each variant says whose fault
/// it is: the caller's (`Invalid`, `NoServer`, `WrongUser`, `PendingChanges`),
/// the local store's (`Store`, `LocalCorrupt`), the network's (`Unreachable`,
/// `Timeout`: transient), or the server's (`Server`, `Protocol`, `Integrity`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The local store failed to read or write.
    #[error("local store error: {0}")]
    Store(Box<dyn std::error::Error + Send + Sync>),
    /// The local store holds something this version cannot read.
    #[error("local database is damaged or from another program: {0}")]
    LocalCorrupt(String),
    /// A name or value given by the caller is not valid.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// No server is known: pass one when opening the client.
    #[error(
        "no server URL: pass --server URL (or --store URL for a file store) once; it is kept in the local database"
    )]
    NoServer,
    /// The replica holds another user's data than the token's: syncing would
    /// mix two users' datasets.
    #[error(
        "this replica holds the data of user {replica_user:?}, but the token is for user {token_user:?}: nothing was \
         sent. Use a token of {replica_user:?}, or start over for {token_user:?} with `deltasync client --db PATH \
         reset` (SDK: `Client::reset`) after `export-pending` if changes are pending"
    )]
    WrongUser {
        /// The user the replica belongs to.
        replica_user: String,
        /// The user the token (or the server's answer) names.
        token_user: String,
    },
    /// A reset was refused because local changes are not synced.
    #[error(
        "{pending} local change(s) are not synced and {failed} were refused by the server; a reset would lose them. \
         Save them with `deltasync client --db PATH export-pending > pending.json` (SDK: `export_pending`), then \
         reset with --force (SDK: `reset(true)`)"
    )]
    PendingChanges {
        /// Changes not yet in the confirmed state.
        pending: u64,
        /// Changes refused for good.
        failed: u64,
    },
    /// The server could not be reached (connection refused, reset, timed out).
    #[error("server unreachable at {url}: {message}")]
    Unreachable {
        /// The URL that failed.
        url: String,
        /// What the network layer said.
        message: String,
    },
    /// A request or a whole sync took longer than its limit. Transient: nothing
    /// local was lost, and the next sync starts where this one stopped.
    #[error("{operation} did not finish within {} s ({}); nothing local was lost", after.as_secs_f64(), kind.setting())]
    Timeout {
        /// Which limit ran out.
        kind: TimeoutKind,
        /// What was cut short (`POST /v1/sync`, `sync`, …).
        operation: String,
        /// The limit.
        after: Duration,
    },
    /// The server answered with an error.
    #[error("server answered {status} {code}: {message}")]
    Server {
        /// The HTTP status.
        status: u16,
        /// The error code of the body (`unauthorized`, `unavailable`, …).
        code: String,
        /// The server's message.
        message: String,
        /// Seconds to wait, from `Retry-After`, when given.
        retry_after: Option<u64>,
        /// The offending changes, when the server named them.
        details: Vec<ErrorDetail>,
    },
    /// A file store (a folder, WebDAV, S3) cannot be synced through safely,
    /// or refused an operation for a reason retrying does not mend.
    #[error("file store {url}: {message}")]
    FileStore {
        /// The store's URL, without credentials.
        url: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// The server's answer could not be understood.
    #[error("unexpected answer to {request}: {message}")]
    Protocol {
        /// The request whose answer it was (`POST /v1/sync`, `GET /v1/bootstrap`, …).
        request: &'static str,
        /// What was wrong with it.
        message: String,
    },
    /// The server's state could not be verified even after re-bootstrapping.
    #[error("integrity check failed: {0}")]
    Integrity(String),
}

/// Which time limit a [`Error::Timeout`] ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeoutKind {
    /// One request got no complete answer within `ClientOptions::request_timeout`.
    Request,
    /// A streamed answer (bootstrap) sent nothing for `ClientOptions::stall_timeout`.
    Stall,
    /// A whole sync took longer than `ClientOptions::sync_timeout`.
    Sync,
}

impl TimeoutKind {
    /// The setting that holds the limit.
    pub fn setting(self) -> &'static str {
        match self {
            TimeoutKind::Request => "ClientOptions::request_timeout",
            TimeoutKind::Stall => "ClientOptions::stall_timeout",
            TimeoutKind::Sync => "ClientOptions::sync_timeout",
        }
    }
}

impl Error {
    /// How long the server asked the client to wait (`Retry-After`), when it did.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::Server { retry_after: Some(secs), .. } => Some(std::time::Duration::from_secs(*secs)),
            _ => None,
        }
    }

    /// The short code printed by the command line (`{"error": code, …}`).
    pub fn code(&self) -> &str {
        match self {
            Error::Store(_) | Error::LocalCorrupt(_) => "local_store",
            Error::Invalid(_) => "invalid_input",
            Error::NoServer => "no_server",
            Error::WrongUser { .. } => "wrong_user",
            Error::PendingChanges { .. } => "pending_changes",
            Error::Unreachable { .. } => "unreachable",
            Error::Timeout { .. } => "timeout",
            Error::Server { code, .. } => code,
            Error::FileStore { .. } => "file_store",
            Error::Protocol { .. } => "protocol",
            Error::Integrity(_) => "integrity",
        }
    }

    /// Whether this is a network-level or server-side failure that says nothing
    /// about the changes sent (these never count as a change's retry).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::Timeout { .. } => true,
            Error::Server { status, .. } => *status == 408 || *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// Whether this is the server's `410 reset_required`: the device must
    /// re-bootstrap (not a foreign page that happens to have status 410).
    pub fn is_reset_required(&self) -> bool {
        matches!(self, Error::Server { status: 410, code, .. } if code == "reset_required")
    }

    /// Whether the server refused the request's changes as too large or
    /// invalid (a deltasync 400 or 413, not a foreign page).
    pub fn is_refused_request(&self) -> bool {
        matches!(self, Error::Server { status: 400 | 413, code, .. } if code == "invalid_request" || code == "payload_too_large")
    }

    /// A store's own error, kept whole for the adapter to recognise.
    pub fn store(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Store(Box::new(e))
    }
}

impl From<NameError> for Error {
    fn from(e: NameError) -> Self {
        Error::Invalid(e.to_string())
    }
}

impl From<ChangeError> for Error {
    fn from(e: ChangeError) -> Self {
        Error::Invalid(e.to_string())
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
