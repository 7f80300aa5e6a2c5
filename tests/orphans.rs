//! Subreaper mode: descendants that escape their check (setsid, double fork)
//! are re-parented to the executor's process and reaped there — while every
//! check leader is still reaped only through its pidfd.
//! (Its own test binary: becoming a subreaper changes the whole process.)

mod common;

use common::*;
use pidring::{Check, Executor, Outcome};
use std::time::Duration;

#[test]
fn escaped_orphans_are_reaped_and_counted_and_leaders_keep_their_status() {
    let _guard = serial();
    for backend in BACKENDS {
        let before = fd_count();
        let exec = Executor::builder()
            .backend(backend)
            .reap_orphans(true)
            .build()
            .unwrap();
        let orphans_before = exec.metrics().counters.orphans_reaped;
        // Each check leaves a grandchild in a new session that outlives it briefly.
        let n = 20;
        let pendings: Vec<_> = (0..n)
            .map(|_| {
                exec.submit(sh("setsid sh -c 'sleep 0.3' & pid=$!; echo $pid; \
                     while [ \"$(cut -d' ' -f6 /proc/$pid/stat)\" != \"$pid\" ]; do sleep 0.01; done"))
                    .unwrap()
            })
            .collect();
        // Meanwhile many short checks: none may be reaped by the orphan scan.
        let quick = submit_exit_codes(&exec, 300);
        let mut escaped = Vec::new();
        for p in pendings {
            let r = p.wait_timeout(Duration::from_secs(60)).unwrap();
            assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{backend}: {r:?}");
            escaped.push(r.stdout.text().trim().parse::<i32>().unwrap());
        }
        assert_exit_codes(quick, "a leader's status was lost");
        assert!(
            eventually(Duration::from_secs(20), || {
                exec.metrics().counters.orphans_reaped >= orphans_before + n as u64
            }),
            "{backend}: orphans reaped: {}",
            exec.metrics().counters.orphans_reaped - orphans_before
        );
        assert!(eventually(Duration::from_secs(5), || our_zombies().is_empty()));
        for pid in escaped {
            assert!(stat(pid).is_none(), "escaped orphan {pid} still exists");
        }
        drop(exec);
        assert_clean(before);
    }
}

#[test]
fn without_subreaper_mode_nothing_foreign_is_reaped() {
    let _guard = serial();
    // A child of this process that is not a check must be left alone when
    // reap_orphans is off: the executor reaps only its own, via pidfds.
    let exec = Executor::builder().backend(BACKENDS[1]).build().unwrap();
    let mut own = std::process::Command::new("/bin/sleep")
        .arg("0.2")
        .spawn()
        .unwrap();
    let r = exec
        .submit(Check::argv(["/bin/sleep", "0.5"]))
        .unwrap()
        .wait();
    assert_eq!(r.outcome, Outcome::Exited { code: 0 });
    let status = own.wait().expect("our own child is still ours to reap");
    assert!(status.success());
    assert_eq!(exec.metrics().counters.orphans_reaped, 0);
}

#[test]
fn shutdown_in_subreaper_mode_leaves_no_descendant_behind() {
    let _guard = serial();
    for backend in BACKENDS {
        let exec = Executor::builder()
            .backend(backend)
            .reap_orphans(true)
            .build()
            .unwrap();
        // Group members that survive their leader's reap until the sweep, and
        // an escaped (setsid) descendant that would live for minutes.
        let pendings: Vec<_> = (0..5)
            .map(|_| {
                exec.submit(sh(
                    "trap '' TERM; setsid sleep 300 & sleep 120 & sleep 120; wait",
                ))
                .unwrap()
            })
            .collect();
        // Wait until every leader has its three children (two group members
        // and the escapee), so the shutdown really has descendants to deal with.
        assert!(eventually(Duration::from_secs(20), || {
            let leaders = children();
            leaders.len() == 5
                && leaders.iter().all(|l| {
                    std::fs::read_to_string(format!("/proc/{l}/task/{l}/children"))
                        .map(|c| c.split_whitespace().count() >= 3)
                        .unwrap_or(false)
                })
        }));
        exec.shutdown();
        for p in pendings {
            assert_eq!(p.wait().outcome, Outcome::Shutdown);
        }
        let left = children();
        assert!(
            left.is_empty(),
            "{backend}: children left after shutdown: {left:?}"
        );
        assert!(our_zombies().is_empty());
    }
}

/// Every child of this process, from /proc.
fn children() -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}
