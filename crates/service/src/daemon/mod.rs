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

/// Signals that stop a pidring service (the daemon, `nagios-worker`):
/// drain or cancel, kill, reap and answer, then exit. Left to their default
/// action they would end it at once, and the checks' processes, in their own
/// sessions, would run on with no one to time them out or reap them.
pub const STOP_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT];

/// Every signal a pidring service takes over: [`STOP_SIGNALS`] and
/// [`IGNORED_SIGNALS`], i.e. every one whose default action would end it.
pub fn taken_signals() -> Vec<i32> {
    STOP_SIGNALS
        .iter()
        .chain(&IGNORED_SIGNALS)
        .copied()
        .collect()
}

/// Block (`libc::SIG_BLOCK`) or unblock (`libc::SIG_UNBLOCK`) `signals` in
/// the calling thread's mask (threads it starts later inherit it); returns
/// the set, e.g. for `sigwait`.
pub fn change_signal_mask(how: libc::c_int, signals: &[i32]) -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data that sigemptyset/sigaddset initialise;
    // pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        match libc::pthread_sigmask(how, &set, std::ptr::null_mut()) {
            0 => Ok(set),
            e => Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}

/// Signals that mean nothing to a pidring service but whose default action
/// would end it just as uncleanly (a `postrotate kill -USR1`, a closed
/// terminal's SIGHUP, a stray timer signal): taken, logged and ignored.
/// Checks see them at their default again (handlers do not survive exec).
pub const IGNORED_SIGNALS: [i32; 11] = [
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGIO,
    libc::SIGPWR,
    libc::SIGSTKFLT,
    libc::SIGXCPU,
    libc::SIGXFSZ,
];

use pidring::error::ExecutorError;
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
    /// The gearman worker could not start.
    #[error(transparent)]
    Gearman(#[from] crate::gearman::GearmanError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
}

/// Run the daemon until SIGTERM or SIGINT; returns after a clean shutdown.
/// SIGHUP is logged and ignored (nothing to re-read).
pub fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    run_reloadable(config, None)
}

/// Where SIGHUP re-reads the configuration from, and what to apply over
/// the file each time (the command-line flags, which keep priority).
pub struct Reload {
    /// The TOML file.
    pub path: PathBuf,
    /// The command-line overrides.
    pub overrides: Box<dyn Fn(&mut DaemonConfig) + Send>,
}

/// [`run`], re-reading `reload`'s file on SIGHUP (see PROTOCOL.md
/// "Reload"): what can change live changes without dropping a connection
/// or a check in flight; a file that does not parse or validate is logged
/// and the running configuration kept.
pub fn run_reloadable(config: DaemonConfig, reload: Option<Reload>) -> Result<(), DaemonError> {
    config.validate().map_err(DaemonError::Invalid)?;
    server::run(config, reload)
}
