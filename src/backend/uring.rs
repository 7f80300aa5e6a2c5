//! The io_uring backend: one oneshot `IORING_OP_POLL_ADD` per watch.
//!
//! Why poll and not `IORING_OP_READ`/`IORING_OP_WAITID`: a pending read needs
//! a buffer lent to the kernel per stream (memory per idle check), and
//! `IORING_OP_WAITID` parks every waiter on one per-parent queue, so each exit
//! walks all of them (measured 2.4x slower than poll+waitid at 10k in flight).
//! Poll arms and cancels are batched into the same `io_uring_enter` that waits.

use io_uring::{IoUring, opcode, types};
use rustix::fd::{AsRawFd, BorrowedFd};
use std::io;
use std::time::Duration;

/// Submission queue size; a full queue is flushed early, so this bounds nothing.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue size (the kernel keeps overflow, FEAT_NODROP, but this avoids it).
const CQ_ENTRIES: u32 = 16384;
use super::Batch;
use crate::token::{BACKEND_OWN as IGNORE, WATCH_FAILED};

/// An io_uring instance.
pub(crate) struct Uring {
    ring: IoUring,
    /// Completions taken off the ring early (to make room) and not yet reported.
    backlog: Vec<u64>,
    /// The kernel has `min_wait_usec` (IORING_FEAT_MIN_TIMEOUT, 6.12): a
    /// `Batch` is honoured; without it every wait returns at the first event.
    min_wait: bool,
}

