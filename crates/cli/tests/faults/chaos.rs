//! The servers of a fault run and the faults done to them: each server sits
//! behind a [`FaultProxy`] whose URL stays put while the server is killed
//! with SIGKILL and restarted on a new port; the PostgreSQL cluster may be
//! restarted under them. Every outage is recorded, so that measurements
//! taken during one can be told apart.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::proxy::{FaultMix, FaultProxy, Partition};
use super::rng::Rng;
use crate::common::pg_cluster::PgCluster;
use crate::common::{Backend, Options, Server};

/// A time some servers could not serve.
#[derive(Debug, Clone)]
pub struct Outage {
    /// The servers out (indexes into [`Cluster::servers`]).
    pub servers: Vec<usize>,
    /// When it began.
    pub start: Instant,
    /// When the servers answered again (`None` while it lasts).
    pub end: Option<Instant>,
    /// What it was, for the summary.
    pub what: String,
}

/// The outages of a run, shared with whoever measures.
#[derive(Debug, Clone, Default)]
pub struct Outages(Arc<Mutex<Vec<Outage>>>);

impl Outages {
    /// Records the start of an outage of `servers`; returns its index.
    pub fn begin(&self, servers: Vec<usize>, what: String) -> usize {
        let mut list = self.0.lock().unwrap();
        list.push(Outage { servers, start: Instant::now(), end: None, what });
        list.len() - 1
    }

    /// Records the end of outage `i`.
    pub fn end(&self, i: usize) {
        self.0.lock().unwrap()[i].end = Some(Instant::now());
    }

    /// Whether the interval `from..to` overlaps an outage of `server`,
    /// widened by `settle` after its end (a restarted server's first answers).
    pub fn overlaps(&self, server: usize, from: Instant, to: Instant, settle: Duration) -> bool {
        self.0
            .lock()
            .unwrap()
            .iter()
            .any(|o| o.servers.contains(&server) && o.start <= to && o.end.is_none_or(|end| from <= end + settle))
    }

    /// Every outage so far.
    pub fn list(&self) -> Vec<Outage> {
        self.0.lock().unwrap().clone()
    }
}

/// The servers of a run, each behind a fault proxy.
pub struct Cluster {
    /// The `deltasync serve` processes (two share one PostgreSQL database).
    pub servers: Vec<Server>,
    /// One fault proxy per server: the devices' way in.
    pub proxies: Vec<Arc<FaultProxy>>,
    /// A proxy without faults in front of server 0, for the probe of another user.
    pub clean: Arc<FaultProxy>,
    /// The outages so far.
    pub outages: Outages,
    /// The local PostgreSQL cluster, when this run may restart it.
    pub pg: Option<PgCluster>,
    /// Whether the PostgreSQL restart was done.
    pub pg_restarted: bool,
    /// How many times a server was killed.
    pub kills: u64,
    /// How many partitions there were.
    pub partitions: u64,
}

impl Cluster {
    /// Starts `count` servers with `config` and `--auth jwt` (one fresh store;
    /// every further server shares the first one's database) and their proxies.
    pub fn start(backend: &Backend, count: usize, config: &str, secret: &str, rng: &mut Rng) -> Cluster {
        let opts =
            Options { config: Some(config.to_owned()), jwt_secret: Some(secret.to_owned()), ..Options::default() };
        let first = Server::start_with(backend, opts.clone());
        let mut servers = vec![first];
        for _ in 1..count {
            let database = Some(servers[0].database.clone());
            servers.push(Server::start_with(backend, Options { database, ..opts.clone() }));
        }
        let proxies = servers.iter().map(|s| Arc::new(FaultProxy::start(&s.url, rng.next_u64()))).collect();
        let clean = Arc::new(FaultProxy::start(&servers[0].url, rng.next_u64()));
        let pg = if backend.is_postgres() && crate::common::pg_cluster::restart_allowed() {
            let cluster = PgCluster::local();
            if cluster.is_none() {
                eprintln!("PostgreSQL restart fault skipped: pg_lsclusters shows no online cluster");
            }
            cluster
        } else {
            None
        };
        Cluster {
            servers,
            proxies,
            clean,
            outages: Outages::default(),
            pg,
            pg_restarted: false,
            kills: 0,
            partitions: 0,
        }
    }

