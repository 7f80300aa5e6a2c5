//! Integration tests of the engine, each run on both backends, each ending
//! with "no zombie children, no leaked fds" (see `common::each_backend`).

mod common;

use common::*;
use pidring::{Check, Executor, ExitStatus, Outcome, State, SubmitError};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

#[test]
fn exit_codes_map_to_nagios_states() {
    each_backend(executor, |exec, backend| {
        for (code, state) in [
            (0, State::Ok),
            (1, State::Warning),
            (2, State::Critical),
            (3, State::Unknown),
            (4, State::Unknown),
            (126, State::Unknown),
            (127, State::Unknown),
        ] {
            let r = run(
                exec,
                sh(&format!("echo 'text {code}|x=1;2;3'; exit {code}")),
            );
            assert_eq!(r.outcome, Outcome::Exited { code }, "{backend}");
            assert_eq!(r.state, state, "{backend} code {code}");
            assert_eq!(r.plugin.text, format!("text {code}"));
            assert_eq!(r.plugin.perfdata.len(), 1);
            assert_eq!(r.exit.unwrap().wait_status(), code << 8);
            if code > 3 {
                assert!(!r.reason.is_empty(), "an out-of-range code is explained");
            } else {
                assert!(r.reason.is_empty());
            }
            assert!(r.rusage.is_some());
        }
    });
}

#[test]
fn a_crash_is_unknown_with_the_signal_named() {
    each_backend(executor, |exec, _| {
        let r = run(exec, sh("kill -SEGV $$"));
        assert!(
            matches!(r.outcome, Outcome::Signaled { signal: 11, .. }),
            "{:?}",
            r.outcome
        );
        assert_eq!(r.state, State::Unknown);
        assert!(r.reason.contains("SIGSEGV"), "{}", r.reason);
    });
}

/// A plugin's `clone(CLONE_PARENT)` makes a sibling of its leader: a child
/// of the executor (of its loop thread, which created the leader), not of
/// the plugin. Outside subreaper mode too it is ours to reap: it must not
/// stay our zombie, neither while the executor runs nor after it is gone.
#[test]
fn a_sibling_made_with_clone_parent_is_reaped_without_subreaper_mode() {
    if !cfg!(target_arch = "x86_64") {
        eprintln!("skipped: the plugin calls clone by its x86_64 number");
        return;
    }
    // clone(CLONE_PARENT | SIGCHLD); the sibling exits at once, or (with an
    // argument) outlives its check in a session of its own.
    let staying = std::sync::Mutex::new(Vec::new());
    let plugin = "use POSIX (); my $r = syscall(56, 0x8000 | 17, 0, 0, 0, 0); \
                  if ($r == 0) { if (@ARGV) { POSIX::setsid(); sleep 300 } POSIX::_exit(0) } \
                  print \"$r\\n\";";
    each_backend(executor, |exec, backend| {
        let r = run(exec, Check::argv(["perl", "-e", plugin]));
        assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{backend}: {r:?}");
        let sibling: i32 = r.stdout.text().trim().parse().expect("the sibling's pid");
        assert!(
            eventually(Duration::from_secs(10), || !our_zombies()
                .contains(&sibling)),
            "{backend}: {sibling} stays a zombie of the executor"
        );
        // One that is alive when the executor stops: the shutdown leaves
        // nothing behind, nor a child that would become our zombie later.
        let r = run(exec, Check::argv(["perl", "-e", plugin, "stay"]));
        assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{backend}: {r:?}");
        let sibling: i32 = r.stdout.text().trim().parse().expect("the sibling's pid");
        staying.lock().unwrap().push(sibling);
    });
    let me = std::process::id() as i32;
    for pid in staying.into_inner().unwrap() {
        let left = stat(pid).filter(|&(_, ppid, _, _)| ppid == me);
        if left.is_some() {
            // Not to outlive the test binary either.
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
        assert!(
            left.is_none(),
            "{pid} is still our child after the executor stopped: {left:?}"
        );
    }
}

#[test]
fn spawn_failures_are_results_with_clear_messages() {
    let dir = tempdir();
    let not_exec = dir.join("not-executable");
    plugin_file(&not_exec, "#!/bin/sh\necho hi\n", 0o644);
    each_backend(executor, |exec, _| {
        let r = run(exec, Check::argv(["/nonexistent/check_nothing", "-H", "x"]));
        match &r.outcome {
            Outcome::SpawnFailed { errno, message } => {
                assert_eq!(*errno, Some(libc::ENOENT));
                assert!(message.contains("/nonexistent/check_nothing"), "{message}");
            }
            o => panic!("expected spawn failure, got {o:?}"),
        }
        assert_eq!(r.state, State::Unknown);
        assert!(r.pid.is_none());

        let r = run(exec, Check::argv([not_exec.to_str().unwrap()]));
        assert!(
            matches!(
                r.outcome,
                Outcome::SpawnFailed {
                    errno: Some(libc::EACCES),
                    ..
                }
            ),
            "{:?}",
            r.outcome
        );

        // A PATH of its own: the test's may hold a directory this user may
        // not search (/root/.cargo/bin as nobody), and then the answer is
        // EACCES, as execvp's.
        let r = run(
            exec,
            Check::argv(["no-such-plugin-anywhere"]).env("PATH", "/usr/bin:/bin"),
        );
        assert!(matches!(
            r.outcome,
            Outcome::SpawnFailed {
                errno: Some(libc::ENOENT),
                ..
            }
        ));

        // A bare name is found through PATH.
        let r = run(exec, Check::argv(["true"]));
        assert_eq!(r.outcome, Outcome::Exited { code: 0 });
    });
}

#[test]
fn a_bare_program_name_is_searched_in_the_checks_path_like_execvp() {
    // The search happens in the child (no file system access on the loop):
    // a directory or a non-executable file of that name is passed over, and
    // "permission denied" is what is left if nothing ran.
    let dir = tempdir().join("path-search");
    let (first, second) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(first.join("pidring-probe")).unwrap(); // a directory
    plugin_file(
        &second.join("pidring-probe"),
        "#!/bin/sh\necho found-in-b\n",
        0o755,
    );
    let denied = dir.join("c");
    plugin_file(&denied.join("pidring-probe"), "#!/bin/sh\n", 0o644);
    let path = |dirs: &[&std::path::Path]| {
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    };
    each_backend(executor, |exec, _| {
        let r = run(
            exec,
            Check::argv(["pidring-probe"]).env("PATH", path(&[&first, &denied, &second])),
        );
        assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{}", r.reason);
        assert_eq!(r.stdout.text(), "found-in-b\n");
        let r = run(
            exec,
            Check::argv(["pidring-probe"]).env("PATH", path(&[&first, &denied])),
        );
        assert!(
            matches!(
                r.outcome,
                Outcome::SpawnFailed {
                    errno: Some(libc::EACCES),
                    ..
                }
            ),
            "{:?}",
            r.outcome
        );
    });
}

#[test]
fn a_path_is_searched_once_per_directory_and_within_a_bound() {
    // A PATH of a million `:` names one directory (the current one), not a
    // million candidates: the loop used to build a string for each entry
    // (~300 MB for a 1 MiB PATH and a 250-byte name) and the child to try
    // each. More different directories than are searched is refused, and
    // says why, rather than searched in part.
    let bin = tempdir().join("path-bound");
    let script = bin.join("pidring-bound-probe");
    plugin_file(&script, "#!/bin/sh\necho found\n", 0o755);
    let bin = bin.display().to_string();
    let missing = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("/nonexistent/pidring/{i}"))
            .collect()
    };
    let probe = |path: String| Check::argv(["pidring-bound-probe"]).env("PATH", path);
    each_backend(executor, |exec, _| {
        // Many empty entries and a directory named 1000 times: found. (A
        // variable over 128 KiB could not be passed to the program.)
        let path = format!(
            "{}{}:{bin}",
            ":".repeat(60_000),
            ":/nonexistent/pidring".repeat(1000)
        );
        let r = run(exec, probe(path));
        assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{}", r.reason);
        assert_eq!(r.stdout.text(), "found\n");

        // The last of 1024 different directories is searched.
        let mut dirs = missing(1023);
        dirs.push(bin.clone());
        let r = run(exec, probe(dirs.join(":")));
        assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{}", r.reason);

        // The 1025th is not: the check fails, and says why.
        let mut dirs = missing(1024);
        dirs.push(bin.clone());
        let r = run(exec, probe(dirs.join(":")));
        match &r.outcome {
            Outcome::SpawnFailed {
                errno: None,
                message,
            } => assert!(
                message.contains("pidring-bound-probe")
                    && message.contains("more than 1024 different directories"),
                "{message}"
            ),
            o => panic!("expected spawn failure, got {o:?}"),
        }
        assert_eq!(r.state, State::Unknown);
        // A full path needs no search, whatever the PATH.
        let r = run(
            exec,
            Check::argv([script.to_str().unwrap()]).env("PATH", missing(2000).join(":")),
        );
        assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{}", r.reason);

        // No file has a name longer than NAME_MAX (255): not looked for.
        let r = run(exec, Check::argv(["n".repeat(256)]));
        assert!(
            matches!(
                r.outcome,
                Outcome::SpawnFailed {
                    errno: Some(libc::ENAMETOOLONG),
                    ..
                }
            ),
            "{:?}",
            r.outcome
        );
    });
}

