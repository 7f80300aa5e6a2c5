//! The process layer: create a check's child (own session and process group,
//! stdin from /dev/null, stdout/stderr into pipes, nothing else inherited)
//! with its pidfd, signal it, and reap it with `waitid(P_PIDFD)`.
//!
//! Every function here returns errors as values; none of them panics on a
//! kernel refusal, because a refusal for one check must not hurt the others.

use crate::check::Prepared;
use crate::rawsys;
use crate::result::{ExitStatus, Rusage};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use rustix::io::Errno;
use rustix::pipe::PipeFlags;
use rustix::process::{Pid, Signal};
use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ffi::CString;
use std::rc::Rc;
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A child that now exists: its pid, pidfd and the read ends of its output pipes.
#[derive(Debug)]
pub(crate) struct Child {
    /// The leader's pid; also its process group and session id.
    pub pid: Pid,
    /// The pidfd: the only handle the leader is ever signalled or reaped through.
    pub pidfd: OwnedFd,
    /// Read end of the child's stdout.
    pub stdout: OwnedFd,
    /// Read end of the child's stderr.
    pub stderr: OwnedFd,
    /// When the child came to exist (stamped when `clone` returned; it may not have exec'd yet).
    pub started: Instant,
}

/// Why a child could not be created.
#[derive(Debug, Clone)]
pub(crate) struct SpawnFailure {
    /// The errno, when there is one.
    pub errno: Option<i32>,
    /// A message for a person, naming the program and the step that failed.
    pub message: String,
}

impl SpawnFailure {
    pub(crate) fn new(program: &str, step: &str, errno: Errno) -> SpawnFailure {
        let hint = match errno {
            Errno::NOENT => " (check the path and that the plugin is installed)",
            Errno::ACCESS => " (is the file executable, and its directory searchable?)",
            Errno::MFILE | Errno::NFILE => {
                " (out of file descriptors: raise RLIMIT_NOFILE or lower max_running)"
            }
            Errno::AGAIN => {
                " (process limit reached: raise RLIMIT_NPROC/pid_max or lower max_running)"
            }
            Errno::NOEXEC => " (not a binary, and /bin/sh would not run it either)",
            // The errno's own text already says "Argument list too long".
            Errno::TOOBIG => " (the arguments and environment together exceed the kernel's limit)",
            _ => "",
        };
        SpawnFailure {
            errno: Some(errno.raw_os_error()),
            message: format!("{step} {program}: {}{hint}", std::io::Error::from(errno)),
        }
    }
}

/// Signals that may be ignored in the executor (Rust ignores SIGPIPE, daemons
/// ignore others) and must be back to default in a check: ignored dispositions
/// survive `execve`.
const RESET_SIGNALS: &[i32] = &[
    libc::SIGPIPE,
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGCHLD,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGXFSZ,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGTSTP,
];

