//! How the store's rows look in IndexedDB. Outbox and journal rows are plain
//! JS objects (their indexes need fields), made from and read back as JSON
//! text; a change and a conflict stay JSON text inside them, so a change's
//! data keeps its exact canonical form. Confirmed and staged entities are
//! JSON strings. Hashes are hex. Nothing here touches IndexedDB, so it is
//! tested natively.

use deltasync_engine::{Confirmed, Error, Journaled, OutboxEntry, OutboxStatus, Result};
use deltasync_protocol::{Change, Conflict, EntityState};
use serde::{Deserialize, Serialize};

/// A damaged row: what could not be read, and why.
fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::LocalCorrupt(format!("{what}: {e}"))
}

/// Serializes a row, or says which one could not be.
fn to_json<T: Serialize>(what: &str, value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Store(format!("encoding {what}: {e}").into()))
}

/// A confirmed or staged entity as stored.
#[derive(Debug, Deserialize)]
struct EntityRow {
    state: EntityState,
    hash: Option<String>,
}

/// [`EntityRow`] as written, borrowing the state.
#[derive(Serialize)]
struct EntityRowRef<'a> {
    state: &'a EntityState,
    hash: Option<String>,
}

/// The JSON text stored for an entity and its digest contribution.
pub fn encode_confirmed(state: &EntityState, hash: Option<&[u8; 32]>) -> Result<String> {
    to_json("an entity", &EntityRowRef { state, hash: hash.map(hex::encode) })
}

/// An entity read back from [`encode_confirmed`]'s text.
pub fn decode_confirmed(text: &str) -> Result<Confirmed> {
    let row: EntityRow = serde_json::from_str(text).map_err(|e| corrupt("entity", e))?;
    let hash = match row.hash {
        None => None,
        Some(h) => {
            let bytes = hex::decode(&h).map_err(|e| corrupt("entity hash", e))?;
            Some(<[u8; 32]>::try_from(bytes.as_slice()).map_err(|e| corrupt("entity hash", e))?)
        }
    };
    Ok(Confirmed { state: row.state, hash })
}

/// The JSON text of a segment: `[[collection, entity_id, entity], …]`, each
/// entity as [`encode_confirmed`] wrote it (kept as is, not escaped again).
pub fn encode_segment(entities: &[(crate::segments::EntityKey, String)]) -> Result<String> {
    let mut text = String::with_capacity(entities.iter().map(|((c, e), s)| c.len() + e.len() + s.len() + 8).sum());
    text.push('[');
    for (n, ((collection, entity_id), state)) in entities.iter().enumerate() {
        if n > 0 {
            text.push(',');
        }
        text.push('[');
        text.push_str(&to_json("a collection", collection)?);
        text.push(',');
        text.push_str(&to_json("an entity id", entity_id)?);
        text.push(',');
        text.push_str(state);
        text.push(']');
    }
    text.push(']');
    Ok(text)
}

/// A segment's entities read back from [`encode_segment`]'s text.
pub fn decode_segment(text: &str) -> Result<Vec<(crate::segments::EntityKey, String)>> {
    let rows: Vec<(String, String, Box<serde_json::value::RawValue>)> =
        serde_json::from_str(text).map_err(|e| corrupt("segment", e))?;
    Ok(rows.into_iter().map(|(c, e, state)| ((c, e), state.get().to_owned())).collect())
}

/// An outbox row. `id` is absent when the row is added, so that the store's
/// key generator gives it the next id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxRow {
    /// The outbox id (the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// The change's collection (indexed with `entity_id`).
    pub collection: String,
    /// The change's entity.
    pub entity_id: String,
    /// The change's id (indexed).
    pub change_id: String,
    /// The change, as JSON text.
    pub change: String,
    /// `pending`, `sent` or `failed`.
    pub status: String,
    /// The acknowledged seq.
    pub seq: Option<u64>,
    /// How many times the server refused it.
    pub retries: u32,
    /// Not to be sent before this time.
    pub next_attempt_at: u64,
    /// The last refusal's message.
    pub last_error: Option<String>,
    /// The server's conflict, as JSON text.
    pub conflict: Option<String>,
    /// When the change was made.
    pub created_at: u64,
    /// Whether a heal put it back from the journal.
    pub requeued: bool,
}

