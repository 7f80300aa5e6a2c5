//! The child's own code, from `clone` to `execve`: it shares the loop's
//! memory, so it allocates nothing and makes only raw system calls
//! (`rawsys`), and reports a failed step through memory the loop reads.

use super::*;
use crate::check::Prepared;
use crate::rawsys;
use rustix::io::Errno;
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU32, Ordering};

/// Signals that may be ignored in the executor (Rust ignores SIGPIPE, daemons
/// ignore others) and must be back to default in a check: ignored dispositions
/// survive `execve`.
pub(super) const RESET_SIGNALS: &[i32] = &[
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

/// Block every signal on the calling thread. The loop thread does this
/// before it creates its first child: a child starts with its creator's
/// mask and handlers, runs in the executor's memory until it execs, and
/// must not run one of the application's handlers there. (SIGCHLD is let
/// through later where the kernel clears the handlers: `let_sigchld_through`.)
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

thread_local! {
    /// Whether this (loop) thread lets SIGCHLD through: see `let_sigchld_through`.
    static SIGCHLD_THROUGH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Let SIGCHLD through on this (loop) thread, once children are made with
/// `CLONE_CLEAR_SIGHAND`: no handler of the application's can then run in
/// one, whatever its mask. Blocked here, a default-ignored SIGCHLD cannot be
/// dropped when a check exits (the kernel keeps a blocked signal), and is
/// handed to another thread of the application, waking it: measured,
/// ~0.8 wake-ups per check of the bench's idle main thread.
pub(crate) fn let_sigchld_through() {
    if !SIGCHLD_THROUGH.get() {
        set_sigchld(libc::SIG_UNBLOCK);
        SIGCHLD_THROUGH.set(true);
    }
}

/// Block SIGCHLD on this thread again, before a child is made that resets
/// its handlers itself (`clone`, where `clone3` was refused).
pub(crate) fn hold_sigchld() {
    if SIGCHLD_THROUGH.get() {
        set_sigchld(libc::SIG_BLOCK);
        SIGCHLD_THROUGH.set(false);
    }
}

fn set_sigchld(how: libc::c_int) {
    // SAFETY: sigemptyset/sigaddset initialise the set; pthread_sigmask
    // only reads it (it cannot fail with a valid `how`).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Everything the child uses between `clone` and `execve`, prepared by the
/// parent: the child allocates nothing and calls nothing but raw syscalls.
#[repr(C)]
pub(super) struct ChildArgs {
    /// Where to look for the program (`argv[0]`, of `name_len` bytes):
    /// `ndirs` directories, each `(start, len)` in the `path_len` bytes at
    /// `path` (a `SearchPath`). The child tries each, as `execvp` does, so
    /// that no PATH lookup touches the file system on the loop thread.
    /// `dirs` NULL: `argv[0]` has a `/` and is the file itself.
    pub(super) path: *const u8,
    pub(super) path_len: usize,
    pub(super) dirs: *const (usize, usize),
    pub(super) ndirs: usize,
    pub(super) name_len: usize,
    /// A spare slot, then the NULL-terminated argv (from `argv.add(1)`).
    /// For a script without a `#!` line the child makes it `/bin/sh PATH
    /// ARGS...` in place (slot 0 the shell, slot 1 the path it found), as
    /// `execvp` runs it (Nagios starts plugins with `execvp`).
    pub(super) argv: *mut *const libc::c_char,
    pub(super) envp: *const *const libc::c_char,
    /// NULL: stay in the executor's directory.
    pub(super) cwd: *const libc::c_char,
    pub(super) stdin: libc::c_int,
    pub(super) stdout: libc::c_int,
    pub(super) stderr: libc::c_int,
    /// The executor's pid: the child's parent, unless the executor died.
    pub(super) parent: libc::pid_t,
    /// Set RLIMIT_NOFILE to `nofile` (soft, hard) before exec.
    pub(super) restore_nofile: bool,
    pub(super) nofile: [u64; 2],
    /// The leaf's `cgroup.procs` to write "0" into first (-1: none, or
    /// born in the leaf).
    pub(super) procs: libc::c_int,
    /// The file to execute (NULL: argv[0], looked up as above).
    pub(super) exec: *const libc::c_char,
    /// Become `uid`/`gid` with the `ngroups` supplementary groups at
    /// `groups` (a `RunAs` that `PreExecChild` keeps alive) before anything else.
    pub(super) set_ids: bool,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) groups: *const libc::gid_t,
    pub(super) ngroups: usize,
    /// Set by the child when a step failed (it then exits 127).
    pub(super) errno: AtomicI32,
    /// The step the child is at (a `ChildStep`): set as it begins each
    /// one, so that a child stuck in one can be told where; if `errno` is
    /// set, the step that failed (set before `errno`).
    pub(super) step: AtomicU8,
    /// Set by the child once it has its own process group and descriptor table.
    pub(super) detached: AtomicU8,
    /// The executor has a controlling terminal: the child lets go of it.
    pub(super) drop_tty: bool,
    /// 1 when the child was made with `CLONE_CLEAR_SIGHAND`: the kernel set
    /// every handler back to default, so only ignored dispositions are left
    /// to reset. Set by the loop just before the clone.
    pub(super) handlers_cleared: AtomicU8,
    /// 1 until the kernel clears it (CLONE_CHILD_CLEARTID) when the child
    /// execs or exits: from then on it uses nothing of ours.
    pub(super) ctid: AtomicU32,
}

impl ChildArgs {
    /// A placeholder (for `PreExecChild::drop`'s leak path).
    pub(super) fn empty() -> ChildArgs {
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
            drop_tty: false,
            handlers_cleared: AtomicU8::new(0),
            ctid: AtomicU32::new(0),
        }
    }
}

/// A step of creating a child, named in the error when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChildStep {
    /// `clone` itself (process limit, out of fds for the pidfd, memory).
    Clone = 0,
    /// `setpgid`: a process group of its own.
    Group = 1,
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
    pub(super) fn from_u8(v: u8) -> ChildStep {
        match v {
            1 => ChildStep::Group,
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
    pub(super) fn stuck(self, cmd: &Prepared) -> String {
        match self {
            ChildStep::Clone => "it never got to run (no CPU, or memory for it)".to_string(),
            ChildStep::Group | ChildStep::Stdio | ChildStep::Cgroup | ChildStep::Credentials => {
                "stuck setting up its process group and standard streams".to_string()
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
    pub(super) fn failure(self, cmd: &Prepared, errno: Errno) -> SpawnFailure {
        let program = cmd.program();
        let what = match self {
            ChildStep::Clone => "cannot create a process for",
            ChildStep::Group => "cannot make a process group for",
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
/// system calls only, no allocation, no locks, no libc, no unwinding. Each
/// step below keeps to that too; one that cannot go on exits 127, having
/// told the loop which step failed and why (`child_fail`), unless the
/// executor is gone.
pub(super) extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` that `PreExecChild` keeps alive until we exec or exit.
    let args = unsafe { &*(arg as *const ChildArgs) };
    join_cgroup(args);
    take_credentials(args);
    reset_signal_handlers(args);
    die_with_parent(args);
    lead_own_group(args);
    take_own_fd_table(args);
    let_go_of_terminal(args);
    stdio_onto_0_1_2(args);
    make_output_blocking(args);
    change_directory(args);
    close_other_fds();
    restore_nofile(args);
    unblock_signals(args);
    exec_program(args)
}

/// Mark `step` as the one the child is at (for a child stuck in it).
fn begin(args: &ChildArgs, step: ChildStep) {
    args.step.store(step as u8, Ordering::Release);
}

/// Report `step` failed if `r` (a raw call's result) is `-errno`.
fn ok_or_fail(args: &ChildArgs, step: ChildStep, r: isize) {
    if r < 0 {
        child_fail(args, step, r);
    }
}

/// Write ourselves into the check's cgroup leaf (where `clone3` could not
/// create us in it): first, so that all the child and the check do is in it.
fn join_cgroup(args: &ChildArgs) {
    if args.procs >= 0 {
        // Into the check's cgroup before anything else (not born there).
        ok_or_fail(args, ChildStep::Cgroup, rawsys::write(args.procs, b"0"));
    }
}

/// Become the configured user: early, before `PR_SET_PDEATHSIG`, which a
/// change of credentials clears.
fn take_credentials(args: &ChildArgs) {
    if args.set_ids {
        // Groups, then gid, then uid (each needs the privilege the next
        // drops); all three ids, so there is no way back. Raw calls: glibc's
        // wrappers would make every thread of the executor change too.
        begin(args, ChildStep::Credentials);
        // SAFETY: `groups` points at `ngroups` gids that `PreExecChild` keeps alive.
        let r = unsafe { rawsys::setgroups(args.ngroups, args.groups) };
        ok_or_fail(args, ChildStep::Credentials, r);
        ok_or_fail(args, ChildStep::Credentials, rawsys::setresgid(args.gid));
        ok_or_fail(args, ChildStep::Credentials, rawsys::setresuid(args.uid));
    }
}

/// Put back to default every handler, and the ignored dispositions a check
/// must not inherit: before signals are unblocked (at the exec step).
fn reset_signal_handlers(args: &ChildArgs) {
    // A handler the application installed must not run here (in the
    // parent's memory) once signals are unblocked: back to default.
    // Ignored signals stay ignored across execve, so the ones a check must
    // see are reset too.
    if args.handlers_cleared.load(Ordering::Relaxed) == 1 {
        // The kernel did the handlers (`CLONE_CLEAR_SIGHAND`): every
        // disposition is default or ignored, and the few a check must see
        // are set to default whichever they are: 13 calls instead of 62.
        for &sig in RESET_SIGNALS {
            rawsys::sigaction(sig, Some(&rawsys::KernelSigaction::default()), None);
        }
        return;
    }
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
}

/// Be killed when the executor dies, or exit now if it already has: after
/// the credentials change (which clears this), before the check can start.
fn die_with_parent(args: &ChildArgs) {
    // If the executor dies (even by SIGKILL), its loop thread with it, the
    // check is killed rather than left running with no one to time it out
    // or reap it. (Its descendants are not: nothing can be, then.) The
    // executor may have died before this line: then our parent is another.
    rawsys::set_parent_death_signal(libc::SIGKILL);
    if rawsys::getppid() != args.parent as isize {
        rawsys::exit(127);
    }
}

/// Our own process group, which the loop signals as the check's once
/// `detached` is set: so before the step that sets it. A group, not a
/// session: a session would make the kernel give every check a scheduler
/// autogroup of its own, so that a storm of checks would take the CPU from
/// every other service on the host (and cost the autogroup's creation).
fn lead_own_group(args: &ChildArgs) {
    begin(args, ChildStep::Group);
    ok_or_fail(args, ChildStep::Group, rawsys::setpgid_self());
}

/// Without a session of our own, the executor's controlling terminal (a
/// `pidring run` from a shell) would be ours too: let go of it, so that a
/// plugin that opens `/dev/tty` (ssh, sudo asking for a password) fails at
/// once instead of prompting, or being stopped as a background job. After
/// `take_own_fd_table`: the fd it opens is in our own table.
fn let_go_of_terminal(args: &ChildArgs) {
    if args.drop_tty {
        rawsys::drop_controlling_terminal();
    }
}

/// A descriptor table of our own, then `detached`: after `setpgid`, so that
/// the loop may then signal our group (and closes its copies of our write ends).
fn take_own_fd_table(args: &ChildArgs) {
    // A private table holding only what lies below the highest fd we need
    // (the rest of the executor's table is never copied); if this kernel
    // cannot (before 5.9), a full private copy.
    begin(args, ChildStep::Stdio);
    let highest = args.stdin.max(args.stdout).max(args.stderr) as u32;
    let mut r = rawsys::close_range(highest + 1, u32::MAX, libc::CLOSE_RANGE_UNSHARE);
    if r < 0 {
        r = rawsys::unshare(libc::CLONE_FILES);
    }
    ok_or_fail(args, ChildStep::Stdio, r);
    args.detached.store(1, Ordering::Release);
}

/// /dev/null and the pipes onto fds 0–2, open across `execve`: in our own
/// table only, so the loop's table is never changed.
fn stdio_onto_0_1_2(args: &ChildArgs) {
    for (fd, target) in [(args.stdin, 0), (args.stdout, 1), (args.stderr, 2)] {
        let r = if fd == target {
            // Already there: just let it survive execve.
            rawsys::fcntl(fd, libc::F_SETFD, 0)
        } else {
            rawsys::dup3(fd, target)
        };
        ok_or_fail(args, ChildStep::Stdio, r);
    }
}

/// Clear O_NONBLOCK on stdout and stderr, once they are on 1 and 2.
fn make_output_blocking(args: &ChildArgs) {
    // The pipes were made O_NONBLOCK for the executor's read ends; a plugin
    // expects blocking writes. (/dev/null on 0 never had it.)
    for fd in [1, 2] {
        ok_or_fail(args, ChildStep::Stdio, rawsys::fcntl(fd, libc::F_SETFL, 0));
    }
}

/// Change to the check's working directory, if it has one: the first step
/// that may hang (on a mount), so after the child let go of the loop's table
/// and low slots.
fn change_directory(args: &ChildArgs) {
    if !args.cwd.is_null() {
        begin(args, ChildStep::Chdir);
        // SAFETY: a NUL-terminated string that `PreExecChild` keeps alive.
        let r = unsafe { rawsys::chdir(args.cwd) };
        ok_or_fail(args, ChildStep::Chdir, r);
    }
}

/// Close every fd above 2: once 0–2 are in place, in our own table.
fn close_other_fds() {
    // Everything of ours is close-on-exec; this also covers fds an
    // application opened without O_CLOEXEC.
    rawsys::close_range(3, u32::MAX, 0);
}

/// Give the check the RLIMIT_NOFILE the executor started with, if it raised
/// its own: it is the check's limit, so it is set just before the exec.
fn restore_nofile(args: &ChildArgs) {
    if args.restore_nofile {
        // Lowering our own soft limit cannot fail for want of rights; if it
        // fails anyway, the check runs with the raised one.
        rawsys::set_rlimit(libc::RLIMIT_NOFILE, &args.nofile);
    }
}

/// At the exec step, unblock every signal: only now that no handler of the
/// application's is left to run here, so that the check gets its signals.
fn unblock_signals(args: &ChildArgs) {
    begin(args, ChildStep::Exec);
    rawsys::unblock_all_signals();
}

/// Exec the program: the file given, `argv[0]` if it has a `/`, or the
/// first candidate in the PATH; report why none ran.
fn exec_program(args: &ChildArgs) -> ! {
    // The first candidate that exists and may be run wins; a later one is
    // tried after "not there" or "not allowed", and "not allowed" is what is
    // reported if nothing ran (as `execvp` does). "Not there" from a file
    // that is there means its interpreter is not.
    let mut found = Found::default();
    // SAFETY: argv[0] (slot 1 of `args.argv`) is a NUL-terminated string
    // that `PreExecChild` keeps alive.
    let program = unsafe { *args.argv.add(1) };
    if !args.exec.is_null() {
        // SAFETY: `exec` is a NUL-terminated string that `PreExecChild` keeps alive.
        unsafe { try_exec(args, args.exec, &mut found) };
    } else if args.dirs.is_null() {
        // SAFETY: as just above.
        unsafe { try_exec(args, program, &mut found) };
    } else {
        // SAFETY: `path` holds `path_len` bytes and `dirs` `ndirs` pairs
        // (a `SearchPath` that `PreExecChild` keeps alive, read-only); argv[0]
        // has `name_len` bytes.
        let (path, dirs, name) = unsafe {
            (
                std::slice::from_raw_parts(args.path, args.path_len),
                std::slice::from_raw_parts(args.dirs, args.ndirs),
                std::slice::from_raw_parts(program.cast::<u8>(), args.name_len),
            )
        };
        search_path(args, (path, dirs), name, &mut found);
    }
    report_not_run(args, &found)
}

/// Try `dir/name` for each of the PATH's directories in turn (see
/// `exec_program`); returns if none ran.
fn search_path(args: &ChildArgs, (path, dirs): Dirs<'_>, name: &[u8], found: &mut Found) {
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
        unsafe { try_exec(args, buf.as_ptr().cast(), found) };
    }
}

/// No candidate ran: report "not allowed" if one was there, else that its
/// interpreter or the program itself is missing.
fn report_not_run(args: &ChildArgs, found: &Found) -> ! {
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
pub(super) struct Found {
    /// One was there but not allowed.
    pub(super) denied: bool,
    /// One was there but its interpreter was not.
    pub(super) no_interpreter: bool,
}

/// Exec `path` from the child. Returns if the search goes on (not there,
/// not allowed); any other failure is reported and the child exits.
///
/// # Safety
/// `path` is NUL-terminated; `args.argv` and `args.envp` are as `PreExecChild`
/// keeps them (argv's slots are ours to write until we exec).
pub(super) unsafe fn try_exec(args: &ChildArgs, path: *const libc::c_char, found: &mut Found) {
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
pub(super) const SH: &std::ffi::CStr = c"/bin/sh";

/// Report the failed step and its errno (`r` is `-errno`) to the loop and exit 127.
pub(super) fn child_fail(args: &ChildArgs, step: ChildStep, r: isize) -> ! {
    args.step.store(step as u8, Ordering::Release);
    let errno = if r < 0 { (-r) as i32 } else { libc::EINVAL };
    args.errno.store(errno, Ordering::Release);
    rawsys::exit(127)
}
