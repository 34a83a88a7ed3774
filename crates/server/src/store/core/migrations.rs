//! Which schema migrations a database needs, the same way in every store.
//!
//! A store reads the version it finds, asks [`MigrationPlan::new`] what to
//! run, runs each step's SQL in its own way (SQLite one transaction per step,
//! PostgreSQL all steps in one transaction under an advisory lock) and
//! records the step's version.

use crate::store::{Migrated, StoreError};

/// The migrations to apply to a database found at some schema version.
#[derive(Debug, Clone, Copy)]
pub struct MigrationPlan<'m> {
    found: i64,
    migrations: &'m [&'m str],
}

/// One migration to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationStep<'m> {
    /// The schema version once it is applied.
    pub version: i64,
    /// Its SQL.
    pub sql: &'m str,
}

impl<'m> MigrationPlan<'m> {
    /// The plan for a database at version `found`, given every migration this
    /// build knows, in order; refuses a database newer than this build.
    pub fn new(found: i64, migrations: &'m [&'m str]) -> Result<MigrationPlan<'m>, StoreError> {
        let known = migrations.len() as i64;
        if found > known {
            return Err(StoreError::SchemaTooNew { found, known });
        }
        Ok(MigrationPlan { found, migrations })
    }

    /// The migrations still to apply, oldest first.
    pub fn steps(&self) -> impl Iterator<Item = MigrationStep<'m>> + use<'m> {
        let migrations = self.migrations;
        let skip = usize::try_from(self.found).unwrap_or(0);
        migrations.iter().enumerate().skip(skip).map(|(i, sql)| MigrationStep { version: i as i64 + 1, sql })
    }

    /// What the run did, once every step is applied.
    pub fn migrated(&self) -> Migrated {
        Migrated { from: self.found, to: self.migrations.len() as i64 }
    }
}

impl MigrationStep<'_> {
    /// Logs that the step was applied.
    pub fn applied(&self) {
        tracing::info!(version = self.version, "applied schema migration");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[&str] = &["one", "two", "three"];

    fn versions(plan: &MigrationPlan<'static>) -> Vec<(i64, &'static str)> {
        plan.steps().map(|s| (s.version, s.sql)).collect()
    }

    #[test]
    fn a_new_database_gets_every_migration_in_order() {
        let plan = MigrationPlan::new(0, ALL).unwrap();
        assert_eq!(versions(&plan), [(1, "one"), (2, "two"), (3, "three")]);
        assert_eq!(plan.migrated(), Migrated { from: 0, to: 3 });
    }

    #[test]
    fn only_the_missing_migrations_run() {
        let plan = MigrationPlan::new(2, ALL).unwrap();
        assert_eq!(versions(&plan), [(3, "three")]);
        assert_eq!(plan.migrated(), Migrated { from: 2, to: 3 });
        assert_eq!(MigrationPlan::new(3, ALL).unwrap().steps().count(), 0);
    }

    #[test]
    fn a_database_newer_than_this_build_is_refused() {
        assert!(matches!(MigrationPlan::new(4, ALL), Err(StoreError::SchemaTooNew { found: 4, known: 3 })));
    }
}
