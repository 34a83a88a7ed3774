//! The workloads. Each records one or more [`Figure`]s.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use deltasync_client::{Client, ClientOptions, LocalWrite, WriteKind};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use super::server::{RssSampler, proc_status_kib};
use super::{Figure, Target};

/// A pull answer, read without building its changes.
#[derive(serde::Deserialize)]
struct PageSummary {
    changes: Vec<serde::de::IgnoredAny>,
    cursor: u64,
    has_more: bool,
}

/// Issues increasing HLC stamps for one simulated device.
pub(super) struct Stamps {
    device: String,
    ms: u64,
    counter: u32,
}

impl Stamps {
    pub(super) fn new(device: &str) -> Self {
        Stamps { device: device.to_owned(), ms: 0, counter: 0 }
    }

    pub(super) fn next(&mut self) -> String {
        let now = now_ms();
        if now > self.ms {
            self.ms = now;
            self.counter = 0;
        } else if self.counter >= 99_999 {
            self.ms += 1;
            self.counter = 0;
        } else {
            self.counter += 1;
        }
        format!("{:013}-{:05}-{}", self.ms, self.counter, self.device)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// About 150 bytes of JSON: a title, a flag, a number, a small array of tags.
pub(super) fn entity_data(i: usize) -> String {
    format!(
        r#"{{"title":"Task number {i} with a reasonably long title","done":{},"priority":{},"tags":["work","home","t{}"],"estimate":{}}}"#,
        i.is_multiple_of(3),
        i % 5,
        i % 17,
        (i % 100) as f64 / 4.0
    )
}

/// The `p` quantile (0..=1) of `samples` (sorted in place); zero when there are none.
pub(super) fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort();
    samples[((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1]
}

pub(super) fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:<28} [{bar:30}] {human_pos}/{human_len} ({per_sec}, {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// The ids the push workloads send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ids {
    /// Random (version 4) UUIDs for change ids and entity ids, as real clients
    /// send them: they arrive in no key order.
    Random,
    /// Ids that arrive in key order (`DEVICE-RUN-N` change ids, `eN` entity
    /// ids): the shape that favours the server's indexes, for comparison.
    TimeOrdered,
}

impl Ids {
    /// The id of entity `n` of run `run` (the same every time it is asked for).
    pub(super) fn entity(self, run: u64, n: usize) -> String {
        match self {
            Ids::Random => uuid_like(run, n as u64),
            Ids::TimeOrdered => format!("e{n}"),
        }
    }

    /// The id of the `i`th change `device` pushes in run `run`.
    pub(super) fn change(self, device: &str, run: u64, i: usize) -> String {
        match self {
            Ids::Random => uuid::Uuid::new_v4().to_string(),
            Ids::TimeOrdered => format!("{device}-{run}-{i}"),
        }
    }

    /// The name reports give the shape.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Ids::Random => "random",
            Ids::TimeOrdered => "time-ordered",
        }
    }

    /// What a figure's name says about the shape: nothing for the realistic one.
    pub(super) fn suffix(self) -> &'static str {
        match self {
            Ids::Random => "",
            Ids::TimeOrdered => " (time-ordered ids)",
        }
    }
}

/// Local writes per transaction in the client workload.
const CLIENT_WRITE_BATCH: usize = 10_000;

/// The benchmark's state: the servers, an HTTP client, and the figures so far.
pub struct Bench {
    http: reqwest::Client,
    /// The base URL of each instance, instance 0 first; all share one database.
    urls: Vec<String>,
    /// Their process ids when they are our children (else empty).
    pub(super) server_pids: Vec<u32>,
    pub(super) run_id: u64,
    /// The bearer token requests carry (servers with `--auth jwt`).
    pub(super) token: Option<String>,
    /// The ids the push workloads send.
    pub(super) ids: Ids,
    /// Entities created so far by this run.
    entities: usize,
    /// The figures measured.
    pub figures: Vec<Figure>,
}

impl Bench {
    /// A bench against the instances at `urls` (at least one); `server_pids` when they are our children.
    pub fn new(urls: Vec<String>, server_pids: Vec<u32>) -> Bench {
        assert!(!urls.is_empty(), "a bench needs a server");
        let http = reqwest::Client::builder().tcp_nodelay(true).build().expect("HTTP client");
        Bench {
            http,
            urls,
            server_pids,
            run_id: now_ms(),
            token: None,
            ids: Ids::Random,
            entities: 0,
            figures: Vec::new(),
        }
    }

