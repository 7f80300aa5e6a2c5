//! Containment: one cgroup v2 leaf per check. Every process a check starts
//! is gone when its result is delivered, whichever way it escaped its
//! process group, after a timeout and after a normal exit; a killed leaf is
//! never reused; a check the executor may not signal still dies.

mod common;

use common::escape::*;
use common::*;
use pidring::cgroup::Containment;
use pidring::{BackendKind, Check, Executor, Outcome};
use std::time::Duration;

fn contained(backend: BackendKind) -> Executor {
    Executor::builder()
        .backend(backend)
        .max_running(256)
        .cgroup(Containment::Auto)
        .build()
        .expect("executor")
}

/// Run `body` on each backend's contained executor, or say loudly that
/// `test` skipped where containment is not in force.
fn each_contained(test: &str, body: impl Fn(&Executor, BackendKind)) {
    each_backend(contained, |exec, backend| {
        let s = exec.containment();
        if cgroup_or_skip(test, &s.mode, &s.detail) {
            body(exec, backend);
        }
    });
}

/// The check for `escape`, marked with `marker`.
fn escaping(escape: Escape, then_exit: bool, marker: &str) -> Check {
    let mut c = sh(&escape.script(then_exit))
        // Timing out only after it said `started`, even on a loaded machine
        // (python3 behind a pyenv shim takes a second there).
        .timeout(Duration::from_millis(if then_exit { 20_000 } else { 5000 }))
        .grace(Duration::from_millis(200));
    for (k, v) in Escape::env(marker) {
        c = c.env(k, v);
    }
    c
}

#[test]
fn escapees_are_gone_when_the_result_is_delivered() {
    each_contained(
        "escapees_are_gone_when_the_result_is_delivered",
        |exec, backend| {
            for escape in ESCAPES {
                for then_exit in [true, false] {
                    let m = marker();
                    let r = run(exec, escaping(escape, then_exit, &m));
                    let left = survivors(&m);
                    let what = format!("{backend} {escape:?} exit={then_exit}");
                    assert_eq!(r.stdout.text(), "started\n", "{what}: {r:?}");
                    if then_exit {
                        assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{what}: {r:?}");
                    } else {
                        assert!(r.timed_out(), "{what}: {r:?}");
                    }
                    assert!(left.is_empty(), "{what}: alive after the result: {left:?}");
                    let usage = r.cgroup.expect("a contained check reports its cgroup");
                    assert!(usage.escapees >= 1, "{what}: {usage:?}");
                    assert!(!usage.left_running, "{what}: {usage:?}");
                    assert!(usage.cpu_us > 0, "{what}: {usage:?}");
                }
            }
        },
    );
}

/// Escapees that take long to die (a large memory to tear down) are waited
/// for past a short drain: the result comes only once the leaf is empty.
#[test]
fn a_killed_leaf_is_waited_for_past_the_drain() {
    each_contained("a_killed_leaf_is_waited_for", |exec, backend| {
        let m = marker();
        // A setsid'd escapee holding 512 MiB it has written to: its exit
        // unmaps it, which takes far longer than the 1 ms drain.
        let leave = "(setsid python3 -c 'import os, time\n\
                     b = b\"x\" * (512 << 20)\n\
                     open(os.environ[\"PIDRING_READY\"], \"w\").close()\n\
                     time.sleep(1000)' </dev/null >/dev/null 2>&1 &)";
        let wait = "n=0; while [ ! -e \"$PIDRING_READY\" ] && [ $n -lt 3000 ]; do \
                    n=$((n+1)); sleep 0.01; done";
        let mut c = sh(&format!("{leave}\n{wait}\necho started\nexit 0"))
            .timeout(Duration::from_secs(60))
            .drain(Duration::from_millis(1));
        for (k, v) in Escape::env(&m) {
            c = c.env(k, v);
        }
        let r = run(exec, c);
        let left = survivors(&m);
        assert_eq!(r.stdout.text(), "started\n", "{backend}: {r:?}");
        assert!(
            left.is_empty(),
            "{backend}: alive after the result: {left:?}"
        );
        let usage = r.cgroup.expect("usage");
        assert!(
            usage.escapees >= 1 && !usage.left_running,
            "{backend}: {usage:?}"
        );
    });
}

/// A check that opts out of the kill (an event handler that starts a
/// service) leaves its processes running; shutdown kills them.
#[test]
fn a_check_that_opts_out_leaves_its_service_until_shutdown() {
    each_contained("a_check_that_opts_out", |exec, backend| {
        let m = marker();
        let r = run(
            exec,
            escaping(Escape::SetsidDoubleFork, true, &m).kill_group_on_exit(false),
        );
        assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{backend}: {r:?}");
        let usage = r.cgroup.expect("usage");
        assert!(usage.left_running && usage.escapees >= 1, "{usage:?}");
        assert!(
            !alive_with(&m).is_empty(),
            "{backend}: the service was killed"
        );
        assert!(exec.shutdown_within(Duration::from_secs(30)));
        let left = survivors(&m);
        assert!(left.is_empty(), "{backend}: alive after shutdown: {left:?}");
    });
}

