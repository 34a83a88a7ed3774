//! The requests of protocol §6 as data: method, path with its query, body
//! and the name errors give them. Every HTTP transport (reqwest natively,
//! `fetch` in a browser) sends exactly these, so the paths, parameter names
//! and encodings live once; the transport only adds the base URL, the
//! `Authorization` header and its deadlines, and judges the answer with
//! [`crate::answer`].

use std::time::Duration;

use crate::transport::{BOOTSTRAP, CONFLICTS, LIVE, PULL, STATUS, SYNC, SyncBody};

/// One request to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What errors call it (`POST /v1/sync`).
    pub name: &'static str,
    /// `GET` or `POST`.
    pub method: &'static str,
    /// The path and query to append to the base URL (`/v1/pull?device_id=…`).
    pub path: String,
    /// The JSON body, for a `POST`.
    pub body: Option<Vec<u8>>,
    /// How long the server may hold the answer on purpose (a long poll's
    /// wait), to add to the transport's own deadline.
    pub held_for: Duration,
}

fn get(name: &'static str, endpoint: &str, query: &[(&str, String)]) -> Request {
    let path = match query {
        [] => endpoint.to_owned(),
        query => format!("{endpoint}?{}", serde_urlencoded::to_string(query).expect("strings encode")),
    };
    Request { name, method: "GET", path, body: None, held_for: Duration::ZERO }
}

/// `GET /v1/status`, with the device id when the device is to be recorded.
pub fn status(device_id: Option<&str>) -> Request {
    let query: Vec<(&str, String)> = device_id.map(|d| ("device_id", d.to_owned())).into_iter().collect();
    get(STATUS, "/v1/status", &query)
}

/// `POST /v1/sync`.
pub fn sync(body: &SyncBody<'_>) -> Request {
    let body = serde_json::to_vec(body).expect("a sync body serialises");
    Request { name: SYNC, method: "POST", path: "/v1/sync".into(), body: Some(body), held_for: Duration::ZERO }
}

/// `GET /v1/pull`, waiting up to `wait` (whole seconds) for a change when there is none.
pub fn pull(device_id: &str, cursor: u64, limit: u64, wait: Duration) -> Request {
    let wait = Duration::from_secs(wait.as_secs());
    let query = [
        ("device_id", device_id.to_owned()),
        ("cursor", cursor.to_string()),
        ("limit", limit.to_string()),
        ("wait", wait.as_secs().to_string()),
    ];
    Request { held_for: wait, ..get(PULL, "/v1/pull", &query) }
}

/// `GET /v1/bootstrap`.
pub fn bootstrap(device_id: &str) -> Request {
    get(BOOTSTRAP, "/v1/bootstrap", &[("device_id", device_id.to_owned())])
}

/// `GET /v1/live`: the WebSocket upgrade of the live channel (the transport
/// adds the upgrade's headers, or opens it as a WebSocket URL).
pub fn live(device_id: &str) -> Request {
    get(LIVE, "/v1/live", &[("device_id", device_id.to_owned())])
}

/// `GET /v1/conflicts` from record `since`, at most `limit` (the server's default when `None`).
pub fn conflicts(since: u64, limit: Option<u64>) -> Request {
    let mut query = vec![("since", since.to_string())];
    query.extend(limit.map(|l| ("limit", l.to_string())));
    get(CONFLICTS, "/v1/conflicts", &query)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_their_parameters_encoded() {
        assert_eq!(status(None).path, "/v1/status");
        assert_eq!(status(Some("dev 1&x")).path, "/v1/status?device_id=dev+1%26x");
        let p = pull("d", 7, 100, Duration::from_millis(2_500));
        assert_eq!(
            (p.path.as_str(), p.held_for),
            ("/v1/pull?device_id=d&cursor=7&limit=100&wait=2", Duration::from_secs(2))
        );
        assert_eq!(conflicts(3, None).path, "/v1/conflicts?since=3");
        assert_eq!(conflicts(3, Some(10)).path, "/v1/conflicts?since=3&limit=10");
        let s = sync(&SyncBody { device_id: "d", cursor: 1, changes: &[], limit: None });
        assert_eq!((s.method, s.name), ("POST", SYNC));
        assert_eq!(s.body.as_deref(), Some(br#"{"device_id":"d","cursor":1,"changes":[]}"#.as_slice()));
        assert_eq!(bootstrap("d").path, "/v1/bootstrap?device_id=d");
        assert_eq!(live("d 1").path, "/v1/live?device_id=d+1");
    }
}
