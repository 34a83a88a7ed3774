//! Full-state snapshot files, as `deltasync import` and `deltasync client
//! import` read them: which format a file is in, every entry validated, and
//! the change id an imported entity gets.
//!
//! Two formats hold a snapshot:
//! - a document: one JSON object `{collection: {entity_id: data}}`;
//! - NDJSON: one `{"collection", "entity_id", "data"}` object per line (blank
//!   lines are skipped).
//!
//! A third, NDJSON writes `{"op", "collection", "id", "data"}`, belongs to the
//! client's import; [`detect`] recognises it so the client can hand it on.
//!
//! The format is decided by the first non-blank line: a complete JSON object
//! with a string `entity_id` makes the file snapshot lines, one with a string
//! `op` makes it write lines. Any other file starting with `{` must be one
//! document. A file is checked whole before anything is imported: every name
//! by its rule ([`crate::ids`]), every `data` an object within the limits
//! ([`Change::check_data`]), and no entity given twice. [`check`] does that
//! keeping only the entity keys, then [`entries`] reads the entries again as
//! they are imported; [`parse`] does both at once for small files.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::change::{Change, ChangeLimits, Op};
use crate::ids::{ChangeId, Collection, EntityId, UserId};
use crate::json;

/// The prefix of every change id [`SnapshotEntry::change_id`] derives.
pub const CHANGE_ID_PREFIX: &str = "import-";

/// The formats [`detect`] tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object `{collection: {entity_id: data}}`.
    Document,
    /// NDJSON of `{"collection", "entity_id", "data"}`.
    Lines,
    /// NDJSON of client writes `{"op", "collection", "id", "data"}` (not a snapshot).
    Writes,
}

/// Where in a snapshot file a fault is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// The file as a whole (empty, or in no known format).
    File,
    /// A line, counted from 1.
    Line(u64),
    /// An entity of a document (whose lines are not tracked).
    Entity {
        /// Its collection, as written.
        collection: String,
        /// Its id, as written (`None` when the collection itself is at fault).
        entity_id: Option<String>,
    },
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::File => f.write_str("the file"),
            Place::Line(n) => write!(f, "line {n}"),
            Place::Entity { collection, entity_id: None } => write!(f, "collection {collection:?}"),
            Place::Entity { collection, entity_id: Some(id) } => {
                write!(f, "entity {id:?} of collection {collection:?}")
            }
        }
    }
}

/// Why a snapshot file was refused: where, and what to fix. The file's
/// author's fault; nothing of the file was imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{place}: {reason}")]
pub struct SnapshotError {
    /// Where the fault is.
    pub place: Place,
    /// What is wrong, in words.
    pub reason: String,
}

impl SnapshotError {
    fn new(place: Place, reason: impl Into<String>) -> SnapshotError {
        SnapshotError { place, reason: reason.into() }
    }
}

/// One entity of a snapshot, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotEntry {
    /// Its collection.
    pub collection: Collection,
    /// Its id.
    pub entity_id: EntityId,
    /// Its fields, written as one upsert.
    pub data: Map<String, Value>,
}

impl SnapshotEntry {
    /// The id of the upsert that imports this entity into `user`'s dataset:
    /// `import-` and the first 32 hex digits of the SHA-256 of the canonical
    /// (JCS) form of `[user, collection, entity_id, data]`. The same entity
    /// with the same data gets the same id in every run, so the server answers
    /// a re-import `duplicate`.
    pub fn change_id(&self, user: &UserId) -> ChangeId {
        // The JCS form of the array, written in place rather than built as a Value.
        let mut key = Vec::with_capacity(256);
        key.push(b'[');
        for name in [user.as_str(), self.collection.as_str(), self.entity_id.as_str()] {
            json::write_str(&mut key, name);
            key.push(b',');
        }
        json::write_object(&mut key, &self.data);
        key.push(b']');
        let hash = Sha256::digest(&key);
        ChangeId::parse(format!("{CHANGE_ID_PREFIX}{}", hex::encode(&hash[..16]))).expect("39 plain characters")
    }
}

