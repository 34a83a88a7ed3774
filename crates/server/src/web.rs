//! The server for web pages: CORS for the origins it is told to trust
//! (`--cors-origin`), and a folder served at `/` beside `/v1/` (`--static`),
//! so that a web app and its server run with one command.
//!
//! Without either, the router is exactly the API's: a preflight
//! (`OPTIONS /v1/sync`) is answered 405, as before.

use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::services::ServeDir;

/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// What the server does for web pages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Web {
    /// Origins whose pages may call the API (`https://app.example.com`), or `*` for any.
    pub cors_origins: Vec<String>,
    /// A folder served at `/` (its `index.html` for directories).
    pub static_dir: Option<PathBuf>,
}

/// Why `--cors-origin` or `--static` cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WebError(String);

impl Web {
    /// Checks the origins (`*`, or `scheme://host[:port]` with no path) and the folder.
    pub fn check(&self) -> Result<(), WebError> {
        for origin in &self.cors_origins {
            if origin == "*" {
                continue;
            }
            let rest = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
            let host_port = rest.filter(|r| !r.is_empty() && !r.contains('/') && !r.contains(char::is_whitespace));
            if host_port.is_none() || HeaderValue::from_str(origin).is_err() {
                return Err(WebError(format!(
                    "--cors-origin {origin:?} is not an origin: give `*`, or a scheme, host and optional port \
                     with no path and no trailing slash, as browsers send it (https://app.example.com, \
                     http://localhost:5173)"
                )));
            }
        }
        if let Some(dir) = &self.static_dir
            && !dir.is_dir()
        {
            return Err(WebError(format!("--static {}: not a directory", dir.display())));
        }
        Ok(())
    }

    /// `routes` with the folder behind them: paths the API does not know go
    /// to the folder, and what the folder lacks (or a method other than GET
    /// and HEAD) gets `not_found`'s answer. Without a folder, `not_found` itself.
    pub fn with_static<S>(&self, routes: Router<S>, not_found: Router) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        match &self.static_dir {
            Some(dir) => routes
                .fallback_service(ServeDir::new(dir).call_fallback_on_method_not_allowed(true).fallback(not_found)),
            None => routes.fallback_service(not_found),
        }
    }

    /// The router inside the CORS layer, when some origin is trusted.
    pub fn with_cors(&self, router: Router) -> Router {
        match self.cors() {
            Some(cors) => router.layer(cors),
            None => router,
        }
    }

    /// The CORS layer, when some origin is trusted.
    fn cors(&self) -> Option<CorsLayer> {
        if self.cors_origins.is_empty() {
            return None;
        }
        let origins = if self.cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(self.cors_origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
        };
        // `Authorization` must be named: a wildcard never covers it (Fetch standard).
        let exposed = [header::RETRY_AFTER, header::WWW_AUTHENTICATE, HeaderName::from_static("content-type")];
        Some(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
                .expose_headers(exposed)
                .max_age(PREFLIGHT_MAX_AGE),
        )
    }
}
