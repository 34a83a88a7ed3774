//! The HTTP side: the endpoints of protocol §6, with errors mapped to [`ClientError`].
//!
//! Every request has a deadline, so that a server (or a proxy) that answers
//! slowly or not at all cannot hold a sync for minutes: a whole answer must
//! arrive within [`HttpOptions::request_timeout`] (a long poll adds its wait),
//! and a streamed answer (bootstrap) may go silent for at most
//! [`HttpOptions::stall_timeout`].

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use deltasync_protocol::wire::{PullResponse, StatusResponse, SyncResponse};
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;

use deltasync_engine::answer;
use deltasync_engine::requests::{self, Request};
use deltasync_engine::transport::{ByteStream, SyncBody, Transport};
use deltasync_engine::{Error, Result, TimeoutKind};
use deltasync_protocol::wire::ConflictsResponse;

/// How long a pooled connection may sit idle before it is closed: below the
/// server's keep-alive (60 s by default), so the client never reuses a
/// connection just as the server closes it.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long establishing a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of an answer that cannot be a deltasync error is read, to quote its start.
const FOREIGN_BODY_BYTES: usize = 64 * 1024;

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

/// Where a client gets a fresh bearer token: called when the server refuses
/// the one it has (401), or has none. Ok is the token; Err says why there is
/// none (the sync then fails `unauthorized` with that reason).
pub type TokenProvider =
    Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, std::result::Result<String, String>> + Send + Sync>;

/// A connection to one deltasync server.
#[derive(Clone)]
pub struct ServerApi {
    http: reqwest::Client,
    base: String,
    /// The token requests carry now: the one given, or the provider's latest.
    token: Arc<RwLock<Option<String>>>,
    provider: Option<TokenProvider>,
    options: HttpOptions,
}

