//! The live channel's workloads (`GET /v1/live`):
//! - `live`: device A pushes one change while device B holds a live socket;
//!   the time from the push to B's head message (p50, p99);
//! - `live-idle`: `--live-connections` sockets held open at once, each of
//!   its own user, so they are idle (the server's RSS before and with them,
//!   per socket), and the same propagation to one more user's socket while
//!   all are open. It starts a server of its own with `--auth jwt` (the
//!   bench's servers run with `--auth none`, where every socket would be
//!   the one user's and each push would go to all of them), with
//!   `max_connections` raised to fit ([`super::server::BENCH_CONFIG`]).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use super::server::{BENCH_CONFIG, Servers, proc_status_kib};
use super::workloads::{Bench, Stamps, bar, percentile};
use super::{Figure, Target};

type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// How many sockets are being opened at once.
const OPENING_AT_ONCE: usize = 64;

/// Opens a live socket on the server at `url` for `device`, with `token` if given.
async fn open(url: &str, device: &str, token: Option<&str>) -> anyhow::Result<Socket> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let ws =
        format!("{}/v1/live?device_id={device}", url.replacen("http://", "ws://", 1).replacen("https://", "wss://", 1));
    let mut request = ws.as_str().into_client_request()?;
    if let Some(token) = token {
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
    }
    let (socket, _) = connect_async(request).await.with_context(|| format!("cannot open {ws}"))?;
    Ok(socket)
}

/// The cursor of the next head message (pings skipped).
async fn next_cursor(socket: &mut Socket) -> anyhow::Result<u64> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .context("no head message within 30 s")?
            .context("the server closed the live socket")??;
        if let Message::Text(text) = message {
            let head: serde_json::Value = serde_json::from_str(&text)?;
            return head["cursor"].as_u64().context("a head message without cursor");
        }
    }
}

impl Bench {
    /// Pushes `trials` changes through the instance after the one `socket`
    /// is on (the same one on a single instance) and times each until the
    /// socket's head message says so. Returns the latencies.
    async fn time_heads(&self, socket: &mut Socket, trials: usize, label: &str) -> anyhow::Result<Vec<Duration>> {
        // The propagation workload's entity: these add no entity to the dataset.
        let pusher = self.on_instance(usize::from(self.instances() > 1));
        let progress = bar(trials as u64, label);
        let mut stamps = Stamps::new("bench-live-a");
        let mut latencies = Vec::with_capacity(trials);
        for trial in 0..trials {
            let body = format!(
                r#"{{"device_id":"bench-live-a","changes":[{{"change_id":"live-{}-{label}-{trial}","collection":"tasks","entity_id":"prop","op":"upsert","data":{{"n":{trial}}},"hlc":"{}"}}]}}"#,
                self.run_id,
                stamps.next()
            );
            let sent = Instant::now();
            let head = pusher.post_push(body).await?;
            loop {
                let cursor = next_cursor(socket).await?;
                if cursor == head {
                    break;
                }
                if cursor > head {
                    bail!("the live socket jumped to {cursor} past the push's head {head}");
                }
            }
            latencies.push(sent.elapsed());
            progress.inc(1);
        }
        progress.finish_and_clear();
        Ok(latencies)
    }

