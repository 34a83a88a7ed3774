//! `deltasync serve`: parse flags, open the store, run the server until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use deltasync_server::auth::{self, JwtVerifier};
use deltasync_server::store::Migrated;
use deltasync_server::store::postgres::PostgresStore;
use deltasync_server::store::sqlite::SqliteStore;
use deltasync_server::{Auth, Clock, Config, Store};
use tracing_subscriber::EnvFilter;

/// How the server authenticates requests.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AuthMode {
    /// No authentication: one user, `local`. For a single user on a trusted machine.
    None,
    /// HS256 JWTs signed with the secret in --jwt-secret-file; the token's `sub` is the user.
    Jwt,
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
    /// TOML configuration file: limits and per-collection merge policies (see config.example.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Where the data lives, as given by `--database`.
#[derive(Debug, Clone)]
pub enum Database {
    /// An embedded SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL.
    Postgres(String),
}

impl Database {
    /// Parses `sqlite://PATH` or `postgres://…` (also `postgresql://…`).
    pub fn parse(url: &str) -> anyhow::Result<Database> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                bail!("--database sqlite:// needs a file path, e.g. sqlite://deltasync.db");
            }
            return Ok(Database::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Database::Postgres(url.to_owned()));
        }
        bail!("--database must be sqlite://PATH or postgres://USER@HOST/DATABASE, got {url:?}")
    }

    /// The URL with any password hidden, for logs and messages.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(path) => format!("sqlite://{}", path.display()),
            Database::Postgres(url) => hide_password(url),
        }
    }

    /// Opens the store, applying missing migrations.
    pub async fn open(&self) -> anyhow::Result<Arc<dyn Store>> {
        Ok(match self {
            Database::Sqlite(path) => Arc::new(SqliteStore::open(path)?),
            Database::Postgres(url) => Arc::new(
                PostgresStore::connect(url)
                    .await
                    .with_context(|| format!("cannot open the PostgreSQL store at {}", self.describe()))?,
            ),
        })
    }

    /// Applies missing migrations and says which.
    pub async fn migrate(&self) -> anyhow::Result<Migrated> {
        Ok(match self {
            Database::Sqlite(path) => SqliteStore::migrate(path)?,
            Database::Postgres(url) => PostgresStore::migrate(url)
                .await
                .with_context(|| format!("cannot migrate the PostgreSQL database at {}", self.describe()))?,
        })
    }
}

/// `scheme://user:secret@host…` → `scheme://user:***@host…`.
fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let Some((userinfo, host)) = rest.split_once('@') else { return url.to_owned() };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Runs the server.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let auth = match args.auth {
        AuthMode::None => Auth::None,
        AuthMode::Jwt => {
            let path = args.jwt_secret_file.as_ref().context("--auth jwt needs --jwt-secret-file")?;
            Auth::Jwt(Box::new(JwtVerifier::new(&auth::read_secret(path)?)))
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
        println!("deltasync listening on http://{addr}");
        tracing::info!(%addr, database = %database.describe(), auth = ?args.auth, "serving");
        deltasync_server::run(listener, store, config, auth, Clock::system(), shutdown_signal()).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_the_logs() {
        assert_eq!(hide_password("postgres://app:s3cret@db:5432/x"), "postgres://app:***@db:5432/x");
        assert_eq!(hide_password("postgres://app@db/x"), "postgres://app@db/x");
    }

    #[test]
    fn database_urls_are_recognised() {
        assert!(matches!(Database::parse("sqlite://a.db").unwrap(), Database::Sqlite(_)));
        assert!(matches!(Database::parse("postgresql://u@h/d").unwrap(), Database::Postgres(_)));
        assert!(Database::parse("mysql://u@h/d").unwrap_err().to_string().contains("sqlite://PATH"));
        assert!(Database::parse("sqlite://").is_err());
    }
}
