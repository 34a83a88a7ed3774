//! OpenID Connect ID tokens (`--auth oidc`): Google sign-in and any other
//! provider that publishes its keys.
//!
//! A token is accepted when:
//! - its `alg` is RS256 or ES256 (nothing else: not `none`, not HS256, so a
//!   provider's public key can never be used as an HMAC secret);
//! - its `iss` is one of the `--oidc-issuer`s, whose keys are found through
//!   `ISSUER/.well-known/openid-configuration` and its `jwks_uri`;
//! - its signature verifies with the issuer's key named by its `kid`;
//! - its `aud` holds one of the `--oidc-audience`s;
//! - `exp`, `nbf` and `iat` hold, with the 60 s of leeway of `--auth jwt`.
//!
//! Keys are cached per issuer. A token naming a `kid` the cache lacks makes
//! one refetch (the provider rotated its keys), but an issuer's keys are
//! never fetched more than once a minute, whatever tokens arrive.
//!
//! What the token proves is an identity, (`iss`, `sub`); the store maps it
//! to a user id (see [`crate::store::core::users`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// Seconds of clock difference forgiven on `exp`, `nbf` and `iat` (as for `--auth jwt`).
const LEEWAY_SECS: u64 = 60;

/// An issuer's keys are fetched at most this often.
pub const REFETCH_AFTER: Duration = Duration::from_secs(60);

/// How long fetching an issuer's configuration or keys may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The most identities whose user id is kept in memory.
const MAX_CACHED_USERS: usize = 100_000;

/// The hint that ends most refusals.
const SIGN_IN_AGAIN: &str = "sign in again to get a fresh ID token";

/// Who a verified ID token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The token's `iss`, as configured.
    pub issuer: String,
    /// The token's `sub`.
    pub subject: String,
}

/// Why an ID token was refused. Every message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OidcError {
    /// Not three base64url parts, or a header or claims part that is not a JSON object.
    #[error(
        "the token is not a JWT (three base64url parts joined by dots, with JSON objects); send the ID token itself"
    )]
    NotAJwt,
    /// An algorithm other than RS256 and ES256 (`none` and HS256 included).
    #[error("the token is signed with {0:?}; this server accepts ID tokens signed with RS256 or ES256 only")]
    Algorithm(String),
    /// A `crit` header member.
    #[error("the token's header lists critical extensions (`crit`), and this server understands none")]
    CriticalExtension,
    /// No string `iss` claim.
    #[error("the token has no `iss` claim; send an OpenID Connect ID token")]
    NoIssuer,
    /// An issuer not among `--oidc-issuer`.
    #[error("the token's issuer {issuer:?} is not one this server accepts ({accepted}); sign in with one of those")]
    UnknownIssuer {
        /// The token's `iss`.
        issuer: String,
        /// The configured issuers, listed.
        accepted: String,
    },
    /// The issuer has no key of that `kid` (after a refetch, or within a minute of the last one).
    #[error("the token's key {kid:?} is not among the keys issuer {issuer} publishes; {SIGN_IN_AGAIN}")]
    UnknownKey {
        /// The token's `kid` (empty when it has none and the issuer has several keys).
        kid: String,
        /// The issuer.
        issuer: String,
    },
    /// The issuer's configuration or keys cannot be fetched (the server's problem, transient).
    #[error("cannot fetch the keys of issuer {issuer}: {reason}; retry later")]
    Unreachable {
        /// The issuer.
        issuer: String,
        /// What failed.
        reason: String,
    },
    /// The signature does not verify.
    #[error("the token's signature does not verify with issuer {0}'s key; {SIGN_IN_AGAIN}")]
    BadSignature(String),
    /// `aud` names none of `--oidc-audience`.
    #[error(
        "the token's audience {found} is not one this server accepts ({accepted}); request the token for one of those client ids"
    )]
    WrongAudience {
        /// The token's `aud`.
        found: String,
        /// The configured audiences, listed.
        accepted: String,
    },
    /// `exp` passed (with leeway).
    #[error("the token has expired; {SIGN_IN_AGAIN}")]
    Expired,
    /// `nbf` is ahead (with leeway).
    #[error("the token is not valid yet (`nbf`); check the server's clock")]
    NotYetValid,
    /// `iat` is ahead (with leeway).
    #[error(
        "the token was issued in the future (`iat` more than 60 s ahead of the server's clock); check the server's clock"
    )]
    IssuedInFuture,
    /// A required claim is absent or mistyped.
    #[error("the token's `{0}` claim is missing or not what an ID token carries; {SIGN_IN_AGAIN}")]
    Claim(String),
}

impl OidcError {
    /// Whether the refusal is the server's (its issuer cannot be reached), not the token's.
    pub fn is_transient(&self) -> bool {
        matches!(self, OidcError::Unreachable { .. })
    }
}

/// An issuer's keys, as last fetched.
#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, (Algorithm, DecodingKey)>,
    /// When the keys were last asked for (successfully or not).
    fetched: Option<Instant>,
}

struct Issuer {
    url: String,
    keys: tokio::sync::Mutex<Keys>,
}

