//! `Core`, the class `web/src/deltasync.js` builds its API on: one engine on
//! an [`IdbStore`], reaching the server with [`FetchTransport`], its methods
//! returning promises of plain JS values (the JSON the command line prints).
//!
//! The triggers, the tabs (Web Locks, BroadcastChannel) and `subscribe` are
//! the JS module's: they are the browser's, not the engine's rules. The
//! runner's timings come from the engine ([`runner_defaults`], [`retry_delay_ms`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use deltasync_engine::engine::Notice;
use deltasync_engine::{Engine, EngineOptions, Error, LocalWrite, Progress, schedule};
use js_sys::{Function, Promise, Reflect};
use serde::Serialize;
use serde_json::{Map, Value, json};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

use crate::clock::BrowserClock;
use crate::fetch::FetchTransport;
use crate::idb::IdbStore;

type WebEngine = Engine<IdbStore, FetchTransport, BrowserClock>;

thread_local! {
    /// Each open `Core`'s event callback, by its number: the engine's
    /// listener must be `Send`, so it carries the number, not the function.
    static LISTENERS: RefCell<HashMap<u32, Function>> = RefCell::new(HashMap::new());
    static NEXT_LISTENER: std::cell::Cell<u32> = const { std::cell::Cell::new(1) };
}

/// A JS value from anything serialisable (through JSON: plain objects and arrays).
fn to_js(value: &impl Serialize) -> Result<JsValue, JsValue> {
    let text = serde_json::to_string(value).map_err(|e| js_error(&Error::Invalid(e.to_string())))?;
    js_sys::JSON::parse(&text)
}

/// A JSON value from a JS one.
fn from_js(value: &JsValue, what: &str) -> Result<Value, Error> {
    if value.is_undefined() {
        return Ok(Value::Null);
    }
    let text =
        js_sys::JSON::stringify(value).map_err(|_| Error::Invalid(format!("{what}: cannot be written as JSON")))?;
    serde_json::from_str(&String::from(text)).map_err(|e| Error::Invalid(format!("{what}: {e}")))
}

/// A JSON object from a JS one.
fn object(value: &JsValue, what: &str) -> Result<Map<String, Value>, Error> {
    match from_js(value, what)? {
        Value::Object(o) => Ok(o),
        other => Err(Error::Invalid(format!("{what} must be an object, got {other}"))),
    }
}

/// The JS `Error` for an engine error: its message, and `code` as the command line prints it.
fn js_error(e: &Error) -> JsValue {
    let error = js_sys::Error::new(&e.to_string());
    let _ = Reflect::set(&error, &"code".into(), &e.code().into());
    if let Some(wait) = e.retry_after() {
        let _ = Reflect::set(&error, &"retryAfter".into(), &wait.as_secs_f64().into());
    }
    if let Error::Server { details, .. } = e
        && !details.is_empty()
        && let Ok(details) = to_js(details)
    {
        let _ = Reflect::set(&error, &"details".into(), &details);
    }
    error.into()
}

/// Calls the event callback of `Core` number `id`.
fn dispatch(id: u32, notice: Notice) {
    let event = match notice {
        Notice::Changed(change) => {
            // Serialised as is, not through `Value`: a page of a first sync names 10,000 entities.
            #[derive(Serialize)]
            struct Entity<'a> {
                collection: &'a str,
                id: &'a str,
            }
            #[derive(Serialize)]
            struct ChangeEvent<'a, O: Serialize> {
                r#type: &'static str,
                origin: O,
                entities: Vec<Entity<'a>>,
            }
            let entities = change.entities.iter().map(|(c, e)| Entity { collection: c.as_str(), id: e.as_str() });
            let event = ChangeEvent { r#type: "change", origin: change.origin, entities: entities.collect() };
            return call(id, to_js(&event));
        }
        Notice::LocalWrite => json!({"type": "local-write"}),
        Notice::Progress(Progress::Sync { pushed, pulled, cursor }) => {
            json!({"type": "progress", "pushed": pushed, "pulled": pulled, "cursor": cursor})
        }
        Notice::Progress(Progress::Bootstrap { entities }) => json!({"type": "progress", "bootstrapped": entities}),
    };
    call(id, to_js(&event));
}

/// Calls the event callback of `Core` number `id` with `event`.
fn call(id: u32, event: Result<JsValue, JsValue>) {
    let callback = LISTENERS.with(|l| l.borrow().get(&id).cloned());
    if let (Some(callback), Ok(event)) = (callback, event) {
        // An exception in the page's callback is the page's; the engine goes on.
        let _ = callback.call1(&JsValue::NULL, &event);
    }
}

