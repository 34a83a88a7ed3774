//! The PostgreSQL store: for teams, and for several server instances behind
//! a load balancer sharing one database.
//!
//! # How several instances stay correct
//!
//! - **One writer per dataset at a time.** A push opens a transaction and
//!   first locks its dataset's row (`INSERT … ON CONFLICT DO UPDATE …
//!   RETURNING` takes the row lock and reads the newest committed head). Seqs
//!   are taken from that head, inside the committing transaction, so every
//!   dataset gets strictly increasing, gapless seqs and one hash chain,
//!   whichever instance a push reaches. Pushes for other users lock other
//!   rows and run in parallel; a push locks one dataset row and then one
//!   device row, and a cursor update locks only one device row, so no two
//!   transactions can wait on each other in a cycle.
//! - **Pulls never skip a change.** Because the dataset lock is held until
//!   commit, the commits of one dataset happen in seq order: once a head is
//!   visible, every change up to it is visible too. A page reads the head
//!   first and then only changes up to it.
//! - **Long polls wake across instances.** The pushing transaction sends
//!   `NOTIFY` on a channel named after the schema; PostgreSQL delivers it at
//!   commit to every instance, where one dedicated `LISTEN` connection wakes
//!   the local waiters. If that connection drops, it is re-opened with
//!   backoff and every waiter is woken once, in case a notification was lost.
//! - **Connection loss is transient.** Any failure to reach PostgreSQL maps
//!   to [`StoreError::Unavailable`] (HTTP 503); the pool drops broken
//!   connections and opens new ones when the database is back. A push is
//!   acknowledged only after `COMMIT` returned, and a push whose commit
//!   outcome is unknown is retried by clients under the same change ids,
//!   which the log answers as duplicates.

//!
//! The store is split by concept: [`writer`] (the SQL of a push), [`reads`]
//! (every read, bootstrap included), [`listen`] (notifications across
//! instances), [`compact`] (the SQL of compaction), [`admin`] (the read-only
//! connection of admin reports). What the rows mean and
//! every decision that does not depend on PostgreSQL are shared with SQLite
//! (see [`crate::store::core`]).

mod admin;
mod compact;
mod listen;
mod reads;
mod writer;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use deltasync_protocol::UserId;
use deltasync_protocol::wire::Policies;
use tokio::sync::watch;
use tokio_postgres::NoTls;
use tokio_postgres::types::Type;

pub use self::admin::PostgresAdminSource;
pub(crate) use self::admin::admin_source;
use self::listen::{channel_name, listen};
use self::reads::{read_collection_policies, read_conflicts, read_head, read_page, read_status};
use self::writer::TOUCH_DEVICE_ASYNC;
use super::core::compact::{CompactRules, run_pass};
use super::core::migrations::MigrationPlan;
use super::notify::Notifier;
use super::page::PageLimit;
use super::rows::{self, ColumnValue, Columns};
use super::schema::POSTGRES_MIGRATIONS;
use super::{
    BootstrapStream, BoxFuture, Compacted, ConflictPage, DatasetStatus, DeviceTouch, Migrated, PageOutcome, PushBatch,
    PushOutcome, Store, StoreError, StoreFuture,
};

/// Connections each instance keeps at most.
const POOL_SIZE: usize = 16;
/// How long to wait for a connection (new or from the pool) before answering 503.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The advisory lock that serialises migrations of one database.
const MIGRATION_LOCK: i64 = 0x6465_6c74_6173_796e; // "deltasyn"

/// Maps a PostgreSQL error to the store's kinds: anything that means "the
/// database cannot be reached right now" is [`StoreError::Unavailable`].
fn map_err(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let msg = format!("PostgreSQL said: {} (SQLSTATE {code})", db.message());
        // 08: connection exception; 53: insufficient resources; 57P: shutdown
        // or restart in progress; 40001/40P01: serialization failure or deadlock.
        return if code.starts_with("08") || code.starts_with("53") || code.starts_with("57P") || code.starts_with("40")
        {
            StoreError::Unavailable(msg)
        } else if code.starts_with("XX") {
            StoreError::Corrupt(msg)
        } else {
            StoreError::Internal(msg)
        };
    }
    let mut text = e.to_string();
    if let Some(cause) = std::error::Error::source(&e) {
        text = format!("{text}: {cause}");
    }
    if text.starts_with("error connecting") || text.starts_with("timeout waiting") {
        StoreError::Unavailable(format!("cannot connect to PostgreSQL ({text})"))
    } else if e.is_closed() || text.starts_with("error communicating") {
        StoreError::Unavailable(format!("lost the connection to PostgreSQL ({text})"))
    } else {
        StoreError::Internal(format!("PostgreSQL client error: {text}"))
    }
}

