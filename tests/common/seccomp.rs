//! seccomp filters that make a process's system calls fail as a hostile
//! host would: set between fork and exec (`CommandExt::pre_exec`).
#![allow(dead_code)]

/// Install a seccomp filter (classic BPF over `seccomp_data`). For use
/// between fork and exec.
pub fn install_seccomp(filter: &[libc::sock_filter]) -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut _,
    };
    // SAFETY: prctl(2) reads `prog` and the filter it points to, which live
    // across the call.
    let ok = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const _ as usize,
                0,
                0,
            ) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One BPF instruction.
pub fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// BPF: load the 32-bit word at `seccomp_data` offset `at`.
pub const LD: u16 = 0x20;
/// BPF: jump if the accumulator equals k.
pub const JEQ: u16 = 0x15;
/// BPF: jump if the accumulator is >= k.
pub const JGE: u16 = 0x35;
/// BPF: return k.
pub const RET: u16 = 0x06;
/// seccomp: let the call through.
pub const ALLOW: u32 = 0x7fff_0000;
/// seccomp: fail the call with the errno in the low bits.
pub const ERRNO: u32 = 0x0005_0000;

/// Make io_uring_setup(2) fail with EPERM, as container runtimes' default
/// profiles do.
pub fn block_io_uring() -> std::io::Result<()> {
    install_seccomp(&[
        bpf(LD, 0, 0, 0), // nr
        bpf(JEQ, 0, 1, libc::SYS_io_uring_setup as u32),
        bpf(RET, 0, 0, ERRNO | libc::EPERM as u32),
        bpf(RET, 0, 0, ALLOW),
    ])
}

/// Make clone3(2) fail with `errno`, as older container runtimes' default
/// profiles do (ENOSYS, which glibc then falls back from).
pub fn refuse_clone3(errno: i32) -> std::io::Result<()> {
    install_seccomp(&[
        bpf(LD, 0, 0, 0), // nr
        bpf(JEQ, 0, 1, libc::SYS_clone3 as u32),
        bpf(RET, 0, 0, ERRNO | errno as u32),
        bpf(RET, 0, 0, ALLOW),
    ])
}

/// Make `epoll_ctl(EPOLL_CTL_ADD)` of the fds in `fds` fail with ENOSPC, as
/// it does past `fs.epoll.max_user_watches`.
pub fn fail_epoll_adds(fds: std::ops::Range<u32>) -> std::io::Result<()> {
    // seccomp_data: nr at 0, then args[i] at 16 + 8 i (low word first).
    install_seccomp(&[
        bpf(LD, 0, 0, 0),
        bpf(JEQ, 0, 6, libc::SYS_epoll_ctl as u32),
        bpf(LD, 0, 0, 16 + 8),
        bpf(JEQ, 0, 4, libc::EPOLL_CTL_ADD as u32),
        bpf(LD, 0, 0, 16 + 16),
        bpf(JGE, 0, 2, fds.start),
        bpf(JGE, 1, 0, fds.end),
        bpf(RET, 0, 0, ERRNO | libc::ENOSPC as u32),
        bpf(RET, 0, 0, ALLOW),
    ])
}

/// Make `kill(2)` and `pidfd_send_signal(2)` fail with EPERM, as they do
/// for a process of another user (a plugin run through sudo).
pub fn refuse_signals() -> std::io::Result<()> {
    install_seccomp(&[
        bpf(LD, 0, 0, 0),
        bpf(JEQ, 1, 0, libc::SYS_kill as u32),
        bpf(JEQ, 0, 1, libc::SYS_pidfd_send_signal as u32),
        bpf(RET, 0, 0, ERRNO | libc::EPERM as u32),
        bpf(RET, 0, 0, ALLOW),
    ])
}
