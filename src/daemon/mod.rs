//! `pidring daemon`: a long-lived executor service on a Unix socket.
//!
//! Clients send newline-delimited JSON requests ([`protocol`]); every accepted
//! submit gets exactly one `result` line, in completion order, matched by the
//! client's id. The daemon is a child subreaper, so descendants that escape
//! their check are reaped too. SIGTERM/SIGINT drain in-flight checks for a
//! bounded time, then kill, reap and answer the rest, and exit 0.

pub mod config;
pub mod prometheus;
pub mod protocol;
mod server;

pub use config::{DaemonConfig, default_socket_path};

use crate::error::ExecutorError;
use std::io;
use std::path::PathBuf;
use thiserror::Error;

/// Why the daemon could not start (or stopped abnormally).
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The configuration file is not valid.
    #[error("invalid config file {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A configuration value is not valid.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The socket's directory is controlled by someone else.
    #[error("{0}")]
    UnsafeDirectory(String),
    /// Another daemon answers on the socket.
    #[error(
        "another pidring daemon is already listening on {path}; stop it first, or pass --socket to use another path"
    )]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something that is not a socket sits where the socket should go.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A socket-related system call failed.
    #[error("cannot {what} {path}: {source}")]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// What the kernel said.
        source: io::Error,
    },
    /// The executor could not start.
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    /// The Prometheus endpoint could not be bound.
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The Nagios worker connections could not start.
    #[error(transparent)]
    Nagios(#[from] crate::nagios::NagiosError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
}

/// Run the daemon until SIGTERM or SIGINT; returns after a clean shutdown.
pub fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    config.validate().map_err(DaemonError::Invalid)?;
    server::run(config)
}
