//! Validated names: every identifier that crosses the wire is checked once, here.
//!
//! The rules come from the protocol (§1, §3, §6):
//! - collection and device id: 1–64 characters of `[A-Za-z0-9_.-]`;
//! - entity id: 1–256 characters, no control characters;
//! - change id: 1–64 characters, no control characters;
//! - user id (the token's `sub`): 1–128 characters, no control characters.
//!
//! Lengths count Unicode code points; control characters are those of Unicode
//! category Cc.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a name was refused. The message names the rule that was broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty or longer than its maximum (caller's fault).
    #[error("{what} must be 1 to {max} characters long, got {len}")]
    Length {
        /// Which kind of name.
        what: &'static str,
        /// The maximum length in code points.
        max: usize,
        /// The length that was given.
        len: usize,
    },
    /// The name contains a character it may not hold (caller's fault).
    #[error("{what} may only contain {allowed}; found {found:?}")]
    Character {
        /// Which kind of name.
        what: &'static str,
        /// The allowed characters, in words.
        allowed: &'static str,
        /// The first offending character.
        found: char,
    },
}

/// Is `c` a control character (Unicode category Cc)?
pub fn is_control(c: char) -> bool {
    c.is_control()
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// Checks a `[A-Za-z0-9_.-]{1,max}` name.
pub(crate) fn check_name(what: &'static str, s: &str, max: usize) -> Result<(), NameError> {
    // All allowed characters are ASCII, so byte length equals code points when valid.
    if let Some(found) = s.chars().find(|c| !is_name_char(*c)) {
        return Err(NameError::Character { what, allowed: "letters A-Z a-z, digits, '_', '.' and '-'", found });
    }
    if s.is_empty() || s.len() > max {
        return Err(NameError::Length { what, max, len: s.len() });
    }
    Ok(())
}

/// Checks a free-form name of 1..=max code points without control characters.
pub(crate) fn check_text(what: &'static str, s: &str, max: usize) -> Result<(), NameError> {
    let mut len = 0usize;
    for c in s.chars() {
        if is_control(c) {
            return Err(NameError::Character { what, allowed: "characters other than control characters", found: c });
        }
        len += 1;
    }
    if len == 0 || len > max {
        return Err(NameError::Length { what, max, len });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $check:ident, $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The longest value allowed, in code points.
            pub const MAX_LEN: usize = $max;

            /// Validates `s` and wraps it.
            pub fn parse(s: impl Into<String>) -> Result<Self, NameError> {
                let s = s.into();
                $check($what, &s, $max)?;
                Ok(Self(s))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The name as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A collection name: 1–64 characters of `[A-Za-z0-9_.-]`.
    Collection, "collection", check_name, 64
);
name_type!(
    /// A device id: 1–64 characters of `[A-Za-z0-9_.-]`, made once by the client and kept.
    DeviceId, "device_id", check_name, 64
);
name_type!(
    /// An entity id: 1–256 characters, no control characters.
    EntityId, "entity_id", check_text, 256
);
name_type!(
    /// A change id, the idempotency key of a change: 1–64 characters, no control characters.
    ChangeId, "change_id", check_text, 64
);
name_type!(
    /// A user id (the `sub` of a token; `local` without auth): 1–128 characters, no control characters.
    UserId, "user id", check_text, 128
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_rules() {
        assert!(Collection::parse("tasks").is_ok());
        assert!(Collection::parse("a.b-c_D9").is_ok());
        assert!(Collection::parse("").is_err());
        assert!(Collection::parse("x".repeat(64)).is_ok());
        assert!(Collection::parse("x".repeat(65)).is_err());
        assert!(Collection::parse("has space").is_err());
        assert!(Collection::parse("é").is_err());
    }

    #[test]
    fn entity_id_counts_code_points_and_refuses_controls() {
        assert!(EntityId::parse("é".repeat(256)).is_ok());
        assert!(EntityId::parse("é".repeat(257)).is_err());
        assert!(EntityId::parse("a\u{0}b").is_err());
        assert!(EntityId::parse("a\u{85}b").is_err());
        assert!(EntityId::parse("a b/c").is_ok());
    }

    #[test]
    fn serde_validates() {
        let ok: Result<DeviceId, _> = serde_json::from_str("\"phone-1\"");
        assert!(ok.is_ok());
        let bad: Result<DeviceId, _> = serde_json::from_str("\"phone 1\"");
        assert!(bad.is_err());
    }
}