/// The format of `text` (see the module documentation), or why it has none.
pub fn detect(text: &str) -> Result<Format, SnapshotError> {
    let unknown = || {
        SnapshotError::new(
            Place::File,
            "is in no known format: expected one JSON object {collection: {entity_id: data}}, or NDJSON lines \
             {\"collection\", \"entity_id\", \"data\"}, or (client import only) NDJSON writes \
             {\"op\", \"collection\", \"id\", \"data\"}",
        )
    };
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let Some((first_index, first)) = lines.next() else {
        return Err(SnapshotError::new(Place::File, "is empty: there is nothing to import"));
    };
    if !first.trim_start().starts_with('{') {
        return Err(unknown());
    }
    let Ok(Value::Object(first)) = serde_json::from_str::<Value>(first) else {
        // An object spread over several lines: a document.
        return Ok(Format::Document);
    };
    if first.get("entity_id").is_some_and(Value::is_string) {
        return Ok(Format::Lines);
    }
    if first.get("op").is_some_and(Value::is_string) {
        return Ok(Format::Writes);
    }
    match lines.next() {
        None => Ok(Format::Document),
        Some(_) => Err(SnapshotError::new(
            Place::Line(first_index as u64 + 1),
            "is a JSON object on a line of its own but has no string `entity_id` (a snapshot line \
             {\"collection\", \"entity_id\", \"data\"}) nor `op` (a client write line); a document \
             {collection: {entity_id: data}} must be the whole file",
        )),
    }
}

/// The format of `text` if it is a snapshot; write lines ([`Format::Writes`])
/// are refused: they are not one.
fn snapshot_format(text: &str) -> Result<Format, SnapshotError> {
    match detect(text)? {
        Format::Writes => Err(SnapshotError::new(
            Place::File,
            "holds write lines {\"op\", \"collection\", \"id\", \"data\"}, not a snapshot: write lines are \
             imported by `deltasync client import`",
        )),
        format => Ok(format),
    }
}

/// Every entry of a snapshot in either format, checked against `limits`.
pub fn parse(text: &str, limits: &ChangeLimits) -> Result<Vec<SnapshotEntry>, SnapshotError> {
    match snapshot_format(text)? {
        Format::Lines => {
            check(text, limits)?;
            entries(text, limits)?.collect()
        }
        _ => parse_document(text, limits),
    }
}

/// Checks every entry of a snapshot in either format against `limits`, and
/// that no entity is given twice, without keeping the entries (only their
/// keys); returns how many there are. The first pass of an import that then
/// reads them with [`entries`].
pub fn check(text: &str, limits: &ChangeLimits) -> Result<u64, SnapshotError> {
    if snapshot_format(text)? == Format::Document {
        return Ok(parse_document(text, limits)?.len() as u64);
    }
    let mut first_line: HashMap<(Collection, EntityId), u64> = HashMap::new();
    for item in lines(text, limits) {
        let (number, entry) = item?;
        match first_line.entry((entry.collection, entry.entity_id)) {
            Entry::Vacant(vacant) => {
                vacant.insert(number);
            }
            Entry::Occupied(earlier) => {
                let ((collection, entity_id), earlier) = (earlier.key(), earlier.get());
                return Err(SnapshotError::new(
                    Place::Line(number),
                    format!("entity {entity_id:?} of collection {collection:?} was already given on line {earlier}"),
                ));
            }
        }
    }
    Ok(first_line.len() as u64)
}

/// The entries of a snapshot that [`check`] passed, in file order. NDJSON
/// lines are parsed as the iterator advances, so a caller holds only the
/// entries it keeps; a document is parsed whole first.
pub fn entries<'a>(
    text: &'a str,
    limits: &'a ChangeLimits,
) -> Result<Box<dyn Iterator<Item = Result<SnapshotEntry, SnapshotError>> + 'a>, SnapshotError> {
    Ok(match snapshot_format(text)? {
        Format::Lines => Box::new(lines(text, limits).map(|item| item.map(|(_, entry)| entry))),
        _ => Box::new(parse_document(text, limits)?.into_iter().map(Ok)),
    })
}

/// The entries of a document `{collection: {entity_id: data}}`.
fn parse_document(text: &str, limits: &ChangeLimits) -> Result<Vec<SnapshotEntry>, SnapshotError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        SnapshotError::new(Place::Line(e.line() as u64), format!("not valid JSON (column {}): {e}", e.column()))
    })?;
    let Value::Object(collections) = value else {
        return Err(SnapshotError::new(Place::File, "must be one JSON object {collection: {entity_id: data}}"));
    };
    let mut entries = Vec::new();
    for (collection_name, entities) in collections {
        let at = |entity_id: Option<&str>| Place::Entity {
            collection: collection_name.clone(),
            entity_id: entity_id.map(str::to_owned),
        };
        let collection =
            Collection::parse(collection_name.as_str()).map_err(|e| SnapshotError::new(at(None), e.to_string()))?;
        let Value::Object(entities) = entities else {
            return Err(SnapshotError::new(at(None), "must map to an object {entity_id: data}"));
        };
        for (id, data) in entities {
            let entry = entry(collection.clone(), &id, data, limits)
                .map_err(|reason| SnapshotError::new(at(Some(&id)), reason))?;
            entries.push(entry);
        }
    }
    Ok(entries)
}

