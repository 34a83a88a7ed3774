//! The PostgreSQL side of the admin reports (see [`crate::store::admin`]):
//! one connection of its own, every transaction read-only, no migration.

use tokio_postgres::types::ToSql;

use super::{connect_once, map_err, parse_url};
use crate::store::admin::{AdminError, AdminSource, Param, Row, check_schema};
use crate::store::schema::POSTGRES_MIGRATIONS;
use crate::store::{BoxFuture, StoreError};

/// A read-only connection to a PostgreSQL database, for admin reports.
pub struct PostgresAdminSource {
    client: tokio_postgres::Client,
}

/// Connects to the database at `url`, read-only, and answers it with its
/// schema version, which must be the one this build reads.
pub(crate) async fn admin_source(url: &str) -> Result<(PostgresAdminSource, i64), AdminError> {
    let client = connect_once(&parse_url(url)?).await?;
    client.batch_execute("SET default_transaction_read_only = on").await.map_err(map_err)?;
    let table = client
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL, current_schema()", &[])
        .await
        .map_err(map_err)?;
    let schema: Option<String> = table.get(1);
    let found = if table.get::<_, bool>(0) {
        let row =
            client.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[]).await.map_err(map_err)?;
        Some(row.get::<_, i64>(0))
    } else {
        None
    };
    let place = format!("the PostgreSQL schema {:?}", schema.unwrap_or_default());
    let version = check_schema(found, POSTGRES_MIGRATIONS.len() as i64, &place)?;
    Ok((PostgresAdminSource { client }, version))
}

/// `sql` with its `?N` placeholders written the PostgreSQL way, `$N`.
fn dollar_placeholders(sql: &str) -> String {
    sql.replace('?', "$")
}

impl AdminSource for PostgresAdminSource {
    fn store(&self) -> &'static str {
        "postgres"
    }

    fn begin(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await.map_err(map_err)
        })
    }

    fn end(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.client.batch_execute("COMMIT").await.map_err(map_err) })
    }

    fn rows<'a>(&'a mut self, sql: &'a str, params: &'a [Param<'a>]) -> BoxFuture<'a, Result<Vec<Row>, StoreError>> {
        Box::pin(async move {
            let values: Vec<&(dyn ToSql + Sync)> = params
                .iter()
                .map(|p| match p {
                    Param::Text(t) => t as &(dyn ToSql + Sync),
                    Param::Int(i) => i as &(dyn ToSql + Sync),
                })
                .collect();
            let found = self.client.query(&dollar_placeholders(sql), &values).await.map_err(map_err)?;
            found.iter().map(|r| Row::copy(r, r.len())).collect()
        })
    }

    fn database_bytes(&mut self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let row = self
                .client
                .query_one(
                    "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::BIGINT
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'm')",
                    &[],
                )
                .await
                .map_err(map_err)?;
            Ok(row.get::<_, i64>(0) as u64)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollar_numbers() {
        assert_eq!(dollar_placeholders("a = ?1 AND b = ?2 LIMIT ?2"), "a = $1 AND b = $2 LIMIT $2");
    }
}
