//! mod_gearman worker: take host and service checks (and event handlers,
//! notifications) from gearmand queues in mod_gearman's format, run them
//! through pidring, and queue each result to the core's result queue
//! (`pidring gearman-worker`, or the daemon's `[gearman]` section).

pub mod checks;
pub mod config;
pub mod dup;
pub mod job;
pub mod packet;
pub mod worker;

pub use config::GearmanConfig;
pub use job::{Answer, Crypt, Job, JobError};
pub use worker::{
    GearmanError, GearmanStatsHandle, GearmanStatsSnapshot, GearmanWorkers, spawn_workers,
};