/// Block every signal on the calling thread for good. The loop thread does
/// this before it creates its first child: a child starts with its
/// creator's mask and handlers, runs in the executor's memory until it
/// execs, and must not run one of the application's handlers there.
pub(crate) fn block_all_signals_on_this_thread() -> std::io::Result<()> {
    // SAFETY: sigfillset initialises the set; pthread_sigmask only reads it.
    let rc = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut())
    };
    match rc {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// How long a child may take from `clone` to `execve` before the loop
/// stops waiting for it: it then no longer counts against the launches in
/// flight (`engine::MAX_LAUNCHING`), and the low slot pair it holds is no
/// longer waited for (`Launcher::has_slots`). A healthy child execs within
/// microseconds, or a few milliseconds when it waits for a CPU on a
/// saturated machine; a slow but working network file system answers a
/// lookup in well under a second. One that takes longer is stuck (a hung
/// NFS or FUSE mount in its working directory, its program's path or its
/// PATH: the lookup waits until the server answers, in a sleep that even
/// SIGKILL may not end), and another client's check must not wait behind
/// it for longer than this. It keeps its stack and strings until the
/// kernel lets go; that is bounded all the same, as every launch is a
/// running check: never more than `max_running` of them.
pub(crate) const STUCK_LAUNCH: Duration = Duration::from_secs(1);

/// A stack for a child between `clone` and `execve`, with a guard page below it.
pub(crate) struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

impl ChildStack {
    /// The child resets signals, moves three fds, changes directory and
    /// execs: a few KiB at most. 64 KiB leaves room for stack probes.
    const SIZE: usize = 64 * 1024;

    fn new() -> std::io::Result<ChildStack> {
        // A guard page below the stack, so an overflow faults instead of
        // corrupting memory.
        // SAFETY: sysconf only reads a system value.
        let guard = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => 4096,
        };
        let len = Self::SIZE + guard;
        // SAFETY: a fresh anonymous private mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the lowest page of the mapping made just above.
        if unsafe { libc::mprotect(base, guard, libc::PROT_NONE) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: unmapping the mapping made above, never used.
            unsafe { libc::munmap(base, len) };
            return Err(e);
        }
        Ok(ChildStack { base, len })
    }

    /// The stack above the guard page: lowest address and size (`clone3`'s form).
    fn usable(&self) -> (*mut libc::c_void, usize) {
        // SAFETY: `SIZE` below the end is within our own mapping (above the guard page).
        (
            unsafe { self.top().cast::<u8>().sub(Self::SIZE).cast() },
            Self::SIZE,
        )
    }

    /// The initial stack pointer (stacks grow down; 16-byte aligned).
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of our own mapping; `len` is page-aligned.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours; a stack is dropped only by the pool
        // or a `Launch` once no child runs on it (see `Launch::drop`).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// What the loop lends its children until they exec: stacks to run on, and
/// low descriptor numbers to pass their pipes' write ends in. Shared (`Rc`)
/// by the loop and every `Launch`, which gives back what it holds when its
/// child is done with it; only the loop thread touches it.
#[derive(Clone)]
pub(crate) struct Launcher {
    pool: Rc<RefCell<Pool>>,
}

/// The loaned resources (see `Launcher`).
struct Pool {
    /// Stacks no child runs on any more: a stack mapped per spawn would be
    /// unmapped per spawn, and each unmap flushes the TLB of every CPU
    /// running one of our threads.
    stacks: Vec<ChildStack>,
    /// /dev/null at a low number: every child's stdin, and what a low slot
    /// holds while no child uses it.
    devnull: OwnedFd,
    /// Pairs of low descriptor numbers, held open on /dev/null (`None`: a
    /// pair given up because the kernel refused to reset it).
    slots: Vec<Option<(OwnedFd, OwnedFd)>>,
    /// Free pairs, lowest first.
    free: BinaryHeap<Reverse<usize>>,
    /// When each pair was lent to a child (`None`: free or given up).
    lent_at: Vec<Option<Instant>>,
    /// This process: a child whose parent is no longer it must not go on.
    parent: libc::pid_t,
    /// The RLIMIT_NOFILE (soft, hard) checks get instead of the executor's
    /// raised one (see `executor::original_nofile_soft`); `None`: as is.
    nofile: Option<[u64; 2]>,
}

impl Launcher {
    /// Most stacks kept for reuse (more are unmapped).
    const KEEP_STACKS: usize = 64;
    /// Most pairs of low slots: at most this many children are between
    /// `clone` and taking their own descriptor table at once (see
    /// `has_slots`; 8 measured slower: the loop then waits for pairs).
    const SLOT_PAIRS: usize = 32;

    /// Set up, taking the lowest free descriptor numbers for the slots: do
    /// this early, before the table fills with checks' descriptors.
    ///
    /// A child takes a private copy of just the part of the descriptor table
    /// below the highest fd it needs (`close_range(.., CLOSE_RANGE_UNSHARE)`):
    /// with its fds in low slots that is a few dozen entries, not the three
    /// per running check that lie below a fresh pipe's number.
    ///
    /// No more pairs than `max_running` checks could use: `pidring run`
    /// (one check) must start under a tight RLIMIT_NOFILE too.
    pub fn new(max_running: usize) -> std::io::Result<Launcher> {
        let devnull = open_devnull()?;
        let dup = || rustix::io::fcntl_dupfd_cloexec(&devnull, 0);
        let pairs = Self::SLOT_PAIRS.min(max_running.max(1));
        let mut slots = Vec::with_capacity(pairs);
        for _ in 0..pairs {
            slots.push(Some((dup()?, dup()?)));
        }
        Ok(Launcher {
            pool: Rc::new(RefCell::new(Pool {
                stacks: Vec::new(),
                devnull,
                free: (0..slots.len()).map(Reverse).collect(),
                lent_at: vec![None; slots.len()],
                slots,
                parent: rustix::process::getpid().as_raw_nonzero().get(),
                nofile: nofile_for_checks(),
            })),
        })
    }

    /// A low slot pair is free, or none is worth waiting for: every pair
    /// is given up, or lent to a child that has held it for `STUCK_LAUNCH`
    /// (stuck before it took its own descriptor table; it may never let
    /// go). A child launched without a pair copies every descriptor below
    /// its pipes' numbers (three per running check) and closes them again;
    /// better to wait for a launching child to let go of its pair, but not
    /// for a stuck one.
    pub fn has_slots(&self, now: Instant) -> bool {
        let pool = self.pool.borrow();
        !pool.free.is_empty()
            || pool.lent_at.iter().zip(&pool.slots).all(|(lent, slot)| {
                slot.is_none()
                    || lent.is_some_and(|t| now.saturating_duration_since(t) >= STUCK_LAUNCH)
            })
    }
}

/// The RLIMIT_NOFILE (soft, hard; `u64::MAX` is infinity) a check should
/// get, if the executor raised the soft limit above the one it started with.
fn nofile_for_checks() -> Option<[u64; 2]> {
    let original = crate::executor::original_nofile_soft()?.unwrap_or(u64::MAX);
    let now = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let current = now.current.unwrap_or(u64::MAX);
    (original < current).then(|| [original, now.maximum.unwrap_or(u64::MAX)])
}

impl Pool {
    fn take_stack(&mut self) -> std::io::Result<ChildStack> {
        match self.stacks.pop() {
            Some(stack) => Ok(stack),
            None => ChildStack::new(),
        }
    }

    fn give_stack(&mut self, stack: ChildStack) {
        if self.stacks.len() < Launcher::KEEP_STACKS {
            self.stacks.push(stack);
        }
    }

    /// Put both write ends into the lowest free pair of slots: the pair's
    /// index and its two fds (`None`: none free, or the kernel refused; the
    /// caller passes the write ends as they are).
    fn lend_slots(&mut self, out_w: &OwnedFd, err_w: &OwnedFd) -> Option<(usize, RawFd, RawFd)> {
        let Reverse(i) = self.free.pop()?;
        let (a, b) = self.slots[i].as_mut()?;
        let flags = rustix::io::DupFlags::CLOEXEC;
        if rustix::io::dup3(out_w, a, flags).is_ok() && rustix::io::dup3(err_w, b, flags).is_ok() {
            self.lent_at[i] = Some(Instant::now());
            return Some((i, a.as_raw_fd(), b.as_raw_fd()));
        }
        self.return_slots(i);
        None
    }

    /// Put /dev/null back into pair `i` (closing the write ends it held).
    fn return_slots(&mut self, i: usize) {
        self.lent_at[i] = None;
        let Some((a, b)) = self.slots[i].as_mut() else {
            return;
        };
        let flags = rustix::io::DupFlags::CLOEXEC;
        let ok = rustix::io::dup3(&self.devnull, a, flags).is_ok()
            && rustix::io::dup3(&self.devnull, b, flags).is_ok();
        if ok {
            self.free.push(Reverse(i));
        } else {
            // The kernel refused: close the pair (and the write ends with
            // it) and give it up; later launches use other pairs or none.
            tracing::warn!("cannot reset a low descriptor slot; giving it up");
            self.slots[i] = None;
        }
    }
}

/// Grow this process's descriptor table now to hold what `max_running`
/// checks use (three descriptors each, six with a cgroup leaf: its
/// directory, `cgroup.events` and `cpu.stat`) and room for the rest, within the
/// soft RLIMIT_NOFILE. The kernel grows a table that other threads or
/// children share only after an RCU grace period (`expand_fdtable` calls
/// `synchronize_rcu`): milliseconds in which the loop, the thread that
/// opens every check's pipes and pidfd, would be blocked in `pipe2` or
/// `clone` — seen as up to ~20 ms stalls, six times while 6,000 checks
/// started. A table never shrinks, so this is paid once, before any child.
pub(crate) fn presize_fd_table(any: BorrowedFd<'_>, max_running: usize) {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
        .min(i32::MAX as u64);
    let want = (max_running as u64)
        .saturating_mul(6)
        .saturating_add(1024)
        .min(limit);
    // Allocating descriptor `want - 1` makes the table hold `want`; it is
    // closed again at once.
    match rustix::io::fcntl_dupfd_cloexec(any, want.saturating_sub(1) as RawFd) {
        Ok(high) => drop(high),
        Err(e) => tracing::debug!("cannot grow the descriptor table to {want} ahead: {e}"),
    }
}

/// Our copies of a launching child's pipe write ends.
enum WriteEnds {
    /// Already closed.
    Closed,
    /// As created (no low slots were free); only held, closed on drop.
    #[allow(dead_code)]
    Own(OwnedFd, OwnedFd),
    /// In low slot pair `i` (the originals are closed).
    Slots(usize),
}

/// A child that exists but may not have exec'd yet: it runs in our memory, on
/// a stack of ours, reading `ChildArgs`, until the kernel clears `ctid` (at
/// its `execve` or exit). Until then this keeps all of that alive, and gives
/// it back to the `Launcher` when the child is done with it.
pub(crate) struct Launch {
    /// Boxed: the child reads it, and it and the kernel write its flags.
    args: Box<ChildArgs>,
    /// The strings `args` points into.
    strings: LaunchStrings,
    /// The stack the child runs on; `None` once given back.
    stack: Option<ChildStack>,
    /// The child shares our descriptor table until it has its own; our
    /// copies of its write ends are closed as soon as it has.
    write_ends: WriteEnds,
    /// The child (unreaped while this is unfinished: its pid is pinned).
    pid: Pid,
    /// The child exec'd or exited: nothing of ours is in use by it.
    finished: bool,
    /// Where the stack and slots go back to.
    launcher: Launcher,
}

/// The C strings and pointer arrays a child reads until it execs.
struct LaunchStrings {
    /// Also the PATH the child searches (`ChildArgs::dirs`).
    cmd: Prepared,
    /// A spare slot, then argv (see `ChildArgs::argv`).
    _argv: Vec<*const libc::c_char>,
    _envp: Vec<*const libc::c_char>,
}

impl Launch {
    /// Whether the child has its own session (and process group): only then
    /// may the group be signalled. Before, it has no descendants to reach,
    /// and its pidfd reaches it.
    pub fn grouped(&self) -> bool {
        self.finished || self.args.detached.load(Ordering::Acquire) != 0
    }

    /// Catch up with the child: close our write ends once it has its own
    /// table, and once it exec'd or exited give its stack back. `Some` when
    /// finished: `Ok` if it exec'd, else why not.
    pub fn poll(&mut self) -> Option<Result<(), SpawnFailure>> {
        if self.grouped() {
            self.close_write_ends();
        }
        if !self.finished && self.args.ctid.load(Ordering::Acquire) != 0 {
            return None;
        }
        Some(self.finish())
    }

    /// Where the child is stuck, if it has neither exec'd nor exited yet
    /// (for the result of a check that timed out before it could start).
    pub fn stuck(&self) -> Option<String> {
        if self.finished || self.args.ctid.load(Ordering::Acquire) == 0 {
            return None;
        }
        let step = ChildStep::from_u8(self.args.step.load(Ordering::Acquire));
        Some(step.stuck(&self.strings.cmd))
    }

    /// The child was reaped: it uses nothing of ours, whatever `ctid` says
    /// (the kernel leaves it set if the child dumped core).
    pub fn reaped(&mut self) -> Result<(), SpawnFailure> {
        self.finish()
    }

    fn close_write_ends(&mut self) {
        match std::mem::replace(&mut self.write_ends, WriteEnds::Closed) {
            WriteEnds::Closed | WriteEnds::Own(..) => {}
            WriteEnds::Slots(i) => self.launcher.pool.borrow_mut().return_slots(i),
        }
    }

    fn finish(&mut self) -> Result<(), SpawnFailure> {
        self.finished = true;
        self.close_write_ends();
        if let Some(stack) = self.stack.take() {
            self.launcher.pool.borrow_mut().give_stack(stack);
        }
        match self.args.errno.load(Ordering::Acquire) {
            0 => Ok(()),
            errno => {
                let step = ChildStep::from_u8(self.args.step.load(Ordering::Acquire));
                Err(step.failure(&self.strings.cmd, Errno::from_raw_os_error(errno)))
            }
        }
    }
}

impl Drop for Launch {
    /// Dropped before the child is done with our memory (only on abnormal
    /// paths: a check is normally reaped first): kill it and wait until the
    /// kernel says it let go, so its stack and strings are not freed under it.
    fn drop(&mut self) {
        if !self.finished && self.args.ctid.load(Ordering::Acquire) != 0 {
            // An unreaped child of ours: its pid cannot name anyone else.
            let _ = rustix::process::kill_process(self.pid, Signal::KILL);
            for _ in 0..500 {
                if self.args.ctid.load(Ordering::Acquire) == 0 {
                    break;
                }
                // SAFETY: FUTEX_WAIT on a live u32 with a 10 ms timeout.
                unsafe {
                    let ts = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 10_000_000,
                    };
                    libc::syscall(
                        libc::SYS_futex,
                        self.args.ctid.as_ptr(),
                        libc::FUTEX_WAIT,
                        1u32,
                        &ts as *const libc::timespec,
                    );
                }
            }
            if self.args.ctid.load(Ordering::Acquire) != 0 {
                // Never let go (stuck, or it dumped core): leak what it may use.
                tracing::error!(
                    pid = self.pid.as_raw_nonzero().get(),
                    "a new child never let go of its stack; leaking it"
                );
                std::mem::forget(self.stack.take());
                std::mem::forget(std::mem::replace(
                    &mut self.args,
                    Box::new(ChildArgs::empty()),
                ));
                return;
            }
        }
        let _ = self.finish();
    }
}

