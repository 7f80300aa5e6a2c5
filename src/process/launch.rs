//! Creating a check's child: the stacks and low descriptor slots lent to
//! children until they exec, the pipes, `clone` with `CLONE_PIDFD` (into
//! the check's cgroup leaf where there is one), and the bookkeeping of a
//! child that may not have exec'd yet.

use super::*;
use crate::check::Prepared;
use crate::rawsys;
use crate::search_path::{MAX_SEARCH_DIRS, TooManyDirs};
use rustix::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use rustix::io::Errno;
use rustix::pipe::PipeFlags;
use rustix::process::{Pid, Signal};
use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ffi::CString;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A child that now exists: its pid, pidfd and the read ends of its output pipes.
#[derive(Debug)]
pub(crate) struct Child {
    /// The leader's pid; also its process group id.
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

/// How long a child may take from `clone` to `execve` before the loop
/// stops waiting for it: it then no longer counts against the launches in
/// flight (`engine::MAX_PRE_EXEC`), and the low slot pair it holds is no
/// longer waited for (`ChildLoans::has_slots`). A healthy child execs within
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
    pub(super) base: *mut libc::c_void,
    pub(super) len: usize,
}

impl ChildStack {
    /// The child resets signals, moves three fds, changes directory and
    /// execs: a few KiB at most. 64 KiB leaves room for stack probes.
    const SIZE: usize = 64 * 1024;

