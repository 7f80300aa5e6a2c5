//! Invariants 1 and 3 as the kernel sees them: `pidring run` under strace.
//!
//! Other tests check outcomes (the group is gone, nothing was left behind).
//! These check the order of the loop thread's own system calls, which is
//! what the invariants are about:
//! - the leader is signalled only through its pidfd: no `kill` of a
//!   positive pid, and `kill` only of the check's own group (`-pid`);
//! - the group is swept (`kill(-pid, SIGKILL)`) *before* the reaping
//!   `waitid(P_PIDFD)`, after a timeout and after a normal exit;
//! - nothing of the check is signalled after that `waitid`.
//!
//! They run `--cgroup off`: the order of these calls is the process-group
//! path's, which stays the path on hosts without usable cgroups.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Both event backends, as `pidring run --backend` names them.
const BACKENDS: [&str; 2] = ["io_uring", "epoll"];

/// The loop thread's traced calls, in order, and the check's pid.
struct Trace {
    calls: Vec<String>,
    pid: i32,
}

/// Run `pidring run ARGS` under `strace -f -ff`, one file per thread, and
/// return the calls of the thread that reaped (the loop). `None` if strace
/// is missing (said loudly).
fn trace(name: &str, backend: &str, args: &[&str]) -> Option<Trace> {
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!(
            "\n\n!!!!! SKIPPED: strace is not installed; this test needs \
             `apt-get install strace` !!!!!\n"
        );
        return None;
    }
    let dir = std::env::temp_dir().join(format!(
        "pidring-strace-{}-{name}-{backend}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new("strace")
        .args(["-f", "-ff", "-qq", "-e", "signal=none"])
        .args(["-e", "trace=kill,pidfd_send_signal,waitid"])
        .arg("-o")
        .arg(dir.join("t"))
        .arg(env!("CARGO_BIN_EXE_pidring"))
        // The process-group path (the fallback where cgroups are unusable):
        // with containment, the cgroup's start-up self-test child is reaped
        // first, and escapees die by cgroup.kill, not pidfd_send_signal
        // (tests/cgroup.rs covers that path).
        .args(["run", "--cgroup", "off", "--backend", backend])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.code().is_some(),
        "pidring run died: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let mut found = None;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        if text.contains("waitid(P_PIDFD") {
            assert!(found.is_none(), "two threads reaped through pidfds");
            found = Some(parse(f, &text));
        }
    }
    let t = found.unwrap_or_else(|| panic!("no thread reaped through a pidfd (files {files:?})"));
    let _ = std::fs::remove_dir_all(&dir);
    Some(t)
}

fn parse(f: &Path, text: &str) -> Trace {
    let calls: Vec<String> = text.lines().map(str::to_string).collect();
    let pid = calls
        .iter()
        .filter(|l| l.starts_with("waitid(P_PIDFD") && l.ends_with("= 0"))
        .find_map(|l| {
            let rest = &l[l.find("si_pid=")? + "si_pid=".len()..];
            rest[..rest.find(|c: char| !c.is_ascii_digit())?]
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no reaping waitid in {}:\n{text}", f.display()));
    Trace { calls, pid }
}

impl Trace {
    /// Index of the `waitid` that reaped the check.
    fn reap(&self) -> usize {
        let me = format!("si_pid={},", self.pid);
        self.calls
            .iter()
            .position(|l| l.starts_with("waitid(P_PIDFD") && l.contains(&me) && l.ends_with("= 0"))
            .expect("the reaping waitid")
    }

    /// Invariant 1, and "nothing after the reap"; returns the reap's index.
    fn check_signals(&self) -> usize {
        let reap = self.reap();
        let group = format!("kill(-{}, ", self.pid);
        for (i, l) in self.calls.iter().enumerate() {
            if l.starts_with("kill(") {
                assert!(
                    l.starts_with(&group),
                    "kill of something other than the check's group: {l}\n{:#?}",
                    self.calls
                );
            }
            if i > reap {
                assert!(
                    !l.starts_with("kill(") && !l.starts_with("pidfd_send_signal("),
                    "signal after the reap: {l}\n{:#?}",
                    self.calls
                );
            }
        }
        reap
    }

    /// Invariant 3: the group's SIGKILL sweep comes before the reap.
    fn assert_swept_before_reap(&self) {
        let reap = self.check_signals();
        let sweep = format!("kill(-{}, SIGKILL)", self.pid);
        assert!(
            self.calls[..reap].iter().any(|l| l.starts_with(&sweep)),
            "no {sweep} before the reap:\n{:#?}",
            self.calls
        );
    }
}

#[test]
fn after_a_timeout_the_group_is_swept_before_the_reap_and_never_signalled_after() {
    for backend in BACKENDS {
        // The leader dies of SIGTERM; a grandchild in its group ignores it,
        // and so does a child that left the group (setsid).
        let Some(t) = trace(
            "timeout",
            backend,
            &[
                "--timeout",
                "300ms",
                "--grace",
                "10s",
                "--",
                "/bin/sh",
                "-c",
                "sh -c 'trap \"\" TERM; sleep 30' & \
                 setsid sh -c 'trap \"\" TERM; exec sleep 30' </dev/null >/dev/null 2>&1 & wait",
            ],
        ) else {
            return;
        };
        t.assert_swept_before_reap();
        let term = t
            .calls
            .iter()
            .position(|l| l.starts_with("pidfd_send_signal(") && l.contains("SIGTERM"))
            .expect("SIGTERM through the pidfd");
        assert!(term < t.reap(), "{backend}: {:#?}", t.calls);
        // The child outside the group gets its SIGKILL through its own
        // pidfd, before the reap (the leader itself never needed one).
        let kill = t
            .calls
            .iter()
            .position(|l| l.starts_with("pidfd_send_signal(") && l.contains("SIGKILL"));
        assert!(
            kill.is_some_and(|k| k < t.reap()),
            "{backend}: no SIGKILL for the escaped child before the reap: {:#?}",
            t.calls
        );
    }
}

#[test]
fn after_a_normal_exit_the_group_is_swept_before_the_reap() {
    for backend in BACKENDS {
        // The leader exits at once, leaving a member of its group behind.
        let Some(t) = trace(
            "exit",
            backend,
            &[
                "--",
                "/bin/sh",
                "-c",
                "sleep 30 & echo 'OK - left one behind'",
            ],
        ) else {
            return;
        };
        t.assert_swept_before_reap();
        assert!(
            !t.calls.iter().any(|l| l.starts_with("pidfd_send_signal(")),
            "{backend}: a check that exited by itself was signalled: {:#?}",
            t.calls
        );
    }
}
