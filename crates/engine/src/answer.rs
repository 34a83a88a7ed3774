//! What an HTTP answer means, decided from its status, `Content-Type` and
//! body alone: no I/O, so the same rule can serve any client (this one, or a
//! browser's) once its HTTP layer has read the answer.
//!
//! - A success (2xx) is deltasync's when its `Content-Type` is the one the
//!   endpoint serves: `application/x-ndjson` for `GET /v1/bootstrap`,
//!   `application/json` for the others ([`is_success`]).
//! - Everything else is an error ([`error_answer`]):
//!   - 404 is `no_endpoint`: the client only ever asks for endpoints, never
//!     for an entity, so a 404 means the server lacks the endpoint (an older
//!     deltasync, or a base URL with a wrong path);
//!   - 502, 503 and 504 from something in between (a gateway saying the
//!     server is down) are `unavailable`, and 429 is `rate_limited`, whatever
//!     their body, so they stay transient and are retried;
//!   - an error status with a deltasync error body (`application/json`,
//!     `{"error", "message", "details"?}`) carries that body's code;
//!   - anything else did not come from deltasync: `not_deltasync`, with a
//!     one-line message naming the request, the URL, the status and the
//!     content type, quoting the start of the body, and saying what to check.

use deltasync_protocol::wire::{ErrorBody, ErrorDetail};

use crate::transport::BOOTSTRAP;

/// The most characters of a foreign body quoted in a message.
pub const EXCERPT_CHARS: usize = 200;

/// What to do about an answer that did not come from deltasync.
const ADVICE: &str = "check --server / DELTASYNC_SERVER: it should be the base URL of a `deltasync serve`";

/// An error answer in the client's terms: the code printed by the command
/// line, a message a person can act on, and the offending changes when the
/// server named them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorAnswer {
    /// The error code (`no_endpoint`, `not_deltasync`, or the server's own).
    pub code: String,
    /// One line saying what happened and what to do.
    pub message: String,
    /// The offending changes of a deltasync error body (empty otherwise).
    pub details: Vec<ErrorDetail>,
}

/// The `Content-Type` a success answer to `request` has (`GET /v1/bootstrap`
/// streams NDJSON, every other endpoint answers JSON).
pub fn expected_content_type(request: &str) -> &'static str {
    if request == BOOTSTRAP { "application/x-ndjson" } else { "application/json" }
}

/// Whether `content_type` (a header value, parameters such as `charset`
/// allowed) names the media type `mime`.
fn is_type(content_type: Option<&str>, mime: &str) -> bool {
    content_type.is_some_and(|ct| ct.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case(mime))
}

/// Whether an answer with this status and `Content-Type` may carry a
/// deltasync error body (an error status, JSON), so that its whole body is
/// worth reading; of any other answer, the start is enough to quote.
pub fn may_be_error_body(status: u16, content_type: Option<&str>) -> bool {
    !(200..300).contains(&status) && is_type(content_type, "application/json")
}

/// Whether an answer to `request` is a deltasync success whose body the
/// caller should go on to read: a 2xx status with the expected content type.
pub fn is_success(request: &str, status: u16, content_type: Option<&str>) -> bool {
    if request == crate::transport::LIVE {
        // The live channel's upgrade succeeds with 101 Switching Protocols.
        return status == 101;
    }
    (200..300).contains(&status) && is_type(content_type, expected_content_type(request))
}

/// The error an answer stands for, given that [`is_success`] refused it.
/// `base` is the server's base URL, `request` names the endpoint
/// (`GET /v1/status`, …) and `body` is the answer's body (or its start).
pub fn error_answer(request: &str, base: &str, status: u16, content_type: Option<&str>, body: &[u8]) -> ErrorAnswer {
    let ours =
        if may_be_error_body(status, content_type) { serde_json::from_slice::<ErrorBody>(body).ok() } else { None };
    let url = format!("{base}{}", request.split_once(' ').map_or(request, |(_, path)| path));
    let foreign = || Foreign { request, url: &url, status, content_type, body };
    match (status, ours) {
        (404, ours) => {
            let looked = match ours {
                Some(_) => String::new(),
                None => format!(" (the answer did not look like deltasync: {})", foreign().summary()),
            };
            plain(
                "no_endpoint",
                format!(
                    "the server at {base} has no {request}: an older deltasync, or --server has a wrong path{looked}"
                ),
            )
        }
        (_, Some(body)) => {
            ErrorAnswer { code: body.error, message: body.message, details: body.details.unwrap_or_default() }
        }
        (429, None) => plain("rate_limited", format!("{} (a proxy limiting requests?)", foreign().describe())),
        (502..=504, None) => {
            plain("unavailable", format!("{} (a gateway in between, saying the server is down?)", foreign().describe()))
        }
        (_, None) => plain("not_deltasync", format!("{}; {ADVICE}", foreign().describe())),
    }
}