#[test]
fn an_argument_list_too_long_is_said_once() {
    // One argument over MAX_ARG_STRLEN (128 KiB): E2BIG from execve. The
    // message said "Argument list too long (os error 7) (argument list too long)".
    each_backend(executor, |exec, _| {
        let r = run(exec, Check::argv(["/bin/true".into(), "x".repeat(200_000)]));
        match &r.outcome {
            Outcome::SpawnFailed { errno, message } => {
                assert_eq!(*errno, Some(libc::E2BIG));
                assert!(message.contains("/bin/true"), "{message}");
                assert_eq!(
                    message.to_lowercase().matches("too long").count(),
                    1,
                    "{message}"
                );
            }
            o => panic!("expected spawn failure, got {o:?}"),
        }
    });
}

#[test]
fn scripts_without_a_shebang_run_under_sh_like_execvp_and_a_missing_interpreter_is_named() {
    // Nagios starts plugins with execvp, which hands a file the kernel
    // will not execute (ENOEXEC) to /bin/sh.
    let dir = tempdir().join("shebangs");
    let bare = dir.join("check_bare");
    plugin_file(
        &bare,
        "echo \"OK - ran by sh with $# args: $1\"\nexit 1\n",
        0o755,
    );
    let bad = dir.join("check_bad_interpreter");
    plugin_file(&bad, "#!/nonexistent/interpreter\necho hi\n", 0o755);
    each_backend(executor, |exec, _| {
        let r = run(exec, Check::argv([bare.to_str().unwrap(), "x"]));
        assert_eq!(r.outcome, Outcome::Exited { code: 1 }, "{}", r.reason);
        assert_eq!(r.stdout.text(), "OK - ran by sh with 1 args: x\n");
        // Through PATH as well.
        let r = run(
            exec,
            Check::argv(["check_bare"]).env("PATH", dir.to_str().unwrap()),
        );
        assert_eq!(r.outcome, Outcome::Exited { code: 1 }, "{}", r.reason);

        let r = run(exec, Check::argv([bad.to_str().unwrap()]));
        match &r.outcome {
            Outcome::SpawnFailed { errno, message } => {
                assert_eq!(*errno, Some(libc::ENOENT));
                assert!(message.contains("interpreter"), "{message}");
                assert!(message.contains("check_bad_interpreter"), "{message}");
            }
            o => panic!("expected spawn failure, got {o:?}"),
        }
    });
}

#[test]
fn invalid_checks_are_rejected_at_submit() {
    each_backend(executor, |exec, _| {
        let empty: [&str; 0] = [];
        assert!(matches!(
            exec.submit(Check::argv(empty)),
            Err(SubmitError::Invalid(_))
        ));
        assert!(matches!(
            exec.submit(Check::argv(["/bin/true"]).timeout(Duration::ZERO)),
            Err(SubmitError::Invalid(_))
        ));
        assert!(Check::command_line("   ").is_err());
        // The executor keeps serving.
        assert_eq!(run(exec, Check::argv(["/bin/true"])).state, State::Ok);
    });
}

#[test]
fn a_check_that_honours_sigterm_times_out_without_escalation() {
    each_backend(executor, |exec, _| {
        let t0 = Instant::now();
        let r = run(
            exec,
            sh("echo partial; exec sleep 30")
                .timeout(Duration::from_millis(300))
                .grace(Duration::from_secs(10)),
        );
        assert_eq!(
            r.outcome,
            Outcome::TimedOut {
                timeout_ms: 300,
                signal: libc::SIGTERM,
                escalated: false
            }
        );
        assert_eq!(r.state, State::Unknown);
        assert!(r.reason.contains("timed out after 300ms"), "{}", r.reason);
        assert!(r.reason.ends_with("stopped by SIGTERM"), "{}", r.reason);
        assert_eq!(r.stdout.text(), "partial\n");
        assert!(r.timings.kill_lateness.is_some());
        assert!(
            t0.elapsed() < Duration::from_secs(9),
            "no SIGKILL was needed"
        );

        // One that catches SIGTERM and exits still timed out, and the text
        // says what the signal did rather than that it killed it.
        let r = run(
            exec,
            sh("trap 'exit 0' TERM; echo ready; while :; do sleep 0.01; done")
                .timeout(Duration::from_millis(300)),
        );
        assert!(r.timed_out(), "{:?}", r.outcome);
        assert_eq!(r.exit, Some(ExitStatus::Exited { code: 0 }));
        assert!(
            r.reason.ends_with("sent SIGTERM, it exited with code 0"),
            "{}",
            r.reason
        );
    });
}

#[test]
fn timeout_state_is_configurable() {
    each_backend(executor, |exec, _| {
        let r = run(
            exec,
            Check::argv(["/bin/sleep", "30"])
                .timeout(Duration::from_millis(100))
                .timeout_state(State::Critical),
        );
        assert!(r.timed_out());
        assert_eq!(r.state, State::Critical);
    });
}