/// Create a child for `cmd`, without waiting for it to exec. The pipes'
/// read ends are O_NONBLOCK (both backends read them with non-blocking `read`).
///
/// `clone(CLONE_VM | CLONE_FILES | CLONE_PIDFD | CLONE_CHILD_CLEARTID)`: the
/// child shares our memory and descriptor table, so creating it copies
/// neither (the table holds 3 descriptors per running check; copying it
/// made a spawn cost 4× more at 6k checks in flight). It then, with raw
/// system calls only (see `rawsys`): resets every handler and the
/// dispositions daemons ignore, calls `setsid` (its own session and group
/// before anything else can happen to it), takes a private copy of just
/// the low part of the table it needs (`close_range(.., CLOSE_RANGE_UNSHARE)`),
/// moves /dev/null and the pipes onto 0–2, changes directory, closes every
/// other fd, unblocks signals and execs. A failed step leaves its errno in
/// `ChildArgs` and exits 127; the loop reports it when it reaps the child.
/// CLONE_PIDFD creates the pidfd with the child: out of fds, `clone` fails,
/// and a child without a pidfd cannot exist.
///
/// With a cgroup `leaf`, the child is created in it: `clone3` with
/// `CLONE_INTO_CGROUP` (the same flags otherwise), or, where the self-test
/// found that unusable (`cgroup::Entry::Write`), the child writes itself
/// into the leaf's `cgroup.procs` as its very first step.
pub(crate) fn launch(
    cmd: Prepared,
    launcher: &Launcher,
    leaf: Option<(&crate::cgroup::Leaf, crate::cgroup::Entry)>,
) -> Result<(Child, Launch), SpawnFailure> {
    let program = cmd.program();
    let (path, path_len, dirs, ndirs) = match search_for(&cmd)? {
        Some((path, dirs)) => (path.as_ptr(), path.len(), dirs.as_ptr(), dirs.len()),
        None => (std::ptr::null(), 0, std::ptr::null(), 0),
    };

    // Both ends non-blocking from the start (no ioctl per end); the child
    // makes its ends blocking again before it execs.
    let flags = PipeFlags::CLOEXEC | PipeFlags::NONBLOCK;
    let (out_r, out_w) = rustix::pipe::pipe_with(flags)
        .map_err(|e| SpawnFailure::new(&program, "cannot create pipe for", e))?;
    let (err_r, err_w) = rustix::pipe::pipe_with(flags)
        .map_err(|e| SpawnFailure::new(&program, "cannot create pipe for", e))?;
    let mut pool = launcher.pool.borrow_mut();
    let stack = pool
        .take_stack()
        .map_err(|e| SpawnFailure::new(&program, "cannot map a stack for", io_errno(&e)))?;
    let stdin = pool.devnull.as_raw_fd();
    let (parent, nofile) = (pool.parent, pool.nofile);
    let (write_ends, stdout, stderr) = match pool.lend_slots(&out_w, &err_w) {
        Some((i, a, b)) => (WriteEnds::Slots(i), a, b),
        None => {
            let fds = (out_w.as_raw_fd(), err_w.as_raw_fd());
            (WriteEnds::Own(out_w, err_w), fds.0, fds.1)
        }
    };
    drop(pool);

    let mut argv: Vec<*const libc::c_char> = std::iter::once(std::ptr::null())
        .chain(cmd.argv.iter().map(|s| s.as_ptr()))
        .chain([std::ptr::null()])
        .collect();
    let envp = c_array(&cmd.envp);
    let args = Box::new(ChildArgs {
        path,
        path_len,
        dirs,
        ndirs,
        name_len: cmd.argv[0].as_bytes().len(),
        argv: argv.as_mut_ptr(),
        envp: envp.as_ptr(),
        cwd: cmd.cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        stdin,
        stdout,
        stderr,
        parent,
        restore_nofile: nofile.is_some(),
        nofile: nofile.unwrap_or_default(),
        procs: match leaf {
            Some((leaf, crate::cgroup::Entry::Write)) => leaf.procs().map_or(-1, |f| f.as_raw_fd()),
            _ => -1,
        },
        exec: cmd.exec.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        set_ids: cmd.run_as.is_some(),
        uid: cmd.run_as.as_ref().map_or(0, |r| r.uid),
        gid: cmd.run_as.as_ref().map_or(0, |r| r.gid),
        groups: cmd
            .run_as
            .as_ref()
            .map_or(std::ptr::null(), |r| r.groups.as_ptr()),
        ngroups: cmd.run_as.as_ref().map_or(0, |r| r.groups.len()),
        errno: AtomicI32::new(0),
        step: AtomicU8::new(0),
        detached: AtomicU8::new(0),
        ctid: AtomicU32::new(1),
    });
    let mut launch = Launch {
        args,
        strings: LaunchStrings {
            cmd,
            _argv: argv,
            _envp: envp,
        },
        stack: Some(stack),
        write_ends,
        pid: Pid::INIT,
        // Until `clone` succeeds there is no child: dropping gives all back.
        finished: true,
        launcher: launcher.clone(),
    };
    let mut pidfd: libc::c_int = -1;
    let flags = libc::CLONE_VM
        | libc::CLONE_FILES
        | libc::CLONE_PIDFD
        | libc::CLONE_CHILD_CLEARTID
        | libc::SIGCHLD;
    let into = match leaf {
        Some((leaf, crate::cgroup::Entry::CloneInto)) => Some(leaf.dir().as_raw_fd()),
        _ => None,
    };
    let arg = (&*launch.args as *const ChildArgs).cast_mut().cast();
    let pid = if let Some(cgroup) = into {
        let (base, len) = launch.stack.as_ref().expect("just set").usable();
        let args = rawsys::CloneArgs {
            flags: (flags & !libc::SIGCHLD) as u64 | crate::cgroup::CLONE_INTO_CGROUP,
            pidfd: &mut pidfd as *mut libc::c_int as u64,
            child_tid: launch.args.ctid.as_ptr() as u64,
            exit_signal: libc::SIGCHLD as u64,
            stack: base as u64,
            stack_size: len as u64,
            cgroup: cgroup as u64,
            ..Default::default()
        };
        // SAFETY: as for `clone` below; `clone3` takes the stack as its
        // lowest address and size.
        match unsafe { rawsys::clone3(&args, child_main, arg) } {
            r if r < 0 => {
                let e = Errno::from_raw_os_error((-r) as i32);
                return Err(ChildStep::Clone.failure(&launch.strings.cmd, e));
            }
            r => r as libc::pid_t,
        }
    } else {
        // SAFETY: the child runs `child_main` on `launch.stack`, used by nothing
        // else until the kernel clears `args.ctid` (at the child's execve or
        // exit); `launch` keeps the stack, `args` and every string it points
        // into alive until then (its Drop waits for that). The child reads
        // `args` and writes only its atomic flags; it uses raw system calls,
        // never libc's errno. Every signal is blocked on the calling (loop)
        // thread, hence in the child until it has reset the dispositions. The
        // kernel writes the pidfd into `pidfd` and clears `args.ctid`.
        let top = launch.stack.as_ref().expect("just set").top();
        unsafe {
            libc::clone(
                child_main,
                top,
                flags,
                arg,
                &mut pidfd as *mut libc::c_int,
                std::ptr::null_mut::<libc::c_void>(),
                launch.args.ctid.as_ptr(),
            )
        }
    };
    if pid < 0 {
        let e = io_errno(&std::io::Error::last_os_error());
        return Err(ChildStep::Clone.failure(&launch.strings.cmd, e));
    }
    let started = Instant::now();
    launch.finished = false;
    // SAFETY: with CLONE_PIDFD a successful clone stored a new pidfd, owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let pid = Pid::from_raw(pid).expect("clone returned a positive pid");
    launch.pid = pid;
    let child = Child {
        pid,
        pidfd,
        stdout: out_r,
        stderr: err_r,
        started,
    };
    Ok((child, launch))
}