impl std::fmt::Debug for ServerApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerApi")
            .field("base", &self.base)
            .field("token_provider", &self.provider.is_some())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
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
        Ok(Self { http, base, token: Arc::new(RwLock::new(token)), provider: None, options })
    }

    /// The same, asking `provider` for a fresh token whenever the server
    /// answers 401: once per request, which is then sent again once with the
    /// new token (never more, so a provider that hands out bad tokens cannot
    /// make a loop).
    pub fn with_token_provider(mut self, provider: Option<TokenProvider>) -> Self {
        self.provider = provider;
        self
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The reqwest request for one of the engine's [`requests`], with the
    /// token; its name, and the deadline of the whole exchange.
    fn build(&self, r: Request) -> (reqwest::RequestBuilder, &'static str, Duration) {
        let method = if r.method == "POST" { reqwest::Method::POST } else { reqwest::Method::GET };
        let mut req = self.http.request(method, format!("{}{}", self.base, r.path));
        if let Some(t) = self.token.read().expect("token lock").as_deref() {
            req = req.bearer_auth(t);
        }
        if let Some(body) = r.body {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        }
        (req, r.name, self.options.request_timeout + r.held_for)
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

    /// Builds and sends `r` (with `timeout`, the whole exchange's deadline
    /// on the request), asking the token provider once for a fresh token and
    /// sending it again once when the server answers 401.
    async fn exchange(&self, r: Request, timeout: bool) -> Result<(reqwest::Response, &'static str, Duration)> {
        let again = self.provider.is_some().then(|| r.clone());
        let attempt = |r: Request| {
            let (req, request, limit) = self.build(r);
            let req = if timeout { req.timeout(limit) } else { req };
            async move { self.send(request, req, limit).await.map(|resp| (resp, request, limit)) }
        };
        match (attempt(r).await, again) {
            (Err(Error::Server { status: 401, .. }), Some(r)) => {
                self.renew_token().await?;
                attempt(r).await
            }
            (outcome, _) => outcome,
        }
    }

    /// Asks the token provider for a fresh token and uses it from now on.
    async fn renew_token(&self) -> Result<()> {
        let Some(provider) = &self.provider else { return Ok(()) };
        let fresh = provider().await.map_err(|why| Error::Server {
            status: 401,
            code: "unauthorized".into(),
            message: format!("the server refused the token, and the token provider gave no new one: {why}"),
            retry_after: None,
            details: Vec::new(),
        })?;
        *self.token.write().expect("token lock") = Some(fresh.trim().to_owned());
        Ok(())
    }

    /// Sends `req` (named `request` in errors) and turns an answer that is not
    /// a deltasync success into [`Error::Server`], as [`answer`] rules. With
    /// `limit`, the whole exchange, the answer's body included, must finish
    /// within it.
    async fn send(
        &self,
        request: &'static str,
        req: reqwest::RequestBuilder,
        limit: Duration,
    ) -> Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| self.network_error(request, limit, e))?;
        let status = resp.status().as_u16();
        let header = |name| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let content_type = header(reqwest::header::CONTENT_TYPE);
        if answer::is_success(request, status, content_type.as_deref()) {
            return Ok(resp);
        }
        let retry_after = header(reqwest::header::RETRY_AFTER).and_then(|v| v.trim().parse().ok());
        let most =
            if answer::may_be_error_body(status, content_type.as_deref()) { usize::MAX } else { FOREIGN_BODY_BYTES };
        let body = self.body_start(request, limit, resp, most).await?;
        let e = answer::error_answer(request, &self.base, status, content_type.as_deref(), &body);
        Err(Error::Server { status, code: e.code, message: e.message, retry_after, details: e.details })
    }

    /// The first `most` bytes of an answer's body (or a little more: whole chunks).
    async fn body_start(
        &self,
        request: &'static str,
        limit: Duration,
        mut resp: reqwest::Response,
        most: usize,
    ) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        while body.len() < most {
            match resp.chunk().await.map_err(|e| self.network_error(request, limit, e))? {
                Some(chunk) => body.extend_from_slice(&chunk),
                None => break,
            }
        }
        Ok(body)
    }

    /// Opens the live channel (`GET /v1/live`) for `device_id`, as an
    /// HTTP/1.1 upgrade on this client's connections. A server without the
    /// endpoint answers [`Error::Server`] with status 404.
    pub async fn open_live(&self, device_id: &str) -> Result<crate::live::LiveSocket> {
        let (headers, key) = crate::live::LiveSocket::upgrade_headers();
        let open = || {
            let (req, request, limit) = self.build(requests::live(device_id));
            let mut req = req.version(reqwest::Version::HTTP_11);
            for (name, value) in &headers {
                req = req.header(*name, value.as_str());
            }
            async move {
                match tokio::time::timeout(limit, self.send(request, req, limit)).await {
                    Ok(result) => result,
                    Err(_) => {
                        Err(Error::Timeout { kind: TimeoutKind::Request, operation: request.to_owned(), after: limit })
                    }
                }
            }
        };
        let resp = match open().await {
            Err(Error::Server { status: 401, .. }) if self.provider.is_some() => {
                self.renew_token().await?;
                open().await?
            }
            outcome => outcome?,
        };
        crate::live::LiveSocket::accept(resp, &key, format!("{}/v1/live", self.base)).await
    }

    /// Sends a request whose whole answer is one JSON value, within its deadline.
    async fn json<T: DeserializeOwned>(&self, r: Request) -> Result<T> {
        let (resp, request, limit) = self.exchange(r, true).await?;
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

    fn token(&self) -> Option<String> {
        self.token.read().expect("token lock").clone()
    }

    async fn sync(&self, body: &SyncBody<'_>) -> Result<SyncResponse> {
        self.json(requests::sync(body)).await
    }

    async fn pull(&self, device_id: &str, cursor: u64, limit: u64, wait: Duration) -> Result<PullResponse> {
        self.json(requests::pull(device_id, cursor, limit, wait)).await
    }

    async fn status(&self, device_id: Option<&str>) -> Result<StatusResponse> {
        self.json(requests::status(device_id)).await
    }

    /// The answer's head within the request timeout; its body may then go
    /// silent for at most the stall timeout at a time.
    async fn bootstrap(&self, device_id: &str) -> Result<BodyStream> {
        let r = requests::bootstrap(device_id);
        let (request, limit) = (r.name, self.options.request_timeout + r.held_for);
        let resp = match tokio::time::timeout(limit, self.exchange(r, false)).await {
            Ok(result) => result?.0,
            Err(_) => {
                return Err(Error::Timeout { kind: TimeoutKind::Request, operation: request.to_owned(), after: limit });
            }
        };
        Ok(BodyStream { api: self.clone(), request, stream: Box::pin(resp.bytes_stream()) })
    }

    async fn conflicts(&self, since: u64, limit: Option<u64>) -> Result<ConflictsResponse> {
        self.json(requests::conflicts(since, limit)).await
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
