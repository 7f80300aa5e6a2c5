//! A check's exit wakes no other thread of the application. The loop learns
//! of it from the pidfd; the SIGCHLD the kernel sends the loop thread must
//! be dropped there (its default is to ignore it), not handed to another
//! thread, which it would wake: with SIGCHLD blocked on the loop thread,
//! the kernel keeps it and delivers it to any thread that does not block it.
//!
//! Its own binary, without the test harness: the only threads are `main`
//! (SIGCHLD blocked), one idle thread that lets it through, and the
//! executor's. If checks' exits were delivered as SIGCHLD, the idle thread
//! would be woken for each.

mod common;

use common::*;
use pidring::cgroup::Containment;
use pidring::{Check, Executor, Outcome};
use std::sync::mpsc;
use std::time::Duration;

/// Voluntary context switches of thread `tid` of this process.
fn wake_ups(tid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn set_sigchld(how: libc::c_int) {
    // SAFETY: the set is initialised by sigemptyset/sigaddset; pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        assert_eq!(libc::pthread_sigmask(how, &set, std::ptr::null_mut()), 0);
    }
}

fn main() {
    // The idle thread: parked until the end, SIGCHLD let through.
    let (tx, rx) = mpsc::channel();
    let idle = std::thread::spawn(move || {
        set_sigchld(libc::SIG_UNBLOCK);
        // SAFETY: gettid has no preconditions.
        tx.send(unsafe { libc::gettid() }).unwrap();
        while !DONE.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::park();
        }
    });
    let idle_tid = rx.recv().unwrap();
    // This thread, and the executor's threads it creates, block SIGCHLD.
    set_sigchld(libc::SIG_BLOCK);
    let n = 200;
    for backend in BACKENDS {
        for containment in [Containment::Off, Containment::Auto] {
            let what = format!("{backend} {containment:?}");
            let exec = Executor::builder()
                .backend(backend)
                .cgroup(containment)
                .max_running(1)
                .build()
                .unwrap();
            let before = wake_ups(idle_tid);
            // One at a time, so that no two exits' signals could merge.
            for i in 0..n {
                let r = exec
                    .submit(Check::argv(["/bin/sh", "-c", &format!("exit {}", i % 3)]))
                    .unwrap()
                    .wait_timeout(Duration::from_secs(60))
                    .unwrap();
                assert_eq!(r.outcome, Outcome::Exited { code: i % 3 }, "{what}: {r:?}");
            }
            // A timed-out check too: killed, swept and reaped.
            let r = exec
                .submit(Check::argv(["/bin/sleep", "30"]).timeout(Duration::from_millis(100)))
                .unwrap()
                .wait_timeout(Duration::from_secs(60))
                .unwrap();
            assert!(
                matches!(r.outcome, Outcome::TimedOut { .. }),
                "{what}: {r:?}"
            );
            let woken = wake_ups(idle_tid) - before;
            // A handful of spurious wake-ups are tolerated; one per check is the bug.
            assert!(
                woken < 10,
                "{what}: an idle thread was woken {woken} times by {} checks' exits",
                n + 1
            );
            drop(exec);
            assert!(eventually(Duration::from_secs(5), || our_zombies().is_empty()));
            println!("{what}: {n} checks, the idle thread woken {woken} times");
        }
    }
    with_an_application_handler();
    DONE.store(true, std::sync::atomic::Ordering::SeqCst);
    idle.thread().unpark();
    idle.join().unwrap();
    println!("test checks_wake_no_other_thread ... ok");
}

static HANDLED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn count_sigchld(_: libc::c_int) {
    HANDLED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// An application with its own SIGCHLD handler (no SA_RESTART, so that
/// system calls it interrupts fail with EINTR) gets it, now possibly on
/// the loop thread; the executor's checks keep their statuses and timeouts,
/// and nothing is left unreaped.
fn with_an_application_handler() {
    // SAFETY: a handler that only increments an atomic; sa_flags 0.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = count_sigchld as *const () as usize;
        assert_eq!(
            libc::sigaction(libc::SIGCHLD, &act, std::ptr::null_mut()),
            0
        );
    }
    for backend in BACKENDS {
        for containment in [Containment::Off, Containment::Auto] {
            let what = format!("{backend} {containment:?}, with a handler");
            let exec = Executor::builder()
                .backend(backend)
                .cgroup(containment)
                .build()
                .unwrap();
            let handled = HANDLED.load(std::sync::atomic::Ordering::SeqCst);
            let pendings: Vec<_> = (0..100)
                .map(|i| {
                    exec.submit(Check::argv(["/bin/sh", "-c", &format!("exit {}", i % 3)]))
                        .unwrap()
                })
                .collect();
            let slow = exec
                .submit(Check::argv(["/bin/sleep", "30"]).timeout(Duration::from_millis(200)))
                .unwrap();
            for (i, p) in pendings.into_iter().enumerate() {
                let r = p.wait_timeout(Duration::from_secs(60)).unwrap();
                assert_eq!(
                    r.outcome,
                    Outcome::Exited {
                        code: (i % 3) as i32
                    },
                    "{what}: {r:?}"
                );
            }
            let r = slow.wait_timeout(Duration::from_secs(60)).unwrap();
            assert!(
                matches!(r.outcome, Outcome::TimedOut { .. }),
                "{what}: {r:?}"
            );
            // Dropped with a check running: killed, reaped and answered.
            let left = exec.submit(Check::argv(["/bin/sleep", "30"])).unwrap();
            assert!(eventually(Duration::from_secs(10), || exec.running() == 1));
            drop(exec);
            let r = left.wait_timeout(Duration::from_secs(60)).unwrap();
            assert!(matches!(r.outcome, Outcome::Shutdown), "{what}: {r:?}");
            assert!(
                HANDLED.load(std::sync::atomic::Ordering::SeqCst) > handled,
                "{what}: the application's handler never ran"
            );
            assert!(
                eventually(Duration::from_secs(5), || our_zombies().is_empty()),
                "{what}: zombies {:?}",
                our_zombies()
            );
            println!("{what}: statuses kept, nothing left unreaped");
        }
    }
}

static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
