//! Reaping a check's leader through its pidfd (`waitid(P_PIDFD)`), with
//! its rusage.

use crate::result::{ExitStatus, Rusage};
use rustix::fd::{AsRawFd, BorrowedFd};
use rustix::io::Errno;

/// What a non-blocking reap found.
pub(crate) enum Reap {
    /// The leader was reaped: its status and rusage.
    Reaped(ExitStatus, Rusage),
    /// Not exited yet (the pidfd woke us early); wait again.
    NotYet,
}

/// Reap the leader through its pidfd, without blocking, collecting its rusage.
///
/// The raw syscall is used because its fifth argument returns the rusage,
/// which neither libc's `waitid` wrapper nor IORING_OP_WAITID expose.
pub(crate) fn reap(pidfd: BorrowedFd<'_>) -> Result<Reap, Errno> {
    // SAFETY: rusage is a plain C struct for which all-zero is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let info = waitid_pidfd(pidfd, libc::WEXITED | libc::WNOHANG, &mut ru)?;
    // SAFETY: waitid filled `info` for a child event (or left it zeroed: si_pid 0).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(Reap::NotYet);
    }
    let exit = match info.si_code {
        libc::CLD_EXITED => ExitStatus::Exited { code: status },
        libc::CLD_DUMPED => ExitStatus::Signaled {
            signal: status,
            core_dumped: true,
        },
        _ => ExitStatus::Signaled {
            signal: status,
            core_dumped: false,
        },
    };
    let us = |tv: libc::timeval| (tv.tv_sec as u64) * 1_000_000 + tv.tv_usec as u64;
    let rusage = Rusage {
        user_us: us(ru.ru_utime),
        system_us: us(ru.ru_stime),
        max_rss_kb: ru.ru_maxrss.max(0) as u64,
    };
    Ok(Reap::Reaped(exit, rusage))
}

/// Whether the child behind `pidfd` has exited, without reaping it
/// (`waitid(P_PIDFD, WEXITED | WNOHANG | WNOWAIT)`): for the loop's polling
/// path, where no pidfd event said so, before it sweeps the group.
pub(crate) fn has_exited(pidfd: BorrowedFd<'_>) -> Result<bool, Errno> {
    // SAFETY: as in `reap`.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let info = waitid_pidfd(
        pidfd,
        libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        &mut ru,
    )?;
    // SAFETY: waitid filled `info` for a child event (or left it zeroed: si_pid 0).
    Ok(unsafe { info.si_pid() } != 0)
}

/// `waitid(P_PIDFD, pidfd, …, options, ru)`: the child's `siginfo_t` (all
/// zero, `si_pid` 0, when WNOHANG finds no event).
pub(super) fn waitid_pidfd(
    pidfd: BorrowedFd<'_>,
    options: libc::c_int,
    ru: &mut libc::rusage,
) -> Result<libc::siginfo_t, Errno> {
    // SAFETY: siginfo_t is a plain C struct for which all-zero is valid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes only into the two structs we pass, which live
    // across the call; the pidfd is open for the call's duration.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_waitid,
            libc::P_PIDFD,
            pidfd.as_raw_fd(),
            &mut info as *mut libc::siginfo_t,
            options,
            ru as *mut libc::rusage,
        )
    };
    if rc < 0 {
        return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::INVAL));
    }
    Ok(info)
}
