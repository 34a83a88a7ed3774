//! The SQL schema, as numbered migrations. Every table is keyed by `user_id` first.
//!
//! The same statements run on SQLite and PostgreSQL except where a type name
//! differs; migration `n` turns schema `n - 1` into schema `n`.

/// The migrations, in order; the schema version is the number applied.
pub const MIGRATIONS: &[&str] = &[
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
];
