//! The deltasync sync server.
//!
//! # Layout
//!
//! - [`config`]: the TOML configuration (limits, merge policies).
//! - [`auth`]: `--auth none` and HS256 JWTs.
//! - [`api`]: one module per endpoint; [`api::ApiError`] turns every failure into a JSON answer.
//! - [`batch`]: what a push does to a dataset, decided in memory, the same for every store.
//! - [`store`]: the [`store::Store`] interface and its SQLite implementation.
//! - [`clock`]: the injectable clock.
//! - [`compactor`]: the background compaction pass.
//! - [`net`]: connections: the cap, their deadlines, and shutdown within a bounded time.
//!
//! Binaries parse their configuration, open a store and call [`run`] with a
//! listener and a shutdown signal; tests do the same on port 0.

pub mod api;
pub mod auth;
pub mod clock;
pub mod compactor;
pub mod config;
pub mod net;
pub mod rate;
pub mod refusals;
pub mod store;
pub mod telemetry;
pub mod web;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use auth::Auth;
pub use clock::Clock;
pub use config::Config;
/// The push planner lives in the protocol crate, beside the merge rules it
/// applies, so a device that syncs through a file store runs the same code.
pub use deltasync_protocol::batch;
pub use store::{Store, StoreError};

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The store refused to start (for example a changed collection policy).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listener failed.
    #[error("the HTTP listener failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the API on `listener` until `shutdown` completes, then lets
/// in-flight requests finish (for at most `shutdown_grace`, after which the
/// connections still open are closed), commits every queued write and returns.
pub async fn run(
    listener: TcpListener,
    store: Arc<dyn Store>,
    config: Config,
    auth: Auth,
    clock: Clock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run_with_metrics_port(listener, None, store, config, auth, clock, shutdown).await
}

/// As [`run`], and when `metrics` is given, serves `GET /metrics` there too,
/// without authentication (`deltasync serve --metrics-listen`): a port for
/// a private network, where Prometheus scrapes without a token.
pub async fn run_with_metrics_port(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    store: Arc<dyn Store>,
    config: Config,
    auth: Auth,
    clock: Clock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    store.check_policies(&config.policies).await?;
    telemetry::recorder();
    let upkeep = tokio::spawn(telemetry::upkeep());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let network = config.network.clone();
    let compactor =
        tokio::spawn(compactor::run_compactor(store.clone(), config.compaction, clock.clone(), shutdown_rx.clone()));
    let state = Arc::new(api::AppState::new(store.clone(), config, auth, clock, shutdown_rx.clone()));
    let metrics_port = metrics.map(|listener| {
        let app = api::metrics_router(state.clone());
        let (network, mut closing) = (network.clone(), shutdown_rx.clone());
        tokio::spawn(async move {
            let closed = async move {
                let _ = closing.wait_for(|closing| *closing).await;
            };
            if let Err(e) = net::serve(listener, app, &network, closed).await {
                tracing::error!(error = %e, "the metrics port failed");
            }
        })
    });
    let app = api::router(state);
    let result = net::serve(listener, app, &network, async move {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = shutdown_tx.send(true);
    })
    .await;
    if let Some(port) = metrics_port {
        let _ = port.await;
    }
    upkeep.abort();
    if let Err(e) = compactor.await {
        tracing::error!(error = %e, "the compactor task failed");
    }
    store.close().await;
    tracing::info!("stopped; every acknowledged change is committed");
    result.map_err(ServeError::Io)
}
