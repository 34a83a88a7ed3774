//! The decisions every store makes the same way, whatever its database.
//!
//! A store reads and writes rows; everything it decides about them lives
//! here, once, so that SQLite and PostgreSQL cannot drift apart: when a
//! cursor calls for a bootstrap ([`reset`]), which rows a page of the log or
//! of conflicts covers ([`crate::store::page`], [`conflicts`]), how a push
//! goes from what was loaded to what is written ([`push`]), which migrations
//! run ([`migrations`]), when entity states and receipts pending in commit
//! order are folded into their tables ([`pending`]), how a bootstrap hands over its head and lines
//! ([`bootstrap`]), and how far compaction may drop the log ([`compact`]).

pub mod bootstrap;
pub mod compact;
pub mod conflicts;
pub mod migrations;
pub mod pending;
pub mod push;
pub mod reset;
pub mod users;