/// Maps a connection pool error to the store's kinds: a pool that cannot
/// hand out a connection in time is [`StoreError::Unavailable`].
fn map_pool_err(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => map_err(e),
        PoolError::Timeout(_) => StoreError::Unavailable(format!(
            "no PostgreSQL connection could be had within {} s",
            CONNECT_TIMEOUT.as_secs()
        )),
        PoolError::Closed => StoreError::ShuttingDown,
        other => StoreError::Internal(format!("connection pool: {other}")),
    }
}

/// A column that does not hold what the schema says: [`StoreError::Corrupt`].
fn corrupt_column(e: tokio_postgres::Error) -> StoreError {
    rows::corrupt(format!("unexpected column value: {e}"))
}

impl Columns for tokio_postgres::Row {
    fn value(&self, i: usize) -> Result<ColumnValue<'_>, StoreError> {
        let column = self.columns().get(i).ok_or_else(|| rows::corrupt(format!("the row has no column {i}")))?;
        let value = match *column.type_() {
            Type::INT8 => self.try_get::<_, Option<i64>>(i).map(|v| v.map(ColumnValue::Int)),
            Type::INT4 => self.try_get::<_, Option<i32>>(i).map(|v| v.map(|v| ColumnValue::Int(v.into()))),
            Type::BOOL => self.try_get::<_, Option<bool>>(i).map(|v| v.map(ColumnValue::Bool)),
            Type::TEXT => self.try_get::<_, Option<&str>>(i).map(|v| v.map(ColumnValue::Text)),
            Type::BYTEA => self.try_get::<_, Option<&[u8]>>(i).map(|v| v.map(ColumnValue::Bytes)),
            ref other => return Err(rows::corrupt(format!("column {i} has the unexpected type {other}"))),
        };
        Ok(value.map_err(corrupt_column)?.unwrap_or(ColumnValue::Null))
    }
}

/// Parses a `postgres://` URL, filling in deltasync's defaults.
fn parse_url(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
        StoreError::InvalidDatabaseUrl(format!(
            "{e}; expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?options=-csearch_path%3DSCHEMA]"
        ))
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("deltasync");
    }
    Ok(config)
}

/// Opens one connection outside the pool, driving it on its own task.
async fn connect_once(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, StoreError> {
    let (client, connection) = config.connect(NoTls).await.map_err(map_err)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// Applies the missing migrations in one transaction, under an advisory lock
/// so that instances starting together migrate once.
async fn migrate_on(client: &mut tokio_postgres::Client) -> Result<Migrated, StoreError> {
    let tx = client.transaction().await.map_err(map_err)?;
    tx.batch_execute("SET LOCAL client_min_messages = warning").await.map_err(map_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(map_err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)").await.map_err(map_err)?;
    let found: i64 =
        tx.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[]).await.map_err(map_err)?.get(0);
    let plan = MigrationPlan::new(found, POSTGRES_MIGRATIONS)?;
    for step in plan.steps() {
        tx.batch_execute(step.sql).await.map_err(map_err)?;
        tx.execute("DELETE FROM schema_version", &[]).await.map_err(map_err)?;
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&step.version]).await.map_err(map_err)?;
        step.applied();
    }
    tx.commit().await.map_err(map_err)?;
    Ok(plan.migrated())
}

/// The PostgreSQL store. See the module documentation.
pub struct PostgresStore {
    pool: Pool,
    notifier: Arc<Notifier>,
    channel: String,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl PostgresStore {
    /// Connects to the database at `url`, applies missing migrations and
    /// starts listening for pushes made through other instances.
    pub async fn connect(url: &str) -> Result<PostgresStore, StoreError> {
        let config = parse_url(url)?;
        let mut client = connect_once(&config).await?;
        migrate_on(&mut client).await?;
        let schema: Option<String> = client.query_one("SELECT current_schema()", &[]).await.map_err(map_err)?.get(0);
        let schema = schema.ok_or_else(|| {
            StoreError::InvalidDatabaseUrl("the search_path names no existing schema; create it first".into())
        })?;
        drop(client);
        let channel = channel_name(&schema);
        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Internal(format!("cannot build the connection pool: {e}")))?;
        let notifier = Arc::new(Notifier::default());
        let listener = tokio::spawn(listen(config, channel.clone(), notifier.clone()));
        tracing::info!(%schema, %channel, "PostgreSQL store ready");
        Ok(PostgresStore { pool, notifier, channel, listener: Mutex::new(Some(listener)) })
    }

