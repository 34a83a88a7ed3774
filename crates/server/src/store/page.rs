//! How a page of the log is assembled, the same way in every store: changes in
//! seq order, without a gap, within a row limit and a byte budget.
//!
//! A store reads the head, asks [`PageAssembler::start`] which seqs the page
//! may cover (or whether the device must bootstrap), feeds the rows it reads
//! to the assembler and stops reading as soon as the assembler says the page
//! is full, so a page's memory is bounded by `max_page_bytes` (plus one
//! change), not by `limit` rows.

use deltasync_protocol::change::{WireParts, write_wire_json};
use deltasync_protocol::{StateDigest, StateHash, UserId};

use super::core::reset::needs_reset;
use super::rows::{self, Columns, corrupt};
use super::{ChangePage, DatasetHead, StoreError};

/// What a change costs a page beyond its `data`: a fixed allowance for the
/// envelope (ids, HLC, seq, op; about 250 bytes with UUID ids), so a page of
/// many tiny changes is bounded too.
pub const CHANGE_ENVELOPE_BYTES: u64 = 256;

/// What one change costs against a page's byte budget.
pub fn change_cost(data_bytes: usize) -> u64 {
    data_bytes as u64 + CHANGE_ENVELOPE_BYTES
}

/// How much of the log one page may cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimit {
    /// The most changes.
    pub rows: u64,
    /// The most bytes, counted by [`change_cost`]; the first change is always served.
    pub bytes: u64,
}

/// Collects the changes of one page and checks that they follow each other.
pub struct PageAssembler {
    cursor: u64,
    range_end: u64,
    budget: u64,
    spent: u64,
    end: u64,
    full: bool,
    changes: Vec<(u64, String)>,
    end_hashes: Option<(StateHash, StateDigest)>,
    buf: Vec<u8>,
}

impl PageAssembler {
    /// The page a request for the changes after `cursor` within `limit` asks
    /// for, given the dataset's `head`: `None` when the cursor lies outside
    /// the log and the device must bootstrap (see [`needs_reset`]).
    pub fn start(cursor: u64, limit: PageLimit, head: &DatasetHead) -> Option<PageAssembler> {
        if needs_reset(cursor, head) {
            return None;
        }
        Some(PageAssembler::new(cursor, range_end(cursor, limit.rows, head), limit.bytes))
    }

    /// A page after `cursor`, at most up to `range_end` (the head or `cursor + rows`), within `bytes`.
    pub fn new(cursor: u64, range_end: u64, bytes: u64) -> PageAssembler {
        PageAssembler {
            cursor,
            range_end,
            budget: bytes,
            spent: 0,
            end: cursor,
            full: false,
            changes: Vec::new(),
            end_hashes: None,
            buf: Vec::with_capacity(256),
        }
    }

    /// The seqs the store should read: `cursor + 1 ..= range_end`.
    pub fn range(&self) -> (u64, u64) {
        (self.cursor, self.range_end)
    }

    /// Whether a change whose data is `data_bytes` long still fits; the first one always does.
    /// Once one does not fit, none does.
    pub fn admits(&mut self, data_bytes: usize) -> bool {
        if self.full || self.end >= self.range_end {
            return false;
        }
        let cost = change_cost(data_bytes);
        if !self.changes.is_empty() && self.spent.saturating_add(cost) > self.budget {
            self.full = true;
            return false;
        }
        true
    }

    /// Offers the next row of the range; answers `Ok(false)` when the page is
    /// complete and the store should stop reading.
    pub fn offer(&mut self, user: &UserId, parts: &WireParts<'_>) -> Result<bool, StoreError> {
        let data_bytes = parts.data_json.map_or(0, str::len);
        if !self.admits(data_bytes) {
            return Ok(false);
        }
        self.charge(user, parts.seq, data_bytes)?;
        self.buf.clear();
        write_wire_json(&mut self.buf, parts);
        self.changes.push((parts.seq, String::from_utf8(self.buf.clone()).expect("JSON is UTF-8")));
        Ok(self.end < self.range_end)
    }

    /// [`offer`](Self::offer)s a row of all [`rows::CHANGE_COLUMNS`], and
    /// keeps the hashes it holds when it ends the page so far.
    pub fn offer_row(&mut self, user: &UserId, r: &impl Columns) -> Result<bool, StoreError> {
        let before = self.end;
        let more = self.offer(user, &rows::wire_parts(r)?)?;
        if self.end != before {
            self.end_hashes = Some(rows::change_hashes(r)?);
        }
        Ok(more)
    }