#[test]
fn a_check_that_ignores_sigterm_is_killed_after_the_grace() {
    each_backend(executor, |exec, _| {
        let t0 = Instant::now();
        let r = run(
            exec,
            sh("trap '' TERM; echo started; while :; do sleep 1; done")
                .timeout(Duration::from_millis(200))
                .grace(Duration::from_millis(300)),
        );
        assert_eq!(
            r.outcome,
            Outcome::TimedOut {
                timeout_ms: 200,
                signal: libc::SIGKILL,
                escalated: true
            }
        );
        assert!(matches!(
            r.exit,
            Some(pidring::ExitStatus::Signaled { signal: 9, .. })
        ));
        assert!(r.reason.contains("SIGKILL"), "{}", r.reason);
        assert!(t0.elapsed() >= Duration::from_millis(500));
    });
}

/// The seed's race: the plugin traps SIGTERM and exits by itself inside the
/// grace window. It must be reaped (no zombie) and never signalled again.
#[test]
fn exits_inside_the_grace_window_are_reaped_every_time() {
    each_backend(executor, |exec, _| {
        let n = 150;
        let pendings: Vec<_> = (0..n)
            .map(|i| {
                // Vary the exit time around the grace end to hit every ordering.
                let delay = [0.0, 0.01, 0.05, 0.1, 0.15][i % 5];
                exec.submit(
                    sh(&format!(
                        "trap 'sleep {delay}; exit 0' TERM; while :; do sleep 1; done"
                    ))
                    .timeout(Duration::from_millis(100))
                    .grace(Duration::from_millis(100)),
                )
                .unwrap()
            })
            .collect();
        let mut pgids = HashSet::new();
        for p in pendings {
            let r = p.wait_timeout(Duration::from_secs(60)).expect("result");
            assert!(r.timed_out(), "{:?}", r.outcome);
            // Reaped by the loop through its pidfd (not by a safety net).
            assert!(r.exit.is_some() && r.rusage.is_some(), "{r:?}");
            pgids.insert(r.pid.unwrap());
        }
        assert_groups_end(&pgids, Duration::from_secs(10), "after the timeouts");
    });
}

#[test]
fn exits_at_the_deadline_get_one_result_each_and_are_judged_consistently() {
    // Exits landing in the same loop turn as their deadline: the turn fires
    // signalling timers before it handles exits, and must neither signal a
    // check whose exit it already holds nor spin on it.
    each_backend(executor, |exec, _| {
        let n = 200;
        let pendings: Vec<_> = (0..n)
            .map(|i| {
                let ms = [95, 100, 105][i % 3];
                exec.submit(
                    Check::argv(["/bin/sleep", &format!("0.{ms:03}")])
                        .timeout(Duration::from_millis(100))
                        .grace(Duration::from_millis(100)),
                )
                .unwrap()
            })
            .collect();
        for p in pendings {
            let r = p.wait_timeout(Duration::from_secs(60)).expect("a result");
            match r.outcome {
                // An exit is an exit; a timeout was ended by our SIGTERM.
                Outcome::Exited { code: 0 } => assert!(r.timings.kill_lateness.is_none()),
                Outcome::TimedOut {
                    signal: libc::SIGTERM,
                    escalated: false,
                    ..
                } => {}
                // On a loaded machine a child may not reach exec within
                // 100 ms; it is then SIGKILLed (its signals are still
                // blocked, SIGTERM could only wait out the grace).
                Outcome::TimedOut {
                    signal: libc::SIGKILL,
                    escalated: false,
                    ..
                } if r.reason.contains("before it could start its program") => {}
                o => panic!("unexpected outcome {o:?}: {}", r.reason),
            }
        }
    });
}

#[test]
fn grandchildren_in_the_group_die_on_timeout() {
    each_backend(executor, |exec, _| {
        let r = run(
            exec,
            sh("sleep 300 & sleep 300 & echo $!; wait").timeout(Duration::from_millis(200)),
        );
        assert!(r.timed_out());
        let grandchild: i32 = r.stdout.text().trim().parse().expect("grandchild pid");
        let pgids = HashSet::from([r.pid.unwrap()]);
        assert_groups_end(&pgids, Duration::from_secs(5), "group members");
        assert!(!matches!(stat(grandchild), Some((s, ..)) if s != 'Z'));
    });
}

#[test]
fn a_timed_out_check_takes_descendants_that_left_its_group_with_it() {
    // One child leaves the session (setsid), one only the group (setpgid);
    // both ignore SIGTERM. The leader dies of SIGTERM at the deadline, so
    // the escapees must still get SIGKILL although the leader is gone.
    let script = "setsid sh -c 'trap \"\" TERM; exec sleep 1000' </dev/null >/dev/null 2>&1 & \
        echo $!; \
        perl -e '$SIG{TERM}=\"IGNORE\"; setpgrp(0,0); sleep 1000' </dev/null >/dev/null 2>&1 & \
        echo $!; \
        exec sleep 1000";
    each_backend(executor, |exec, _| {
        let idle = fd_count();
        let r = run(
            exec,
            sh(script)
                .timeout(Duration::from_millis(500))
                .grace(Duration::from_secs(30)),
        );
        assert!(r.timed_out(), "{:?}", r.outcome);
        assert!(
            !r.reason.contains("SIGKILL"),
            "the leader died of SIGTERM: {}",
            r.reason
        );
        let escapees: Vec<i32> = r
            .stdout
            .text()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(escapees.len(), 2, "{:?}", r.stdout.text());
        let dead = |p: i32| !matches!(stat(p), Some((st, ..)) if st != 'Z' && st != 'X');
        assert!(
            eventually(Duration::from_secs(10), || escapees
                .iter()
                .all(|&p| dead(p))),
            "descendants outside the group outlived the timeout: {:?}",
            escapees.iter().map(|&p| (p, stat(p))).collect::<Vec<_>>()
        );
        // Their pidfds went with the check (invariant 7).
        assert_settles(exec, "fds", fd_count, idle);
    });
}

#[test]
fn leftover_group_members_are_swept_after_a_normal_exit() {
    each_backend(executor, |exec, _| {
        let r = run(exec, sh("sleep 300 >/dev/null 2>&1 & echo ok"));
        assert_eq!(r.state, State::Ok);
        let pgids = HashSet::from([r.pid.unwrap()]);
        assert_groups_end(&pgids, Duration::from_secs(5), "after a normal exit");
    });
}