impl OutboxRow {
    /// A new pending row, without an id (the store gives it).
    pub fn pending(change: &Change, created_at: u64, requeued: bool) -> Result<Self> {
        Ok(OutboxRow {
            id: None,
            collection: change.collection.as_str().to_owned(),
            entity_id: change.entity_id.as_str().to_owned(),
            change_id: change.change_id.as_str().to_owned(),
            change: to_json("a change", change)?,
            status: OutboxStatus::Pending.as_str().to_owned(),
            seq: None,
            retries: 0,
            next_attempt_at: 0,
            last_error: None,
            conflict: None,
            created_at,
            requeued,
        })
    }

    /// The row of an entry.
    pub fn of(entry: &OutboxEntry) -> Result<Self> {
        let mut row = OutboxRow::pending(&entry.change, entry.created_at, entry.requeued)?;
        row.id = Some(entry.id);
        row.status = entry.status.as_str().to_owned();
        row.seq = entry.seq;
        row.retries = entry.retries;
        row.next_attempt_at = entry.next_attempt_at;
        row.last_error = entry.last_error.clone();
        row.conflict = entry.conflict.as_ref().map(|c| to_json("a conflict", c)).transpose()?;
        Ok(row)
    }

    /// The entry this row holds.
    pub fn entry(self) -> Result<OutboxEntry> {
        let id = self.id.ok_or_else(|| corrupt("outbox row", "no id"))?;
        let change: Change = serde_json::from_str(&self.change).map_err(|e| corrupt("outbox change", e))?;
        let conflict = match self.conflict {
            None => None,
            Some(c) => Some(serde_json::from_str::<Conflict>(&c).map_err(|e| corrupt("outbox conflict", e))?),
        };
        Ok(OutboxEntry {
            id,
            change,
            status: OutboxStatus::parse(&self.status)?,
            seq: self.seq,
            retries: self.retries,
            next_attempt_at: self.next_attempt_at,
            last_error: self.last_error,
            conflict,
            created_at: self.created_at,
            requeued: self.requeued,
        })
    }
}

/// A journal row (key `id`, indexed by `seq`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalRow {
    /// The outbox id the change had.
    pub id: i64,
    /// The change, as JSON text.
    pub change: String,
    /// The seq it was acknowledged at.
    pub seq: u64,
    /// When the change was made (it goes back to the outbox with it).
    pub created_at: u64,
}

impl JournalRow {
    /// The row of an outbox entry acknowledged at `seq`.
    pub fn of(entry: &OutboxEntry, seq: u64) -> Result<Self> {
        Ok(JournalRow { id: entry.id, change: to_json("a change", &entry.change)?, seq, created_at: entry.created_at })
    }

    /// The journal entry this row holds.
    pub fn journaled(&self) -> Result<Journaled> {
        let change = serde_json::from_str(&self.change).map_err(|e| corrupt("journal change", e))?;
        Ok(Journaled { id: self.id, change, seq: self.seq })
    }

    /// The pending, requeued outbox row this entry goes back to, under its id.
    pub fn requeued(&self) -> Result<OutboxRow> {
        let mut row = OutboxRow::pending(&self.journaled()?.change, self.created_at, true)?;
        row.id = Some(self.id);
        Ok(row)
    }
}

/// Encodes a row as JSON text (to become a JS object).
pub fn row_json<T: Serialize>(row: &T) -> Result<String> {
    to_json("a row", row)
}

