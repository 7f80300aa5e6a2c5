//! The process layer: create a check's child (own session and process group,
//! stdin from /dev/null, stdout/stderr into pipes, nothing else inherited),
//! open its pidfd, signal it, and reap it with `waitid(P_PIDFD)`.
//!
//! Every function here returns errors as values; none of them panics on a
//! kernel refusal, because a refusal for one check must not hurt the others.

use crate::check::Prepared;
use crate::result::{ExitStatus, Rusage};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use rustix::pipe::PipeFlags;
use rustix::process::{Pid, PidfdFlags, Signal};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
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
    /// When the child came to exist (right after `posix_spawn` returned).
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

/// Create a child for `cmd`. `nonblocking` makes the read ends O_NONBLOCK (the
/// epoll and io_uring backends both read them with non-blocking `read`).
pub(crate) fn spawn(cmd: &Prepared, devnull: BorrowedFd<'_>) -> Result<Child, SpawnFailure> {
    let program = cmd.program();
    let path = resolve(cmd).map_err(|e| SpawnFailure::new(&program, "cannot find", e))?;

    let flags = PipeFlags::CLOEXEC;
    let (out_r, out_w) = rustix::pipe::pipe_with(flags)
        .map_err(|e| SpawnFailure::new(&program, "cannot create pipe for", e))?;
    let (err_r, err_w) = rustix::pipe::pipe_with(flags)
        .map_err(|e| SpawnFailure::new(&program, "cannot create pipe for", e))?;
    for fd in [&out_r, &err_r] {
        rustix::io::ioctl_fionbio(fd, true)
            .map_err(|e| SpawnFailure::new(&program, "cannot set up pipe for", e))?;
    }
    // Hold one descriptor slot for the pidfd: once the child exists we must get
    // a pidfd for it, and EMFILE at that point would leave a child we can only
    // reach by number.
    let reserve = rustix::io::fcntl_dupfd_cloexec(devnull, 0)
        .map_err(|e| SpawnFailure::new(&program, "cannot reserve a descriptor for", e))?;

    let pid = posix_spawn(&path, cmd, devnull, out_w.as_fd(), err_w.as_fd())
        .map_err(|e| SpawnFailure::new(&program, "cannot execute", e))?;
    let started = Instant::now();
    drop(out_w);
    drop(err_w);

    drop(reserve);
    let pidfd = match rustix::process::pidfd_open(pid, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(e) => {
            // Another thread took the reserved slot. The child is ours and
            // unreaped, so its pid and group are pinned: kill the group and
            // reap by pid, on this (spawner) thread, never the loop.
            // (No log: this runs on a spawner thread, which never logs.)
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
            return Err(SpawnFailure::new(&program, "cannot open pidfd for", e));
        }
    };
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

/// `posix_spawn` with: new session (so pgid = sid = pid, set inside the spawn,
/// never in a parent-side step), default signal dispositions and an empty
/// mask, stdin from /dev/null, stdout/stderr to the pipes, every fd ≥ 3 closed.
fn posix_spawn(
    path: &CString,
    cmd: &Prepared,
    devnull: BorrowedFd<'_>,
    stdout: BorrowedFd<'_>,
    stderr: BorrowedFd<'_>,
) -> Result<Pid, Errno> {
    let mut argv: Vec<*mut libc::c_char> = cmd.argv.iter().map(|a| a.as_ptr() as *mut _).collect();
    argv.push(std::ptr::null_mut());
    let mut envp: Vec<*mut libc::c_char> = cmd.envp.iter().map(|e| e.as_ptr() as *mut _).collect();
    envp.push(std::ptr::null_mut());

    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(Errno::from_raw_os_error(rc))
        }
    };

    // SAFETY: zeroed memory is a valid argument to the *_init functions, which
    // fully initialise these opaque glibc structures before any other use.
    let mut actions: libc::posix_spawn_file_actions_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut attr: libc::posix_spawnattr_t = unsafe { std::mem::zeroed() };
    // SAFETY: initialising the structures we own; destroyed below on every path.
    check(unsafe { libc::posix_spawn_file_actions_init(&mut actions) })?;
    // SAFETY: as above.
    if let Err(e) = check(unsafe { libc::posix_spawnattr_init(&mut attr) }) {
        // SAFETY: `actions` was initialised above.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut actions) };
        return Err(e);
    }

    // SAFETY: all pointers are to initialised structures and live C strings;
    // the fds are open for the whole call; argv/envp are NULL-terminated
    // arrays of pointers into `cmd`, which outlives the call.
    let result = unsafe {
        (|| {
            check(libc::posix_spawn_file_actions_adddup2(
                &mut actions,
                devnull.as_raw_fd(),
                0,
            ))?;
            check(libc::posix_spawn_file_actions_adddup2(
                &mut actions,
                stdout.as_raw_fd(),
                1,
            ))?;
            check(libc::posix_spawn_file_actions_adddup2(
                &mut actions,
                stderr.as_raw_fd(),
                2,
            ))?;
            if let Some(cwd) = &cmd.cwd {
                check(libc::posix_spawn_file_actions_addchdir_np(
                    &mut actions,
                    cwd.as_ptr(),
                ))?;
            }
            check(libc::posix_spawn_file_actions_addclosefrom_np(
                &mut actions,
                3,
            ))?;

            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            check(libc::posix_spawnattr_setsigmask(&mut attr, &empty))?;
            let mut defaults: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut defaults);
            for &sig in RESET_SIGNALS {
                libc::sigaddset(&mut defaults, sig);
            }
            check(libc::posix_spawnattr_setsigdefault(&mut attr, &defaults))?;
            let flags = libc::POSIX_SPAWN_SETSID as i32
                | libc::POSIX_SPAWN_SETSIGMASK
                | libc::POSIX_SPAWN_SETSIGDEF;
            check(libc::posix_spawnattr_setflags(
                &mut attr,
                flags as libc::c_short,
            ))?;

            let mut pid: libc::pid_t = 0;
            check(libc::posix_spawn(
                &mut pid,
                path.as_ptr(),
                &actions,
                &attr,
                argv.as_ptr(),
                envp.as_ptr(),
            ))?;
            Ok(pid)
        })()
    };
    // SAFETY: both structures were initialised above and are not used again.
    unsafe {
        libc::posix_spawn_file_actions_destroy(&mut actions);
        libc::posix_spawnattr_destroy(&mut attr);
    }
    let pid = result?;
    Pid::from_raw(pid).ok_or(Errno::SRCH)
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
