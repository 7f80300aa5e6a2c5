//! The event backends: the few verbs the loop needs from the kernel.
//!
//! Both backends offer the same oneshot-readiness API, with identical
//! signatures (`new`, `watch`, `watch_pri`, `unwatch`, `wait`): `watch` an fd under a
//! token, `unwatch` one whose watch is still pending (before closing it), and
//! `wait` for the tokens that fired. The loop does the reads and reaps itself
//! with non-blocking syscalls, so no per-check buffer is ever lent to the
//! kernel and an idle check costs no memory beyond its fds.
//!
//! - `uring.rs`: io_uring, `IORING_OP_POLL_ADD` (oneshot) per watch; all arms
//!   and cancels of one loop turn go to the kernel in the one `io_uring_enter`
//!   that also waits, with the nearest deadline as its timeout (and, with a
//!   `Batch`, the kernel's min-wait: a few more events per wake).
//! - `epoll.rs`: `EPOLLONESHOT` registrations, for hosts where io_uring is
//!   blocked (container seccomp profiles, `kernel.io_uring_disabled`).

pub(crate) mod epoll;
pub(crate) mod uring;

use rustix::fd::BorrowedFd;
use std::io;
use std::time::Duration;

/// How long a wait may linger for more events once the first has come, so
/// that one wake handles several (each wake costs the loop a sleep and a
/// switch). Only io_uring has it (`min_wait_usec`, Linux 6.12); epoll and
/// older kernels return at the first event, as with `Batch::NONE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Batch {
    /// Return at once when this many have come.
    pub events: usize,
    /// Else return this long after the wait began, if any has come.
    pub within: Duration,
}

impl Batch {
    /// Return at the first event.
    pub const NONE: Batch = Batch {
        events: 1,
        within: Duration::ZERO,
    };
}

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum BackendKind {
    /// io_uring if it can be set up and has the opcodes we need, else epoll.
    /// The environment variable `PIDRING_BACKEND` (`io_uring` or `epoll`) overrides it.
    #[default]
    Auto,
    /// io_uring only; fail if unavailable.
    IoUring,
    /// epoll only.
    Epoll,
}

impl BackendKind {
    /// The name used in logs, stats and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::IoUring => "io_uring",
            BackendKind::Epoll => "epoll",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "auto" | "" => Ok(BackendKind::Auto),
            "io_uring" | "uring" | "iouring" => Ok(BackendKind::IoUring),
            "epoll" => Ok(BackendKind::Epoll),
            other => Err(format!(
                "unknown backend {other:?}: expected auto, io_uring or epoll"
            )),
        }
    }
}

/// A live backend.
pub(crate) enum Backend {
    /// io_uring.
    Uring(Box<uring::Uring>),
    /// epoll.
    Epoll(epoll::Epoll),
}

impl Backend {
    /// Set up the requested backend; `Auto` tries io_uring, then epoll.
    pub fn new(kind: BackendKind) -> Result<Backend, (&'static str, io::Error)> {
        let kind = match kind {
            BackendKind::Auto => match std::env::var("PIDRING_BACKEND") {
                Ok(v) if !v.is_empty() => v.parse().unwrap_or_else(|e: String| {
                    tracing::warn!("ignoring PIDRING_BACKEND: {e}");
                    BackendKind::Auto
                }),
                _ => BackendKind::Auto,
            },
            k => k,
        };
        match kind {
            BackendKind::IoUring => uring::Uring::new()
                .map(|u| Backend::Uring(Box::new(u)))
                .map_err(|e| ("io_uring", e)),
            BackendKind::Epoll => epoll::Epoll::new()
                .map(Backend::Epoll)
                .map_err(|e| ("epoll", e)),
            BackendKind::Auto => match uring::Uring::new() {
                Ok(u) => Ok(Backend::Uring(Box::new(u))),
                Err(e) => {
                    tracing::info!("io_uring unavailable ({e}); using epoll");
                    epoll::Epoll::new()
                        .map(Backend::Epoll)
                        .map_err(|e| ("epoll", e))
                }
            },
        }
    }

    /// Which backend this is.
    pub fn kind(&self) -> BackendKind {
        match self {
            Backend::Uring(_) => BackendKind::IoUring,
            Backend::Epoll(_) => BackendKind::Epoll,
        }
    }

    /// Watch `fd` for readability (or hang-up) once; `token` comes back from `wait`.
    /// `first` says whether this fd was never watched before.
    pub fn watch(&mut self, fd: BorrowedFd<'_>, token: u64, first: bool) -> io::Result<()> {
        match self {
            Backend::Uring(b) => b.watch(fd, token, first),
            Backend::Epoll(b) => b.watch(fd, token, first),
        }
    }

    /// Watch `fd` once for an urgent condition (`POLLPRI`: a cgroup file
    /// such as `cgroup.events` changed); else as `watch`.
    pub fn watch_pri(&mut self, fd: BorrowedFd<'_>, token: u64, first: bool) -> io::Result<()> {
        match self {
            Backend::Uring(b) => b.watch_pri(fd, token, first),
            Backend::Epoll(b) => b.watch_pri(fd, token, first),
        }
    }

    /// Cancel a pending watch on `fd` (registered under `token`) before the fd is closed.
    pub fn unwatch(&mut self, fd: BorrowedFd<'_>, token: u64) {
        match self {
            Backend::Uring(b) => b.unwatch(fd, token),
            Backend::Epoll(b) => b.unwatch(fd, token),
        }
    }

    /// Submit pending work and wait up to `timeout` (None: forever) for
    /// watches to fire, lingering as `batch` says; their tokens are
    /// appended to `fired`.
    pub fn wait(
        &mut self,
        fired: &mut Vec<u64>,
        timeout: Option<Duration>,
        batch: Batch,
    ) -> io::Result<()> {
        match self {
            Backend::Uring(b) => b.wait(fired, timeout, batch),
            Backend::Epoll(b) => b.wait(fired, timeout, batch),
        }
    }
}