    /// The seq whose chain head and digest the store must look up for
    /// [`finish`](Self::finish): `None` when they are known already (read
    /// with the change that ends the page, or those of the head or of the
    /// empty log).
    pub fn hashes_to_look_up(&self, head: &DatasetHead) -> Option<u64> {
        (self.end_hashes.is_none() && rows::hashes_without_lookup(self.end, head).is_none()).then_some(self.end)
    }

    /// Counts a change that [`admits`](Self::admits) let in, without keeping
    /// it: for a store that first learns how far a page reaches from the
    /// sizes alone, then fetches only those changes.
    pub fn charge(&mut self, user: &UserId, seq: u64, data_bytes: usize) -> Result<(), StoreError> {
        if seq != self.end + 1 {
            return Err(self.gap(user));
        }
        self.spent = self.spent.saturating_add(change_cost(data_bytes));
        self.end = seq;
        Ok(())
    }

    /// Where the page ends, once every size has been [`charge`](Self::charge)d;
    /// refuses a range that stopped short without being full (a gap in the log).
    pub fn reach(&self, user: &UserId) -> Result<u64, StoreError> {
        if !self.full && self.end != self.range_end {
            return Err(self.gap(user));
        }
        Ok(self.end)
    }

    /// The last seq the page covers so far.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Whether the page covers nothing so far.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The page, with the hashes at [`end`](Self::end) (`looked_up`: those
    /// the store read for [`hashes_to_look_up`](Self::hashes_to_look_up));
    /// refuses a page that stopped short of its range without being full (a
    /// gap in the log).
    pub fn finish(
        self,
        user: &UserId,
        head: &DatasetHead,
        looked_up: Option<(StateHash, StateDigest)>,
    ) -> Result<ChangePage, StoreError> {
        self.reach(user)?;
        let (state_hash, state_digest) = self
            .end_hashes
            .or_else(|| rows::hashes_without_lookup(self.end, head))
            .or(looked_up)
            .ok_or_else(|| StoreError::Internal(format!("the hashes at seq {} were not looked up", self.end)))?;
        Ok(ChangePage {
            changes: self.changes,
            cursor: self.end,
            has_more: self.end < head.seq,
            state_hash,
            state_digest,
        })
    }

    fn gap(&self, user: &UserId) -> StoreError {
        corrupt(format!(
            "the log of {user} has a gap after seq {} (expected changes up to {})",
            self.end, self.range_end
        ))
    }
}

/// Whether a page read failed as a gap in the log would make it fail (as
/// [`StoreError::Corrupt`]): a store that reads the head and the rows in
/// separate statements asks [`after_gap`] what to answer.
pub fn is_gap(e: &StoreError) -> bool {
    matches!(e, StoreError::Corrupt(_))
}

/// What a page read that met a gap answers, given the head read again after
/// it: a reset when compaction raised the horizon past `cursor` meanwhile
/// (the rows were dropped under the read), else the error itself.
pub fn after_gap(cursor: u64, head_now: DatasetHead, e: StoreError) -> Result<crate::store::PageOutcome, StoreError> {
    if cursor < head_now.horizon {
        return Ok(crate::store::PageOutcome::ResetRequired { head: head_now });
    }
    Err(e)
}