/// Cancel and shutdown kill the whole leaf too.
#[test]
fn cancel_and_shutdown_kill_the_whole_leaf() {
    each_contained(
        "cancel_and_shutdown_kill_the_whole_leaf",
        |exec, backend| {
            let m = marker();
            let ready = Escape::env(&m)[1].1.clone();
            let p = exec
                .submit(
                    escaping(Escape::SetsidDoubleFork, false, &m).timeout(Duration::from_secs(60)),
                )
                .unwrap();
            assert!(eventually(Duration::from_secs(20), || {
                std::path::Path::new(&ready).exists()
            }));
            exec.cancel(p.id());
            let r = p.wait_timeout(Duration::from_secs(30)).unwrap();
            let left = survivors(&m);
            assert_eq!(r.outcome, Outcome::Cancelled, "{backend}: {r:?}");
            assert!(left.is_empty(), "{backend}: alive after cancel: {left:?}");
        },
    );
}

/// Linux 6.18 SIGKILLs a child cloned into a leaf whose cgroup.kill was
/// written: ordinary checks after many killed ones must all live.
#[test]
fn ordinary_checks_after_many_killed_ones_all_exit_normally() {
    each_contained("ordinary_checks_after_many_killed_ones", |exec, backend| {
        let killed: Vec<_> = (0..60)
            .map(|_| {
                exec.submit(sh("sleep 30").timeout(Duration::from_millis(50)))
                    .unwrap()
            })
            .collect();
        for p in killed {
            let r = p.wait_timeout(Duration::from_secs(60)).unwrap();
            assert!(r.timed_out(), "{backend}: {r:?}");
        }
        let quick = submit_exit_codes(exec, 300);
        assert_exit_codes(quick, &format!("{backend}: after killed leaves"));
    });
}

/// Checks that end together (one turn reads their leaves' `cpu.stat` after
/// one flush of them all) each report their own CPU: a busy one at least
/// what its shell used, an idle one next to nothing.
#[test]
fn checks_that_end_together_each_report_their_own_cpu() {
    each_contained("checks_that_end_together", |exec, backend| {
        // The FIFO the checks wait on, and a file per busy check once it
        // has spun.
        let dir = tempfile::tempdir().unwrap();
        let go = dir.path().join("go");
        let spun = || std::fs::read_dir(dir.path()).unwrap().count() - 1;
        // Waiting costs no CPU: a read of a FIFO the test writes one line
        // per check into.
        let made = std::process::Command::new("mkfifo")
            .arg(&go)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo {}", go.display());
        let wait = format!("read -r line < {}", go.display());
        // Busy: spin until its shell has used 0.3 s of CPU (ticks of 10 ms,
        // utime + stime: a count of iterations took 0.1 s on one host and
        // much more on another), say how much, then wait with the idle ones
        // for a line.
        let busy = format!(
            "while :; do set -- $(cat /proc/$$/stat); t=$((${{14}} + ${{15}}))\n\
             [ $t -ge 30 ] && break\n\
             i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; done\n\
             echo $t\n\
             : > {dir}/spun.$$\n{wait}",
            dir = dir.path().display()
        );
        let idle = format!("echo 0\n{wait}");
        let pending: Vec<_> = (0..16)
            .map(|i| {
                let script = if i % 2 == 0 { &busy } else { &idle };
                let c = sh(script).timeout(Duration::from_secs(120));
                (i % 2 == 0, exec.submit(c).unwrap())
            })
            .collect();
        // Let the busy ones finish spinning (their CPU then stops growing).
        let began = std::time::Instant::now();
        while spun() < 8 && began.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Held open until every result is in: a shell that reaches its
        // read after this write still finds its line.
        let mut fifo = std::fs::OpenOptions::new().write(true).open(&go).unwrap();
        std::io::Write::write_all(&mut fifo, "go\n".repeat(16).as_bytes()).unwrap();
        for (busy, p) in pending {
            let r = p.wait_timeout(Duration::from_secs(120)).unwrap();
            assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{backend}: {r:?}");
            let own_us: u64 = r.stdout.text().trim().parse::<u64>().unwrap() * 10_000;
            let u = r.cgroup.expect("usage");
            if busy {
                assert!(
                    own_us >= 100_000,
                    "{backend}: spun too little to tell: {r:?}"
                );
                assert!(
                    u.cpu_us + 10_000 >= own_us,
                    "{backend}: {own_us} µs own, {u:?}"
                );
                assert!(
                    u.cpu_us < own_us + 200_000,
                    "{backend}: {own_us} µs own, {u:?}"
                );
            } else {
                assert!(
                    u.cpu_us < 50_000,
                    "{backend}: an idle check was charged: {u:?}"
                );
            }
        }
        drop(fifo);
    });
}

