//! The process layer: create a check's child (own session and process group,
//! stdin from /dev/null, stdout/stderr into pipes, nothing else inherited),
//! open its pidfd, signal it, and reap it with `waitid(P_PIDFD)`.
//!
//! Every function here returns errors as values; none of them panics on a
//! kernel refusal, because a refusal for one check must not hurt the others.

use crate::check::Prepared;
use crate::result::{ExitStatus, Rusage};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use rustix::io::Errno;
use rustix::pipe::PipeFlags;
use rustix::process::{Pid, Signal};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::time::Instant;

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
    /// When the child came to exist (stamped when `clone` returned, i.e. once it exec'd).
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
            Errno::NOEXEC => " (not a binary, and no #! line)",
            Errno::TOOBIG => " (argument list too long)",
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

/// What a spawner thread needs to create children: its own stack for the
/// child to run on until `execve`, and proof that every signal is blocked on
/// this thread (the child starts with this thread's mask and handlers, and
/// must not run one of the application's handlers in our address space).
///
/// Made once per spawner thread, and only usable there.
pub(crate) struct Spawner {
    /// The child's stack: mapped once, reused by every spawn on this thread
    /// (the thread is suspended while the child runs on it).
    stack: ChildStack,
    /// Not `Send`: the signal mask belongs to the thread that made this.
    _thread_bound: std::marker::PhantomData<*const ()>,
}

impl Spawner {
    /// Block every signal on the calling thread for good and map a child stack.
    pub fn for_this_thread() -> std::io::Result<Spawner> {
        // SAFETY: sigfillset initialises the set; pthread_sigmask only reads it.
        let rc = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(Spawner {
            stack: ChildStack::new()?,
            _thread_bound: std::marker::PhantomData,
        })
    }
}

/// A stack for the child between `clone` and `execve`, with a guard page below it.
struct ChildStack {
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

    /// The initial stack pointer (stacks grow down; 16-byte aligned).
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of our own mapping; `len` is page-aligned.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours, and no child runs on it once the
        // spawner thread (suspended during each child's run) drops it.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Create a child for `cmd` on a spawner thread. The pipes' read ends are
/// O_NONBLOCK (both backends read them with non-blocking `read`).
pub(crate) fn spawn(
    spawner: &Spawner,
    cmd: &Prepared,
    devnull: BorrowedFd<'_>,
) -> Result<Child, SpawnFailure> {
    let program = cmd.program();
    let path = resolve(cmd).map_err(|e| SpawnFailure::new(&program, "cannot find", e))?;

    // Both ends non-blocking from the start (no ioctl per end here); the
    // child makes its ends blocking again before it execs.
    let flags = PipeFlags::CLOEXEC | PipeFlags::NONBLOCK;
    let (out_r, out_w) = rustix::pipe::pipe_with(flags)
        .map_err(|e| SpawnFailure::new(&program, "cannot create pipe for", e))?;
    let (err_r, err_w) = rustix::pipe::pipe_with(flags)
        .map_err(|e| SpawnFailure::new(&program, "cannot create pipe for", e))?;

    let (pid, pidfd) = clone_and_exec(spawner, &path, cmd, devnull, out_w.as_fd(), err_w.as_fd())
        .map_err(|(step, e)| match step {
        ChildStep::Chdir => SpawnFailure {
            errno: Some(e.raw_os_error()),
            message: format!(
                "cannot change to the working directory {} for {program}: {}",
                cmd.cwd
                    .as_deref()
                    .map_or("?".into(), |c| c.to_string_lossy()),
                std::io::Error::from(e)
            ),
        },
        step => SpawnFailure::new(&program, step.what(), e),
    })?;
    let started = Instant::now();
    Ok(Child {
        pid,
        pidfd,
        stdout: out_r,
        stderr: err_r,
        started,
    })
}

/// The executable to run: `argv[0]` when it has a `/`, else searched in the check's PATH.
fn resolve(cmd: &Prepared) -> Result<CString, Errno> {
    let name = cmd.argv[0].as_bytes();
    if name.contains(&b'/') {
        return Ok(cmd.argv[0].clone());
    }
    let path = cmd
        .path_var
        .as_deref()
        .unwrap_or(b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let mut denied = false;
    for dir in path.split(|&b| b == b':') {
        let dir = if dir.is_empty() { &b"."[..] } else { dir };
        let mut full = Vec::with_capacity(dir.len() + name.len() + 1);
        full.extend_from_slice(dir);
        full.push(b'/');
        full.extend_from_slice(name);
        let full = CString::new(full).map_err(|_| Errno::INVAL)?;
        match rustix::fs::access(full.as_c_str(), rustix::fs::Access::EXEC_OK) {
            Ok(()) => {
                // A directory is "executable" too; only regular files count.
                if std::fs::metadata(std::ffi::OsStr::from_bytes(full.as_bytes()))
                    .map(|m| m.is_file())
                    .unwrap_or(false)
                {
                    return Ok(full);
                }
            }
            Err(Errno::ACCESS) => denied = true,
            Err(_) => {}
        }
    }
    Err(if denied { Errno::ACCESS } else { Errno::NOENT })
}

/// Everything the child uses between `clone` and `execve`, prepared by the
/// parent: the child allocates nothing and calls nothing but syscalls.
#[repr(C)]
struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// NULL: stay in the executor's directory.
    cwd: *const libc::c_char,
    stdin: libc::c_int,
    stdout: libc::c_int,
    stderr: libc::c_int,
    /// Set by the child when a step failed (it then `_exit`s 127). The parent
    /// reads it once `clone` returned, which with CLONE_VFORK is after the
    /// child exec'd or exited.
    errno: AtomicI32,
    /// Which step failed (a `ChildStep`), set with `errno`.
    step: AtomicU8,
}

/// A step of creating a child, named in the error when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChildStep {
    /// `clone` itself (process limit, out of fds for the pidfd, memory).
    Clone = 0,
    /// `setsid`.
    Setsid = 1,
    /// Putting /dev/null and the pipes on fds 0–2.
    Stdio = 2,
    /// Changing to the check's working directory.
    Chdir = 3,
    /// `execve`.
    Exec = 4,
}

