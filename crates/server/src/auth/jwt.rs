//! HS256 JWTs: verifying the tokens of `--auth jwt`, and minting them for
//! `deltasync token`.
//!
//! The header is read here before `jsonwebtoken` verifies the signature and
//! the times: the library ignores `crit`, which a recipient that understands
//! no extension must refuse (RFC 7515 §4.1.11), and it cannot tell an `alg`
//! of `none` from a broken header.

use std::fmt::Display;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use deltasync_protocol::UserId;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Serialize;
use serde_json::{Map, Value};

use super::{AuthError, Claim};

/// Seconds of clock difference forgiven on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 60;

/// Verifies HS256 tokens.
#[derive(Clone)]
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl JwtVerifier {
    /// A verifier for tokens signed with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // `exp` and `sub` are required by `subject`, which tells an absent claim
        // from a mistyped one; the library only checks the times.
        validation.set_required_spec_claims::<&str>(&[]);
        JwtVerifier { key: DecodingKey::from_secret(secret), validation }
    }

    /// The user a token names, if it verifies.
    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        check_header(token)?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation).map_err(refusal)?;
        subject(&data.claims)
    }
}

/// Checks the token's shape and header: three parts, a JSON object header
/// with `alg` HS256 and no `crit`.
fn check_header(token: &str) -> Result<(), AuthError> {
    let parts: Vec<&str> = token.split('.').collect();
    let [header, claims, _signature] = parts[..] else {
        return Err(refused(AuthError::NotAJwt, format_args!("{} parts", parts.len())));
    };
    if header.is_empty() || claims.is_empty() {
        return Err(refused(AuthError::NotAJwt, "an empty header or claims part"));
    }
    let bytes = URL_SAFE_NO_PAD.decode(header).map_err(|e| refused(AuthError::NotAJwt, e))?;
    let members: Map<String, Value> = serde_json::from_slice(&bytes).map_err(|e| refused(AuthError::BadHeader, e))?;
    match members.get("alg") {
        Some(Value::String(alg)) if alg == "HS256" => {}
        Some(Value::String(alg)) => return Err(refused(AuthError::WrongAlgorithm, format_args!("alg {alg:?}"))),
        _ => return Err(refused(AuthError::BadHeader, "no string `alg`")),
    }
    if members.contains_key("crit") {
        return Err(refused(AuthError::CriticalExtension, "a `crit` member"));
    }
    // What `jsonwebtoken` will read, so that its errors past here are about the claims.
    serde_json::from_slice::<Header>(&bytes).map_err(|e| refused(AuthError::BadHeader, e))?;
    Ok(())
}

/// The refusal for an error of `jsonwebtoken::decode`, once the header passed [`check_header`].
fn refusal(e: jsonwebtoken::errors::Error) -> AuthError {
    let claim = |name: &str| match name {
        "sub" => Some(Claim::Sub),
        "exp" => Some(Claim::Exp),
        "nbf" => Some(Claim::Nbf),
        _ => None,
    };
    let error = match e.kind() {
        ErrorKind::InvalidToken | ErrorKind::Base64(_) => AuthError::NotAJwt,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm => AuthError::WrongAlgorithm,
        ErrorKind::Json(_) | ErrorKind::Utf8(_) => AuthError::BadClaims,
        ErrorKind::MissingRequiredClaim(name) => claim(name).map_or(AuthError::Unverifiable, AuthError::MissingClaim),
        ErrorKind::InvalidClaimFormat(name) => claim(name).map_or(AuthError::Unverifiable, AuthError::InvalidClaim),
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAudience => AuthError::Audience,
        _ => AuthError::Unverifiable,
    };
    refused(error, e)
}

/// Logs what a decoder said about a refused token (at debug level: it is
/// for the operator, never for the answer) and returns the refusal.
fn refused(error: AuthError, detail: impl Display) -> AuthError {
    tracing::debug!(refusal = ?error, %detail, "token refused");
    error
}