impl Uring {
    /// Set up the ring and probe for what we use; any failure means "use epoll".
    pub fn new() -> io::Result<Uring> {
        // Single issuer + deferred task work: completions are posted only when
        // this (the loop) thread enters the kernel, which is the only time it
        // looks. Older kernels refuse the flags; retry plain.
        let ring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(SQ_ENTRIES)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(CQ_ENTRIES)
                    .build(SQ_ENTRIES)
            })?;
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks IORING_FEAT_EXT_ARG (kernel < 5.11)",
            ));
        }
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::PollAdd::CODE, "POLL_ADD"),
            (opcode::PollRemove::CODE, "POLL_REMOVE"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring lacks IORING_OP_{name}"),
                ));
            }
        }
        let min_wait = ring.params().is_feature_min_timeout();
        tracing::debug!(min_wait, "io_uring backend ready");
        Ok(Uring {
            ring,
            backlog: Vec::new(),
            min_wait,
        })
    }

    /// Queue one SQE, flushing the submission queue to the kernel if it is full.
    fn push(&mut self, sqe: io_uring::squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: poll and poll-remove SQEs reference no user memory: the
            // fd is only a number the kernel resolves at submission.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion queue is full: take completions off it
                    // (reported at the next `wait`) and try again.
                    self.drain_completions();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Arm a oneshot POLLIN watch (`first` does not matter to a ring).
    pub fn watch(&mut self, fd: BorrowedFd<'_>, token: u64, _first: bool) -> io::Result<()> {
        self.arm(fd, token, libc::POLLIN as u32)
    }

    /// Arm a oneshot POLLPRI watch (a cgroup file changed).
    pub fn watch_pri(&mut self, fd: BorrowedFd<'_>, token: u64, _first: bool) -> io::Result<()> {
        self.arm(fd, token, libc::POLLPRI as u32)
    }

    /// Queue a oneshot `POLL_ADD` for `events`.
    fn arm(&mut self, fd: BorrowedFd<'_>, token: u64, events: u32) -> io::Result<()> {
        let sqe = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), events)
            .build()
            .user_data(token);
        self.push(sqe)
    }

    /// Cancel the pending watch registered under `token` (by token: the
    /// ring does not know fds).
    pub fn unwatch(&mut self, _fd: BorrowedFd<'_>, token: u64) {
        let sqe = opcode::PollRemove::new(token).build().user_data(IGNORE);
        if let Err(e) = self.push(sqe) {
            // The watch then fires (POLLHUP/exit) later under a stale token,
            // which the loop ignores; only a kernel reference lingers until then.
            tracing::warn!("io_uring: cannot queue poll removal: {e}");
        }
    }

    /// Submit everything queued and wait for at least one completion or the
    /// timeout; with a `batch` (and a timeout to bound it), for
    /// `batch.events` completions, or `batch.within` if one has come by then.
    pub fn wait(
        &mut self,
        fired: &mut Vec<u64>,
        timeout: Option<Duration>,
        batch: Batch,
    ) -> io::Result<()> {
        let ready = !self.backlog.is_empty() || !self.ring.completion().is_empty();
        let res = match (ready, timeout) {
            (true, _) => self.ring.submit(),
            (false, None) => self.ring.submit_and_wait(1),
            (false, Some(d)) => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                // Never past the timeout: the kernel waits `min_wait_usec`
                // even when the timeout is shorter.
                let within = batch.within.min(d).as_micros() as u32;
                if self.min_wait && batch.events > 1 && within > 0 {
                    let args = args.min_wait_usec(within);
                    self.ring.submitter().submit_with_args(batch.events, &args)
                } else {
                    self.ring.submitter().submit_with_args(1, &args)
                }
            }
        };
        match res {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        self.drain_completions();
        fired.append(&mut self.backlog);
        Ok(())
    }

    /// Move every completion off the ring into the backlog.
    fn drain_completions(&mut self) {
        for cqe in self.ring.completion() {
            let token = cqe.user_data();
            if token == IGNORE {
                continue;
            }
            // A poll ends with an error when it could not be armed (ENOMEM…),
            // which says nothing about the fd. ECANCELED is a poll we removed
            // ourselves: its token is stale, as before.
            let res = cqe.result();
            if res < 0 && res != -libc::ECANCELED {
                tracing::debug!(token, errno = -res, "io_uring: a poll failed");
                self.backlog.push(token | WATCH_FAILED);
            } else {
                self.backlog.push(token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fd::AsFd;

    /// A poll the kernel could not arm comes back marked as failed, never as
    /// readiness: taken for a pidfd's, it would have the loop sweep a live
    /// check's group.
    #[test]
    fn a_failed_poll_is_reported_as_failed_not_ready() {
        let Ok(mut ring) = Uring::new() else {
            return; // No io_uring here: nothing to test.
        };
        // io_uring takes no O_PATH file (EBADF): a poll that cannot be armed.
        let path =
            rustix::fs::open("/", rustix::fs::OFlags::PATH, rustix::fs::Mode::empty()).unwrap();
        let (r, w) = rustix::pipe::pipe().unwrap();
        ring.watch(path.as_fd(), 7, true).unwrap();
        ring.watch(r.as_fd(), 9, true).unwrap();
        rustix::io::write(&w, b"x").unwrap();
        let mut fired = Vec::new();
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while fired.len() < 2 && std::time::Instant::now() < end {
            ring.wait(&mut fired, Some(Duration::from_millis(100)), Batch::NONE)
                .unwrap();
        }
        fired.sort();
        assert_eq!(fired, [9, 7 | crate::token::WATCH_FAILED]);
    }

    /// A batched wait returns once its `within` has passed with fewer events
    /// than it asked for, never holding one that came until the timeout.
    #[test]
    fn a_batched_wait_returns_within_its_bound_with_what_came() {
        let Ok(mut ring) = Uring::new() else {
            return; // No io_uring here: nothing to test.
        };
        if !ring.min_wait {
            eprintln!("SKIP a_batched_wait: no IORING_FEAT_MIN_TIMEOUT (kernel < 6.12)");
            return;
        }
        let (r, w) = rustix::pipe::pipe().unwrap();
        ring.watch(r.as_fd(), 9, true).unwrap();
        rustix::io::write(&w, b"x").unwrap();
        let batch = Batch {
            events: 8,
            within: Duration::from_millis(20),
        };
        let mut fired = Vec::new();
        let began = std::time::Instant::now();
        ring.wait(&mut fired, Some(Duration::from_secs(30)), batch)
            .unwrap();
        let took = began.elapsed();
        assert_eq!(fired, [9]);
        assert!(took < Duration::from_secs(10), "held the event {took:?}");
    }
}
