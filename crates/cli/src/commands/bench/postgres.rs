//! A PostgreSQL schema of its own for one bench run: created empty at the
//! start, named `bench_<random>`, handed to every child server through
//! `options=-csearch_path=…`, and dropped (with everything in it) at the end.

use std::hash::{BuildHasher, Hasher};

use anyhow::Context;
use tokio_postgres::NoTls;

use crate::commands::database::{redact, with_search_path};

/// A schema created for this run.
pub struct BenchSchema {
    admin_url: String,
    /// Its name, `bench_` and 16 hex digits.
    pub name: String,
    /// The URL the child servers get: the given one with the schema as search path.
    pub server_url: String,
}

impl BenchSchema {
    /// Connects to `url` and creates a fresh schema in its database.
    pub async fn create(url: &str) -> anyhow::Result<BenchSchema> {
        let name = format!("bench_{}", random_hex());
        let client = connect(url).await?;
        client
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .with_context(|| format!("cannot create schema {name} in {}", redact(url)))?;
        Ok(BenchSchema { admin_url: url.to_owned(), server_url: with_search_path(url, &name), name })
    }

    /// Drops the schema and everything in it. Call it after the servers have stopped.
    pub async fn drop_schema(self) -> anyhow::Result<()> {
        let client = connect(&self.admin_url).await?;
        client
            .batch_execute(&format!("SET lock_timeout = '30s'; DROP SCHEMA IF EXISTS {} CASCADE", self.name))
            .await
            .with_context(|| format!("cannot drop schema {} in {}", self.name, redact(&self.admin_url)))?;
        Ok(())
    }
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(url)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("bench: PostgreSQL connection error: {e}");
        }
    });
    Ok(client)
}

/// 16 random hex digits (from the standard library's randomly seeded hasher).
fn random_hex() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_fresh_and_safe() {
        let (a, b) = (random_hex(), random_hex());
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }
}