/// An answer of the client's own making, naming no change.
fn plain(code: &str, message: String) -> ErrorAnswer {
    ErrorAnswer { code: code.to_owned(), message, details: Vec::new() }
}

/// An answer that did not come from deltasync, to describe in a message.
struct Foreign<'a> {
    request: &'a str,
    url: &'a str,
    status: u16,
    content_type: Option<&'a str>,
    body: &'a [u8],
}

impl Foreign<'_> {
    /// `GET /v1/status to URL got an answer that did not come from deltasync:
    /// HTTP 200, text/html: "<excerpt>"`.
    fn describe(&self) -> String {
        format!("{} to {} got an answer that did not come from deltasync: {}", self.request, self.url, self.summary())
    }

    /// `HTTP 200, text/html: "<excerpt>"`.
    fn summary(&self) -> String {
        let ct = match self.content_type {
            Some(ct) => excerpt(ct.as_bytes(), 60),
            None => "no Content-Type".to_owned(),
        };
        let quoted = match excerpt(self.body, EXCERPT_CHARS) {
            e if e.is_empty() => "an empty body".to_owned(),
            e => format!("\"{e}\""),
        };
        format!("HTTP {}, {ct}: {quoted}", self.status)
    }
}

/// The start of `body` as one line of at most `max` characters (and an
/// ellipsis when cut): control characters and runs of white space become one
/// space, invalid UTF-8 a replacement character.
pub fn excerpt(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    let mut chars = 0;
    for word in text.split(|c: char| c.is_whitespace() || c.is_control()).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
            chars += 1;
        }
        out.push_str(word);
        chars += word.chars().count();
        if chars > max {
            return format!("{}…", out.chars().take(max).collect::<String>());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HTML: &str = "text/html; charset=utf-8";
    const STATUS: &str = "GET /v1/status";

    fn long_page(title: &str) -> String {
        format!("<html>\r\n<head><title>{title}</title></head>\n<body>{}</body></html>", "lorem ipsum ".repeat(400))
    }

    /// Checks that a message is one short line.
    fn short_line(m: &str) {
        assert!(!m.contains('\n') && !m.contains('\r'), "{m}");
        assert!(m.chars().count() < 500, "{} characters: {m}", m.chars().count());
    }

    #[test]
    fn a_success_is_deltasyncs_only_with_the_endpoints_content_type() {
        assert!(is_success(STATUS, 200, Some("application/json")));
        assert!(is_success(STATUS, 200, Some("Application/JSON; charset=utf-8")));
        assert!(is_success(BOOTSTRAP, 200, Some("application/x-ndjson")));
        assert!(!is_success(BOOTSTRAP, 200, Some("application/json")));
        assert!(!is_success(STATUS, 200, Some("application/x-ndjson")));
        assert!(!is_success(STATUS, 200, Some(HTML)));
        assert!(!is_success(STATUS, 200, None));
        assert!(!is_success(STATUS, 400, Some("application/json")));
        assert!(!is_success(STATUS, 304, Some("application/json")));
        assert!(may_be_error_body(400, Some("application/json; charset=utf-8")));
        assert!(!may_be_error_body(200, Some("application/json")));
        assert!(!may_be_error_body(503, Some(HTML)));
    }

    #[test]
    fn a_success_that_is_not_json_is_not_deltasync_and_says_what_to_check() {
        let page = long_page("Welcome to nginx!");
        let e = error_answer(STATUS, "http://h:1/app", 200, Some(HTML), page.as_bytes());
        assert_eq!(e.code, "not_deltasync");
        let m = &e.message;
        assert!(m.starts_with("GET /v1/status to http://h:1/app/v1/status got an answer that did not come from deltasync: HTTP 200, text/html"), "{m}");
        assert!(m.contains("<title>Welcome to nginx!</title>"), "{m}");
        assert!(m.contains("…\""), "the excerpt is cut: {m}");
        assert!(m.ends_with(ADVICE), "{m}");
        short_line(m);
        let e = error_answer(BOOTSTRAP, "http://h:1", 200, None, b"");
        assert_eq!(e.code, "not_deltasync");
        assert!(e.message.contains("HTTP 200, no Content-Type: an empty body"), "{}", e.message);
    }

    #[test]
    fn an_error_with_a_deltasync_body_keeps_its_code_message_and_details() {
        let body =
            br#"{"error":"payload_too_large","message":"max_batch is 1000","details":[{"index":3,"message":"big"}]}"#;
        let e = error_answer("POST /v1/sync", "http://h:1", 413, Some("application/json"), body);
        assert_eq!((e.code.as_str(), e.message.as_str()), ("payload_too_large", "max_batch is 1000"));
        assert_eq!(e.details.len(), 1);
        assert_eq!((e.details[0].index, e.details[0].message.as_str()), (3, "big"));
        let body = br#"{"error":"unavailable","message":"the database is down"}"#;
        let e = error_answer(STATUS, "http://h:1", 503, Some("application/json"), body);
        assert_eq!((e.code.as_str(), e.message.as_str()), ("unavailable", "the database is down"));
        assert!(e.details.is_empty());
    }

    #[test]
    fn an_error_that_is_not_a_deltasync_error_body_is_not_deltasync() {
        let cases: [(u16, Option<&str>, &[u8]); 5] = [
            (500, Some(HTML), b"<h1>Internal Server Error</h1>"),
            (401, Some("text/plain"), b"Unauthorized"),
            (400, Some("application/json"), br#"{"error":"Bad Request"}"#),
            (410, Some("application/json"), b"not json at all"),
            // A deltasync-shaped body under a content type deltasync never sends.
            (413, Some("text/plain"), br#"{"error":"payload_too_large","message":"m"}"#),
        ];
        for (status, ct, body) in cases {
            let e = error_answer("POST /v1/sync", "http://h:1", status, ct, body);
            assert_eq!(e.code, "not_deltasync", "{status} {ct:?}");
            assert!(e.message.contains(&format!("did not come from deltasync: HTTP {status}, ")), "{}", e.message);
            assert!(e.message.contains("POST /v1/sync to http://h:1/v1/sync"), "{}", e.message);
            assert!(e.message.ends_with(ADVICE), "{}", e.message);
            short_line(&e.message);
        }
    }

    #[test]
    fn gateway_errors_stay_unavailable_and_429_stays_rate_limited() {
        for status in [502, 503, 504] {
            let page = long_page(&format!("{status} Bad Gateway"));
            let e = error_answer("POST /v1/sync", "http://h:1", status, Some(HTML), page.as_bytes());
            assert_eq!(e.code, "unavailable", "{status}");
            assert!(e.message.contains(&format!("<title>{status} Bad Gateway</title>")), "{}", e.message);
            assert!(e.message.contains("gateway"), "{}", e.message);
            short_line(&e.message);
        }
        let e = error_answer(STATUS, "http://h:1", 429, None, b"slow down");
        assert_eq!(e.code, "rate_limited");
        assert!(e.message.contains("\"slow down\""), "{}", e.message);
    }

    #[test]
    fn a_404_is_a_missing_endpoint_whatever_its_body() {
        let body = br#"{"error":"not_found","message":"no route /wrong/v1/status"}"#;
        let e = error_answer(STATUS, "http://h:1/wrong", 404, Some("application/json"), body);
        assert_eq!(e.code, "no_endpoint");
        let expected =
            "the server at http://h:1/wrong has no GET /v1/status: an older deltasync, or --server has a wrong path";
        assert_eq!(e.message, expected);
        let page = long_page("404 Not Found");
        let e = error_answer(STATUS, "http://h:1", 404, Some(HTML), page.as_bytes());
        assert_eq!(e.code, "no_endpoint");
        let m = &e.message;
        assert!(m.starts_with("the server at http://h:1 has no GET /v1/status: an older deltasync"), "{m}");
        assert!(m.contains("did not look like deltasync: HTTP 404, text/html") && m.contains("404 Not Found"), "{m}");
        short_line(m);
    }

    #[test]
    fn an_excerpt_is_one_line_of_at_most_the_limit() {
        assert_eq!(excerpt(b"  a\r\n\tb  \x00 c ", 200), "a b c");
        assert_eq!(excerpt(b"", 200), "");
        assert_eq!(excerpt("ééééé".as_bytes(), 3), "ééé…");
        assert_eq!(excerpt(b"abc", 3), "abc");
        assert_eq!(excerpt(b"\xff\xfeab", 10), "\u{fffd}\u{fffd}ab");
        let long = excerpt("word ".repeat(1000).as_bytes(), EXCERPT_CHARS);
        assert_eq!(long.chars().count(), EXCERPT_CHARS + 1);
    }
}
