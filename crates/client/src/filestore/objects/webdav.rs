//! A WebDAV server as an object store (`webdav://host[:port]/path`, or
//! `webdavs://` for https).
//!
//! Lists and deletes go through OpenDAL's webdav service. Reads and writes do
//! not, because in OpenDAL 0.57 that service declares neither
//! `write_with_if_not_exists` nor `write_with_if_match` (its PUT carries no
//! condition, and OpenDAL refuses a conditional write on it as unsupported),
//! and its read returns no ETag. So this module sends its own requests with
//! reqwest:
//!
//! - create: `PUT` with `If-None-Match: *`;
//! - replace: `PUT` with `If-Match: <etag>`, or `If-None-Match: *` when the
//!   object is expected absent;
//! - read: `GET`, whose `ETag` header is the object's version;
//!
//! with HTTP basic auth from [`ENV_STORE_USER`] and [`ENV_STORE_PASSWORD`].
//! A 412 answer is [`Created::Taken`] or [`Replaced::Changed`]. A PUT whose
//! parent collection is missing (409, or 404 from rclone) creates the missing
//! collections with `MKCOL` and is sent once more.
//!
//! Whether a server honours these headers, and atomically, is up to the
//! server: many do not ([`ObjectStore::probe`](super::ObjectStore::probe)
//! checks at first use; docs/file-store-servers.md says what was seen).

use opendal::layers::HttpClientLayer;
use opendal::raw::HttpClient;
use opendal::{Operator, services::Webdav};
use reqwest::header::{ETAG, HeaderValue, IF_MATCH, IF_NONE_MATCH};
use reqwest::{Method, StatusCode, Url};

use super::{
    Created, ENV_STORE_PASSWORD, ENV_STORE_USER, Object, ObjectError, REQUEST_TIMEOUT, Replaced, StoreEnv, from_opendal,
};

const DENIED_HINT: &str = "set DELTASYNC_STORE_USER and DELTASYNC_STORE_PASSWORD to an account that may write there";

/// How deep a chain of missing collections `MKCOL` creates before giving up.
const MAX_MKCOL_DEPTH: usize = 32;

/// A WebDAV store.
pub(super) struct WebDav {
    /// The collection that is the store's root, with a trailing `/`.
    base: Url,
    url: String,
    http: reqwest::Client,
    credentials: Option<(String, String)>,
    op: Operator,
}

/// The condition a PUT carries.
enum Condition<'a> {
    /// `If-None-Match: *`.
    Absent,
    /// `If-Match: <etag>`.
    Matches(&'a str),
}

