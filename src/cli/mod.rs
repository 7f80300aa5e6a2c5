//! Subcommands of the `pidring` binary.

pub mod logging;
pub mod nagios_worker;
pub mod run;
