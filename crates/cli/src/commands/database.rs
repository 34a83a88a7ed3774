//! What `--database` names, for `serve`, `migrate` and `bench`: parsing,
//! opening the store, and printing a URL without its password.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use deltasync_server::Store;
use deltasync_server::store::Migrated;
use deltasync_server::store::postgres::PostgresStore;
use deltasync_server::store::sqlite::SqliteStore;

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
        if is_postgres(url) {
            return Ok(Database::Postgres(url.to_owned()));
        }
        bail!("--database must be sqlite://PATH or postgres://USER@HOST/DATABASE, got {url:?}")
    }

    /// The URL with any password hidden, for logs and messages.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(path) => format!("sqlite://{}", path.display()),
            Database::Postgres(url) => redact(url),
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

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `url` with its password (if any) replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        _ => url.to_owned(),
    }
}

/// `url` with `options=-csearch_path=SCHEMA` added to its query string.
pub fn with_search_path(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_path_joins_the_query_string() {
        assert_eq!(
            with_search_path("postgres://u@h:5432/db", "bench_1"),
            "postgres://u@h:5432/db?options=-csearch_path%3Dbench_1"
        );
        assert_eq!(
            with_search_path("postgres://u@h/db?sslmode=disable", "bench_1"),
            "postgres://u@h/db?sslmode=disable&options=-csearch_path%3Dbench_1"
        );
    }

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(redact("postgres://u:secret@h:5432/db?x=1"), "postgres://u:***@h:5432/db?x=1");
        assert_eq!(redact("postgres://u@h:5432/db"), "postgres://u@h:5432/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
        assert_eq!(redact("postgres://app:p@ss@db/x"), "postgres://app:***@db/x");
    }

    #[test]
    fn database_urls_are_recognised() {
        assert!(matches!(Database::parse("sqlite://a.db").unwrap(), Database::Sqlite(_)));
        assert!(matches!(Database::parse("postgresql://u@h/d").unwrap(), Database::Postgres(_)));
        assert!(Database::parse("mysql://u@h/d").unwrap_err().to_string().contains("sqlite://PATH"));
        assert!(Database::parse("sqlite://").is_err());
    }
}
