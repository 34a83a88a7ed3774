//! The HTTP side: the endpoints of protocol §6, with errors mapped to [`ClientError`].
//!
//! Every request has a deadline, so that a server (or a proxy) that answers
//! slowly or not at all cannot hold a sync for minutes: a whole answer must
//! arrive within [`HttpOptions::request_timeout`] (a long poll adds its wait),
//! and a streamed answer (bootstrap) may go silent for at most
//! [`HttpOptions::stall_timeout`].

use std::time::Duration;

use bytes::Bytes;
use deltasync_protocol::wire::{ErrorBody, PullResponse, StatusResponse, SyncResponse};
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;

use deltasync_engine::transport::{BOOTSTRAP, ByteStream, CONFLICTS, PULL, STATUS, SYNC, SyncBody, Transport};
use deltasync_engine::{Error, Result, TimeoutKind};
use deltasync_protocol::wire::ConflictsResponse;

/// How long a pooled connection may sit idle before it is closed: below the
/// server's keep-alive (60 s by default), so the client never reuses a
/// connection just as the server closes it.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long establishing a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most characters of a foreign error body quoted in a message.
const EXCERPT_CHARS: usize = 200;

/// How the HTTP client talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpOptions {
    /// Speak HTTP/2 to `http://` servers directly (h2c with prior knowledge).
    pub http2_prior_knowledge: bool,
    /// The longest a request may take, from connecting to the last byte of
    /// its answer (a long poll gets its wait on top).
    pub request_timeout: Duration,
    /// The longest a streamed answer may send nothing.
    pub stall_timeout: Duration,
}

/// A connection to one deltasync server.
#[derive(Clone, Debug)]
pub struct ServerApi {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    options: HttpOptions,
}

impl ServerApi {
    /// A client for the server at `base` (`http://host:port`, trailing slash allowed).
    pub fn new(base: &str, token: Option<String>, options: HttpOptions) -> Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Invalid(format!("server URL must start with http:// or https://, got {base:?}")));
        }
        let mut builder =
            reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).pool_idle_timeout(POOL_IDLE_TIMEOUT);
        if options.http2_prior_knowledge {
            builder = builder.http2_prior_knowledge();
        }
        let http = builder.build().map_err(|e| Error::Invalid(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self { http, base, token, options })
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Maps a network-level error of `request`, given the time limit it ran under.
    fn network_error(&self, request: &'static str, limit: Duration, e: reqwest::Error) -> Error {
        if e.is_timeout() {
            return Error::Timeout { kind: TimeoutKind::Request, operation: request.to_owned(), after: limit };
        }
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        Error::Unreachable { url: self.base.clone(), message }
    }

    /// Sends `req` (named `request` in errors) and turns an error answer into
    /// [`Error::Server`]. With `limit`, the whole exchange, the answer's
    /// body included, must finish within it.
    async fn send(
        &self,
        request: &'static str,
        req: reqwest::RequestBuilder,
        limit: Duration,
    ) -> Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| self.network_error(request, limit, e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let bytes = resp.bytes().await.map_err(|e| self.network_error(request, limit, e))?;
        let (code, message, details) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => (body.error, body.message, body.details.unwrap_or_default()),
            Err(_) => (code_for_status(status).to_owned(), foreign_message(status, &self.base, &bytes), Vec::new()),
        };
        Err(Error::Server { status, code, message, retry_after, details })
    }

    /// Sends a request whose whole answer is one JSON value, within `limit`.
    async fn json<T: DeserializeOwned>(
        &self,
        request: &'static str,
        req: reqwest::RequestBuilder,
        limit: Duration,
    ) -> Result<T> {
        let resp = self.send(request, req.timeout(limit), limit).await?;
        let bytes = resp.bytes().await.map_err(|e| self.network_error(request, limit, e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
            request,
            message: format!("cannot read the {}-byte answer: {e}", bytes.len()),
        })
    }
}

impl Transport for ServerApi {
    type Stream = BodyStream;

    fn base(&self) -> &str {
        &self.base
    }

    fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    async fn sync(&self, body: &SyncBody<'_>) -> Result<SyncResponse> {
        let bytes = serde_json::to_vec(body).expect("sync body serialises");
        let req = self
            .request(reqwest::Method::POST, "/v1/sync")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(bytes);
        self.json(SYNC, req, self.options.request_timeout).await
    }

    async fn pull(&self, device_id: &str, cursor: u64, limit: u64, wait: Duration) -> Result<PullResponse> {
        let wait_s = wait.as_secs().to_string();
        let req = self.request(reqwest::Method::GET, "/v1/pull").query(&[
            ("device_id", device_id),
            ("cursor", &cursor.to_string()),
            ("limit", &limit.to_string()),
            ("wait", &wait_s),
        ]);
        self.json(PULL, req, self.options.request_timeout + Duration::from_secs(wait.as_secs())).await
    }

