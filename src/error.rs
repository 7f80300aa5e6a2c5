//! Typed errors of the library.

use crate::cmdline::CommandLineError;
use std::io;
use thiserror::Error;

/// Why a check was refused before it ran.
#[derive(Debug, Clone, Error)]
pub enum CheckError {
    /// No program to run.
    #[error("empty command: a check needs at least a program to run")]
    EmptyArgv,
    /// A timeout below [`crate::check::MIN_TIMEOUT`] (zero included): the
    /// check would be killed as it starts, and reported as "timed out after
    /// 0ms".
    #[error("timeout must be at least 1ms")]
    TimeoutTooShort,
    /// A timeout, grace or drain beyond `check::MAX_DURATION`.
    #[error("{0} is too long (at most 365 days)")]
    TooLong(&'static str),
    /// C strings cannot hold NUL.
    #[error("{0} contains a NUL byte")]
    NulByte(&'static str),
    /// An environment variable name that is empty or holds `=`.
    #[error("invalid environment variable name {0:?}")]
    BadEnvName(String),
    /// The Nagios command line could not be split.
    #[error("bad command line: {0}")]
    CommandLine(CommandLineError),
    /// A cap (`memory_max`, `pids_max`, `cpu_max`) this executor cannot
    /// enforce (no cgroup containment, or no such controller), or out of
    /// the kernel's range: the check is not run uncapped.
    #[error("{0}")]
    Cap(String),
}

/// Why the executor did not accept a check. A rejected check gets no result.
#[derive(Debug, Clone, Error)]
pub enum SubmitError {
    /// The check itself is invalid.
    #[error("invalid check: {0}")]
    Invalid(#[from] CheckError),
    /// Every running slot is taken and the waiting queue is at its limit.
    #[error(
        "queue full: {running} checks running and {queued} queued (limit {limit}); retry later"
    )]
    QueueFull {
        /// Checks running now.
        running: usize,
        /// Checks waiting now.
        queued: usize,
        /// The queue limit.
        limit: usize,
    },
    /// The executor is stopping and accepts nothing new.
    #[error("executor is shutting down")]
    ShuttingDown,
}

/// Why an executor could not be built.
#[derive(Debug, Error)]
pub enum ExecutorError {
    /// The requested backend could not be set up.
    #[error("cannot set up the {backend} backend: {source}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// What the kernel said.
        source: io::Error,
    },
    /// Any other resource the executor needs (eventfd, /dev/null, threads).
    #[error("cannot start executor: {what}: {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// What the kernel said.
        source: io::Error,
    },
}

/// Why an operator's policy (`user`, `group`, `allowed_users`) cannot be used.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// No such user in the user database.
    #[error("no user {0:?} in the user database (getpwnam)")]
    NoSuchUser(String),
    /// No such group in the group database.
    #[error("no group {0:?} in the group database (getgrnam)")]
    NoSuchGroup(String),
    /// The database could not be read.
    #[error("cannot look up {what}: {source}")]
    Lookup {
        /// What was looked up.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
    /// Only root can run checks as another user.
    #[error(
        "cannot run checks as {user:?} (uid {uid}): this process runs as uid {euid}, not root; \
         start it as root, or as {user:?} itself, or remove the setting"
    )]
    NotRoot {
        /// The configured user.
        user: String,
        /// Its uid.
        uid: u32,
        /// This process's effective uid.
        euid: u32,
    },
}

/// Why a check was refused by the operator's policy (the protocol's
/// `forbidden`): its program is not in `allowed_commands`, or the user it
/// asks for is not in `allowed_users`. The text names which, and the key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct Forbidden(pub String);
