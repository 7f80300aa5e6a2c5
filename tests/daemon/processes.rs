//! Processes: reaping, orphans, the PID space running out, containment and caps.

use super::*;

on_both_backends!(
    caps_that_cannot_be_enforced_are_refused,
    escapees_are_gone_when_the_daemon_answers,
    a_crashed_daemons_leftovers_are_killed_at_the_next_start,
    a_sibling_made_with_clone_parent_is_reaped,
    escaped_grandchild_reaped_as_orphan,
    pid_space_runs_out,
);

/// Whether this kernel keeps `pid_max` per PID namespace (Linux >= 6.14);
/// before that, writing it in a namespace changes the host's.
fn pid_max_is_per_namespace() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 14)
}

/// The PID space runs out (clone fails with EAGAIN) while a burst is being
/// started: those checks get a result that says so, every other check runs,
/// and the daemon keeps serving.
fn pid_space_runs_out(backend: &str) {
    if !pid_max_is_per_namespace() {
        eprintln!(
            "\n\n!!!!! SKIPPED: this test needs a per-namespace pid_max (Linux >= 6.14) !!!!!\n"
        );
        return;
    }
    let may_unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !may_unshare {
        eprintln!(
            "\n\n!!!!! SKIPPED: this test needs a PID namespace of its own (run as root, as CI does) !!!!!\n"
        );
        return;
    }
    // PIDs 1..=999 on the first pass: fewer than the burst, which sleeps
    // long enough to hold its PIDs until every check has been tried.
    const BURST: usize = 1_200;
    let d = Daemon::start_in_small_pid_space(
        backend,
        1_000,
        &["--max-running", "2000", "--queue-limit", "2000"],
    );
    let mut c = d.client();
    for i in 0..BURST {
        // A small cap: all 1,200 must fit in the connection's byte budget at once.
        c.send(
            &json!({"op": "submit", "id": i, "argv": ["/bin/sleep", "8"], "timeout": 60,
            "output_cap": "4k"}),
        );
    }
    let (mut ran, mut refused) = (0, 0);
    for _ in 0..BURST {
        let r = c.recv();
        assert_eq!(r["type"], "result", "{r}");
        match r["result"]["outcome"]["kind"].as_str() {
            Some("exited") => {
                assert_eq!(r["result"]["state"], "OK", "{r}");
                ran += 1;
            }
            Some("spawn_failed") => {
                assert_eq!(r["result"]["state"], "UNKNOWN", "{r}");
                assert_eq!(r["result"]["outcome"]["errno"], libc::EAGAIN, "{r}");
                let msg = r["result"]["outcome"]["message"].as_str().unwrap_or("");
                assert!(msg.contains("process limit reached"), "{r}");
                if refused == 0 {
                    // No PID is free (the sleeps hold them for seconds): a
                    // new connection's thread cannot start either, and the
                    // client is told so rather than reset without a word.
                    let turned_away = try_connection(&d).map(|_| "served");
                    let r = turned_away.expect_err("connected with no PID free");
                    assert_eq!(r["code"], "too_many_clients", "{r}");
                    let msg = r["message"].as_str().unwrap_or("");
                    assert!(msg.contains("cannot serve another connection now"), "{r}");
                }
                refused += 1;
            }
            _ => panic!("unexpected result: {r}"),
        }
    }
    eprintln!("{ran} ran, {refused} refused with EAGAIN");
    assert!(ran > 0 && refused > 0, "{ran} ran, {refused} refused");
    // PIDs are free again: the daemon serves as before.
    c.good_submit("after");
    let s = d.stats();
    assert_eq!(counter(&s, "spawn_failed"), refused as u64, "{s:#}");
}

/// The containment a daemon reports, or `None` after a SKIP line.
fn contained_or_skip(d: &Daemon, test: &str) -> Option<()> {
    let s = d.stats();
    let c = &s["engine"]["containment"];
    let (mode, detail) = (
        c["mode"].as_str().unwrap_or("?"),
        c["detail"].as_str().unwrap_or(""),
    );
    escape::cgroup_or_skip(test, mode, detail).then_some(())
}

