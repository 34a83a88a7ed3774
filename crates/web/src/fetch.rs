//! [`FetchTransport`]: the engine's [`Transport`] on the browser's `fetch`.
//!
//! The requests are the engine's ([`deltasync_engine::requests`]) and the
//! answers are judged by its rule ([`deltasync_engine::answer`]), as in the
//! native client; this module only moves bytes. A request has a deadline
//! (an `AbortController`); a streamed bootstrap is read chunk by chunk from
//! the body's reader, each chunk within the stall limit.

use std::time::Duration;

use deltasync_engine::answer;
use deltasync_engine::requests::{self, Request};
use deltasync_engine::transport::{ByteStream, SyncBody, Transport};
use deltasync_engine::{Error, Result, TimeoutKind};
use deltasync_protocol::wire::{ConflictsResponse, PullResponse, StatusResponse, SyncResponse};
use js_sys::{Reflect, Uint8Array};
use serde::de::DeserializeOwned;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

/// How long a request may take, beyond what the server holds it on purpose (as natively).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a streamed answer may go without a byte (as natively).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

#[wasm_bindgen(inline_js = r#"
function failure(e, controller) {
  if (controller && controller.signal.aborted) return { timeout: true };
  return { message: String((e && e.message) || e) };
}
export async function fetch_head(url, method, token, body, timeout_ms) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeout_ms);
  const headers = {};
  if (token) headers["Authorization"] = "Bearer " + token;
  if (body) headers["Content-Type"] = "application/json";
  try {
    const response = await fetch(url, {
      method, headers, body: body || undefined, signal: controller.signal,
      cache: "no-store", credentials: "omit",
    });
    return {
      status: response.status,
      content_type: response.headers.get("content-type"),
      retry_after: response.headers.get("retry-after"),
      response, timer, controller,
    };
  } catch (e) {
    clearTimeout(timer);
    throw failure(e, controller);
  }
}
export async function read_all(head) {
  try {
    return new Uint8Array(await head.response.arrayBuffer());
  } catch (e) {
    throw failure(e, head.controller);
  } finally {
    clearTimeout(head.timer);
  }
}
export function body_reader(head) {
  clearTimeout(head.timer);
  return head.response.body.getReader();
}
export async function read_chunk(reader, stall_ms) {
  let timer;
  const stalled = new Promise((_, reject) => {
    timer = setTimeout(() => { reader.cancel().catch(() => {}); reject({ stall: true }); }, stall_ms);
  });
  try {
    const { done, value } = await Promise.race([reader.read(), stalled]);
    return done ? null : value;
  } catch (e) {
    throw (e && e.stall) ? e : failure(e, null);
  } finally {
    clearTimeout(timer);
  }
}
"#)]
extern "C" {
    /// Sends a request; resolves to `{status, content_type, retry_after, …}` once the head arrived.
    fn fetch_head(
        url: &str,
        method: &str,
        token: Option<String>,
        body: Option<Uint8Array>,
        timeout_ms: f64,
    ) -> js_sys::Promise;
    /// The whole body of an answer.
    fn read_all(head: &JsValue) -> js_sys::Promise;
    /// The body's reader (the request's deadline no longer applies: chunks have their own).
    fn body_reader(head: &JsValue) -> JsValue;
    /// The next chunk, or `null` at the end.
    fn read_chunk(reader: &JsValue, stall_ms: f64) -> js_sys::Promise;
}

/// A deltasync server reached with `fetch`.
#[derive(Debug, Clone)]
pub struct FetchTransport {
    base: String,
    token: Option<String>,
}

