//! The IndexedDB schema of an [`crate::IdbStore`], made by `onupgradeneeded`
//! when the database is first opened.

use js_sys::Array;
use wasm_bindgen::JsValue;
use wasm_bindgen::prelude::*;
use web_sys::{IdbDatabase, IdbObjectStoreParameters, IdbOpenDbRequest};

use crate::idb::{factory, js_error};
use deltasync_engine::Result;

/// Meta values by key (out-of-line keys, string values).
pub const META: &str = "meta";
/// Confirmed entities by `[collection, entity_id]` (JSON text).
pub const ENTITIES: &str = "entities";
/// Segments: many confirmed entities in one record (JSON text), keyed by a
/// key generator; they override [`ENTITIES`] rows ([`crate::segments`]).
pub const SEGMENTS: &str = "segments";
/// Logged appends by seq (JSON text).
pub const APPENDS: &str = "appends";
/// Outbox rows, key path `id` from the key generator.
pub const OUTBOX: &str = "outbox";
/// The outbox index on `[collection, entity_id]`.
pub const OUTBOX_BY_ENTITY: &str = "by_entity";
/// The outbox index on `change_id`.
pub const OUTBOX_BY_CHANGE: &str = "by_change";
/// Journal rows, key path `id`.
pub const JOURNAL: &str = "journal";
/// The journal index on `seq`.
pub const JOURNAL_BY_SEQ: &str = "by_seq";
/// A bootstrap's staged entities, keyed like [`ENTITIES`].
pub const STAGED_ENTITIES: &str = "staged_entities";
/// A bootstrap's staged appends, keyed like [`APPENDS`].
pub const STAGED_APPENDS: &str = "staged_appends";
/// Every object store: each transaction spans them all.
pub const STORES: [&str; 8] = [META, ENTITIES, SEGMENTS, APPENDS, OUTBOX, JOURNAL, STAGED_ENTITIES, STAGED_APPENDS];

/// The schema's version: 1 had no segments.
const VERSION: u32 = 2;

/// Opens (and on first use creates) the database `name`.
pub async fn open_database(name: &str) -> Result<IdbDatabase> {
    let request = factory()?.open_with_u32(name, VERSION).map_err(js_error)?;
    let for_upgrade = request.clone();
    // Kept alive until the open request settles.
    let upgrade = Closure::<dyn FnMut() -> std::result::Result<(), JsValue>>::new(move || create_schema(&for_upgrade));
    request.set_onupgradeneeded(Some(upgrade.as_ref().unchecked_ref()));
    let opened = crate::idb::wait(Ok(request.clone().into())).await;
    request.set_onupgradeneeded(None);
    drop(upgrade);
    opened?.dyn_into::<IdbDatabase>().map_err(js_error)
}

/// Creates every object store and index the database lacks (it is new, or
/// at an older version).
fn create_schema(request: &IdbOpenDbRequest) -> std::result::Result<(), JsValue> {
    let db: IdbDatabase = request.result()?.dyn_into()?;
    if !db.object_store_names().contains(SEGMENTS) {
        let segments = IdbObjectStoreParameters::new();
        segments.set_auto_increment(true);
        db.create_object_store_with_optional_parameters(SEGMENTS, &segments)?;
    }
    if db.object_store_names().contains(META) {
        return Ok(());
    }
    for plain in [META, ENTITIES, APPENDS, STAGED_ENTITIES, STAGED_APPENDS] {
        db.create_object_store(plain)?;
    }
    let outbox = IdbObjectStoreParameters::new();
    outbox.set_key_path(&"id".into());
    outbox.set_auto_increment(true);
    let outbox = db.create_object_store_with_optional_parameters(OUTBOX, &outbox)?;
    let entity: JsValue = Array::of2(&"collection".into(), &"entity_id".into()).into();
    outbox.create_index_with_str_sequence(OUTBOX_BY_ENTITY, &entity)?;
    outbox.create_index_with_str(OUTBOX_BY_CHANGE, "change_id")?;
    let journal = IdbObjectStoreParameters::new();
    journal.set_key_path(&"id".into());
    let journal = db.create_object_store_with_optional_parameters(JOURNAL, &journal)?;
    journal.create_index_with_str(JOURNAL_BY_SEQ, "seq")?;
    Ok(())
}
