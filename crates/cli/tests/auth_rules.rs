//! `--auth jwt` end to end (contract §6, docs/protocol.md "Auth"): `nbf` is
//! enforced, a `crit` header is refused, the `Bearer` scheme is matched in any
//! letter case, and every refusal is a 401 whose message says what is wrong
//! without repeating what a decoder said about the token.
//!
//! Tokens are minted here with `jsonwebtoken`, and by hand (base64url and an
//! HS256 signature) where a header or claims must be something no library
//! writes. Auth does not touch the store, so these run on SQLite only.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Backend, Options, Server, client, hlc, now_ms, upsert};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "auth-rules-secret";

/// Words of decoders (`base64`, `serde_json`, `jsonwebtoken`) that no refusal may repeat.
const PARSER_WORDS: [&str; 13] = [
    "line ",
    "column",
    "Base64",
    "Invalid byte",
    "offset",
    "invalid type",
    "EOF",
    "Error",
    "Json",
    "expected",
    "missing field",
    "unknown variant",
    "InvalidToken",
];

fn now_s() -> u64 {
    now_ms() / 1000
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A token minted with `jsonwebtoken` from a header and claims.
fn minted(header: &Header, claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(header, claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

/// An HS256 token of alice, valid for an hour, with `extra` claims.
fn alice(extra: Value) -> String {
    let mut claims = json!({"sub": "alice", "exp": now_s() + 3600});
    claims.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    minted(&Header::new(Algorithm::HS256), &claims, SECRET)
}

/// A token made by hand: any header and claims text, with an HS256 signature by `secret`.
fn hand_made(header: &str, claims: &str, secret: &str) -> String {
    let message = format!("{}.{}", b64(header), b64(claims));
    let key = EncodingKey::from_secret(secret.as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
    format!("{message}.{signature}")
}

/// GET /v1/status with this `Authorization` header (none when `None`):
/// the status, the `WWW-Authenticate` header and the body.
async fn status_with(url: &str, authorization: Option<&str>) -> (u16, Option<String>, Value) {
    let mut req = client().get(format!("{url}/v1/status"));
    if let Some(value) = authorization {
        req = req.header(reqwest::header::AUTHORIZATION, value);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let challenge = r.headers().get(reqwest::header::WWW_AUTHENTICATE).map(|v| v.to_str().unwrap().to_owned());
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("status answered non-JSON ({e}): {text}"));
    (status, challenge, body)
}

/// Asserts a 401 `unauthorized` whose message holds `fragment` and no decoder's words.
async fn assert_refused(url: &str, what: &str, authorization: Option<&str>, fragment: &str) -> String {
    let (status, challenge, body) = status_with(url, authorization).await;
    assert_eq!(status, 401, "{what}: {body}");
    assert_eq!(body["error"], "unauthorized", "{what}: {body}");
    assert_eq!(challenge.as_deref(), Some("Bearer"), "{what}: WWW-Authenticate");
    let message = body["message"].as_str().unwrap_or_else(|| panic!("{what}: no message in {body}")).to_owned();
    assert!(message.contains(fragment), "{what}: the message does not say {fragment:?}: {message}");
    for word in PARSER_WORDS {
        assert!(!message.contains(word), "{what}: the message repeats a decoder ({word:?}): {message}");
    }
    message
}

fn jwt_server() -> Server {
    Server::start_with(&Backend::Sqlite, Options { jwt_secret: Some(SECRET.into()), ..Options::default() })
}

#[tokio::test]
async fn the_bearer_scheme_is_accepted_in_any_letter_case() {
    let server = jwt_server();
    let token = alice(json!({}));
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        for value in [format!("{scheme} {token}"), format!("{scheme}  {token}"), format!("{scheme}\t{token}")] {
            let (status, _, body) = status_with(&server.url, Some(&value)).await;
            assert_eq!((status, body["user_id"].as_str()), (200, Some("alice")), "{value:?}: {body}");
        }
    }
}

#[tokio::test]
async fn a_missing_header_another_scheme_and_an_empty_token_have_their_own_messages() {
    let server = jwt_server();
    let url = server.url.as_str();
    let token = alice(json!({}));
    let missing = assert_refused(url, "no header", None, "has no Authorization header").await;
    let basic = assert_refused(url, "Basic", Some("Basic YWxpY2U6cw=="), "uses the Basic scheme, not Bearer").await;
    let empty = assert_refused(url, "Bearer alone", Some("Bearer"), "Bearer scheme but no token").await;
    assert_refused(url, "BEARER and spaces", Some("BEARER   "), "Bearer scheme but no token").await;
    let bare = assert_refused(url, "a bare token", Some(&token), "not of the form `Bearer <token>`").await;
    assert!(!bare.contains(&token[..20]), "the refusal repeats the token: {bare}");
    let messages = [&missing, &basic, &empty, &bare];
    for (i, a) in messages.iter().enumerate() {
        for b in &messages[i + 1..] {
            assert_ne!(a, b, "two kinds of refusal share a message");
        }
        assert!(a.contains("send `Authorization: Bearer <token>`"), "{a}");
    }
}

#[tokio::test]
async fn nbf_is_enforced_with_the_same_leeway_as_exp() {
    let server = jwt_server();
    let url = server.url.as_str();
    let future = alice(json!({"nbf": now_s() + 600}));
    assert_refused(url, "nbf in 10 min", Some(&format!("Bearer {future}")), "not valid yet").await;
    for (what, nbf) in [("nbf in 30 s (within the leeway)", now_s() + 30), ("nbf past", now_s() - 600)] {
        let (status, _, body) = status_with(url, Some(&format!("Bearer {}", alice(json!({"nbf": nbf}))))).await;
        assert_eq!(status, 200, "{what}: {body}");
    }
    let mistyped = alice(json!({"nbf": "tomorrow"}));
    assert_refused(url, "nbf a string", Some(&format!("Bearer {mistyped}")), "`nbf` claim must be a number").await;
    let expired = alice(json!({"exp": now_s() - 120}));
    assert_refused(url, "expired", Some(&format!("Bearer {expired}")), "has expired").await;
    let (status, _, body) = status_with(url, Some(&format!("Bearer {}", alice(json!({"exp": now_s() - 30}))))).await;
    assert_eq!(status, 200, "exp 30 s ago is within the leeway: {body}");
}

#[tokio::test]
async fn a_crit_header_is_refused() {
    let server = jwt_server();
    let claims = json!({"sub": "alice", "exp": now_s() + 3600});
    let mut header = Header::new(Algorithm::HS256);
    header.crit = Some(vec!["exp".into()]);
    let by_library = minted(&header, &claims, SECRET);
    let by_hand = hand_made(
        r#"{"alg":"HS256","crit":["http://example.com/ext"],"http://example.com/ext":true}"#,
        &claims.to_string(),
        SECRET,
    );
    for (what, token) in [("crit by jsonwebtoken", by_library), ("crit by hand", by_hand)] {
        assert_refused(&server.url, what, Some(&format!("Bearer {token}")), "critical extensions (`crit`)").await;
    }
}

#[tokio::test]
async fn every_malformed_token_gets_a_fixed_message_and_changes_nothing() {
    let server = jwt_server();
    let url = server.url.as_str();
    let valid = json!({"sub": "alice", "exp": now_s() + 3600}).to_string();
    let hs256 = r#"{"alg":"HS256","typ":"JWT"}"#;
    let (message, _) = alice(json!({})).rsplit_once('.').map(|(m, s)| (m.to_owned(), s.to_owned())).unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        ("one part", "abc".into(), "not a JWT"),
        ("four parts", format!("{}.x", alice(json!({}))), "not a JWT"),
        // base64 would say "Invalid byte 33, offset 0".
        ("header not base64url", "!!!!.e30.sig".into(), "not a JWT"),
        ("signature not base64url", format!("{message}.not*base64"), "not a JWT"),
        // serde_json would say "EOF while parsing an object at line 1 column 7".
        ("header not JSON", hand_made("{\"alg\":", &valid, SECRET), "header is not a JSON object"),
        ("header without alg", hand_made(r#"{"typ":"JWT"}"#, &valid, SECRET), "header is not a JSON object"),
        ("alg none", format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(&valid)), "`alg` must be HS256"),
        (
            "HS512",
            minted(&Header::new(Algorithm::HS512), &serde_json::from_str(&valid).unwrap(), SECRET),
            "`alg` must be HS256",
        ),
        ("forged", hand_made(hs256, &valid, "another secret"), "signature does not match"),
        ("claims not JSON", hand_made(hs256, "{\"sub\": tru", SECRET), "claims are not a JSON object"),
        ("claims an array", hand_made(hs256, "[1, 2]", SECRET), "claims are not a JSON object"),
        ("no exp", hand_made(hs256, r#"{"sub":"alice"}"#, SECRET), "no `exp` claim"),
        ("no sub", hand_made(hs256, &json!({"exp": now_s() + 60}).to_string(), SECRET), "no `sub` claim"),
        ("exp a string", hand_made(hs256, r#"{"sub":"alice","exp":"soon"}"#, SECRET), "`exp` claim must be a number"),
        (
            "sub a number",
            hand_made(hs256, &json!({"sub": 7, "exp": now_s() + 60}).to_string(), SECRET),
            "`sub` claim must be a string",
        ),
        ("sub too long", alice(json!({"sub": "a".repeat(129)})), "`sub` is not a valid user id"),
        ("sub with a control", alice(json!({"sub": "al\u{7}ice"})), "`sub` is not a valid user id"),
        ("an audience", alice(json!({"aud": "someone-else"})), "`aud` claim"),
    ];
    for (what, token, fragment) in &cases {
        assert_refused(url, what, Some(&format!("Bearer {token}")), fragment).await;
    }
    // A refused push writes nothing.
    let body =
        json!({"device_id": "d", "changes": [upsert("c1", "tasks", "e", json!({"a": 1}), &hlc(now_ms(), 0, "d"))]});
    for (what, token, _) in &cases {
        let r = client().post(format!("{url}/v1/push")).bearer_auth(token).json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{what}: push");
    }
    let (status, _, st) = status_with(url, Some(&format!("Bearer {}", alice(json!({}))))).await;
    assert_eq!((status, st["head"].as_u64()), (200, Some(0)), "a refused push wrote something: {st}");
}