/// The NULL-terminated array of pointers `execve` takes.
fn c_array(strings: &[CString]) -> Vec<*const libc::c_char> {
    (strings.iter().map(|s| s.as_ptr()))
        .chain([std::ptr::null()])
        .collect()
}

/// The errno of an `io::Error` (EIO if it has none).
fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_io_error(e).unwrap_or(Errno::IO)
}

/// The PATH a bare program name is looked up in when the check's
/// environment has none (glibc's default).
pub(crate) const DEFAULT_PATH: &[u8] =
    b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Most different directories of a PATH that are searched. A real PATH
/// has a few dozen; each costs the child one failed `execve` (a few µs).
pub(crate) const MAX_SEARCH_DIRS: usize = 1024;

/// The longest bare program name looked up (`NAME_MAX`): no file has a
/// longer one, and `execvp` refuses it too.
const NAME_MAX: usize = 255;

/// A PATH, split once into the directories a bare program name is looked
/// for in, on the submitting thread (`Check::prepare_with`). Each
/// directory once, in order of first appearance: an empty entry (the
/// current directory) or a directory named again adds nothing, so a PATH
/// of a million `:` is one directory, not a million. The child builds one
/// candidate at a time (see `child_main`): nothing here grows with the
/// program name.
#[derive(Debug)]
pub(crate) struct SearchPath {
    value: Box<[u8]>,
    /// `(start, len)` of each directory in `value`; `Err` when it names
    /// more than `MAX_SEARCH_DIRS` (not searched at all: a partial search
    /// could run a different program than the full one would).
    dirs: Result<Box<[(usize, usize)]>, TooManyDirs>,
}