    /// The p50 and p99 figures of `latencies`.
    fn latency_figures(&mut self, what: &str, latencies: &mut [Duration], mut details: serde_json::Value) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let (p50, p99) = (ms(percentile(latencies, 0.50)), ms(percentile(latencies, 0.99)));
        details["trials"] = json!(latencies.len());
        details["p50_ms"] = json!(p50);
        details["p99_ms"] = json!(p99);
        details["max_ms"] = json!(ms(percentile(latencies, 1.0)));
        self.figures.push(Figure::new(format!("{what} p50"), p50, "ms", Some(Target::AtMost(1.0)), details.clone()));
        self.figures.push(Figure::new(format!("{what} p99"), p99, "ms", Some(Target::AtMost(5.0)), details));
    }

    /// live: the time from a push to the head message on another device's
    /// socket (on instance 0; pushed through instance 1 when there are two).
    pub async fn live_propagation(&mut self, trials: usize) -> anyhow::Result<()> {
        let mut socket = open(self.url(), "bench-live-b", self.token.as_deref()).await?;
        let first = next_cursor(&mut socket).await?;
        if first != self.head().await? {
            bail!("the live socket's first head {first} is not the server's head");
        }
        let mut latencies = self.time_heads(&mut socket, trials, "propagation, live").await?;
        let suffix = if self.instances() > 1 { " (instance 1 → 0)" } else { "" };
        self.latency_figures(&format!("propagation, live{suffix}"), &mut latencies, json!({}));
        Ok(())
    }

    /// live-idle: `connections` sockets of as many users held open on a
    /// server of its own, the server's memory with them, and the propagation
    /// to one more user's socket meanwhile.
    pub async fn live_idle(&mut self, connections: usize, trials: usize) -> anyhow::Result<()> {
        // Each socket is a file descriptor here too.
        let fds = deltasync_server::net::connection_cap(connections + 1024);
        if fds < connections + 64 {
            bail!("this process may open {fds} files; {connections} sockets need more (raise ulimit -n)");
        }
        let dir = tempfile::tempdir()?;
        let secret = b"live-idle bench secret";
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, secret)?;
        let database = format!("sqlite://{}", dir.path().join("live-idle.db").display());
        let extra =
            ["--auth".to_owned(), "jwt".to_owned(), "--jwt-secret-file".to_owned(), secret_file.display().to_string()];
        let servers = Servers::start_with(&database, 1, None, BENCH_CONFIG, &extra)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        let mint = |user: &str| {
            let user = deltasync_protocol::UserId::parse(user).expect("a bench user id");
            deltasync_server::auth::mint_token(secret, &user, now, 3600)
        };
        let mut own = Bench::new(servers.urls(), servers.pids());
        own.run_id = self.run_id;
        own.token = Some(mint("bench-live-user"));
        let outcome = own.idle_sockets(connections, trials, &mint).await;
        self.figures.append(&mut own.figures);
        drop(servers);
        outcome
    }

    async fn idle_sockets(
        &mut self,
        connections: usize,
        trials: usize,
        mint: &impl Fn(&str) -> String,
    ) -> anyhow::Result<()> {
        let pid = self.server_pids.first().copied();
        let before = pid.map(|p| proc_status_kib(p, "VmRSS:"));
        let progress = bar(connections as u64, "live, opening idle sockets");
        let url = self.url().to_owned();
        let started = Instant::now();
        let tokens: Vec<String> = (0..connections).map(|n| mint(&format!("bench-idle-{n}"))).collect();
        let mut sockets: Vec<Socket> = futures_util::stream::iter(tokens.into_iter().enumerate())
            .map(|(n, token)| {
                let url = url.clone();
                async move {
                    let mut socket = open(&url, &format!("bench-idle-{n}"), Some(&token)).await?;
                    next_cursor(&mut socket).await?;
                    anyhow::Ok(socket)
                }
            })
            .buffer_unordered(OPENING_AT_ONCE)
            .inspect(|_| progress.inc(1))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
        progress.finish_and_clear();
        let opened_in = started.elapsed();
        // Let the server settle before reading its memory.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let with = pid.map(|p| proc_status_kib(p, "VmRSS:"));
        let mut watched = open(&url, "bench-live-b", self.token.as_deref()).await?;
        next_cursor(&mut watched).await?;
        let mut latencies = self.time_heads(&mut watched, trials, "propagation, among idle").await?;
        let mib = |kib: u64| kib as f64 / 1024.0;
        let details = json!({
            "connections": connections,
            "opened_in_s": opened_in.as_secs_f64(),
            "rss_before_mib": before.map(mib),
            "rss_with_mib": with.map(mib),
            "per_connection_kib": before.zip(with).map(|(b, w)| w.saturating_sub(b) as f64 / connections as f64),
        });
        if let Some(with) = with {
            self.figures.push(Figure::new(
                format!("server RSS with {connections} idle live sockets"),
                mib(with),
                "MiB",
                Some(Target::AtMost(200.0)),
                details.clone(),
            ));
        }
        self.latency_figures(&format!("propagation, live, {connections} open"), &mut latencies, details);
        // Every idle socket sent its first head, and none was closed before now.
        for socket in &mut sockets {
            socket.close(None).await.ok();
        }
        Ok(())
    }
}
