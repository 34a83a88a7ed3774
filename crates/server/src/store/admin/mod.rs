//! Read-only reports for operators (`deltasync admin`): users, devices,
//! history, conflicts, volume and totals, the same on every store.
//!
//! Nothing here writes or migrates. [`Admin::open_sqlite`] and
//! [`Admin::connect_postgres`] open a read-only connection and refuse a
//! database whose schema is older or newer than this build (see
//! [`AdminError`]); every report is read in one consistent snapshot.
//!
//! Each store provides only its connection handling, as an [`AdminSource`]
//! (running a query, starting and ending a snapshot, measuring the
//! database's size); the queries and what their rows mean are written once,
//! in [`queries`], so that both stores answer alike.

pub mod queries;

use std::collections::HashMap;
use std::path::Path;

use deltasync_protocol::wire::ConflictRecord;
use deltasync_protocol::{Collection, EntityId, UserId};
use serde::Serialize;
use serde_json::value::RawValue;

use self::queries as q;
use super::core::conflicts::read_conflict;
use super::rows::{ColumnValue, Columns};
use super::{BoxFuture, StoreError};

/// Why an admin report could not be made. Each message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The SQLite file does not exist (operator's fault: a wrong path).
    #[error("there is no SQLite database at {0}; check the path given to --database")]
    NoDatabase(String),
    /// The database has no deltasync schema at all.
    #[error(
        "{0} holds no deltasync schema (no schema_version table): it is not a deltasync database, or (PostgreSQL) \
         its search_path names another schema"
    )]
    NoSchema(String),
    /// The database was written by an older deltasync and not migrated yet.
    #[error(
        "the database schema is version {found}, older than this deltasync ({known}); run `deltasync migrate` with \
         this version first (admin never migrates), or use the deltasync version that wrote it"
    )]
    SchemaTooOld {
        /// The schema version found.
        found: i64,
        /// The version this build reads.
        known: i64,
    },
    /// The database was written by a newer deltasync.
    #[error(
        "the database schema is version {found}, newer than this deltasync knows ({known}); use the deltasync \
         version that wrote it, or a newer one"
    )]
    SchemaTooNew {
        /// The schema version found.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// The user has neither a dataset nor a device here (operator's fault: a wrong name).
    #[error("there is no user {0:?} in this database (no dataset and no device); `deltasync admin users` lists them")]
    UnknownUser(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks the schema version a database holds (`None`: no `schema_version`
/// table) against the version this build reads, `known`.
pub fn check_schema(found: Option<i64>, known: i64, database: &str) -> Result<i64, AdminError> {
    match found {
        None => Err(AdminError::NoSchema(database.to_owned())),
        Some(found) if found < known => Err(AdminError::SchemaTooOld { found, known }),
        Some(found) if found > known => Err(AdminError::SchemaTooNew { found, known }),
        Some(found) => Ok(found),
    }
}

/// A parameter of an admin query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param<'a> {
    /// Text.
    Text(&'a str),
    /// An integer.
    Int(i64),
}

/// One column of a row held by value (see [`Row`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// SQL `NULL`.
    Null,
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// Text.
    Text(String),
    /// Binary data.
    Bytes(Vec<u8>),
}

/// A row of a query result, copied out of the driver so that every store
/// hands the same rows to [`queries`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Row(pub Vec<Cell>);

impl Row {
    /// Copies the first `columns` columns of a driver's row.
    pub fn copy(r: &impl Columns, columns: usize) -> Result<Row, StoreError> {
        (0..columns)
            .map(|i| {
                Ok(match r.value(i)? {
                    ColumnValue::Null => Cell::Null,
                    ColumnValue::Int(v) => Cell::Int(v),
                    ColumnValue::Bool(v) => Cell::Bool(v),
                    ColumnValue::Text(v) => Cell::Text(v.to_owned()),
                    ColumnValue::Bytes(v) => Cell::Bytes(v.to_owned()),
                })
            })
            .collect::<Result<_, StoreError>>()
            .map(Row)
    }
}

impl Columns for Row {
    fn value(&self, i: usize) -> Result<ColumnValue<'_>, StoreError> {
        Ok(match self.0.get(i).ok_or_else(|| super::rows::corrupt(format!("the row has no column {i}")))? {
            Cell::Null => ColumnValue::Null,
            Cell::Int(v) => ColumnValue::Int(*v),
            Cell::Bool(v) => ColumnValue::Bool(*v),
            Cell::Text(v) => ColumnValue::Text(v),
            Cell::Bytes(v) => ColumnValue::Bytes(v),
        })
    }
}

/// What a store provides for admin reports: a read-only connection on which
/// to run the queries of [`queries`], one snapshot at a time.
pub trait AdminSource: Send {
    /// `"sqlite"` or `"postgres"`.
    fn store(&self) -> &'static str;

    /// Starts a read-only snapshot: the queries up to [`end`](Self::end) see one state of the database.
    fn begin(&mut self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Ends the snapshot.
    fn end(&mut self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Runs `sql` (written with `?1`, `?2`… placeholders) and answers every row.
    fn rows<'a>(&'a mut self, sql: &'a str, params: &'a [Param<'a>]) -> BoxFuture<'a, Result<Vec<Row>, StoreError>>;

    /// The bytes the database takes on disk (see [`Stats::database_bytes`]).
    fn database_bytes(&mut self) -> BoxFuture<'_, Result<u64, StoreError>>;
}

/// One user (one dataset) at a glance: a row of `deltasync admin users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserSummary {
    /// The user (the dataset's owner).
    pub user_id: String,
    /// The dataset's head: the highest seq logged (0 for a user with devices but no change yet).
    pub head: u64,
    /// The dataset's horizon: the seq below which compaction dropped the log.
    pub horizon: u64,
    /// The rows its change log holds now (compaction drops old ones).
    pub changes: u64,
    /// Its live entities (not deleted).
    pub entities: u64,
    /// Its devices.
    pub devices: u64,
    /// Its conflict records.
    pub conflicts: u64,
    /// The last time anything was heard from it, ms since the Unix epoch: the
    /// later of its devices' `last_seen` and its newest logged change (`None` when neither exists).
    pub last_activity: Option<u64>,
}

/// A device of a user: a row of `deltasync admin devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceSummary {
    /// The device.
    pub device_id: String,
    /// The highest cursor it reached.
    pub cursor: u64,
    /// When it was last seen, ms since the Unix epoch.
    pub last_seen: u64,
    /// How many seqs it is behind the head.
    pub behind: u64,
    /// Whether its cursor is below the horizon, so that its next pull is
    /// answered `reset_required` and it starts over from a bootstrap.
    pub needs_bootstrap: bool,
}

/// A user's devices (`deltasync admin devices`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserDevices {
    /// The user.
    pub user_id: String,
    /// The dataset's head.
    pub head: u64,
    /// The dataset's horizon.
    pub horizon: u64,
    /// Its devices, by id.
    pub devices: Vec<DeviceSummary>,
}

/// Which changes `deltasync admin history` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only the changes of this entity, if given.
    pub entity: Option<(Collection, EntityId)>,
    /// At most this many, newest first.
    pub limit: u64,
}