/// The entries of NDJSON snapshot lines with their line numbers, blank lines skipped.
fn lines<'a>(
    text: &'a str,
    limits: &'a ChangeLimits,
) -> impl Iterator<Item = Result<(u64, SnapshotEntry), SnapshotError>> + 'a {
    text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()).map(|(index, line)| {
        let number = index as u64 + 1;
        parse_line(line)
            .and_then(|(collection, id, data)| entry(collection, &id, data, limits))
            .map(|entry| (number, entry))
            .map_err(|reason| SnapshotError::new(Place::Line(number), reason))
    })
}

/// The members of one snapshot line.
fn parse_line(line: &str) -> Result<(Collection, String, Value), String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(mut obj) = value else {
        return Err("must be a JSON object {\"collection\", \"entity_id\", \"data\"}".to_owned());
    };
    if let Some(other) = obj.keys().find(|k| !matches!(k.as_str(), "collection" | "entity_id" | "data")) {
        return Err(format!(
            "unknown member `{other}`: a snapshot line holds only `collection`, `entity_id` and `data`"
        ));
    }
    let mut string = |name: &'static str| match obj.remove(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("member `{name}` must be a string")),
        None => Err(format!("member `{name}` is required")),
    };
    let collection = Collection::parse(string("collection")?).map_err(|e| e.to_string())?;
    let entity_id = string("entity_id")?;
    let data = obj.remove("data").ok_or("member `data` is required")?;
    Ok((collection, entity_id, data))
}

