//! Server configuration: the TOML file of §9 and its defaults.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use deltasync_protocol::ids::Collection;
use deltasync_protocol::wire::Policies;
use deltasync_protocol::{ChangeLimits, Policy, json};
use serde::Deserialize;

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, from the TOML parser.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("config: {0}")]
    Invalid(String),
}

/// Why a duration (`30s`, `15m`, `24h`, `7d`) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// Not an integer followed by one of the units (the caller's fault).
    #[error("a duration must be an integer followed by s, m, h or d (e.g. 30s, 15m, 24h, 7d), got {0:?}")]
    Syntax(String),
    /// Too long to count in seconds (the caller's fault).
    #[error("the duration {0:?} is too long")]
    TooLong(String),
}

/// Parses `30s`, `15m`, `24h`, `7d` (an integer and one unit; `0s` is zero):
/// the syntax of `deltasync token --ttl` and of the duration keys of the file.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let (digits, unit) = s.split_at(s.len().saturating_sub(1));
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DurationError::Syntax(s.to_owned()));
    }
    let n: u64 = digits.parse().map_err(|_| DurationError::TooLong(s.to_owned()))?;
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(DurationError::Syntax(s.to_owned())),
    };
    n.checked_mul(factor).map(Duration::from_secs).ok_or_else(|| DurationError::TooLong(s.to_owned()))
}

/// When the change log is compacted (see `docs/protocol.md`, "Compaction").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    /// A change may leave the log once it is this old and every active device has pulled past it.
    pub compact_after: Duration,
    /// A device not seen for this long stops holding back compaction (it heals by bootstrap when it returns).
    pub device_expiry: Duration,
    /// How often `deltasync serve` runs a compaction pass in the background.
    pub compact_interval: Duration,
}

impl Default for Compaction {
    fn default() -> Self {
        Compaction {
            compact_after: Duration::from_secs(30 * 86_400),
            device_expiry: Duration::from_secs(90 * 86_400),
            compact_interval: Duration::from_secs(3600),
        }
    }
}

impl Compaction {
    /// The rules of a pass that runs at `now` (ms since the Unix epoch).
    pub fn rules(&self, now: u64) -> crate::store::core::compact::CompactRules {
        crate::store::core::compact::CompactRules {
            now,
            compact_after: self.compact_after,
            device_expiry: self.device_expiry,
        }
    }
}

/// The most bootstraps an instance may stream at once: each holds one of the
/// 16 PostgreSQL connections (or 32 SQLite readers) while it streams.
pub const MAX_BOOTSTRAPS_CEILING: usize = 12;

/// The limits on what one request may carry or ask for (protocol §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// How far ahead of the server's clock an HLC may be, in ms.
    pub max_clock_drift_ms: u64,
    /// The most changes per push or sync.
    pub max_batch: usize,
    /// The largest request body, in bytes.
    pub max_body_bytes: usize,
    /// The largest `data` of one change, in bytes of its canonical form.
    pub max_data_bytes: usize,
    /// The deepest nesting of one change's `data` (see `deltasync_protocol::json::depth`).
    pub max_depth: usize,
    /// The most bytes of changes one pull or sync page carries (at least one change is always served).
    pub max_page_bytes: usize,
    /// The most bootstraps streaming at once, over all users.
    pub max_bootstraps: usize,
    /// The most bootstraps streaming at once for one user.
    pub max_bootstraps_per_user: usize,
    /// The most live connections (`GET /v1/live`) one user may hold open at once.
    pub max_live_per_user: usize,
}

impl Limits {
    /// The bounds a change's `data` must keep.
    pub fn change_limits(&self) -> ChangeLimits {
        ChangeLimits { max_data_bytes: self.max_data_bytes, max_depth: self.max_depth }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_clock_drift_ms: 300_000,
            max_batch: 1000,
            max_body_bytes: 8 * 1024 * 1024,
            max_data_bytes: 256 * 1024,
            max_depth: json::DEFAULT_MAX_DEPTH,
            max_page_bytes: 4 * 1024 * 1024,
            max_bootstraps: 8,
            max_bootstraps_per_user: 2,
            max_live_per_user: 16,
        }
    }
}

