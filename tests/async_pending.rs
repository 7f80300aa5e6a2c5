//! `Pending` as a `Future`: awaited from tokio (multi-thread and
//! current-thread runtimes), 10,000 checks, none lost, duplicated or failed,
//! and no thread per waiting check.

mod common;

use pidring::{BackendKind, Check, Executor, Outcome};
use std::collections::HashSet;

const CHECKS: usize = 10_000;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Submit every check, then await them all; returns the most threads seen while waiting.
async fn await_all(exec: &Executor) -> usize {
    let before = threads();
    let pending: Vec<_> = (0..CHECKS)
        .map(|_| exec.submit(Check::argv(["/bin/true"])).expect("accepted"))
        .collect();
    let ids: HashSet<u64> = pending.iter().map(|p| p.id()).collect();
    assert_eq!(ids.len(), CHECKS, "ids are not distinct");
    let mut most = threads();
    let mut seen = HashSet::new();
    for (i, p) in pending.into_iter().enumerate() {
        let want = p.id();
        let r = p.await;
        assert_eq!(r.id, want);
        assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{r:?}");
        assert!(seen.insert(r.id), "result {} delivered twice", r.id);
        if i % 1000 == 0 {
            most = most.max(threads());
        }
    }
    assert_eq!(seen, ids, "a result was lost");
    assert!(
        most < before + 16,
        "threads grew from {before} to {most} while {CHECKS} checks were awaited"
    );
    most
}

fn executor(backend: BackendKind) -> Executor {
    Executor::builder()
        .backend(backend)
        .max_running(256)
        .build()
        .unwrap()
}

#[test]
fn pending_is_awaited_on_a_multi_thread_runtime() {
    let _serial = common::serial();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    for backend in common::BACKENDS {
        let exec = executor(backend);
        let most = rt.block_on(await_all(&exec));
        eprintln!("multi-thread {backend:?}: at most {most} threads for {CHECKS} checks");
        exec.shutdown();
    }
}

#[test]
fn pending_is_awaited_on_a_current_thread_runtime_with_tasks() {
    let _serial = common::serial();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for backend in common::BACKENDS {
        let exec = std::sync::Arc::new(executor(backend));
        rt.block_on(async {
            // Every check awaited in a task of its own, on one thread.
            let tasks: Vec<_> = (0..CHECKS)
                .map(|_| {
                    let p = exec.submit(Check::argv(["/bin/true"])).expect("accepted");
                    tokio::spawn(p)
                })
                .collect();
            let mut ids = HashSet::new();
            for t in tasks {
                let r = t.await.expect("task");
                assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{r:?}");
                assert!(ids.insert(r.id), "result {} twice", r.id);
            }
            assert_eq!(ids.len(), CHECKS);
        });
        exec.shutdown();
    }
}

#[test]
fn a_dropped_pending_leaves_the_others_and_wait_still_works() {
    let _serial = common::serial();
    let exec = executor(BackendKind::Auto);
    let dropped = exec.submit(Check::argv(["/bin/sleep", "0.2"])).unwrap();
    drop(dropped);
    let kept = exec.submit(Check::argv(["/bin/echo", "kept"])).unwrap();
    assert_eq!(kept.wait().stdout.text(), "kept\n");
    assert!(exec.wait_idle(std::time::Duration::from_secs(20)));
    exec.shutdown();
}
