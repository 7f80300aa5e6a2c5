//! The spawner pool: a few threads that create children for the loop.
//!
//! Creating a child (`clone` with CLONE_VFORK, see `spawn`) blocks its caller until the child has exec'd (≈0.3–0.5 ms of
//! kernel work); on the loop thread that would stall every other check and cap
//! the rate at one core. Spawners only create the child and hand its fds back;
//! the loop stays the single owner of every check's state.
//!
//! Each spawner works in a private descriptor table (`unshare(CLONE_FILES)`,
//! then everything but /dev/null, the waker and its hand-off socket closed).
//! The kernel copies the parent's whole table into every child it creates,
//! and the child then closes it all again: from the shared table, with 3 fds
//! per check in flight, a spawn at 6k checks in flight cost 4× one at none.
//! The child's pidfd and pipe read ends then travel to the loop over a
//! `SOCK_SEQPACKET` socket (`SCM_RIGHTS`, received `MSG_CMSG_CLOEXEC`),
//! before the answer on the channel names them. The loop keeps 3 descriptor
//! slots reserved per spawn in flight, so receiving them cannot hit EMFILE
//! (as before, EMFILE fails a check before its child exists).
//!
//! Spawner threads never log: a logger's fd number means something else in
//! their table.

use crate::check::Prepared;
use crate::spawn::{self, Child, SpawnFailure};
use crate::waker::Waker;
use crossbeam_channel::{Receiver, Sender};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use rustix::process::{Pid, Signal};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Descriptors per check: pidfd, stdout, stderr.
const FDS_PER_CHILD: usize = 3;

/// A request to create one check's child.
pub(crate) struct SpawnJob {
    /// The check's slot in the loop's slab.
    pub slot: usize,
    /// The slot's generation, so a late answer never lands on a reused slot.
    pub generation: u32,
    /// What to run.
    pub prepared: Prepared,
}

/// A child a spawner created, as the channel reports it: its descriptors
/// come separately, over that spawner's hand-off socket.
pub(crate) struct Spawned {
    /// The leader's pid (its group and session id).
    pub pid: Pid,
    /// When the child came to exist.
    pub started: Instant,
}

/// The answer to a `SpawnJob`.
pub(crate) struct SpawnDone {
    /// As in the job.
    pub slot: usize,
    /// As in the job.
    pub generation: u32,
    /// Which spawner answered: its socket carries the child's descriptors.
    pub spawner: usize,
    /// The child, or why there is none.
    pub result: Result<Spawned, SpawnFailure>,
    /// When a spawner took the job off the queue.
    pub picked: Instant,
}

/// Lets the orphan scan see a moment when no spawn is in progress.
///
/// Spawners hold it shared from before creating a child until their answer is
/// sent; the loop's scan takes it exclusively without ever blocking
/// (`try_exclusive`), so every child of ours is then known to the loop.
/// Under saturating load the scan may keep missing; after a few misses it
/// asks spawners to pause between jobs until it got its turn.
#[derive(Default)]
pub(crate) struct SpawnGate {
    lock: RwLock<()>,
    pause: AtomicBool,
}

impl SpawnGate {
    /// Spawner side: wait out a requested pause, then hold the gate shared.
    fn enter(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        while self.pause.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_micros(200));
        }
        self.lock.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Loop side: exclusive access if no spawn is in progress right now.
    pub fn try_exclusive(&self) -> Option<RwLockWriteGuard<'_, ()>> {
        self.lock.try_write().ok()
    }

    /// Ask spawners to stop taking new jobs until `resume`.
    pub fn pause(&self) {
        self.pause.store(true, Ordering::Release);
    }

    /// Let spawners go on.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
    }
}

/// The loop's side of the spawner pool: the threads, the hand-off sockets and
/// the descriptor reserve. Only the loop thread touches it.
pub(crate) struct Spawners {
    threads: Vec<JoinHandle<()>>,
    /// The loop's end of each spawner's hand-off socket.
    inboxes: Vec<OwnedFd>,
    /// `FDS_PER_CHILD` placeholder fds per spawn in flight (see `reserve`).
    reserve: Vec<OwnedFd>,
    /// Spawner socket ends still open in the shared table (a spawner that
    /// could not unshare uses them): closed only after the threads are gone.
    keep: Vec<OwnedFd>,
    /// The spawners use this fd by number: it stays open until they are gone.
    devnull: Arc<OwnedFd>,
}