/// Bounds on connections and the deadlines of their reads and writes, so
/// that no client can hold the server's sockets, memory or time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// The most connections open at once; past it, new connections are closed at once.
    pub max_connections: usize,
    /// How long a client may take to send a request's header, from the connection's
    /// start or from the first byte of a later request.
    pub header_read_timeout: Duration,
    /// How long an idle connection (no request in progress) is kept open between requests.
    pub keep_alive_timeout: Duration,
    /// How long a request body may take, before the extension that `body_min_bytes_per_sec` adds.
    pub body_read_timeout: Duration,
    /// Every this many bytes of body received extend the body's deadline by one second.
    pub body_min_bytes_per_sec: u64,
    /// How long an answer may wait for the client to read it before the connection is closed.
    pub write_timeout: Duration,
    /// How long shutdown lets in-flight requests finish before closing what is left.
    pub shutdown_grace: Duration,
    /// How often a live connection is pinged; one that answers nothing for
    /// two of these is closed as dead.
    pub live_ping_interval: Duration,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(30),
            body_min_bytes_per_sec: 16 * 1024,
            write_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            live_ping_interval: Duration::from_secs(30),
        }
    }
}

/// Everything the configuration file sets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// Limits on requests.
    pub limits: Limits,
    /// Limits on connections.
    pub network: Network,
    /// Request rates and waiting polls per user (the `[limits]` section).
    pub rate: crate::rate::RateLimits,
    /// The merge policies.
    pub policies: Policies,
    /// When the log is compacted.
    pub compaction: Compaction,
    /// CORS and static files, from `deltasync serve --cors-origin` and `--static` (not the file).
    pub web: crate::web::Web,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    collections: BTreeMap<String, CollectionSection>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    requests_per_second: Option<u32>,
    burst: Option<u32>,
    max_waiting_polls: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    default_policy: Option<Policy>,
    max_clock_drift_ms: Option<u64>,
    max_batch: Option<usize>,
    max_body_bytes: Option<usize>,
    max_data_bytes: Option<usize>,
    max_depth: Option<usize>,
    max_page_bytes: Option<usize>,
    max_bootstraps: Option<usize>,
    max_bootstraps_per_user: Option<usize>,
    max_live_per_user: Option<usize>,
    max_connections: Option<usize>,
    header_read_timeout_secs: Option<u64>,
    keep_alive_timeout_secs: Option<u64>,
    body_read_timeout_secs: Option<u64>,
    body_min_bytes_per_sec: Option<u64>,
    write_timeout_secs: Option<u64>,
    shutdown_grace_secs: Option<u64>,
    live_ping_secs: Option<u64>,
    compact_after: Option<String>,
    device_expiry: Option<String>,
    compact_interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CollectionSection {
    policy: Policy,
}

impl Config {
    /// Reads and checks a TOML configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.display().to_string(), message },
            other => other,
        })
    }

    /// Parses and checks TOML configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let file: FileConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: String::new(), message: e.to_string() })?;
        let d = Limits::default();
        let s = file.server;
        let limits = Limits {
            max_clock_drift_ms: s.max_clock_drift_ms.unwrap_or(d.max_clock_drift_ms),
            max_batch: s.max_batch.unwrap_or(d.max_batch),
            max_body_bytes: s.max_body_bytes.unwrap_or(d.max_body_bytes),
            max_data_bytes: s.max_data_bytes.unwrap_or(d.max_data_bytes),
            max_depth: s.max_depth.unwrap_or(d.max_depth),
            max_page_bytes: s.max_page_bytes.unwrap_or(d.max_page_bytes),
            max_bootstraps: s.max_bootstraps.unwrap_or(d.max_bootstraps),
            max_bootstraps_per_user: s.max_bootstraps_per_user.unwrap_or(d.max_bootstraps_per_user),
            max_live_per_user: s.max_live_per_user.unwrap_or(d.max_live_per_user),
        };
        let n = Network::default();
        let secs = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_secs);
        let network = Network {
            max_connections: s.max_connections.unwrap_or(n.max_connections),
            header_read_timeout: secs(s.header_read_timeout_secs, n.header_read_timeout),
            keep_alive_timeout: secs(s.keep_alive_timeout_secs, n.keep_alive_timeout),
            body_read_timeout: secs(s.body_read_timeout_secs, n.body_read_timeout),
            body_min_bytes_per_sec: s.body_min_bytes_per_sec.unwrap_or(n.body_min_bytes_per_sec),
            write_timeout: secs(s.write_timeout_secs, n.write_timeout),
            shutdown_grace: secs(s.shutdown_grace_secs, n.shutdown_grace),
            live_ping_interval: secs(s.live_ping_secs, n.live_ping_interval),
        };
        let r = crate::rate::RateLimits::default();
        let rate = crate::rate::RateLimits {
            requests_per_second: file.limits.requests_per_second.unwrap_or(r.requests_per_second),
            burst: file.limits.burst.unwrap_or(r.burst),
            max_waiting_polls: file.limits.max_waiting_polls.unwrap_or(r.max_waiting_polls),
        };
        for (name, v) in [
            ("requests_per_second", u64::from(rate.requests_per_second)),
            ("burst", u64::from(rate.burst)),
            ("max_waiting_polls", rate.max_waiting_polls as u64),
            ("max_batch", limits.max_batch as u64),
            ("max_body_bytes", limits.max_body_bytes as u64),
            ("max_data_bytes", limits.max_data_bytes as u64),
            ("max_depth", limits.max_depth as u64),
            ("max_page_bytes", limits.max_page_bytes as u64),
            ("max_bootstraps", limits.max_bootstraps as u64),
            ("max_bootstraps_per_user", limits.max_bootstraps_per_user as u64),
            ("max_live_per_user", limits.max_live_per_user as u64),
            ("live_ping_secs", network.live_ping_interval.as_secs()),
            ("max_connections", network.max_connections as u64),
            ("header_read_timeout_secs", network.header_read_timeout.as_secs()),
            ("keep_alive_timeout_secs", network.keep_alive_timeout.as_secs()),
            ("body_read_timeout_secs", network.body_read_timeout.as_secs()),
            ("body_min_bytes_per_sec", network.body_min_bytes_per_sec),
            ("write_timeout_secs", network.write_timeout.as_secs()),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if limits.max_bootstraps > MAX_BOOTSTRAPS_CEILING {
            return Err(ConfigError::Invalid(format!(
                "max_bootstraps is {}, but each bootstrap holds a database connection while it streams and \
                 the rest of the server needs some: max_bootstraps must be at most {MAX_BOOTSTRAPS_CEILING}",
                limits.max_bootstraps
            )));
        }
        let deepest = json::CLIENT_PARSE_DEPTH - json::ENVELOPE_DEPTH;
        if limits.max_depth > deepest {
            return Err(ConfigError::Invalid(format!(
                "max_depth is {}, but answers wrap data in up to {} more levels and clients parse at most {}: \
                 max_depth must be at most {deepest}",
                limits.max_depth,
                json::ENVELOPE_DEPTH,
                json::CLIENT_PARSE_DEPTH
            )));
        }
        let compaction = compaction(&s)?;
        let mut collections = BTreeMap::new();
        for (name, section) in file.collections {
            Collection::parse(name.as_str())
                .map_err(|e| ConfigError::Invalid(format!("collection name {name:?}: {e}")))?;
            collections.insert(name, section.policy);
        }
        Ok(Config {
            limits,
            network,
            rate,
            policies: Policies { default: s.default_policy.unwrap_or_default(), collections },
            compaction,
            web: Default::default(),
        })
    }
}