/// Containment asked for where it cannot be had: the checks still run,
/// confined by the group sweep, and the executor says which mode is in force.
#[test]
fn an_unusable_cgroup_falls_back_and_says_so() {
    // Not a cgroup2 file system: nothing is created there.
    let path = std::env::temp_dir().join(format!("pidring-not-a-cgroup-{}", std::process::id()));
    each_backend(
        |backend| {
            Executor::builder()
                .backend(backend)
                .cgroup(Containment::Path(path.clone()))
                .build()
                .unwrap()
        },
        |exec, backend| {
            let s = exec.containment();
            assert_eq!(s.mode, "fallback", "{s:?}");
            assert!(s.detail.contains("not on a cgroup2"), "{s:?}");
            assert_eq!(exec.metrics().containment.mode, "fallback");
            let r = run(exec, sh("echo hi"));
            assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{backend}: {r:?}");
            assert!(r.cgroup.is_none());
            assert!(!path.exists(), "created {}", path.display());
        },
    );
}

/// Where the memory and pids controllers are on, a result has the peaks of
/// the check's processes together (a leaf then serves one check).
#[test]
fn peaks_are_reported_where_the_controllers_are_on() {
    each_contained("peaks_are_reported", |exec, backend| {
        let s = exec.containment();
        let has = |c: &str| s.controllers.iter().any(|x| x == c);
        if !has("memory") || !has("pids") {
            assert!(
                !require_cgroup(),
                "controllers {:?}: memory and pids needed, PIDRING_REQUIRE_CGROUP=1",
                s.controllers
            );
            eprintln!(
                "SKIP peaks_are_reported: the checks' cgroups have controllers {:?} \
                 (memory/pids bound to cgroup v1 here?)",
                s.controllers
            );
            return;
        }
        let r = run(exec, sh("sleep 0.2 & sleep 0.2 & sleep 0.2 & wait"));
        let u = r.cgroup.expect("usage");
        assert!(u.pids_peak >= Some(4), "{backend}: {u:?}");
        assert!(u.memory_peak_bytes > Some(0), "{backend}: {u:?}");
        assert_eq!(u.oom_kills, Some(0), "{backend}: {u:?}");
        let again = run(exec, sh("exit 0")).cgroup.expect("usage");
        assert!(
            again.pids_peak < Some(4),
            "{backend}: a leaf was reused: {again:?}"
        );
    });
}

/// Caps: where the host cannot enforce one (no containment, or its
/// controller is not there), the check is refused with a reason, never
/// run uncapped; where it can, the cap holds.
#[test]
fn caps_are_enforced_or_refused_never_ignored() {
    use pidring::{CheckError, SubmitError};
    let refused = |exec: &Executor, check: Check, file: &str| match exec.submit(check) {
        Err(SubmitError::Invalid(CheckError::Cap(why))) => {
            assert!(why.contains(file), "{why}");
        }
        other => panic!("a cap on {file} was not refused: {other:?}"),
    };
    // Off: nothing can be capped. (Serialised as `each_backend` is: the
    // other tests count this process's fds around their executors.)
    {
        let _serial = serial();
        let off = Executor::builder().build().unwrap();
        refused(&off, sh("true").memory_max(1 << 26), "memory.max");
        refused(&off, sh("true").pids_max(8), "pids.max");
    }
    let bad = sh("true").cpu_max(Duration::from_micros(10), Duration::from_millis(100));
    each_backend(contained, |exec, backend| {
        assert!(matches!(
            exec.submit(bad.clone()),
            Err(SubmitError::Invalid(CheckError::Cap(_)))
        ));
        let s = exec.containment();
        if !cgroup_or_skip("caps_are_enforced_or_refused", &s.mode, &s.detail) {
            return;
        }
        let has = |c: &str| s.controllers.iter().any(|x| x == c);
        for (controller, check, file) in [
            ("memory", sh("true").memory_max(1 << 26), "memory.max"),
            (
                "cpu",
                sh("true").cpu_max(Duration::from_millis(50), Duration::from_millis(100)),
                "cpu.max",
            ),
        ] {
            if !has(controller) {
                refused(exec, check, file);
            }
        }
        if !has("pids") {
            refused(exec, sh("true").pids_max(8), "pids.max");
            assert!(
                !require_cgroup(),
                "no pids controller and PIDRING_REQUIRE_CGROUP=1"
            );
            eprintln!(
                "SKIP caps_are_enforced: no pids controller for the checks' cgroups ({:?})",
                s.controllers
            );
            return;
        }
        // 4 processes at most: the shell and three sleeps; the rest fail to fork.
        let r = run(
            exec,
            sh("for i in 1 2 3 4 5 6 7 8; do sleep 1 & done 2>/dev/null; wait; echo done")
                .pids_max(4),
        );
        let u = r.cgroup.expect("usage");
        assert!(u.pids_peak <= Some(4), "{backend}: {u:?}");
    });
}