    async fn status(&self, device_id: Option<&str>) -> Result<StatusResponse> {
        let mut req = self.request(reqwest::Method::GET, "/v1/status");
        if let Some(device_id) = device_id {
            req = req.query(&[("device_id", device_id)]);
        }
        self.json(STATUS, req, self.options.request_timeout).await
    }

    /// The answer's head within the request timeout; its body may then go
    /// silent for at most the stall timeout at a time.
    async fn bootstrap(&self, device_id: &str) -> Result<BodyStream> {
        let limit = self.options.request_timeout;
        let req = self.request(reqwest::Method::GET, "/v1/bootstrap").query(&[("device_id", device_id)]);
        let resp = match tokio::time::timeout(limit, self.send(BOOTSTRAP, req, limit)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(Error::Timeout {
                    kind: TimeoutKind::Request,
                    operation: BOOTSTRAP.to_owned(),
                    after: limit,
                });
            }
        };
        Ok(BodyStream { api: self.clone(), request: BOOTSTRAP, stream: Box::pin(resp.bytes_stream()) })
    }

    async fn conflicts(&self, since: u64, limit: Option<u64>) -> Result<ConflictsResponse> {
        let mut query = vec![("since", since.to_string())];
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        let req = self.request(reqwest::Method::GET, "/v1/conflicts").query(&query);
        self.json(CONFLICTS, req, self.options.request_timeout).await
    }
}

/// A streamed answer's body, read chunk by chunk under the stall timeout.
pub struct BodyStream {
    api: ServerApi,
    request: &'static str,
    stream: std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
}

impl ByteStream for BodyStream {
    /// The next chunk: `None` at the end, a [`TimeoutKind::Stall`] error when
    /// nothing arrives for the stall timeout.
    async fn next_chunk(&mut self) -> Option<Result<Vec<u8>>> {
        let limit = self.api.options.stall_timeout;
        match tokio::time::timeout(limit, self.stream.next()).await {
            Ok(next) => {
                next.map(|chunk| chunk.map(Vec::from).map_err(|e| self.api.network_error(self.request, limit, e)))
            }
            Err(_) => Some(Err(Error::Timeout {
                kind: TimeoutKind::Stall,
                operation: format!("{} (streaming)", self.request),
                after: limit,
            })),
        }
    }
}

/// The documented error code an HTTP status stands for, used when an error
/// answer's body is not a deltasync error (a proxy's or gateway's own page).
pub fn code_for_status(status: u16) -> &'static str {
    match status {
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        410 => "reset_required",
        413 => "payload_too_large",
        429 => "rate_limited",
        502..=504 => "unavailable",
        400..=499 => "invalid_request",
        _ => "internal",
    }
}

/// The message for an error answer whose body did not come from deltasync,
/// with a short excerpt of that body (control characters and runs of white
/// space shown as one space).
fn foreign_message(status: u16, base: &str, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut excerpt = String::new();
    for word in text.split(|c: char| c.is_whitespace() || c.is_control()).filter(|w| !w.is_empty()) {
        if !excerpt.is_empty() {
            excerpt.push(' ');
        }
        excerpt.push_str(word);
        if excerpt.chars().count() > EXCERPT_CHARS {
            break;
        }
    }
    let excerpt = if excerpt.chars().count() > EXCERPT_CHARS {
        format!("{}…", excerpt.chars().take(EXCERPT_CHARS).collect::<String>())
    } else {
        excerpt
    };
    let quoted = if excerpt.is_empty() { "an empty body".to_owned() } else { format!("{excerpt:?}") };
    format!(
        "HTTP {status} from {base} with a body that did not come from deltasync (a proxy or gateway in between?): {quoted}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_error_answers_map_to_documented_codes_by_status() {
        let cases = [
            (502, "unavailable"),
            (503, "unavailable"),
            (504, "unavailable"),
            (429, "rate_limited"),
            (401, "unauthorized"),
            (408, "request_timeout"),
            (413, "payload_too_large"),
            (404, "not_found"),
            (400, "invalid_request"),
            (418, "invalid_request"),
            (500, "internal"),
            (501, "internal"),
            (599, "internal"),
        ];
        for (status, code) in cases {
            assert_eq!(code_for_status(status), code, "status {status}");
        }
    }

    #[test]
    fn a_foreign_body_is_quoted_short_and_on_one_line() {
        let page = format!("<html>\r\n<head><title>502 Bad Gateway</title></head>\n<body>{}</body>", "x ".repeat(500));
        let m = foreign_message(502, "http://h:1", page.as_bytes());
        assert!(m.starts_with("HTTP 502 from http://h:1 with a body that did not come from deltasync"), "{m}");
        assert!(m.contains("<head><title>502 Bad Gateway</title></head>"), "{m}");
        assert!(!m.contains('\n') && !m.contains('\r'), "{m}");
        assert!(m.chars().count() < 400, "{} characters: {m}", m.chars().count());
        assert!(m.ends_with("…\""), "{m}");
        assert!(foreign_message(503, "http://h:1", b"").ends_with("an empty body"));
    }
}
