//! `pidring run`: the one-shot command, as a user runs it.

mod common;

use common::seccomp::*;
use common::*;
use std::process::Command;
use std::time::Duration;

fn pidring() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pidring"))
}

#[test]
fn run_prints_output_and_exits_with_the_state() {
    for backend in ["io_uring", "epoll"] {
        let out = pidring()
            .args([
                "run",
                "--backend",
                backend,
                "--",
                "/bin/sh",
                "-c",
                "echo 'WARNING - disk 91%|disk=91%;90;95'; exit 1",
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{backend}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "WARNING - disk 91%|disk=91%;90;95\n"
        );
    }
}

#[test]
fn run_times_out_like_timeout_1_but_with_nagios_semantics() {
    let out = pidring()
        .args([
            "run",
            "--timeout",
            "200ms",
            "--grace",
            "200ms",
            "--",
            "/bin/sh",
            "-c",
            "trap '' TERM; echo partial; sleep 30",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("UNKNOWN: Check timed out after 200ms"),
        "{text}"
    );
    assert!(text.contains("partial"), "{text}");

    let out = pidring()
        .args([
            "run",
            "--timeout",
            "100ms",
            "--timeout-state",
            "critical",
            "--",
            "/bin/sleep",
            "10",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn run_json_is_a_full_result() {
    let out = pidring()
        .args([
            "run",
            "--json",
            "--command-line",
            "/bin/echo 'OK - fine' '|' 'a=1'",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "OK");
    assert_eq!(v["outcome"]["kind"], "exited");
    assert_eq!(v["plugin"]["text"], "OK - fine");
    assert_eq!(v["plugin"]["perfdata"][0]["label"], "a");
    assert!(v["timings"]["run"].as_u64().is_some());
}

#[test]
fn run_explains_bad_input() {
    let out = pidring().args(["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to run"));

    let out = pidring()
        .args(["run", "--", "/no/such/plugin"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("No such file"));

    let out = pidring()
        .args(["run", "--timeout", "soon", "--", "/bin/true"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid duration"));
    // No zombie lingers. (Other tests of this binary run alongside and reap
    // their own children after they exit: one may be a zombie for a moment.)
    assert!(
        eventually(Duration::from_secs(10), || our_zombies().is_empty()),
        "zombies: {:?}",
        our_zombies()
    );
}

#[test]
fn usage_errors_exit_unknown_not_critical() {
    // Exit 2 would read as CRITICAL to a monitoring core.
    for args in [
        &["run", "--timeout", "-1s", "--", "true"][..],
        &["run", "--bogus", "--", "true"],
        &["run", "--timeout", "5x", "--", "true"],
        // Below 1ms: killed as it starts, "timed out after 0ms".
        &["run", "--timeout", "999us", "--", "true"],
        &["run", "--timeout", "0", "--", "true"],
        &["submit", "--timeout", "1us", "--", "true"],
        &["submit", "--bogus", "--", "true"],
        &["no-such-command"],
        &[],
    ] {
        let out = pidring().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(3), "pidring {args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        // clap's message as usual, pointing at --help.
        assert!(err.contains("--help"), "pidring {args:?}: {err}");
        assert!(out.stdout.is_empty(), "pidring {args:?}");
    }
    // Help and version are no errors: stdout, exit 0.
    for args in [&["--help"][..], &["run", "--help"], &["--version"]] {
        let out = pidring().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "pidring {args:?}");
        assert!(!out.stdout.is_empty(), "pidring {args:?}");
        assert!(out.stderr.is_empty(), "pidring {args:?}");
    }
}

/// A daemon started with closed standard streams must not cross a check's
/// stdout and stderr (pipe ends would otherwise land on fds 0 and 2).
#[test]
fn closed_standard_streams_do_not_cross_check_output() {
    use std::os::unix::process::CommandExt;
    let mut cmd = pidring();
    cmd.args([
        "run",
        "--json",
        "--",
        "/bin/sh",
        "-c",
        "echo out; echo err >&2; readlink /proc/$$/fd/0 >&2",
    ]);
    // SAFETY: only async-signal-safe close(2) calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::close(0);
            libc::close(2);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stdout"]["data"], "out\n");
    assert_eq!(v["stderr"]["data"], "err\n/dev/null\n");
}

/// Where io_uring is blocked (a container's seccomp profile), `auto` falls
/// back to epoll, says so, and runs the check all the same.
#[test]
fn auto_falls_back_to_epoll_when_seccomp_blocks_io_uring() {
    use std::os::unix::process::CommandExt;
    let mut cmd = pidring();
    cmd.env("RUST_LOG", "info")
        .env_remove("PIDRING_BACKEND")
        .args(["run", "--", "/bin/echo", "OK - via epoll"]);
    // SAFETY: block_io_uring only calls prctl(2), which is async-signal-safe.
    unsafe { cmd.pre_exec(block_io_uring) };
    let out = cmd.output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "OK - via epoll\n");
    assert!(log.contains("io_uring unavailable"), "{log}");
    assert!(log.contains("backend=epoll"), "{log}");

    // Asking for io_uring explicitly on such a host is a clear error.
    let mut cmd = pidring();
    cmd.args(["run", "--backend", "io_uring", "--", "/bin/true"]);
    // SAFETY: as above.
    unsafe { cmd.pre_exec(block_io_uring) };
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot set up the io_uring backend"), "{err}");
}

/// A check gets default dispositions for the signals a daemon ignores,
/// whether the kernel cleared the handlers (`clone3` with
/// `CLONE_CLEAR_SIGHAND`) or, where seccomp refuses `clone3`, the child
/// reset each one itself; and the check runs either way.
#[test]
fn ignored_signals_are_reset_with_and_without_clone3() {
    use std::os::unix::process::CommandExt;
    for refused in [None, Some(libc::ENOSYS)] {
        let mut cmd = pidring();
        cmd.env("RUST_LOG", "debug").args([
            "run",
            "--",
            "/bin/sh",
            "-c",
            "exec grep -E '^(SigIgn|SigBlk)' /proc/self/status",
        ]);
        // SAFETY: only signal(2) and prctl(2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Ignored in `run`, so inherited by the check unless reset.
                libc::signal(libc::SIGUSR1, libc::SIG_IGN);
                libc::signal(libc::SIGHUP, libc::SIG_IGN);
                match refused {
                    Some(errno) => refuse_clone3(errno),
                    None => Ok(()),
                }
            });
        }
        let out = cmd.output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{refused:?}: {log}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 2, "{refused:?}: {stdout}");
        for line in lines {
            let mask = u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap();
            assert_eq!(mask & 0x7fff_ffff, 0, "{refused:?}: {line}");
        }
        assert_eq!(
            log.contains("clone3(CLONE_CLEAR_SIGHAND) refused"),
            refused.is_some(),
            "{refused:?}: {log}"
        );
    }
}

/// Start `pidring run` on a check that records its process group (its
/// leader's pid) in a file and keeps a TERM-ignoring child; return the
/// `run` process and that group id, once the check is running.
fn run_a_check_that_stays(dir: &std::path::Path) -> (std::process::Child, i32) {
    let pgid_file = dir.join("pgid");
    let script = format!(
        "(trap '' TERM; exec sleep 1000) & echo $$ > {}; wait",
        pgid_file.display()
    );
    let child = pidring()
        .args(["run", "--timeout", "100s", "--", "/bin/sh", "-c", &script])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut pgid = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            pgid = std::fs::read_to_string(&pgid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            pgid.is_some()
        }),
        "the check never started"
    );
    (child, pgid.unwrap())
}

#[test]
fn a_stop_signal_to_run_kills_and_reaps_the_check_first() {
    for (sig, name) in [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGALRM, "SIGALRM"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (child, pgid) = run_a_check_that_stays(dir.path());
        // SAFETY: kill(2) on our own unreaped child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(128 + sig), "{name}: {err}");
        assert!(err.contains(&format!("stopped by {name}")), "{err}");
        // `run` reaped the leader and swept its group before exiting.
        let pgids = std::collections::HashSet::from([pgid]);
        assert_groups_end(&pgids, Duration::from_secs(5), name);
    }
}

#[test]
fn a_killed_run_takes_its_check_with_it() {
    // SIGKILL cannot be caught: the check's leader gets the parent-death
    // signal. (Its descendants cannot be helped then.)
    let dir = tempfile::tempdir().unwrap();
    let (mut child, pgid) = run_a_check_that_stays(dir.path());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !matches!(
            stat(pgid),
            Some((st, ..)) if st != 'Z' && st != 'X'
        )),
        "the check's leader outlived a SIGKILLed run: {:?}",
        stat(pgid)
    );
    // Not left to a slow PID 1: end its grandchild here.
    for p in live_in_groups(&std::collections::HashSet::from([pgid])) {
        // SAFETY: kill(2) by pid on a process we just saw alive in that group.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
}

