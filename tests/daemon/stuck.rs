//! Children stuck before exec (a hung mount): they hold up no one.

use super::*;

on_both_backends!(
    stuck_changing_directory_holds_up_no_one,
    stuck_before_its_own_descriptors_holds_up_no_one,
);

/// A daemon whose children's `syscall` waits on this test, as a lookup on
/// a hung NFS or FUSE mount waits on a server that never answers: the
/// daemon runs under a seccomp filter that turns the call into a
/// notification (SECCOMP_RET_USER_NOTIF) to a supervisor thread here, which
/// holds it unanswered while `hold` is set (the caller stays blocked, and
/// only SIGKILL ends it) and lets it through otherwise. The daemon itself
/// never makes the call; its children make it before they exec. Dropping
/// this closes the notification fd: a call still held then fails (ENOSYS).
struct HungSyscall {
    hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The pid of each caller held.
    held: std::sync::mpsc::Receiver<u32>,
    /// Every caller held so far.
    pids: std::cell::RefCell<Vec<u32>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HungSyscall {
    /// Start the daemon under the filter, and the supervisor holding calls.
    fn start(backend: &str, syscall: libc::c_long) -> (Daemon, HungSyscall) {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        use std::os::unix::process::CommandExt;
        let mut pair = [-1; 2];
        // SAFETY: socketpair writes two new fds into `pair`.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                pair.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
        // SAFETY: both were just created and are owned by nothing else.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
        let filter = [
            bpf(0x20, 0, 0, 0), // load the syscall number
            bpf(0x15, 0, 1, syscall as u32),
            bpf(0x06, 0, 0, libc::SECCOMP_RET_USER_NOTIF),
            bpf(0x06, 0, 0, libc::SECCOMP_RET_ALLOW),
        ];
        let to_test = theirs.as_raw_fd();
        let mut cmd = Command::new(BIN);
        // SAFETY: between fork and exec the closure calls only prctl,
        // seccomp, sendmsg and close (async-signal-safe), and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                let prog = libc::sock_fprog {
                    len: filter.len() as u16,
                    filter: filter.as_ptr() as *mut _,
                };
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                let fd = libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                    &prog as *const libc::sock_fprog,
                ) as libc::c_int;
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let sent = send_fd(to_test, fd);
                libc::close(fd);
                sent
            })
        };
        // Stuck checks never finish: shutdown kills them after 1 s.
        let daemon = Daemon::start_via(cmd, backend, &["--drain-timeout", "1s"], None);
        drop(theirs);
        let listener = recv_fd(&ours);
        let hold = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, held) = std::sync::mpsc::channel();
        let thread = std::thread::spawn({
            let (hold, stop) = (hold.clone(), stop.clone());
            move || supervise(listener, &hold, &stop, tx)
        });
        let hung = HungSyscall {
            hold,
            stop,
            held,
            pids: Default::default(),
            thread: Some(thread),
        };
        (daemon, hung)
    }

    /// Hold calls from now on (`true`), or let them through.
    fn hold(&self, hold: bool) {
        self.hold.store(hold, std::sync::atomic::Ordering::SeqCst);
    }

    /// Wait until `n` more calls are held, for at most `limit`: how many were.
    fn wait_held(&self, n: usize, limit: Duration) -> usize {
        let end = Instant::now() + limit;
        let mut got = 0;
        while got < n {
            let left = end.saturating_duration_since(Instant::now());
            match self.held.recv_timeout(left) {
                Ok(pid) => self.pids.borrow_mut().push(pid),
                Err(_) => break,
            }
            got += 1;
        }
        got
    }
}

impl Drop for HungSyscall {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answer seccomp notifications on `listener` until `stop`: hold each
/// unanswered while `hold` (sending its caller's pid on `held`), else
/// let the call run.
fn supervise(
    listener: std::os::fd::OwnedFd,
    hold: &std::sync::atomic::AtomicBool,
    stop: &std::sync::atomic::AtomicBool,
    held: std::sync::mpsc::Sender<u32>,
) {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    let fd = listener.as_raw_fd();
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd passed.
        if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 || pfd.revents & libc::POLLIN == 0 {
            continue;
        }
        // SAFETY: all-zero is a valid seccomp_notif (and RECV requires it).
        let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: the kernel fills `req`, which lives across the call.
        if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut req) } != 0 {
            continue; // The caller died meanwhile.
        }
        if hold.load(Ordering::SeqCst) {
            let _ = held.send(req.pid);
            continue;
        }
        let mut resp = libc::seccomp_notif_resp {
            id: req.id,
            val: 0,
            error: 0,
            flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        };
        // SAFETY: the kernel reads `resp`, which lives across the call.
        unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp) };
    }
    // Dropping `listener` fails every call still held with ENOSYS.
}

/// Run `f` on a one-byte message with room for one descriptor
/// (SCM_RIGHTS), for `send_fd` and `recv_fd`. Allocates nothing: used
/// between fork and exec.
fn fd_message<R>(f: impl FnOnce(&mut libc::msghdr) -> R) -> R {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // 8-byte aligned, and room for CMSG_SPACE(4) (24 bytes).
    let mut space = [0u64; 4];
    // SAFETY: msghdr is a plain C struct for which all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&space) as _;
    f(&mut msg)
}

