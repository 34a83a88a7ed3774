//! `deltasync serve`: parse flags, open the store, run the server until SIGINT or SIGTERM.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use deltasync_server::auth::{self, JwtVerifier};
use deltasync_server::web::Web;
use deltasync_server::{Auth, Clock, Config};
use tracing_subscriber::EnvFilter;

use super::database::Database;

/// How the server authenticates requests.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AuthMode {
    /// No authentication: one user, `local`. For a single user on a trusted machine.
    None,
    /// HS256 JWTs signed with the secret in --jwt-secret-file; the token's `sub` is the user.
    Jwt,
    /// OpenID Connect ID tokens (Google sign-in and other providers) of --oidc-issuer for
    /// --oidc-audience; each (issuer, subject) pair gets a user, a random UUID, on first sign-in.
    Oidc,
}

/// Flags of `deltasync serve`.
#[derive(Args, Debug)]
#[command(after_help = "Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more detail.\n\
The first line on stdout is `deltasync listening on http://ADDR`, with the real port when --listen uses port 0.")]
pub struct ServeArgs {
    /// Address and port to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8787", value_name = "ADDR")]
    listen: String,
    /// Where the data lives: sqlite://PATH (created if missing), or
    /// postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE for teams and for several
    /// instances sharing one database (add ?options=-csearch_path%3DSCHEMA to use a schema).
    #[arg(
        long,
        default_value = "sqlite://deltasync.db",
        value_name = "URL",
        env = "DELTASYNC_DATABASE",
        hide_env_values = true
    )]
    database: String,
    /// How requests are authenticated.
    #[arg(long, value_enum, default_value = "none")]
    auth: AuthMode,
    /// File holding the HS256 secret for --auth jwt (trailing CR/LF bytes are ignored).
    #[arg(long, value_name = "FILE", required_if_eq("auth", "jwt"))]
    jwt_secret_file: Option<PathBuf>,
    /// An OpenID Connect issuer whose ID tokens --auth oidc accepts, e.g. https://accounts.google.com
    /// (its keys are found through ISSUER/.well-known/openid-configuration). Repeat for several.
    #[arg(long = "oidc-issuer", value_name = "URL", required_if_eq("auth", "oidc"))]
    oidc_issuers: Vec<String>,
    /// An audience (the app's OAuth client id) whose ID tokens --auth oidc accepts: the token's
    /// `aud` must hold one. Repeat for several apps (web, Android, iOS).
    #[arg(long = "oidc-audience", value_name = "CLIENT_ID", required_if_eq("auth", "oidc"))]
    oidc_audiences: Vec<String>,
    /// TOML configuration file: limits, compaction and per-collection merge policies (see config.example.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Let web pages from ORIGIN call the API (CORS, `Authorization` included):
    /// scheme, host and port as the browser sends them (https://app.example.com,
    /// http://localhost:5173), or `*` for any. Repeat for several origins.
    /// Without it, browsers only reach the API from pages the server serves itself (--static).
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// Serve the files of DIR at `/` (index.html for directories), beside the API under /v1/,
    /// so a web app and its server run with one command.
    #[arg(long = "static", value_name = "DIR")]
    static_dir: Option<PathBuf>,
    /// Also serve `GET /metrics` (Prometheus text) on ADDR, without a token: for a
    /// private network where Prometheus scrapes. On the main port /metrics needs a
    /// token unless --auth none.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// How log lines are written to stderr: `text` for people, `json` (one object
    /// per line) for log collectors.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`.
    Json,
}

/// Runs the server.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr);
    match args.log_format {
        // Colour codes only for a person at a terminal, not in a log file or a journal.
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    config.web = Web { cors_origins: args.cors_origins.clone(), static_dir: args.static_dir.clone() };
    config.web.check()?;
    let auth = match args.auth {
        AuthMode::None => Auth::None,
        AuthMode::Jwt => {
            let path = args.jwt_secret_file.as_ref().context("--auth jwt needs --jwt-secret-file")?;
            Auth::Jwt(Box::new(JwtVerifier::new(&auth::read_secret(path)?)))
        }
        AuthMode::Oidc => {
            let verifier = deltasync_server::auth::oidc::OidcVerifier::new(&args.oidc_issuers, &args.oidc_audiences)
                .map_err(anyhow::Error::msg)?;
            Auth::Oidc(std::sync::Arc::new(match oidc_refetch_after()? {
                Some(every) => verifier.with_refetch_after(every),
                None => verifier,
            }))
        }
    };
    let database = Database::parse(&args.database)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let store = database.open().await?;
        // Refuse a changed collection policy before announcing that we listen.
        store.check_policies(&config.policies).await?;
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let metrics = match &args.metrics_listen {
            Some(at) => Some(
                tokio::net::TcpListener::bind(at)
                    .await
                    .with_context(|| format!("cannot listen on {at} (--metrics-listen)"))?,
            ),
            None => None,
        };
        println!("deltasync listening on http://{addr}");
        if let Some(metrics) = &metrics {
            let at = metrics.local_addr()?;
            tracing::info!(%at, "metrics without a token at http://{at}/metrics");
        }
        tracing::info!(%addr, database = %database.describe(), auth = ?args.auth, "serving");
        let clock = Clock::system();
        deltasync_server::run_with_metrics_port(listener, metrics, store, config, auth, clock, shutdown_signal())
            .await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("cannot install the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// `DELTASYNC_OIDC_REFETCH_SECS` (1 to 3600): how often an issuer's keys may
/// be fetched, instead of once a minute (for tests of key rotation).
fn oidc_refetch_after() -> anyhow::Result<Option<std::time::Duration>> {
    let Ok(value) = std::env::var("DELTASYNC_OIDC_REFETCH_SECS") else { return Ok(None) };
    match value.parse::<u64>() {
        Ok(secs @ 1..=3600) => Ok(Some(std::time::Duration::from_secs(secs))),
        _ => {
            anyhow::bail!("DELTASYNC_OIDC_REFETCH_SECS must be a whole number of seconds from 1 to 3600, got {value:?}")
        }
    }
}
