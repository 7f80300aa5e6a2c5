//! Subcommands of the `pidring` binary.

pub mod client;
pub mod common;
pub mod daemon;
pub mod gearman_worker;
pub mod logging;
pub mod nagios_worker;
pub mod run;
