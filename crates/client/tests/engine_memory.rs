//! The engine on the in-memory store, against a real server: the whole
//! protocol (convergence, clock skew, a lost answer and its duplicate ack, a
//! `410`, a mismatch and its heal) holds with a store other than SQLite and a
//! transport that is not the client's own.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Devices, TestServer, obj, system_ms};
use deltasync_client::engine::conformance::TestClock;
use deltasync_client::engine::replica::keys;
use deltasync_client::engine::transport::{SyncBody, Transport};
use deltasync_client::engine::{Access, Engine, EngineOptions, Error, LocalStore, MemoryStore, StoreTx};
use deltasync_client::http::{BodyStream, HttpOptions, ServerApi};
use deltasync_protocol::wire::{ConflictsResponse, PullResponse, StatusResponse, SyncResponse};
use serde_json::json;

/// The client's HTTP transport, except that it can lose the next sync's
/// answer: the server applies the push, the device hears nothing.
struct LossyTransport {
    api: ServerApi,
    lose_next_answer: AtomicBool,
}

impl Transport for LossyTransport {
    type Stream = BodyStream;

    fn base(&self) -> &str {
        Transport::base(&self.api)
    }

    fn token(&self) -> Option<String> {
        self.api.token()
    }

    async fn status(&self, device_id: Option<&str>) -> Result<StatusResponse, Error> {
        self.api.status(device_id).await
    }

    async fn sync(&self, body: &SyncBody<'_>) -> Result<SyncResponse, Error> {
        let answer = self.api.sync(body).await;
        if self.lose_next_answer.swap(false, Ordering::SeqCst) {
            return Err(Error::Unreachable { url: self.api.base().into(), message: "the answer was lost".into() });
        }
        answer
    }

    async fn pull(&self, device_id: &str, cursor: u64, limit: u64, wait: Duration) -> Result<PullResponse, Error> {
        self.api.pull(device_id, cursor, limit, wait).await
    }

    async fn bootstrap(&self, device_id: &str) -> Result<BodyStream, Error> {
        self.api.bootstrap(device_id).await
    }

    async fn conflicts(&self, since: u64, limit: Option<u64>) -> Result<ConflictsResponse, Error> {
        self.api.conflicts(since, limit).await
    }
}

type MemoryEngine = Engine<MemoryStore, LossyTransport, TestClock>;

async fn memory_device(url: &str, skew_ms: i64) -> MemoryEngine {
    let http = HttpOptions {
        http2_prior_knowledge: false,
        request_timeout: Duration::from_secs(30),
        stall_timeout: Duration::from_secs(30),
    };
    let api = ServerApi::new(url, None, http).unwrap();
    let transport = LossyTransport { api, lose_next_answer: AtomicBool::new(false) };
    let clock = TestClock::at(system_ms().saturating_add_signed(skew_ms));
    Engine::open(MemoryStore::new(), Some(transport), clock, EngineOptions::default()).await.unwrap()
}

async fn set_meta(engine: &MemoryEngine, key: &str, value: &str) {
    let mut tx = engine.store().begin(Access::Write).await.unwrap();
    tx.set_meta(key, value).await.unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_replica_converges_and_heals_against_a_real_server() {
    let server = TestServer::start().await;
    let devices = Devices::new();
    let phone = memory_device(&server.url, 0).await;
    let laptop = devices.open("laptop", &server.url);

    for n in 0..3 {
        phone.put("tasks", &format!("t{n}"), obj(json!({"n": n}))).await.unwrap();
    }
    let r = phone.sync(true).await.unwrap();
    assert_eq!((r.pushed, r.applied, r.pending, r.verified), (3, 3, 0, true), "{r:?}");
    laptop.patch("tasks", "t1", obj(json!({"done": true}))).unwrap();
    laptop.sync().await.unwrap();
    let r = phone.sync(true).await.unwrap();
    assert_eq!((r.pulled, r.verified), (1, true), "{r:?}");
    assert_eq!(phone.get("tasks", "t1").await.unwrap().unwrap().data, obj(json!({"n": 1, "done": true})));

    // A lost answer: the server applied the push, the device heard nothing.
    phone.patch("tasks", "t2", obj(json!({"n": 20}))).await.unwrap();
    phone.transport_ref().unwrap().lose_next_answer.store(true, Ordering::SeqCst);
    let err = phone.sync(true).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    let r = phone.sync(true).await.unwrap();
    assert_eq!((r.duplicate, r.applied, r.pending), (1, 0, 0), "the retry is acknowledged as a duplicate: {r:?}");
    assert_eq!(server.head().await, 5);

    // A local state that no longer matches the server's heals by bootstrap.
    set_meta(&phone, keys::STATE_DIGEST, &"ab".repeat(32)).await;
    laptop.patch("tasks", "t0", obj(json!({"n": 100}))).unwrap();
    laptop.sync().await.unwrap();
    let r = phone.sync(true).await.unwrap();
    assert!(!r.verified && r.healed && r.mismatch.is_some(), "{r:?}");
    assert_eq!(r.state_digest, server.status().await.state_digest);

    // A cursor the server does not know (ahead of its head): 410, then a heal.
    set_meta(&phone, keys::CURSOR, "999").await;
    let r = phone.sync(true).await.unwrap();
    assert!(r.healed && r.verified, "a 410 heals without a mismatch: {r:?}");
    assert_eq!(r.cursor, server.head().await);
    let listed: Vec<_> = phone.list("tasks").await.unwrap().into_iter().map(|e| (e.id, e.data)).collect();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0].1, obj(json!({"n": 100})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_replica_with_a_clock_an_hour_ahead_is_restamped() {
    let server = TestServer::start().await;
    let phone = memory_device(&server.url, 3_600_000).await;
    phone.put("tasks", "t1", obj(json!({"n": 1}))).await.unwrap();
    let r = phone.sync(true).await.unwrap();
    assert_eq!((r.restamped, r.pushed, r.pending), (1, 1, 0), "{r:?}");
    let log = server.log().await;
    let stamp: u64 = log[0]["hlc"].as_str().unwrap()[..13].parse().unwrap();
    assert!(stamp <= system_ms() + 300_000, "the stored stamp is not an hour ahead: {}", log[0]["hlc"]);
}
