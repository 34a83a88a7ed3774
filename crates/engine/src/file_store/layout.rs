//! The object names of a file store. Seqs are zero-padded to 20 digits so
//! that a listing sorts in log order.

/// The descriptor, written once.
pub const DESCRIPTOR: &str = "deltasync.json";
/// The head hint.
pub const HEAD_HINT: &str = "meta.json";
/// The folder of log segments.
pub const LOG_DIR: &str = "log";
/// The folder of snapshots.
pub const SNAPSHOT_DIR: &str = "snapshots";
/// The folder of conditional-write probes (see the native client's probe).
pub const PROBE_DIR: &str = "probe";

/// The segment whose first change has seq `first`.
pub fn segment(first: u64) -> String {
    format!("{LOG_DIR}/{first:020}.json")
}

/// The snapshot of the dataset at seq `seq`.
pub fn snapshot(seq: u64) -> String {
    format!("{SNAPSHOT_DIR}/{seq:020}.ndjson")
}

/// The seq in a snapshot's name (as a listing of [`SNAPSHOT_DIR`] gives it), if it is one.
pub fn snapshot_seq(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".ndjson")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_in_log_order_and_read_back() {
        assert_eq!(segment(42), "log/00000000000000000042.json");
        assert!(segment(9) < segment(10));
        let name = snapshot(1234).trim_start_matches("snapshots/").to_owned();
        assert_eq!(snapshot_seq(&name), Some(1234));
        assert_eq!(snapshot_seq("00000000000000001234.json"), None);
        assert_eq!(snapshot_seq("1234.ndjson"), None);
    }
}
