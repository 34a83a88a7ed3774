//! `deltasync admin`: read-only reports for operators, straight from the
//! database (users, devices, history, conflicts, volume, totals), as JSON or
//! as a table. The queries live in `deltasync_server::store::admin`; this
//! module parses flags and prints.

mod table;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use deltasync_protocol::{Collection, EntityId, UserId};
use deltasync_server::store::admin::{Admin, HistoryQuery, UserSummary};
use serde::Serialize;

use super::database::Database;

/// The most changes or conflict records one report lists unless `--limit` says otherwise.
const DEFAULT_LIMIT: u64 = 100;
/// The most `--limit` takes.
const MAX_LIMIT: u64 = 1_000_000;

/// Flags of `deltasync admin`.
#[derive(Args, Debug)]
#[command(after_help = "Reads the database directly, read-only: it never writes, never migrates, and may run \
beside `deltasync serve`. A database whose schema is older or newer than this deltasync is refused with what to \
do. Every report prints one JSON document on stdout (see \"Admin tools\" in docs/protocol.md), or a table with \
--format table. Times are ms since the Unix epoch in JSON, UTC in tables.")]
pub struct AdminArgs {
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Every user: head, horizon, changes, live entities, devices, conflicts, last activity.
    Users(Target),
    /// A user's devices: cursor, how far behind the head, last seen, whether it needs a bootstrap.
    Devices(UserArgs),
    /// A user's changes, newest first.
    History(HistoryArgs),
    /// A user's conflict records, newest first.
    Conflicts(ConflictsArgs),
    /// A user's changes and their bytes per UTC day.
    Volume(VolumeArgs),
    /// Totals, the database's size, and every dataset's horizon.
    Stats(Target),
}

/// Where to read and how to print.
#[derive(Args, Debug)]
struct Target {
    /// The database: sqlite://PATH or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE.
    #[arg(long, value_name = "URL", env = "DELTASYNC_DATABASE", hide_env_values = true)]
    database: String,
    /// How to print: one JSON document, or a table for people.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
}

/// How a report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// One JSON document on stdout.
    Json,
    /// An aligned table.
    Table,
}

#[derive(Args, Debug)]
struct UserArgs {
    #[command(flatten)]
    target: Target,
    /// The user (the dataset's owner; `local` for a server run with `--auth none`).
    #[arg(long, value_name = "USER", value_parser = parse_user)]
    user: UserId,
}

#[derive(Args, Debug)]
struct HistoryArgs {
    #[command(flatten)]
    user: UserArgs,
    /// Only the changes of one entity, as COLLECTION/ENTITY_ID (e.g. notes/n1).
    #[arg(long, value_name = "COLLECTION/ENTITY_ID", value_parser = parse_entity)]
    entity: Option<(Collection, EntityId)>,
    /// The most changes to list.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LIMIT, value_parser = clap::value_parser!(u64).range(1..=MAX_LIMIT))]
    limit: u64,
}

#[derive(Args, Debug)]
struct ConflictsArgs {
    #[command(flatten)]
    user: UserArgs,
    /// The most records to list.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LIMIT, value_parser = clap::value_parser!(u64).range(1..=MAX_LIMIT))]
    limit: u64,
}

#[derive(Args, Debug)]
struct VolumeArgs {
    #[command(flatten)]
    user: UserArgs,
    /// The period changes are counted by (UTC).
    #[arg(long, value_enum, value_name = "PERIOD", default_value_t = Period::Day)]
    by: Period,
}

/// What `admin volume` counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Period {
    /// UTC calendar days.
    Day,
}

fn parse_user(s: &str) -> Result<UserId, String> {
    UserId::parse(s).map_err(|e| e.to_string())
}

/// Parses `COLLECTION/ENTITY_ID`: the collection ends at the first `/`
/// (collection names hold none), the entity id may hold more.
fn parse_entity(s: &str) -> Result<(Collection, EntityId), String> {
    let Some((collection, entity)) = s.split_once('/') else {
        return Err(format!("expected COLLECTION/ENTITY_ID, e.g. notes/n1; got {s:?}"));
    };
    let collection = Collection::parse(collection).map_err(|e| format!("{e} (in {s:?})"))?;
    let entity = EntityId::parse(entity).map_err(|e| format!("{e} (in {s:?})"))?;
    Ok((collection, entity))
}

