//! The `--format table` rendering of each admin report: aligned columns,
//! times in UTC, long data cut short.

use deltasync_server::store::admin::{Conflicts, History, Stats, UserDevices, UserSummary, Volume, utc_datetime};

/// The most characters of a change's data a history table shows.
const DATA_WIDTH: usize = 60;

/// A table of text cells, printed with every column as wide as its widest cell.
struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(headers: &[&'static str]) -> Table {
        Table { headers: headers.to_vec(), rows: Vec::new() }
    }

    fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    /// The table, one line per row under a header and a rule; an empty table says `(none)`.
    fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let padded: Vec<String> =
                cells.zip(&widths).map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count()))).collect();
            format!("{}\n", padded.join("  ").trim_end())
        };
        let mut out = line(&mut self.headers.iter().copied());
        out += &line(&mut widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().iter().map(String::as_str));
        for row in &self.rows {
            out += &line(&mut row.iter().map(String::as_str));
        }
        if self.rows.is_empty() {
            out += "(none)\n";
        }
        out
    }
}

fn time(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".to_owned(), utc_datetime)
}

/// `text` cut to `max` characters, ending in `…` when cut.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(max - 1).collect();
    short.push('…');
    short
}

/// The table of `admin users`.
pub fn users(users: &[UserSummary]) -> String {
    let mut t =
        Table::new(&["USER", "HEAD", "HORIZON", "CHANGES", "ENTITIES", "DEVICES", "CONFLICTS", "LAST ACTIVITY (UTC)"]);
    for u in users {
        t.row(vec![
            u.user_id.clone(),
            u.head.to_string(),
            u.horizon.to_string(),
            u.changes.to_string(),
            u.entities.to_string(),
            u.devices.to_string(),
            u.conflicts.to_string(),
            time(u.last_activity),
        ]);
    }
    t.render()
}

/// The table of `admin devices`.
pub fn devices(d: &UserDevices) -> String {
    let mut t = Table::new(&["DEVICE", "CURSOR", "BEHIND", "LAST SEEN (UTC)", "NEEDS BOOTSTRAP"]);
    for v in &d.devices {
        t.row(vec![
            v.device_id.clone(),
            v.cursor.to_string(),
            v.behind.to_string(),
            time(Some(v.last_seen)),
            if v.needs_bootstrap { "yes" } else { "no" }.to_owned(),
        ]);
    }
    format!("user {}: head {}, horizon {}\n{}", d.user_id, d.head, d.horizon, t.render())
}

/// The table of `admin history`.
pub fn history(h: &History) -> String {
    let mut t =
        Table::new(&["SEQ", "SERVER TIME (UTC)", "DEVICE", "COLLECTION", "ENTITY", "OP", "CHANGE ID", "HLC", "DATA"]);
    for c in &h.changes {
        t.row(vec![
            c.seq.to_string(),
            time(Some(c.server_time)),
            c.device_id.clone(),
            c.collection.clone(),
            c.entity_id.clone(),
            c.op.clone(),
            c.change_id.clone(),
            c.hlc.clone(),
            c.data.as_ref().map_or_else(|| "-".to_owned(), |d| cut(d.get(), DATA_WIDTH)),
        ]);
    }
    let entity = h.entity.as_ref().map(|e| format!(", entity {e}")).unwrap_or_default();
    format!(
        "user {}: head {}, horizon {}{entity}; newest first, at most {}\n{}",
        h.user_id,
        h.head,
        h.horizon,
        h.limit,
        t.render()
    )
}

/// The table of `admin conflicts`.
pub fn conflicts(c: &Conflicts) -> String {
    let mut t = Table::new(&[
        "ID",
        "SERVER TIME (UTC)",
        "DEVICE",
        "COLLECTION",
        "ENTITY",
        "OP",
        "REASON",
        "FIELDS",
        "CHANGE ID",
        "SEQ",
    ]);
    for r in &c.conflicts {
        t.row(vec![
            r.id.to_string(),
            time(Some(r.server_time)),
            r.device_id.clone(),
            r.collection.clone(),
            r.entity_id.clone(),
            r.op.as_str().to_owned(),
            r.reason.as_str().to_owned(),
            r.fields.as_ref().map_or_else(|| "-".to_owned(), |f| f.join(",")),
            r.change_id.clone(),
            r.seq.map_or_else(|| "-".to_owned(), |s| s.to_string()),
        ]);
    }
    format!(
        "user {}: conflict records, {} in all; newest first, at most {}\n{}",
        c.user_id,
        c.total,
        c.limit,
        t.render()
    )
}

/// The table of `admin volume`.
pub fn volume(v: &Volume) -> String {
    let mut t = Table::new(&["DATE (UTC)", "CHANGES", "BYTES"]);
    for d in &v.days {
        t.row(vec![d.date.clone(), d.changes.to_string(), d.bytes.to_string()]);
    }
    format!("user {}: changes still in the log, by {}\n{}", v.user_id, v.by, t.render())
}

/// The tables of `admin stats`: the totals, then every dataset's head and horizon.
pub fn stats(s: &Stats) -> String {
    let mut totals = Table::new(&["TOTAL", "VALUE"]);
    for (name, value) in [
        ("store", s.store.to_owned()),
        ("schema_version", s.schema_version.to_string()),
        ("users", s.users.to_string()),
        ("changes", s.changes.to_string()),
        ("entities", s.entities.to_string()),
        ("tombstones", s.tombstones.to_string()),
        ("devices", s.devices.to_string()),
        ("conflicts", s.conflicts.to_string()),
        ("database_bytes", s.database_bytes.to_string()),
    ] {
        totals.row(vec![name.to_owned(), value]);
    }
    let mut datasets = Table::new(&["USER", "HEAD", "HORIZON"]);
    for d in &s.datasets {
        datasets.row(vec![d.user_id.clone(), d.head.to_string(), d.horizon.to_string()]);
    }
    format!("{}\n{}", totals.render(), datasets.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let mut t = Table::new(&["A", "LONG HEADER", "C"]);
        t.row(vec!["wide cell".into(), "1".into(), "é".into()]);
        assert_eq!(t.render(), "A          LONG HEADER  C\n---------  -----------  -\nwide cell  1            é\n");
        assert_eq!(Table::new(&["X"]).render(), "X\n-\n(none)\n");
    }

    #[test]
    fn long_data_is_cut_with_an_ellipsis() {
        assert_eq!(cut("abcdef", 6), "abcdef");
        assert_eq!(cut("abcdefg", 6), "abcde…");
    }
}
