//! `GET /v1/live`: the dataset's head over a WebSocket, on a real server
//! process with a real WebSocket client: the first message, a message per
//! push, the token in `Authorization` or as the `bearer.<token>`
//! subprotocol, refusals, the per-user cap, pings that close a silent peer,
//! shutdown, and (PostgreSQL) a push through another instance.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a test waits for a message the server should send at once.
const PROMPT: Duration = Duration::from_secs(10);

/// The live URL of a server for `device`.
fn live_url(server: &Server, device: &str) -> String {
    format!("{}/v1/live?device_id={device}", server.url.replacen("http://", "ws://", 1))
}

/// Opens a live socket, with `token` in `Authorization` and `protocols` offered.
async fn open(server: &Server, device: &str, token: Option<&str>, protocols: &[&str]) -> Result<Socket, WsError> {
    let mut request = live_url(server, device).into_client_request().unwrap();
    if let Some(token) = token {
        request.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
    }
    if !protocols.is_empty() {
        request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_str(&protocols.join(", ")).unwrap());
    }
    connect_async(request).await.map(|(socket, _)| socket)
}

/// The next head message (skipping pings), within [`PROMPT`].
async fn next_head(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(PROMPT, socket.next()).await.expect("a head message in time");
        match message.expect("the socket is open").expect("a message") {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a head message, got {other:?}"),
        }
    }
}

/// The HTTP status and JSON body of a refused upgrade.
fn refusal(error: WsError) -> (u16, Value, Option<String>) {
    let WsError::Http(response) = error else { panic!("expected an HTTP refusal, got {error}") };
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    let body = response.body().clone().unwrap_or_default();
    (response.status().as_u16(), serde_json::from_slice(&body).unwrap_or(Value::Null), retry_after)
}

fn mint(server: &Server, user: &str) -> String {
    let secret = server.secret_file();
    let (status, out, err) = run_cli(&["token", "--user", user, "--secret-file", secret.to_str().unwrap()]);
    assert!(status.success(), "{err}");
    out.trim().to_owned()
}

store_test!(#[tokio::test] async fn the_head_arrives_at_once_and_after_every_push);
async fn the_head_arrives_at_once_and_after_every_push(backend: &Backend) {
    let server = Server::start(backend);
    let c = client();
    let mut socket = open(&server, "watcher", None, &[]).await.unwrap();
    let first = next_head(&mut socket).await;
    assert_eq!(first, json!({"cursor": 0, "state_hash": "0".repeat(64), "state_digest": "0".repeat(64)}));
    let base = now_ms() - 10_000;
    for round in 1..=3u64 {
        let answer = push(
            &c,
            &server.url,
            "writer",
            vec![upsert(&format!("c{round}"), "notes", "n", json!({"round": round}), &hlc(base + round, 0, "writer"))],
        )
        .await;
        let head = next_head(&mut socket).await;
        assert_eq!(head["cursor"], round, "{head}");
        assert_eq!(head["state_hash"], answer["state_hash"]);
        assert_eq!(head["state_digest"], answer["state_digest"]);
    }
    // The device was seen when it connected.
    let (code, status) = get(&c, &server.url, "/v1/status").await;
    assert_eq!(code, 200, "{status}");
    let devices = status["devices"].as_array().unwrap();
    assert!(devices.iter().any(|d| d["device_id"] == "watcher"), "{status}");
    socket.close(None).await.unwrap();
}

#[tokio::test]
async fn the_token_comes_in_the_header_or_as_a_subprotocol() {
    let server =
        Server::start_with(&Backend::Sqlite, Options { jwt_secret: Some("live-secret".into()), ..Default::default() });
    let token = mint(&server, "alice");
    let mut by_header = open(&server, "a", Some(&token), &[]).await.unwrap();
    assert_eq!(next_head(&mut by_header).await["cursor"], 0);

    // A browser offers the token as a subprotocol; the server selects
    // `deltasync.live` when offered, else the bearer one (a browser fails a
    // socket whose server selects none of those offered).
    let bearer = format!("bearer.{token}");
    let mut request = live_url(&server, "b").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_str(&format!("deltasync.live, {bearer}")).unwrap());
    let (mut both, response) = connect_async(request).await.unwrap();
    assert_eq!(response.headers().get("sec-websocket-protocol").unwrap(), "deltasync.live");
    assert_eq!(next_head(&mut both).await["cursor"], 0);
    let mut request = live_url(&server, "c").into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_str(&bearer).unwrap());
    let (mut only_bearer, response) = connect_async(request).await.unwrap();
    assert_eq!(response.headers().get("sec-websocket-protocol").unwrap(), bearer.as_str());
    assert_eq!(next_head(&mut only_bearer).await["cursor"], 0);

    for (token, protocols) in [(None, vec![]), (Some("not-a-token"), vec![]), (None, vec!["bearer.forged"])] {
        let error = open(&server, "d", token, &protocols).await.expect_err("refused");
        let (status, body, _) = refusal(error);
        assert_eq!(status, 401, "{token:?} {protocols:?}: {body}");
        assert_eq!(body["error"], "unauthorized");
    }
}