/// The last seq a page after `cursor` may cover: the head, or `limit` changes on.
pub fn range_end(cursor: u64, rows: u64, head: &DatasetHead) -> u64 {
    cursor.saturating_add(rows).min(head.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(seq: u64, data: &str) -> WireParts<'_> {
        WireParts {
            seq,
            change_id: "c",
            device_id: "d",
            collection: "notes",
            entity_id: "e",
            op: "upsert",
            data_json: Some(data),
            hlc: "h",
            base_version: None,
            server_time: 1,
        }
    }

    fn user() -> UserId {
        UserId::parse("u").unwrap()
    }

    fn head(seq: u64) -> DatasetHead {
        DatasetHead { seq, ..DatasetHead::default() }
    }

    #[test]
    fn a_gap_under_a_raised_horizon_is_a_reset_and_any_other_stays_an_error() {
        let raised = DatasetHead { seq: 10, horizon: 6, ..DatasetHead::default() };
        let gap = || corrupt("gap");
        assert!(matches!(after_gap(5, raised, gap()), Ok(crate::store::PageOutcome::ResetRequired { .. })));
        assert!(matches!(after_gap(6, raised, gap()), Err(StoreError::Corrupt(_))));
        assert!(is_gap(&gap()) && !is_gap(&StoreError::Unavailable("busy".into())));
    }

    #[test]
    fn a_page_stops_at_its_byte_budget_and_says_more_follows() {
        let big = "x".repeat(1000);
        let mut page = PageAssembler::new(0, 10, 2 * change_cost(1000));
        assert!(page.offer(&user(), &parts(1, &big)).unwrap());
        assert!(page.offer(&user(), &parts(2, &big)).unwrap());
        assert!(!page.offer(&user(), &parts(3, &big)).unwrap());
        let page = page.finish(&user(), &head(10), Some(Default::default())).unwrap();
        assert_eq!((page.changes.len(), page.cursor, page.has_more), (2, 2, true));
    }

    #[test]
    fn the_first_change_is_served_even_when_it_alone_exceeds_the_budget() {
        let big = "x".repeat(10_000);
        let mut page = PageAssembler::new(4, 10, 100);
        assert!(page.offer(&user(), &parts(5, &big)).unwrap());
        assert!(!page.offer(&user(), &parts(6, "{}")).unwrap());
        let page = page.finish(&user(), &head(10), Some(Default::default())).unwrap();
        assert_eq!((page.changes.len(), page.cursor), (1, 5));
    }

    #[test]
    fn a_missing_seq_is_a_gap() {
        let mut page = PageAssembler::new(0, 3, u64::MAX);
        page.offer(&user(), &parts(1, "{}")).unwrap();
        assert!(matches!(page.offer(&user(), &parts(3, "{}")), Err(StoreError::Corrupt(_))));
        let mut sizes = PageAssembler::new(0, 3, u64::MAX);
        sizes.charge(&user(), 1, 2).unwrap();
        assert!(matches!(sizes.reach(&user()), Err(StoreError::Corrupt(_))));
        let mut short = PageAssembler::new(0, 3, u64::MAX);
        short.offer(&user(), &parts(1, "{}")).unwrap();
        assert!(matches!(short.finish(&user(), &head(3), Some(Default::default())), Err(StoreError::Corrupt(_))));
    }

    fn limit(rows: u64) -> PageLimit {
        PageLimit { rows, bytes: u64::MAX }
    }

    #[test]
    fn a_page_covers_at_most_limit_rows_and_never_past_the_head() {
        assert_eq!(PageAssembler::start(5, limit(10), &head(8)).unwrap().range(), (5, 8));
        assert_eq!(PageAssembler::start(5, limit(2), &head(8)).unwrap().range(), (5, 7));
        assert_eq!(PageAssembler::start(3, limit(u64::MAX), &head(9)).unwrap().range(), (3, 9));
        assert_eq!(range_end(u64::MAX, 1, &head(u64::MAX)), u64::MAX);
    }

    #[test]
    fn a_cursor_outside_the_log_starts_no_page() {
        assert!(PageAssembler::start(9, limit(10), &head(8)).is_none());
        let compacted = DatasetHead { seq: 8, horizon: 4, ..DatasetHead::default() };
        assert!(PageAssembler::start(3, limit(10), &compacted).is_none());
        assert!(PageAssembler::start(4, limit(10), &compacted).is_some());
    }

    #[test]
    fn a_page_at_the_head_is_empty_and_says_nothing_more_follows() {
        let page = PageAssembler::start(8, limit(10), &head(8)).unwrap();
        assert_eq!(page.range(), (8, 8));
        let page = page.finish(&user(), &head(8), Some(Default::default())).unwrap();
        assert_eq!((page.changes.len(), page.cursor, page.has_more), (0, 8, false));
    }

    #[test]
    fn only_hashes_that_no_row_held_are_looked_up() {
        let at_head = PageAssembler::start(8, limit(10), &head(8)).unwrap();
        assert_eq!(at_head.hashes_to_look_up(&head(8)), None);
        let empty_log = PageAssembler::start(0, limit(10), &head(0)).unwrap();
        assert_eq!(empty_log.hashes_to_look_up(&head(0)), None);
        let mut mid_log = PageAssembler::new(0, 2, u64::MAX);
        mid_log.offer(&user(), &parts(1, "{}")).unwrap();
        mid_log.offer(&user(), &parts(2, "{}")).unwrap();
        assert_eq!(mid_log.hashes_to_look_up(&head(5)), Some(2));
        assert!(matches!(mid_log.finish(&user(), &head(5), None), Err(StoreError::Internal(_))));
    }

    #[test]
    fn the_row_limit_ends_the_page_at_its_range() {
        let mut page = PageAssembler::new(0, 2, u64::MAX);
        assert!(page.offer(&user(), &parts(1, "{}")).unwrap());
        assert!(!page.offer(&user(), &parts(2, "{}")).unwrap());
        let page = page.finish(&user(), &head(5), Some(Default::default())).unwrap();
        assert_eq!((page.cursor, page.has_more), (2, true));
    }
}
