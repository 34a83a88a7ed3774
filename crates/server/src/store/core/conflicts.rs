//! Conflict records: how one is stored and read back, and how a page of them is cut.

use deltasync_protocol::Op;
use deltasync_protocol::json;
use deltasync_protocol::merge::ConflictReason;
use deltasync_protocol::wire::ConflictRecord;

use crate::batch::ConflictEntry;
use crate::store::rows::{Columns, corrupt};
use crate::store::{ConflictPage, StoreError};

/// The columns of a conflict record, in the order [`read_conflict`] reads them.
pub const CONFLICT_COLUMNS: &str =
    "id, change_id, device_id, collection, entity_id, op, data, hlc, seq, reason, fields, current, server_time";

/// How a page of at most `limit` conflict records is read: one row more than
/// the page is fetched, to learn whether more follow without a second query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConflictPaging {
    limit: u64,
}

impl ConflictPaging {
    /// A page of at most `limit` records.
    pub fn new(limit: u64) -> ConflictPaging {
        ConflictPaging { limit }
    }

    /// The `LIMIT` to give the query: one more than the page, saturating at
    /// the largest value SQL takes (so that no limit wraps to nothing or to a
    /// negative number).
    pub fn rows_to_fetch(&self) -> i64 {
        i64::try_from(self.limit.saturating_add(1)).unwrap_or(i64::MAX)
    }

    /// The page, from the records the query returned, oldest first.
    pub fn page(&self, mut records: Vec<ConflictRecord>) -> ConflictPage {
        let has_more = records.len() as u64 > self.limit;
        records.truncate(usize::try_from(self.limit).unwrap_or(usize::MAX));
        ConflictPage { records, has_more }
    }
}

/// A conflict record's JSON columns, encoded for storage.
pub struct EncodedConflict {
    /// `data`: the losing change's data, canonical JSON.
    pub data: Option<String>,
    /// `fields`: the conflicting fields, a JSON array.
    pub fields: Option<String>,
    /// `current`: the entity's data that won, canonical JSON.
    pub current: Option<String>,
}

/// Encodes the JSON columns of a conflict record.
pub fn encode_conflict(c: &ConflictEntry) -> EncodedConflict {
    EncodedConflict {
        data: c.change.data_jcs(),
        fields: c.conflict.fields.as_ref().map(|f| serde_json::to_string(f).expect("strings serialise")),
        current: c.conflict.current.as_ref().map(json::to_jcs),
    }
}

/// Reads a conflict record from a row of [`CONFLICT_COLUMNS`].
pub fn read_conflict(r: &impl Columns) -> Result<ConflictRecord, StoreError> {
    let parse = |s: Option<&str>| -> Result<Option<serde_json::Value>, StoreError> {
        s.map(serde_json::from_str).transpose().map_err(|e| corrupt(format!("conflict record: {e}")))
    };
    let op = r.text(5)?;
    let reason = r.text(9)?;
    let reason: ConflictReason = serde_json::from_value(serde_json::Value::String(reason.to_owned()))
        .map_err(|_| corrupt(format!("conflict reason {reason:?}")))?;
    Ok(ConflictRecord {
        id: r.int(0)? as u64,
        op: Op::parse(op).ok_or_else(|| corrupt(format!("conflict record op {op:?}")))?,
        change_id: r.text(1)?.to_owned(),
        device_id: r.text(2)?.to_owned(),
        collection: r.text(3)?.to_owned(),
        entity_id: r.text(4)?.to_owned(),
        data: parse(r.opt_text(6)?)?,
        hlc: r.text(7)?.to_owned(),
        seq: r.opt_int(8)?.map(|s| s as u64),
        reason,
        fields: r
            .opt_text(10)?
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| corrupt(format!("conflict fields: {e}")))?,
        current: parse(r.opt_text(11)?)?,
        server_time: r.int(12)? as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64) -> ConflictRecord {
        ConflictRecord {
            id,
            change_id: format!("c{id}"),
            device_id: "d".into(),
            collection: "notes".into(),
            entity_id: "e".into(),
            op: Op::Upsert,
            data: None,
            hlc: "h".into(),
            seq: None,
            reason: ConflictReason::ClockSkew,
            fields: None,
            current: None,
            server_time: 1,
        }
    }

    #[test]
    fn one_row_more_than_the_page_is_fetched() {
        assert_eq!(ConflictPaging::new(0).rows_to_fetch(), 1);
        assert_eq!(ConflictPaging::new(100).rows_to_fetch(), 101);
    }

    #[test]
    fn a_huge_limit_fetches_as_many_rows_as_sql_takes_instead_of_wrapping() {
        assert_eq!(ConflictPaging::new(u64::MAX).rows_to_fetch(), i64::MAX);
        assert_eq!(ConflictPaging::new(i64::MAX as u64).rows_to_fetch(), i64::MAX);
        assert_eq!(ConflictPaging::new(i64::MAX as u64 - 1).rows_to_fetch(), i64::MAX);
    }

    #[test]
    fn the_extra_row_says_more_follow_and_is_not_served() {
        let paging = ConflictPaging::new(2);
        let page = paging.page((1..=3).map(record).collect());
        assert!(page.has_more);
        assert_eq!(page.records.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn a_short_or_exact_page_is_the_last() {
        let paging = ConflictPaging::new(2);
        let exact = paging.page((1..=2).map(record).collect());
        assert!(!exact.has_more);
        assert_eq!(exact.records.len(), 2);
        let short = paging.page(vec![record(7)]);
        assert!(!short.has_more);
        assert_eq!(short.records.len(), 1);
        assert!(!ConflictPaging::new(u64::MAX).page(vec![record(1)]).has_more);
    }
}