/// Send `fd` over the Unix socket `sock` (SCM_RIGHTS). Async-signal-safe:
/// called between fork and exec.
fn send_fd(sock: libc::c_int, fd: libc::c_int) -> std::io::Result<()> {
    fd_message(|msg| {
        // SAFETY: the control buffer (see `fd_message`) holds the one cmsg
        // written here; every pointer in `msg` lives across sendmsg.
        unsafe {
            msg.msg_controllen = libc::CMSG_SPACE(4) as _;
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd);
            if libc::sendmsg(sock, msg, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    })
}

/// Receive the fd `send_fd` sent.
fn recv_fd(sock: &std::os::fd::OwnedFd) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    fd_message(|msg| {
        // SAFETY: recvmsg fills the buffers `msg` points to (see
        // `fd_message`); the fd is read from the one cmsg, checked first,
        // and is a new descriptor owned by nothing else.
        unsafe {
            let n = libc::recvmsg(sock.as_raw_fd(), msg, libc::MSG_CMSG_CLOEXEC);
            assert!(
                n > 0,
                "no notification fd from the daemon: {}",
                std::io::Error::last_os_error()
            );
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            assert!(!cmsg.is_null() && (*cmsg).cmsg_type == libc::SCM_RIGHTS);
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
            std::os::fd::OwnedFd::from_raw_fd(fd)
        }
    })
}

/// One BPF instruction.
fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Checks whose children are stuck before `execve` (`syscall`, made while
/// a child sets itself up, never returns: as with a hung mount in their
/// working directory or PATH) hold up no other client's check for longer
/// than the bound after which a launch counts as stuck (1 s), however
/// many there are: more than the 256 launches in flight, more than the
/// 32 low descriptor slot pairs. A stuck check that times out says so,
/// and is killed at once; shutdown still kills and answers every one.
fn stuck_children(backend: &str, syscall: libc::c_long, cwd: bool, stuck_text: &str) {
    const N: usize = 300;
    let (mut d, hung) = HungSyscall::start(backend, syscall);
    let mut stuck = d.client();
    let dir = d.dir.path().to_str().unwrap().to_string();
    for i in 0..N {
        let mut submit = json!({"op": "submit", "id": i, "timeout": 600, "argv": ["/bin/true"]});
        if cwd {
            submit["cwd"] = json!(dir);
        }
        stuck.send(&submit);
    }
    // Until the fix, only as many got stuck as could launch at once (256,
    // or 32 before they take their own descriptor table): the others and
    // any later check waited for their 600 s timeout.
    let held = hung.wait_held(N, Duration::from_secs(20));
    hung.hold(false);
    let mut other = d.client();
    other
        .w
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let sent = Instant::now();
    other.send(&json!({"op": "submit", "id": "other", "argv": ["/bin/echo", "fine"]}));
    let mut line = String::new();
    let answered = other.r.read_line(&mut line);
    let waited = sent.elapsed();
    assert!(
        matches!(answered, Ok(n) if n > 0),
        "another client's check got no result in {waited:?} ({held} of {N} checks stuck before exec): {answered:?}"
    );
    let r: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(r["result"]["stdout"]["data"], "fine\n", "{r}");
    assert_eq!(held, N, "every stuck check was started");
    // 1 s to count a launch as stuck; the rest is a noisy machine's slack.
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");

    // A stuck check that times out says where it was stuck, and is killed
    // at once: SIGTERM would wait out the grace (it blocks every signal).
    hung.hold(true);
    let mut submit =
        json!({"op": "submit", "id": "late", "timeout": 1, "grace": 30, "argv": ["/bin/true"]});
    if cwd {
        submit["cwd"] = json!(dir);
    }
    other.send(&submit);
    assert_eq!(hung.wait_held(1, PATIENCE), 1);
    let r = other.recv();
    let reason = r["result"]["reason"].as_str().unwrap();
    assert_eq!(r["result"]["outcome"]["kind"], "timed_out", "{r}");
    assert!(
        reason.contains("before it could start its program") && reason.contains(stuck_text),
        "{reason}"
    );
    assert!(
        r["result"]["timings"]["total"].as_u64().unwrap() < 20_000_000,
        "not killed at once: {r}"
    );

    // Shutdown kills them all (SIGKILL ends the wait) and answers each.
    let pid = d.pid();
    d.signal(libc::SIGTERM);
    let results: Vec<Value> = stuck
        .recv_all()
        .into_iter()
        .filter(|r| r["type"] == "result")
        .collect();
    assert_eq!(results.len(), N);
    assert!(
        results
            .iter()
            .all(|r| r["result"]["outcome"]["kind"] == "shutdown")
    );
    let st = d.wait_exit(PATIENCE);
    assert!(st.success(), "daemon exit status {st}:\n{}", d.log());
    assert!(children_of(pid).is_empty());
    // Each was killed and reaped, before the daemon exited.
    let pids = hung.pids.borrow().clone();
    let left: Vec<u32> = pids
        .into_iter()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .collect();
    assert!(left.is_empty(), "stuck children left: {left:?}");
    drop(hung);
}

fn stuck_changing_directory_holds_up_no_one(backend: &str) {
    stuck_children(
        backend,
        libc::SYS_chdir,
        true,
        "stuck changing to its working directory",
    );
}

fn stuck_before_its_own_descriptors_holds_up_no_one(backend: &str) {
    stuck_children(
        backend,
        libc::SYS_setpgid,
        false,
        "stuck setting up its process group",
    );
}