/// Verifies ID tokens of the configured issuers and audiences.
pub struct OidcVerifier {
    issuers: Vec<Issuer>,
    audiences: Vec<String>,
    refetch_after: Duration,
    http: reqwest::Client,
    users: std::sync::Mutex<HashMap<Identity, deltasync_protocol::UserId>>,
}

impl OidcVerifier {
    /// A verifier for tokens of `issuers` (URLs, e.g. `https://accounts.google.com`)
    /// meant for `audiences` (client ids). Both lists must not be empty.
    pub fn new(issuers: &[String], audiences: &[String]) -> Result<OidcVerifier, String> {
        if issuers.is_empty() || audiences.is_empty() {
            return Err("--auth oidc needs at least one --oidc-issuer and one --oidc-audience".into());
        }
        for issuer in issuers {
            if !(issuer.starts_with("https://") || issuer.starts_with("http://")) {
                return Err(format!(
                    "--oidc-issuer {issuer:?} is not an http(s) URL (e.g. https://accounts.google.com)"
                ));
            }
        }
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the HTTP client for OpenID Connect: {e}"))?;
        Ok(OidcVerifier {
            issuers: issuers
                .iter()
                .map(|url| Issuer { url: url.trim_end_matches('/').to_owned(), keys: Default::default() })
                .collect(),
            audiences: audiences.to_vec(),
            refetch_after: REFETCH_AFTER,
            http,
            users: Default::default(),
        })
    }

    /// The same, fetching an issuer's keys at most every `every` instead of
    /// every minute (tests of key rotation; `DELTASYNC_OIDC_REFETCH_SECS`).
    pub fn with_refetch_after(mut self, every: Duration) -> OidcVerifier {
        self.refetch_after = every;
        self
    }

    /// The identity a token proves.
    pub async fn verify(&self, token: &str) -> Result<Identity, OidcError> {
        let (header, claims) = parts(token)?;
        let alg = match header.get("alg").and_then(Value::as_str) {
            Some("RS256") => Algorithm::RS256,
            Some("ES256") => Algorithm::ES256,
            Some(other) => return Err(OidcError::Algorithm(other.to_owned())),
            None => return Err(OidcError::NotAJwt),
        };
        if header.contains_key("crit") {
            return Err(OidcError::CriticalExtension);
        }
        let iss = claims.get("iss").and_then(Value::as_str).ok_or(OidcError::NoIssuer)?;
        let issuer = self.issuers.iter().find(|i| i.url == iss.trim_end_matches('/')).ok_or_else(|| {
            OidcError::UnknownIssuer {
                issuer: iss.to_owned(),
                accepted: self.issuers.iter().map(|i| i.url.as_str()).collect::<Vec<_>>().join(", "),
            }
        })?;
        let kid = header.get("kid").and_then(Value::as_str);
        let key = self.key(issuer, kid, alg).await?;
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[iss]);
        validation.set_audience(&self.audiences);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation).map_err(|e| match e.kind() {
                ErrorKind::InvalidAudience => OidcError::WrongAudience {
                    found: claims.get("aud").map_or_else(|| "(none)".into(), Value::to_string),
                    accepted: self.audiences.join(", "),
                },
                ErrorKind::ExpiredSignature => OidcError::Expired,
                ErrorKind::ImmatureSignature => OidcError::NotYetValid,
                ErrorKind::MissingRequiredClaim(c) | ErrorKind::InvalidClaimFormat(c) => OidcError::Claim(c.clone()),
                _ => OidcError::BadSignature(issuer.url.clone()),
            })?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        match data.claims.get("iat").and_then(Value::as_u64) {
            Some(iat) if iat > now + LEEWAY_SECS => return Err(OidcError::IssuedInFuture),
            Some(_) => {}
            None => return Err(OidcError::Claim("iat".into())),
        }
        let subject = match data.claims.get("sub").and_then(Value::as_str) {
            Some(sub) if !sub.is_empty() && sub.len() <= 255 => sub.to_owned(),
            _ => return Err(OidcError::Claim("sub".into())),
        };
        Ok(Identity { issuer: issuer.url.clone(), subject })
    }

    /// The user id of `identity` when it was seen lately.
    pub fn known_user(&self, identity: &Identity) -> Option<deltasync_protocol::UserId> {
        self.users.lock().expect("users lock").get(identity).cloned()
    }

    /// Remembers the user id of `identity` (a bounded number of them).
    pub fn remember_user(&self, identity: Identity, user: deltasync_protocol::UserId) {
        let mut users = self.users.lock().expect("users lock");
        if users.len() >= MAX_CACHED_USERS {
            users.clear();
        }
        users.insert(identity, user);
    }

    /// The key `kid` of `issuer` for `alg`, fetching the issuer's keys when
    /// it has none of that id and has not fetched them within a minute.
    async fn key(&self, issuer: &Issuer, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, OidcError> {
        let mut keys = issuer.keys.lock().await;
        let pick = |keys: &Keys| -> Option<DecodingKey> {
            match kid {
                Some(kid) => keys.by_kid.get(kid).filter(|(a, _)| *a == alg).map(|(_, k)| k.clone()),
                None => {
                    let mut of_alg = keys.by_kid.values().filter(|(a, _)| *a == alg);
                    match (of_alg.next(), of_alg.next()) {
                        (Some((_, key)), None) => Some(key.clone()),
                        _ => None,
                    }
                }
            }
        };
        if let Some(key) = pick(&keys) {
            return Ok(key);
        }
        if keys.fetched.is_none_or(|at| at.elapsed() >= self.refetch_after) {
            keys.fetched = Some(Instant::now());
            keys.by_kid = self.fetch(&issuer.url).await?;
            if let Some(key) = pick(&keys) {
                return Ok(key);
            }
        }
        Err(OidcError::UnknownKey { kid: kid.unwrap_or_default().to_owned(), issuer: issuer.url.clone() })
    }

    /// The issuer's RS256 and ES256 signing keys, by `kid`.
    async fn fetch(&self, issuer: &str) -> Result<HashMap<String, (Algorithm, DecodingKey)>, OidcError> {
        let unreachable = |reason: String| OidcError::Unreachable { issuer: issuer.to_owned(), reason };
        let get_json = |url: String| async move {
            let response = self.http.get(&url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("GET {url} answered {}", response.status()));
            }
            response.json::<Value>().await.map_err(|e| format!("GET {url}: not JSON: {e}"))
        };
        let config = get_json(format!("{issuer}/.well-known/openid-configuration")).await.map_err(unreachable)?;
        let jwks_uri = config
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| unreachable("its openid-configuration has no jwks_uri".into()))?;
        let set: JwkSet = serde_json::from_value(get_json(jwks_uri.to_owned()).await.map_err(unreachable)?)
            .map_err(|e| unreachable(format!("{jwks_uri} is not a JWK set: {e}")))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(KeyAlgorithm::RS256), _) | (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
                (Some(KeyAlgorithm::ES256), _) => Algorithm::ES256,
                (None, AlgorithmParameters::EllipticCurve(ec)) if ec.curve == EllipticCurve::P256 => Algorithm::ES256,
                _ => continue,
            };
            let (Some(kid), Ok(key)) = (&jwk.common.key_id, DecodingKey::from_jwk(jwk)) else { continue };
            keys.insert(kid.clone(), (alg, key));
        }
        tracing::info!(issuer, keys = keys.len(), "fetched the issuer's signing keys");
        Ok(keys)
    }
}