/// A PATH with more than `MAX_SEARCH_DIRS` different directories.
#[derive(Debug, Clone, Copy)]
struct TooManyDirs;

impl SearchPath {
    pub(crate) fn new(value: &[u8]) -> SearchPath {
        let mut seen = std::collections::HashSet::new();
        let mut dirs = Vec::new();
        let mut start = 0;
        for dir in value.split(|&b| b == b':') {
            if seen.insert(dir) {
                if dirs.len() == MAX_SEARCH_DIRS {
                    return SearchPath {
                        value: value.into(),
                        dirs: Err(TooManyDirs),
                    };
                }
                dirs.push((start, dir.len()));
            }
            start += dir.len() + 1;
        }
        SearchPath {
            value: value.into(),
            dirs: Ok(dirs.into()),
        }
    }

    /// `DEFAULT_PATH`, split once.
    pub(crate) fn default_path() -> std::sync::Arc<SearchPath> {
        static DEFAULT: std::sync::OnceLock<std::sync::Arc<SearchPath>> =
            std::sync::OnceLock::new();
        DEFAULT
            .get_or_init(|| std::sync::Arc::new(SearchPath::new(DEFAULT_PATH)))
            .clone()
    }

    /// The PATH as given.
    #[cfg(test)]
    pub(crate) fn value(&self) -> &[u8] {
        &self.value
    }

    /// The directories searched, in order (`None`: too many).
    #[cfg(test)]
    fn dirs(&self) -> Option<Vec<&[u8]>> {
        let dirs = self.dirs.as_ref().ok()?;
        Some(dirs.iter().map(|&(s, n)| &self.value[s..s + n]).collect())
    }
}

/// A PATH's bytes and its directories in them (see `SearchPath`).
type Dirs<'a> = (&'a [u8], &'a [(usize, usize)]);

/// Where the child looks for the program (`None`: `argv[0]` has a `/` and
/// is the file itself). O(1): the PATH was split on the submitting thread.
fn search_for(cmd: &Prepared) -> Result<Option<Dirs<'_>>, SpawnFailure> {
    let name = cmd.argv[0].as_bytes();
    if name.contains(&b'/') || cmd.exec.is_some() {
        return Ok(None);
    }
    if name.len() > NAME_MAX {
        return Err(SpawnFailure::new(
            &cmd.program(),
            "cannot find",
            Errno::NAMETOOLONG,
        ));
    }
    match &cmd.path.dirs {
        Ok(dirs) => Ok(Some((&cmd.path.value, dirs))),
        Err(TooManyDirs) => Err(SpawnFailure {
            errno: None,
            message: format!(
                "cannot find {}: its PATH names more than {MAX_SEARCH_DIRS} different directories, \
                 more than are searched (give the program's full path, or a shorter PATH)",
                cmd.program()
            ),
        }),
    }
}

