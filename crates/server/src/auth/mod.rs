//! Who is asking: `--auth none` (one user, `local`) or HS256 JWTs (§6, and
//! the "Auth" section of docs/protocol.md).
//!
//! The user id comes only from here, so a request for another user's data
//! cannot be expressed. Every refusal is an [`AuthError`] whose message is
//! fixed for its kind and says what to do: it never repeats what a decoder
//! said about the token (that detail is logged at debug level), so a 401
//! neither leaks parser internals nor echoes the token.
//!
//! # Layout
//!
//! - this module: the `Authorization` header (the `Bearer` scheme in any
//!   letter case, RFC 7235) and the refusals;
//! - `jwt`: verifying and minting HS256 tokens.

mod jwt;
pub mod oidc;

use std::fmt;
use std::path::Path;

use deltasync_protocol::{NameError, UserId};

pub use jwt::{JwtVerifier, mint_token};

/// The user of `--auth none`.
pub const LOCAL_USER: &str = "local";

/// How requests are authenticated.
#[derive(Clone)]
pub enum Auth {
    /// No authentication: every request is user `local`.
    None,
    /// HS256 JWTs signed with a shared secret.
    Jwt(Box<JwtVerifier>),
    /// OpenID Connect ID tokens (RS256, ES256) of configured issuers and audiences.
    Oidc(std::sync::Arc<oidc::OidcVerifier>),
}

/// What a request's token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The user itself (`--auth none`, `--auth jwt`).
    User(UserId),
    /// An OpenID Connect identity, which the store maps to a user.
    Identity(oidc::Identity),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("Auth::None"),
            Auth::Jwt(_) => f.write_str("Auth::Jwt"),
            Auth::Oidc(_) => f.write_str("Auth::Oidc"),
        }
    }
}

/// A claim of the token that the server reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// `sub`: the user id.
    Sub,
    /// `exp`: the expiry, in seconds since the Unix epoch.
    Exp,
    /// `nbf`: the time before which the token is not valid, in seconds since the Unix epoch.
    Nbf,
}

impl Claim {
    /// The claim's name in the token.
    pub fn name(self) -> &'static str {
        match self {
            Claim::Sub => "sub",
            Claim::Exp => "exp",
            Claim::Nbf => "nbf",
        }
    }

    /// What the claim's value must be, in words.
    fn expected(self) -> &'static str {
        match self {
            Claim::Sub => "a string (the user id)",
            Claim::Exp | Claim::Nbf => "a number of seconds since the Unix epoch",
        }
    }
}

impl fmt::Display for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The hint that ends most refusals.
const SEND_BEARER: &str = "send `Authorization: Bearer <token>`";
/// The hint of refusals that only a new token fixes.
const MINT_NEW: &str = "mint a new one (`deltasync token`)";