/// Start `threads` spawner threads; they exit when `jobs` is disconnected.
pub(crate) fn start(
    threads: usize,
    jobs: Receiver<SpawnJob>,
    done: Sender<SpawnDone>,
    waker: Arc<Waker>,
    devnull: Arc<OwnedFd>,
    gate: Arc<SpawnGate>,
) -> std::io::Result<Spawners> {
    let mut spawners = Spawners {
        threads: Vec::new(),
        inboxes: Vec::new(),
        reserve: Vec::new(),
        keep: Vec::new(),
        devnull: devnull.clone(),
    };
    for i in 0..threads.max(1) {
        let (inbox, outbox) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let (jobs, done, waker, gate) = (jobs.clone(), done.clone(), waker.clone(), gate.clone());
        // The thread uses these by number, in its own table.
        let (devnull_fd, outbox_fd) = (devnull.as_raw_fd(), outbox.as_raw_fd());
        let thread = std::thread::Builder::new()
            .name(format!("pidring-spawn-{i}"))
            .spawn(move || {
                let private = private_table(&[devnull_fd, waker.fd().as_raw_fd(), outbox_fd]);
                let _ = ready_tx.send(private);
                // SAFETY: both stay open in this thread's table until it ends
                // (kept by `private_table`, or by `Spawners` in the shared one).
                let (devnull, outbox) = unsafe {
                    (
                        BorrowedFd::borrow_raw(devnull_fd),
                        BorrowedFd::borrow_raw(outbox_fd),
                    )
                };
                // Blocks every signal on this thread and maps the children's stack.
                let spawner = spawn::Spawner::for_this_thread();
                for job in jobs.iter() {
                    // Held until the answer is sent: see `SpawnGate`.
                    let _gate = gate.enter();
                    let picked = Instant::now();
                    let spawned = match &spawner {
                        Ok(spawner) => spawn::spawn(spawner, &job.prepared, devnull),
                        Err(e) => Err(SpawnFailure::new(
                            &job.prepared.program(),
                            "no spawner thread could be set up for",
                            Errno::from_io_error(e).unwrap_or(Errno::NOMEM),
                        )),
                    };
                    let (result, child) = match spawned {
                        Ok(child) => match send_fds(outbox, &child) {
                            Ok(()) => (
                                Ok(Spawned {
                                    pid: child.pid,
                                    started: child.started,
                                }),
                                Some(child),
                            ),
                            Err(e) => {
                                spawn::kill_and_reap(child);
                                let step = "cannot hand over the descriptors of";
                                let program = job.prepared.program();
                                (Err(SpawnFailure::new(&program, step, e)), None)
                            }
                        },
                        Err(failure) => (Err(failure), None),
                    };
                    // Free the argv/env strings here, not on the loop.
                    drop(job.prepared);
                    let msg = SpawnDone {
                        slot: job.slot,
                        generation: job.generation,
                        spawner: i,
                        result,
                        picked,
                    };
                    if done.send(msg).is_err() {
                        // The loop is gone (it only goes after every
                        // dispatched spawn came back, so this is a bug): do
                        // not leave the child unreaped.
                        if let Some(child) = child {
                            spawn::kill_and_reap(child);
                        }
                        return;
                    }
                    // Our copies: the loop gets its own from the socket.
                    drop(child);
                    waker.wake();
                }
            })?;
        // Once the thread has its own table, the shared copy of its socket
        // end is not needed (if it has none, it uses this one: keep it).
        match ready_rx.recv() {
            Ok(true) => drop(outbox),
            _ => spawners.keep.push(outbox),
        }
        spawners.threads.push(thread);
        spawners.inboxes.push(inbox);
    }
    Ok(spawners)
}