#[tokio::test]
async fn a_plain_get_is_told_to_upgrade_and_a_device_is_required() {
    let server = Server::start(&Backend::Sqlite);
    let c = client();
    let (status, body) = get(&c, &server.url, "/v1/live?device_id=a").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("WebSocket"), "{body}");
    let error = tokio_tungstenite::connect_async(format!("{}/v1/live", server.url.replacen("http://", "ws://", 1)))
        .await
        .expect_err("refused");
    let (status, body, _) = refusal(error);
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("device_id"), "{body}");
}

#[tokio::test]
async fn one_user_holds_at_most_max_live_per_user_sockets() {
    let config = "[server]\nmax_live_per_user = 2\n";
    let server = Server::start_with(
        &Backend::Sqlite,
        Options { jwt_secret: Some("cap-secret".into()), config: Some(config.into()), ..Default::default() },
    );
    let (alice, bob) = (mint(&server, "alice"), mint(&server, "bob"));
    let mut first = open(&server, "a1", Some(&alice), &[]).await.unwrap();
    let mut second = open(&server, "a2", Some(&alice), &[]).await.unwrap();
    next_head(&mut first).await;
    next_head(&mut second).await;
    let (status, body, retry_after) = refusal(open(&server, "a3", Some(&alice), &[]).await.expect_err("over the cap"));
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "rate_limited");
    assert!(body["message"].as_str().unwrap().contains("max_live_per_user is 2"), "{body}");
    assert!(retry_after.is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
    // Another user is not held back by alice's sockets.
    let mut other = open(&server, "b1", Some(&bob), &[]).await.unwrap();
    next_head(&mut other).await;
    // A closed socket frees its place.
    first.close(None).await.unwrap();
    while first.next().await.is_some() {}
    let deadline = std::time::Instant::now() + PROMPT;
    loop {
        match open(&server, "a3", Some(&alice), &[]).await {
            Ok(mut third) => {
                next_head(&mut third).await;
                break;
            }
            Err(e) => {
                let (status, body, _) = refusal(e);
                assert_eq!(status, 429, "{body}");
                assert!(std::time::Instant::now() < deadline, "the closed socket's place was never freed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn a_peer_that_answers_no_pings_is_closed_and_one_that_does_stays() {
    let config = "[server]\nlive_ping_secs = 1\n";
    let server = Server::start_with(&Backend::Sqlite, Options { config: Some(config.into()), ..Default::default() });
    let mut silent = open(&server, "silent", None, &[]).await.unwrap();
    let mut alive = open(&server, "alive", None, &[]).await.unwrap();
    next_head(&mut silent).await;
    next_head(&mut alive).await;
    // `alive` reads, so its client answers each ping; `silent` reads nothing
    // (its pings wait unanswered in the socket) for four ping intervals.
    let reader = tokio::spawn(async move {
        let until = tokio::time::Instant::now() + Duration::from_secs(4);
        while let Ok(Some(message)) = tokio::time::timeout_at(until, alive.next()).await {
            if let Message::Close(frame) = message.unwrap() {
                panic!("a peer answering pings was closed: {frame:?}");
            }
        }
        alive
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut alive = reader.await.unwrap();
    let mut closed = None;
    while let Some(message) =
        tokio::time::timeout(PROMPT, silent.next()).await.expect("the server ends the silent socket")
    {
        match message {
            Ok(Message::Close(frame)) => closed = frame.map(|f| f.code),
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    assert_eq!(closed, Some(CloseCode::Policy), "the silent peer is closed with 1008");
    // The other socket still delivers heads.
    push(&client(), &server.url, "w", vec![upsert("c1", "notes", "n", json!({}), &hlc(now_ms() - 1000, 0, "w"))]).await;
    assert_eq!(next_head(&mut alive).await["cursor"], 1);
}

#[tokio::test]
async fn shutdown_closes_live_sockets_as_going_away() {
    let mut server = Server::start(&Backend::Sqlite);
    let mut socket = open(&server, "a", None, &[]).await.unwrap();
    next_head(&mut socket).await;
    let stopping = tokio::task::spawn_blocking(move || {
        let status = server.terminate();
        (server, status)
    });
    let mut closed = None;
    while let Some(message) = tokio::time::timeout(PROMPT, socket.next()).await.expect("closed at shutdown") {
        match message {
            Ok(Message::Close(frame)) => closed = frame.map(|f| f.code),
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    assert_eq!(closed, Some(CloseCode::Away));
    let (_server, status) = stopping.await.unwrap();
    assert!(status.success(), "the server exits cleanly with a live socket open: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_through_another_instance_reaches_a_live_socket() {
    let Some(backend) = Backend::postgres() else { return };
    let a = Server::start(&backend);
    let b = Server::start_with(&backend, Options { database: Some(a.database.clone()), ..Default::default() });
    let mut socket = open(&a, "watcher", None, &[]).await.unwrap();
    assert_eq!(next_head(&mut socket).await["cursor"], 0);
    let c = client();
    let base = now_ms() - 10_000;
    for round in 1..=5u64 {
        let answer = push(
            &c,
            &b.url,
            "w",
            vec![upsert(&format!("c{round}"), "notes", "n", json!({"r": round}), &hlc(base + round, 0, "w"))],
        )
        .await;
        let head = next_head(&mut socket).await;
        assert_eq!(head["cursor"], round);
        assert_eq!(head["state_hash"], answer["state_hash"]);
    }
    socket.send(Message::Close(None)).await.unwrap();
}

#[tokio::test]
async fn a_live_socket_keeps_its_place_under_max_connections() {
    let config = "[server]\nmax_connections = 2\n";
    let server = Server::start_with(&Backend::Sqlite, Options { config: Some(config.into()), ..Default::default() });
    let mut first = open(&server, "a", None, &[]).await.unwrap();
    let mut second = open(&server, "b", None, &[]).await.unwrap();
    next_head(&mut first).await;
    next_head(&mut second).await;
    // Both places are held by upgraded connections: a new one is closed at once.
    let fresh = || reqwest::Client::builder().pool_max_idle_per_host(0).timeout(PROMPT).build().unwrap();
    assert!(fresh().get(format!("{}/healthz", server.url)).send().await.is_err(), "a third connection was served");
    first.close(None).await.unwrap();
    while first.next().await.is_some() {}
    let deadline = std::time::Instant::now() + PROMPT;
    while fresh().get(format!("{}/healthz", server.url)).send().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the closed socket's connection place was never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sockets_of_one_user_all_get_each_head() {
    const SOCKETS: usize = 300;
    let config = format!("[server]\nmax_live_per_user = {SOCKETS}\n");
    let server = Server::start_with(&Backend::Sqlite, Options { config: Some(config), ..Default::default() });
    let mut sockets = Vec::with_capacity(SOCKETS);
    for n in 0..SOCKETS {
        let mut socket = open(&server, &format!("d{n}"), None, &[]).await.unwrap();
        assert_eq!(next_head(&mut socket).await["cursor"], 0);
        sockets.push(socket);
    }
    let c = client();
    let base = now_ms() - 10_000;
    for round in 1..=3u64 {
        let id = format!("c{round}");
        push(&c, &server.url, "w", vec![upsert(&id, "notes", "n", json!({"r": round}), &hlc(base + round, 0, "w"))])
            .await;
        for socket in &mut sockets {
            assert_eq!(next_head(socket).await["cursor"], round);
        }
    }
}
