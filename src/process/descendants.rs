//! The /proc walk that finds a killed check's descendants outside its
//! process group (the fallback where no cgroup contains the check).

use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use rustix::process::Pid;

/// A descendant of a check's leader outside its process group (`setsid`,
/// or `setpgid` into a group of its own), which the group signal misses.
pub(crate) struct Descendant {
    pub pid: Pid,
    /// Signalling through it reaches this process or nobody, whatever
    /// happens later (it is re-parented, or exits and its number is reused).
    pub pidfd: OwnedFd,
}

/// The descendants of a leader (an unreaped child of ours: its pid names it
/// until we reap it) that are outside its process group, at
/// most `keep` of them, from a walk of at most `visit` processes through
/// `/proc` (each process's main-thread children list: one file, as this
/// runs on the loop for every check killed; children of a plugin's other
/// threads are missed).
///
/// Race-free by construction: a child's pid is opened as a pidfd, then its
/// `/proc` entry read, then the pidfd's process is confirmed alive (so the
/// entry read was its own: a number is not reused while its process
/// lives); and the parent is confirmed alive after that (so the `ppid`
/// read named it). A process created after its parent's list was read is
/// missed; so is one whose parent already exited (it was re-parented).
pub(crate) fn descendants_outside_group(leader: Pid, visit: usize, keep: usize) -> Vec<Descendant> {
    let pgid = leader.as_raw_nonzero().get();
    // Every process reached (its pidfd, whether outside the group).
    let mut reached: Vec<(Descendant, bool)> = Vec::new();
    // Processes whose children are still to be listed (the leader first).
    let mut to_visit: Vec<(i32, Option<usize>)> = vec![(pgid, None)];
    'walk: while let Some((pid, index)) = to_visit.pop() {
        let children = children_of(pid);
        // The leader is our unreaped child: its number is ours until we
        // reap it, so its own entries need no confirming.
        let parent_alive = |reached: &[(Descendant, bool)]| match index {
            Some(i) => alive(reached[i].0.pidfd.as_fd()),
            None => true,
        };
        if !parent_alive(&reached) {
            continue; // Exited: its list may name others' children by now.
        }
        for child in children {
            if reached.len() >= visit {
                break 'walk; // A fork bomb: enough.
            }
            let Some(cpid) = Pid::from_raw(child) else {
                continue;
            };
            let cfd = match rustix::process::pidfd_open(cpid, rustix::process::PidfdFlags::empty())
            {
                Ok(fd) => fd,
                Err(Errno::MFILE | Errno::NFILE) => {
                    tracing::warn!(
                        leader = pgid,
                        "out of descriptors: descendants outside the check's group may survive its kill"
                    );
                    break 'walk;
                }
                Err(_) => continue,
            };
            let Some((ppid, pgrp)) = ppid_and_pgrp(child) else {
                continue;
            };
            if ppid != pid || !alive(cfd.as_fd()) || !parent_alive(&reached) {
                continue;
            }
            let descendant = Descendant {
                pid: cpid,
                pidfd: cfd,
            };
            reached.push((descendant, pgrp != pgid));
            to_visit.push((child, Some(reached.len() - 1)));
        }
    }
    reached
        .into_iter()
        .filter_map(|(d, outside)| outside.then_some(d))
        .take(keep)
        .collect()
}

/// Whether the process behind `pidfd` still exists (signal 0 through it;
/// a zombie counts: its number is still its own).
pub(super) fn alive(pidfd: BorrowedFd<'_>) -> bool {
    // SAFETY: pidfd_send_signal with signal 0, no siginfo, no flags: only
    // checks that the process exists and may be signalled.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    rc == 0
}

/// Children of `pid`'s main thread, from `/proc` (one file: this runs for
/// every check killed, on the loop; children created by a plugin's other
/// threads are missed).
pub(super) fn children_of(pid: i32) -> Vec<i32> {
    children_listed(format!("/proc/{pid}/task/{pid}/children"))
}

/// The pids a `/proc/.../children` file lists (none if it cannot be read).
pub(crate) fn children_listed(path: impl AsRef<std::path::Path>) -> Vec<i32> {
    std::fs::read_to_string(path)
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// (ppid, pgrp) from `/proc/PID/stat`.
pub(super) fn ppid_and_pgrp(pid: i32) -> Option<(i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields after the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(1);
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((ppid, pgrp))
}
