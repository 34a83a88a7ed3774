//! The HTTP API (§6): one module per endpoint, shared request plumbing here.

mod body;
mod bootstrap;
mod changes;
mod conflicts;
pub mod error;
mod health;
pub mod live;
mod pull;
mod push;
mod query;
pub mod slots;
mod status;
mod sync;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use deltasync_protocol::{DeviceId, UserId};
use tokio::sync::watch;

use crate::auth::Auth;
use crate::clock::Clock;
use crate::config::Config;
use crate::net::PeerAddr;
use crate::rate::{RateKey, RateLimiter, retry_after_secs};
use crate::store::Store;
pub use error::ApiError;

/// What every handler shares.
pub struct AppState {
    /// The durable store.
    pub store: Arc<dyn Store>,
    /// Limits and policies.
    pub config: Config,
    /// How requests are authenticated.
    pub auth: Auth,
    /// The server's clock.
    pub clock: Clock,
    /// Becomes true when the server starts shutting down; long polls then answer at once.
    pub shutdown: watch::Receiver<bool>,
    /// The bootstraps streaming now.
    pub bootstraps: Arc<slots::UserSlots>,
    /// The live connections open now.
    pub live: Arc<slots::UserSlots>,
    /// The heads live connections send, read once per user and move.
    pub live_heads: Arc<live::LiveHeads>,
    /// The last verdict on whether writes work.
    pub health: health::WriteProbe,
    /// Every user's and client address's request budget (`[limits]`).
    pub rate: RateLimiter,
    /// The long polls waiting now, per user.
    pub waiting_polls: Arc<slots::UserSlots>,
}

impl AppState {
    /// The state for serving `store` under `config`.
    pub fn new(
        store: Arc<dyn Store>,
        config: Config,
        auth: Auth,
        clock: Clock,
        shutdown: watch::Receiver<bool>,
    ) -> AppState {
        AppState {
            store,
            auth,
            clock,
            shutdown,
            bootstraps: Default::default(),
            live: Default::default(),
            live_heads: Default::default(),
            health: health::WriteProbe::default(),
            rate: RateLimiter::new(config.rate),
            waiting_polls: Default::default(),
            config,
        }
    }
}

/// The authenticated user of a request.
pub struct AuthUser(pub UserId);

impl FromRequestParts<Arc<AppState>> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let outcome = match parts.extensions.get::<Authenticated>() {
            Some(Authenticated(outcome)) => outcome.clone(),
            None => authenticate(state, parts.headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes)).await,
        };
        outcome.map(AuthUser).map_err(ApiError::from)
    }
}

/// Why a request's token gives no user.
#[derive(Debug, Clone)]
pub(crate) enum Refused {
    /// The token is missing or refused (401).
    Unauthorized(String),
    /// The server cannot tell now: an issuer's keys or the store are out of reach (503).
    Unavailable(String),
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> ApiError {
        match refused {
            Refused::Unauthorized(message) => ApiError::Unauthorized(message),
            Refused::Unavailable(message) => ApiError::Unavailable(message),
        }
    }
}

/// The outcome of reading a request's token, made once by [`limit_rate`]
/// and taken by [`AuthUser`]: the user, or why there is none.
#[derive(Clone)]
struct Authenticated(Result<UserId, Refused>);

/// The user of a request with this `Authorization` header value: the one
/// its token names, or for `--auth oidc` the one its identity maps to (made
/// on the identity's first sign-in).
pub(crate) async fn authenticate(app: &AppState, authorization: Option<&[u8]>) -> Result<UserId, Refused> {
    use crate::auth::{AuthError, Caller};
    match app.auth.caller(authorization).await {
        Ok(Caller::User(user)) => Ok(user),
        Ok(Caller::Identity(identity)) => {
            let Auth::Oidc(verifier) = &app.auth else {
                return Err(Refused::Unauthorized("this server does not take OpenID Connect tokens".into()));
            };
            if let Some(user) = verifier.known_user(&identity) {
                return Ok(user);
            }
            let user = app
                .store
                .user_for_identity(&identity.issuer, &identity.subject, app.clock.now_ms())
                .await
                .map_err(|e| Refused::Unavailable(format!("cannot look up the user of this sign-in: {e}")))?;
            tracing::debug!(issuer = %identity.issuer, subject = %identity.subject, %user, "identity mapped to its user");
            verifier.remember_user(identity, user.clone());
            Ok(user)
        }
        Err(AuthError::Oidc(e)) if e.is_transient() => Err(Refused::Unavailable(e.to_string())),
        Err(e) => Err(Refused::Unauthorized(e.to_string())),
    }
}

/// Who sent a request, for the request log: the user of a valid token
/// (empty without one) and the client address.
#[derive(Debug, Clone)]
struct Requester {
    user: String,
    address: String,
}

/// Parses a `device_id`, answering 400 with the rule when it is malformed.
pub(crate) fn parse_device(s: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(s).map_err(|e| ApiError::invalid(format!("device_id: {e}")))
}

