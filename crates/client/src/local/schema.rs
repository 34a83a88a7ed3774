//! Opening the local database: creating a new one atomically, refusing a file
//! that is not one, and migrating older schemas.
//!
//! A new database is initialised in a temporary file beside the target and
//! then linked into place, so a crash never leaves behind an empty or
//! half-made file at the database path. An existing file must therefore be a
//! deltasync database: an empty file, or a SQLite file of another program, is
//! refused rather than silently becoming a new device (which would hide the
//! previous device's pending changes).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use crate::error::{ClientError, Result};

/// The newest local schema this build knows.
pub const SCHEMA_VERSION: i64 = 3;

/// Version 1: sync state, confirmed state, outbox.
const SCHEMA_V1: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- The server-confirmed state: the log applied up to the cursor.
CREATE TABLE entities (
    collection  TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    state       TEXT NOT NULL,      -- EntityState as JSON, meta included
    entity_hash BLOB,               -- its digest contribution; NULL when deleted
    PRIMARY KEY (collection, entity_id)
) WITHOUT ROWID;

-- Logged appends (opaque data, e.g. CRDT operations), in seq order.
CREATE TABLE appends (
    seq    INTEGER PRIMARY KEY,
    change TEXT NOT NULL
);

-- Local changes not yet in the confirmed state, in the order they were made.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    change_id       TEXT NOT NULL UNIQUE,
    collection      TEXT NOT NULL,
    entity_id       TEXT NOT NULL,
    change          TEXT NOT NULL,  -- the Change as JSON
    status          TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
    seq             INTEGER,        -- the seq the server gave it (status sent)
    retries         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    conflict        TEXT,           -- the server's conflict, as JSON
    created_at      INTEGER NOT NULL
);
CREATE INDEX outbox_by_entity ON outbox (collection, entity_id, id);
";

/// Version 2: the journal of acknowledged changes, re-pushed after a server
/// restore, and the mark of outbox entries put back from it.
const SCHEMA_V2: &str = "
-- This device's acknowledged changes that left the outbox, newest kept, so
-- that a server restored from a backup can be given back the ones it lost.
CREATE TABLE journal (
    id         INTEGER PRIMARY KEY,  -- the outbox id it had (outbox ids are never reused)
    change_id  TEXT NOT NULL UNIQUE,
    collection TEXT NOT NULL,
    entity_id  TEXT NOT NULL,
    change     TEXT NOT NULL,        -- the Change as JSON, as last sent
    seq        INTEGER NOT NULL,     -- the seq the server gave it
    created_at INTEGER NOT NULL
);
CREATE INDEX journal_by_seq ON journal (seq);

-- 1 for an entry put back from the journal by a heal (counted as restored when applied).
ALTER TABLE outbox ADD COLUMN requeued INTEGER NOT NULL DEFAULT 0;
";

/// Version 3: a bootstrap's staging area moves from the connection's
/// temporary database into this one, shaped exactly as the confirmed state,
/// so that adopting a snapshot swaps the tables instead of copying every row
/// (see [`super::adopt_staged`]), which makes them again with this text.
const SCHEMA_V3: &str = STAGED_TABLES;

/// The staging area's tables, empty.
pub(crate) const STAGED_TABLES: &str = "
CREATE TABLE staged_entities (
    collection  TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    state       TEXT NOT NULL,
    entity_hash BLOB,
    PRIMARY KEY (collection, entity_id)
) WITHOUT ROWID;
CREATE TABLE staged_appends (
    seq    INTEGER PRIMARY KEY,
    change TEXT NOT NULL
);
";

/// Every migration, in order: `MIGRATIONS[i]` takes a database from version `i` to `i + 1`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [SCHEMA_V1, SCHEMA_V2, SCHEMA_V3];

/// Opens the local database at `path`, creating it (atomically) if no file is
/// there, and brings its schema up to date.
pub fn open(path: &Path) -> Result<Connection> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.len() == 0 => {
            return Err(ClientError::NotADatabase {
                path: path.to_owned(),
                reason: "the file is empty (0 bytes), and a deltasync database never is: it was truncated or made \
                         by something else. Opening it as a new device would hide the previous device's pending \
                         changes; restore the file from a backup, or delete it to start a new device"
                    .into(),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => create(path)?,
        Err(source) => return Err(ClientError::LocalIo { action: "read", path: path.to_owned(), source }),
    }
    // Never create here: the file was checked or made above.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    configure(&conn).map_err(|e| not_sqlite(path, e))?;
    let version = user_version(&conn).map_err(|e| not_sqlite(path, e))?;
    if version > SCHEMA_VERSION {
        return Err(ClientError::SchemaTooNew { found: version, known: SCHEMA_VERSION });
    }
    if version < 1 || !has_table(&conn, "meta")? || !has_table(&conn, "outbox")? {
        return Err(ClientError::NotADatabase {
            path: path.to_owned(),
            reason: "it is a SQLite database without deltasync's tables (another program's, or a leftover of a \
                     first start interrupted by an older deltasync). Pass --db a path of its own for this device, \
                     or delete the file if nothing in it is needed"
                .into(),
        });
    }
    migrate(&conn, version)?;
    Ok(conn)
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // Plans stay as prepared. Otherwise SQLite marks a statement whose plan
    // might depend on a bound value, and clearing its bindings (as rusqlite's
    // statement cache does on every reuse) throws the plan away: each outbox
    // lookup of a batched write was parsed and planned again, a third of its
    // time.
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

fn has_table(conn: &Connection, name: &str) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [name],
        |r| r.get(0),
    )?)
}