/// Why a request was refused (401), or a secret could not be used. Every
/// variant but [`AuthError::Secret`] is the caller's fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The request has no `Authorization` header.
    #[error("the request has no Authorization header; {SEND_BEARER}")]
    Missing,
    /// The header holds bytes other than visible ASCII, spaces and tabs.
    #[error("the Authorization header holds bytes that are not visible ASCII; {SEND_BEARER}")]
    Unreadable,
    /// The header names another scheme than `Bearer` (`Some` with the scheme
    /// when it reads as one), or has no scheme at all.
    #[error("{}; {SEND_BEARER}", wrong_scheme(.0.as_deref()))]
    WrongScheme(Option<String>),
    /// The header is `Bearer` with no token after it.
    #[error("the Authorization header has the Bearer scheme but no token; {SEND_BEARER}")]
    EmptyToken,
    /// The token is not three base64url parts separated by dots.
    #[error("the token is not a JWT (three base64url parts joined by dots); {MINT_NEW}")]
    NotAJwt,
    /// The token's header is not a JSON object naming its `alg`orithm.
    #[error("the token's header is not a JSON object with a string `alg` member; {MINT_NEW}")]
    BadHeader,
    /// The token's header has a `crit` member: this server understands no
    /// JWS extension, so it must refuse the token (RFC 7515 §4.1.11).
    #[error(
        "the token's header lists critical extensions (`crit`), and this server understands none; mint the token without `crit`"
    )]
    CriticalExtension,
    /// The token is signed with another algorithm than HS256 (`none` included).
    #[error("the token's `alg` must be HS256, the only algorithm this server accepts; {MINT_NEW}")]
    WrongAlgorithm,
    /// The token's signature does not verify with the server's secret.
    #[error("the token's signature does not match this server's secret; {MINT_NEW} with the server's secret")]
    BadSignature,
    /// The token's claims are not a JSON object.
    #[error("the token's claims are not a JSON object; {MINT_NEW}")]
    BadClaims,
    /// A required claim (`sub` or `exp`) is absent.
    #[error("the token has no `{0}` claim; tokens must carry `sub` (the user id) and `exp` (the expiry); {MINT_NEW}")]
    MissingClaim(Claim),
    /// A claim has the wrong type.
    #[error("the token's `{claim}` claim must be {expected}; {MINT_NEW}", claim = .0, expected = .0.expected())]
    InvalidClaim(Claim),
    /// The token expired (`exp`, with 60 s of leeway).
    #[error("the token has expired; {MINT_NEW}")]
    Expired,
    /// The token is not valid yet (`nbf`, with 60 s of leeway).
    #[error(
        "the token is not valid yet: its `nbf` is more than 60 s ahead of the server's clock; \
         check the clocks of the server and of whoever minted the token"
    )]
    NotYetValid,
    /// The token names an audience (`aud`): this server has no audience name,
    /// so it must refuse the token (RFC 7519 §4.1.3).
    #[error("the token has an `aud` claim, and this server has no audience name; mint the token without `aud`")]
    Audience,
    /// The token's `sub` breaks the user id's rule.
    #[error("the token's `sub` is not a valid user id: {0}; {MINT_NEW}")]
    BadSubject(NameError),
    /// The token was refused for a reason none of the above names.
    #[error("the token cannot be verified; {MINT_NEW}")]
    Unverifiable,
    /// An OpenID Connect ID token was refused.
    #[error(transparent)]
    Oidc(#[from] oidc::OidcError),
    /// The secret file cannot be used (operator's fault).
    #[error("cannot use JWT secret file {path}: {reason}")]
    Secret {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The first clause of a [`AuthError::WrongScheme`] message.
fn wrong_scheme(scheme: Option<&str>) -> String {
    match scheme {
        Some(s) => format!("the Authorization header uses the {s} scheme, not Bearer"),
        None => "the Authorization header is not of the form `Bearer <token>`".to_owned(),
    }
}

/// The longest scheme name a refusal repeats.
const MAX_SCHEME_ECHO: usize = 32;

/// The token of an `Authorization` header value: `Bearer` in any letter case
/// (RFC 7235 §2.1), one or more spaces or tabs, the token.
pub fn bearer_token(value: &[u8]) -> Result<&str, AuthError> {
    let readable = |b: &u8| *b == b'\t' || (b' '..=b'~').contains(b);
    if !value.iter().all(readable) {
        return Err(AuthError::Unreadable);
    }
    let text = std::str::from_utf8(value).map_err(|_| AuthError::Unreadable)?.trim_matches([' ', '\t']);
    let (scheme, rest) = text.split_once([' ', '\t']).unwrap_or((text, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        // Only a word followed by credentials reads as a scheme; a lone word
        // may be the token itself, which a refusal must not repeat.
        let named = !rest.is_empty()
            && scheme.len() <= MAX_SCHEME_ECHO
            && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        return Err(AuthError::WrongScheme(named.then(|| scheme.to_owned())));
    }
    let token = rest.trim_matches([' ', '\t']);
    if token.is_empty() {
        return Err(AuthError::EmptyToken);
    }
    Ok(token)
}

/// Reads a secret file: its bytes, every trailing CR and LF stripped.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, AuthError> {
    let secret_err = |reason: String| AuthError::Secret { path: path.display().to_string(), reason };
    let mut bytes = std::fs::read(path).map_err(|e| secret_err(e.to_string()))?;
    while matches!(bytes.last(), Some(b'\r' | b'\n')) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(secret_err("the file is empty".into()));
    }
    Ok(bytes)
}

impl Auth {
    /// The user of a request whose `Authorization` header has this value
    /// (`None` when the request has none). With `--auth none` the header is
    /// ignored, whatever it holds.
    /// (`--auth oidc` proves identities, not users: see [`Auth::caller`].)
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<UserId, AuthError> {
        match self {
            Auth::None => Ok(UserId::parse(LOCAL_USER).expect("valid")),
            Auth::Jwt(v) => v.verify(bearer_token(authorization.ok_or(AuthError::Missing)?)?),
            Auth::Oidc(_) => Err(AuthError::Unverifiable),
        }
    }

    /// Who the request's `Authorization` header says is calling: a user, or
    /// for `--auth oidc` an identity (which may need the issuer's keys fetched).
    pub async fn caller(&self, authorization: Option<&[u8]>) -> Result<Caller, AuthError> {
        match self {
            Auth::Oidc(v) => {
                let token = bearer_token(authorization.ok_or(AuthError::Missing)?)?;
                Ok(Caller::Identity(v.verify(token).await?))
            }
            _ => self.authenticate(authorization).map(Caller::User),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt_auth() -> Auth {
        Auth::Jwt(Box::new(JwtVerifier::new(b"secret")))
    }

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_letter_case() {
        let user = UserId::parse("alice").unwrap();
        let token = mint_token(b"secret", &user, now(), 3600);
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            for header in [format!("{scheme} {token}"), format!("{scheme}\t {token} "), format!(" {scheme}   {token}")]
            {
                let got = jwt_auth().authenticate(Some(header.as_bytes()));
                assert_eq!(got.unwrap(), user, "header {header:?}");
            }
        }
    }

    #[test]
    fn a_missing_header_a_wrong_scheme_and_an_empty_token_are_told_apart() {
        let auth = jwt_auth();
        assert!(matches!(auth.authenticate(None), Err(AuthError::Missing)));
        let basic = auth.authenticate(Some(b"Basic YWxpY2U6c2VjcmV0")).unwrap_err();
        assert!(matches!(&basic, AuthError::WrongScheme(Some(s)) if s == "Basic"), "{basic:?}");
        assert!(basic.to_string().contains("uses the Basic scheme, not Bearer"), "{basic}");
        for empty in [&b"Bearer"[..], b"bearer ", b"BEARER \t "] {
            assert!(matches!(auth.authenticate(Some(empty)), Err(AuthError::EmptyToken)), "{empty:?}");
        }
        assert!(matches!(auth.authenticate(Some(b"")), Err(AuthError::WrongScheme(None))));
        assert!(matches!(auth.authenticate(Some(b"Bearer\xfftoken")), Err(AuthError::Unreadable)));
        assert!(matches!(auth.authenticate(Some(b"Bearer to\x01ken")), Err(AuthError::Unreadable)));
    }

    #[test]
    fn a_bare_token_without_a_scheme_is_not_repeated() {
        let token = mint_token(b"secret", &UserId::parse("alice").unwrap(), now(), 3600);
        let err = jwt_auth().authenticate(Some(token.as_bytes())).unwrap_err();
        assert!(matches!(err, AuthError::WrongScheme(None)), "{err:?}");
        assert!(!err.to_string().contains(&token[..10]), "{err}");
        let long_scheme = format!("{} credentials", "x".repeat(MAX_SCHEME_ECHO + 1));
        assert!(matches!(jwt_auth().authenticate(Some(long_scheme.as_bytes())), Err(AuthError::WrongScheme(None))));
    }

    #[test]
    fn auth_none_ignores_any_header() {
        for header in [None, Some(&b"Basic abc"[..]), Some(b"\xff\xfe"), Some(b"Bearer")] {
            assert_eq!(Auth::None.authenticate(header).unwrap().as_str(), LOCAL_USER);
        }
    }

    #[test]
    fn every_refusal_names_what_to_do() {
        let errors = [
            AuthError::Missing,
            AuthError::Unreadable,
            AuthError::WrongScheme(Some("Basic".into())),
            AuthError::WrongScheme(None),
            AuthError::EmptyToken,
            AuthError::NotAJwt,
            AuthError::BadHeader,
            AuthError::CriticalExtension,
            AuthError::WrongAlgorithm,
            AuthError::BadSignature,
            AuthError::BadClaims,
            AuthError::MissingClaim(Claim::Exp),
            AuthError::InvalidClaim(Claim::Sub),
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::Audience,
            AuthError::BadSubject(UserId::parse("").unwrap_err()),
            AuthError::Unverifiable,
        ];
        for e in errors {
            let msg = e.to_string();
            let says_what_to_do =
                ["send `Authorization", "mint", "check the clocks"].iter().any(|hint| msg.contains(hint));
            assert!(says_what_to_do, "{msg}");
        }
        assert_eq!(AuthError::InvalidClaim(Claim::Nbf).to_string().matches("`nbf`").count(), 1);
    }
}