/// Through the daemon too: escapees of all three kinds are gone when the
/// result arrives, after a timeout and after a normal exit.
fn escapees_are_gone_when_the_daemon_answers(backend: &str) {
    use escape::*;
    let d = Daemon::start(backend, &[], None);
    if contained_or_skip(&d, "escapees_are_gone_when_the_daemon_answers").is_none() {
        return;
    }
    let mut c = d.client();
    for escape in ESCAPES {
        for then_exit in [true, false] {
            let m = marker();
            let env: serde_json::Map<String, Value> = Escape::env(&m)
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            c.send(
                &json!({"op": "submit", "id": "e", "timeout": if then_exit { 20.0 } else { 1.0 },
                "grace": 0.2, "env": env, "argv": ["/bin/sh", "-c", escape.script(then_exit)]}),
            );
            let r = c.recv();
            let left = survivors(&m);
            let what = format!("{backend} {escape:?} exit={then_exit}");
            assert_eq!(r["type"], "result", "{what}: {r}");
            assert_eq!(r["result"]["stdout"]["data"], "started\n", "{what}: {r}");
            let kind = if then_exit { "exited" } else { "timed_out" };
            assert_eq!(r["result"]["outcome"]["kind"], kind, "{what}: {r}");
            assert!(left.is_empty(), "{what}: alive after the answer: {left:?}");
            assert!(
                r["result"]["cgroup"]["escapees"].as_u64() >= Some(1),
                "{what}: {r}"
            );
        }
    }
    let s = d.stats();
    assert!(counter(&s, "cgroup_escapees") >= 6, "{s:#}");
}