#[test]
fn checks_get_the_open_files_limit_run_was_started_with() {
    // The executor raises its own soft limit to the hard one; a plugin
    // must see the one it would have had (select() breaks past 1024).
    let out = Command::new("/bin/sh")
        .args([
            "-c",
            "ulimit -Sn 512 && exec \"$0\" run -- /bin/sh -c 'ulimit -Sn; ulimit -Hn'",
            env!("CARGO_BIN_EXE_pidring"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("512"), "{text}");
    let hard = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard = hard
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .unwrap()
        .to_string();
    assert_eq!(lines.next(), Some(hard.as_str()), "{text}");
}

#[test]
fn output_that_cannot_be_written_is_not_an_ok() {
    // A caller would read OK without the text that goes with it.
    let out = pidring()
        .args(["run", "--", "/bin/echo", "OK - fine"])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot write the check's output"), "{err}");
}

#[test]
fn run_needs_few_descriptors() {
    // One check needs one pair of low slots, not the 32 a busy executor keeps.
    let out = Command::new("/bin/sh")
        .args([
            "-c",
            "ulimit -n 24 && exec \"$0\" run -- /bin/echo OK - few fds",
            env!("CARGO_BIN_EXE_pidring"),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "OK - few fds\n");
}

#[test]
fn a_stop_signal_ends_run_even_when_it_is_stuck_writing_the_result() {
    // The check is over and `run` blocks writing more than a pipe holds to
    // a stdout nobody reads: SIGTERM must still end it.
    let dir = tempfile::tempdir().unwrap();
    let done = dir.path().join("done");
    let script = format!("head -c 200000 /dev/zero; touch {}", done.display());
    let mut child = pidring()
        .args(["run", "--", "/bin/sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    // No child left on any of its threads (the check is a child of the loop thread).
    let reaped = || {
        std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
            tasks.flatten().all(|t| {
                std::fs::read_to_string(t.path().join("children"))
                    .is_ok_and(|c| c.trim().is_empty())
            })
        })
    };
    assert!(
        eventually(Duration::from_secs(10), || done.exists() && reaped()),
        "the check never finished"
    );
    // And `run` has its result and is blocked writing it (a signal before
    // that, while the result is on its way, is a cancel that comes late).
    let writing = || {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/syscall"))
            .is_ok_and(|s| s.split_whitespace().next() == Some(&libc::SYS_write.to_string()))
    };
    assert!(
        eventually(Duration::from_secs(10), writing),
        "run never blocked writing its result"
    );
    // SAFETY: kill(2) on our own unreaped child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut status = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            status = child.try_wait().unwrap();
            status.is_some()
        }),
        "run ignored SIGTERM while blocked on its stdout"
    );
    assert_eq!(status.unwrap().code(), Some(128 + libc::SIGTERM));
}