#[test]
fn a_descendant_holding_stdout_does_not_hold_the_check() {
    each_backend(executor, |exec, _| {
        // Escapes the group (setsid) and keeps stdout open for 30s.
        let t0 = Instant::now();
        let r = run(
            exec,
            // The leader waits until the grandchild has really left its
            // session (else the exit sweep could kill it first).
            sh("setsid sleep 30 & pid=$!; echo $pid; \
                while [ \"$(cut -d' ' -f6 /proc/$pid/stat)\" != \"$pid\" ]; do sleep 0.01; done; \
                echo 'OK - leader done'")
            .drain(Duration::from_millis(200)),
        );
        let took = t0.elapsed();
        assert_eq!(r.state, State::Ok);
        assert!(r.output_cut, "output was cut at the drain bound");
        assert!(took < Duration::from_secs(10), "held for {took:?}");
        let escaped: i32 = r.stdout.text().lines().next().unwrap().parse().unwrap();
        // Test hygiene: the escaped process is not ours to keep.
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(escaped).unwrap(),
            rustix::process::Signal::KILL,
        );

        // Same with a group member when the group is not swept on exit.
        let r = run(
            exec,
            sh("sleep 30 & echo ok")
                .kill_group_on_exit(false)
                .drain(Duration::from_millis(100)),
        );
        assert!(r.output_cut);
        for p in live_in_groups(&HashSet::from([r.pid.unwrap()])) {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(p).unwrap(),
                rustix::process::Signal::KILL,
            );
        }
    });
}

/// A cancel of a check that only drains (its leader ended; an escaped
/// descendant holds the pipe) delivers the result at once, the output cut,
/// instead of at the drain bound.
#[test]
fn cancelling_a_draining_check_ends_the_drain() {
    each_backend(executor, |exec, backend| {
        let ready =
            std::env::temp_dir().join(format!("pidring-draining-{}-{backend}", std::process::id()));
        let _ = std::fs::remove_file(&ready);
        let t0 = Instant::now();
        let p = exec
            .submit(
                sh(&format!(
                    "setsid sleep 30 & pid=$!; echo $pid; \
                     while [ \"$(cut -d' ' -f6 /proc/$pid/stat)\" != \"$pid\" ]; do sleep 0.01; done; \
                     echo $$ > {0}.tmp; mv {0}.tmp {0}",
                    ready.display()
                ))
                .drain(Duration::from_secs(60)),
            )
            .unwrap();
        // The leader has written its pid: wait until it is gone (reaped).
        assert!(eventually(Duration::from_secs(20), || ready.exists()));
        let leader: i32 = std::fs::read_to_string(&ready)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(eventually(Duration::from_secs(20), || {
            !std::path::Path::new(&format!("/proc/{leader}")).exists()
        }));
        exec.cancel(p.id());
        let r = p.wait_timeout(Duration::from_secs(30)).unwrap();
        let took = t0.elapsed();
        let _ = std::fs::remove_file(&ready);
        let escaped: i32 = r.stdout.text().lines().next().unwrap().parse().unwrap();
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(escaped).unwrap(),
            rustix::process::Signal::KILL,
        );
        assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{backend}: {r:?}");
        assert!(r.output_cut, "{backend}: the drain was cut: {r:?}");
        assert!(
            took < Duration::from_secs(25),
            "{backend}: held for {took:?} (the drain bound is 60 s)"
        );
    });
}

#[test]
fn closing_stdout_does_not_stop_the_clock_and_others_keep_completing() {
    each_backend(executor, |exec, _| {
        let t0 = Instant::now();
        let stuck = exec
            .submit(sh("exec >&- 2>&-; sleep 30").timeout(Duration::from_secs(3)))
            .unwrap();
        // While it runs with closed pipes, other checks complete.
        for i in 0..20 {
            let r = run(exec, sh(&format!("echo {i}")));
            assert_eq!(r.stdout.text(), format!("{i}\n"));
        }
        assert!(
            stuck.try_result().is_none(),
            "the stuck check is not done yet"
        );
        let r = stuck.wait_timeout(Duration::from_secs(30)).unwrap();
        assert!(r.timed_out());
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(10),
            "timeout enforced on time: {took:?}"
        );
    });
}

#[test]
fn output_floods_are_capped_and_counted() {
    each_backend(executor, |exec, _| {
        let total: u64 = 50 * 1024 * 1024;
        let cap = 64 * 1024;
        let r = run(
            exec,
            sh(&format!(
                "head -c {total} /dev/zero; head -c 1000 /dev/zero >&2"
            ))
            .output_cap(cap)
            .timeout(Duration::from_secs(60)),
        );
        assert_eq!(r.state, State::Ok);
        assert_eq!(r.stdout.data.len(), cap);
        assert!(r.stdout.truncated);
        assert_eq!(r.stdout.dropped_bytes, total - cap as u64);
        assert_eq!(r.stderr.data.len(), 1000);
        assert!(!r.stderr.truncated);
        assert!(r.stdout.data.capacity() <= 2 * cap, "memory stays bounded");

        // The same bound on stderr, flooded while stdout stays small.
        let r = run(
            exec,
            sh(&format!("head -c {total} /dev/zero >&2; echo done"))
                .output_cap(cap)
                .timeout(Duration::from_secs(60)),
        );
        assert_eq!(r.state, State::Ok);
        assert_eq!(r.stdout.text(), "done\n");
        assert_eq!(r.stderr.data.len(), cap);
        assert!(r.stderr.truncated);
        assert_eq!(r.stderr.dropped_bytes, total - cap as u64);
        assert!(r.stderr.data.capacity() <= 2 * cap, "memory stays bounded");
    });
}

#[test]
fn children_see_only_stdin_stdout_stderr() {
    each_backend(executor, |exec, _| {
        // A descriptor this process leaks without O_CLOEXEC must not reach a check.
        // SAFETY: dup(2) of our own stdin; closed again below.
        let leaked = unsafe { libc::dup(0) };
        assert!(leaked > 2);
        // `ls` (a child of the shell) lists the shell's fds: no glob, no pipe
        // in the shell itself that could add one of its own.
        let r = run(exec, sh("ls /proc/$$/fd"));
        let fds: Vec<String> = r.stdout.text().lines().map(String::from).collect();
        // SAFETY: closing the fd dup'ed above.
        unsafe { libc::close(leaked) };
        assert_eq!(fds, ["0", "1", "2"], "child fds");
        let r = run(exec, sh("readlink /proc/$$/fd/0"));
        assert_eq!(r.stdout.text().trim(), "/dev/null");
    });
}

#[test]
fn a_checks_stdout_and_stderr_block_like_any_pipe() {
    // The executor reads its ends without blocking; the plugin's ends must
    // block, or a plugin writing faster than we read would get EAGAIN.
    each_backend(executor, |exec, _| {
        let r = run(
            exec,
            sh("exec grep -h '^flags' /proc/self/fdinfo/1 /proc/self/fdinfo/2 >&2"),
        );
        let lines: Vec<String> = r.stderr.text().lines().map(String::from).collect();
        assert_eq!(lines.len(), 2, "{lines:?} / {:?}", r.stdout.text());
        for line in lines {
            let flags = u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap();
            assert_eq!(flags & libc::O_NONBLOCK as u32, 0, "{line}");
        }
        // And a plugin writing far more than a pipe holds loses nothing
        // (its writes block while the loop catches up).
        let r = run(
            exec,
            sh("head -c 1000000 /dev/zero | tr '\\0' x; echo; echo done >&2"),
        );
        assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{}", r.reason);
        assert_eq!(r.stderr.text().trim(), "done");
    });
}

