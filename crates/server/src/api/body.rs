//! Reading JSON request bodies within `max_body_bytes`.
//!
//! A body whose `Content-Length` is over the limit is answered 413 without
//! being read. So that the client can read that answer instead of seeing its
//! connection reset, the rest of the body is drained in the background
//! (bounded in bytes and time), unless the client sent
//! `Expect: 100-continue` and so is waiting before it sends anything.
//!
//! A body must arrive within `body_read_timeout_secs`, extended by one second
//! for every `body_min_bytes_per_sec` bytes received: a client that keeps a
//! fair pace always finishes, one that stalls or trickles is answered 408.

use std::time::Duration;

use tokio::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use http_body_util::BodyExt;
use serde_json::Value;

use super::ApiError;
use crate::config::{Limits, Network};

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

/// When a body that started at `started` and has delivered `received` bytes must be complete.
fn body_deadline(started: Instant, received: usize, network: &Network) -> Instant {
    let earned = Duration::from_secs_f64(received as f64 / network.body_min_bytes_per_sec.max(1) as f64);
    started + network.body_read_timeout + earned
}

fn too_slow(received: usize, network: &Network) -> ApiError {
    ApiError::RequestTimeout(format!(
        "the request body did not arrive in time ({received} bytes received): body_read_timeout_secs is {}, \
         extended by 1 s per body_min_bytes_per_sec ({} bytes); send smaller requests over a slow link",
        network.body_read_timeout.as_secs(),
        network.body_min_bytes_per_sec
    ))
}

/// Checks the Content-Type and size, reads the body within its deadline and parses it as JSON.
pub async fn read_json(headers: &HeaderMap, body: Body, limits: &Limits, network: &Network) -> Result<Value, ApiError> {
    let limit = limits.max_body_bytes;
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
    let started = Instant::now();
    loop {
        let deadline = body_deadline(started, collected.len(), network);
        let Ok(next) = tokio::time::timeout_at(deadline, body.frame()).await else {
            // Keep reading (within the drain's bounds) so the client can read the 408
            // instead of seeing its connection reset under the bytes it still sends.
            drain_in_background(body);
            return Err(too_slow(collected.len(), network));
        };
        let Some(frame) = next else { break };
        let frame = frame.map_err(|e| ApiError::invalid(format!("the request body could not be read: {e}")))?;
        if let Some(data) = frame.data_ref() {
            if collected.len() + data.len() > limit {
                drain_in_background(body);
                return Err(too_large(limit));
            }
            collected.extend_from_slice(data);
        }
    }
    serde_json::from_slice(&collected).map_err(|e| parse_error(&e, limits))
}

/// A body nested past the JSON parser's own limit is too deep, like data past
/// `max_depth` (413), not malformed.
fn parse_error(e: &serde_json::Error, limits: &Limits) -> ApiError {
    if e.to_string().starts_with("recursion limit exceeded") {
        return ApiError::PayloadTooLarge {
            message: format!(
                "the request body is nested deeper than the server parses; change data may be at most max_depth = {} levels deep",
                limits.max_depth
            ),
            details: None,
        };
    }
    ApiError::invalid(format!("the request body is not valid JSON: {e}"))
}