#[test]
fn an_inherited_ignored_sigchld_does_not_lose_exit_statuses() {
    // A parent's signal(SIGCHLD, SIG_IGN) survives exec; with it the kernel
    // reaps every check itself and the executor would lose every status.
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pidring"));
    cmd.args(["run", "--", "/bin/sh", "-c", "echo 'WARNING - w'; exit 1"]);
    // SAFETY: only signal(2) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGCHLD, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("WARNING - w"), "{stdout}");
}

/// Where epoll cannot watch a check's pidfd or pipes (ENOSPC past
/// `fs.epoll.max_user_watches`, ENOMEM), the loop polls them instead: a
/// healthy check gets its own result, all its output, and is never killed
/// (it was: the polling path swept the live leader's group with SIGKILL);
/// a timeout is still enforced.
#[test]
fn checks_whose_descriptors_cannot_be_watched_are_polled_not_killed() {
    use std::os::unix::process::CommandExt;
    // Where this build puts a check's descriptors: after the executor's own
    // (eventfd, epoll, timerfd), which come first; ask a check.
    let probe = pidring()
        .args(["run", "--backend", "epoll", "--", "/bin/sh", "-c"])
        .arg("for f in /proc/$PPID/fd/*; do echo \"${f##*/} $(readlink $f)\"; done")
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&probe.stdout).to_string();
    let fds = |what: &str| -> Vec<u32> {
        listing
            .lines()
            .filter(|l| l.contains(what))
            .filter_map(|l| l.split(' ').next()?.parse().ok())
            .collect()
    };
    let own = fds("anon_inode:[eventpoll]")
        .into_iter()
        .chain(fds("anon_inode:[timerfd]"))
        .chain(fds("anon_inode:[eventfd]"))
        .max()
        .unwrap_or_else(|| panic!("no executor descriptors in:\n{listing}"));
    let pidfd = *fds("anon_inode:[pidfd]").iter().max().unwrap();
    let first_pipe = fds("pipe:")
        .into_iter()
        .filter(|&fd| fd > own)
        .min()
        .unwrap();
    let run = |fds: std::ops::Range<u32>, args: &[&str]| {
        let mut cmd = pidring();
        cmd.env("RUST_LOG", "warn")
            .args(["run", "--backend", "epoll"])
            .args(args);
        // SAFETY: fail_epoll_adds only calls prctl(2), which is
        // async-signal-safe.
        unsafe { cmd.pre_exec(move || fail_epoll_adds(fds.clone())) };
        let out = cmd.output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        (out, log)
    };
    let healthy = [
        "--timeout",
        "60s",
        "--",
        "/bin/sh",
        "-c",
        "echo healthy; sleep 1; echo still; exit 1",
    ];
    let cases = [
        (pidfd..pidfd + 1, "cannot watch pidfd"),
        (first_pipe..pidfd, "cannot watch output pipe"),
    ];
    for (fds, what) in cases {
        let (out, log) = run(fds.clone(), &healthy);
        assert!(
            log.contains(what),
            "the filter missed ({what}, fds {fds:?}):\n{log}\n{listing}"
        );
        assert_eq!(out.status.code(), Some(1), "{what}: {log}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "healthy\nstill\n",
            "{what}: {log}"
        );
        assert_eq!(
            log.matches("polling instead").count(),
            1,
            "said once: {log}"
        );
    }
    // Nothing watched at all: the timeout is enforced all the same, and
    // the group is swept before the reap (invariant 3 on the polling path).
    let dir = tempfile::tempdir().unwrap();
    let pgid_file = dir.path().join("pgid");
    // A member that ignores SIGTERM outlives the leader: only the sweep ends it.
    let script = format!(
        "echo $$ > {}; (trap '' TERM; exec sleep 300) & exec sleep 300",
        pgid_file.display()
    );
    let t0 = std::time::Instant::now();
    let (out, log) = run(
        first_pipe.min(pidfd)..u32::MAX,
        &["--timeout", "1s", "--", "/bin/sh", "-c", &script],
    );
    assert_eq!(out.status.code(), Some(3), "{log}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("timed out"),
        "{log}"
    );
    assert!(t0.elapsed() < Duration::from_secs(20), "{log}");
    let pgid: i32 = std::fs::read_to_string(&pgid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_groups_end(
        &[pgid].into(),
        Duration::from_secs(10),
        "the polled check's group",
    );
}

