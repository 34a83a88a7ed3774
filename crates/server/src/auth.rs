//! Who is asking: `--auth none` (one user, `local`) or HS256 JWTs (§6).
//!
//! The user id comes only from here, so a request for another user's data
//! cannot be expressed.

use std::path::Path;

use deltasync_protocol::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

/// The user of `--auth none`.
pub const LOCAL_USER: &str = "local";

/// How requests are authenticated.
#[derive(Clone)]
pub enum Auth {
    /// No authentication: every request is user `local`.
    None,
    /// HS256 JWTs signed with a shared secret.
    Jwt(Box<JwtVerifier>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("Auth::None"),
            Auth::Jwt(_) => f.write_str("Auth::Jwt"),
        }
    }
}

/// Why a token was refused (401) or a secret could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No `Authorization: Bearer` header (caller's fault).
    #[error("missing `Authorization: Bearer <token>` header")]
    Missing,
    /// The token expired (caller's fault: mint a new one).
    #[error("the token has expired; get a new one")]
    Expired,
    /// The token's signature does not verify with the server's secret.
    #[error("the token's signature does not match this server's secret")]
    BadSignature,
    /// The token uses an algorithm other than HS256.
    #[error("the token must be signed with HS256")]
    WrongAlgorithm,
    /// The token is not a well-formed JWT, or lacks `exp` or `sub`.
    #[error("the token is malformed: {0}")]
    Malformed(String),
    /// The secret file cannot be used (operator's fault).
    #[error("cannot use JWT secret file {path}: {reason}")]
    Secret {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
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
        validation.leeway = 60;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        JwtVerifier { key: DecodingKey::from_secret(secret), validation }
    }

    /// The user a token names, if it verifies.
    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::WrongAlgorithm,
            _ => AuthError::Malformed(e.to_string()),
        })?;
        UserId::parse(data.claims.sub).map_err(|e| AuthError::Malformed(format!("sub: {e}")))
    }
}

impl Auth {
    /// The user of a request with this `Authorization` header value.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<UserId, AuthError> {
        match self {
            Auth::None => Ok(UserId::parse(LOCAL_USER).expect("valid")),
            Auth::Jwt(v) => {
                let header = authorization.ok_or(AuthError::Missing)?;
                let token = header
                    .strip_prefix("Bearer ")
                    .or_else(|| header.strip_prefix("bearer "))
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .ok_or(AuthError::Missing)?;
                v.verify(token)
            }
        }
    }
}

/// Mints an HS256 token for `user`, valid for `ttl_secs` from `now_secs`.
pub fn mint_token(secret: &[u8], user: &UserId, now_secs: u64, ttl_secs: u64) -> String {
    let claims = Claims { sub: user.as_str().to_owned(), exp: now_secs + ttl_secs };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
        .expect("HS256 signing cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn minted_tokens_verify_and_name_their_user() {
        let user = UserId::parse("alice").unwrap();
        let token = mint_token(b"secret", &user, now(), 3600);
        let auth = Auth::Jwt(Box::new(JwtVerifier::new(b"secret")));
        assert_eq!(auth.authenticate(Some(&format!("Bearer {token}"))).unwrap(), user);
    }

    #[test]
    fn refuses_forged_expired_and_missing_tokens() {
        let user = UserId::parse("alice").unwrap();
        let auth = Auth::Jwt(Box::new(JwtVerifier::new(b"secret")));
        let forged = mint_token(b"other", &user, now(), 3600);
        assert!(matches!(auth.authenticate(Some(&format!("Bearer {forged}"))), Err(AuthError::BadSignature)));
        let expired = mint_token(b"secret", &user, now() - 7200, 3600);
        assert!(matches!(auth.authenticate(Some(&format!("Bearer {expired}"))), Err(AuthError::Expired)));
        let within_leeway = mint_token(b"secret", &user, now() - 3630, 3600);
        assert!(auth.authenticate(Some(&format!("Bearer {within_leeway}"))).is_ok());
        assert!(matches!(auth.authenticate(None), Err(AuthError::Missing)));
        assert!(matches!(auth.authenticate(Some("Basic abc")), Err(AuthError::Missing)));
        assert!(matches!(auth.authenticate(Some("Bearer not.a.jwt")), Err(AuthError::Malformed(_))));
    }
}
