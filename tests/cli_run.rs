//! `pidring run`: the one-shot command, as a user runs it.

mod common;

use common::*;
use std::process::Command;

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
    assert!(our_zombies().is_empty());
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
