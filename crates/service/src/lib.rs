//! The services built on the `pidring` executor: the daemon (NDJSON over a
//! Unix socket, Prometheus), the Nagios 4 worker and the mod_gearman worker.
//! Each protocol has its own module; the `pidring` binary (`main.rs`,
//! `cli/`) is a thin layer over them.

pub mod daemon;
pub mod gearman;
pub mod nagios;
mod readbuf;
#[cfg(test)]
mod test_support;
