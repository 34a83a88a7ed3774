//! `deltasync serve --auth oidc` against a real OpenID provider
//! (`tests/oidc/provider.mjs`, the certified npm package `oidc-provider`,
//! issuing ID tokens through its own authorization code flow): users made
//! on first sign-in and kept in the store, RS256 and ES256, key rotation and
//! the refetch throttle, and the refusals (wrong audience, unknown issuer,
//! `alg: none`, HS256 signed with the provider's public key).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use serde_json::{Value, json};

/// A running `provider.mjs`.
struct Provider {
    child: Child,
    issuer: String,
    port: u16,
    keys: PathBuf,
}

fn provider_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc")
}

impl Provider {
    /// Starts the provider on `port` (0: any) with the key set in `keys` (made if missing).
    fn start(keys: &Path, port: u16) -> Provider {
        let dir = provider_dir();
        assert!(
            dir.join("node_modules/oidc-provider").exists(),
            "the OpenID provider's npm packages are missing: cd {} && npm ci (.ci/run does)",
            dir.display()
        );
        let mut child = Command::new("node")
            .arg(dir.join("provider.mjs"))
            .args(["--port", &port.to_string(), "--keys"])
            .arg(keys)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node (Node.js 20 or later)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let issuer = line.trim().strip_prefix("issuer ").unwrap_or_else(|| panic!("provider said {line:?}")).to_owned();
        let port = issuer.rsplit(':').next().unwrap().parse().unwrap();
        Provider { child, issuer, port, keys: keys.to_owned() }
    }

    /// A fresh ID token for `sub`, requested by `client`.
    async fn token(&self, sub: &str, client: &str) -> String {
        let url = format!("{}/test/id-token?sub={sub}&client_id={client}", self.issuer);
        let body: Value = client_http().get(url).send().await.unwrap().json().await.unwrap();
        body["id_token"].as_str().unwrap_or_else(|| panic!("no id_token: {body}")).to_owned()
    }

    /// How often the provider's keys were fetched since it started.
    async fn jwks_fetches(&self) -> u64 {
        let body: Value =
            client_http().get(format!("{}/test/jwks-fetches", self.issuer)).send().await.unwrap().json().await.unwrap();
        body["count"].as_u64().unwrap()
    }

    /// The provider's RS256 public key, in PEM (what a key-confusion attacker signs HS256 with).
    async fn rsa_public_pem(&self) -> String {
        let jwks: Value =
            client_http().get(format!("{}/jwks", self.issuer)).send().await.unwrap().json().await.unwrap();
        let rsa = jwks["keys"].as_array().unwrap().iter().find(|k| k["kty"] == "RSA").unwrap().to_string();
        let script = "const c=require('crypto');process.stdout.write(c.createPublicKey({key:JSON.parse(process.argv[1]),format:'jwk'}).export({type:'spki',format:'pem'}))";
        let out = Command::new("node").args(["-e", script, &rsa]).output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    }

    /// New keys (new `kid`s), on the same port: the provider rotated.
    fn rotate(&mut self) {
        self.stop();
        let made =
            Command::new("node").arg(provider_dir().join("provider.mjs")).arg("--new-keys").arg(&self.keys).status();
        assert!(made.unwrap().success());
        *self = Provider::start(&self.keys.clone(), self.port);
    }