/// A JSON object: a token's header or claims.
type Object = Map<String, Value>;

/// The header and claims of a compact JWS, decoded but not verified.
fn parts(token: &str) -> Result<(Object, Object), OidcError> {
    let mut split = token.split('.');
    let (Some(header), Some(claims), Some(_), None) = (split.next(), split.next(), split.next(), split.next()) else {
        return Err(OidcError::NotAJwt);
    };
    let object = |part: &str| -> Result<Object, OidcError> {
        let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| OidcError::NotAJwt)?;
        serde_json::from_slice(&bytes).map_err(|_| OidcError::NotAJwt)
    };
    Ok((object(header)?, object(claims)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(v: Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn verifier() -> OidcVerifier {
        OidcVerifier::new(&["https://issuer.example".into()], &["app-1".into()]).unwrap()
    }

    #[tokio::test]
    async fn only_rs256_and_es256_are_accepted() {
        let claims = b64(serde_json::json!({"iss": "https://issuer.example", "sub": "a", "aud": "app-1"}));
        for alg in ["none", "HS256", "RS512", "EdDSA"] {
            let token = format!("{}.{claims}.", b64(serde_json::json!({"alg": alg})));
            let err = verifier().verify(&token).await.unwrap_err();
            assert!(matches!(err, OidcError::Algorithm(ref a) if a == alg), "{alg}: {err}");
            assert!(err.to_string().contains("RS256 or ES256"), "{err}");
        }
    }

    #[tokio::test]
    async fn an_unknown_issuer_is_named_with_the_accepted_ones() {
        let claims = b64(serde_json::json!({"iss": "https://evil.example", "sub": "a", "aud": "app-1"}));
        let token = format!("{}.{claims}.c2ln", b64(serde_json::json!({"alg": "RS256", "kid": "k"})));
        let err = verifier().verify(&token).await.unwrap_err();
        assert!(matches!(err, OidcError::UnknownIssuer { .. }), "{err}");
        assert!(err.to_string().contains("https://evil.example") && err.to_string().contains("https://issuer.example"));
    }

    #[tokio::test]
    async fn malformed_tokens_are_not_jwts() {
        for token in ["", "a.b", "a.b.c.d", "!!.!!.!!", &format!("{}.e30.", URL_SAFE_NO_PAD.encode("[]"))] {
            assert!(matches!(verifier().verify(token).await, Err(OidcError::NotAJwt)), "{token:?}");
        }
    }

    #[test]
    fn issuers_and_audiences_are_required() {
        assert!(OidcVerifier::new(&[], &["a".into()]).is_err());
        assert!(OidcVerifier::new(&["https://x".into()], &[]).is_err());
        assert!(OidcVerifier::new(&["accounts.google.com".into()], &["a".into()]).is_err());
    }
}