#[test]
fn an_idle_executor_holds_no_descriptor_of_a_finished_check() {
    // A child's pipe write ends sit in the loop's low slots until it has its
    // own descriptor table; none may outlive its check. Counted while the
    // executor is alive and idle, after runs that admit as checks finish.
    each_backend(
        |backend| {
            Executor::builder()
                .backend(backend)
                .max_running(4)
                .build()
                .expect("executor")
        },
        |exec, _| {
            let _ = run(exec, Check::argv(["/bin/true"]));
            assert!(exec.wait_idle(Duration::from_secs(60)));
            let idle = fd_count();
            let pending: Vec<_> = (0..200)
                .map(|i| {
                    let c = if i % 2 == 0 {
                        sh("echo out; echo err >&2")
                    } else {
                        Check::argv(["/bin/true"])
                    };
                    exec.submit(c).expect("accepted")
                })
                .collect();
            for p in pending {
                assert_eq!(p.wait().outcome, Outcome::Exited { code: 0 });
            }
            assert_settles(exec, "fds", fd_count, idle);
        },
    );
}

#[test]
fn env_and_cwd_are_applied() {
    each_backend(executor, |exec, _| {
        let r = run(
            exec,
            sh("echo \"$PIDRING_T|$HOME|$(pwd)\"")
                .env("PIDRING_T", "v1")
                .cwd("/tmp"),
        );
        let home = std::env::var("HOME").unwrap_or_default();
        assert_eq!(r.stdout.text().trim(), format!("v1|{home}|/tmp"));
        let r = run(
            exec,
            Check::argv(["/usr/bin/env"]).env_clear().env("ONLY", "1"),
        );
        assert_eq!(r.stdout.text(), "ONLY=1\n");
        let r = run(exec, sh("echo x").cwd("/nonexistent-dir"));
        match &r.outcome {
            Outcome::SpawnFailed { errno, message } => {
                assert_eq!(*errno, Some(libc::ENOENT));
                // The message names the directory, not the (fine) program.
                assert!(
                    message.contains("working directory /nonexistent-dir"),
                    "{message}"
                );
            }
            o => panic!("expected spawn failure, got {o:?}"),
        }
    });
}

#[test]
fn signal_dispositions_and_mask_are_reset_in_the_child() {
    each_backend(executor, |exec, _| {
        // Rust ignores SIGPIPE in this process, and the environment may block
        // or ignore others (SIGCHLD is blocked here); a check gets defaults.
        // Only the 31 classic signals are compared: glibc reserves 32 and 33.
        // exec: the shell itself becomes grep, so no fork of the shell (dash
        // blocks all signals around fork) can be caught mid-way.
        let r = run(
            exec,
            sh("exec grep -E '^(SigIgn|SigBlk)' /proc/self/status"),
        );
        let lines: Vec<String> = r.stdout.text().lines().map(String::from).collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        for line in lines {
            let mask = u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap();
            assert_eq!(mask & 0x7fff_ffff, 0, "{line}");
        }
    });
}

#[test]
fn command_lines_split_like_nagios() {
    each_backend(executor, |exec, _| {
        let r = run(
            exec,
            Check::command_line("/bin/echo 'a  b' \"c d\" e").unwrap(),
        );
        assert_eq!(r.stdout.text(), "a  b c d e\n");
        let r = run(exec, Check::command_line("echo $((1+2)) | tr 3 x").unwrap());
        assert_eq!(r.stdout.text(), "x\n");
    });
}

#[test]
fn a_thousand_concurrent_checks_get_exactly_one_result_each() {
    each_backend(executor, |exec, _| {
        let n = 1200;
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut ids = HashSet::new();
        for _ in 0..n {
            let tx = tx.clone();
            let id = exec
                .submit_with(
                    Check::argv(["/bin/sleep", "1"]).timeout(Duration::from_secs(60)),
                    move |r| {
                        let _ = tx.send(r);
                    },
                )
                .unwrap();
            ids.insert(id);
        }
        drop(tx);
        assert!(
            eventually(Duration::from_secs(30), || exec.running() >= 1000),
            "1000+ in flight at once (saw {})",
            exec.running()
        );
        let mut seen = HashMap::new();
        while let Ok(r) = rx.recv_timeout(Duration::from_secs(60)) {
            assert_eq!(r.state, State::Ok, "{:?}", r.outcome);
            *seen.entry(r.id).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), n);
        assert!(seen.values().all(|&c| c == 1), "exactly one result each");
        assert_eq!(seen.keys().copied().collect::<HashSet<_>>(), ids);
        let m = exec.metrics();
        assert_eq!(m.counters.completed as usize, n);
        assert_eq!(exec.outstanding(), 0);
    });
}

#[test]
fn a_full_queue_rejects_clearly_and_recovers() {
    let build = |b| {
        pidring::Executor::builder()
            .backend(b)
            .max_running(2)
            .queue_limit(3)
            .build()
            .unwrap()
    };
    each_backend(build, |exec, _| {
        let sleepers: Vec<_> = (0..5)
            .map(|_| exec.submit(Check::argv(["/bin/sleep", "30"])).unwrap())
            .collect();
        match exec.submit(Check::argv(["/bin/true"])) {
            Err(e @ SubmitError::QueueFull { limit: 3, .. }) => {
                assert!(e.to_string().contains("queue full"), "{e}");
            }
            other => panic!("expected QueueFull, got {other:?}"),
        }
        for p in &sleepers {
            exec.cancel(p.id());
        }
        for p in sleepers {
            let r = p.wait_timeout(Duration::from_secs(30)).unwrap();
            assert_eq!(r.outcome, Outcome::Cancelled);
        }
        // Load dropped: accepted again.
        assert_eq!(run(exec, Check::argv(["/bin/true"])).state, State::Ok);
        assert!(exec.metrics().counters.rejected >= 1);
    });
}

#[test]
fn timeouts_count_from_the_spawn_not_the_queue() {
    let build = |b| {
        pidring::Executor::builder()
            .backend(b)
            .max_running(1)
            .build()
            .unwrap()
    };
    each_backend(build, |exec, _| {
        let first = exec.submit(Check::argv(["/bin/sleep", "0.6"])).unwrap();
        // Waits ~0.6s in the queue, then runs 0.3s of its 0.5s timeout.
        let second = exec
            .submit(Check::argv(["/bin/sleep", "0.3"]).timeout(Duration::from_millis(500)))
            .unwrap();
        assert_eq!(first.wait().state, State::Ok);
        let r = second.wait();
        assert_eq!(r.outcome, Outcome::Exited { code: 0 });
        assert!(
            r.timings.queue_wait >= Duration::from_millis(400),
            "{:?}",
            r.timings
        );
    });
}