/// The compaction keys of `[server]`, with their defaults.
fn compaction(s: &ServerSection) -> Result<Compaction, ConfigError> {
    let d = Compaction::default();
    let read = |name: &str, v: &Option<String>, default: Duration| match v {
        None => Ok(default),
        Some(v) => parse_duration(v).map_err(|e| ConfigError::Invalid(format!("{name}: {e}"))),
    };
    let c = Compaction {
        compact_after: read("compact_after", &s.compact_after, d.compact_after)?,
        device_expiry: read("device_expiry", &s.device_expiry, d.device_expiry)?,
        compact_interval: read("compact_interval", &s.compact_interval, d.compact_interval)?,
    };
    if c.compact_interval.is_zero() {
        return Err(ConfigError::Invalid(
            "compact_interval must be at least 1s (to compact at once, run `deltasync compact`)".into(),
        ));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.limits.max_batch, 1000);
        assert_eq!(c.limits.max_body_bytes, 8_388_608);
        assert_eq!(c.limits.max_data_bytes, 262_144);
    }

    #[test]
    fn reads_every_key() {
        let c = Config::parse(
            "[server]\ndefault_policy = \"entity\"\nmax_clock_drift_ms = 5\nmax_batch = 2\nmax_body_bytes = 3\nmax_data_bytes = 4\n\n[collections.notes]\npolicy = \"reject\"\n",
        )
        .unwrap();
        assert_eq!(c.policies.default, Policy::Entity);
        assert_eq!(c.policies.of("notes"), Policy::Reject);
        assert_eq!(c.policies.of("other"), Policy::Entity);
        assert_eq!(
            c.limits,
            Limits { max_clock_drift_ms: 5, max_batch: 2, max_body_bytes: 3, max_data_bytes: 4, ..Limits::default() }
        );
    }

    #[test]
    fn refuses_typos_and_bad_values() {
        assert!(Config::parse("[server]\nmax_bach = 2\n").is_err());
        assert!(Config::parse("[collections.notes]\npolicy = \"newest\"\n").is_err());
        assert!(Config::parse("[collections.\"bad name\"]\npolicy = \"entity\"\n").is_err());
        assert!(Config::parse("[server]\nmax_batch = 0\n").is_err());
        assert!(Config::parse("[server]\nheader_read_timeout_secs = 0\n").is_err());
        assert!(Config::parse("[limits]\nburst = 0\n").is_err());
        assert!(Config::parse("[limits]\nrequests_per_secnd = 5\n").is_err());
    }

    #[test]
    fn reads_the_limits_section() {
        let c = Config::parse("[limits]\nrequests_per_second = 5\nburst = 7\nmax_waiting_polls = 2\n").unwrap();
        assert_eq!(c.rate, crate::rate::RateLimits { requests_per_second: 5, burst: 7, max_waiting_polls: 2 });
        assert_eq!(Config::parse("").unwrap().rate, crate::rate::RateLimits::default());
    }

    #[test]
    fn durations_take_one_unit() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        for bad in ["", "h", "10", "1.5h", "-1h", "+1h", "10w", " 1h"] {
            assert!(matches!(parse_duration(bad), Err(DurationError::Syntax(_))), "{bad}");
        }
        assert!(matches!(parse_duration("99999999999999999999d"), Err(DurationError::TooLong(_))));
        assert!(matches!(parse_duration("18446744073709551615d"), Err(DurationError::TooLong(_))));
    }

    #[test]
    fn the_example_file_shows_the_defaults() {
        let example = include_str!("../../../config.example.toml");
        assert_eq!(Config::parse(example).unwrap(), Config::default());
        for key in ["compact_after", "device_expiry", "compact_interval"] {
            assert!(example.contains(&format!("\n{key} = ")), "config.example.toml does not show {key}");
        }
    }

    #[test]
    fn reads_compaction_keys_with_their_defaults() {
        let d = Config::parse("").unwrap().compaction;
        assert_eq!(d.compact_after, Duration::from_secs(30 * 86_400));
        assert_eq!(d.device_expiry, Duration::from_secs(90 * 86_400));
        assert_eq!(d.compact_interval, Duration::from_secs(3600));
        let c = Config::parse("[server]\ncompact_after = \"0s\"\ndevice_expiry = \"2h\"\ncompact_interval = \"1m\"\n")
            .unwrap()
            .compaction;
        assert_eq!(
            (c.compact_after, c.device_expiry, c.compact_interval),
            (Duration::ZERO, Duration::from_secs(7200), Duration::from_secs(60))
        );
        let err = Config::parse("[server]\ncompact_after = \"30 days\"\n").unwrap_err().to_string();
        assert!(err.contains("compact_after") && err.contains("30s, 15m"), "{err}");
        assert!(Config::parse("[server]\ncompact_interval = \"0s\"\n").is_err());
    }

    #[test]
    fn reads_network_limits() {
        let c = Config::parse(
            "[server]\nmax_connections = 7\nheader_read_timeout_secs = 2\nkeep_alive_timeout_secs = 3\n\
             body_read_timeout_secs = 4\nbody_min_bytes_per_sec = 5\nwrite_timeout_secs = 6\nshutdown_grace_secs = 0\n\
             max_page_bytes = 8\nmax_bootstraps = 9\nmax_bootstraps_per_user = 1\nmax_depth = 10\n",
        )
        .unwrap();
        let n = &c.network;
        assert_eq!(n.max_connections, 7);
        assert_eq!(n.header_read_timeout, Duration::from_secs(2));
        assert_eq!(n.keep_alive_timeout, Duration::from_secs(3));
        assert_eq!(n.body_read_timeout, Duration::from_secs(4));
        assert_eq!(n.body_min_bytes_per_sec, 5);
        assert_eq!(n.write_timeout, Duration::from_secs(6));
        assert_eq!(n.shutdown_grace, Duration::ZERO);
        assert_eq!((c.limits.max_page_bytes, c.limits.max_bootstraps, c.limits.max_bootstraps_per_user), (8, 9, 1));
        assert_eq!(c.limits.max_depth, 10);
    }

    #[test]
    fn max_depth_leaves_room_for_the_envelope() {
        let deepest = json::CLIENT_PARSE_DEPTH - json::ENVELOPE_DEPTH;
        assert!(Config::parse(&format!("[server]\nmax_depth = {deepest}\n")).is_ok());
        let err = Config::parse(&format!("[server]\nmax_depth = {}\n", deepest + 1)).unwrap_err();
        assert!(err.to_string().contains(&format!("at most {deepest}")), "{err}");
    }

    #[test]
    fn max_bootstraps_leaves_database_connections_for_the_rest() {
        let ok = format!("[server]\nmax_bootstraps = {MAX_BOOTSTRAPS_CEILING}\n");
        assert!(Config::parse(&ok).is_ok());
        let err = Config::parse(&format!("[server]\nmax_bootstraps = {}\n", MAX_BOOTSTRAPS_CEILING + 1)).unwrap_err();
        assert!(err.to_string().contains("max_bootstraps must be at most"), "{err}");
    }
}