impl Spawners {
    /// Hold `FDS_PER_CHILD` descriptor slots for a spawn about to be
    /// dispatched, so its descriptors can always be received: spare slots
    /// of finished checks first, else fresh ones.
    pub fn reserve(&mut self, spares: &mut Vec<OwnedFd>) -> Result<(), Errno> {
        for taken in 0..FDS_PER_CHILD {
            if let Some(fd) = spares.pop() {
                self.reserve.push(fd);
                continue;
            }
            match rustix::io::fcntl_dupfd_cloexec(self.devnull.as_fd(), 0) {
                Ok(fd) => self.reserve.push(fd),
                Err(e) => {
                    for _ in 0..taken {
                        self.reserve.pop();
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Give back one spawn's reserved slots.
    pub fn release(&mut self) {
        for _ in 0..FDS_PER_CHILD {
            self.reserve.pop();
        }
    }

    /// Turn a spawner's answer into the child with its descriptors (received
    /// from its socket into the slots reserved for them).
    pub fn receive(&mut self, spawner: usize, spawned: Spawned) -> Result<Child, SpawnFailure> {
        self.release();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_CHILD))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut pid = [0u8; 4];
        let got = rustix::net::recvmsg(
            &self.inboxes[spawner],
            &mut [IoSliceMut::new(&mut pid)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
        );
        let mut fds: [Option<OwnedFd>; FDS_PER_CHILD] = [None, None, None];
        let mut n = 0;
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = msg {
                for fd in received {
                    if n < FDS_PER_CHILD {
                        fds[n] = Some(fd);
                        n += 1;
                    }
                }
            }
        }
        let errno = match got {
            Ok(m) if m.flags.contains(ReturnFlags::CTRUNC) => Some(Errno::MFILE),
            Ok(_) if i32::from_ne_bytes(pid) != spawned.pid.as_raw_nonzero().get() => {
                Some(Errno::PROTO)
            }
            Ok(_) => None,
            Err(e) => Some(e),
        };
        if let (None, [Some(_), Some(_), Some(_)]) = (errno, &fds) {
            let [Some(pidfd), Some(stdout), Some(stderr)] = fds else {
                unreachable!("matched just above")
            };
            return Ok(Child {
                pid: spawned.pid,
                pidfd,
                stdout,
                stderr,
                started: spawned.started,
            });
        }
        // Not all arrived (another thread took a reserved slot): kill the
        // child and reap it now — through its pidfd if that arrived, else by
        // number, which is safe because it is our unreaped child. It was
        // SIGKILLed, so the wait is short.
        let errno = errno.unwrap_or(Errno::MFILE);
        tracing::error!(pid = spawned.pid.as_raw_nonzero().get(), %errno, "could not receive a new child's descriptors; killing it");
        let _ = spawn::signal_group_of_unreaped_leader(spawned.pid, Signal::KILL);
        match &fds[0] {
            Some(pidfd) => {
                let _ = spawn::signal_leader(pidfd.as_fd(), Signal::KILL);
                let _ = rustix::process::waitid(
                    rustix::process::WaitId::PidFd(pidfd.as_fd()),
                    rustix::process::WaitIdOptions::EXITED,
                );
            }
            None => {
                let _ = rustix::process::waitpid(
                    Some(spawned.pid),
                    rustix::process::WaitOptions::empty(),
                );
            }
        }
        Err(SpawnFailure::new(
            "the check",
            "cannot receive the descriptors of",
            errno,
        ))
    }

    /// Join the threads (after the job channel was closed), then close what
    /// they used by number.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Send a new child's pidfd and pipe read ends (and its pid, to check) to the loop.
fn send_fds(outbox: BorrowedFd<'_>, child: &Child) -> Result<(), Errno> {
    let fds = [
        child.pidfd.as_fd(),
        child.stdout.as_fd(),
        child.stderr.as_fd(),
    ];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_CHILD))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(Errno::NOBUFS);
    }
    let pid = child.pid.as_raw_nonzero().get().to_ne_bytes();
    loop {
        match rustix::net::sendmsg(
            outbox,
            &[IoSlice::new(&pid)],
            &mut control,
            // No SIGPIPE if the loop is gone: an embedding program may not ignore it.
            SendFlags::NOSIGNAL,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Give this thread its own descriptor table holding only fds 0–2 and `keep`,
/// so the children it creates copy (and then close) only those. False if the
/// kernel refused (the thread then goes on in the shared table).
fn private_table(keep: &[RawFd]) -> bool {
    // SAFETY: from here on this thread uses only the fds in `keep` (and 0–2),
    // by number, and the ones it creates itself; it never logs (a logger's fd
    // number would name something else in this table).
    if unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FILES) }.is_err() {
        return false;
    }
    let mut keep: Vec<u32> = keep.iter().map(|&fd| fd as u32).collect();
    keep.sort_unstable();
    let mut from = 3u32;
    for k in keep.into_iter().chain([u32::MAX]) {
        if k > from {
            // SAFETY: close_range on this thread's private table only; the
            // fds closed here are copies nothing on this thread uses.
            unsafe { libc::syscall(libc::SYS_close_range, from, k - 1, 0u32) };
        }
        from = from.max(k.saturating_add(1));
    }
    true
}

#[cfg(test)]
mod tests {
    use crate::{Check, Executor, Outcome};
    use rustix::pipe::PipeFlags;

    /// A spawner's private table must not keep the application's files open:
    /// a pipe whose write end the application closes must reach EOF.
    #[test]
    fn spawners_do_not_pin_descriptors_opened_before_the_executor() {
        let (r, w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC).expect("pipe");
        let exec = Executor::builder()
            .spawn_threads(2)
            .build()
            .expect("executor");
        // `build` returns once every spawner has its own table; run a few checks anyway.
        let pending: Vec<_> = (0..4)
            .map(|_| exec.submit(Check::argv(["/bin/true"])).expect("submit"))
            .collect();
        for p in pending {
            assert!(matches!(p.wait().outcome, Outcome::Exited { code: 0 }));
        }
        drop(w);
        rustix::io::ioctl_fionbio(&r, true).expect("nonblocking");
        assert_eq!(
            rustix::io::read(&r, &mut [0u8; 1]),
            Ok(0),
            "a spawner still holds the write end"
        );
    }
}