#[test]
fn cancel_kills_sweeps_reaps_and_answers() {
    each_backend(executor, |exec, _| {
        let p = exec
            .submit(sh("trap '' TERM; sleep 300 & sleep 300"))
            .unwrap();
        assert!(eventually(Duration::from_secs(10), || exec.running() == 1));
        // Let it spawn before cancelling (cancel works in every phase, but this
        // exercises the running path).
        std::thread::sleep(Duration::from_millis(100));
        exec.cancel(p.id());
        let r = p.wait_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(r.outcome, Outcome::Cancelled);
        if let Some(pid) = r.pid {
            let pgids = HashSet::from([pid]);
            assert_groups_end(&pgids, Duration::from_secs(5), "after a cancel");
        }
        exec.cancel(123_456_789); // unknown ids are ignored
    });
}

#[test]
fn cancels_that_catch_children_before_they_exec_are_clean() {
    // Cancelled right after submit, most children are killed between clone
    // and exec (still running on a stack the loop lent them, not yet in
    // their own group): each is answered, reaped, and gives everything back.
    each_backend(executor, |exec, _| {
        let mut pendings = Vec::new();
        for _ in 0..4 {
            let batch: Vec<_> = (0..50)
                .map(|_| exec.submit(sh("sleep 30 & sleep 30")).unwrap())
                .collect();
            // Cancel as soon as they are admitted (created), not while queued.
            assert!(eventually(Duration::from_secs(30), || exec.running() == 50));
            for p in &batch {
                exec.cancel(p.id());
            }
            pendings.extend(batch);
            assert!(eventually(Duration::from_secs(30), || exec.running() == 0));
        }
        let mut pgids = HashSet::new();
        for p in pendings {
            let r = p.wait_timeout(Duration::from_secs(60)).expect("a result");
            assert_eq!(r.outcome, Outcome::Cancelled, "{}", r.reason);
            pgids.extend(r.pid);
        }
        assert!(
            eventually(Duration::from_secs(10), || live_in_groups(&pgids)
                .is_empty()),
            "processes survived: {:?}",
            live_in_groups(&pgids)
        );
        // And the executor goes on as before.
        assert_eq!(
            run(exec, Check::argv(["/bin/true"])).outcome,
            Outcome::Exited { code: 0 }
        );
    });
}

#[test]
fn shutdown_kills_reaps_and_answers_everything() {
    let _guard = serial();
    for backend in BACKENDS {
        let before = fd_count();
        let exec = pidring::Executor::builder()
            .backend(backend)
            .max_running(20)
            .build()
            .unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let n = 30; // 20 running, 10 queued
        for _ in 0..n {
            let tx = tx.clone();
            exec.submit_with(
                sh("trap '' TERM INT HUP; sleep 300 & sleep 300"),
                move |r| {
                    let _ = tx.send(r);
                },
            )
            .unwrap();
        }
        drop(tx);
        assert!(eventually(Duration::from_secs(10), || exec.running() == 20));
        exec.shutdown();
        assert!(matches!(
            exec.submit(Check::argv(["/bin/true"])),
            Err(SubmitError::ShuttingDown)
        ));
        let results: Vec<_> = rx.iter().collect();
        assert_eq!(results.len(), n, "every accepted check answered");
        let mut pgids = HashSet::new();
        for r in &results {
            assert_eq!(r.outcome, Outcome::Shutdown, "{backend}");
            if let Some(pid) = r.pid {
                // A started check was reaped by the loop, with its status.
                assert!(r.exit.is_some() && r.rusage.is_some(), "{r:?}");
                pgids.insert(pid);
            }
        }
        assert!(
            eventually(Duration::from_secs(5), || live_in_groups(&pgids).is_empty()),
            "check processes survived shutdown"
        );
        drop(exec);
        assert_clean(before);
    }
}

#[test]
fn a_panicking_callback_does_not_lose_other_results() {
    each_backend(executor, |exec, _| {
        exec.submit_with(Check::argv(["/bin/true"]), |_| panic!("callback panics"))
            .unwrap();
        assert_eq!(run(exec, Check::argv(["/bin/true"])).state, State::Ok);
    });
}

#[test]
fn metrics_count_what_happened() {
    each_backend(executor, |exec, backend| {
        run(exec, Check::argv(["/bin/true"]));
        run(
            exec,
            Check::argv(["/bin/sleep", "10"]).timeout(Duration::from_millis(50)),
        );
        run(exec, Check::argv(["/nonexistent"]));
        let m = exec.metrics();
        assert_eq!(m.backend, backend.as_str());
        assert_eq!(m.counters.completed, 3);
        assert_eq!(m.counters.submitted, 3);
        assert_eq!(m.counters.exited, 1);
        assert_eq!(m.counters.timed_out, 1);
        assert_eq!(m.counters.spawn_failed, 1);
        let kl = m.stage(pidring::Stage::KillLateness).unwrap();
        assert_eq!(kl.latency.count, 1);
        assert!(m.render_table().contains("kill_lateness"));
        // The full histograms agree with the percentiles.
        let h = exec.histograms();
        let (_, total) = h.iter().find(|(s, _)| *s == pidring::Stage::Total).unwrap();
        assert_eq!(total.len(), 3);
    });
}

/// Write a plugin file (and its directory) with `mode`, under the test
/// lock: other tests count this process's descriptors under it, and the
/// file open meanwhile would be theirs ("fd leak: 7 fds before, 6 after").
fn plugin_file(path: &std::path::Path, text: &str, mode: u32) {
    let _lock = serial();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pidring-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn every_descriptor_the_executor_opens_is_close_on_exec() {
    let _guard = serial();
    let fds = || -> HashSet<i32> {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    };
    for backend in BACKENDS {
        // Descriptors inherited from whoever started the tests are not ours.
        let inherited = fds();
        let exec = executor(backend);
        let p = exec.submit(Check::argv(["/bin/sleep", "2"])).unwrap();
        // Wait for the check's own descriptors (its pidfd and the read ends
        // of its pipes), not for a count: the executor opens others first.
        let link = |fd: &i32| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok();
        assert!(eventually(Duration::from_secs(10), || {
            let new: Vec<_> = fds().difference(&inherited).filter_map(link).collect();
            let has = |what: &str| {
                new.iter()
                    .filter(|l| l.to_string_lossy().contains(what))
                    .count()
            };
            has("pidfd") >= 1 && has("pipe:") >= 2
        }));
        let ours: Vec<i32> = fds().difference(&inherited).copied().collect();
        for fd in ours {
            let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
                continue; // closed meanwhile (the directory listing itself)
            };
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}"));
            assert_ne!(
                flags & libc::O_CLOEXEC as u32,
                0,
                "fd {fd} ({link:?}) lacks O_CLOEXEC"
            );
        }
        exec.cancel(p.id());
        p.wait();
    }
}

#[test]
fn a_timeout_sweeps_the_group_even_when_leftovers_are_kept_after_normal_exits() {
    // Invariant 3 on the timeout path alone: the leader exits at once on
    // SIGTERM, a group member ignores it, and the grace is long. Only the
    // sweep before the reap can kill the member in time.
    each_backend(executor, |exec, _| {
        let r = run(
            exec,
            sh("(trap '' TERM; exec sleep 300) & trap 'exit 0' TERM; wait")
                .kill_group_on_exit(false)
                .timeout(Duration::from_millis(200))
                .grace(Duration::from_secs(30)),
        );
        assert!(r.timed_out(), "{:?}", r.outcome);
        let pgids = HashSet::from([r.pid.unwrap()]);
        assert!(
            eventually(Duration::from_secs(5), || live_in_groups(&pgids).is_empty()),
            "a group member outlived the timed-out check: {:?}",
            live_in_groups(&pgids)
        );
    });
}

