//! The server for web pages: `--cors-origin` answers preflights and adds the
//! CORS headers for the origins it names (`Authorization` included), and
//! `--static DIR` serves a folder at `/` beside the API. Without them the
//! server answers as before (a preflight is a 405).

mod common;

use common::{Backend, Options, Server, run_cli};
use reqwest::Method;

fn server(extra: &[&str]) -> Server {
    let extra_args = extra.iter().map(|s| s.to_string()).collect();
    Server::start_with(&Backend::Sqlite, Options { extra_args, ..Options::default() })
}

async fn preflight(url: &str, origin: &str) -> reqwest::Response {
    common::client()
        .request(Method::OPTIONS, format!("{url}/v1/sync"))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "authorization, content-type")
        .send()
        .await
        .unwrap()
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn a_trusted_origin_gets_preflights_and_cors_headers_and_others_do_not() {
    let server = server(&["--cors-origin", "http://app.example:5173", "--cors-origin", "https://tasks.example"]);
    let ok = preflight(&server.url, "http://app.example:5173").await;
    assert!(ok.status().is_success(), "{ok:?}");
    assert_eq!(header(&ok, "access-control-allow-origin"), Some("http://app.example:5173"));
    let allowed = header(&ok, "access-control-allow-headers").unwrap().to_ascii_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"), "{allowed}");
    assert!(header(&ok, "access-control-allow-methods").unwrap().contains("POST"));

    let status = common::client()
        .get(format!("{}/v1/status", server.url))
        .header("Origin", "https://tasks.example")
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 200);
    assert_eq!(header(&status, "access-control-allow-origin"), Some("https://tasks.example"));
    let exposed = header(&status, "access-control-expose-headers").unwrap().to_ascii_lowercase();
    assert!(exposed.contains("retry-after") && exposed.contains("www-authenticate"), "{exposed}");

    let other = preflight(&server.url, "https://evil.example").await;
    assert_eq!(header(&other, "access-control-allow-origin"), None, "an origin not named gets no CORS header");
}

#[tokio::test]
async fn any_origin_with_a_star_and_none_without_the_flag() {
    let server = server(&["--cors-origin", "*"]);
    let resp = preflight(&server.url, "https://anywhere.example").await;
    assert!(resp.status().is_success(), "{resp:?}");
    assert_eq!(header(&resp, "access-control-allow-origin"), Some("*"));

    let plain = Server::start(&Backend::Sqlite);
    let resp = preflight(&plain.url, "https://anywhere.example").await;
    assert_eq!(resp.status(), 405, "without --cors-origin a preflight is answered as before");
    assert_eq!(header(&resp, "access-control-allow-origin"), None);
}

#[tokio::test]
async fn a_static_folder_is_served_beside_the_api() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "<!doctype html><title>tasks</title>").unwrap();
    std::fs::create_dir(dir.path().join("js")).unwrap();
    std::fs::write(dir.path().join("js/app.js"), "console.log('hi')").unwrap();
    let server = server(&["--static", dir.path().to_str().unwrap()]);
    let c = common::client();

    let index = c.get(format!("{}/", server.url)).send().await.unwrap();
    assert_eq!(index.status(), 200);
    assert!(header(&index, "content-type").unwrap().starts_with("text/html"));
    assert!(index.text().await.unwrap().contains("<title>tasks</title>"));
    let js = c.get(format!("{}/js/app.js", server.url)).send().await.unwrap();
    assert_eq!(js.status(), 200);
    assert!(header(&js, "content-type").unwrap().contains("javascript"), "{js:?}");

    // The API is unchanged, and what neither has is the API's JSON 404.
    assert_eq!(c.get(format!("{}/v1/status", server.url)).send().await.unwrap().status(), 200);
    for path in ["/v1/nothing", "/missing.html", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd"] {
        let resp = c.get(format!("{}{path}", server.url)).send().await.unwrap();
        assert!(resp.status() == 404 || resp.status() == 400, "{path}: {resp:?}");
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        assert!(body["error"].is_string(), "{path}: a JSON error, got {body}");
    }
    let post = c.post(format!("{}/index.html", server.url)).body("x").send().await.unwrap();
    assert!(post.status().is_client_error(), "{post:?}");
}

#[test]
fn bad_origins_and_a_missing_folder_are_refused_at_start() {
    for origin in ["app.example", "https://app.example/", "https://app.example/path", "ftp://x"] {
        let (status, _, err) = run_cli(&["serve", "--listen", "127.0.0.1:0", "--cors-origin", origin]);
        assert!(!status.success(), "{origin} was accepted");
        assert!(err.contains("is not an origin"), "{origin}: {err}");
    }
    let (status, _, err) = run_cli(&["serve", "--listen", "127.0.0.1:0", "--static", "/no/such/dir"]);
    assert!(!status.success());
    assert!(err.contains("not a directory"), "{err}");
}