/// Reads a row back from JSON text.
pub fn parse_row<T: for<'de> Deserialize<'de>>(what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| corrupt(what, e))
}

#[cfg(test)]
mod tests {
    use deltasync_protocol::{ChangeId, Collection, EntityId, Hlc, Meta, Op};
    use serde_json::json;

    use super::*;

    fn change() -> Change {
        Change {
            change_id: ChangeId::parse("c1").unwrap(),
            collection: Collection::parse("tasks").unwrap(),
            entity_id: EntityId::parse("t1").unwrap(),
            op: Op::Upsert,
            data: Some(json!({"n": 1.0, "big": 12345678901234567890u64})),
            hlc: Hlc::parse("1763800000000-00001-dev-1").unwrap(),
            base_version: Some(3),
        }
    }

    #[test]
    fn an_outbox_entry_survives_its_row() {
        let mut entry = OutboxRow::pending(&change(), 7, false).unwrap();
        entry.id = Some(4);
        let mut entry = entry.entry().unwrap();
        entry.status = OutboxStatus::Failed;
        entry.conflict = Some(Conflict::clock_skew());
        entry.last_error = Some("no".into());
        let text = row_json(&OutboxRow::of(&entry).unwrap()).unwrap();
        let back = parse_row::<OutboxRow>("outbox row", &text).unwrap().entry().unwrap();
        assert_eq!(back, entry);
    }

    #[test]
    fn a_new_row_has_no_id_for_the_key_generator_to_fill() {
        let text = row_json(&OutboxRow::pending(&change(), 7, false).unwrap()).unwrap();
        assert!(!text.contains("\"id\""), "{text}");
    }

    #[test]
    fn a_journal_row_goes_back_to_the_outbox_under_its_id() {
        let entry = {
            let mut row = OutboxRow::pending(&change(), 9, false).unwrap();
            row.id = Some(12);
            row.entry().unwrap()
        };
        let row = JournalRow::of(&entry, 40).unwrap();
        assert_eq!(row.journaled().unwrap(), Journaled { id: 12, change: change(), seq: 40 });
        let back = row.requeued().unwrap().entry().unwrap();
        assert_eq!((back.id, back.created_at, back.requeued, back.status), (12, 9, true, OutboxStatus::Pending));
    }

    fn entity(id: &str, version: u64) -> EntityState {
        EntityState {
            collection: Collection::parse("tasks").unwrap(),
            entity_id: EntityId::parse(id).unwrap(),
            data: json!({"v": 1}).as_object().unwrap().clone(),
            version,
            deleted: false,
            meta: Meta::Last { hlc: Hlc::parse("1763800000000-00002-dev-1").unwrap() },
        }
    }

    #[test]
    fn an_entity_and_its_hash_survive_their_text() {
        let state = entity("a", 2);
        let back = decode_confirmed(&encode_confirmed(&state, Some(&[7; 32])).unwrap()).unwrap();
        assert_eq!((back.state, back.hash), (state.clone(), Some([7; 32])));
        assert_eq!(decode_confirmed(&encode_confirmed(&state, None).unwrap()).unwrap().hash, None);
        assert!(matches!(decode_confirmed("{}"), Err(Error::LocalCorrupt(_))));
    }

    #[test]
    fn a_segment_keeps_its_entities_text_and_order() {
        let text = |v: u64| encode_confirmed(&entity("t\"1", v), Some(&[1; 32])).unwrap();
        let entities =
            vec![(("tasks".to_owned(), "t\"1".to_owned()), text(1)), (("notes".to_owned(), "n".to_owned()), text(2))];
        let encoded = encode_segment(&entities).unwrap();
        assert_eq!(decode_segment(&encoded).unwrap(), entities);
        assert_eq!(decode_segment(&encode_segment(&[]).unwrap()).unwrap(), vec![]);
        assert!(matches!(decode_segment("[[1]]"), Err(Error::LocalCorrupt(_))));
    }
}