impl FetchTransport {
    /// The server at `base` (`http://` or `https://`), with an optional bearer token.
    pub fn new(base: &str, token: Option<String>) -> Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Invalid(format!("server URL must start with http:// or https://, got {base:?}")));
        }
        Ok(FetchTransport { base, token: token.filter(|t| !t.is_empty()) })
    }

    /// What a rejected `fetch` stands for.
    fn failure(&self, request: &str, limit: Duration, thrown: JsValue) -> Error {
        let flag = |name: &str| Reflect::get(&thrown, &name.into()).is_ok_and(|v| v.is_truthy());
        if flag("timeout") {
            return Error::Timeout { kind: TimeoutKind::Request, operation: request.to_owned(), after: limit };
        }
        if flag("stall") {
            return Error::Timeout {
                kind: TimeoutKind::Stall,
                operation: format!("{request} (streaming)"),
                after: limit,
            };
        }
        let message = Reflect::get(&thrown, &"message".into()).ok().and_then(|m| m.as_string()).unwrap_or_default();
        Error::Unreachable {
            url: self.base.clone(),
            message: format!(
                "{message} (the browser is offline, the server is down, or it does not allow this page's origin: \
                 deltasync serve --cors-origin)"
            ),
        }
    }

    /// Sends `r`; resolves to the answer's head when it is a deltasync success.
    async fn send(&self, r: Request) -> Result<(JsValue, &'static str, Duration)> {
        let limit = REQUEST_TIMEOUT + r.held_for;
        let url = format!("{}{}", self.base, r.path);
        let body = r.body.as_deref().map(Uint8Array::from);
        let promise = fetch_head(&url, r.method, self.token.clone(), body, limit.as_millis() as f64);
        let head = JsFuture::from(promise).await.map_err(|e| self.failure(r.name, limit, e))?;
        let text = |name: &str| Reflect::get(&head, &name.into()).ok().and_then(|v| v.as_string());
        let status = Reflect::get(&head, &"status".into()).ok().and_then(|v| v.as_f64()).unwrap_or(0.0) as u16;
        let content_type = text("content_type");
        if answer::is_success(r.name, status, content_type.as_deref()) {
            return Ok((head, r.name, limit));
        }
        let retry_after = text("retry_after").and_then(|v| v.trim().parse().ok());
        let body = self.body(&head, r.name, limit).await?;
        let e = answer::error_answer(r.name, &self.base, status, content_type.as_deref(), &body);
        Err(Error::Server { status, code: e.code, message: e.message, retry_after, details: e.details })
    }

    async fn body(&self, head: &JsValue, request: &str, limit: Duration) -> Result<Vec<u8>> {
        let bytes = JsFuture::from(read_all(head)).await.map_err(|e| self.failure(request, limit, e))?;
        Ok(Uint8Array::new(&bytes).to_vec())
    }

    async fn json<T: DeserializeOwned>(&self, r: Request) -> Result<T> {
        let (head, request, limit) = self.send(r).await?;
        let bytes = self.body(&head, request, limit).await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
            request,
            message: format!("cannot read the {}-byte answer: {e}", bytes.len()),
        })
    }
}

impl Transport for FetchTransport {
    type Stream = FetchStream;

    fn base(&self) -> &str {
        &self.base
    }

    fn token(&self) -> Option<String> {
        self.token.clone()
    }

    async fn status(&self, device_id: Option<&str>) -> Result<StatusResponse> {
        self.json(requests::status(device_id)).await
    }

    async fn sync(&self, body: &SyncBody<'_>) -> Result<SyncResponse> {
        self.json(requests::sync(body)).await
    }

    async fn pull(&self, device_id: &str, cursor: u64, limit: u64, wait: Duration) -> Result<PullResponse> {
        self.json(requests::pull(device_id, cursor, limit, wait)).await
    }

    async fn bootstrap(&self, device_id: &str) -> Result<FetchStream> {
        let (head, request, _) = self.send(requests::bootstrap(device_id)).await?;
        Ok(FetchStream { transport: self.clone(), request, reader: body_reader(&head) })
    }

    async fn conflicts(&self, since: u64, limit: Option<u64>) -> Result<ConflictsResponse> {
        self.json(requests::conflicts(since, limit)).await
    }
}

/// A streamed answer's body, read from its `ReadableStream`.
pub struct FetchStream {
    transport: FetchTransport,
    request: &'static str,
    reader: JsValue,
}

impl ByteStream for FetchStream {
    async fn next_chunk(&mut self) -> Option<Result<Vec<u8>>> {
        let limit = STALL_TIMEOUT;
        match JsFuture::from(read_chunk(&self.reader, limit.as_millis() as f64)).await {
            Ok(chunk) if chunk.is_null() || chunk.is_undefined() => None,
            Ok(chunk) => Some(Ok(Uint8Array::new(&chunk).to_vec())),
            Err(e) => Some(Err(self.transport.failure(self.request, limit, e))),
        }
    }
}
