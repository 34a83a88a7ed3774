//! The fold: pending entity states and receipts written into their tables
//! in key order (see [`crate::store::core::pending`]).

use rusqlite::Connection;

use super::map_err;
use crate::store::StoreError;

/// Writes every pending row into `entities` and `receipts` in key order,
/// newest state last so that it wins, and empties the pending tables.
/// Answers how many pending rows it moved. Runs inside the caller's write
/// transaction; the sort happens in memory (`temp_store = MEMORY` on the
/// writer), bounded by what may be pending.
pub fn fold_pending(conn: &Connection) -> Result<u64, StoreError> {
    let entities = conn
        .prepare_cached(
            "INSERT OR REPLACE INTO entities (user_id, collection, entity_id, data, version, deleted, meta, entity_hash)
             SELECT user_id, collection, entity_id, data, version, deleted, meta, entity_hash FROM pending_entities
             ORDER BY user_id, collection, entity_id, id",
        )
        .map_err(map_err)?
        .execute([])
        .map_err(map_err)?;
    let receipts = conn
        .prepare_cached(
            "INSERT INTO receipts (user_id, change_id, seq)
             SELECT user_id, change_id, seq FROM pending_receipts ORDER BY user_id, change_id",
        )
        .map_err(map_err)?
        .execute([])
        .map_err(map_err)?;
    conn.execute_batch("DELETE FROM pending_entities; DELETE FROM pending_receipts;").map_err(map_err)?;
    Ok((entities + receipts) as u64)
}
