//! Several `deltasync serve` processes on one PostgreSQL database: pushes
//! through any instance give one gapless log and one hash chain per dataset,
//! datasets of different users never wait on each other, and a long poll on
//! one instance wakes when a change is pushed through another.
//!
//! PostgreSQL only: every test says it is skipped when `DELTASYNC_TEST_POSTGRES`
//! is not set.

mod common;
mod verify;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use verify::*;

const DEVICES: usize = 8;
const BATCHES: usize = 15;
const PER_BATCH: usize = 40;

/// Two instances on one fresh schema: (A, B).
fn two_instances(backend: &Backend, opts: Options) -> (Server, Server) {
    let a = Server::start_with(backend, opts.clone());
    let b = Server::start_with(backend, Options { database: Some(a.database.clone()), ..opts });
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_devices_through_two_instances_get_one_gapless_chain() {
    let Some(backend) = Backend::postgres() else { return };
    let (a, b) = two_instances(&backend, Options::default());
    let urls = [a.url.clone(), b.url.clone()];
    let started = Instant::now();
    let mut handles = Vec::new();
    for d in 0..DEVICES {
        // Even devices push through A, odd ones through B.
        let url = urls[d % 2].clone();
        handles.push(tokio::spawn(async move {
            let c = client();
            let device = format!("dev-{d}");
            let base = now_ms() - 100_000;
            let mut acked: Vec<(String, u64)> = Vec::new();
            let mut answers: Vec<(u64, String)> = Vec::new();
            for bt in 0..BATCHES {
                let changes: Vec<Value> = (0..PER_BATCH)
                    .map(|i| {
                        let id = format!("d{d}-b{bt:02}-c{i:02}");
                        // Shared entities, so the instances contend for the same rows.
                        let entity = format!("e{}", (d * 5 + bt * 3 + i) % 60);
                        let h = hlc(base + (bt * PER_BATCH + i) as u64, 0, &device);
                        match i % 10 {
                            9 => delete(&id, "shared", &entity, &h),
                            8 => json!({"change_id": id, "collection": "log", "entity_id": entity, "op": "append", "data": [d, bt, i], "hlc": h}),
                            _ => upsert(&id, "shared", &entity, json!({format!("f{}", i % 3): format!("{device} {bt} {i}")}), &h),
                        }
                    })
                    .collect();
                let answer = push(&c, &url, &device, changes).await;
                let results = answer["results"].as_array().unwrap();
                assert_eq!(results.len(), PER_BATCH);
                let mut last = 0;
                for r in results {
                    assert_eq!(r["status"], "applied", "{r}");
                    let seq = r["seq"].as_u64().unwrap();
                    assert!(seq > last, "the seqs of one push follow request order: {answer}");
                    last = seq;
                    acked.push((r["change_id"].as_str().unwrap().to_owned(), seq));
                }
                answers.push((answer["cursor"].as_u64().unwrap(), answer["state_hash"].as_str().unwrap().to_owned()));
            }
            (acked, answers)
        }));
    }
    // Meanwhile an observer pulls from both instances in turn: no page may skip a seq.
    let observer = {
        let urls = urls.clone();
        tokio::spawn(async move {
            let c = client();
            let total = (DEVICES * BATCHES * PER_BATCH) as u64;
            let mut cursor = 0u64;
            let mut pages: Vec<(u64, String)> = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut turn = 0;
            while cursor < total && Instant::now() < deadline {
                let url = &urls[turn % 2];
                turn += 1;
                let (code, page) =
                    get(&c, url, &format!("/v1/pull?device_id=observer&cursor={cursor}&limit=300")).await;
                assert_eq!(code, 200, "{page}");
                for (k, ch) in page["changes"].as_array().unwrap().iter().enumerate() {
                    assert_eq!(
                        ch["seq"].as_u64().unwrap(),
                        cursor + 1 + k as u64,
                        "a live page from {url} skipped a seq"
                    );
                }
                cursor = page["cursor"].as_u64().unwrap();
                pages.push((cursor, page["state_hash"].as_str().unwrap().to_owned()));
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            pages
        })
    };
    let mut acked = Vec::new();
    let mut answers = Vec::new();
    for h in handles {
        let (x, y) = h.await.expect("a pushing device panicked");
        acked.extend(x);
        answers.extend(y);
    }
    let elapsed = started.elapsed();
    let observed = observer.await.expect("the observer panicked");
    let n = DEVICES * BATCHES * PER_BATCH;
    println!(
        "{n} changes from {DEVICES} devices through 2 instances in {elapsed:.2?} ({:.0}/s)",
        n as f64 / elapsed.as_secs_f64()
    );

    let c = client();
    for url in &urls {
        let (log, pages) = pull_all(&c, url, "auditor", 1000).await;
        assert_eq!(log.len(), n, "the log read through {url}");
        let mut seen = HashSet::new();
        let mut seq_of = HashMap::new();
        for (i, ch) in log.iter().enumerate() {
            assert_eq!(ch["seq"].as_u64().unwrap(), i as u64 + 1, "seqs through {url} are exactly 1..={n}");
            let id = ch["change_id"].as_str().unwrap().to_owned();
            assert!(seen.insert(id.clone()), "{id} is logged twice");
            seq_of.insert(id, i as u64 + 1);
        }
        for (id, seq) in &acked {
            assert_eq!(seq_of.get(id), Some(seq), "acknowledged change {id} at seq {seq}, read through {url}");
        }
        let heads = chain_heads(&log);
        for p in &pages {
            assert_eq!(p.state_hash, heads[p.cursor as usize], "page hash at {} through {url}", p.cursor);
        }
        for (cursor, hash) in &answers {
            assert_eq!(hash, &heads[*cursor as usize], "a push answer's state_hash at {cursor}");
        }
        for (cursor, hash) in &observed {
            assert_eq!(hash, &heads[*cursor as usize], "a live page's state_hash at {cursor}");
        }
        let st = status(&c, url).await;
        assert_eq!(st["head"], n as u64);
        assert_eq!(st["state_hash"], heads[n].as_str());
        let boot = Bootstrap::parse(bootstrap_lines(&c, url, "auditor").await);
        assert_eq!(boot.recomputed_digest(), st["state_digest"].as_str().unwrap(), "digest through {url}");
        assert_eq!(boot.appends.len(), n / 10);
    }
    assert_eq!(acked.len(), n);
    println!("observer: {} live pages from both instances", observed.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_poll_on_one_instance_wakes_on_a_push_through_another() {
    let Some(backend) = Backend::postgres() else { return };
    let (a, b) = two_instances(&backend, Options::default());
    let c = client();
    let base = now_ms() - 10_000;
    let mut latencies = Vec::new();
    for round in 0..10u64 {
        let waiter = {
            let (c, url) = (c.clone(), a.url.clone());
            tokio::spawn(async move {
                let (code, page) = get(&c, &url, &format!("/v1/pull?device_id=waiter&cursor={round}&wait=20")).await;
                (code, page, Instant::now())
            })
        };
        // Let the poll reach the server and start waiting.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let id = format!("wake-{round}");
        let sent = Instant::now();
        push(
            &c,
            &b.url,
            "pusher",
            vec![upsert(&id, "notes", "n", json!({"round": round}), &hlc(base + round, 0, "pusher"))],
        )
        .await;
        let (code, page, woke) = waiter.await.unwrap();
        assert_eq!(code, 200, "{page}");
        let changes = page["changes"].as_array().unwrap();
        assert_eq!(changes.len(), 1, "the poll on A returned without B's change: {page}");
        assert_eq!(changes[0]["change_id"], id.as_str());
        let waited = woke.saturating_duration_since(sent);
        assert!(
            waited < Duration::from_secs(10),
            "the poll on A ran into its 20 s wait ({waited:?}) instead of waking"
        );
        latencies.push(waited);
    }
    latencies.sort();
    println!(
        "long poll on A woken by a push through B: median {:?}, max {:?} (push sent → poll answered)",
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    );
}

/// Runs `sql` on a connection of its own inside a transaction that stays open
/// until the returned sender is used (or dropped).
async fn hold_in_transaction(url: &str, schema: &str, sql: String) -> tokio::sync::oneshot::Sender<()> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute(&format!("SET search_path = {schema}; BEGIN; {sql}")).await.unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = released.await;
        let _ = client.batch_execute("COMMIT").await;
    });
    release
}

fn mint(user: &str, secret_file: &std::path::Path) -> String {
    let (st, out, err) = run_cli(&["token", "--user", user, "--secret-file", secret_file.to_str().unwrap()]);
    assert!(st.success(), "token failed: {err}");
    out.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_dataset_never_holds_up_another_users_pushes() {
    let Some(backend) = Backend::postgres() else { return };
    let Backend::Postgres { base_url } = &backend else { unreachable!() };
    let (a, b) = two_instances(&backend, Options { jwt_secret: Some("instances-secret".into()), ..Options::default() });
    let schema = a.database.rsplit("search_path%3D").next().unwrap().to_owned();
    let (alice, bob) = (mint("alice", &a.secret_file()), mint("bob", &a.secret_file()));
    let c = client();
    let base = now_ms() - 10_000;
    let send = |url: &str, token: &str, id: &str, ms: u64| {
        let body =
            json!({"device_id": "d", "changes": [upsert(id, "notes", "n", json!({"v": id}), &hlc(base + ms, 0, "d"))]});
        c.post(format!("{url}/v1/push")).bearer_auth(token).json(&body).send()
    };
    // Create both datasets.
    assert_eq!(send(&a.url, &alice, "a1", 1).await.unwrap().status(), 200);
    assert_eq!(send(&a.url, &bob, "b1", 1).await.unwrap().status(), 200);

    // Another session holds alice's dataset row, as a slow push of hers would.
    let release =
        hold_in_transaction(base_url, &schema, "SELECT 1 FROM datasets WHERE user_id = 'alice' FOR UPDATE;".into())
            .await;
    let blocked = {
        let fut = send(&b.url, &alice, "a2", 2);
        tokio::spawn(async move { fut.await.map(|r| r.status().as_u16()) })
    };
    // Bob's pushes go through either instance while alice's dataset is locked.
    for (i, url) in [&a.url, &b.url, &a.url].into_iter().enumerate() {
        let r = send(url, &bob, &format!("b{}", i + 2), 2 + i as u64).await.unwrap();
        assert_eq!(r.status(), 200, "bob's push waited on alice's dataset");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["results"][0]["seq"], i as u64 + 2, "{body}");
    }
    assert!(!blocked.is_finished(), "alice's push went through while her dataset was locked");
    release.send(()).unwrap();
    assert_eq!(blocked.await.unwrap().unwrap(), 200, "alice's push after the lock was released");
    let (code, page) = {
        let r = c.get(format!("{}/v1/pull?device_id=x&cursor=0", a.url)).bearer_auth(&alice).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(code, 200);
    let ids: Vec<&str> = page["changes"].as_array().unwrap().iter().map(|c| c["change_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a1", "a2"], "alice's log: {page}");
}

#[tokio::test]
async fn instances_started_together_migrate_once() {
    let Some(backend) = Backend::postgres() else { return };
    let first = Server::start(&backend);
    // Three more instances race to start on the same (already migrated) schema, and
    // `deltasync migrate` finds nothing left to do.
    let others: Vec<_> = (0..3)
        .map(|_| {
            let database = first.database.clone();
            let backend = backend.clone();
            std::thread::spawn(move || {
                Server::start_with(&backend, Options { database: Some(database), ..Options::default() })
            })
        })
        .collect();
    let others: Vec<Server> = others.into_iter().map(|t| t.join().expect("an instance failed to start")).collect();
    let (st, out, err) = run_cli(&["migrate", "--database", &first.database]);
    assert!(st.success(), "migrate failed: {err}");
    assert!(out.contains("already at version 4"), "{out}");
    let c = client();
    for s in others.iter().chain([&first]) {
        let (code, body) = get(&c, &s.url, "/v1/status").await;
        assert_eq!(code, 200, "{body}");
    }
}

#[test]
fn migrate_creates_the_schema_and_explains_bad_urls() {
    let Some(backend) = Backend::postgres() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (database, _schema) = backend.fresh_database(dir.path());
    let (st, out, err) = run_cli(&["migrate", "--database", &database]);
    assert!(st.success(), "migrate failed: {err}");
    assert!(out.contains("from version 0 to 4"), "{out}");
    let (st, out, _) = run_cli(&["migrate", "--database", &database]);
    assert!(st.success());
    assert!(out.contains("already at version 4"), "{out}");

    let (st, _, err) = run_cli(&["migrate", "--database", "postgres://postgres@127.0.0.1:notaport/test"]);
    assert!(!st.success());
    assert!(err.contains("database URL is invalid"), "{err}");
    let (st, _, err) =
        run_cli(&["serve", "--listen", "127.0.0.1:0", "--database", "postgres://postgres@127.0.0.1:1/test"]);
    assert!(!st.success());
    assert!(err.contains("cannot connect to PostgreSQL"), "{err}");
}
