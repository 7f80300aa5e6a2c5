//! Process-wide setup the executor does once: fds 0-2, SIGCHLD's
//! disposition, RLIMIT_NOFILE raised for the executor and restored for its
//! checks.

use rustix::fd::{BorrowedFd, OwnedFd};
use rustix::io::Errno;

/// Make sure fds 0, 1 and 2 are open (on /dev/null if closed), as daemons
/// started with closed standard streams would otherwise get a check's pipe
/// ends as fd 1 or 2 — and `dup2` onto them would then cross the streams.
pub(crate) fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: fd 0..3 is only probed with F_GETFD, not used as owned.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        if rustix::io::fcntl_getfd(borrowed) == Err(Errno::BADF) {
            // The lowest free number is `fd`: that is where this lands. Kept open for good.
            if let Ok(null) = rustix::fs::open(
                "/dev/null",
                rustix::fs::OFlags::RDWR,
                rustix::fs::Mode::empty(),
            ) {
                std::mem::forget(null);
            }
        }
    }
}

/// Make sure the kernel keeps our children's exit statuses for us. A
/// process started with SIGCHLD ignored (a parent's `signal(SIGCHLD,
/// SIG_IGN)` is inherited across exec), or with `SA_NOCLDWAIT`, has its
/// children reaped by the kernel as they exit: every check's status would
/// be lost, and the leader's pid freed while the loop still took it as
/// pinning the group. Back to the default (a handler is kept, without the flag).
pub(crate) fn keep_exit_statuses() {
    // SAFETY: sigaction with a null new action only reads the current one
    // into `old`, a zeroed (valid) sigaction.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    if unsafe { libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut old) } != 0 {
        return;
    }
    let ignored = old.sa_sigaction == libc::SIG_IGN;
    let no_wait = old.sa_flags & libc::SA_NOCLDWAIT != 0;
    if !ignored && !no_wait {
        return;
    }
    let mut new = old;
    if ignored {
        new.sa_sigaction = libc::SIG_DFL;
    }
    new.sa_flags &= !libc::SA_NOCLDWAIT;
    // SAFETY: `new` is the current action with only the handler set to the
    // default and/or SA_NOCLDWAIT cleared: a valid sigaction.
    let rc = unsafe { libc::sigaction(libc::SIGCHLD, &new, std::ptr::null_mut()) };
    if rc == 0 {
        tracing::warn!(
            "SIGCHLD was {} (inherited?): set back to the default, so that the executor gets its checks' exit statuses",
            if ignored {
                "ignored"
            } else {
                "set with SA_NOCLDWAIT"
            }
        );
    } else {
        tracing::error!(
            "SIGCHLD is ignored and cannot be reset: checks' exit statuses will be lost"
        );
    }
}

/// Open /dev/null once per executor (O_CLOEXEC), to become every check's stdin.
pub(crate) fn open_devnull() -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        "/dev/null",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?)
}

/// The soft RLIMIT_NOFILE this process had before the first executor raised
/// it (`None`: infinite): what checks get back, see `original_nofile_soft`.
pub(super) static ORIGINAL_NOFILE_SOFT: std::sync::OnceLock<Option<u64>> =
    std::sync::OnceLock::new();

/// The soft RLIMIT_NOFILE checks should run with: the one this process was
/// started with, not the executor's raised one (a plugin using `select()`
/// breaks on descriptors past 1024, and close-every-fd loops crawl through
/// a million). `None` until an executor raised it.
pub(crate) fn original_nofile_soft() -> Option<Option<u64>> {
    ORIGINAL_NOFILE_SOFT.get().copied()
}

/// Raise RLIMIT_NOFILE: to 1Mi (bounded by fs.nr_open) where allowed (root),
/// else the soft limit to the hard one. Failure only costs headroom.
pub(crate) fn raise_nofile_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    // A second executor sees the first one's raise: keep the first view.
    let _ = ORIGINAL_NOFILE_SOFT.set(lim.current);
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let want = nr_open.min(1 << 20);
    // Never lower a limit: an infinite or larger hard limit stays as it is.
    let wide = match lim.maximum {
        Some(max) if max >= want => Rlimit {
            current: Some(max.min(nr_open)),
            maximum: Some(max),
        },
        Some(_) => Rlimit {
            current: Some(want),
            maximum: Some(want),
        },
        None => Rlimit {
            current: Some(want),
            maximum: None,
        },
    };
    let soft_to_hard = Rlimit {
        current: lim.maximum,
        maximum: lim.maximum,
    };
    let raised =
        setrlimit(Resource::Nofile, wide).or_else(|_| setrlimit(Resource::Nofile, soft_to_hard));
    match raised {
        Ok(()) => {
            tracing::debug!(from = ?lim.current, to = ?getrlimit(Resource::Nofile).current, "raised RLIMIT_NOFILE")
        }
        Err(e) => tracing::debug!("cannot raise RLIMIT_NOFILE: {e}"),
    }
}