    /// The proxies' URLs, which devices use.
    pub fn urls(&self) -> Vec<String> {
        self.proxies.iter().map(|p| p.url().to_owned()).collect()
    }

    /// Kills server `i` with SIGKILL, waits `down`, restarts it and points its proxies at it.
    pub fn kill_and_restart(&mut self, i: usize, down: Duration) {
        let outage = self.outages.begin(vec![i], format!("server {i} killed for {down:?}"));
        self.servers[i].kill();
        self.kills += 1;
        std::thread::sleep(down);
        self.servers[i].restart();
        self.proxies[i].set_target(&self.servers[i].url);
        if i == 0 {
            self.clean.set_target(&self.servers[0].url);
        }
        self.wait_healthy(&[i]);
        self.outages.end(outage);
    }

    /// Stops the PostgreSQL cluster for `down`, starts it again, and waits until every server answers.
    pub fn restart_postgres(&mut self, down: Duration) {
        let Some(pg) = self.pg.clone() else { return };
        let all: Vec<usize> = (0..self.servers.len()).collect();
        let outage = self.outages.begin(all.clone(), format!("PostgreSQL stopped for {down:?}"));
        pg.stop();
        std::thread::sleep(down);
        pg.start();
        self.pg_restarted = true;
        self.wait_healthy(&all);
        self.outages.end(outage);
    }

    /// Waits (at most 60 s) until `/healthz` of each server answers 200.
    pub fn wait_healthy(&self, servers: &[usize]) {
        for &i in servers {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if healthy(&self.servers[i].url) {
                    break;
                }
                assert!(Instant::now() < deadline, "server {i} did not answer /healthz within 60 s after a fault");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Ends every network fault.
    pub fn calm(&self) {
        for p in &self.proxies {
            p.calm();
        }
    }

    /// Runs faults until `until`: every 0.5–2.5 s one of a new fault mix on a
    /// proxy, a partition of a proxy for 0.3–2.5 s, a SIGKILL of a server
    /// (down 0.2–1.5 s), or calm; and once, at a drawn time in the middle of
    /// the run, a PostgreSQL restart when this run may do one. At least one
    /// server is killed in every run.
    pub fn run_faults(&mut self, rng: &mut Rng, until: Instant) {
        let started = Instant::now();
        let total = until.saturating_duration_since(started);
        let pg_at = started + total.mul_f64(0.3 + rng.below(300) as f64 / 1000.0);
        let kill_by = started + total.mul_f64(0.5);
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(rng.between(500, 2500)));
            if self.pg.is_some() && !self.pg_restarted && Instant::now() >= pg_at {
                self.calm();
                self.restart_postgres(Duration::from_millis(rng.between(1000, 2500)));
                continue;
            }
            let forced_kill = self.kills == 0 && Instant::now() >= kill_by;
            let fault = if forced_kill { 2 } else { rng.weighted(&[40, 20, 8, 25]) };
            let i = rng.below(self.proxies.len() as u64) as usize;
            match fault {
                0 => self.proxies[i].set_mix(FaultMix {
                    latency_ms: (0, rng.between(0, 60)),
                    drop_per_mille: rng.between(0, 120),
                    reset_per_mille: rng.between(0, 120),
                }),
                1 => {
                    let kind = if rng.chance(500) { Partition::Refuse } else { Partition::Stall };
                    self.proxies[i].partition(kind);
                    self.partitions += 1;
                    std::thread::sleep(Duration::from_millis(rng.between(300, 2500)));
                    self.proxies[i].heal();
                }
                2 => self.kill_and_restart(i, Duration::from_millis(rng.between(200, 1500))),
                _ => self.calm(),
            }
        }
        self.calm();
    }
}

impl Drop for Cluster {
    /// Kills the servers last first, so the one that made the PostgreSQL schema drops it when no other uses it.
    fn drop(&mut self) {
        for server in self.servers.iter_mut().rev() {
            server.kill();
        }
    }
}

/// Whether the server at `url` answers `GET /healthz` with 200 within 2 s.
pub fn healthy(url: &str) -> bool {
    let Ok(addr) = url.trim_start_matches("http://").trim_end_matches('/').parse() else { return false };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = "GET /healthz HTTP/1.1\r\nHost: deltasync\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}