/// One logged change: a row of `deltasync admin history`.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    /// Its place in the log.
    pub seq: u64,
    /// Its id, as the device sent it.
    pub change_id: String,
    /// The device that pushed it.
    pub device_id: String,
    /// Its collection.
    pub collection: String,
    /// Its entity.
    pub entity_id: String,
    /// `upsert`, `delete` or `append`.
    pub op: String,
    /// Its data as sent (`null` for a delete).
    pub data: Option<Box<RawValue>>,
    /// Its hybrid logical clock.
    pub hlc: String,
    /// The entity version it was written against, when the device said (`reject` collections).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u64>,
    /// When the server accepted it, ms since the Unix epoch.
    pub server_time: u64,
}

/// A user's changes, newest first (`deltasync admin history`).
#[derive(Debug, Clone, Serialize)]
pub struct History {
    /// The user.
    pub user_id: String,
    /// The dataset's head.
    pub head: u64,
    /// The dataset's horizon: changes below it may have been dropped by compaction.
    pub horizon: u64,
    /// The entity asked for, as `collection/entity_id`, if any.
    pub entity: Option<String>,
    /// The most changes asked for.
    pub limit: u64,
    /// The changes, newest (highest seq) first.
    pub changes: Vec<HistoryEntry>,
}

/// A user's conflict records, newest first (`deltasync admin conflicts`).
#[derive(Debug, Clone, Serialize)]
pub struct Conflicts {
    /// The user.
    pub user_id: String,
    /// How many records the user has in all.
    pub total: u64,
    /// The most records asked for.
    pub limit: u64,
    /// The records, newest (highest id) first, as `GET /v1/conflicts` gives them.
    pub conflicts: Vec<ConflictRecord>,
}