impl ChildStep {
    fn from_u8(v: u8) -> ChildStep {
        match v {
            1 => ChildStep::Setsid,
            2 => ChildStep::Stdio,
            3 => ChildStep::Chdir,
            4 => ChildStep::Exec,
            _ => ChildStep::Clone,
        }
    }

    /// The message's verb phrase, before the program name.
    fn what(self) -> &'static str {
        match self {
            ChildStep::Clone => "cannot create a process for",
            ChildStep::Setsid => "cannot start a session for",
            ChildStep::Stdio => "cannot set up the standard streams of",
            ChildStep::Chdir => "cannot change to the working directory of",
            ChildStep::Exec => "cannot execute",
        }
    }
}

/// `clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD)` the child into its own
/// session (so pgid = sid = pid, set by the child itself, never in a
/// parent-side step), with default dispositions, an empty signal mask,
/// stdin from /dev/null, stdout/stderr into the pipes and every fd ≥ 3
/// closed; then `execve`.
///
/// This is what glibc's `posix_spawn` does, minus what costs the executor
/// CPU on every check: a stack mapped and unmapped per call (the unmap
/// flushes the TLB of every CPU running one of our threads), a
/// `getrlimit` per file action, the signal mask saved and restored around
/// each call (spawner threads block everything for good), and a separate
/// `pidfd_open` (CLONE_PIDFD creates the pidfd with the child, so a child
/// without a pidfd can never exist: out of fds, `clone` fails instead).
fn clone_and_exec(
    spawner: &Spawner,
    path: &CString,
    cmd: &Prepared,
    devnull: BorrowedFd<'_>,
    stdout: BorrowedFd<'_>,
    stderr: BorrowedFd<'_>,
) -> Result<(Pid, OwnedFd), (ChildStep, Errno)> {
    let mut argv: Vec<*const libc::c_char> = cmd.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = cmd.envp.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let args = ChildArgs {
        path: path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: cmd.cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        stdin: devnull.as_raw_fd(),
        stdout: stdout.as_raw_fd(),
        stderr: stderr.as_raw_fd(),
        errno: AtomicI32::new(0),
        step: AtomicU8::new(0),
    };
    let mut pidfd: libc::c_int = -1;
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD;
    // SAFETY: the child runs `child_main` on a stack of its own (this
    // thread's `ChildStack`, unused by anything else while this thread is
    // suspended, as CLONE_VFORK guarantees until the child exec'd or
    // exited). It shares our memory and only reads `args` (alive across the
    // call) and the strings it points into, and writes `args.errno`. Every
    // signal is blocked on this thread (`Spawner`), hence in the child until
    // it has reset the dispositions. The kernel writes the pidfd into `pidfd`.
    let pid = unsafe {
        libc::clone(
            child_main,
            spawner.stack.top(),
            flags,
            (&args as *const ChildArgs).cast_mut().cast(),
            &mut pidfd as *mut libc::c_int,
        )
    };
    if pid < 0 {
        let e = Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::AGAIN);
        return Err((ChildStep::Clone, e));
    }
    // SAFETY: with CLONE_PIDFD a successful clone stored a new pidfd, owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let failed = args.errno.load(Ordering::Acquire);
    if failed != 0 {
        // The child exited (127) without exec'ing: reap it now. It is
        // exiting or gone already, so this wait is short.
        let _ = rustix::process::waitid(
            rustix::process::WaitId::PidFd(pidfd.as_fd()),
            rustix::process::WaitIdOptions::EXITED,
        );
        let step = ChildStep::from_u8(args.step.load(Ordering::Acquire));
        return Err((step, Errno::from_raw_os_error(failed)));
    }
    let pid = Pid::from_raw(pid).ok_or((ChildStep::Clone, Errno::SRCH))?;
    Ok((pid, pidfd))
}