/// An entry, its id and data checked as a pushed upsert's are.
fn entry(collection: Collection, entity_id: &str, data: Value, limits: &ChangeLimits) -> Result<SnapshotEntry, String> {
    let entity_id = EntityId::parse(entity_id).map_err(|e| e.to_string())?;
    Change::check_data(Op::Upsert, Some(&data), limits).map_err(|e| e.to_string())?;
    let Value::Object(data) = data else { unreachable!("check_data refuses an upsert whose data is not an object") };
    Ok(SnapshotEntry { collection, entity_id, data })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn limits() -> ChangeLimits {
        ChangeLimits::default()
    }

    #[test]
    fn formats_are_told_apart_by_the_first_line() {
        assert_eq!(detect("{\"tasks\": {\"a\": {\"x\": 1}}}"), Ok(Format::Document));
        assert_eq!(detect("\n{\n \"tasks\": {}\n}\n"), Ok(Format::Document));
        assert_eq!(detect("{\"collection\":\"t\",\"entity_id\":\"a\",\"data\":{}}\n"), Ok(Format::Lines));
        assert_eq!(detect("{\"op\":\"put\",\"collection\":\"t\",\"id\":\"a\",\"data\":{}}"), Ok(Format::Writes));
        assert_eq!(detect("  \n").unwrap_err().place, Place::File);
        assert!(detect("[1, 2]").unwrap_err().reason.contains("no known format"));
        let two_objects = detect("\n{\"tasks\": {}}\n{\"notes\": {}}\n").unwrap_err();
        assert_eq!(two_objects.place, Place::Line(2));
    }

    #[test]
    fn both_formats_give_the_same_entries() {
        let document = r#"{"tasks": {"a": {"title": "one"}, "b": {"n": 1.0}}, "notes": {"x": {}}}"#;
        let lines = concat!(
            "{\"collection\": \"tasks\", \"entity_id\": \"a\", \"data\": {\"title\": \"one\"}}\n",
            "\n",
            "{\"collection\": \"tasks\", \"entity_id\": \"b\", \"data\": {\"n\": 1.0}}\n",
            "{\"collection\": \"notes\", \"entity_id\": \"x\", \"data\": {}}\n",
        );
        let mut from_document = parse(document, &limits()).unwrap();
        let mut from_lines = parse(lines, &limits()).unwrap();
        let key = |e: &SnapshotEntry| (e.collection.clone(), e.entity_id.clone());
        from_document.sort_by_key(key);
        from_lines.sort_by_key(key);
        assert_eq!(from_document, from_lines);
        assert_eq!(from_lines.len(), 3);
    }

    #[test]
    fn a_bad_line_is_named_by_its_number() {
        let good = "{\"collection\": \"tasks\", \"entity_id\": \"a\", \"data\": {}}";
        let cases = [
            ("{\"collection\": \"tasks\", \"entity_id\": \"b\", \"data\": [1]}", "data"),
            ("{\"collection\": \"bad name\", \"entity_id\": \"b\", \"data\": {}}", "collection"),
            ("{\"collection\": \"tasks\", \"entity_id\": \"\", \"data\": {}}", "entity_id"),
            ("{\"collection\": \"tasks\", \"entity_id\": \"b\"}", "`data` is required"),
            ("{\"collection\": \"tasks\", \"entity_id\": \"b\", \"data\": {}, \"op\": \"put\"}", "unknown member `op`"),
            ("{\"collection\": \"tasks\", \"entity_id\": \"a\", \"data\": {}}", "already given on line 1"),
            ("{\"collection\": \"tasks\", \"entity_id\": \"b\", \"data\": {\"n\": 1e400}}", "data"),
            ("not json", "not valid JSON"),
        ];
        for (bad, says) in cases {
            let text = format!("{good}\n\n{bad}\n{good}\n");
            let e = parse(&text, &limits()).unwrap_err();
            assert_eq!(e.place, Place::Line(3), "{bad}: {e}");
            assert!(e.to_string().starts_with("line 3: ") && e.reason.contains(says), "{bad}: {e}");
        }
        let big = json!({"collection": "tasks", "entity_id": "b", "data": {"s": "x".repeat(300)}}).to_string();
        let tight = ChangeLimits { max_data_bytes: 100, max_depth: 64 };
        assert!(parse(&format!("{good}\n{big}\n"), &tight).unwrap_err().reason.contains("max_data_bytes"));
    }

    #[test]
    fn check_then_entries_gives_what_parse_gives() {
        let text = "{\"collection\": \"t\", \"entity_id\": \"a\", \"data\": {}}\n\n{\"collection\": \"t\", \"entity_id\": \"b\", \"data\": {\"x\": 1}}";
        assert_eq!(check(text, &limits()), Ok(2));
        let streamed: Vec<SnapshotEntry> = entries(text, &limits()).unwrap().map(Result::unwrap).collect();
        assert_eq!(streamed, parse(text, &limits()).unwrap());
        let document = "{\"t\": {\"a\": {}, \"b\": {}, \"c\": {}}}";
        assert_eq!(check(document, &limits()), Ok(3));
        assert_eq!(entries(document, &limits()).unwrap().count(), 3);
    }

    #[test]
    fn a_bad_document_names_the_entity_or_the_line() {
        let e = parse("{\"tasks\": {\"a\": {\"x\": 1}, \"b\": 7}}", &limits()).unwrap_err();
        assert_eq!(e.place, Place::Entity { collection: "tasks".into(), entity_id: Some("b".into()) });
        let e = parse("{\"bad name\": {}}", &limits()).unwrap_err();
        assert_eq!(e.place, Place::Entity { collection: "bad name".into(), entity_id: None });
        let e = parse("{\n\"tasks\": {\n\"a\": {,}\n}\n}", &limits()).unwrap_err();
        assert_eq!(e.place, Place::Line(3), "{e}");
        assert!(parse("{\"op\":\"put\",\"collection\":\"t\",\"id\":\"a\",\"data\":{}}", &limits()).is_err());
    }

    #[test]
    fn change_ids_follow_the_content() {
        let entry = |data: Value| SnapshotEntry {
            collection: Collection::parse("tasks").unwrap(),
            entity_id: EntityId::parse("a").unwrap(),
            data: data.as_object().unwrap().clone(),
        };
        let (alice, bob) = (UserId::parse("alice").unwrap(), UserId::parse("bob").unwrap());
        let id = entry(json!({"x": 1, "y": 2})).change_id(&alice);
        assert!(id.as_str().starts_with(CHANGE_ID_PREFIX) && id.as_str().len() == CHANGE_ID_PREFIX.len() + 32);
        // Canonical: member order and number spelling do not matter.
        assert_eq!(entry(json!({"y": 2.0, "x": 1})).change_id(&alice), id);
        assert_ne!(entry(json!({"x": 1, "y": 3})).change_id(&alice), id);
        assert_ne!(entry(json!({"x": 1, "y": 2})).change_id(&bob), id);
        // The hash is over the JCS of [user, collection, entity_id, data].
        let jcs = json::to_jcs(&json!(["alice", "tasks", "a", {"y": 2, "x": 1}]));
        let expected = format!("{CHANGE_ID_PREFIX}{}", hex::encode(&Sha256::digest(jcs.as_bytes())[..16]));
        assert_eq!(id.as_str(), expected);
    }
}