#[test]
fn output_reaches_eof_as_soon_as_the_plugin_exits() {
    // Invariant 7: the loop's own copies of a child's pipe write ends
    // (held until the child has its own descriptor table, some in low
    // slots) must be closed by then, or the output would only end at the
    // drain bound, cut. And none may be left over once idle.
    let pipes = || {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("pipe:"))
            })
            .count()
    };
    each_backend(executor, |exec, _| {
        let _ = run(exec, Check::argv(["/bin/true"]));
        assert!(exec.wait_idle(Duration::from_secs(60)));
        let idle_pipes = pipes();
        for _ in 0..50 {
            let r = run(exec, sh("echo ok"));
            assert!(
                !r.output_cut,
                "output waited for the drain bound: {}",
                r.reason
            );
            assert_eq!(r.stdout.text(), "ok\n");
        }
        let pending: Vec<_> = (0..50)
            .map(|_| exec.submit(sh("echo ok")).unwrap())
            .collect();
        for p in pending {
            let r = p.wait();
            assert!(
                !r.output_cut,
                "output waited for the drain bound: {}",
                r.reason
            );
        }
        assert_settles(exec, "pipe fds", pipes, idle_pipes);
    });
}

#[test]
fn dropping_an_executor_mid_burst_answers_kills_and_reaps_everything() {
    // Invariant 9 with children still being created (many before they
    // exec): once by `shutdown`, once by dropping the executor.
    let _guard = serial();
    for backend in BACKENDS {
        for by_drop in [false, true] {
            let before = fd_count();
            let exec = pidring::Executor::builder()
                .backend(backend)
                .max_running(100)
                .build()
                .unwrap();
            let (tx, rx) = crossbeam_channel::unbounded();
            for _ in 0..200 {
                let tx = tx.clone();
                exec.submit_with(sh("sleep 300 & sleep 300"), move |r| {
                    let _ = tx.send(r);
                })
                .unwrap();
            }
            drop(tx);
            assert!(eventually(Duration::from_secs(10), || exec.running() > 0));
            if by_drop {
                drop(exec);
            } else {
                exec.shutdown();
                drop(exec);
            }
            let results: Vec<_> = rx.iter().collect();
            assert_eq!(results.len(), 200, "every accepted check answered");
            let mut pgids = HashSet::new();
            for r in &results {
                assert_eq!(r.outcome, Outcome::Shutdown, "{backend} drop={by_drop}");
                pgids.extend(r.pid);
            }
            assert!(
                eventually(Duration::from_secs(10), || live_in_groups(&pgids)
                    .is_empty()),
                "check processes survived: {:?}",
                live_in_groups(&pgids)
            );
            assert_clean(before);
        }
    }
}

#[test]
fn shutdown_from_a_result_callback_does_not_deadlock() {
    let _guard = serial();
    for backend in BACKENDS {
        let exec = std::sync::Arc::new(executor(backend));
        let (tx, rx) = crossbeam_channel::unbounded();
        let weak = std::sync::Arc::downgrade(&exec);
        exec.submit_with(Check::argv(["/bin/true"]), move |r| {
            if let Some(e) = weak.upgrade() {
                e.shutdown();
            }
            let _ = tx.send(r);
        })
        .unwrap();
        let r = rx.recv_timeout(Duration::from_secs(30)).expect("result");
        assert_eq!(r.state, State::Ok);
        drop(exec);
    }
}

/// Invariant 4: the descriptor table is grown once, when the executor
/// starts, to what `max_running` checks need. Growing it later, while
/// threads and children share it, would block the loop in `pipe2` or
/// `clone` for an RCU grace period (`expand_fdtable` → `synchronize_rcu`).
#[test]
fn the_descriptor_table_is_sized_before_the_first_check() {
    let _guard = serial();
    let fd_size = || {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:")?.trim().parse::<u64>().ok())
            .expect("FDSize in /proc/self/status")
    };
    let max_running = 5_000;
    let exec = Executor::builder()
        .max_running(max_running)
        .build()
        .expect("executor");
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    let want = (3 * max_running as u64 + 1024).min(lim.rlim_cur);
    // Sized on the loop thread before it answers its first check.
    assert_eq!(run(&exec, Check::argv(["/bin/true"])).state, State::Ok);
    assert!(fd_size() >= want, "FDSize {} < {want}", fd_size());
}

/// How many times the executor's loop thread has gone to sleep (it is the
/// only thread named `pidring-loop` while one executor exists).
fn loop_sleeps() -> u64 {
    let status = std::fs::read_to_string(loop_task().join("status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("voluntary_ctxt_switches")
}

/// `/proc/self/task/TID` of the executor's loop thread (the only thread
/// named `pidring-loop` while one executor exists).
fn loop_task() -> std::path::PathBuf {
    let found: Vec<_> = std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| Some(t.ok()?.path()))
        .filter(|dir| {
            std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == "pidring-loop")
        })
        .collect();
    assert_eq!(found.len(), 1, "expected one loop thread: {found:?}");
    found.into_iter().next().unwrap()
}

#[test]
fn the_loop_does_not_wake_for_deadlines_of_checks_that_are_gone() {
    // Every check that ends before its timeout leaves its deadline in the
    // timer heap; the loop must not wake for them (under churn that is a
    // wake-up per finished check).
    each_backend(executor, |exec, _| {
        let timeout = Duration::from_millis(400);
        let pending: Vec<_> = (0..20)
            .map(|_| {
                exec.submit(Check::argv(["/bin/true"]).timeout(timeout))
                    .expect("accepted")
            })
            .collect();
        for p in pending {
            assert_eq!(p.wait().outcome, Outcome::Exited { code: 0 });
        }
        assert!(exec.wait_idle(Duration::from_secs(60)));
        let before = loop_sleeps();
        // Watching for something that must not happen: past every deadline.
        std::thread::sleep(timeout + Duration::from_millis(600));
        assert_eq!(
            loop_sleeps(),
            before,
            "the idle loop woke up (for the stale deadlines?)"
        );
    });
}