/// A daemon killed with its checks' escapees alive in their leaves (the
/// leaders die with it, PR_SET_PDEATHSIG; what they started does not): the
/// next daemon on the same subtree kills them, removes the leaves, and says
/// how many it found.
fn a_crashed_daemons_leftovers_are_killed_at_the_next_start(backend: &str) {
    use escape::*;
    let Some(mount) = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .find(|p| Path::new(p).join("cgroup.subtree_control").exists())
    else {
        assert!(
            !require_cgroup(),
            "no cgroup2 mount and PIDRING_REQUIRE_CGROUP=1"
        );
        eprintln!("SKIP a_crashed_daemons_leftovers: no cgroup2 mount");
        return;
    };
    let subtree = format!(
        "{mount}/pidring-test-recovery.{}.{backend}",
        std::process::id()
    );
    let config = format!("cgroup = \"{subtree}\"\n");
    let mut d = Daemon::start(backend, &[], Some(&config));
    if contained_or_skip(&d, "a_crashed_daemons_leftovers").is_none() {
        return;
    }
    let m = marker();
    let env: serde_json::Map<String, Value> = Escape::env(&m)
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let mut c = d.client();
    for id in 0..2 {
        c.send(&json!({"op": "submit", "id": id, "timeout": 60, "env": env,
            "argv": ["/bin/sh", "-c", Escape::SetsidDoubleFork.script(false)]}));
    }
    let ready = Escape::env(&m)[1].1.clone();
    let end = Instant::now() + PATIENCE;
    while alive_with(&m).len() < 6 {
        assert!(
            Instant::now() < end,
            "checks did not start: {:?}",
            alive_with(&m)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(&ready);
    d.signal(libc::SIGKILL);
    d.wait_exit(PATIENCE);
    // The leaders die with the daemon (PR_SET_PDEATHSIG); what they
    // started lives on in the leaves.
    let escaped = alive_with(&m);
    assert!(
        !escaped.is_empty(),
        "nothing outlived the crash: the test tests nothing"
    );
    let mut d2 = Daemon::start(backend, &[], Some(&config));
    let left = survivors(&m);
    let log = d2.log();
    assert!(
        left.is_empty(),
        "alive after the next start: {left:?}\n{log}"
    );
    assert!(log.contains("a previous executor left in"), "{log}");
    d2.signal(libc::SIGTERM);
    assert!(d2.wait_exit(PATIENCE).success(), "{}", d2.log());
    assert!(!Path::new(&subtree).exists(), "{subtree} left behind");
}

/// A cap the host cannot enforce is a `bad_request` on a submit, and a
/// configured default one stops the daemon at start, with the reason.
fn caps_that_cannot_be_enforced_are_refused(backend: &str) {
    let d = Daemon::start(backend, &[], None);
    let s = d.stats();
    let has_memory = s["engine"]["containment"]["controllers"]
        .as_array()
        .is_some_and(|c| c.iter().any(|x| x == "memory"));
    if has_memory {
        eprintln!("SKIP caps_that_cannot_be_enforced: this host has the memory controller");
        return;
    }
    let mut c = d.client();
    c.send(&json!({"op": "submit", "id": 1, "argv": ["/bin/true"], "memory_max": "64MiB"}));
    let r = c.recv();
    assert_eq!(r["code"], "bad_request", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("memory.max cannot be enforced"),
        "{r}"
    );
    drop(c);
    drop(d);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("pidring.sock");
    let mut d = Daemon::spawn_on(
        Command::new(BIN),
        dir,
        socket,
        backend,
        &[],
        Some("memory_max = \"64MiB\"\n"),
    );
    let st = d.wait_exit(PATIENCE);
    assert!(!st.success(), "{}", d.log());
    assert!(
        d.log()
            .contains("default caps: memory.max cannot be enforced"),
        "{}",
        d.log()
    );
}

fn a_sibling_made_with_clone_parent_is_reaped(backend: &str) {
    if !cfg!(target_arch = "x86_64") {
        eprintln!("skipped: the plugin calls clone by its x86_64 number");
        return;
    }
    // clone(CLONE_PARENT | SIGCHLD): the new process is the daemon's child
    // (its loop thread's, which created the leader), not the plugin's; it
    // exits at once and must not stay a zombie of the daemon.
    let d = Daemon::start(backend, &[], None);
    let mut c = d.client();
    let plugin = "use POSIX (); my $r = syscall(56, 0x8000 | 17, 0, 0, 0, 0); \
                  POSIX::_exit(0) if $r == 0; print \"$r\\n\";";
    c.send(&json!({"op": "submit", "id": 1, "argv": ["perl", "-e", plugin]}));
    let r = c.recv();
    assert_eq!(r["result"]["state"], "OK", "{r}");
    let sibling: i32 = r["result"]["stdout"]["data"]
        .as_str()
        .unwrap()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{r}"));
    let end = Instant::now() + PATIENCE;
    while proc_stat(sibling).is_some_and(|(_, ppid, _)| ppid == d.pid()) {
        assert!(
            Instant::now() < end,
            "{sibling} stays a zombie of the daemon"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn escaped_grandchild_reaped_as_orphan(backend: &str) {
    let d = Daemon::start(backend, &[], None);
    let mut c = d.client();
    // The grandchild leaves the check's group and outlives the check.
    // It reports its pid only after setsid(), so the check's group sweep
    // cannot catch it before it escaped.
    let script = "f=$(mktemp); \
        setsid sh -c 'echo $$ > \"$1\"; exec sleep 2' sh \"$f\" </dev/null >/dev/null 2>&1 & \
        while [ ! -s \"$f\" ]; do sleep 0.01; done; cat \"$f\"; rm -f \"$f\"";
    c.send(&json!({"op": "submit", "id": "esc", "argv": ["/bin/sh", "-c", script]}));
    let r = c.recv();
    assert_eq!(r["type"], "result", "{r}");
    assert_eq!(r["result"]["state"], "OK", "{r}");
    let check_pid = r["result"]["pid"].as_i64().unwrap() as i32;
    let grandchild: i32 = r["result"]["stdout"]["data"]
        .as_str()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // While it lives it is re-parented to the daemon (the subreaper).
    if let Some((state, ppid, pgid)) = proc_stat(grandchild)
        && state != 'Z'
    {
        assert_eq!(ppid, d.pid(), "orphan re-parented to the daemon");
        assert_ne!(pgid, check_pid, "it escaped the check's group");
    }
    let s = d.wait_stats("orphan reaped", |s| counter(s, "orphans_reaped") >= 1);
    assert_eq!(counter(&s, "orphans_reaped"), 1, "{s:#}");
    match proc_stat(grandchild) {
        None => {}
        Some((state, ppid, _)) => assert!(
            ppid != d.pid(),
            "grandchild {grandchild} still a child of the daemon in state {state}"
        ),
    }
    assert!(zombie_children(d.pid()).is_empty());
}
