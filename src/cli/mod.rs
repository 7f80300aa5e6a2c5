//! Subcommands of the `pidring` binary.

pub mod logging;
pub mod run;