/// The scheduling policy of the executor's loop thread (field 41 of its stat).
fn loop_policy() -> Option<u32> {
    let stat = std::fs::read_to_string(loop_task().join("stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    // Field 3 (state) is the first after the comm; the policy is field 41.
    after_comm.split(' ').nth(41 - 3)?.parse().ok()
}

/// Submit `blockers` sleepers timing out 10 ms apart, call `meanwhile`,
/// then `printers` checks printing fields `fields` of their own
/// `/proc/self/stat`; wait for all, and return what the printers printed.
fn under_a_stream_of_deadlines(
    exec: &Executor,
    blockers: u64,
    printers: usize,
    fields: &str,
    meanwhile: impl FnOnce(),
) -> Vec<String> {
    let blockers: Vec<_> = (1..=blockers)
        .map(|i| {
            exec.submit(Check::argv(["/bin/sleep", "30"]).timeout(Duration::from_millis(10 * i)))
                .expect("accepted")
        })
        .collect();
    meanwhile();
    let cut = ["/usr/bin/cut", "-d", " ", "-f", fields, "/proc/self/stat"];
    let printers: Vec<_> = (0..printers)
        .map(|_| exec.submit(Check::argv(cut)).expect("accepted"))
        .collect();
    let printed = printers
        .into_iter()
        .map(|p| {
            let r = p.wait();
            assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{}", r.reason);
            String::from_utf8_lossy(&r.stdout.data).trim().to_string()
        })
        .collect();
    for b in blockers {
        assert!(matches!(b.wait().outcome, Outcome::TimedOut { .. }));
    }
    printed
}

#[test]
fn checks_created_while_the_loop_is_realtime_are_ordinary_processes() {
    // With `realtime_kills` the loop is SCHED_FIFO while a deadline is near;
    // a check it creates then must not inherit that (a busy plugin at a
    // realtime priority would starve the machine).
    each_backend(
        |backend| {
            Executor::builder()
                .backend(backend)
                .realtime_kills(true)
                .build()
                .expect("executor")
        },
        |exec, _| {
            let mut raised = false;
            let printed = under_a_stream_of_deadlines(exec, 150, 20, "41", || {
                // Deadlines every 10 ms for 1.5 s: the loop stays realtime throughout.
                raised = eventually(Duration::from_secs(1), || {
                    loop_policy() == Some(libc::SCHED_FIFO as u32)
                });
            });
            for p in printed {
                assert_eq!(
                    p,
                    libc::SCHED_OTHER.to_string(),
                    "a check inherited the loop's realtime policy"
                );
            }
            if !raised {
                eprintln!(
                    "the loop never became realtime here (no CAP_SYS_NICE?): only ordinary checks tested"
                );
            }
            // No deadline pending: ordinary again.
            assert!(eventually(Duration::from_secs(10), || loop_policy()
                == Some(libc::SCHED_OTHER as u32)));
        },
    );
}

/// The scheduler slice of thread `tid` in ns (`sched_getattr`'s
/// `sched_runtime` for an ordinary thread), or `None` if the call failed.
fn sched_slice(tid: i32) -> Option<u64> {
    // `struct sched_attr`, SCHED_ATTR_SIZE_VER0 (48 bytes): runtime at offset 24.
    let mut attr = [0u64; 6];
    // SAFETY: sched_getattr writes at most 48 bytes into the buffer we own.
    let rc = unsafe { libc::syscall(libc::SYS_sched_getattr, tid, attr.as_mut_ptr(), 48u32, 0u32) };
    (rc == 0).then_some(attr[3])
}

/// Whether this kernel has EEVDF custom slices (Linux 6.12).
fn kernel_has_custom_slices() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 12)
}

#[test]
fn the_loop_asks_for_a_short_slice_and_its_checks_do_not_inherit_it() {
    // The loop asks for a 100 µs slice (priority.rs: it is picked sooner
    // when it wakes or a kworker preempted it); a check it creates must
    // start with the default slice, as it would under any other parent.
    if !kernel_has_custom_slices() {
        eprintln!(
            "SKIPPED the_loop_asks_for_a_short_slice_and_its_checks_do_not_inherit_it: \
             kernel before 6.12, no custom scheduler slices"
        );
        return;
    }
    let default = sched_slice(0).expect("sched_getattr on the test thread");
    each_backend(executor, |exec, backend| {
        let tid: i32 = loop_task()
            .file_name()
            .and_then(|t| t.to_str()?.parse().ok())
            .expect("loop tid");
        assert_eq!(
            sched_slice(tid),
            Some(100_000),
            "{backend:?}: the loop's slice"
        );
        let m = escape::marker();
        let sleeper = exec
            .submit(
                Check::argv(["/bin/sleep", "30"])
                    .env(escape::MARK, &m)
                    .timeout(Duration::from_secs(3)),
            )
            .expect("accepted");
        let mut found = Vec::new();
        assert!(
            eventually(Duration::from_secs(3), || {
                found = escape::alive_with(&m);
                !found.is_empty()
            }),
            "{backend:?}: the sleeper never showed up"
        );
        let pid = found[0];
        assert_eq!(
            sched_slice(pid),
            Some(default),
            "{backend:?}: a check inherited the loop's slice"
        );
        assert!(matches!(sleeper.wait().outcome, Outcome::TimedOut { .. }));
    });
}

#[test]
fn checks_keep_the_nice_value_the_executor_was_given() {
    // An executor run at nice 10 (or SCHED_BATCH/IDLE) must not let its
    // checks escape it: a realtime loop's children start at nice 0, so the
    // loop stays ordinary there, and its checks at nice 10.
    let _guard = serial();
    std::thread::spawn(|| {
        // SAFETY: setpriority on this thread only (Linux: per thread); the
        // loop thread, created from it, inherits it.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
        assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 10) }, 0);
        let exec = Executor::builder()
            .realtime_kills(true)
            .build()
            .expect("executor");
        // Deadlines every 10 ms: the loop would be realtime throughout.
        for p in under_a_stream_of_deadlines(&exec, 60, 10, "19,41", || {}) {
            assert_eq!(
                p,
                format!("10 {}", libc::SCHED_OTHER),
                "a check escaped the executor's nice value"
            );
        }
        assert!(!exec.metrics().realtime_kills);
    })
    .join()
    .expect("test thread");
}

#[test]
fn results_recorded_while_readers_hold_the_metrics_are_all_counted() {
    // The loop never waits for a metrics reader: it keeps what it could not
    // record and records it at a later turn. Nothing may be lost meanwhile.
    each_backend(executor, |exec, _| {
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = exec.metrics();
                    }
                });
            }
            let pending: Vec<_> = (0..300)
                .map(|_| exec.submit(Check::argv(["/bin/true"])).expect("accepted"))
                .collect();
            for p in pending {
                assert_eq!(p.wait().outcome, Outcome::Exited { code: 0 });
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        assert!(
            eventually(Duration::from_secs(10), || exec.metrics().counters.exited
                == 300),
            "counted {} of 300",
            exec.metrics().counters.exited
        );
    });
}

/// With no grace, SIGKILL follows SIGTERM at once: the reason never says
/// the plugin "ignored SIGTERM", which it had no time to do.
#[test]
fn no_grace_is_not_reported_as_an_ignored_sigterm() {
    each_backend(executor, |exec, _| {
        let r = run(
            exec,
            Check::argv(["/bin/sleep", "30"])
                .timeout(Duration::from_millis(100))
                .grace(Duration::ZERO),
        );
        assert!(r.timed_out(), "{:?}", r.outcome);
        assert!(!r.reason.contains("ignored"), "{}", r.reason);
        assert!(
            r.reason.ends_with("stopped by SIGTERM")
                || r.reason.ends_with("killed by SIGKILL (no grace)"),
            "{}",
            r.reason
        );
    });
}