/// The child between `clone` and `execve`. It runs in the parent's memory on
/// the spawner's `ChildStack`, with every signal blocked: only syscalls here,
/// no allocation, no locks, no unwinding.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` the parent keeps alive until we exec or exit.
    let args = unsafe { &*(arg as *const ChildArgs) };
    // SAFETY: the parent made every pointer in `args` valid and NUL-terminated
    // for the duration; the calls below are plain syscall wrappers.
    unsafe {
        // A handler the application installed must not run here (in the
        // parent's memory) once signals are unblocked: back to default.
        // Ignored signals stay ignored across execve, so the ones a check
        // must see are reset too.
        for sig in 1..libc::SIGRTMAX() + 1 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            let reset = match old.sa_sigaction {
                libc::SIG_DFL => false,
                libc::SIG_IGN => RESET_SIGNALS.contains(&sig),
                _ => true,
            };
            if reset {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        if libc::setsid() < 0 {
            child_fail(args, ChildStep::Setsid);
        }
        for (fd, target) in [(args.stdin, 0), (args.stdout, 1), (args.stderr, 2)] {
            let ok = if fd == target {
                // dup2 onto itself would leave it close-on-exec.
                libc::fcntl(fd, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, target) == target
            };
            if !ok {
                child_fail(args, ChildStep::Stdio);
            }
        }
        // The pipes were made O_NONBLOCK for the executor's read ends; a
        // plugin expects blocking writes. (The flag is per open file, and
        // these write ends are the child's alone once the spawner closes
        // its copies.) /dev/null on 0 never had it.
        for fd in [1, 2] {
            if libc::fcntl(fd, libc::F_SETFL, 0) != 0 {
                child_fail(args, ChildStep::Stdio);
            }
        }
        if !args.cwd.is_null() && libc::chdir(args.cwd) != 0 {
            child_fail(args, ChildStep::Chdir);
        }
        // Everything of ours is close-on-exec; this also covers fds an
        // application opened without O_CLOEXEC. ENOSYS (before Linux 5.9)
        // leaves them to close-on-exec alone.
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(args.path, args.argv, args.envp);
        child_fail(args, ChildStep::Exec)
    }
}

/// Report the failed step and its errno to the parent and exit 127.
fn child_fail(args: &ChildArgs, step: ChildStep) -> ! {
    // SAFETY: reading errno (this task's, set by the call that just failed).
    let errno = unsafe { *libc::__errno_location() };
    args.step.store(step as u8, Ordering::Relaxed);
    args.errno.store(
        if errno == 0 { libc::EINVAL } else { errno },
        Ordering::Release,
    );
    // SAFETY: `_exit` ends only this child (it is its own thread group).
    unsafe { libc::_exit(127) }
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

/// Emergency path for a child nobody will track: SIGKILL leader and group,
/// then a blocking reap through the pidfd. Never called on the loop's hot path.
pub(crate) fn kill_and_reap(child: Child) {
    let _ = signal_leader(child.pidfd.as_fd(), Signal::KILL);
    let _ = signal_group_of_unreaped_leader(child.pid, Signal::KILL);
    let _ = rustix::process::waitid(
        rustix::process::WaitId::PidFd(child.pidfd.as_fd()),
        rustix::process::WaitIdOptions::EXITED,
    );
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
    // SAFETY: siginfo_t and rusage are plain C structs for which all-zero is valid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes only into the two structs we pass, which live
    // across the call; the pidfd is open for the call's duration.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_waitid,
            libc::P_PIDFD,
            pidfd.as_raw_fd(),
            &mut info as *mut libc::siginfo_t,
            libc::WEXITED | libc::WNOHANG,
            &mut ru as *mut libc::rusage,
        )
    };
    if rc < 0 {
        return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::INVAL));
    }
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

/// Open /dev/null once per executor (O_CLOEXEC), to become every check's stdin.
pub(crate) fn open_devnull() -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        "/dev/null",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?)
}
