//! Shared helpers for the integration tests: invariant probes read from /proc.
#![allow(dead_code)]

pub mod escape;
pub mod seccomp;

use pidring::{BackendKind, Check, CheckResult, Executor};
use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Both backends; every integration test runs against each.
pub const BACKENDS: [BackendKind; 2] = [BackendKind::IoUring, BackendKind::Epoll];

/// Tests in one binary run one at a time: fd and zombie counts are per process.
static SERIAL: Mutex<()> = Mutex::new(());

/// Take the per-binary test lock (poison-tolerant: one failed test must not fail the rest).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Parse /proc/PID/stat: (state, ppid, pgrp, session).
pub fn stat(pid: i32) -> Option<(char, i32, i32, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The comm field may hold spaces and parentheses: split after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    let session = f.next()?.parse().ok()?;
    Some((state, ppid, pgrp, session))
}

/// Every pid in /proc.
pub fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Our own zombie children (never count anyone else's: PID 1 here reaps slowly).
pub fn our_zombies() -> Vec<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&p| matches!(stat(p), Some(('Z', ppid, _, _)) if ppid == me))
        .collect()
}

/// Live (non-zombie) processes whose process group is one of `pgids`.
pub fn live_in_groups(pgids: &HashSet<i32>) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&p| matches!(stat(p), Some((st, _, pgid, _)) if st != 'Z' && st != 'X' && pgids.contains(&pgid)))
        .collect()
}

/// Assert that no live process is left in the process groups `pgids` (a
/// check's group id is its leader's pid) within `limit`: SIGKILLed members
/// may take a moment to be scheduled and die; orphans may linger as zombies
/// of PID 1, which reaps slowly here, and those are dead.
pub fn assert_groups_end(pgids: &HashSet<i32>, limit: Duration, what: &str) {
    assert!(
        eventually(limit, || live_in_groups(pgids).is_empty()),
        "{what}: processes live on in the groups: {:?}",
        live_in_groups(pgids)
    );
}

/// Open fds of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Poll `cond` until true or `limit` passes (for kernel state we cannot wait on directly).
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Assert the process-level invariants after an executor is gone: no zombie
/// children, fds back to where they were.
pub fn assert_clean(fds_before: usize) {
    // Reaps happen before results are delivered, and the executor is dropped
    // (loop joined) before this is called: zombies must be zero right now.
    let z = our_zombies();
    assert!(z.is_empty(), "zombie children left: {z:?}");
    let fds = fd_count();
    if fds != fds_before {
        let list = fd_list();
        panic!("fd leak: {fds_before} fds before, {fds} after: {list:?}");
    }
}

/// Run `body` once per backend with a fresh executor, checking invariants after each.
pub fn each_backend(
    build: impl Fn(BackendKind) -> Executor,
    body: impl Fn(&Executor, BackendKind),
) {
    let _guard = serial();
    for backend in BACKENDS {
        let before = fd_count();
        let before_list = fd_list();
        let exec = build(backend);
        assert_eq!(exec.backend(), backend);
        body(&exec, backend);
        drop(exec);
        if fd_count() != before {
            eprintln!("fds before: {before_list:?}");
        }
        assert_clean(before);
    }
}

/// This process's fds and what they are.
pub fn fd_list() -> Vec<String> {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .map(|e| {
                    format!(
                        "{:?}->{:?}",
                        e.file_name(),
                        std::fs::read_link(e.path()).ok()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Once `exec` is idle, `count()` comes back to `idle` (within 10 s): the
/// executor kept no `what` of a finished check.
pub fn assert_settles(exec: &Executor, what: &str, count: impl Fn() -> usize, idle: usize) {
    assert!(exec.wait_idle(Duration::from_secs(60)));
    assert!(
        eventually(Duration::from_secs(10), || count() == idle),
        "an idle executor holds {} {what}, {idle} before",
        count()
    );
}

/// A default executor on `backend`.
pub fn executor(backend: BackendKind) -> Executor {
    Executor::builder()
        .backend(backend)
        .max_running(2048)
        .build()
        .expect("executor")
}

/// A `/bin/sh -c SCRIPT` check.
pub fn sh(script: &str) -> Check {
    Check::argv(["/bin/sh", "-c", script])
}

/// Submit and wait, with a generous bound.
pub fn run(exec: &Executor, check: Check) -> CheckResult {
    exec.submit(check)
        .expect("accepted")
        .wait_timeout(Duration::from_secs(60))
        .expect("a result within 60s")
}

/// Submit `n` checks that exit 0, 1, 2, 3, 0, … in turn.
pub fn submit_exit_codes(exec: &Executor, n: usize) -> Vec<pidring::Pending> {
    (0..n)
        .map(|i| exec.submit(sh(&format!("exit {}", i % 4))).unwrap())
        .collect()
}

/// Each of `submit_exit_codes`'s checks exited by itself with its code.
pub fn assert_exit_codes(pendings: Vec<pidring::Pending>, what: &str) {
    for (i, p) in pendings.into_iter().enumerate() {
        let r = p.wait_timeout(Duration::from_secs(60)).unwrap();
        let code = (i % 4) as i32;
        assert_eq!(
            r.outcome,
            pidring::Outcome::Exited { code },
            "{what}: check {i}: {r:?}"
        );
    }
}