/// One UTC day of a user's changes: a row of `deltasync admin volume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DayVolume {
    /// The day, `YYYY-MM-DD` in UTC, of the changes' `server_time`.
    pub date: String,
    /// The changes logged that day (still in the log).
    pub changes: u64,
    /// The bytes of their data (the JSON text; 0 for deletes).
    pub bytes: u64,
}

/// A user's changes per day (`deltasync admin volume`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Volume {
    /// The user.
    pub user_id: String,
    /// The period: `day`.
    pub by: &'static str,
    /// The days with changes, oldest first. Only changes still in the log
    /// count: days below the horizon may have lost theirs to compaction.
    pub days: Vec<DayVolume>,
}

/// A dataset's head and horizon, as [`Stats`] lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatasetHorizon {
    /// The user.
    pub user_id: String,
    /// The head.
    pub head: u64,
    /// The horizon (`datasets.horizon`): the seq below which the log was dropped.
    pub horizon: u64,
}

/// Totals over the whole database (`deltasync admin stats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// `sqlite` or `postgres`.
    pub store: &'static str,
    /// The schema version.
    pub schema_version: i64,
    /// Users with a dataset or a device.
    pub users: u64,
    /// Rows in the change logs.
    pub changes: u64,
    /// Live entities (not deleted).
    pub entities: u64,
    /// Deleted entities kept as tombstones.
    pub tombstones: u64,
    /// Devices.
    pub devices: u64,
    /// Conflict records.
    pub conflicts: u64,
    /// The bytes the database takes: on SQLite the file and its WAL; on
    /// PostgreSQL the tables of the schema in use, with their indexes and TOAST.
    pub database_bytes: u64,
    /// Every dataset's head and horizon, by user.
    pub datasets: Vec<DatasetHorizon>,
}

/// Read-only admin reports over one database. See the module documentation.
pub struct Admin {
    source: Box<dyn AdminSource>,
    schema_version: i64,
}

impl Admin {
    /// Opens the SQLite database at `path` read-only, checking its schema version.
    pub fn open_sqlite(path: &Path) -> Result<Admin, AdminError> {
        let (source, schema_version) = crate::store::sqlite::admin_source(path)?;
        Ok(Admin { source: Box::new(source), schema_version })
    }

    /// Connects read-only to the PostgreSQL database at `url`, checking its schema version.
    pub async fn connect_postgres(url: &str) -> Result<Admin, AdminError> {
        let (source, schema_version) = crate::store::postgres::admin_source(url).await?;
        Ok(Admin { source: Box::new(source), schema_version })
    }

    /// Every user, by id.
    pub async fn users(&mut self) -> Result<Vec<UserSummary>, AdminError> {
        self.source.begin().await?;
        let out = users(self.source.as_mut()).await;
        self.end(out).await
    }

    /// `user`'s devices.
    pub async fn devices(&mut self, user: &UserId) -> Result<UserDevices, AdminError> {
        self.source.begin().await?;
        let out = devices(self.source.as_mut(), user.as_str()).await;
        self.end(out).await
    }

    /// `user`'s changes, newest first.
    pub async fn history(&mut self, user: &UserId, query: &HistoryQuery) -> Result<History, AdminError> {
        self.source.begin().await?;
        let out = history(self.source.as_mut(), user.as_str(), query).await;
        self.end(out).await
    }

    /// `user`'s conflict records, newest first, at most `limit`.
    pub async fn conflicts(&mut self, user: &UserId, limit: u64) -> Result<Conflicts, AdminError> {
        self.source.begin().await?;
        let out = conflicts(self.source.as_mut(), user.as_str(), limit).await;
        self.end(out).await
    }