/// A file SQLite cannot read as a database is not ours; other errors stay what they are.
fn not_sqlite(path: &Path, e: rusqlite::Error) -> ClientError {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) {
        return ClientError::NotADatabase {
            path: path.to_owned(),
            reason: "it is not a SQLite file at all. Pass --db a path of its own for this device".into(),
        };
    }
    ClientError::Local(e)
}

/// Applies the migrations from `version` to [`SCHEMA_VERSION`] in one transaction.
fn migrate(conn: &Connection, version: i64) -> Result<()> {
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.unchecked_transaction()?;
    for step in &MIGRATIONS[version as usize..] {
        tx.execute_batch(step)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// Makes a new database at `path`: initialised (schema and device id) in a
/// temporary file beside it, made durable, then linked into place. If another
/// process made one first, its database is kept and ours dropped.
fn create(path: &Path) -> Result<()> {
    let io = |source| ClientError::LocalIo { action: "create", path: path.to_owned(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::metadata(dir).map_err(io)?;
    }
    let temp = temp_path(path);
    let init = || -> Result<()> {
        let conn = Connection::open(&temp)?;
        configure(&conn)?;
        migrate(&conn, 0)?;
        // The device id, made once and kept for good.
        let device = deltasync_engine::replica::new_device_id(uuid::Uuid::now_v7().as_u64_pair().1);
        super::set_meta(&conn, deltasync_engine::replica::keys::DEVICE_ID, device.as_str())?;
        // Closing the last connection copies the WAL into the file and removes it.
        conn.close().map_err(|(_, e)| e)?;
        std::fs::File::open(&temp).and_then(|f| f.sync_all()).map_err(io)
    };
    let linked = init().and_then(|()| match std::fs::hard_link(&temp, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        // A file system without hard links: rename instead (the same, but
        // replacing a database made at the same instant by another process).
        Err(_) => std::fs::rename(&temp, path).map_err(io),
    });
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", temp.display()));
    }
    linked?;
    sync_dir(path);
    Ok(())
}

/// `.<name>.<pid>.<nanos>.creating` beside `path`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    path.with_file_name(format!(".{name}.{}.{nanos}.creating", std::process::id()))
}

/// Makes the new directory entry durable (best effort: not every platform can).
fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(conn: &Connection) -> Vec<String> {
        let mut stmt = conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().collect::<rusqlite::Result<_>>().unwrap()
    }

    #[test]
    fn a_new_database_is_made_whole_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.db");
        let conn = open(&path).unwrap();
        assert_eq!(user_version(&conn).unwrap(), SCHEMA_VERSION);
        assert!(tables(&conn).contains(&"journal".to_owned()));
        let device = super::super::meta(&conn, "device_id").unwrap();
        assert!(device.as_ref().is_some_and(|d| d.starts_with("dev-")));
        drop(conn);
        let names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        assert!(names.iter().all(|n| !n.contains("creating")), "temporary files left: {names:?}");
        // A second open finds it and keeps its device id.
        let again = open(&path).unwrap();
        assert_eq!(super::super::meta(&again, "device_id").unwrap(), device);
    }

    #[test]
    fn an_empty_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.db");
        std::fs::write(&path, b"").unwrap();
        let err = open(&path).unwrap_err();
        assert!(matches!(err, ClientError::NotADatabase { .. }), "{err:?}");
        assert!(err.to_string().contains("empty (0 bytes)") && err.to_string().contains("delete it"), "{err}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn another_programs_sqlite_file_and_a_text_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other.db");
        Connection::open(&other).unwrap().execute_batch("CREATE TABLE notes (body TEXT)").unwrap();
        let err = open(&other).unwrap_err();
        assert!(matches!(err, ClientError::NotADatabase { .. }), "{err:?}");
        assert!(err.to_string().contains("without deltasync's tables"), "{err}");
        assert_eq!(err.code(), "local_store");

        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "just some text, long enough to be more than a header would be".repeat(100)).unwrap();
        let err = open(&text).unwrap_err();
        assert!(err.to_string().contains("not a SQLite file"), "{err}");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.db");
        open(&path).unwrap().pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        let err = open(&path).unwrap_err();
        assert!(matches!(err, ClientError::SchemaTooNew { .. }), "{err:?}");
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/dir/device.db");
        let err = open(&path).unwrap_err();
        assert!(err.to_string().contains("no/such/dir/device.db"), "{err}");
    }
}
