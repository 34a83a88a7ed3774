//! One module per command.

pub mod admin;
pub mod bench;
pub mod client;
pub mod compact;
pub mod database;
pub mod import;
pub mod migrate;
pub mod serve;
pub mod token;