/// The user a verified token's claims name. `exp` (whose value the library
/// checked when present) and `sub` are required.
fn subject(claims: &Map<String, Value>) -> Result<UserId, AuthError> {
    if claims.get("exp").is_none_or(Value::is_null) {
        return Err(AuthError::MissingClaim(Claim::Exp));
    }
    match claims.get("sub") {
        None | Some(Value::Null) => Err(AuthError::MissingClaim(Claim::Sub)),
        Some(Value::String(sub)) => UserId::parse(sub.as_str()).map_err(AuthError::BadSubject),
        Some(_) => Err(AuthError::InvalidClaim(Claim::Sub)),
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
}

/// Mints an HS256 token for `user`, valid for `ttl_secs` from `now_secs`.
pub fn mint_token(secret: &[u8], user: &UserId, now_secs: u64, ttl_secs: u64) -> String {
    let claims = Claims { sub: user.as_str(), exp: now_secs + ttl_secs };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
        .expect("HS256 signing cannot fail")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const SECRET: &[u8] = b"secret";
    const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    fn b64(bytes: impl AsRef<[u8]>) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A token made by hand: any header and claims text, signed with HS256 and `secret`.
    fn signed(header: &str, claims: &str, secret: &[u8]) -> String {
        let message = format!("{}.{}", b64(header), b64(claims));
        let key = EncodingKey::from_secret(secret);
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
        format!("{message}.{signature}")
    }

    fn claims(extra: Value) -> String {
        let mut c = json!({"sub": "alice", "exp": now() + 3600});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        c.to_string()
    }

    fn verify(token: &str) -> Result<UserId, AuthError> {
        JwtVerifier::new(SECRET).verify(token)
    }

    /// What decoders say, which no refusal may repeat.
    const PARSER_WORDS: [&str; 12] = [
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
    ];

    /// Which refusal a case expects.
    type Expected = fn(&AuthError) -> bool;

    fn assert_refused(token: &str, expected: Expected) {
        let err = verify(token).unwrap_err();
        assert!(expected(&err), "{token}: refused as {err:?}");
        let msg = err.to_string();
        for word in PARSER_WORDS {
            assert!(!msg.contains(word), "{token}: the message repeats a decoder ({word:?}): {msg}");
        }
    }

    #[test]
    fn minted_and_hand_made_tokens_verify_and_name_their_user() {
        let user = UserId::parse("alice").unwrap();
        assert_eq!(verify(&mint_token(SECRET, &user, now(), 3600)).unwrap(), user);
        assert_eq!(verify(&signed(HS256, &claims(json!({})), SECRET)).unwrap(), user);
        // Unknown members are ignored: `iat`, `jti`, a `kid` in the header.
        let extra = claims(json!({"iat": now(), "jti": "x"}));
        assert_eq!(verify(&signed(r#"{"alg":"HS256","kid":"k1"}"#, &extra, SECRET)).unwrap(), user);
    }

    #[test]
    fn exp_is_enforced_with_a_minute_of_leeway() {
        let user = UserId::parse("alice").unwrap();
        assert_refused(&mint_token(SECRET, &user, now() - 7200, 3600), |e| matches!(e, AuthError::Expired));
        assert!(verify(&mint_token(SECRET, &user, now() - 3630, 3600)).is_ok());
    }

    #[test]
    fn nbf_is_enforced_with_a_minute_of_leeway() {
        let future = signed(HS256, &claims(json!({"nbf": now() + 600})), SECRET);
        assert_refused(&future, |e| matches!(e, AuthError::NotYetValid));
        assert!(verify(&signed(HS256, &claims(json!({"nbf": now() + 30})), SECRET)).is_ok());
        assert!(verify(&signed(HS256, &claims(json!({"nbf": now() - 600})), SECRET)).is_ok());
        let mistyped = signed(HS256, &claims(json!({"nbf": "tomorrow"})), SECRET);
        assert_refused(&mistyped, |e| matches!(e, AuthError::InvalidClaim(Claim::Nbf)));
    }

    #[test]
    fn a_crit_header_is_refused_whatever_it_lists() {
        for crit in [json!(["exp"]), json!(["b64"]), json!([]), json!("x")] {
            let header = json!({"alg": "HS256", "crit": crit, "exp": 1}).to_string();
            assert_refused(&signed(&header, &claims(json!({})), SECRET), |e| matches!(e, AuthError::CriticalExtension));
        }
        // As `jsonwebtoken` itself would write it.
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["exp".into()]);
        let token = jsonwebtoken::encode(
            &header,
            &json!({"sub": "alice", "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET),
        );
        assert_refused(&token.unwrap(), |e| matches!(e, AuthError::CriticalExtension));
    }

    #[test]
    fn other_algorithms_and_none_are_refused_as_such() {
        let claims = claims(json!({}));
        let unsigned = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(&claims));
        assert_refused(&unsigned, |e| matches!(e, AuthError::WrongAlgorithm));
        for alg in ["HS512", "RS256", "hs256", "XX1"] {
            let token = signed(&json!({"alg": alg}).to_string(), &claims, SECRET);
            assert_refused(&token, |e| matches!(e, AuthError::WrongAlgorithm));
        }
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &json!({"sub": "a", "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET),
        );
        assert_refused(&hs512.unwrap(), |e| matches!(e, AuthError::WrongAlgorithm));
    }

    #[test]
    fn malformed_tokens_get_a_fixed_message_per_kind() {
        let good = signed(HS256, &claims(json!({})), SECRET);
        let (message, _) = good.rsplit_once('.').unwrap();
        let not_a_jwt = |e: &AuthError| matches!(e, AuthError::NotAJwt);
        for token in
            ["abc", "a.b", "a.b.c.d", "..", "!!!!.e30.x", &format!("{message}.not*base64"), &format!("{good}.x")]
        {
            assert_refused(token, not_a_jwt);
        }
        let bad_header = |e: &AuthError| matches!(e, AuthError::BadHeader);
        for header in ["not json", "[1,2]", r#"{"typ":"JWT"}"#, r#"{"alg":256}"#, r#"{"alg":"HS256","kid":5}"#] {
            assert_refused(&signed(header, &claims(json!({})), SECRET), bad_header);
        }
        let bad_claims = |e: &AuthError| matches!(e, AuthError::BadClaims);
        for body in ["not json", "[1]", "{\"sub\":\"alice\",", "\u{fffd}"] {
            assert_refused(&signed(HS256, body, SECRET), bad_claims);
        }
        let forged = signed(HS256, &claims(json!({})), b"another secret");
        assert_refused(&forged, |e| matches!(e, AuthError::BadSignature));
    }

    #[test]
    fn claims_are_checked_with_a_message_per_claim() {
        let t = now() + 3600;
        let cases: [(Value, Expected); 7] = [
            (json!({"sub": "alice"}), |e| matches!(e, AuthError::MissingClaim(Claim::Exp))),
            (json!({"exp": t}), |e| matches!(e, AuthError::MissingClaim(Claim::Sub))),
            (json!({"exp": t, "sub": null}), |e| matches!(e, AuthError::MissingClaim(Claim::Sub))),
            (json!({"exp": "soon", "sub": "alice"}), |e| matches!(e, AuthError::InvalidClaim(Claim::Exp))),
            (json!({"exp": t, "sub": 42}), |e| matches!(e, AuthError::InvalidClaim(Claim::Sub))),
            (json!({"exp": t, "sub": "x".repeat(129)}), |e| matches!(e, AuthError::BadSubject(_))),
            (json!({"exp": t, "sub": "a\u{7}b"}), |e| matches!(e, AuthError::BadSubject(_))),
        ];
        for (claims, expected) in cases {
            assert_refused(&signed(HS256, &claims.to_string(), SECRET), expected);
        }
        let aud = signed(HS256, &claims(json!({"aud": "elsewhere"})), SECRET);
        assert_refused(&aud, |e| matches!(e, AuthError::Audience));
    }

    #[test]
    fn the_header_is_judged_before_the_signature() {
        let wrong_alg = signed(r#"{"alg":"none"}"#, &claims(json!({})), b"not the secret");
        assert_refused(&wrong_alg, |e| matches!(e, AuthError::WrongAlgorithm));
        let crit = signed(r#"{"alg":"HS256","crit":["x"]}"#, &claims(json!({})), b"not the secret");
        assert_refused(&crit, |e| matches!(e, AuthError::CriticalExtension));
        // …and the signature before the claims: a forger learns nothing about them.
        let forged = signed(HS256, r#"{"sub":5}"#, b"not the secret");
        assert_refused(&forged, |e| matches!(e, AuthError::BadSignature));
    }
}
