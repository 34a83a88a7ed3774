//! One module per command.

pub mod serve;
pub mod token;