/// Everything the child uses between `clone` and `execve`, prepared by the
/// parent: the child allocates nothing and calls nothing but raw syscalls.
#[repr(C)]
struct ChildArgs {
    /// Where to look for the program (`argv[0]`, of `name_len` bytes):
    /// `ndirs` directories, each `(start, len)` in the `path_len` bytes at
    /// `path` (a `SearchPath`). The child tries each, as `execvp` does, so
    /// that no PATH lookup touches the file system on the loop thread.
    /// `dirs` NULL: `argv[0]` has a `/` and is the file itself.
    path: *const u8,
    path_len: usize,
    dirs: *const (usize, usize),
    ndirs: usize,
    name_len: usize,
    /// A spare slot, then the NULL-terminated argv (from `argv.add(1)`).
    /// For a script without a `#!` line the child makes it `/bin/sh PATH
    /// ARGS...` in place (slot 0 the shell, slot 1 the path it found), as
    /// `execvp` runs it (Nagios starts plugins with `execvp`).
    argv: *mut *const libc::c_char,
    envp: *const *const libc::c_char,
    /// NULL: stay in the executor's directory.
    cwd: *const libc::c_char,
    stdin: libc::c_int,
    stdout: libc::c_int,
    stderr: libc::c_int,
    /// The executor's pid: the child's parent, unless the executor died.
    parent: libc::pid_t,
    /// Set RLIMIT_NOFILE to `nofile` (soft, hard) before exec.
    restore_nofile: bool,
    nofile: [u64; 2],
    /// The leaf's `cgroup.procs` to write "0" into first (-1: none, or
    /// born in the leaf).
    procs: libc::c_int,
    /// The file to execute (NULL: argv[0], looked up as above).
    exec: *const libc::c_char,
    /// Become `uid`/`gid` with the `ngroups` supplementary groups at
    /// `groups` (a `RunAs` that `Launch` keeps alive) before anything else.
    set_ids: bool,
    uid: u32,
    gid: u32,
    groups: *const libc::gid_t,
    ngroups: usize,
    /// Set by the child when a step failed (it then exits 127).
    errno: AtomicI32,
    /// The step the child is at (a `ChildStep`): set as it begins each
    /// one, so that a child stuck in one can be told where; if `errno` is
    /// set, the step that failed (set before `errno`).
    step: AtomicU8,
    /// Set by the child once it has its own session and descriptor table.
    detached: AtomicU8,
    /// 1 until the kernel clears it (CLONE_CHILD_CLEARTID) when the child
    /// execs or exits: from then on it uses nothing of ours.
    ctid: AtomicU32,
}

impl ChildArgs {
    /// A placeholder (for `Launch::drop`'s leak path).
    fn empty() -> ChildArgs {
        ChildArgs {
            path: std::ptr::null(),
            path_len: 0,
            dirs: std::ptr::null(),
            ndirs: 0,
            name_len: 0,
            argv: std::ptr::null_mut(),
            envp: std::ptr::null(),
            cwd: std::ptr::null(),
            stdin: -1,
            stdout: -1,
            stderr: -1,
            parent: 0,
            restore_nofile: false,
            nofile: [0; 2],
            procs: -1,
            exec: std::ptr::null(),
            set_ids: false,
            uid: 0,
            gid: 0,
            groups: std::ptr::null(),
            ngroups: 0,
            errno: AtomicI32::new(0),
            step: AtomicU8::new(0),
            detached: AtomicU8::new(0),
            ctid: AtomicU32::new(0),
        }
    }
}

/// A step of creating a child, named in the error when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChildStep {
    /// `clone` itself (process limit, out of fds for the pidfd, memory).
    Clone = 0,
    /// `setsid`.
    Setsid = 1,
    /// A private descriptor table, and /dev/null and the pipes on fds 0–2.
    Stdio = 2,
    /// Changing to the check's working directory.
    Chdir = 3,
    /// `execve`.
    Exec = 4,
    /// `execve` found the program, not its `#!` interpreter or ELF loader.
    Interpreter = 5,
    /// Moving into the check's cgroup (`cgroup.procs`).
    Cgroup = 6,
    /// Taking the configured user's groups, gid and uid.
    Credentials = 7,
}

impl ChildStep {
    fn from_u8(v: u8) -> ChildStep {
        match v {
            1 => ChildStep::Setsid,
            2 => ChildStep::Stdio,
            3 => ChildStep::Chdir,
            4 => ChildStep::Exec,
            5 => ChildStep::Interpreter,
            6 => ChildStep::Cgroup,
            7 => ChildStep::Credentials,
            _ => ChildStep::Clone,
        }
    }

    /// Where a child that has not exec'd is stuck, at this step.
    fn stuck(self, cmd: &Prepared) -> String {
        match self {
            ChildStep::Clone => "it never got to run (no CPU, or memory for it)".to_string(),
            ChildStep::Setsid | ChildStep::Stdio | ChildStep::Cgroup | ChildStep::Credentials => {
                "stuck setting up its session and standard streams".to_string()
            }
            ChildStep::Chdir => format!(
                "stuck changing to its working directory {} (a hung mount?)",
                cmd.cwd
                    .as_deref()
                    .map_or("?".into(), |c| c.to_string_lossy())
            ),
            ChildStep::Exec | ChildStep::Interpreter => format!(
                "stuck looking up or loading {} (a hung mount in its path or PATH?)",
                cmd.program()
            ),
        }
    }

