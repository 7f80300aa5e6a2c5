//! Nagios 4 external worker: take checks from a Nagios 4 core's query-handler
//! socket and run them through pidring (`pidring nagios-worker`, or the
//! daemon's `[nagios]` section).

pub mod codec;
pub mod config;
pub mod distribute;
pub mod routing;
pub mod worker;

pub use config::NagiosWorkerConfig;
pub use worker::{NagiosError, NagiosWorkers, WorkerStatsSnapshot, spawn_workers};
