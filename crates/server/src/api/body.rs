//! Reading JSON request bodies within `max_body_bytes`.
//!
//! A body whose `Content-Length` is over the limit is answered 413 without
//! being read. So that the client can read that answer instead of seeing its
//! connection reset, the rest of the body is drained in the background
//! (bounded in bytes and time), unless the client sent
//! `Expect: 100-continue` and so is waiting before it sends anything.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use http_body_util::BodyExt;
use serde_json::Value;

use super::ApiError;

/// The most bytes drained after a refusal.
const MAX_DRAIN_BYTES: usize = 64 * 1024 * 1024;
/// The longest time spent draining after a refusal.
const MAX_DRAIN_TIME: Duration = Duration::from_secs(10);

fn too_large(limit: usize) -> ApiError {
    ApiError::PayloadTooLarge {
        message: format!("the request body is larger than the server accepts: max_body_bytes is {limit}"),
        details: None,
    }
}

fn drain_in_background(body: Body) {
    tokio::spawn(async move {
        let mut body = body;
        let mut drained = 0usize;
        let _ = tokio::time::timeout(MAX_DRAIN_TIME, async {
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref() {
                    drained += data.len();
                    if drained > MAX_DRAIN_BYTES {
                        break;
                    }
                }
            }
        })
        .await;
    });
}

/// Checks the Content-Type and size, reads the body and parses it as JSON.
pub async fn read_json(headers: &HeaderMap, body: Body, limit: usize) -> Result<Value, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    let expects_continue = headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if !mime.eq_ignore_ascii_case("application/json") {
        if !expects_continue {
            drain_in_background(body);
        }
        return Err(ApiError::invalid(format!(
            "Content-Type must be application/json, got {:?}",
            if content_type.is_empty() { "nothing" } else { content_type }
        )));
    }
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        if !expects_continue {
            drain_in_background(body);
        }
        return Err(too_large(limit));
    }
    let mut collected = Vec::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::invalid(format!("the request body could not be read: {e}")))?;
        if let Some(data) = frame.data_ref() {
            if collected.len() + data.len() > limit {
                drain_in_background(body);
                return Err(too_large(limit));
            }
            collected.extend_from_slice(data);
        }
    }
    serde_json::from_slice(&collected)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}")))
}
