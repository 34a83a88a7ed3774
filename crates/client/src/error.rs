//! The client's errors, each with a message a person can act on.

use std::path::PathBuf;
use std::time::Duration;

use deltasync_engine::Error as EngineError;
pub use deltasync_engine::TimeoutKind;
use deltasync_protocol::wire::ErrorDetail;
use deltasync_protocol::{ChangeError, NameError};

/// Everything that can go wrong in the client. Each variant says whose fault
/// it is: the caller's (`Invalid`, `NoServer`), the local file's (`Local…`,
/// `NotADatabase`, `SchemaTooNew`), the network's (`Unreachable`, `Timeout`:
/// transient), or the server's (`Server`, `Protocol`, `Integrity`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The local database could not be read or written.
    #[error("local database error: {0}")]
    Local(#[from] rusqlite::Error),
    /// The local database file could not be created or read.
    #[error("cannot {action} the local database {}: {source}", path.display())]
    LocalIo {
        /// What was being done (`create`, `read`).
        action: &'static str,
        /// The database file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file at the database path exists but is not a deltasync database:
    /// opening it as a new device would hide whatever it held.
    #[error("{} is not a deltasync database: {reason}", path.display())]
    NotADatabase {
        /// The database file.
        path: PathBuf,
        /// What is wrong with it, and what to do.
        reason: String,
    },
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
    /// The replica holds another user's data than the token's.
    #[error("{}", EngineError::WrongUser { replica_user: replica_user.clone(), token_user: token_user.clone() })]
    WrongUser {
        /// The user the replica belongs to.
        replica_user: String,
        /// The user the token names.
        token_user: String,
    },
    /// A reset was refused because local changes are not synced.
    #[error("{}", EngineError::PendingChanges { pending: *pending, failed: *failed })]
    PendingChanges {
        /// Changes not yet in the confirmed state.
        pending: u64,
        /// Changes refused for good.
        failed: u64,
    },
    /// No server URL is known: pass one when opening the client.
    #[error(
        "no server URL: pass --server URL (or --store URL for a file store) once; it is kept in the local database"
    )]
    NoServer,
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
        /// The error code of the body (`unauthorized`, `unavailable`, …), or
        /// the client's own for what the body cannot say: `no_endpoint` for
        /// any 404, `not_deltasync` for an answer that did not come from
        /// deltasync (`unavailable` or `rate_limited` for a gateway's 502,
        /// 503, 504 or 429). See [`crate::answer`].
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
    /// The server's answer could not be understood. The server (or something
    /// between) is at fault; retrying gets the same answer until it changes.
    #[error("unexpected answer to {request}: {message}")]
    Protocol {
        /// The request whose answer it was (`POST /v1/sync`, `GET /v1/bootstrap`, …).
        request: &'static str,
        /// What was wrong with it (the parser's cause, or the rule it broke).
        message: String,
    },
    /// The server's state could not be verified even after re-bootstrapping.
    #[error("integrity check failed: {0}")]
    Integrity(String),
}

impl ClientError {
    /// How long the server asked the client to wait (`Retry-After`), when it did.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            ClientError::Server { retry_after: Some(secs), .. } => Some(std::time::Duration::from_secs(*secs)),
            _ => None,
        }
    }

    /// The short code printed by the command line (`{"error": code, …}`).
    pub fn code(&self) -> &str {
        match self {
            ClientError::Local(_)
            | ClientError::LocalIo { .. }
            | ClientError::NotADatabase { .. }
            | ClientError::LocalCorrupt(_)
            | ClientError::SchemaTooNew { .. } => "local_store",
            ClientError::Invalid(_) => "invalid_input",
            ClientError::NoServer => "no_server",
            ClientError::WrongUser { .. } => "wrong_user",
            ClientError::PendingChanges { .. } => "pending_changes",
            ClientError::Unreachable { .. } => "unreachable",
            ClientError::Timeout { .. } => "timeout",
            ClientError::Server { code, .. } => code,
            ClientError::FileStore { .. } => "file_store",
            ClientError::Protocol { .. } => "protocol",
            ClientError::Integrity(_) => "integrity",
        }
    }

    /// Whether this is a network-level or server-side failure that says nothing
    /// about the changes sent (these never count as a change's retry).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::Timeout { .. } => true,
            ClientError::Server { status, .. } => *status == 408 || *status == 429 || *status >= 500,
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

impl From<EngineError> for ClientError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Store(inner) => match inner.downcast::<ClientError>() {
                Ok(mine) => *mine,
                Err(other) => ClientError::LocalCorrupt(other.to_string()),
            },
            EngineError::LocalCorrupt(m) => ClientError::LocalCorrupt(m),
            EngineError::Invalid(m) => ClientError::Invalid(m),
            EngineError::NoServer => ClientError::NoServer,
            EngineError::WrongUser { replica_user, token_user } => ClientError::WrongUser { replica_user, token_user },
            EngineError::PendingChanges { pending, failed } => ClientError::PendingChanges { pending, failed },
            EngineError::Unreachable { url, message } => ClientError::Unreachable { url, message },
            EngineError::Timeout { kind, operation, after } => ClientError::Timeout { kind, operation, after },
            EngineError::Server { status, code, message, retry_after, details } => {
                ClientError::Server { status, code, message, retry_after, details }
            }
            EngineError::FileStore { url, message } => ClientError::FileStore { url, message },
            EngineError::Protocol { request, message } => ClientError::Protocol { request, message },
            EngineError::Integrity(m) => ClientError::Integrity(m),
            // The engine's error enum is non-exhaustive: a new kind shows its own message.
            other => ClientError::Invalid(other.to_string()),
        }
    }
}

/// The client's result type.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_names_what_was_cut_short_and_the_setting() {
        let e = ClientError::Timeout {
            kind: TimeoutKind::Request,
            operation: "POST /v1/sync".into(),
            after: Duration::from_secs(60),
        };
        assert_eq!(e.code(), "timeout");
        assert!(e.is_transient());
        let text = e.to_string();
        assert!(text.contains("POST /v1/sync") && text.contains("60 s"), "{text}");
        assert!(text.contains("ClientOptions::request_timeout"), "{text}");
    }

    #[test]
    fn a_408_is_transient_and_a_400_is_not() {
        let server = |status| ClientError::Server {
            status,
            code: "x".into(),
            message: String::new(),
            retry_after: None,
            details: Vec::new(),
        };
        assert!(server(408).is_transient());
        assert!(server(502).is_transient());
        assert!(!server(400).is_transient());
        assert!(!server(413).is_transient());
    }
}