/// A check the executor may not signal (EPERM: a plugin run through sudo,
/// or a setuid program that became root): its timeout cannot be enforced,
/// and the result says so, not that it "ignored SIGTERM" and was killed.
#[test]
fn a_check_that_may_not_be_signalled_is_not_reported_killed() {
    use std::os::unix::process::CommandExt;
    for backend in ["io_uring", "epoll"] {
        let mut cmd = pidring();
        // Without containment: with it, the cgroup kills it (see below).
        cmd.args(["run", "--backend", backend, "--json", "--cgroup", "off"])
            .args(["--timeout", "300ms", "--grace", "300ms", "--"])
            .args(["/bin/sh", "-c", "sleep 1.5; echo done"]);
        // SAFETY: refuse_signals only calls prctl(2), which is async-signal-safe.
        unsafe { cmd.pre_exec(refuse_signals) };
        let out = cmd.output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        let r: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}\n{log}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(out.status.code(), Some(3), "{backend}: {r}\n{log}");
        assert_eq!(r["outcome"]["kind"], "timed_out", "{backend}: {r}");
        let reason = r["reason"].as_str().unwrap();
        assert!(
            reason.ends_with(
                "it could not be signalled (not permitted: it runs as another user, \
                 as through sudo or a setuid program) and exited with code 0 by itself"
            ),
            "{backend}: {reason}"
        );
        assert!(!reason.contains("ignored SIGTERM"), "{backend}: {reason}");
        assert_eq!(r["stdout"]["data"], "done\n", "{backend}: {r}");
        assert!(log.contains("not permitted to signal the check"), "{log}");
    }
}

