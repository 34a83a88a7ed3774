//! The SQLite side of the admin reports (see [`crate::store::admin`]): a
//! read-only connection, opened without migrating and without writing.
//!
//! Reports run once per `deltasync admin` process, so their queries run on
//! the calling thread.

use std::path::{Path, PathBuf};

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::map_err;
use crate::store::admin::{AdminError, AdminSource, Param, Row, check_schema};
use crate::store::schema::SQLITE_MIGRATIONS;
use crate::store::{BoxFuture, StoreError};

/// A read-only connection to a SQLite database, for admin reports.
pub struct SqliteAdminSource {
    conn: Connection,
    path: PathBuf,
}

/// Opens the database at `path` read-only and answers it with its schema
/// version, which must be the one this build reads.
pub(crate) fn admin_source(path: &Path) -> Result<(SqliteAdminSource, i64), AdminError> {
    if !path.is_file() {
        return Err(AdminError::NoDatabase(path.display().to_string()));
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| StoreError::Unavailable(format!("cannot open SQLite database {}: {e}", path.display())))?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(map_err)?;
    conn.pragma_update(None, "query_only", true).map_err(map_err)?;
    let found = schema_version(&conn)?;
    let version = check_schema(found, SQLITE_MIGRATIONS.len() as i64, &format!("sqlite://{}", path.display()))?;
    Ok((SqliteAdminSource { conn, path: path.to_owned() }, version))
}

/// The version in `schema_version`, or `None` when the table does not exist.
fn schema_version(conn: &Connection) -> Result<Option<i64>, StoreError> {
    let exists = conn
        .query_row("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'schema_version'", [], |_| Ok(()))
        .optional()
        .map_err(map_err)?;
    if exists.is_none() {
        return Ok(None);
    }
    conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0)).map(Some).map_err(map_err)
}

impl SqliteAdminSource {
    fn query(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        let mut stmt = self.conn.prepare(sql).map_err(map_err)?;
        let columns = stmt.column_count();
        let values: Vec<Value> = params
            .iter()
            .map(|p| match p {
                Param::Text(t) => Value::Text((*t).to_owned()),
                Param::Int(i) => Value::Integer(*i),
            })
            .collect();
        let mut found = stmt.query(rusqlite::params_from_iter(values)).map_err(map_err)?;
        let mut rows = Vec::new();
        while let Some(r) = found.next().map_err(map_err)? {
            rows.push(Row::copy(r, columns)?);
        }
        Ok(rows)
    }

    /// The database file and its WAL, in bytes.
    fn file_bytes(&self) -> Result<u64, StoreError> {
        let size = |p: &Path| match std::fs::metadata(p) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(StoreError::Unavailable(format!("cannot read the size of {}: {e}", p.display()))),
        };
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        Ok(size(&self.path)? + size(Path::new(&wal))?)
    }
}

impl AdminSource for SqliteAdminSource {
    fn store(&self) -> &'static str {
        "sqlite"
    }

    fn begin(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.conn.execute_batch("BEGIN").map_err(map_err) })
    }

    fn end(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.conn.execute_batch("COMMIT").map_err(map_err) })
    }

    fn rows<'a>(&'a mut self, sql: &'a str, params: &'a [Param<'a>]) -> BoxFuture<'a, Result<Vec<Row>, StoreError>> {
        Box::pin(async move { self.query(sql, params) })
    }

    fn database_bytes(&mut self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move { self.file_bytes() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::admin::Admin;
    use crate::store::sqlite::{migrate, open_wal};
    use deltasync_protocol::UserId;

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    /// A migrated database holding alice's entities: `a` folded and live,
    /// `b` folded then deleted by a pending row, `c` pending only (three
    /// states, newest live), `d` folded and deleted; bob's `x` pending only.
    fn database(path: &Path) {
        let conn = open_wal(path).unwrap();
        migrate(&conn).unwrap();
        conn.execute_batch(
            "INSERT INTO datasets (user_id, head, state_hash, state_digest, horizon) VALUES
                ('alice', 9, zeroblob(32), zeroblob(32), 2), ('bob', 1, zeroblob(32), zeroblob(32), 0);
             INSERT INTO devices (user_id, device_id, cursor, last_seen) VALUES ('carol', 'tablet', 0, 5);
             INSERT INTO entities (user_id, collection, entity_id, data, version, deleted, meta) VALUES
                ('alice', 'notes', 'a', '{}', 1, 0, '{}'), ('alice', 'notes', 'b', '{}', 2, 0, '{}'),
                ('alice', 'notes', 'd', '{}', 3, 1, '{}');
             INSERT INTO pending_entities (user_id, collection, entity_id, data, version, deleted, meta) VALUES
                ('alice', 'notes', 'b', '{}', 4, 1, '{}'), ('alice', 'notes', 'c', '{}', 5, 0, '{}'),
                ('alice', 'notes', 'c', '{}', 6, 1, '{}'), ('alice', 'notes', 'c', '{}', 7, 0, '{}'),
                ('bob', 'notes', 'x', '{}', 1, 0, '{}');",
        )
        .unwrap();
    }

    #[test]
    fn entities_count_pending_states_over_folded_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.db");
        database(&path);
        let mut admin = Admin::open_sqlite(&path).unwrap();
        let users = block_on(admin.users()).unwrap();
        let counts: Vec<_> = users.iter().map(|u| (u.user_id.as_str(), u.entities, u.head, u.devices)).collect();
        assert_eq!(counts, [("alice", 2, 9, 0), ("bob", 1, 1, 0), ("carol", 0, 0, 1)]);
        let stats = block_on(admin.stats()).unwrap();
        assert_eq!((stats.users, stats.entities, stats.tombstones, stats.devices), (3, 3, 2, 1));
        assert_eq!(stats.datasets.iter().map(|d| d.horizon).collect::<Vec<_>>(), [2, 0]);
        assert!(stats.database_bytes > 0);
        let carol = block_on(admin.devices(&UserId::parse("carol").unwrap())).unwrap();
        assert_eq!((carol.head, carol.devices.len()), (0, 1), "a user with a device but no dataset is known");
        let nobody = block_on(admin.devices(&UserId::parse("dave").unwrap())).unwrap_err();
        assert!(matches!(nobody, AdminError::UnknownUser(ref u) if u == "dave"), "{nobody}");
    }

    #[test]
    fn admin_refuses_what_it_cannot_read_and_never_writes() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.db");
        assert!(matches!(Admin::open_sqlite(&missing), Err(AdminError::NoDatabase(_))));
        assert!(!missing.exists(), "opening for a report does not create the file");

        let empty = dir.path().join("empty.db");
        Connection::open(&empty).unwrap().execute_batch("CREATE TABLE other (x INTEGER)").unwrap();
        assert!(matches!(Admin::open_sqlite(&empty), Err(AdminError::NoSchema(_))));

        let path = dir.path().join("admin.db");
        database(&path);
        let set = |v: i64| open_wal(&path).unwrap().execute("UPDATE schema_version SET version = ?1", [v]).unwrap();
        set(2);
        assert!(matches!(Admin::open_sqlite(&path), Err(AdminError::SchemaTooOld { found: 2, .. })));
        let version: i64 =
            open_wal(&path).unwrap().query_row("SELECT version FROM schema_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 2, "admin does not migrate");
        set(99);
        assert!(matches!(Admin::open_sqlite(&path), Err(AdminError::SchemaTooNew { found: 99, .. })));
    }
}
