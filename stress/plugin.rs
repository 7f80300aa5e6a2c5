//! `pidring-plugin`: a tiny check plugin that misbehaves on request, for the
//! `pidring-stress` harness. One behaviour per invocation, chosen by argument:
//!
//! ```text
//! pidring-plugin exit CODE                 print a Nagios line, exit CODE
//! pidring-plugin sleep MS                  sleep, honour SIGTERM (default action)
//! pidring-plugin ignore-term MS            ignore SIGTERM, sleep (needs SIGKILL)
//! pidring-plugin trap-term-exit-after MS D on SIGTERM, exit 2 after D ms (inside the grace window)
//! pidring-plugin group-children N MS LEAD  N children in our group sleep MS; the leader sleeps LEAD ms then exits 0
//! pidring-plugin escape MS                 a grandchild leaves with setsid and lives MS; the leader exits 0
//! pidring-plugin hold-stdout MS            a setsid grandchild keeps stdout open for MS; the leader exits 0
//! pidring-plugin close-stdout-sleep MS     close stdout/stderr, then sleep
//! pidring-plugin flood BYTES               write BYTES to stdout, exit 0
//! pidring-plugin crash segv|abort          die of SIGSEGV or SIGABRT (no core file)
//! pidring-plugin canary MS                 own process group; count every signal received for MS, print the count
//! pidring-plugin canary-pool N MIN MAX     keep N canaries alive (each MIN..MAX ms) until stdin closes
//! pidring-plugin pid-burner TOP LOW        create and reap children as fast as possible until SIGTERM;
//!                                          with TOP > 0, rewind ns_last_pid to LOW once a child's PID reaches TOP
//! ```
//!
//! Every process it creates is finite-lived, so a harness can wait for them.

use std::io::{BufRead, Read, Write};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => ExitCode::from(code),
        Err(msg) => {
            eprintln!("pidring-plugin: {msg}");
            ExitCode::from(3)
        }
    }
}