impl WebDav {
    /// Opens the collection named by a `webdav://` or `webdavs://` URL.
    pub(super) fn open(url: &Url, env: &StoreEnv) -> Result<WebDav, String> {
        let scheme = if url.scheme() == "webdavs" { "https" } else { "http" };
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or("a webdav:// URL must name a host")?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        let path = format!("/{}/", url.path().trim_matches('/')).replace("//", "/");
        let base = Url::parse(&format!("{scheme}://{authority}{path}")).map_err(|e| e.to_string())?;
        let user = env
            .get(ENV_STORE_USER)
            .map(str::to_string)
            .or_else(|| (!url.username().is_empty()).then(|| url.username().to_string()));
        let password = env.get(ENV_STORE_PASSWORD).map(str::to_string).or_else(|| url.password().map(str::to_string));
        let credentials = user.map(|user| (user, password.unwrap_or_default()));

        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| format!("cannot set up an HTTP client: {e}"))?;
        let mut builder = Webdav::default().endpoint(&format!("{scheme}://{authority}")).root(&path);
        if let Some((user, password)) = &credentials {
            builder = builder.username(user).password(password);
        }
        // OpenDAL's requests go through this same client. It keeps no idle
        // connection: a server with one worker thread (wsgidav with
        // numthreads 1, the set-up whose create-only writes are atomic) waits
        // on an idle kept-alive connection until its socket timeout (10 s)
        // before it serves the next one, which stalled every request after a
        // refused (412) or conflicting (409) PUT. A connection per request
        // costs a handshake; the file store sends few requests.
        let op = Operator::new(builder)
            .map_err(|e| format!("cannot open the WebDAV store: {e}"))?
            .layer(HttpClientLayer::new(HttpClient::with(http.clone())))
            .finish();
        let url = format!("{}://{authority}{path}", url.scheme());
        Ok(WebDav { base, url, http, credentials, op })
    }

    pub(super) fn describe(&self) -> String {
        self.url.clone()
    }

    fn error(&self, op: &'static str, e: opendal::Error) -> ObjectError {
        from_opendal(self.describe(), op, DENIED_HINT, e)
    }

    /// The URL of `path` under the root; `collection` adds a trailing `/`.
    fn url_of(&self, path: &str, collection: bool) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend(path.split('/').filter(|s| !s.is_empty()));
            if collection {
                segments.push("");
            }
        }
        url
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match &self.credentials {
            Some((user, password)) => request.basic_auth(user, Some(password)),
            None => request,
        }
    }

    fn send_error(&self, op: &'static str, e: reqwest::Error) -> ObjectError {
        if e.is_timeout() {
            ObjectError::Timeout { store: self.describe(), op }
        } else {
            ObjectError::Unreachable { store: self.describe(), detail: error_chain(&e) }
        }
    }

    /// The error for an answer with a status the caller does not handle.
    async fn status_error(&self, op: &'static str, response: reqwest::Response) -> ObjectError {
        let status = response.status();
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return ObjectError::Denied {
                store: self.describe(),
                hint: format!("{DENIED_HINT} (the server answered {status})"),
            };
        }
        let body = response.text().await.unwrap_or_default();
        let detail: String = body.trim().chars().take(200).collect();
        let detail =
            if detail.is_empty() { status.canonical_reason().unwrap_or("no reason given").to_string() } else { detail };
        ObjectError::Status { store: self.describe(), op, status: status.as_u16(), detail }
    }

    pub(super) async fn read(&self, path: &str) -> Result<Option<Object>, ObjectError> {
        let response =
            self.request(Method::GET, self.url_of(path, false)).send().await.map_err(|e| self.send_error("read", e))?;
        match response.status() {
            StatusCode::NOT_FOUND => {
                drain(response).await;
                Ok(None)
            }
            status if status.is_success() => {
                let version = response.headers().get(ETAG).and_then(|v| v.to_str().ok()).map(str::to_string);
                let bytes = response.bytes().await.map_err(|e| self.send_error("read", e))?;
                Ok(Some(Object { bytes: bytes.to_vec(), version }))
            }
            _ => Err(self.status_error("read", response).await),
        }
    }

    pub(super) async fn create(&self, path: &str, bytes: Vec<u8>) -> Result<Created, ObjectError> {
        Ok(match self.put("create", path, bytes, Condition::Absent).await? {
            true => Created::Written,
            false => Created::Taken,
        })
    }

    pub(super) async fn replace(
        &self,
        path: &str,
        bytes: Vec<u8>,
        expected: Option<&str>,
    ) -> Result<Replaced, ObjectError> {
        let condition = match expected {
            Some(etag) => Condition::Matches(etag),
            None => Condition::Absent,
        };
        Ok(match self.put("replace", path, bytes, condition).await? {
            true => Replaced::Written,
            false => Replaced::Changed,
        })
    }

    /// A conditional PUT: `true` when written, `false` when the server
    /// refused the condition (412; or 404 to `If-Match` on an absent object).
    async fn put(
        &self,
        op: &'static str,
        path: &str,
        bytes: Vec<u8>,
        condition: Condition<'_>,
    ) -> Result<bool, ObjectError> {
        let url = self.url_of(path, false);
        let (header, value) = match condition {
            Condition::Absent => (IF_NONE_MATCH, HeaderValue::from_static("*")),
            Condition::Matches(etag) => (
                IF_MATCH,
                HeaderValue::from_str(etag).map_err(|_| ObjectError::InvalidPath {
                    path: path.to_string(),
                    why: format!("the expected version {etag:?} cannot be sent in an HTTP header"),
                })?,
            ),
        };
        let if_match = header == IF_MATCH;
        let mut made_parents = false;
        loop {
            let response = self
                .request(Method::PUT, url.clone())
                .header(header.clone(), value.clone())
                .body(bytes.clone())
                .send()
                .await
                .map_err(|e| self.send_error(op, e))?;
            match response.status() {
                status if status.is_success() => {
                    drain(response).await;
                    return Ok(true);
                }
                StatusCode::PRECONDITION_FAILED => {
                    drain(response).await;
                    return Ok(false);
                }
                StatusCode::NOT_FOUND if if_match => {
                    drain(response).await;
                    return Ok(false);
                }
                // 409 is RFC 4918's answer for a missing parent; rclone answers 404.
                StatusCode::CONFLICT | StatusCode::NOT_FOUND if !made_parents => {
                    made_parents = true;
                    drain(response).await;
                    self.make_collection(op, parent_collection(&url), 0).await?;
                }
                _ => return Err(self.status_error(op, response).await),
            }
        }
    }

    /// Creates the collection at `url` and any missing collections above it.
    async fn make_collection(&self, op: &'static str, url: Url, depth: usize) -> Result<(), ObjectError> {
        let response = self.request(mkcol(), url.clone()).send().await.map_err(|e| self.send_error(op, e))?;
        match response.status() {
            // 405: the collection already exists.
            status if status.is_success() || status == StatusCode::METHOD_NOT_ALLOWED => {
                drain(response).await;
                Ok(())
            }
            StatusCode::CONFLICT | StatusCode::NOT_FOUND if depth < MAX_MKCOL_DEPTH && url.path() != "/" => {
                Box::pin(self.make_collection(op, parent_collection(&url), depth + 1)).await?;
                let retried = self.request(mkcol(), url).send().await.map_err(|e| self.send_error(op, e))?;
                match retried.status() {
                    status if status.is_success() || status == StatusCode::METHOD_NOT_ALLOWED => {
                        drain(response).await;
                        Ok(())
                    }
                    _ => Err(self.status_error(op, retried).await),
                }
            }
            _ => Err(self.status_error(op, response).await),
        }
    }

    pub(super) async fn list(&self, dir: &str) -> Result<Vec<String>, ObjectError> {
        super::list_files(&self.op, dir).await.map_err(|e| self.error("list", e))
    }

    pub(super) async fn delete(&self, path: &str) -> Result<(), ObjectError> {
        super::delete_file(&self.op, path).await.map_err(|e| self.error("delete", e))
    }

    pub(super) async fn remove_empty_dir(&self, dir: &str) -> Result<(), ObjectError> {
        self.delete(&format!("{dir}/")).await
    }
}

/// The collection that holds `url` (an object's or a collection's), with a
/// trailing `/`.
fn parent_collection(url: &Url) -> Url {
    let mut parent = url.clone();
    if let Ok(mut segments) = parent.path_segments_mut() {
        segments.pop_if_empty().pop().push("");
    }
    parent
}

/// Reads the rest of an answer, so that its connection ends cleanly rather
/// than being dropped half-read.
async fn drain(response: reqwest::Response) {
    let _ = response.bytes().await;
}

/// WebDAV's method that creates a collection.
fn mkcol() -> Method {
    Method::from_bytes(b"MKCOL").expect("MKCOL is a valid method token")
}

/// An error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