    /// Applies missing migrations to the database at `url` and says which.
    pub async fn migrate(url: &str) -> Result<Migrated, StoreError> {
        let mut client = connect_once(&parse_url(url)?).await?;
        migrate_on(&mut client).await
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(map_pool_err)
    }
}

impl Store for PostgresStore {
    fn check_policies<'a>(&'a self, policies: &'a Policies) -> StoreFuture<'a, ()> {
        Box::pin(async move { rows::check_policies(read_collection_policies(&self.client().await?).await?, policies) })
    }

    fn push(&self, batch: PushBatch, policies: Policies) -> StoreFuture<'_, PushOutcome> {
        Box::pin(self.push_batch(batch, policies))
    }

    fn changes_since<'a>(&'a self, user: &'a UserId, cursor: u64, limit: PageLimit) -> StoreFuture<'a, PageOutcome> {
        Box::pin(async move { read_page(&self.client().await?, user, cursor, limit).await })
    }

    fn touch_device(&self, touch: DeviceTouch) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let client = self.client().await?;
            let stmt = client.prepare_cached(TOUCH_DEVICE_ASYNC).await.map_err(map_err)?;
            let (cursor, now) = (touch.cursor.unwrap_or(0) as i64, touch.now as i64);
            client
                .execute(&stmt, &[&touch.user.as_str(), &touch.device.as_str(), &cursor, &now])
                .await
                .map_err(map_err)?;
            Ok(())
        })
    }

    fn status<'a>(&'a self, user: &'a UserId) -> StoreFuture<'a, DatasetStatus> {
        Box::pin(async move { read_status(&self.client().await?, user).await })
    }

    fn user_for_identity<'a>(&'a self, issuer: &'a str, subject: &'a str, now: u64) -> StoreFuture<'a, UserId> {
        use super::core::users::{CREATE_USER, FIND_USER, new_user_id, user_id};
        Box::pin(async move {
            let client = self.client().await?;
            let find = client.prepare_cached(FIND_USER).await.map_err(map_err)?;
            if let Some(row) = client.query_opt(&find, &[&issuer, &subject]).await.map_err(map_err)? {
                return user_id(row.get(0));
            }
            let create = client.prepare_cached(CREATE_USER).await.map_err(map_err)?;
            client.execute(&create, &[&new_user_id(), &issuer, &subject, &(now as i64)]).await.map_err(map_err)?;
            let row = client.query_one(&find, &[&issuer, &subject]).await.map_err(map_err)?;
            user_id(row.get(0))
        })
    }

    fn head<'a>(&'a self, user: &'a UserId) -> StoreFuture<'a, crate::batch::DatasetHead> {
        Box::pin(async move { read_head(&self.client().await?, user).await })
    }

    fn conflicts<'a>(&'a self, user: &'a UserId, since: u64, limit: u64) -> StoreFuture<'a, ConflictPage> {
        Box::pin(async move { read_conflicts(&self.client().await?, user, since, limit).await })
    }

    fn bootstrap<'a>(&'a self, user: &'a UserId, stall: Duration) -> StoreFuture<'a, BootstrapStream> {
        Box::pin(reads::bootstrap(self.pool.clone(), user.clone(), stall))
    }

    fn subscribe(&self, user: &UserId) -> watch::Receiver<u64> {
        self.notifier.subscribe(user)
    }

    fn compact<'a>(&'a self, rules: &'a CompactRules) -> StoreFuture<'a, Compacted> {
        Box::pin(run_pass(self, rules))
    }

    fn health(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.client().await?.simple_query("SELECT 1").await.map_err(map_err)?;
            Ok(())
        })
    }

    fn write_probe(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.client().await?.simple_query("UPDATE schema_version SET version = version").await.map_err(map_err)?;
            Ok(())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(listener) = self.listener.lock().expect("listener lock").take() {
                listener.abort();
            }
            self.pool.close();
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_are_refused_with_the_expected_form() {
        let Err(StoreError::InvalidDatabaseUrl(msg)) = parse_url("postgres://host:notaport/db") else {
            panic!("a bad port was accepted");
        };
        assert!(msg.contains("postgres://USER"), "{msg}");
    }
}