fn num(args: &[String], i: usize, what: &str) -> Result<u64, String> {
    args.get(i)
        .ok_or_else(|| format!("missing {what}"))?
        .parse()
        .map_err(|e| format!("bad {what} {:?}: {e}", args[i]))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn run(args: &[String]) -> Result<u8, String> {
    let cmd = args.first().map(String::as_str).unwrap_or("");
    match cmd {
        "exit" => {
            let code = num(args, 1, "exit code")?;
            let label = ["OK", "WARNING", "CRITICAL", "UNKNOWN"]
                .get(code as usize)
                .unwrap_or(&"UNKNOWN");
            println!("{label} - exit {code} on request|code={code};1;2;0;255");
            Ok(code as u8)
        }
        "sleep" => {
            std::thread::sleep(ms(num(args, 1, "duration")?));
            println!("OK - slept");
            Ok(0)
        }
        "ignore-term" => {
            set_handler(libc::SIGTERM, libc::SIG_IGN);
            std::thread::sleep(ms(num(args, 1, "duration")?));
            println!("OK - slept through SIGTERM");
            Ok(0)
        }
        "trap-term-exit-after" => {
            let total = num(args, 1, "duration")?;
            let delay = num(args, 2, "delay")?;
            set_handler(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
            let start = Instant::now();
            while start.elapsed() < ms(total) {
                if TERMS.load(Ordering::SeqCst) > 0 {
                    // The seed's race: exit by ourselves just before SIGKILL would come.
                    std::thread::sleep(ms(delay));
                    println!("CRITICAL - exited {delay}ms after SIGTERM");
                    return Ok(2);
                }
                std::thread::sleep(ms(2));
            }
            println!("OK - never got SIGTERM");
            Ok(0)
        }
        "group-children" => {
            let n = num(args, 1, "children")?;
            let child_ms = num(args, 2, "child duration")?;
            let lead_ms = num(args, 3, "leader duration")?;
            for _ in 0..n {
                if fork()? == 0 {
                    std::thread::sleep(ms(child_ms));
                    exit_now(0);
                }
            }
            std::thread::sleep(ms(lead_ms));
            println!("OK - left {n} children in my group");
            Ok(0)
        }
        "escape" => {
            let life = num(args, 1, "duration")?;
            fork_escaped(|| {
                redirect_to_null(&[1, 2]);
                std::thread::sleep(ms(life));
            })?;
            println!("OK - a grandchild escaped with setsid");
            Ok(0)
        }
        "hold-stdout" => {
            let life = num(args, 1, "duration")?;
            println!("OK - a grandchild keeps stdout open");
            let _ = std::io::stdout().flush();
            fork_escaped(|| std::thread::sleep(ms(life)))?;
            Ok(0)
        }
        "close-stdout-sleep" => {
            let life = num(args, 1, "duration")?;
            print!("OK - closing stdout");
            let _ = std::io::stdout().flush();
            // SAFETY: closing our own stdio fds; nothing uses them afterwards.
            unsafe {
                libc::close(1);
                libc::close(2);
            }
            std::thread::sleep(ms(life));
            Ok(0)
        }
        "flood" => {
            let total = num(args, 1, "bytes")? as usize;
            let line = b"flood flood flood flood flood flood flood flood flood flood flood\n";
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(b"OK - flooding\n");
            let mut written = 0;
            while written < total {
                if out.write_all(line).is_err() {
                    break;
                }
                written += line.len();
            }
            Ok(0)
        }
        "crash" => {
            no_core();
            match args.get(1).map(String::as_str) {
                Some("abort") => std::process::abort(),
                _ => {
                    // Rust's own SIGSEGV handler would return from a raised
                    // (non-fault) SIGSEGV: restore the default action first.
                    set_handler(libc::SIGSEGV, libc::SIG_DFL);
                    // SAFETY: deliberately raising SIGSEGV is the point of this behaviour.
                    unsafe { libc::raise(libc::SIGSEGV) };
                    Ok(3)
                }
            }
        }
        "canary" => canary(num(args, 1, "duration")?),
        "canary-pool" => canary_pool(
            num(args, 1, "pool size")? as usize,
            num(args, 2, "min duration")?,
            num(args, 3, "max duration")?,
        ),
        "pid-burner" => pid_burner(
            num(args, 1, "top")? as libc::pid_t,
            num(args, 2, "low")? as libc::pid_t,
        ),
        other => Err(format!("unknown behaviour {other:?}")),
    }
}

static TERMS: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_term(_: libc::c_int) {
    TERMS.fetch_add(1, Ordering::SeqCst);
}

static CANARY_HITS: AtomicU32 = AtomicU32::new(0);
static CANARY_MASK: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_canary_signal(sig: libc::c_int) {
    CANARY_HITS.fetch_add(1, Ordering::SeqCst);
    CANARY_MASK.fetch_or(1u64 << (sig as u64 & 63), Ordering::SeqCst);
}

fn set_handler(sig: libc::c_int, handler: libc::sighandler_t) {
    // SAFETY: the handlers used here only touch atomics (async-signal-safe).
    unsafe { libc::signal(sig, handler) };
}

fn fork() -> Result<libc::pid_t, String> {
    // SAFETY: this program is single-threaded, so the child may run normal code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    Ok(pid)
}

/// Fork a grandchild that leaves our session (setsid) and runs `body`; return
/// only once it has left, so the leader's exit (and the executor's group
/// sweep) cannot catch it still in the group.
fn fork_escaped(body: impl FnOnce()) -> Result<(), String> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    if fork()? == 0 {
        // SAFETY: setsid, write and close on our own descriptors.
        unsafe {
            libc::setsid();
            libc::close(fds[0]);
            libc::write(fds[1], b"x".as_ptr().cast(), 1);
            libc::close(fds[1]);
        }
        body();
        exit_now(0);
    }
    let mut byte = 0u8;
    // SAFETY: reading one byte into a valid buffer; closing our own pipe ends.
    unsafe {
        libc::close(fds[1]);
        libc::read(fds[0], (&mut byte as *mut u8).cast(), 1);
        libc::close(fds[0]);
    }
    Ok(())
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit skips atexit handlers and stdio flushing, right for a forked child.
    unsafe { libc::_exit(code) }
}

fn redirect_to_null(fds: &[i32]) {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        for fd in fds {
            // SAFETY: dup2 onto our own stdio fds.
            unsafe { libc::dup2(null.as_raw_fd(), *fd) };
        }
    }
}

fn no_core() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit struct; only lowers our own limit.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
}

/// A process that sits in its own process group (so its PID is also a PGID a
/// stale group kill could hit) and counts every signal it receives.
fn canary(life_ms: u64) -> Result<u8, String> {
    // SAFETY: setpgid(0, 0) on ourselves.
    unsafe { libc::setpgid(0, 0) };
    for sig in 1..=31 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            set_handler(sig, on_canary_signal as *const () as libc::sighandler_t);
        }
    }
    let end = Instant::now() + ms(life_ms);
    while Instant::now() < end {
        std::thread::sleep(ms(5));
    }
    println!(
        "{} {}",
        CANARY_HITS.load(Ordering::SeqCst),
        CANARY_MASK.load(Ordering::SeqCst)
    );
    Ok(0)
}