    /// `user`'s changes and their bytes per UTC day, oldest first.
    pub async fn volume_by_day(&mut self, user: &UserId) -> Result<Volume, AdminError> {
        self.source.begin().await?;
        let out = volume_by_day(self.source.as_mut(), user.as_str()).await;
        self.end(out).await
    }

    /// Totals over the whole database.
    pub async fn stats(&mut self) -> Result<Stats, AdminError> {
        self.source.begin().await?;
        let out = stats(self.source.as_mut(), self.schema_version).await;
        self.end(out).await
    }

    /// Ends the snapshot a report was read in, whatever the report's outcome.
    async fn end<T>(&mut self, out: Result<T, AdminError>) -> Result<T, AdminError> {
        let ended = self.source.end().await;
        let out = out?;
        ended?;
        Ok(out)
    }
}

async fn users(s: &mut dyn AdminSource) -> Result<Vec<UserSummary>, AdminError> {
    let entities = entity_counts(s).await?;
    let rows = s.rows(q::USERS, &[]).await?;
    Ok(rows.iter().map(|r| q::user_summary(r, &entities)).collect::<Result<_, _>>()?)
}

async fn devices(s: &mut dyn AdminSource, u: &str) -> Result<UserDevices, AdminError> {
    let (head, horizon) = dataset(s, u).await?;
    let rows = s.rows(q::DEVICES, &[Param::Text(u)]).await?;
    let devices = rows.iter().map(|r| q::device_summary(r, head, horizon)).collect::<Result<_, _>>()?;
    Ok(UserDevices { user_id: u.to_owned(), head, horizon, devices })
}

async fn history(s: &mut dyn AdminSource, u: &str, query: &HistoryQuery) -> Result<History, AdminError> {
    let (head, horizon) = dataset(s, u).await?;
    let limit = Param::Int(i64::try_from(query.limit).unwrap_or(i64::MAX));
    let rows = match &query.entity {
        None => s.rows(q::HISTORY, &[Param::Text(u), limit]).await?,
        Some((c, e)) => {
            let params = [Param::Text(u), limit, Param::Text(c.as_str()), Param::Text(e.as_str())];
            s.rows(q::ENTITY_HISTORY, &params).await?
        }
    };
    Ok(History {
        user_id: u.to_owned(),
        head,
        horizon,
        entity: query.entity.as_ref().map(|(c, e)| format!("{c}/{e}")),
        limit: query.limit,
        changes: rows.iter().map(q::history_entry).collect::<Result<_, _>>()?,
    })
}

async fn conflicts(s: &mut dyn AdminSource, u: &str, limit: u64) -> Result<Conflicts, AdminError> {
    dataset(s, u).await?;
    let total = q::single_count(&s.rows(q::CONFLICT_COUNT, &[Param::Text(u)]).await?)?;
    let fetch = Param::Int(i64::try_from(limit).unwrap_or(i64::MAX));
    let rows = s.rows(q::CONFLICTS, &[Param::Text(u), fetch]).await?;
    let conflicts = rows.iter().map(read_conflict).collect::<Result<_, _>>()?;
    Ok(Conflicts { user_id: u.to_owned(), total, limit, conflicts })
}

async fn volume_by_day(s: &mut dyn AdminSource, u: &str) -> Result<Volume, AdminError> {
    dataset(s, u).await?;
    let rows = s.rows(q::VOLUME_BY_DAY, &[Param::Text(u)]).await?;
    let days = rows.iter().map(q::day_volume).collect::<Result<_, _>>()?;
    Ok(Volume { user_id: u.to_owned(), by: "day", days })
}

