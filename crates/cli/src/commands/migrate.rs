//! `deltasync migrate`: bring a database's schema up to this build's version, then exit.

use clap::Args;

use deltasync_server::store::sqlite::SqliteStore;

use super::database::Database;

/// Flags of `deltasync migrate`.
#[derive(Args, Debug)]
#[command(after_help = "`deltasync serve` applies missing migrations itself at start; run this to migrate \
ahead of a deployment, e.g. once before starting several instances of a new version.

On SQLite it also converts a database created without incremental auto-vacuum (by a version before \
compaction) with one VACUUM, so that compaction returns freed space to the file system: run it with the \
server stopped, and with free disk space of the database's size.")]
pub struct MigrateArgs {
    /// The database: sqlite://PATH or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE.
    #[arg(long, value_name = "URL", env = "DELTASYNC_DATABASE", hide_env_values = true)]
    database: String,
}

/// Applies missing migrations and prints what it did.
pub fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let database = Database::parse(&args.database)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let migrated = runtime.block_on(database.migrate())?;
    if migrated.from == migrated.to {
        println!("{}: schema already at version {}", database.describe(), migrated.to);
    } else {
        println!("{}: schema migrated from version {} to {}", database.describe(), migrated.from, migrated.to);
    }
    if let Database::Sqlite(path) = &database
        && SqliteStore::enable_incremental_vacuum(path)?
    {
        println!(
            "{}: converted to incremental auto-vacuum (one VACUUM), so compaction returns freed space to the file system",
            database.describe()
        );
    }
    Ok(())
}