/// Keep `n` canaries alive until stdin closes; print one line per finished
/// canary (`c PID SIGNALS MASK KILLED_BY`) and a final `done` line.
fn canary_pool(n: usize, min_ms: u64, max_ms: u64) -> Result<u8, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().lock().read_to_end(&mut sink);
        let _ = stop_tx.send(());
    });
    let mut seed = std::process::id() as u64 | 1;
    let mut next_life = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        min_ms + seed % (max_ms.saturating_sub(min_ms) + 1)
    };
    let spawn = |life: u64| -> Option<Child> {
        Command::new(&exe)
            .args(["canary", &life.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .ok()
    };
    let mut live: Vec<Child> = Vec::new();
    let mut stopping = false;
    let stdout = std::io::stdout();
    loop {
        if !stopping && stop_rx.try_recv().is_ok() {
            stopping = true;
        }
        while !stopping && live.len() < n {
            match spawn(next_life()) {
                Some(c) => live.push(c),
                None => break,
            }
        }
        let mut i = 0;
        while i < live.len() {
            match live[i].try_wait() {
                Ok(Some(status)) => {
                    let mut child = live.swap_remove(i);
                    // Already reaped by try_wait: wait() returns the kept status.
                    let _ = child.wait();
                    let mut line = String::new();
                    if let Some(out) = child.stdout.as_mut() {
                        let _ = std::io::BufReader::new(out).read_line(&mut line);
                    }
                    let mut parts = line.split_whitespace();
                    let hits: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                    let mask: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                    use std::os::unix::process::ExitStatusExt;
                    let killed_by = status.signal().unwrap_or(0);
                    let _ = writeln!(
                        stdout.lock(),
                        "c {} {} {} {}",
                        child.id(),
                        hits,
                        mask,
                        killed_by
                    );
                }
                Ok(None) => i += 1,
                Err(_) => {
                    let mut child = live.swap_remove(i);
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        if stopping && live.is_empty() {
            let _ = writeln!(stdout.lock(), "done");
            return Ok(0);
        }
        std::thread::sleep(ms(2));
    }
}

static BURNER_STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_burner_term(_: libc::c_int) {
    BURNER_STOP.store(true, Ordering::SeqCst);
}

/// The whole life of a burner child: leave at once.
extern "C" fn burner_child(_: *mut libc::c_void) -> libc::c_int {
    // SAFETY: _exit is async-signal-safe and touches nothing shared with the parent.
    unsafe { libc::_exit(0) }
}

/// PID-space pressure for the canary test where `pid_max` cannot be shrunk:
/// create and reap trivial children as fast as we can, so the PID namespace's
/// counter wraps and PIDs that checks had come round again. A child shares
/// our memory and we are suspended until it exits (`CLONE_VM|CLONE_VFORK`,
/// like posix_spawn, without copying page tables), so one costs a few µs.
/// With `top > 0`, once a child's PID reaches `top` we also rewind
/// `/proc/sys/kernel/ns_last_pid` to `low` (Linux ≥ 3.3, CAP_SYS_ADMIN in the
/// namespace): a wrap every `top - low` PIDs instead of every `pid_max`.
/// On SIGTERM: reap the last child, print `burned CHILDREN MICROS WRAPS REWINDS FAILURES`.
fn pid_burner(top: libc::pid_t, low: libc::pid_t) -> Result<u8, String> {
    use std::os::unix::fs::FileExt;
    set_handler(
        libc::SIGTERM,
        on_burner_term as *const () as libc::sighandler_t,
    );
    let last_pid = if top > 0 {
        match std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/sys/kernel/ns_last_pid")
        {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("pidring-plugin: cannot rewind ns_last_pid ({e}): burning PIDs only");
                None
            }
        }
    } else {
        None
    };
    let low_text = low.to_string();
    // The children run on this stack (they share our memory); we are
    // suspended while one runs, so one stack serves them all.
    let mut stack = vec![0u8; 64 * 1024];
    let (mut children, mut wraps, mut rewinds, mut failures) = (0u64, 0u64, 0u64, 0u64);
    let mut previous: libc::pid_t = 0;
    let start = Instant::now();
    while !BURNER_STOP.load(Ordering::SeqCst) {
        // SAFETY: the stack is ours and outlives the child (CLONE_VFORK
        // returns only after the child has exited); the child only calls _exit.
        let pid = unsafe {
            libc::clone(
                burner_child,
                stack.as_mut_ptr().add(stack.len()).cast(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                std::ptr::null_mut(),
            )
        };
        if pid < 0 {
            // Out of PIDs or memory for a moment: the checks need them more.
            failures += 1;
            std::thread::sleep(ms(1));
            continue;
        }
        loop {
            // SAFETY: reaping our own child; a null status pointer is allowed.
            let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            if r == pid || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        children += 1;
        if pid < previous {
            wraps += 1;
        }
        previous = pid;
        if pid >= top
            && let Some(f) = &last_pid
            && f.write_at(low_text.as_bytes(), 0).is_ok()
        {
            rewinds += 1;
        }
    }
    println!(
        "burned {children} {} {wraps} {rewinds} {failures}",
        start.elapsed().as_micros()
    );
    Ok(0)
}