/// A promise of `work`'s value, rejected with a JS `Error` carrying `code`.
fn promise<T: Serialize>(work: impl std::future::Future<Output = deltasync_engine::Result<T>> + 'static) -> Promise {
    future_to_promise(async move {
        match work.await {
            Ok(value) => to_js(&value),
            Err(e) => Err(js_error(&e)),
        }
    })
}

/// One replica in IndexedDB and its engine.
#[wasm_bindgen]
pub struct Core {
    engine: Rc<WebEngine>,
    listener: u32,
}

#[wasm_bindgen]
impl Core {
    /// Opens the replica in the IndexedDB database `name`, syncing with
    /// `server` (absent: offline only); `on_event` receives the engine's events.
    pub async fn open(
        name: String,
        server: Option<String>,
        token: Option<String>,
        on_event: Function,
    ) -> Result<Core, JsValue> {
        let transport = server.filter(|s| !s.is_empty()).map(|s| FetchTransport::new(&s, token)).transpose();
        let transport = transport.map_err(|e| js_error(&e))?;
        let listener = NEXT_LISTENER.with(|n| {
            let id = n.get();
            n.set(id + 1);
            id
        });
        LISTENERS.with(|l| l.borrow_mut().insert(listener, on_event));
        let options = EngineOptions {
            listener: Some(Arc::new(move |notice| dispatch(listener, notice))),
            // IndexedDB pays per record: a page of the log is confirmed in
            // segments of many entities, a snapshot staged and adopted one
            // record per entity, twice. Pulling is the faster first sync here.
            first_sync_snapshot_after: u64::MAX,
            ..Default::default()
        };
        match Engine::open(IdbStore::new(&name), transport, BrowserClock, options).await {
            Ok(engine) => Ok(Core { engine: Rc::new(engine), listener }),
            Err(e) => {
                LISTENERS.with(|l| l.borrow_mut().remove(&listener));
                Err(js_error(&e))
            }
        }
    }

    /// This device's id.
    #[wasm_bindgen(getter, js_name = deviceId)]
    pub fn device_id(&self) -> String {
        self.engine.device_id().as_str().to_owned()
    }

    /// As `deltasync client put`: resolves to the change id, or null.
    pub fn put(&self, collection: String, id: String, data: JsValue) -> Promise {
        let engine = self.engine.clone();
        promise(async move { engine.put(&collection, &id, object(&data, "data")?).await })
    }

    /// As `deltasync client patch`: resolves to the change id, or null.
    pub fn patch(&self, collection: String, id: String, fields: JsValue) -> Promise {
        let engine = self.engine.clone();
        promise(async move { engine.patch(&collection, &id, object(&fields, "fields")?).await })
    }

    /// As `deltasync client delete`: resolves to the change id.
    pub fn delete(&self, collection: String, id: String) -> Promise {
        let engine = self.engine.clone();
        promise(async move { engine.delete(&collection, &id).await })
    }

    /// Many writes (`[{op, collection, id, data}]`) in one transaction.
    pub fn write(&self, writes: JsValue) -> Promise {
        let engine = self.engine.clone();
        promise(async move {
            let writes = LocalWrite::parse_array(from_js(&writes, "writes")?)?;
            engine.write_batch(writes).await
        })
    }

    /// The entity's data, or null.
    pub fn get(&self, collection: String, id: String) -> Promise {
        let engine = self.engine.clone();
        promise(async move { Ok(engine.get(&collection, &id).await?.map(|e| e.data)) })
    }

    /// `[{id, data}]`, sorted by id.
    pub fn list(&self, collection: String) -> Promise {
        let engine = self.engine.clone();
        promise(async move {
            let items = engine.list(&collection).await?;
            Ok(items.into_iter().map(|e| json!({"id": e.id, "data": e.data})).collect::<Vec<_>>())
        })
    }

    /// One sync; `manual` (asked for by the user) resets backoffs. Resolves to its report.
    pub fn sync(&self, manual: bool) -> Promise {
        let engine = self.engine.clone();
        promise(async move { engine.sync(manual).await })
    }

    /// One long poll: waits up to `wait_secs` for other devices' changes and
    /// applies them. Resolves to whether any arrived.
    #[wasm_bindgen(js_name = waitForChanges)]
    pub fn wait_for_changes(&self, wait_secs: u32) -> Promise {
        let engine = self.engine.clone();
        promise(async move { engine.wait_for_changes(Duration::from_secs(wait_secs.into())).await })
    }