async fn stats(s: &mut dyn AdminSource, schema_version: i64) -> Result<Stats, AdminError> {
    let (mut entities, mut tombstones) = (0, 0);
    for (live, dead) in entity_counts(s).await?.into_values() {
        entities += live;
        tombstones += dead;
    }
    let totals = s.rows(q::TOTALS, &[]).await?;
    let totals = totals.first().ok_or_else(|| super::rows::corrupt("the totals query answered no row"))?;
    let datasets = s.rows(q::HORIZONS, &[]).await?;
    Ok(Stats {
        store: s.store(),
        schema_version,
        users: totals.int(0)? as u64,
        changes: totals.int(1)? as u64,
        entities,
        tombstones,
        devices: totals.int(2)? as u64,
        conflicts: totals.int(3)? as u64,
        database_bytes: s.database_bytes().await?,
        datasets: datasets.iter().map(q::dataset_horizon).collect::<Result<_, _>>()?,
    })
}

/// The head and horizon of `user`'s dataset (0 and 0 when it has devices
/// but no change yet); [`AdminError::UnknownUser`] when it has neither.
async fn dataset(s: &mut dyn AdminSource, user: &str) -> Result<(u64, u64), AdminError> {
    let rows = s.rows(q::DATASET, &[Param::Text(user)]).await?;
    match rows.first() {
        Some(r) => Ok((r.int(0)? as u64, r.int(1)? as u64)),
        None if s.rows(q::HAS_DEVICE, &[Param::Text(user)]).await?.is_empty() => {
            Err(AdminError::UnknownUser(user.to_owned()))
        }
        None => Ok((0, 0)),
    }
}

/// Live entities and tombstones per user.
async fn entity_counts(s: &mut dyn AdminSource) -> Result<HashMap<String, (u64, u64)>, StoreError> {
    let rows = s.rows(q::ENTITY_COUNTS, &[]).await?;
    rows.iter().map(|r| Ok((r.text(0)?.to_owned(), (r.int(1)? as u64, r.int(2)? as u64)))).collect()
}

/// The UTC date `YYYY-MM-DD` of the day `day` days after 1970-01-01.
pub fn utc_date(day: i64) -> String {
    // Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Milliseconds in a day: `server_time / DAY_MS` is the UTC day number.
pub const DAY_MS: i64 = 86_400_000;

/// The UTC date and time `YYYY-MM-DD hh:mm:ss` of `ms` milliseconds since the Unix epoch.
pub fn utc_datetime(ms: u64) -> String {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    let secs = ms.rem_euclid(DAY_MS) / 1000;
    format!("{} {:02}:{:02}:{:02}", utc_date(ms.div_euclid(DAY_MS)), secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_become_utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(-1), "1969-12-31");
        assert_eq!(utc_date(59), "1970-03-01");
        assert_eq!(utc_date(11_016), "2000-02-29");
        assert_eq!(utc_date(19_723), "2024-01-01");
        assert_eq!(utc_date(1_765_065_600_000 / DAY_MS), "2025-12-07");
        assert_eq!(utc_datetime(1_765_065_600_000 + 15 * 3_600_000 + 44 * 60_000 + 34_999), "2025-12-07 15:44:34");
        assert_eq!(utc_datetime(0), "1970-01-01 00:00:00");
    }

    #[test]
    fn only_the_schema_this_build_reads_is_accepted() {
        assert_eq!(check_schema(Some(3), 3, "db").unwrap(), 3);
        assert!(matches!(check_schema(Some(2), 3, "db"), Err(AdminError::SchemaTooOld { found: 2, known: 3 })));
        assert!(matches!(check_schema(Some(4), 3, "db"), Err(AdminError::SchemaTooNew { found: 4, known: 3 })));
        assert!(matches!(check_schema(None, 3, "db"), Err(AdminError::NoSchema(_))));
        let old = check_schema(Some(1), 3, "db").unwrap_err().to_string();
        assert!(old.contains("deltasync migrate"), "{old}");
    }

    #[test]
    fn rows_copied_out_read_like_the_driver_rows() {
        let row = Row(vec![Cell::Int(7), Cell::Null, Cell::Text("t".into()), Cell::Bool(true)]);
        let copy = Row::copy(&row, 4).unwrap();
        assert_eq!(copy, row);
        assert_eq!((copy.int(0).unwrap(), copy.opt_int(1).unwrap(), copy.text(2).unwrap()), (7, None, "t"));
        assert!(copy.flag(3).unwrap());
        assert!(Row::copy(&row, 5).is_err());
    }
}
