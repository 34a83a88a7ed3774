//! `ApiError`: every error answer of the HTTP API (§8), as JSON.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use deltasync_protocol::wire::{ErrorBody, ErrorDetail};

use crate::store::StoreError;

/// The longest request URI (path and query) the server reads; a longer one is answered 414.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// An error answer. 4xx say what to fix; 5xx are logged and hide internals.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// 400: the request is malformed (caller's fault).
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
        /// The offending changes.
        details: Option<Vec<ErrorDetail>>,
    },
    /// 401: the token is missing, malformed, forged or expired (caller's fault).
    #[error("{0}")]
    Unauthorized(String),
    /// 404: no such path.
    #[error("no such endpoint: {0}")]
    NotFound(String),
    /// 405: the path exists but not with this method.
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The path.
        path: String,
    },
    /// 414: the request's URI (path and query) is longer than the server reads (caller's fault).
    #[error("the request's URI is {0} bytes; the server reads at most {max} (path and query)", max = MAX_URI_BYTES)]
    UriTooLong(usize),
    /// 408: the request body did not arrive within its deadline (caller's link is too slow, or it stalled).
    #[error("{0}")]
    RequestTimeout(String),
    /// 410: the cursor is below the horizon or above the head; the client must bootstrap.
    #[error("{0}")]
    ResetRequired(String),
    /// 413: a configured limit was exceeded (caller's fault).
    #[error("{message}")]
    PayloadTooLarge {
        /// Which limit, with its configuration key and value.
        message: String,
        /// The offending changes.
        details: Option<Vec<ErrorDetail>>,
    },
    /// 429: this user asks for more than the server gives one user at once (transient).
    #[error("{message}")]
    RateLimited {
        /// Which limit, with its configuration key and value.
        message: String,
        /// Seconds after which a retry may succeed (`Retry-After`).
        retry_after_secs: u64,
    },
    /// 503: the database is unavailable or the server is shutting down (transient).
    #[error("{0}")]
    Unavailable(String),
    /// 500: a bug or a broken disk; details are logged, not sent.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 with a message.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::InvalidRequest { message: message.into(), details: None }
    }

    /// The HTTP status and error code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidRequest { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::UriTooLong(_) => (StatusCode::URI_TOO_LONG, "invalid_request"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::ResetRequired(_) => (StatusCode::GONE, "reset_required"),
            ApiError::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => ApiError::Unavailable(format!("{e}; retry later")),
            StoreError::ShuttingDown => ApiError::Unavailable("the server is shutting down; retry later".into()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// What an error answer said, kept on the response for the request log.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The error code (`rate_limited`).
    pub code: &'static str,
    /// The message sent.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let retry_after = match &self {
            ApiError::RateLimited { retry_after_secs, .. } => {
                metrics::counter!(crate::telemetry::RATE_LIMITED).increment(1);
                Some(*retry_after_secs)
            }
            ApiError::Unavailable(_) => Some(1),
            _ => None,
        };
        let (message, details) = match self {
            ApiError::Internal(msg) => {
                tracing::error!(error = %msg, "internal error");
                ("the server failed to handle the request; the failure is logged".to_owned(), None)
            }
            ApiError::Unavailable(msg) => {
                tracing::warn!(error = %msg, "unavailable");
                (msg, None)
            }
            ApiError::InvalidRequest { message, details } | ApiError::PayloadTooLarge { message, details } => {
                (message, details)
            }
            other => (other.to_string(), None),
        };
        let reason = Refusal { code, message: message.clone() };
        let mut response = (status, Json(ErrorBody { error: code.to_owned(), message, details })).into_response();
        response.extensions_mut().insert(reason);
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body is not read: the connection cannot carry another request.
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
