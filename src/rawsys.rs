//! Raw system calls for a child between `clone` and `execve`.
//!
//! That child shares the executor's memory, including the loop thread's
//! thread-local storage, while the loop goes on running. libc's wrappers
//! write `errno` (a thread-local) on failure, which would race with the
//! loop's own use of it; these calls return `-errno` instead and touch no
//! memory but their arguments. Only what the child needs is here.

/// `syscall(nr, a, b, c, d)`: the result, or `-errno`.
///
/// # Safety
/// The arguments must be valid for system call `nr`, as for `libc::syscall`.
#[inline(always)]
pub(crate) unsafe fn syscall4(nr: libc::c_long, a: usize, b: usize, c: usize, d: usize) -> isize {
    let ret: isize;
    // SAFETY: the x86_64 Linux system call convention (rax = number, then
    // rdi, rsi, rdx, r10; rcx and r11 are clobbered); the caller vouches for
    // the arguments.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            in("r10") d,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    // SAFETY: the aarch64 Linux system call convention (x8 = number, x0–x3
    // arguments, x0 the result); the caller vouches for the arguments.
    #[cfg(target_arch = "aarch64")]
    unsafe {
        core::arch::asm!(
            "svc 0",
            in("x8") nr as usize,
            inlateout("x0") a => ret,
            in("x1") b,
            in("x2") c,
            in("x3") d,
            options(nostack),
        );
    }
    ret
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("pidring creates children with raw system calls on x86_64 and aarch64 only");

/// The kernel's `struct sigaction` for `rt_sigaction` (x86_64 and aarch64).
#[repr(C)]
#[derive(Default)]
pub(crate) struct KernelSigaction {
    /// Handler, `SIG_DFL` (0) or `SIG_IGN` (1).
    pub handler: usize,
    /// `SA_*` flags.
    pub flags: u64,
    /// Signal-return trampoline (unused for `SIG_DFL`).
    pub restorer: usize,
    /// Signals blocked while the handler runs.
    pub mask: u64,
}

/// The size of the kernel's signal set, as `rt_sigaction`/`rt_sigprocmask` want it.
const SIGSET_SIZE: usize = 8;

/// `rt_sigaction(sig, new, old)`.
pub(crate) fn sigaction(
    sig: i32,
    new: Option<&KernelSigaction>,
    old: Option<&mut KernelSigaction>,
) -> isize {
    let new = new.map_or(0, |n| n as *const KernelSigaction as usize);
    let old = old.map_or(0, |o| o as *mut KernelSigaction as usize);
    // SAFETY: both pointers are null or point to a live KernelSigaction.
    unsafe { syscall4(libc::SYS_rt_sigaction, sig as usize, new, old, SIGSET_SIZE) }
}

/// `rt_sigprocmask(SIG_SETMASK, {}, NULL)`: unblock every signal.
pub(crate) fn unblock_all_signals() -> isize {
    let empty: u64 = 0;
    // SAFETY: a pointer to a live 8-byte signal set, and no old set.
    unsafe {
        syscall4(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as usize,
            &empty as *const u64 as usize,
            0,
            SIGSET_SIZE,
        )
    }
}

/// `prctl(PR_SET_PDEATHSIG, sig)`: `sig` when the creating thread exits.
pub(crate) fn set_parent_death_signal(sig: i32) -> isize {
    // SAFETY: plain integers.
    unsafe {
        syscall4(
            libc::SYS_prctl,
            libc::PR_SET_PDEATHSIG as usize,
            sig as usize,
            0,
            0,
        )
    }
}

/// `getppid()`.
pub(crate) fn getppid() -> isize {
    // SAFETY: no arguments.
    unsafe { syscall4(libc::SYS_getppid, 0, 0, 0, 0) }
}

/// `prlimit64(0, resource, new, NULL)`: set one of this process's limits
/// (`new` is the soft and the hard limit; `u64::MAX` is infinity).
pub(crate) fn set_rlimit(resource: u32, new: &[u64; 2]) -> isize {
    // SAFETY: a pointer to a live `struct rlimit64` (two u64s), and no old one.
    unsafe {
        syscall4(
            libc::SYS_prlimit64,
            0,
            resource as usize,
            new.as_ptr() as usize,
            0,
        )
    }
}

/// `faccessat(AT_FDCWD, path, F_OK, 0)`: 0 if `path` exists.
///
/// # Safety
/// `path` must point to a NUL-terminated string.
pub(crate) unsafe fn exists(path: *const libc::c_char) -> isize {
    // SAFETY: the caller vouches for the string; the rest are integers.
    unsafe {
        syscall4(
            libc::SYS_faccessat,
            libc::AT_FDCWD as usize,
            path as usize,
            libc::F_OK as usize,
            0,
        )
    }
}

/// `setgroups(n, groups)`: this thread's supplementary groups.
///
/// # Safety
/// `groups` must point to `n` gids (or be anything when `n` is 0).
pub(crate) unsafe fn setgroups(n: usize, groups: *const libc::gid_t) -> isize {
    // SAFETY: the caller vouches for the array.
    unsafe { syscall4(libc::SYS_setgroups, n, groups as usize, 0, 0) }
}

/// `setresgid(gid, gid, gid)`: this thread only (the raw call, not glibc's
/// wrapper, which signals every thread of the process to change too).
pub(crate) fn setresgid(gid: u32) -> isize {
    let g = gid as usize;
    // SAFETY: plain integers.
    unsafe { syscall4(libc::SYS_setresgid, g, g, g, 0) }
}

/// `setresuid(uid, uid, uid)`: this thread only (as `setresgid`).
pub(crate) fn setresuid(uid: u32) -> isize {
    let u = uid as usize;
    // SAFETY: plain integers.
    unsafe { syscall4(libc::SYS_setresuid, u, u, u, 0) }
}

/// `setpgid(0, 0)`: a process group of our own, led by us.
pub(crate) fn setpgid_self() -> isize {
    // SAFETY: plain integers.
    unsafe { syscall4(libc::SYS_setpgid, 0, 0, 0, 0) }
}

/// Let go of our controlling terminal, if we have one: `TIOCNOTTY` on
/// `/dev/tty` (which names it), for this process only when it does not lead
/// its session. Any failure (ENXIO: no terminal) leaves nothing to do.
pub(crate) fn drop_controlling_terminal() {
    let path = c"/dev/tty";
    let flags = libc::O_RDONLY | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated string; the rest are integers.
    let fd = unsafe {
        syscall4(
            libc::SYS_openat,
            libc::AT_FDCWD as usize,
            path.as_ptr() as usize,
            flags as usize,
            0,
        )
    };
    if fd < 0 {
        return;
    }
    // SAFETY: an fd we just opened, and an ioctl that takes no argument.
    unsafe {
        syscall4(libc::SYS_ioctl, fd as usize, libc::TIOCNOTTY as usize, 0, 0);
        syscall4(libc::SYS_close, fd as usize, 0, 0, 0);
    }
}

/// `close_range(first, last, flags)`.
pub(crate) fn close_range(first: u32, last: u32, flags: u32) -> isize {
    // SAFETY: plain integers.
    unsafe {
        syscall4(
            libc::SYS_close_range,
            first as usize,
            last as usize,
            flags as usize,
            0,
        )
    }
}

/// `unshare(flags)`.
pub(crate) fn unshare(flags: i32) -> isize {
    // SAFETY: a plain integer.
    unsafe { syscall4(libc::SYS_unshare, flags as usize, 0, 0, 0) }
}

/// `dup3(old, new, 0)` (`dup2` without its same-fd special case; aarch64 has no `dup2`).
pub(crate) fn dup3(old: i32, new: i32) -> isize {
    // SAFETY: plain integers.
    unsafe { syscall4(libc::SYS_dup3, old as usize, new as usize, 0, 0) }
}

/// `fcntl(fd, cmd, arg)`.
pub(crate) fn fcntl(fd: i32, cmd: i32, arg: usize) -> isize {
    // SAFETY: only called with integer-argument commands (F_SETFD, F_SETFL).
    unsafe { syscall4(libc::SYS_fcntl, fd as usize, cmd as usize, arg, 0) }
}

/// `chdir(path)`.
///
/// # Safety
/// `path` must point to a NUL-terminated string.
pub(crate) unsafe fn chdir(path: *const libc::c_char) -> isize {
    // SAFETY: the caller vouches for the string.
    unsafe { syscall4(libc::SYS_chdir, path as usize, 0, 0, 0) }
}

/// `execve(path, argv, envp)`: returns only on failure.
///
/// # Safety
/// As for `execve(2)`: a NUL-terminated path, NULL-terminated arrays of
/// NUL-terminated strings.
pub(crate) unsafe fn execve(
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> isize {
    // SAFETY: the caller vouches for the arguments.
    unsafe {
        syscall4(
            libc::SYS_execve,
            path as usize,
            argv as usize,
            envp as usize,
            0,
        )
    }
}

/// `exit_group(code)`: ends the child (its own thread group).
pub(crate) fn exit(code: i32) -> ! {
    loop {
        // SAFETY: a plain integer; does not return.
        unsafe { syscall4(libc::SYS_exit_group, code as usize, 0, 0, 0) };
    }
}

/// `clone3`: every handler back to default in the child, ignored ones kept (Linux 5.5).
pub(crate) const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;

/// The kernel's `struct clone_args` (`CLONE_ARGS_SIZE_VER2`: up to `cgroup`).
#[repr(C)]
#[derive(Default)]
pub(crate) struct CloneArgs {
    pub flags: u64,
    /// Where the kernel stores the pidfd (`CLONE_PIDFD`).
    pub pidfd: u64,
    /// Cleared (and futex-woken) at the child's exec or exit (`CLONE_CHILD_CLEARTID`).
    pub child_tid: u64,
    pub parent_tid: u64,
    /// Signal to the parent at exit (`SIGCHLD`: `waitid` sees it as a normal child).
    pub exit_signal: u64,
    /// Lowest address of the child's stack.
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    /// A cgroup v2 directory fd the child starts in (`CLONE_INTO_CGROUP`).
    pub cgroup: u64,
}

/// `clone3(args)`, with the child running `f(arg)` on the stack `args`
/// names and then `exit_group` with its return value (the child never
/// returns here). In the parent: the child's pid, or `-errno`.
///
/// # Safety
/// As for `clone(2)` with `f` and a stack: `args` names a stack nothing
/// else uses while the child runs on it, and `f` may run in this
/// process's memory (`CLONE_VM`) with raw system calls only.
pub(crate) unsafe fn clone3(
    args: &CloneArgs,
    f: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> isize {
    let ret: isize;
    // SAFETY: in the parent only rax (the result), rcx and r11 change. The
    // child starts on its own stack (the kernel sets rsp to its top,
    // 16-byte aligned; the call leaves it as a function entry expects),
    // with r12/r13 as the parent had them, and exits without returning.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r13",
            "call r12",
            "mov edi, eax",
            "mov eax, 231",
            "syscall",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 as isize => ret,
            in("rdi") args as *const CloneArgs as usize,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") f as usize,
            in("r13") arg as usize,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    // SAFETY: in the parent only x0 (the result) changes. The child starts
    // on its own stack with x20/x21 as the parent had them, and exits
    // (exit_group is 94) without returning.
    #[cfg(target_arch = "aarch64")]
    unsafe {
        core::arch::asm!(
            "svc 0",
            "cbnz x0, 2f",
            "mov x29, xzr",
            "mov x0, x21",
            "blr x20",
            "mov x8, 94",
            "svc 0",
            "brk #0",
            "2:",
            in("x8") libc::SYS_clone3 as usize,
            inlateout("x0") args as *const CloneArgs as usize => ret,
            in("x1") std::mem::size_of::<CloneArgs>(),
            in("x20") f as usize,
            in("x21") arg as usize,
        );
    }
    ret
}

/// `write(fd, buf, len)`.
pub(crate) fn write(fd: i32, buf: &[u8]) -> isize {
    // SAFETY: a live buffer of `buf.len()` bytes.
    unsafe {
        syscall4(
            libc::SYS_write,
            fd as usize,
            buf.as_ptr() as usize,
            buf.len(),
            0,
        )
    }
}