    pub(super) fn new() -> std::io::Result<ChildStack> {
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
    pub(super) fn usable(&self) -> (*mut libc::c_void, usize) {
        // SAFETY: `SIZE` below the end is within our own mapping (above the guard page).
        (
            unsafe { self.top().cast::<u8>().sub(Self::SIZE).cast() },
            Self::SIZE,
        )
    }

    /// The initial stack pointer (stacks grow down; 16-byte aligned).
    pub(super) fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of our own mapping; `len` is page-aligned.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours; a stack is dropped only by the pool
        // or a `PreExecChild` once no child runs on it (see `PreExecChild::drop`).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// What the loop lends its children until they exec: stacks to run on, and
/// low descriptor numbers to pass their pipes' write ends in. Shared (`Rc`)
/// by the loop and every `PreExecChild`, which gives back what it holds when its
/// child is done with it; only the loop thread touches it.
#[derive(Clone)]
pub(crate) struct ChildLoans {
    pub(super) pool: Rc<RefCell<Pool>>,
}

/// The loaned resources (see `ChildLoans`).
pub(super) struct Pool {
    /// Stacks no child runs on any more: a stack mapped per spawn would be
    /// unmapped per spawn, and each unmap flushes the TLB of every CPU
    /// running one of our threads.
    pub(super) stacks: Vec<ChildStack>,
    /// /dev/null at a low number: every child's stdin, and what a low slot
    /// holds while no child uses it.
    pub(super) devnull: OwnedFd,
    /// Pairs of low descriptor numbers, held open on /dev/null (`None`: a
    /// pair given up because the kernel refused to reset it).
    pub(super) slots: Vec<Option<(OwnedFd, OwnedFd)>>,
    /// Free pairs, lowest first.
    pub(super) free: BinaryHeap<Reverse<usize>>,
    /// When each pair was lent to a child (`None`: free or given up).
    pub(super) lent_at: Vec<Option<Instant>>,
    /// This process: a child whose parent is no longer it must not go on.
    pub(super) parent: libc::pid_t,
    /// The RLIMIT_NOFILE (soft, hard) checks get instead of the executor's
    /// raised one (see `original_nofile_soft`); `None`: as is.
    pub(super) nofile: Option<[u64; 2]>,
    /// The executor has a controlling terminal, which each child lets go of.
    pub(super) drop_tty: bool,
}

impl ChildLoans {
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
    pub fn new(max_running: usize) -> std::io::Result<ChildLoans> {
        let devnull = open_devnull()?;
        let dup = || rustix::io::fcntl_dupfd_cloexec(&devnull, 0);
        let pairs = Self::SLOT_PAIRS.min(max_running.max(1));
        let mut slots = Vec::with_capacity(pairs);
        for _ in 0..pairs {
            slots.push(Some((dup()?, dup()?)));
        }
        Ok(ChildLoans {
            pool: Rc::new(RefCell::new(Pool {
                stacks: Vec::new(),
                devnull,
                free: (0..slots.len()).map(Reverse).collect(),
                lent_at: vec![None; slots.len()],
                slots,
                parent: rustix::process::getpid().as_raw_nonzero().get(),
                nofile: nofile_for_checks(),
                drop_tty: has_controlling_terminal(),
            })),
        })
    }

    /// A low slot pair is free, or none is worth waiting for: every pair
    /// is given up, or lent to a child that has held it for `STUCK_LAUNCH`
    /// (stuck before it took its own descriptor table; it may never let
    /// go). A child launched without a pair copies every descriptor below
    /// its pipes' numbers (three per running check) and closes them again;
    /// better to wait for a pre_exec child to let go of its pair, but not
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

/// Whether this process has a controlling terminal (`tty_nr`, field 7 of
/// /proc/self/stat), which its checks must not inherit; if /proc cannot
/// say, assume it has (a child without one then only gets ENXIO).
fn has_controlling_terminal() -> bool {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return true;
    };
    // The command name may hold spaces and parentheses: count after the last ')'.
    let after_comm = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    after_comm
        .split_whitespace()
        .nth(4)
        .and_then(|tty| tty.parse::<i64>().ok())
        .is_none_or(|tty| tty != 0)
}

/// The RLIMIT_NOFILE (soft, hard; `u64::MAX` is infinity) a check should
/// get, if the executor raised the soft limit above the one it started with.
pub(super) fn nofile_for_checks() -> Option<[u64; 2]> {
    let original = original_nofile_soft()?.unwrap_or(u64::MAX);
    let now = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let current = now.current.unwrap_or(u64::MAX);
    (original < current).then(|| [original, now.maximum.unwrap_or(u64::MAX)])
}

impl Pool {
    pub(super) fn take_stack(&mut self) -> std::io::Result<ChildStack> {
        match self.stacks.pop() {
            Some(stack) => Ok(stack),
            None => ChildStack::new(),
        }
    }

    pub(super) fn give_stack(&mut self, stack: ChildStack) {
        if self.stacks.len() < ChildLoans::KEEP_STACKS {
            self.stacks.push(stack);
        }
    }

    /// Put both write ends into the lowest free pair of slots: the pair's
    /// index and its two fds (`None`: none free, or the kernel refused; the
    /// caller passes the write ends as they are).
    pub(super) fn lend_slots(
        &mut self,
        out_w: &OwnedFd,
        err_w: &OwnedFd,
    ) -> Option<(usize, RawFd, RawFd)> {
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
    pub(super) fn return_slots(&mut self, i: usize) {
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

/// Our copies of a pre_exec child's pipe write ends.
pub(super) enum WriteEnds {
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
/// it back to the `ChildLoans` when the child is done with it.
pub(crate) struct PreExecChild {
    /// Boxed: the child reads it, and it and the kernel write its flags.
    pub(super) args: Box<ChildArgs>,
    /// The strings `args` points into.
    pub(super) strings: ChildStrings,
    /// The stack the child runs on; `None` once given back.
    pub(super) stack: Option<ChildStack>,
    /// The child shares our descriptor table until it has its own; our
    /// copies of its write ends are closed as soon as it has.
    pub(super) write_ends: WriteEnds,
    /// The child (unreaped while this is unfinished: its pid is pinned).
    pub(super) pid: Pid,
    /// The child exec'd or exited: nothing of ours is in use by it.
    pub(super) finished: bool,
    /// Where the stack and slots go back to.
    pub(super) loans: ChildLoans,
}

/// The C strings and pointer arrays a child reads until it execs.
pub(super) struct ChildStrings {
    /// Also the PATH the child searches (`ChildArgs::dirs`).
    pub(super) cmd: Prepared,
    /// A spare slot, then argv (see `ChildArgs::argv`).
    pub(super) _argv: Vec<*const libc::c_char>,
    pub(super) _envp: Vec<*const libc::c_char>,
}

impl PreExecChild {
    /// Whether the child has its own process group: only then
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

    pub(super) fn close_write_ends(&mut self) {
        match std::mem::replace(&mut self.write_ends, WriteEnds::Closed) {
            WriteEnds::Closed | WriteEnds::Own(..) => {}
            WriteEnds::Slots(i) => self.loans.pool.borrow_mut().return_slots(i),
        }
    }

    pub(super) fn finish(&mut self) -> Result<(), SpawnFailure> {
        self.finished = true;
        self.close_write_ends();
        if let Some(stack) = self.stack.take() {
            self.loans.pool.borrow_mut().give_stack(stack);
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

impl Drop for PreExecChild {
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
/// `clone3(CLONE_VM | CLONE_FILES | CLONE_PIDFD | CLONE_CHILD_CLEARTID)`: the
/// child shares our memory and descriptor table, so creating it copies
/// neither (the table holds 3 descriptors per running check; copying it
/// made a spawn cost 4× more at 6k checks in flight). It then, with raw
/// system calls only (see `rawsys`): resets the dispositions daemons
/// ignore (the kernel reset the handlers: `CLONE_CLEAR_SIGHAND`), calls
/// `setpgid` (its own group before anything else can happen to it), takes
/// a private copy of just the low part of the table it needs
/// (`close_range(.., CLOSE_RANGE_UNSHARE)`), lets go of the executor's
/// controlling terminal if there is one, moves /dev/null and the pipes onto
/// 0–2, changes directory, closes every
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
    loans: &ChildLoans,
    leaf: Option<(&crate::cgroup::Leaf, crate::cgroup::Entry)>,
) -> Result<(Child, PreExecChild), SpawnFailure> {
    let search = match search_for(&cmd)? {
        Some((path, dirs)) => (path.as_ptr(), path.len(), dirs.as_ptr(), dirs.len()),
        None => (std::ptr::null(), 0, std::ptr::null(), 0),
    };
    let program = cmd.program();
    let (out_r, out_w, err_r, err_w) = output_pipes(&program)?;
    let lent = borrow_from_pool(loans, &program, out_w, err_w)?;
    let mut argv: Vec<*const libc::c_char> = std::iter::once(std::ptr::null())
        .chain(cmd.argv.iter().map(|s| s.as_ptr()))
        .chain([std::ptr::null()])
        .collect();
    let envp = c_array(&cmd.envp);
    let args = child_args(&cmd, search, argv.as_mut_ptr(), envp.as_ptr(), &lent, leaf);
    let mut launch = PreExecChild {
        args,
        strings: ChildStrings {
            cmd,
            _argv: argv,
            _envp: envp,
        },
        stack: Some(lent.stack),
        write_ends: lent.write_ends,
        pid: Pid::INIT,
        // Until `clone` succeeds there is no child: dropping gives all back.
        finished: true,
        loans: loans.clone(),
    };
    let (pid, pidfd) = clone_child(&launch, leaf)?;
    let started = Instant::now();
    launch.finished = false;
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

/// The two output pipes, `(stdout read, stdout write, stderr read, stderr
/// write)`. Both ends non-blocking from the start (no ioctl per end); the
/// child makes its ends blocking again before it execs.
fn output_pipes(program: &str) -> Result<(OwnedFd, OwnedFd, OwnedFd, OwnedFd), SpawnFailure> {
    let flags = PipeFlags::CLOEXEC | PipeFlags::NONBLOCK;
    let (out_r, out_w) = rustix::pipe::pipe_with(flags)
        .map_err(|e| SpawnFailure::new(program, "cannot create pipe for", e))?;
    let (err_r, err_w) = rustix::pipe::pipe_with(flags)
        .map_err(|e| SpawnFailure::new(program, "cannot create pipe for", e))?;
    Ok((out_r, out_w, err_r, err_w))
}

/// What one child borrows from the loop's pool until it has exec'd.
struct Lent {
    stack: ChildStack,
    /// `/dev/null`, the child's stdin.
    stdin: RawFd,
    parent: libc::pid_t,
    nofile: Option<[u64; 2]>,
    drop_tty: bool,
    /// Where the pipes' write ends are held until the child has them.
    write_ends: WriteEnds,
    /// The write ends' numbers, as the child sees them.
    stdout: RawFd,
    stderr: RawFd,
}

/// A stack, and low fd slots for the write ends where some are free (so
/// the child's `dup3`s need no big descriptor table).
fn borrow_from_pool(
    loans: &ChildLoans,
    program: &str,
    out_w: OwnedFd,
    err_w: OwnedFd,
) -> Result<Lent, SpawnFailure> {
    let mut pool = loans.pool.borrow_mut();
    let stack = pool
        .take_stack()
        .map_err(|e| SpawnFailure::new(program, "cannot map a stack for", io_errno(&e)))?;
    let (write_ends, stdout, stderr) = match pool.lend_slots(&out_w, &err_w) {
        Some((i, a, b)) => (WriteEnds::Slots(i), a, b),
        None => {
            let fds = (out_w.as_raw_fd(), err_w.as_raw_fd());
            (WriteEnds::Own(out_w, err_w), fds.0, fds.1)
        }
    };
    Ok(Lent {
        stack,
        stdin: pool.devnull.as_raw_fd(),
        parent: pool.parent,
        nofile: pool.nofile,
        drop_tty: pool.drop_tty,
        write_ends,
        stdout,
        stderr,
    })
}

/// Everything the child reads before `execve`, pointing into `cmd`, `argv`
/// and `envp` (which the `PreExecChild` keeps alive).
fn child_args(
    cmd: &Prepared,
    (path, path_len, dirs, ndirs): (*const u8, usize, *const (usize, usize), usize),
    argv: *mut *const libc::c_char,
    envp: *const *const libc::c_char,
    lent: &Lent,
    leaf: Option<(&crate::cgroup::Leaf, crate::cgroup::Entry)>,
) -> Box<ChildArgs> {
    Box::new(ChildArgs {
        path,
        path_len,
        dirs,
        ndirs,
        name_len: cmd.argv[0].as_bytes().len(),
        argv,
        envp,
        cwd: cmd.cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        stdin: lent.stdin,
        stdout: lent.stdout,
        stderr: lent.stderr,
        parent: lent.parent,
        restore_nofile: lent.nofile.is_some(),
        nofile: lent.nofile.unwrap_or_default(),
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
        drop_tty: lent.drop_tty,
        handlers_cleared: AtomicU8::new(0),
        ctid: AtomicU32::new(1),
    })
}

/// Set once `clone3` refused `CLONE_CLEAR_SIGHAND`, and kept: from then on
/// children are made with `clone` and reset each handler themselves (before
/// 5.5, or where seccomp refuses `clone3` as older container runtimes do).
static CLEAR_SIGHAND_REFUSED: AtomicBool = AtomicBool::new(false);

/// Create the child, running `child_main` on the launch's stack: `clone3`
/// with the kernel resetting its handlers (`CLONE_CLEAR_SIGHAND`), straight
/// into the leaf (`CLONE_INTO_CGROUP`) when containment clones into it;
/// `clone` where `clone3` cannot. Its pid and pidfd.
fn clone_child(
    launch: &PreExecChild,
    leaf: Option<(&crate::cgroup::Leaf, crate::cgroup::Entry)>,
) -> Result<(Pid, OwnedFd), SpawnFailure> {
    let into = match leaf {
        Some((leaf, crate::cgroup::Entry::CloneInto)) => Some(leaf.dir().as_raw_fd()),
        _ => None,
    };
    let clear = !CLEAR_SIGHAND_REFUSED.load(Ordering::Relaxed);
    if clear || into.is_some() {
        match clone3_child(launch, into, clear) {
            Err(e) if clear && into.is_none() && refused(e) => {
                CLEAR_SIGHAND_REFUSED.store(true, Ordering::Relaxed);
                tracing::debug!(
                    "clone3(CLONE_CLEAR_SIGHAND) refused ({e}): children reset each handler themselves"
                );
            }
            Err(e) => return Err(ChildStep::Clone.failure(&launch.strings.cmd, e)),
            Ok(made) => {
                if clear {
                    super::let_sigchld_through();
                }
                return Ok(made);
            }
        }
    }
    clone_classic(launch)
}

/// How `clone3` or its flag is refused: EINVAL before 5.5 (the flag),
/// ENOSYS before 5.3 or under seccomp (glibc's own fallback to `clone`
/// is on ENOSYS too). A real failure shows again in `clone`, which reports it.
fn refused(e: Errno) -> bool {
    e == Errno::INVAL || e == Errno::NOSYS
}

/// The child's clone flags, but for the exit signal (`clone3` takes it apart).
const CLONE_FLAGS: libc::c_int =
    libc::CLONE_VM | libc::CLONE_FILES | libc::CLONE_PIDFD | libc::CLONE_CHILD_CLEARTID;

/// Tell the child whether the kernel clears its handlers; where it does not,
/// hold SIGCHLD on this thread first, so that none of the application's can
/// run in the child before it has reset them (`let_sigchld_through`).
fn handlers_cleared_by_kernel(launch: &PreExecChild, cleared: bool) {
    if !cleared {
        super::hold_sigchld();
    }
    launch
        .args
        .handlers_cleared
        .store(cleared as u8, Ordering::Relaxed);
}

/// `clone3`: the kernel clears the handlers if `clear`, and makes the child
/// in the cgroup directory `into` if given.
fn clone3_child(
    launch: &PreExecChild,
    into: Option<RawFd>,
    clear: bool,
) -> Result<(Pid, OwnedFd), Errno> {
    handlers_cleared_by_kernel(launch, clear);
    let mut pidfd: libc::c_int = -1;
    let (base, len) = launch.stack.as_ref().expect("just set").usable();
    let mut flags = CLONE_FLAGS as u64;
    if clear {
        flags |= rawsys::CLONE_CLEAR_SIGHAND;
    }
    if into.is_some() {
        flags |= crate::cgroup::CLONE_INTO_CGROUP;
    }
    let args = rawsys::CloneArgs {
        flags,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        child_tid: launch.args.ctid.as_ptr() as u64,
        exit_signal: libc::SIGCHLD as u64,
        stack: base as u64,
        stack_size: len as u64,
        cgroup: into.unwrap_or(0) as u64,
        ..Default::default()
    };
    let arg = (&*launch.args as *const ChildArgs).cast_mut().cast();
    // SAFETY: as for `clone` in `clone_classic`; `clone3` takes the stack
    // as its lowest address and size.
    let pid = match unsafe { rawsys::clone3(&args, child_main, arg) } {
        r if r < 0 => return Err(Errno::from_raw_os_error((-r) as i32)),
        r => r as libc::pid_t,
    };
    // SAFETY: with CLONE_PIDFD a successful clone stored a new pidfd, owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok((
        Pid::from_raw(pid).expect("clone returned a positive pid"),
        pidfd,
    ))
}

/// `clone`, where `clone3` is refused: the child resets each handler itself.
fn clone_classic(launch: &PreExecChild) -> Result<(Pid, OwnedFd), SpawnFailure> {
    handlers_cleared_by_kernel(launch, false);
    let mut pidfd: libc::c_int = -1;
    let arg = (&*launch.args as *const ChildArgs).cast_mut().cast();
    // SAFETY: the child runs `child_main` on `launch.stack`, used by nothing
    // else until the kernel clears `args.ctid` (at the child's execve or
    // exit); `launch` keeps the stack, `args` and every string it points
    // into alive until then (its Drop waits for that). The child reads
    // `args` and writes only its atomic flags; it uses raw system calls,
    // never libc's errno. Every signal is blocked on the calling (loop)
    // thread, hence in the child until it has reset the dispositions. The
    // kernel writes the pidfd into `pidfd` and clears `args.ctid`.
    let top = launch.stack.as_ref().expect("just set").top();
    let pid = unsafe {
        libc::clone(
            child_main,
            top,
            CLONE_FLAGS | libc::SIGCHLD,
            arg,
            &mut pidfd as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_void>(),
            launch.args.ctid.as_ptr(),
        )
    };
    if pid < 0 {
        let e = io_errno(&std::io::Error::last_os_error());
        return Err(ChildStep::Clone.failure(&launch.strings.cmd, e));
    }
    // SAFETY: with CLONE_PIDFD a successful clone stored a new pidfd, owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok((
        Pid::from_raw(pid).expect("clone returned a positive pid"),
        pidfd,
    ))
}

/// The NULL-terminated array of pointers `execve` takes.
pub(super) fn c_array(strings: &[CString]) -> Vec<*const libc::c_char> {
    (strings.iter().map(|s| s.as_ptr()))
        .chain([std::ptr::null()])
        .collect()
}

/// The errno of an `io::Error` (EIO if it has none).
pub(super) fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_io_error(e).unwrap_or(Errno::IO)
}

/// The longest bare program name looked up (`NAME_MAX`): no file has a
/// longer one, and `execvp` refuses it too.
pub(super) const NAME_MAX: usize = 255;

/// A PATH's bytes and its directories in them (see `SearchPath`).
pub(super) type Dirs<'a> = (&'a [u8], &'a [(usize, usize)]);

/// Where the child looks for the program (`None`: `argv[0]` has a `/` and
/// is the file itself). O(1): the PATH was split on the submitting thread.
pub(super) fn search_for(cmd: &Prepared) -> Result<Option<Dirs<'_>>, SpawnFailure> {
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