    /// The error for this step failing with `errno`.
    fn failure(self, cmd: &Prepared, errno: Errno) -> SpawnFailure {
        let program = cmd.program();
        let what = match self {
            ChildStep::Clone => "cannot create a process for",
            ChildStep::Setsid => "cannot start a session for",
            ChildStep::Cgroup => "cannot put into its cgroup the process for",
            ChildStep::Credentials => "cannot switch to the configured user for",
            ChildStep::Stdio => "cannot set up the standard streams of",
            ChildStep::Chdir => {
                return SpawnFailure {
                    errno: Some(errno.raw_os_error()),
                    message: format!(
                        "cannot change to the working directory {} for {program}: {}",
                        cmd.cwd
                            .as_deref()
                            .map_or("?".into(), |c| c.to_string_lossy()),
                        std::io::Error::from(errno)
                    ),
                };
            }
            ChildStep::Exec if errno == Errno::NOENT => "cannot find",
            ChildStep::Exec => "cannot execute",
            ChildStep::Interpreter => {
                return SpawnFailure {
                    errno: Some(errno.raw_os_error()),
                    message: format!(
                        "cannot execute {program}: the interpreter its #! line names (or its ELF loader) does not exist"
                    ),
                };
            }
        };
        SpawnFailure::new(&program, what, errno)
    }
}

/// The child between `clone` and `execve`. It runs in the parent's memory on
/// a stack of ours, with every signal blocked, while the loop goes on: raw
/// system calls only, no allocation, no locks, no libc, no unwinding.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` that `Launch` keeps alive until we exec or exit.
    let args = unsafe { &*(arg as *const ChildArgs) };
    if args.procs >= 0 {
        // Into the check's cgroup before anything else (not born there).
        let r = rawsys::write(args.procs, b"0");
        if r < 0 {
            child_fail(args, ChildStep::Cgroup, r);
        }
    }
    if args.set_ids {
        // Groups, then gid, then uid (each needs the privilege the next
        // drops); all three ids, so there is no way back. Raw calls: glibc's
        // wrappers would make every thread of the executor change too.
        // Before PR_SET_PDEATHSIG, which a change of credentials clears.
        args.step
            .store(ChildStep::Credentials as u8, Ordering::Release);
        // SAFETY: `groups` points at `ngroups` gids that `Launch` keeps alive.
        let r = unsafe { rawsys::setgroups(args.ngroups, args.groups) };
        if r < 0 {
            child_fail(args, ChildStep::Credentials, r);
        }
        let r = rawsys::setresgid(args.gid);
        if r < 0 {
            child_fail(args, ChildStep::Credentials, r);
        }
        let r = rawsys::setresuid(args.uid);
        if r < 0 {
            child_fail(args, ChildStep::Credentials, r);
        }
    }
    // A handler the application installed must not run here (in the
    // parent's memory) once signals are unblocked: back to default.
    // Ignored signals stay ignored across execve, so the ones a check must
    // see are reset too.
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let mut old = rawsys::KernelSigaction::default();
        if rawsys::sigaction(sig, None, Some(&mut old)) != 0 {
            continue;
        }
        let reset = match old.handler {
            h if h == libc::SIG_DFL => false,
            h if h == libc::SIG_IGN => RESET_SIGNALS.contains(&sig),
            _ => true,
        };
        if reset {
            rawsys::sigaction(sig, Some(&rawsys::KernelSigaction::default()), None);
        }
    }
    let ok = |r: isize| r >= 0;
    // If the executor dies (even by SIGKILL), its loop thread with it, the
    // check is killed rather than left running with no one to time it out
    // or reap it. (Its descendants are not: nothing can be, then.) The
    // executor may have died before this line: then our parent is another.
    rawsys::set_parent_death_signal(libc::SIGKILL);
    if rawsys::getppid() != args.parent as isize {
        rawsys::exit(127);
    }
    let at = |step: ChildStep| args.step.store(step as u8, Ordering::Release);
    at(ChildStep::Setsid);
    let r = rawsys::setsid();
    if !ok(r) {
        child_fail(args, ChildStep::Setsid, r);
    }
    // A private table holding only what lies below the highest fd we need
    // (the rest of the executor's table is never copied); if this kernel
    // cannot (before 5.9), a full private copy.
    at(ChildStep::Stdio);
    let highest = args.stdin.max(args.stdout).max(args.stderr) as u32;
    let mut r = rawsys::close_range(highest + 1, u32::MAX, libc::CLOSE_RANGE_UNSHARE);
    if !ok(r) {
        r = rawsys::unshare(libc::CLONE_FILES);
    }
    if !ok(r) {
        child_fail(args, ChildStep::Stdio, r);
    }
    args.detached.store(1, Ordering::Release);
    for (fd, target) in [(args.stdin, 0), (args.stdout, 1), (args.stderr, 2)] {
        let r = if fd == target {
            // Already there: just let it survive execve.
            rawsys::fcntl(fd, libc::F_SETFD, 0)
        } else {
            rawsys::dup3(fd, target)
        };
        if !ok(r) {
            child_fail(args, ChildStep::Stdio, r);
        }
    }
    // The pipes were made O_NONBLOCK for the executor's read ends; a plugin
    // expects blocking writes. (/dev/null on 0 never had it.)
    for fd in [1, 2] {
        let r = rawsys::fcntl(fd, libc::F_SETFL, 0);
        if !ok(r) {
            child_fail(args, ChildStep::Stdio, r);
        }
    }
    if !args.cwd.is_null() {
        at(ChildStep::Chdir);
        // SAFETY: a NUL-terminated string that `Launch` keeps alive.
        let r = unsafe { rawsys::chdir(args.cwd) };
        if !ok(r) {
            child_fail(args, ChildStep::Chdir, r);
        }
    }
    // Everything of ours is close-on-exec; this also covers fds an
    // application opened without O_CLOEXEC.
    rawsys::close_range(3, u32::MAX, 0);
    if args.restore_nofile {
        // Lowering our own soft limit cannot fail for want of rights; if it
        // fails anyway, the check runs with the raised one.
        rawsys::set_rlimit(libc::RLIMIT_NOFILE, &args.nofile);
    }
    at(ChildStep::Exec);
    rawsys::unblock_all_signals();
    // The first candidate that exists and may be run wins; a later one is
    // tried after "not there" or "not allowed", and "not allowed" is what is
    // reported if nothing ran (as `execvp` does). "Not there" from a file
    // that is there means its interpreter is not.
    let mut found = Found::default();
    // SAFETY: argv[0] (slot 1 of `args.argv`) is a NUL-terminated string
    // that `Launch` keeps alive.
    let program = unsafe { *args.argv.add(1) };
    if !args.exec.is_null() {
        // SAFETY: `exec` is a NUL-terminated string that `Launch` keeps alive.
        unsafe { try_exec(args, args.exec, &mut found) };
    } else if args.dirs.is_null() {
        // SAFETY: as just above.
        unsafe { try_exec(args, program, &mut found) };
    } else {
        // SAFETY: `path` holds `path_len` bytes and `dirs` `ndirs` pairs
        // (a `SearchPath` that `Launch` keeps alive, read-only); argv[0]
        // has `name_len` bytes.
        let (path, dirs, name) = unsafe {
            (
                std::slice::from_raw_parts(args.path, args.path_len),
                std::slice::from_raw_parts(args.dirs, args.ndirs),
                std::slice::from_raw_parts(program.cast::<u8>(), args.name_len),
            )
        };
        // One candidate at a time, `dir/name\0`, on our stack: nothing
        // allocated, nothing that grows with the PATH. The kernel takes no
        // longer path; a directory that would make one is skipped, as
        // `execvp` does.
        let mut buf = [0u8; libc::PATH_MAX as usize];
        for &(start, len) in dirs {
            let dir = match path.get(start..start.wrapping_add(len)) {
                Some([]) => &b"."[..],
                Some(dir) => dir,
                None => continue,
            };
            let (slash, end) = (dir.len(), dir.len() + 1 + name.len());
            if end >= buf.len() {
                continue;
            }
            // In bounds: `end` < `buf.len()` (no panic here, in the child).
            buf[..slash].copy_from_slice(dir);
            buf[slash] = b'/';
            buf[slash + 1..end].copy_from_slice(name);
            buf[end] = 0;
            // SAFETY: `buf` now holds a NUL-terminated path.
            unsafe { try_exec(args, buf.as_ptr().cast(), &mut found) };
        }
    }
    if found.denied {
        child_fail(args, ChildStep::Exec, -(libc::EACCES as isize))
    }
    if found.no_interpreter {
        child_fail(args, ChildStep::Interpreter, -(libc::ENOENT as isize))
    }
    child_fail(args, ChildStep::Exec, -(libc::ENOENT as isize))
}