    /// The URL of instance 0, which every single-server workload uses.
    pub(super) fn url(&self) -> &str {
        &self.urls[0]
    }

    /// How many instances share the database.
    pub(super) fn instances(&self) -> usize {
        self.urls.len()
    }

    /// A bench of the same run that talks to instance `i % instances` only (no figures, no pids).
    pub(super) fn on_instance(&self, i: usize) -> Bench {
        Bench {
            http: self.http.clone(),
            urls: vec![self.urls[i % self.urls.len()].clone()],
            server_pids: Vec::new(),
            run_id: self.run_id,
            token: self.token.clone(),
            ids: self.ids,
            entities: 0,
            figures: Vec::new(),
        }
    }

    /// Sends one `POST /v1/push` body to instance 0 and returns the head it answers.
    pub(super) async fn post_push(&self, body: String) -> anyhow::Result<u64> {
        let mut request =
            self.http.post(format!("{}/v1/push", self.url())).header("content-type", "application/json").body(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let r = request.send().await?;
        if !r.status().is_success() {
            bail!("push answered {}: {}", r.status(), r.text().await?);
        }
        let answer: Value = serde_json::from_slice(&r.bytes().await?)?;
        answer["cursor"].as_u64().context("push answer without cursor")
    }

    /// Pushes `count` changes made by `change(i)` (entity id, data JSON) in batches; returns the head after.
    async fn push_changes(
        &self,
        device: &str,
        count: usize,
        batch: usize,
        progress: &ProgressBar,
        change: impl Fn(usize) -> (String, String),
    ) -> anyhow::Result<u64> {
        let mut stamps = Stamps::new(device);
        let mut head = 0;
        for start in (0..count).step_by(batch.max(1)) {
            let end = (start + batch).min(count);
            let mut body = String::with_capacity((end - start) * 300 + 64);
            write!(body, r#"{{"device_id":"{device}","changes":["#)?;
            for i in start..end {
                let (entity, data) = change(i);
                if i > start {
                    body.push(',');
                }
                write!(
                    body,
                    r#"{{"change_id":"{}","collection":"tasks","entity_id":"{entity}","op":"upsert","data":{data},"hlc":"{}"}}"#,
                    self.ids.change(device, self.run_id, i),
                    stamps.next()
                )?;
            }
            body.push_str("]}");
            head = self.post_push(body).await?;
            progress.inc((end - start) as u64);
        }
        Ok(head)
    }

    /// Pushes `count` new entities from `devices` devices at once, device `d`
    /// through instance `d % instances`; returns the seconds taken.
    async fn push_new(&mut self, label: &str, count: usize, batch: usize, devices: usize) -> anyhow::Result<f64> {
        let progress = bar(count as u64, label);
        let per_device = count / devices.max(1);
        let first = self.entities;
        let t = Instant::now();
        let mut tasks = Vec::new();
        for d in 0..devices.max(1) {
            let this = self.on_instance(d);
            let progress = progress.clone();
            let base = first + d * per_device;
            let n = if d + 1 == devices.max(1) { count - d * per_device } else { per_device };
            let (ids, run) = (self.ids, self.run_id);
            tasks.push(tokio::spawn(async move {
                let device = format!("bench-{}", base);
                this.push_changes(&device, n, batch, &progress, |i| (ids.entity(run, base + i), entity_data(base + i)))
                    .await
            }));
        }
        for task in tasks {
            task.await??;
        }
        let seconds = t.elapsed().as_secs_f64();
        progress.finish_and_clear();
        self.entities += count;
        Ok(seconds)
    }

    /// push: new entities from 1 device, then from `devices` devices at once.
    pub async fn push(&mut self, entities: usize, batch: usize, devices: usize) -> anyhow::Result<()> {
        let (ids, suffix) = (self.ids.as_str(), self.ids.suffix());
        let label = format!("push, 1 device{suffix}");
        let s = self.push_new(&label, entities, batch, 1).await?;
        self.figures.push(Figure::new(
            label,
            entities as f64 / s,
            "changes/s",
            Some(Target::AtLeast(60_000.0)),
            json!({"changes": entities, "seconds": s, "batch": batch, "ids": ids}),
        ));
        let instances = self.instances().min(devices.max(1));
        let label = match instances {
            1 => format!("push, {devices} devices{suffix}"),
            n => format!("push, {devices} devices over {n} instances{suffix}"),
        };
        let s = self.push_new(&label, entities, batch, devices).await?;
        self.figures.push(Figure::new(
            label,
            entities as f64 / s,
            "changes/s",
            Some(Target::AtLeast(100_000.0)),
            json!({"changes": entities, "seconds": s, "batch": batch, "devices": devices, "instances": instances, "ids": ids}),
        ));
        Ok(())
    }

    /// update: one-field patches to existing entities.
    pub async fn update(&mut self, updates: usize, batch: usize) -> anyhow::Result<()> {
        if self.entities == 0 {
            let s = self.push_new("seeding entities", updates, batch, 1).await?;
            let _ = s;
        }
        let existing = self.entities;
        let label = format!("update, one field{}", self.ids.suffix());
        let progress = bar(updates as u64, &label);
        let t = Instant::now();
        let (ids, run) = (self.ids, self.run_id);
        self.push_changes("bench-updater", updates, batch, &progress, |i| {
            (ids.entity(run, i % existing), format!(r#"{{"done":{}}}"#, i % 2 == 0))
        })
        .await?;
        let s = t.elapsed().as_secs_f64();
        progress.finish_and_clear();
        self.figures.push(Figure::new(
            label,
            updates as f64 / s,
            "changes/s",
            Some(Target::AtLeast(60_000.0)),
            json!({"changes": updates, "seconds": s, "batch": batch, "ids": ids.as_str()}),
        ));
        Ok(())
    }

    /// The dataset's head, from /v1/status.
    pub(super) async fn head(&self) -> anyhow::Result<u64> {
        let r = self.http.get(format!("{}/v1/status", self.url())).send().await?;
        let status: Value = serde_json::from_slice(&r.bytes().await?)?;
        status["head"].as_u64().context("status without head")
    }

    /// pull: a fresh device pulls the whole log.
    pub async fn pull(&mut self) -> anyhow::Result<()> {
        let head = self.head().await?;
        let progress = bar(head, "pull, 10000 per page");
        let t = Instant::now();
        let (mut cursor, mut pulled, mut bytes) = (0u64, 0u64, 0usize);
        loop {
            let r = self
                .http
                .get(format!(
                    "{}/v1/pull?device_id=bench-reader-{}&cursor={cursor}&limit=10000",
                    self.url(),
                    self.run_id
                ))
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("pull answered {}", r.status());
            }
            let body = r.bytes().await?;
            bytes += body.len();
            // The whole page is parsed and checked as JSON, but changes are not
            // built into values: the load generator shares the server's cores.
            let page: PageSummary = serde_json::from_slice(&body)?;
            let n = page.changes.len() as u64;
            pulled += n;
            progress.inc(n);
            cursor = page.cursor;
            if !page.has_more {
                break;
            }
        }
        let s = t.elapsed().as_secs_f64();
        progress.finish_and_clear();
        self.figures.push(Figure::new(
            "pull, 10000 per page",
            pulled as f64 / s,
            "changes/s",
            Some(Target::AtLeast(300_000.0)),
            json!({"changes": pulled, "seconds": s, "bytes": bytes, "mb_per_sec": bytes as f64 / 1e6 / s}),
        ));
        Ok(())
    }

    /// propagation: A pushes one change while B waits in a long poll; time from A's send to B's answer.
    /// B waits on instance 0; A pushes through instance 1 when there is one, so the
    /// change crosses from one server process to another through the database.
    pub async fn propagation(&mut self, trials: usize) -> anyhow::Result<()> {
        let (waits_on, pushes_to) = (0, usize::from(self.instances() > 1));
        let pusher = self.on_instance(pushes_to);
        let suffix =
            if pushes_to == waits_on { String::new() } else { format!(" (instance {pushes_to} → {waits_on})") };
        let progress = bar(trials as u64, &format!("propagation, long poll{suffix}"));
        let mut head = self.head().await?;
        let mut stamps = Stamps::new("bench-prop-a");
        let mut latencies = Vec::with_capacity(trials);
        let mut acks = Vec::with_capacity(trials);
        for trial in 0..trials {
            let http = self.http.clone();
            let url = format!("{}/v1/pull?device_id=bench-prop-b&cursor={head}&limit=100&wait=30", self.url());
            let waiter = tokio::spawn(async move {
                let r = http.get(url).send().await?;
                let body = r.bytes().await?;
                let at = Instant::now();
                let page: Value = serde_json::from_slice(&body)?;
                anyhow::Ok((at, page["cursor"].as_u64().unwrap_or(0)))
            });
            // Let B's request reach the server and start waiting.
            tokio::time::sleep(Duration::from_millis(3)).await;
            let body = format!(
                r#"{{"device_id":"bench-prop-a","changes":[{{"change_id":"prop-{}-{trial}","collection":"tasks","entity_id":"prop","op":"upsert","data":{{"n":{trial}}},"hlc":"{}"}}]}}"#,
                self.run_id,
                stamps.next()
            );
            let sent = Instant::now();
            head = pusher.post_push(body).await?;
            acks.push(sent.elapsed());
            let (received, cursor) = waiter.await??;
            if cursor != head {
                bail!("the long poll returned cursor {cursor}, expected {head}");
            }
            latencies.push(received.saturating_duration_since(sent));
            progress.inc(1);
        }
        progress.finish_and_clear();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let (p50, p99) = (ms(percentile(&mut latencies, 0.50)), ms(percentile(&mut latencies, 0.99)));
        let ack_p50 = ms(percentile(&mut acks, 0.50));
        let details = json!({"trials": trials, "p50_ms": p50, "p99_ms": p99,
            "max_ms": ms(percentile(&mut latencies, 1.0)), "push_ack_p50_ms": ack_p50,
            "wait_instance": waits_on, "push_instance": pushes_to});
        self.figures.push(Figure::new(
            format!("propagation p50, long poll{suffix}"),
            p50,
            "ms",
            Some(Target::AtMost(1.0)),
            details.clone(),
        ));
        self.figures.push(Figure::new(
            format!("propagation p99, long poll{suffix}"),
            p99,
            "ms",
            Some(Target::AtMost(5.0)),
            details,
        ));
        Ok(())
    }

    /// bootstrap: fills the dataset up to `entities`, then a fresh device streams it.
    pub async fn bootstrap(&mut self, entities: usize, batch: usize, devices: usize) -> anyhow::Result<()> {
        if self.entities < entities {
            self.push_new("filling for bootstrap", entities - self.entities, batch, devices).await?;
        }
        // The stream comes from instance 0: its memory is the one sampled.
        let server_pid = self.server_pids.first().copied();
        let baseline = server_pid.map(|pid| proc_status_kib(pid, "VmRSS:"));
        let sampler = server_pid.map(RssSampler::start);
        let progress = bar(self.entities as u64, "bootstrap");
        let t = Instant::now();
        let r =
            self.http.get(format!("{}/v1/bootstrap?device_id=bench-boot-{}", self.url(), self.run_id)).send().await?;
        if !r.status().is_success() {
            bail!("bootstrap answered {}", r.status());
        }
        let mut stream = r.bytes_stream();
        let (mut lines, mut bytes) = (0u64, 0usize);
        let mut tail = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            bytes += chunk.len();
            let n = chunk.iter().filter(|b| **b == b'\n').count() as u64;
            lines += n;
            progress.inc(n);
            tail = chunk[chunk.len().saturating_sub(64)..].to_vec();
        }
        let s = t.elapsed().as_secs_f64();
        progress.finish_and_clear();
        let peak = sampler.map(RssSampler::finish);
        let last = String::from_utf8_lossy(&tail);
        if !last.contains("\"end\"") {
            bail!("the bootstrap stream did not end with its end line");
        }
        let streamed = lines.saturating_sub(2);
        self.figures.push(Figure::new(
            "bootstrap",
            s,
            "s",
            Some(Target::AtMost(4.0)),
            json!({"entities": streamed, "entities_per_sec": streamed as f64 / s, "bytes": bytes}),
        ));
        if let (Some(base), Some(peak)) = (baseline, peak) {
            let growth = peak.saturating_sub(base) as f64 / 1024.0;
            self.figures.push(Figure::new(
                "bootstrap, server RSS growth",
                growth,
                "MiB",
                Some(Target::AtMost(100.0)),
                json!({"baseline_mib": base as f64 / 1024.0, "peak_mib": peak as f64 / 1024.0, "instance": 0}),
            ));
        }
        Ok(())
    }

    /// wire: bytes of a one-field edit synced by the client SDK through `POST /v1/sync`,
    /// over HTTP/1.1 and over HTTP/2.
    pub async fn wire(&mut self) -> anyhow::Result<()> {
        for http2 in [false, true] {
            self.wire_with(http2).await?;
        }
        Ok(())
    }

    async fn wire_with(&mut self, http2: bool) -> anyhow::Result<()> {
        let upstream = self.url().trim_start_matches("http://").to_owned();
        let (relay, counts) = super::wire::start_relay(upstream).await?;
        let dir = tempfile::tempdir()?;
        let options = ClientOptions { server: Some(relay), http2_prior_knowledge: http2, ..Default::default() };
        let client = Client::open(dir.path().join("wire.db"), options)?;
        let entity = if http2 { "wire-2" } else { "wire-1" };
        let fields = json!({"title": "Buy milk", "done": false, "priority": 2});
        client.patch("tasks", entity, fields.as_object().cloned().unwrap_or_default())?;
        client.sync().await?;
        client.patch("tasks", entity, json!({"done": true}).as_object().cloned().unwrap_or_default())?;
        let (up0, down0) = counts.read();
        let report = client.sync().await?;
        let (up1, down1) = counts.read();
        if report.pushed != 1 {
            bail!("the wire sync pushed {} changes, expected 1", report.pushed);
        }
        let (up, down) = (up1 - up0, down1 - down0);
        let workload = if http2 { "wire, one-field edit, HTTP/2" } else { "wire, one-field edit, HTTP/1.1" };
        self.figures.push(Figure::new(
            workload,
            (up + down) as f64,
            "B",
            Some(Target::AtMost(700.0)),
            json!({"request_bytes": up, "response_bytes": down}),
        ));
        Ok(())
    }

    /// client: the first sync of a fresh replica (a `deltasync client sync`
    /// process, its RSS sampled) of a log of at least `changes` changes, the
    /// same with the log pulled page by page for comparison, then the
    /// replica's sync of an outbox of `outbox` new entities with random UUID ids.
    pub async fn client(&mut self, changes: usize, outbox: usize, batch: usize) -> anyhow::Result<()> {
        if self.entities < changes {
            self.push_new("seeding the log", changes - self.entities, batch, 1).await?;
        }
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("client.db");
        // The seeding's writes go to disk first: a server that has been
        // running has long written its pages back, and otherwise the kernel
        // writes them during the measurement, on the disk the replica uses.
        let _ = std::process::Command::new("sync").status();
        self.client_first_sync_process(&db).await?;

        // The same first sync, pulling the log page by page (what the client
        // did before it learned to start from a snapshot).
        let options = ClientOptions {
            server: Some(self.url().to_owned()),
            first_sync_snapshot_after: u64::MAX,
            ..Default::default()
        };
        let pulling = Client::open(dir.path().join("pulling.db"), options)?;
        let t = Instant::now();
        let first = pulling.sync().await?;
        let s = t.elapsed().as_secs_f64();
        drop(pulling);
        self.figures.push(Figure::new(
            "client, first sync pulling the log (comparison)",
            first.pulled as f64 / s,
            "changes/s",
            None,
            json!({"seconds": s, "pulled": first.pulled, "cursor": first.cursor, "verified": first.verified}),
        ));

        let client = Client::open(&db, ClientOptions::default())?;
        let progress = bar(outbox as u64, "client, local writes");
        let t = Instant::now();
        for start in (0..outbox).step_by(CLIENT_WRITE_BATCH) {
            let writes = (start..(start + CLIENT_WRITE_BATCH).min(outbox))
                .map(|i| LocalWrite {
                    collection: "tasks".into(),
                    entity_id: uuid_like(self.run_id, i as u64),
                    edit: WriteKind::Put(
                        json!({"title": format!("task {i}"), "done": false, "priority": i % 5, "notes": "x".repeat(120)})
                            .as_object()
                            .cloned()
                            .unwrap_or_default(),
                    ),
                })
                .collect::<Vec<_>>();
            let n = writes.len() as u64;
            client.write_batch(writes)?;
            progress.inc(n);
        }
        let writes = t.elapsed().as_secs_f64();
        progress.finish_and_clear();
        self.figures.push(Figure::new(
            format!("client, {outbox} local writes, write_batch of {CLIENT_WRITE_BATCH}"),
            outbox as f64 / writes,
            "writes/s",
            Some(Target::AtLeast(100_000.0)),
            json!({"seconds": writes, "writes": outbox, "batch": CLIENT_WRITE_BATCH}),
        ));
        let t = Instant::now();
        let pushed = client.sync().await?;
        let s = t.elapsed().as_secs_f64();
        if pushed.pushed != outbox as u64 {
            bail!("the client pushed {} changes of an outbox of {outbox}", pushed.pushed);
        }
        self.figures.push(Figure::new(
            format!("client, sync of a {outbox}-change outbox"),
            outbox as f64 / s,
            "changes/s",
            Some(Target::AtLeast(50_000.0)),
            json!({"seconds": s, "verified": pushed.verified}),
        ));
        Ok(())
    }

    /// The first sync of a fresh replica at `db`, as `deltasync client sync`
    /// runs it in a process of its own, whose RSS is sampled every 5 ms.
    async fn client_first_sync_process(&mut self, db: &std::path::Path) -> anyhow::Result<()> {
        let t = Instant::now();
        let child = std::process::Command::new(std::env::current_exe()?)
            .arg("client")
            .arg("--db")
            .arg(db)
            .args(["--server", self.url(), "sync"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting `deltasync client sync`")?;
        let sampler = RssSampler::start(child.id());
        let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
        let s = t.elapsed().as_secs_f64();
        let peak_mib = sampler.finish() as f64 / 1024.0;
        if !out.status.success() {
            bail!("`deltasync client sync` failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let report: Value = serde_json::from_slice(&out.stdout).context("reading the sync report")?;
        let count = |k: &str| report[k].as_u64().unwrap_or(0);
        if report["verified"] != json!(true) {
            bail!("the first sync was not verified: {report}");
        }
        let received = count("pulled") + count("bootstrapped");
        let details = json!({
            "seconds": s, "pulled": count("pulled"), "bootstrapped": count("bootstrapped"),
            "cursor": count("cursor"), "verified": report["verified"], "peak_rss_mib": peak_mib,
        });
        self.figures.push(Figure::new(
            "client, first sync into a fresh replica",
            received as f64 / s,
            "changes/s",
            Some(Target::AtLeast(150_000.0)),
            details.clone(),
        ));
        self.figures.push(Figure::new(
            "client, peak RSS of that first sync",
            peak_mib,
            "MiB",
            Some(Target::AtMost(150.0)),
            details,
        ));
        Ok(())
    }

    /// memory: each server's peak RSS over the whole run (VmHWM); the figure is the highest.
    pub fn memory(&mut self) {
        if self.server_pids.is_empty() {
            return;
        }
        let peaks: Vec<f64> =
            self.server_pids.iter().map(|&pid| proc_status_kib(pid, "VmHWM:") as f64 / 1024.0).collect();
        let peak = peaks.iter().copied().fold(0.0, f64::max);
        let label = match peaks.len() {
            1 => String::from("server peak RSS, whole run"),
            n => format!("server peak RSS, whole run (max of {n})"),
        };
        self.figures.push(Figure::new(
            label,
            peak,
            "MiB",
            Some(Target::AtMost(100.0)),
            json!({"per_instance_mib": peaks}),
        ));
    }
}

/// An id shaped like a random (version 4) UUID, different for every `(run, i)`:
/// the ids real clients send, which do not arrive in key order.
fn uuid_like(run: u64, i: u64) -> String {
    let mut x = run ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (a, b) = (next(), next());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}