/// The JSON document of `admin users`.
#[derive(Serialize)]
struct UsersReport<'a> {
    users: &'a [UserSummary],
}

/// Reads one report and prints it.
pub fn run(args: AdminArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(report(args.command))
}

async fn report(command: AdminCommand) -> anyhow::Result<()> {
    let target = match &command {
        AdminCommand::Users(t) | AdminCommand::Stats(t) => t,
        AdminCommand::Devices(u) => &u.target,
        AdminCommand::History(h) => &h.user.target,
        AdminCommand::Conflicts(c) => &c.user.target,
        AdminCommand::Volume(v) => &v.user.target,
    };
    let database = Database::parse(&target.database)?;
    let format = target.format;
    let mut admin = open(&database).await?;
    let context = || format!("cannot read the report from {}", database.describe());
    match command {
        AdminCommand::Users(_) => {
            let users = admin.users().await.with_context(context)?;
            print(format, &UsersReport { users: &users }, || table::users(&users))
        }
        AdminCommand::Devices(a) => {
            let devices = admin.devices(&a.user).await.with_context(context)?;
            print(format, &devices, || table::devices(&devices))
        }
        AdminCommand::History(a) => {
            let query = HistoryQuery { entity: a.entity, limit: a.limit };
            let history = admin.history(&a.user.user, &query).await.with_context(context)?;
            print(format, &history, || table::history(&history))
        }
        AdminCommand::Conflicts(a) => {
            let conflicts = admin.conflicts(&a.user.user, a.limit).await.with_context(context)?;
            print(format, &conflicts, || table::conflicts(&conflicts))
        }
        AdminCommand::Volume(a) => {
            let volume = match a.by {
                Period::Day => admin.volume_by_day(&a.user.user).await.with_context(context)?,
            };
            print(format, &volume, || table::volume(&volume))
        }
        AdminCommand::Stats(_) => {
            let stats = admin.stats().await.with_context(context)?;
            print(format, &stats, || table::stats(&stats))
        }
    }
}

/// Opens the database read-only for reports.
async fn open(database: &Database) -> anyhow::Result<Admin> {
    let opened = match database {
        Database::Sqlite(path) => Admin::open_sqlite(path),
        Database::Postgres(url) => Admin::connect_postgres(url).await,
    };
    opened.with_context(|| format!("cannot read {}", database.describe()))
}

/// Prints `report` as one JSON document, or as the table `table` makes.
fn print(format: Format, report: &impl Serialize, table: impl FnOnce() -> String) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string(report)?),
        Format::Table => print!("{}", table()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities_are_named_collection_slash_id() {
        let (c, e) = parse_entity("notes/n1").unwrap();
        assert_eq!((c.as_str(), e.as_str()), ("notes", "n1"));
        let (c, e) = parse_entity("files/a/b.txt").unwrap();
        assert_eq!((c.as_str(), e.as_str()), ("files", "a/b.txt"), "the entity id may hold slashes");
        assert!(parse_entity("notes").unwrap_err().contains("COLLECTION/ENTITY_ID"));
        assert!(parse_entity("notes/").unwrap_err().contains("entity_id"));
        assert!(parse_entity("bad name/n1").unwrap_err().contains("collection"));
    }

    #[test]
    fn limits_and_periods_refuse_what_they_do_not_take() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(subcommand)]
            command: AdminCommand,
        }
        let parse = |args: &[&str]| Cli::try_parse_from([&["admin"][..], args].concat()).map(|c| c.command);
        let ok = parse(&["history", "--database", "sqlite://x", "--user", "u"]).unwrap();
        assert!(matches!(ok, AdminCommand::History(HistoryArgs { limit: DEFAULT_LIMIT, entity: None, .. })));
        for bad in ["0", "-1", "ten", "1000001"] {
            assert!(parse(&["history", "--database", "sqlite://x", "--user", "u", "--limit", bad]).is_err(), "{bad}");
        }
        let week = parse(&["volume", "--database", "sqlite://x", "--user", "u", "--by", "week"]).unwrap_err();
        assert!(week.to_string().contains("possible values: day"), "{week}");
    }
}
