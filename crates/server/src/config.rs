//! Server configuration: the TOML file of §9 and its defaults.

use std::collections::BTreeMap;
use std::path::Path;

use deltasync_protocol::Policy;
use deltasync_protocol::ids::Collection;
use deltasync_protocol::wire::Policies;
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

/// The limits and merge rules the server enforces.
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_clock_drift_ms: 300_000,
            max_batch: 1000,
            max_body_bytes: 8 * 1024 * 1024,
            max_data_bytes: 256 * 1024,
        }
    }
}

/// Everything the configuration file sets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// Limits.
    pub limits: Limits,
    /// The merge policies.
    pub policies: Policies,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    collections: BTreeMap<String, CollectionSection>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    default_policy: Option<Policy>,
    max_clock_drift_ms: Option<u64>,
    max_batch: Option<usize>,
    max_body_bytes: Option<usize>,
    max_data_bytes: Option<usize>,
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
        };
        for (name, v) in [
            ("max_batch", limits.max_batch),
            ("max_body_bytes", limits.max_body_bytes),
            ("max_data_bytes", limits.max_data_bytes),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        let mut collections = BTreeMap::new();
        for (name, section) in file.collections {
            Collection::parse(name.as_str())
                .map_err(|e| ConfigError::Invalid(format!("collection name {name:?}: {e}")))?;
            collections.insert(name, section.policy);
        }
        Ok(Config { limits, policies: Policies { default: s.default_policy.unwrap_or_default(), collections } })
    }
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
        assert_eq!(c.limits, Limits { max_clock_drift_ms: 5, max_batch: 2, max_body_bytes: 3, max_data_bytes: 4 });
    }

    #[test]
    fn refuses_typos_and_bad_values() {
        assert!(Config::parse("[server]\nmax_bach = 2\n").is_err());
        assert!(Config::parse("[collections.notes]\npolicy = \"newest\"\n").is_err());
        assert!(Config::parse("[collections.\"bad name\"]\npolicy = \"entity\"\n").is_err());
        assert!(Config::parse("[server]\nmax_batch = 0\n").is_err());
    }
}