/// What the candidates tried so far said (see `try_exec`).
#[derive(Default)]
struct Found {
    /// One was there but not allowed.
    denied: bool,
    /// One was there but its interpreter was not.
    no_interpreter: bool,
}

/// Exec `path` from the child. Returns if the search goes on (not there,
/// not allowed); any other failure is reported and the child exits.
///
/// # Safety
/// `path` is NUL-terminated; `args.argv` and `args.envp` are as `Launch`
/// keeps them (argv's slots are ours to write until we exec).
unsafe fn try_exec(args: &ChildArgs, path: *const libc::c_char, found: &mut Found) {
    // SAFETY: as the caller vouches.
    unsafe {
        let r = rawsys::execve(path, args.argv.add(1), args.envp);
        match (-r) as i32 {
            libc::ENOENT if rawsys::exists(path) == 0 => found.no_interpreter = true,
            libc::ENOENT | libc::ENOTDIR => {}
            libc::EACCES => found.denied = true,
            libc::ENOEXEC => {
                *args.argv = SH.as_ptr();
                *args.argv.add(1) = path;
                let r = rawsys::execve(SH.as_ptr(), args.argv, args.envp);
                // No /bin/sh: what failed is still the plugin's format.
                let no_sh = r == -(libc::ENOENT as isize);
                let r = if no_sh { -(libc::ENOEXEC as isize) } else { r };
                child_fail(args, ChildStep::Exec, r)
            }
            _ => child_fail(args, ChildStep::Exec, r),
        }
    }
}

/// The shell that runs a script without `#!`.
const SH: &std::ffi::CStr = c"/bin/sh";

/// Report the failed step and its errno (`r` is `-errno`) to the loop and exit 127.
fn child_fail(args: &ChildArgs, step: ChildStep, r: isize) -> ! {
    args.step.store(step as u8, Ordering::Release);
    let errno = if r < 0 { (-r) as i32 } else { libc::EINVAL };
    args.errno.store(errno, Ordering::Release);
    rawsys::exit(127)
}

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
fn alive(pidfd: BorrowedFd<'_>) -> bool {
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
fn children_of(pid: i32) -> Vec<i32> {
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
fn ppid_and_pgrp(pid: i32) -> Option<(i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields after the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(1);
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((ppid, pgrp))
}

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
fn waitid_pidfd(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_names_each_directory_once_in_order() {
        let p = SearchPath::new(b"/a::/b:/a:::/c:");
        assert_eq!(p.dirs().unwrap(), [&b"/a"[..], b"", b"/b", b"/c"]);
        // A million empty entries are the current directory, once.
        let p = SearchPath::new(":".repeat(1_000_000).as_bytes());
        assert_eq!(p.dirs().unwrap(), [&b""[..]]);
        assert_eq!(SearchPath::new(b"").dirs().unwrap(), [&b""[..]]);
        assert_eq!(SearchPath::new(b"/bin").dirs().unwrap(), [&b"/bin"[..]]);
        assert_eq!(SearchPath::default_path().dirs().unwrap().len(), 6);
    }

    #[test]
    fn a_path_with_more_directories_than_searched_is_refused() {
        let path = |n: usize| {
            (0..n)
                .map(|i| format!("/d{i}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        let p = SearchPath::new(path(MAX_SEARCH_DIRS).as_bytes());
        assert_eq!(p.dirs().unwrap().len(), MAX_SEARCH_DIRS);
        // Repeats do not count.
        let twice = format!("{}:{}", path(MAX_SEARCH_DIRS), path(MAX_SEARCH_DIRS));
        assert_eq!(
            SearchPath::new(twice.as_bytes()).dirs().unwrap().len(),
            MAX_SEARCH_DIRS
        );
        assert!(
            SearchPath::new(path(MAX_SEARCH_DIRS + 1).as_bytes())
                .dirs()
                .is_none()
        );
    }

    #[test]
    fn e2big_says_too_long_once() {
        let f = SpawnFailure::new("/bin/true", "cannot execute", Errno::TOOBIG);
        assert_eq!(
            f.message.to_lowercase().matches("too long").count(),
            1,
            "{}",
            f.message
        );
    }
}