/// Run `cmd` (a `pidring run --json …`) with marker `mark`'s environment: its
/// output, its JSON result and what is left alive of it when it returned.
/// `None` (after a SKIP line) if the check ran without containment.
fn run_marked(
    cmd: &mut Command,
    mark: &str,
    test: &str,
) -> Option<(std::process::Output, serde_json::Value, Vec<i32>)> {
    use common::escape::*;
    let child = cmd
        .envs(Escape::env(mark))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let left = survivors(mark);
    // Its subtree (`Containment::Auto` as root) is gone with it.
    for mount in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let subtree = format!("{mount}/pidring.{pid}.0");
        assert!(
            !std::path::Path::new(&subtree).exists(),
            "{subtree} left behind"
        );
    }
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{log}", String::from_utf8_lossy(&out.stdout)));
    let mode = if r["cgroup"].is_null() {
        "fallback"
    } else {
        "cgroup"
    };
    cgroup_or_skip(test, mode, &log).then_some((out, r, left))
}

/// The same check with containment: the executor still may not signal it,
/// but `cgroup.kill` is no signal call of ours, and kills it and what it
/// started (the kernel sends the SIGKILL) at the end of the grace.
#[test]
fn a_check_that_may_not_be_signalled_dies_by_its_cgroup() {
    use common::escape::*;
    use std::os::unix::process::CommandExt;
    for backend in ["io_uring", "epoll"] {
        let m = marker();
        let mut cmd = pidring();
        cmd.args(["run", "--backend", backend, "--json", "--cgroup", "auto"])
            .args(["--timeout", "300ms", "--grace", "300ms", "--"])
            .args(["/bin/sh", "-c", &Escape::SetsidDoubleFork.script(false)]);
        // SAFETY: refuse_signals only calls prctl(2), which is async-signal-safe.
        unsafe { cmd.pre_exec(refuse_signals) };
        let t0 = std::time::Instant::now();
        let test = "a_check_that_may_not_be_signalled_dies_by_its_cgroup";
        let Some((_, r, left)) = run_marked(&mut cmd, &m, test) else {
            return;
        };
        assert_eq!(r["outcome"]["kind"], "timed_out", "{backend}: {r}");
        let reason = r["reason"].as_str().unwrap();
        assert!(
            reason.contains("it could not be signalled")
                && reason.contains("killed through its cgroup"),
            "{backend}: {reason}"
        );
        assert!(
            left.is_empty(),
            "{backend}: alive after the result: {left:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(20), "{backend}");
    }
}

/// Escapees of all three kinds are gone when `pidring run` returns, after
/// a timeout and after a normal exit.
#[test]
fn run_leaves_nothing_behind_however_it_escaped() {
    use common::escape::*;
    for backend in ["io_uring", "epoll"] {
        for escape in ESCAPES {
            for then_exit in [true, false] {
                let m = marker();
                let timeout = if then_exit { "20s" } else { "1s" };
                let mut cmd = pidring();
                cmd.args(["run", "--backend", backend, "--json", "--timeout", timeout])
                    .args(["--grace", "200ms", "--", "/bin/sh", "-c"])
                    .arg(escape.script(then_exit));
                let test = "run_leaves_nothing_behind_however_it_escaped";
                let Some((out, r, left)) = run_marked(&mut cmd, &m, test) else {
                    return;
                };
                let what = format!("{backend} {escape:?} exit={then_exit}");
                let code = if then_exit { 0 } else { 3 };
                assert_eq!(out.status.code(), Some(code), "{what}: {r}");
                assert_eq!(r["stdout"]["data"], "started\n", "{what}: {r}");
                assert!(
                    left.is_empty(),
                    "{what}: alive after `pidring run` returned: {left:?}"
                );
                assert!(r["cgroup"]["escapees"].as_u64() >= Some(1), "{what}: {r}");
            }
        }
    }
}

#[test]
fn run_user_takes_the_users_ids_and_groups() {
    if !rustix::process::geteuid().is_root() {
        let out = pidring()
            .args(["run", "--user", "root", "--", "/bin/true"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not root"), "{err}");
        return;
    }
    let out = pidring()
        .args([
            "run",
            "--user",
            "nobody",
            "--",
            "/bin/sh",
            "-c",
            "id -u; id -G",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let want = Command::new("id").args(["-G", "nobody"]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("65534\n{}", String::from_utf8_lossy(&want.stdout))
    );
    let out = pidring()
        .args(["run", "--user", "no-such-user-pidring", "--", "/bin/true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no user \"no-such-user-pidring\""), "{err}");
}

/// A new pseudo-terminal: its master, and the path of its slave.
fn open_pty() -> (std::os::fd::OwnedFd, std::ffi::CString) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain libc calls on the fd posix_openpt returns, checked.
    unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        let master = std::os::fd::OwnedFd::from_raw_fd(fd);
        assert_eq!(libc::grantpt(fd), 0);
        assert_eq!(libc::unlockpt(fd), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0);
        (master, std::ffi::CStr::from_ptr(name.as_ptr()).to_owned())
    }
}

/// `cmd` in a session of its own whose controlling terminal is `slave`, as
/// a command typed at a shell prompt has one.
fn with_terminal(mut cmd: Command, slave: &std::ffi::CStr) -> Command {
    use std::os::unix::process::CommandExt;
    let slave = slave.to_owned();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::open(slave.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
            if fd < 0 || libc::ioctl(fd, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    cmd
}

/// A check leads its own process group but shares the executor's session,
/// so it must let go of the terminal `run` was started from: a plugin that
/// opens /dev/tty (ssh or sudo asking for a password) fails at once instead
/// of prompting, or being stopped as a background job until its timeout.
#[test]
fn a_check_cannot_reach_the_terminal_run_was_started_from() {
    let (_master, slave) = open_pty();
    // This shell's pid, process group, session and terminal (fields 1, 5,
    // 6, 7 of its stat: `read` is a builtin, so /proc/self is the shell),
    // and whether a subshell can open /dev/tty.
    let probe = "read -r pid _ _ _ pgrp sid tty _ < /proc/self/stat; \
        echo \"$pid $pgrp $sid $tty\"; \
        if (exec 3</dev/tty) 2>/dev/null; then echo reached; else echo none; fi";
    let fields = |out: &std::process::Output| -> (Vec<i64>, String) {
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut lines = text.lines();
        let ids = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        (ids, lines.next().unwrap_or_default().to_string())
    };

    // The control: the same probe typed at the terminal reaches it.
    let mut sh = Command::new("/bin/sh");
    sh.args(["-c", probe]);
    let out = with_terminal(sh, &slave).output().unwrap();
    let (ids, tty) = fields(&out);
    assert_eq!(ids.len(), 4, "{out:?}");
    assert_ne!(ids[3], 0, "the control has a controlling terminal: {out:?}");
    assert_eq!(tty, "reached", "{out:?}");

    for backend in ["io_uring", "epoll"] {
        let mut run = pidring();
        run.args(["run", "--backend", backend, "--", "/bin/sh", "-c", probe]);
        let child = with_terminal(run, &slave)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let run_pid = child.id() as i64;
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{backend}: {out:?}");
        let (ids, tty) = fields(&out);
        assert_eq!(ids.len(), 4, "{backend}: {out:?}");
        assert_eq!(ids[1], ids[0], "{backend}: the check leads its own group");
        assert_eq!(ids[2], run_pid, "{backend}: in run's session");
        assert_eq!(ids[3], 0, "{backend}: the check has no terminal");
        assert_eq!(tty, "none", "{backend}: /dev/tty opened: {out:?}");
    }
}
