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
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request};
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
            config,
            auth,
            clock,
            shutdown,
            bootstraps: Default::default(),
            live: Default::default(),
            live_heads: Default::default(),
            health: health::WriteProbe::default(),
        }
    }
}

/// The authenticated user of a request.
pub struct AuthUser(pub UserId);

impl FromRequestParts<Arc<AppState>> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let header = parts.headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
        state.auth.authenticate(header).map(AuthUser).map_err(|e| ApiError::Unauthorized(e.to_string()))
    }
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
        .route("/healthz", get(health::healthz));
    let router = web
        .with_static(routes, Router::new().fallback(not_found))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn(refuse_long_uris))
        .layer(middleware::from_fn(log_request))
        .with_state(state);
    web.with_cors(router)
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

async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let micros = started.elapsed().as_micros() as u64;
    if status >= 500 {
        tracing::warn!(%method, %path, status, micros, "request failed");
    } else {
        tracing::debug!(%method, %path, status, micros, "request");
    }
    response
}