    /// The live channel (`GET /v1/live`) as a browser opens it:
    /// `{url, protocols}`, the `ws://` or `wss://` URL and the subprotocols
    /// to offer (`deltasync.live`, and `bearer.<token>` when there is a
    /// token: a WebSocket cannot carry `Authorization`). Null without a server.
    #[wasm_bindgen(js_name = liveRequest)]
    pub fn live_request(&self) -> Result<JsValue, JsValue> {
        use deltasync_engine::transport::Transport;
        let Some(transport) = self.engine.transport_ref() else { return Ok(JsValue::NULL) };
        let path = deltasync_engine::requests::live(self.engine.device_id().as_str()).path;
        let base = transport.base();
        let url = match (base.strip_prefix("https://"), base.strip_prefix("http://")) {
            (Some(rest), _) => format!("wss://{rest}{path}"),
            (None, Some(rest)) => format!("ws://{rest}{path}"),
            (None, None) => return Ok(JsValue::NULL),
        };
        let mut protocols = vec!["deltasync.live".to_owned()];
        protocols.extend(transport.token().map(|token| format!("bearer.{token}")));
        to_js(&json!({"url": url, "protocols": protocols}))
    }

    /// Whether the server's head, as the live channel sent it
    /// (`{cursor, state_hash, state_digest}`), differs from where this
    /// replica stands: a sync then has work. Resolves to a boolean.
    #[wasm_bindgen(js_name = isBehind)]
    pub fn is_behind(&self, head: JsValue) -> Promise {
        let engine = self.engine.clone();
        promise(async move {
            let head: deltasync_protocol::wire::LiveHead = serde_json::from_value(from_js(&head, "head")?)
                .map_err(|e| Error::Invalid(format!("a live message: {e}")))?;
            engine.is_behind(&head).await
        })
    }

    /// As `deltasync client status`.
    pub fn status(&self) -> Promise {
        let engine = self.engine.clone();
        promise(async move { engine.stats().await })
    }

    /// As `deltasync client export-pending`.
    #[wasm_bindgen(js_name = exportPending)]
    pub fn export_pending(&self) -> Promise {
        let engine = self.engine.clone();
        promise(async move { engine.export_pending().await })
    }

    /// Sends every failed change back to the outbox; resolves to how many.
    #[wasm_bindgen(js_name = retryFailed)]
    pub fn retry_failed(&self) -> Promise {
        let engine = self.engine.clone();
        promise(async move { engine.retry_failed().await })
    }

    /// Forgets every failed change; resolves to how many.
    #[wasm_bindgen(js_name = discardFailed)]
    pub fn discard_failed(&self) -> Promise {
        let engine = self.engine.clone();
        promise(async move { engine.discard_failed().await })
    }

    /// Folds the oldest segment of confirmed entities into their rows, in
    /// one short transaction (`crate::segments`): the JS module calls it
    /// while the page is idle after a sync. Resolves to how many entities
    /// segments still hold (0: done).
    #[wasm_bindgen(js_name = foldStore)]
    pub fn fold_store(&self) -> Promise {
        let engine = self.engine.clone();
        promise(async move { engine.store().fold_segment().await })
    }

    /// As `deltasync client reset [--force]`.
    pub fn reset(&self, force: bool) -> Promise {
        let engine = self.engine.clone();
        promise(async move { engine.reset(force).await })
    }

    /// Stops the events and closes the database connection.
    pub fn close(&self) {
        LISTENERS.with(|l| l.borrow_mut().remove(&self.listener));
        self.engine.store().close();
    }
}

/// `db.write`'s writes, each `{op: "put" | "patch" | "delete", collection, id, data}`.
/// The background runner's defaults, the native runner's:
/// `{interval_ms, debounce_ms, wait_secs}`.
#[wasm_bindgen(js_name = runnerDefaults)]
pub fn runner_defaults() -> Result<JsValue, JsValue> {
    to_js(&json!({
        "interval_ms": schedule::DEFAULT_INTERVAL.as_millis() as u64,
        "debounce_ms": schedule::DEFAULT_DEBOUNCE.as_millis() as u64,
        "wait_secs": schedule::DEFAULT_WAIT.as_secs(),
    }))
}

/// The wait before the next try after `failures` failed syncs in a row (from 0), capped at `cap_ms`,
/// but never shorter than the `Retry-After` the last failure carried (`retry_after_secs`, the error's `retryAfter`).
#[wasm_bindgen(js_name = retryDelayMs)]
pub fn retry_delay_ms(failures: u32, cap_ms: f64, retry_after_secs: Option<f64>) -> f64 {
    let cap = Duration::from_millis(cap_ms.max(1_000.0) as u64);
    let told = retry_after_secs.filter(|s| s.is_finite() && *s > 0.0).map(Duration::from_secs_f64);
    schedule::failure_delay(failures, cap, js_sys::Math::random(), told).as_millis() as f64
}
