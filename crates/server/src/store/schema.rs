//! The SQL schema, as numbered migrations. Every table is keyed by `user_id` first.
//!
//! Each store has its own list, because type names differ, but the lists
//! move in step: migration `n` turns schema `n - 1` into schema `n` on both,
//! with the same tables, columns and keys.

/// The SQLite migrations, in order; the schema version is the number applied.
pub const SQLITE_MIGRATIONS: &[&str] = &[
    // 1: the change log, entities, devices, datasets, conflicts and collection policies.
    r#"
    CREATE TABLE datasets (
        user_id       TEXT    NOT NULL PRIMARY KEY,
        head          INTEGER NOT NULL,
        state_hash    BLOB    NOT NULL,
        state_digest  BLOB    NOT NULL,
        horizon       INTEGER NOT NULL DEFAULT 0,
        conflict_seq  INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;

    CREATE TABLE changes (
        user_id       TEXT    NOT NULL,
        seq           INTEGER NOT NULL,
        change_id     TEXT    NOT NULL,
        device_id     TEXT    NOT NULL,
        collection    TEXT    NOT NULL,
        entity_id     TEXT    NOT NULL,
        op            TEXT    NOT NULL,
        data          TEXT,
        hlc           TEXT    NOT NULL,
        base_version  INTEGER,
        server_time   INTEGER NOT NULL,
        state_hash    BLOB    NOT NULL,
        state_digest  BLOB    NOT NULL,
        PRIMARY KEY (user_id, seq)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX changes_by_change_id ON changes (user_id, change_id);

    CREATE TABLE entities (
        user_id       TEXT    NOT NULL,
        collection    TEXT    NOT NULL,
        entity_id     TEXT    NOT NULL,
        data          TEXT    NOT NULL,
        version       INTEGER NOT NULL,
        deleted       INTEGER NOT NULL,
        meta          TEXT    NOT NULL,
        entity_hash   BLOB,
        PRIMARY KEY (user_id, collection, entity_id)
    ) WITHOUT ROWID;

    CREATE TABLE devices (
        user_id       TEXT    NOT NULL,
        device_id     TEXT    NOT NULL,
        cursor        INTEGER NOT NULL DEFAULT 0,
        last_seen     INTEGER NOT NULL,
        PRIMARY KEY (user_id, device_id)
    ) WITHOUT ROWID;

    CREATE TABLE conflicts (
        user_id       TEXT    NOT NULL,
        id            INTEGER NOT NULL,
        change_id     TEXT    NOT NULL,
        device_id     TEXT    NOT NULL,
        collection    TEXT    NOT NULL,
        entity_id     TEXT    NOT NULL,
        op            TEXT    NOT NULL,
        data          TEXT,
        hlc           TEXT    NOT NULL,
        seq           INTEGER,
        reason        TEXT    NOT NULL,
        fields        TEXT,
        current       TEXT,
        server_time   INTEGER NOT NULL,
        PRIMARY KEY (user_id, id)
    ) WITHOUT ROWID;

    CREATE TABLE collections (
        user_id       TEXT    NOT NULL,
        collection    TEXT    NOT NULL,
        policy        TEXT    NOT NULL,
        PRIMARY KEY (user_id, collection)
    ) WITHOUT ROWID;
    "#,
    // 2: receipts, so that a change is known as a duplicate after compaction
    // dropped it from the log (idempotency outlives history). The receipts
    // take over the job of the unique index on `changes`, which goes. And
    // how far compaction has deleted the log (`dropped_to`, at the horizon
    // unless a pass was cut short).
    r#"
    ALTER TABLE datasets ADD COLUMN dropped_to INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE receipts (
        user_id       TEXT    NOT NULL,
        change_id     TEXT    NOT NULL,
        seq           INTEGER NOT NULL,
        PRIMARY KEY (user_id, change_id)
    ) WITHOUT ROWID;
    INSERT INTO receipts (user_id, change_id, seq) SELECT user_id, change_id, seq FROM changes;
    DROP INDEX changes_by_change_id;
    "#,
    // 3: what a push decided about entities and receipts, appended in commit
    // order until the writer folds it into `entities` and `receipts` in key
    // order, many thousands at a time. Random ids put each new row on a
    // different page of those two tables: written one push at a time they
    // cost two random page writes per change, folded in sorted batches a
    // small fraction of one (see `store::core::pending`).
    r#"
    CREATE TABLE pending_entities (
        id            INTEGER PRIMARY KEY,
        user_id       TEXT    NOT NULL,
        collection    TEXT    NOT NULL,
        entity_id     TEXT    NOT NULL,
        data          TEXT    NOT NULL,
        version       INTEGER NOT NULL,
        deleted       INTEGER NOT NULL,
        meta          TEXT    NOT NULL,
        entity_hash   BLOB
    );
    CREATE TABLE pending_receipts (
        id            INTEGER PRIMARY KEY,
        user_id       TEXT    NOT NULL,
        change_id     TEXT    NOT NULL,
        seq           INTEGER NOT NULL
    );
    "#,
    // 4: the users that OpenID Connect sign-in made: one per (issuer,
    // subject) pair, whose random UUID is the user id of its dataset.
    r#"
    CREATE TABLE users (
        user_id       TEXT    NOT NULL PRIMARY KEY,
        issuer        TEXT    NOT NULL,
        subject       TEXT    NOT NULL,
        created_at    INTEGER NOT NULL,
        UNIQUE (issuer, subject)
    ) WITHOUT ROWID;
    "#,
];

/// The PostgreSQL migrations, in step with [`SQLITE_MIGRATIONS`].
///
/// Text that is part of a key or an ordering uses the `C` collation, so that
/// rows sort by their bytes exactly as on SQLite, whatever the database's
/// locale. JSON is kept as `TEXT`, not `jsonb`, because the hashes cover its
/// exact canonical bytes.
pub const POSTGRES_MIGRATIONS: &[&str] = &[
    // 1: the change log, entities, devices, datasets, conflicts and collection policies.
    r#"
    CREATE TABLE datasets (
        user_id       TEXT COLLATE "C" NOT NULL PRIMARY KEY,
        head          BIGINT  NOT NULL,
        state_hash    BYTEA   NOT NULL,
        state_digest  BYTEA   NOT NULL,
        horizon       BIGINT  NOT NULL DEFAULT 0,
        conflict_seq  BIGINT  NOT NULL DEFAULT 0
    );

    CREATE TABLE changes (
        user_id       TEXT COLLATE "C" NOT NULL,
        seq           BIGINT  NOT NULL,
        change_id     TEXT COLLATE "C" NOT NULL,
        device_id     TEXT COLLATE "C" NOT NULL,
        collection    TEXT COLLATE "C" NOT NULL,
        entity_id     TEXT COLLATE "C" NOT NULL,
        op            TEXT    NOT NULL,
        data          TEXT,
        hlc           TEXT COLLATE "C" NOT NULL,
        base_version  BIGINT,
        server_time   BIGINT  NOT NULL,
        state_hash    BYTEA   NOT NULL,
        state_digest  BYTEA   NOT NULL,
        PRIMARY KEY (user_id, seq)
    );
    CREATE UNIQUE INDEX changes_by_change_id ON changes (user_id, change_id);

    CREATE TABLE entities (
        user_id       TEXT COLLATE "C" NOT NULL,
        collection    TEXT COLLATE "C" NOT NULL,
        entity_id     TEXT COLLATE "C" NOT NULL,
        data          TEXT    NOT NULL,
        version       BIGINT  NOT NULL,
        deleted       BOOLEAN NOT NULL,
        meta          TEXT    NOT NULL,
        entity_hash   BYTEA,
        PRIMARY KEY (user_id, collection, entity_id)
    );

    CREATE TABLE devices (
        user_id       TEXT COLLATE "C" NOT NULL,
        device_id     TEXT COLLATE "C" NOT NULL,
        cursor        BIGINT  NOT NULL DEFAULT 0,
        last_seen     BIGINT  NOT NULL,
        PRIMARY KEY (user_id, device_id)
    );

    CREATE TABLE conflicts (
        user_id       TEXT COLLATE "C" NOT NULL,
        id            BIGINT  NOT NULL,
        change_id     TEXT    NOT NULL,
        device_id     TEXT    NOT NULL,
        collection    TEXT    NOT NULL,
        entity_id     TEXT    NOT NULL,
        op            TEXT    NOT NULL,
        data          TEXT,
        hlc           TEXT    NOT NULL,
        seq           BIGINT,
        reason        TEXT    NOT NULL,
        fields        TEXT,
        current       TEXT,
        server_time   BIGINT  NOT NULL,
        PRIMARY KEY (user_id, id)
    );

    CREATE TABLE collections (
        user_id       TEXT COLLATE "C" NOT NULL,
        collection    TEXT COLLATE "C" NOT NULL,
        policy        TEXT    NOT NULL,
        PRIMARY KEY (user_id, collection)
    );
    "#,
    // 2: receipts and `dropped_to` (see the SQLite list).
    r#"
    ALTER TABLE datasets ADD COLUMN dropped_to BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE receipts (
        user_id       TEXT COLLATE "C" NOT NULL,
        change_id     TEXT COLLATE "C" NOT NULL,
        seq           BIGINT  NOT NULL,
        PRIMARY KEY (user_id, change_id)
    );
    INSERT INTO receipts (user_id, change_id, seq) SELECT user_id, change_id, seq FROM changes;
    DROP INDEX changes_by_change_id;
    "#,
    // 3: the pending tables (see the SQLite list). PostgreSQL writes
    // entities and receipts in place with each push, so they stay empty.
    r#"
    CREATE TABLE pending_entities (
        id            BIGSERIAL PRIMARY KEY,
        user_id       TEXT COLLATE "C" NOT NULL,
        collection    TEXT COLLATE "C" NOT NULL,
        entity_id     TEXT COLLATE "C" NOT NULL,
        data          TEXT    NOT NULL,
        version       BIGINT  NOT NULL,
        deleted       BOOLEAN NOT NULL,
        meta          TEXT    NOT NULL,
        entity_hash   BYTEA
    );
    CREATE TABLE pending_receipts (
        id            BIGSERIAL PRIMARY KEY,
        user_id       TEXT COLLATE "C" NOT NULL,
        change_id     TEXT COLLATE "C" NOT NULL,
        seq           BIGINT  NOT NULL
    );
    "#,
    // 4: the users of OpenID Connect sign-in (see the SQLite list).
    r#"
    CREATE TABLE users (
        user_id       TEXT COLLATE "C" NOT NULL PRIMARY KEY,
        issuer        TEXT COLLATE "C" NOT NULL,
        subject       TEXT COLLATE "C" NOT NULL,
        created_at    BIGINT NOT NULL,
        UNIQUE (issuer, subject)
    );
    "#,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_stores_have_the_same_schema_versions() {
        assert_eq!(SQLITE_MIGRATIONS.len(), POSTGRES_MIGRATIONS.len());
    }
}
