//! Signalling a check: through its pidfd, and its group only while the
//! unreaped leader pins the group id.

use rustix::fd::BorrowedFd;
use rustix::io::Errno;
use rustix::process::{Pid, Signal};

/// Send `sig` to the leader through its pidfd. ESRCH ("already exiting") is success.
pub(crate) fn signal_leader(pidfd: BorrowedFd<'_>, sig: Signal) -> Result<(), Errno> {
    match rustix::process::pidfd_send_signal(pidfd, sig) {
        Ok(()) | Err(Errno::SRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Send `sig` to the whole process group. Only call while the leader is
/// unreaped: the unreaped leader pins the pid, and so the group id.
/// ESRCH (group already empty) is success.
pub(crate) fn signal_group_of_unreaped_leader(pgid: Pid, sig: Signal) -> Result<(), Errno> {
    match rustix::process::kill_process_group(pgid, sig) {
        Ok(()) | Err(Errno::SRCH) => Ok(()),
        Err(e) => Err(e),
    }
}
