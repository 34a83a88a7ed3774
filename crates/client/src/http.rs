//! The HTTP side: the endpoints of protocol §6, with errors mapped to [`ClientError`].

use std::time::Duration;

use deltasync_protocol::Change;
use deltasync_protocol::wire::{ErrorBody, PullResponse, StatusResponse, SyncResponse};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ClientError, Result};

/// The body of `POST /v1/sync`.
#[derive(Serialize)]
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

/// A connection to one deltasync server.
#[derive(Clone, Debug)]
pub struct ServerApi {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl ServerApi {
    /// A client for the server at `base` (`http://host:port`, trailing slash allowed).
    /// With `http2_prior_knowledge`, `http://` servers are spoken to in HTTP/2 directly.
    pub fn new(base: &str, token: Option<String>, http2_prior_knowledge: bool) -> Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Invalid(format!("server URL must start with http:// or https://, got {base:?}")));
        }
        let mut builder =
            reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).read_timeout(Duration::from_secs(120));
        if http2_prior_knowledge {
            builder = builder.http2_prior_knowledge();
        }
        let http = builder.build().map_err(|e| ClientError::Invalid(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self { http, base, token })
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

    fn unreachable(&self, e: reqwest::Error) -> ClientError {
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        ClientError::Unreachable { url: self.base.clone(), message }
    }

    /// Sends a request and turns an error answer into [`ClientError::Server`].
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        let (code, message, details) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => (body.error, body.message, body.details.unwrap_or_default()),
            Err(_) => (
                "http_error".to_owned(),
                format!("HTTP {status} with a body that is not a deltasync error: {}", String::from_utf8_lossy(&bytes)),
                Vec::new(),
            ),
        };
        Err(ClientError::Server { status, code, message, retry_after, details })
    }

    async fn json<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T> {
        let resp = self.send(req).await?;
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("cannot read the answer: {e}")))
    }

    /// `POST /v1/sync`.
    pub async fn sync(&self, body: &SyncBody<'_>) -> Result<SyncResponse> {
        let bytes = serde_json::to_vec(body).expect("sync body serialises");
        let req = self
            .request(reqwest::Method::POST, "/v1/sync")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(bytes);
        self.json(req).await
    }

    /// `GET /v1/pull`, waiting up to `wait` for a change when there is none.
    pub async fn pull(&self, device_id: &str, cursor: u64, limit: u64, wait: Duration) -> Result<PullResponse> {
        let wait_s = wait.as_secs().to_string();
        let req = self.request(reqwest::Method::GET, "/v1/pull").query(&[
            ("device_id", device_id),
            ("cursor", &cursor.to_string()),
            ("limit", &limit.to_string()),
            ("wait", &wait_s),
        ]);
        self.json(req).await
    }

    /// `GET /v1/status`.
    pub async fn status(&self, device_id: &str) -> Result<StatusResponse> {
        self.json(self.request(reqwest::Method::GET, "/v1/status").query(&[("device_id", device_id)])).await
    }

    /// `GET /v1/bootstrap`: the streamed answer, for the caller to read line by line.
    pub async fn bootstrap(&self, device_id: &str) -> Result<reqwest::Response> {
        self.send(self.request(reqwest::Method::GET, "/v1/bootstrap").query(&[("device_id", device_id)])).await
    }

    /// Maps an error met while reading a streamed body.
    pub fn stream_error(&self, e: reqwest::Error) -> ClientError {
        self.unreachable(e)
    }
}