    fn stop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client_http() -> reqwest::Client {
    reqwest::Client::new()
}

/// `GET /v1/status` with `token`: the HTTP status and the body.
async fn status(server: &Server, token: &str) -> (u16, Value) {
    let response = client_http().get(format!("{}/v1/status", server.url)).bearer_auth(token).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// The user id a token maps to (asserting the request is accepted).
async fn user_of(server: &Server, token: &str) -> String {
    let (code, body) = status(server, token).await;
    assert_eq!(code, 200, "{body}");
    body["user_id"].as_str().unwrap().to_owned()
}

/// The refusal message of a token (asserting a 401 `unauthorized`).
async fn refusal(server: &Server, token: &str) -> String {
    let (code, body) = status(server, token).await;
    assert_eq!((code, body["error"].as_str()), (401, Some("unauthorized")), "{body}");
    body["message"].as_str().unwrap().to_owned()
}

fn oidc_server(backend: &Backend, issuer: &str) -> Server {
    let mut extra_args: Vec<String> = ["--auth", "oidc", "--oidc-issuer", issuer].map(String::from).to_vec();
    for audience in ["app-1", "app-es"] {
        extra_args.extend(["--oidc-audience".to_owned(), audience.to_owned()]);
    }
    Server::start_with(backend, Options { extra_args, ..Options::default() })
}

/// `token` with its header replaced by `header` (the signature kept).
fn with_header(token: &str, header: Value) -> String {
    let rest = token.split_once('.').unwrap().1;
    format!("{}.{rest}", URL_SAFE_NO_PAD.encode(header.to_string()))
}

async fn sign_in_scenario(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mut provider = Provider::start(&dir.path().join("keys.json"), 0);
    let mut server = oidc_server(backend, &provider.issuer);

    // The first sign-in makes a user with a random UUID; the same pair keeps it.
    let alice = user_of(&server, &provider.token("alice", "app-1").await).await;
    assert!(uuid_shaped(&alice), "{alice}");
    assert_eq!(user_of(&server, &provider.token("alice", "app-1").await).await, alice);
    let bob = user_of(&server, &provider.token("bob", "app-1").await).await;
    assert!(uuid_shaped(&bob) && bob != alice);
    // ES256, another audience of the same app: the same identity, the same user.
    assert_eq!(user_of(&server, &provider.token("alice", "app-es").await).await, alice);

    // The user is in the store: a restarted server maps alice to it again.
    server.terminate();
    server.restart();
    assert_eq!(user_of(&server, &provider.token("alice", "app-1").await).await, alice);

    // Refusals, each saying what is wrong.
    let message = refusal(&server, &provider.token("alice", "app-2").await).await;
    assert!(message.contains("audience") && message.contains("app-2"), "{message}");
    let other_dir = tempfile::tempdir().unwrap();
    let stranger = Provider::start(&other_dir.path().join("keys.json"), 0);
    let message = refusal(&server, &stranger.token("alice", "app-1").await).await;
    assert!(message.contains("issuer") && message.contains(&stranger.issuer), "{message}");
    let valid = provider.token("mallory", "app-1").await;
    let none = format!("{}.", with_header(&valid, json!({"alg": "none"})).rsplit_once('.').unwrap().0);
    let message = refusal(&server, &none).await;
    assert!(message.contains("RS256 or ES256"), "{message}");
    let claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(valid.split('.').nth(1).unwrap()).unwrap()).unwrap();
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(provider.rsa_public_pem().await.as_bytes()),
    )
    .unwrap();
    let message = refusal(&server, &confused).await;
    assert!(message.contains("RS256 or ES256"), "key confusion must be refused: {message}");
    let tampered = {
        let (head, sig) = valid.rsplit_once('.').unwrap();
        let mut claims = claims.clone();
        claims["sub"] = json!("alice");
        let head = head.split_once('.').unwrap().0;
        format!("{head}.{}.{sig}", URL_SAFE_NO_PAD.encode(claims.to_string()))
    };
    let message = refusal(&server, &tampered).await;
    assert!(message.contains("signature"), "{message}");

    // Key rotation: new kids are fetched once, then every request verifies.
    tokio::time::sleep(Duration::from_secs(OIDC_REFETCH_SECS)).await;
    provider.rotate();
    assert_eq!(provider.jwks_fetches().await, 0);
    assert_eq!(user_of(&server, &provider.token("alice", "app-1").await).await, alice);
    assert_eq!(user_of(&server, &provider.token("alice", "app-es").await).await, alice);
    assert_eq!(provider.jwks_fetches().await, 1, "one fetch for the new keys");
    // A kid the issuer does not publish: refused after one refetch, then
    // refused without fetching again within the throttle.
    tokio::time::sleep(Duration::from_secs(OIDC_REFETCH_SECS)).await;
    let unknown_kid =
        with_header(&provider.token("alice", "app-1").await, json!({"alg": "RS256", "kid": "no-such-key"}));
    let message = refusal(&server, &unknown_kid).await;
    assert!(message.contains("no-such-key"), "{message}");
    for _ in 0..5 {
        refusal(&server, &unknown_kid).await;
    }
    assert_eq!(provider.jwks_fetches().await, 2, "one refetch for the unknown kid, then none within the throttle");
}

/// 8-4-4-4-12 lowercase hex digits.
fn uuid_shaped(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]) && s.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_sign_in_on_sqlite() {
    sign_in_scenario(&Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_sign_in_on_postgres() {
    match Backend::postgres() {
        Some(backend) => sign_in_scenario(&backend).await,
        None => eprintln!("skipped: set DELTASYNC_TEST_POSTGRES to run it on PostgreSQL"),
    }
}

#[test]
fn oidc_flags_are_checked_at_start() {
    let (status, _, err) = run_cli(&["serve", "--listen", "127.0.0.1:0", "--auth", "oidc"]);
    assert!(!status.success());
    assert!(err.contains("--oidc-issuer") && err.contains("--oidc-audience"), "{err}");
    let (status, _, err) = run_cli(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--auth",
        "oidc",
        "--oidc-issuer",
        "accounts.google.com",
        "--oidc-audience",
        "x",
    ]);
    assert!(!status.success());
    assert!(err.contains("https://accounts.google.com"), "{err}");
}
