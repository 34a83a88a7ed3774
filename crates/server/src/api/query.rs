//! Query-string parameters, with the protocol's defaults, clamps and 400s.

use std::collections::HashMap;

use super::ApiError;

/// Parsed query parameters (the first value of each name wins).
pub struct Query(HashMap<String, String>);

impl Query {
    /// Parses a raw query string.
    pub fn parse(raw: Option<&str>) -> Result<Query, ApiError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
            .map_err(|e| ApiError::invalid(format!("the query string is malformed: {e}")))?;
        let mut map = HashMap::new();
        for (k, v) in pairs {
            map.entry(k).or_insert(v);
        }
        Ok(Query(map))
    }

    /// A string parameter.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A non-negative integer parameter, `default` when absent.
    pub fn u64(&self, name: &str, default: u64) -> Result<u64, ApiError> {
        match self.0.get(name) {
            None => Ok(default),
            Some(v) => parse_u64(name, v),
        }
    }

    /// A positive integer parameter, clamped to `max`.
    pub fn limit(&self, name: &str, default: u64, max: u64) -> Result<u64, ApiError> {
        let v = self.u64(name, default)?;
        check_limit(name, v, max)
    }
}

/// Parses a non-negative integer, answering 400 otherwise.
pub fn parse_u64(name: &str, v: &str) -> Result<u64, ApiError> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::invalid(format!("{name} must be a non-negative integer, got {v:?}")));
    }
    // All digits: a value past u64 is simply "above every maximum" (clamped, or past the head).
    Ok(v.parse().unwrap_or(u64::MAX))
}

/// Refuses a zero limit and clamps a large one.
pub fn check_limit(name: &str, v: u64, max: u64) -> Result<u64, ApiError> {
    if v == 0 {
        return Err(ApiError::invalid(format!("{name} must be at least 1")));
    }
    Ok(v.min(max))
}
