//! Validating the `device_id` and `changes` of push and sync bodies, and
//! writing pages of changes as JSON.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use deltasync_protocol::wire::ErrorDetail;
use deltasync_protocol::{Change, ChangeError, DeviceId};
use serde_json::{Map, Value};

use super::{ApiError, parse_device};
use crate::config::Limits;
use crate::store::ChangePage;

/// The body as an object, or a 400.
pub fn as_object(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object().ok_or_else(|| ApiError::invalid("the request body must be a JSON object"))
}

/// The body's `device_id`, or a 400.
pub fn device_of(obj: &Map<String, Value>) -> Result<DeviceId, ApiError> {
    match obj.get("device_id") {
        None | Some(Value::Null) => Err(ApiError::invalid("member `device_id` is required")),
        Some(Value::String(s)) => parse_device(s),
        Some(_) => Err(ApiError::invalid("member `device_id` must be a string")),
    }
}

/// Validates every change; a request with any bad change is refused whole, naming each.
pub fn parse_changes(value: Option<&Value>, limits: &Limits, required: bool) -> Result<Vec<Change>, ApiError> {
    let items = match value {
        None | Some(Value::Null) if !required => return Ok(Vec::new()),
        None | Some(Value::Null) => return Err(ApiError::invalid("member `changes` is required")),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::invalid("member `changes` must be an array")),
    };
    if items.len() > limits.max_batch {
        return Err(ApiError::PayloadTooLarge {
            message: format!("the request holds {} changes; max_batch is {}", items.len(), limits.max_batch),
            details: None,
        });
    }
    let mut changes = Vec::with_capacity(items.len());
    let mut malformed = Vec::new();
    let mut oversized = Vec::new();
    let (mut too_large, mut too_deep) = (false, false);
    for (index, item) in items.iter().enumerate() {
        match Change::from_json(item, &limits.change_limits()) {
            Ok(c) => changes.push(c),
            Err(e) => {
                let change_id = item.get("change_id").and_then(Value::as_str).map(str::to_owned);
                let detail = ErrorDetail { index, change_id, message: e.to_string() };
                match e {
                    ChangeError::DataTooLarge { .. } => too_large = true,
                    ChangeError::TooDeep { .. } => too_deep = true,
                    _ => {
                        malformed.push(detail);
                        continue;
                    }
                }
                oversized.push(detail);
            }
        }
    }
    if !malformed.is_empty() {
        let n = malformed.len();
        malformed.extend(oversized);
        malformed.sort_by_key(|d| d.index);
        return Err(ApiError::InvalidRequest {
            message: format!("{n} of the {} changes are malformed; nothing was applied", items.len()),
            details: Some(malformed),
        });
    }
    if !oversized.is_empty() {
        let broken = match (too_large, too_deep) {
            (true, true) => format!("max_data_bytes is {}, max_depth is {}", limits.max_data_bytes, limits.max_depth),
            (false, true) => format!("max_depth is {}", limits.max_depth),
            _ => format!("max_data_bytes is {}", limits.max_data_bytes),
        };
        let what = if too_deep && !too_large { "data nested too deeply" } else { "data over the limit" };
        return Err(ApiError::PayloadTooLarge {
            message: format!("{} of the changes have {what}: {broken}; nothing was applied", oversized.len()),
            details: Some(oversized),
        });
    }
    Ok(changes)
}

/// Writes `"changes":[…]` from a page, leaving out the seqs `skip` names.
pub fn write_changes(out: &mut Vec<u8>, page: &ChangePage, skip: impl Fn(u64) -> bool) {
    out.extend_from_slice(b"\"changes\":[");
    let mut first = true;
    for (seq, json) in &page.changes {
        if skip(*seq) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(json.as_bytes());
    }
    out.push(b']');
}

/// Writes the members that close a page answer: cursor, has_more, hashes, server_time.
pub fn write_page_tail(out: &mut Vec<u8>, page: &ChangePage, server_time: u64) {
    out.extend_from_slice(
        format!(
            ",\"cursor\":{},\"has_more\":{},\"state_hash\":\"{}\",\"state_digest\":\"{}\",\"server_time\":{}}}",
            page.cursor, page.has_more, page.state_hash, page.state_digest, server_time
        )
        .as_bytes(),
    );
}

/// A ready JSON body as a response.
pub fn json_response(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
