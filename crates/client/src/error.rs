//! The client's errors, each with a message a person can act on.

use deltasync_protocol::wire::ErrorDetail;
use deltasync_protocol::{ChangeError, NameError};

/// Everything that can go wrong in the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The local database could not be read or written.
    #[error("local database error: {0}")]
    Local(#[from] rusqlite::Error),
    /// The local database holds something this version cannot read.
    #[error("local database is damaged or from another program: {0}")]
    LocalCorrupt(String),
    /// The local database was written by a newer deltasync.
    #[error("local database has schema version {found}, this client knows up to {known}: upgrade deltasync")]
    SchemaTooNew {
        /// The database's schema version.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// A name or value given by the caller is not valid.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// No server URL is known: pass one when opening the client.
    #[error("no server URL: pass --server URL (or set DELTASYNC_SERVER) once; it is kept in the local database")]
    NoServer,
    /// The server could not be reached (connection refused, reset, timed out).
    #[error("server unreachable at {url}: {message}")]
    Unreachable {
        /// The URL that failed.
        url: String,
        /// What the network layer said.
        message: String,
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
    /// The server's answer could not be understood.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// The server's state could not be verified even after re-bootstrapping.
    #[error("integrity check failed: {0}")]
    Integrity(String),
}

impl ClientError {
    /// The short code printed by the command line (`{"error": code, …}`).
    pub fn code(&self) -> &str {
        match self {
            ClientError::Local(_) | ClientError::LocalCorrupt(_) | ClientError::SchemaTooNew { .. } => "local_store",
            ClientError::Invalid(_) => "invalid_input",
            ClientError::NoServer => "no_server",
            ClientError::Unreachable { .. } => "unreachable",
            ClientError::Server { code, .. } => code,
            ClientError::Protocol(_) => "protocol",
            ClientError::Integrity(_) => "integrity",
        }
    }

    /// Whether this is a network-level or server-side failure that says nothing
    /// about the changes sent (these never count as a change's retry).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Server { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

impl From<NameError> for ClientError {
    fn from(e: NameError) -> Self {
        ClientError::Invalid(e.to_string())
    }
}

impl From<ChangeError> for ClientError {
    fn from(e: ChangeError) -> Self {
        ClientError::Invalid(e.to_string())
    }
}

/// The client's result type.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