/// The router with every endpoint.
pub fn router(state: Arc<AppState>) -> Router {
    let web = state.config.web.clone();
    let routes = Router::new()
        .route("/v1/push", post(push::push))
        .route("/v1/pull", get(pull::pull))
        .route("/v1/sync", post(sync::sync))
        .route("/v1/bootstrap", get(bootstrap::bootstrap))
        .route("/v1/status", get(status::status))
        .route("/v1/conflicts", get(conflicts::conflicts))
        .route("/v1/live", get(live::live))
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(metrics));
    let router = web
        .with_static(routes, Router::new().fallback(not_found))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn(refuse_long_uris))
        .layer(middleware::from_fn_with_state(state.clone(), limit_rate))
        .layer(middleware::from_fn(log_request))
        .with_state(state);
    web.with_cors(router)
}

/// The router of the `--metrics-listen` port: `GET /metrics` without a token, nothing else.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(|State(app): State<Arc<AppState>>| async move { metrics_text(&app) }))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(refuse_long_uris))
        .with_state(state)
}

/// `GET /metrics`: the metrics in Prometheus text; needs a token unless `--auth none`.
async fn metrics(State(app): State<Arc<AppState>>, AuthUser(_): AuthUser) -> Response {
    metrics_text(&app)
}

/// The metrics now, as `GET /metrics` answers them (also on the port of `--metrics-listen`).
pub fn metrics_text(app: &AppState) -> Response {
    use crate::telemetry;
    ::metrics::gauge!(telemetry::LIVE_CONNECTIONS).set(app.live.total() as f64);
    ::metrics::gauge!(telemetry::WAITING_POLLS).set(app.waiting_polls.total() as f64);
    let mut response = telemetry::render().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_owned())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_owned() }
}

/// Answers 414 before any handler reads a URI longer than [`error::MAX_URI_BYTES`].
async fn refuse_long_uris(request: Request, next: Next) -> Response {
    let len = request.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if len > error::MAX_URI_BYTES {
        return ApiError::UriTooLong(len).into_response();
    }
    next.run(request).await
}

/// Takes the request from its user's budget (or its client address's, for
/// a request without a valid token, and under `--auth none`), answering
/// `429 rate_limited` when it is spent (see [`crate::rate`]). Authenticates
/// once for the handler ([`AuthUser`]) on the way.
async fn limit_rate(State(app): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    let outcome = authenticate(&app, request.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes)).await;
    let address = request.extensions().get::<PeerAddr>().map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |peer| peer.0);
    let key = match (&app.auth, &outcome) {
        (Auth::None, _) | (_, Err(_)) => RateKey::Address(address),
        (_, Ok(user)) => RateKey::User(user.clone()),
    };
    let requester = Requester {
        user: outcome.as_ref().map_or_else(|_| String::new(), ToString::to_string),
        address: address.to_string(),
    };
    let mut response = match app.rate.check(&key) {
        Ok(()) => {
            request.extensions_mut().insert(Authenticated(outcome));
            next.run(request).await
        }
        Err(wait) => {
            let limits = app.rate.limits();
            let secs = retry_after_secs(wait);
            ApiError::RateLimited {
                message: format!(
                    "too many requests from {key}: the server takes {} a second with bursts of {} \
                     ([limits] requests_per_second and burst); retry after {secs} s",
                    limits.requests_per_second, limits.burst
                ),
                retry_after_secs: secs,
            }
            .into_response()
        }
    };
    response.extensions_mut().insert(requester);
    response
}

/// The metrics label of a route.
fn endpoint_label(route: &str) -> &'static str {
    const ROUTES: [&str; 9] = [
        "/v1/push",
        "/v1/pull",
        "/v1/sync",
        "/v1/bootstrap",
        "/v1/status",
        "/v1/conflicts",
        "/v1/live",
        "/healthz",
        "/metrics",
    ];
    ROUTES.into_iter().find(|r| *r == route).unwrap_or("other")
}

/// Logs every request at debug level, every refusal (4xx) at info with who
/// sent it and why, and every failure (5xx) as a warning.
async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    // The route, not the path, so that the labels stay few whatever clients ask for.
    let endpoint = request.extensions().get::<MatchedPath>().map_or("other", |m| endpoint_label(m.as_str()));
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let took = started.elapsed();
    let micros = took.as_micros() as u64;
    ::metrics::counter!(crate::telemetry::HTTP_REQUESTS, "endpoint" => endpoint, "status" => status.to_string())
        .increment(1);
    ::metrics::histogram!(crate::telemetry::HTTP_DURATION, "endpoint" => endpoint).record(took.as_secs_f64());
    let (user, address) =
        response.extensions().get::<Requester>().map_or(("", ""), |r| (r.user.as_str(), r.address.as_str()));
    let (code, reason) =
        response.extensions().get::<error::Refusal>().map_or(("", ""), |r| (r.code, r.message.as_str()));
    if status >= 500 {
        tracing::warn!(%method, %path, status, user = %user, address = %address, code = %code, reason, micros, "request failed");
    } else if status >= 400 {
        tracing::info!(%method, %path, status, user = %user, address = %address, code = %code, reason, micros, "request refused");
    } else {
        tracing::debug!(%method, %path, status, user = %user, address = %address, micros, "request");
    }
    response
}
