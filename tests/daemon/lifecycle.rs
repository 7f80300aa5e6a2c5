//! Start and stop: the socket, signals, shutdown.

use super::*;

on_both_backends!(
    sigterm_answers_everything_and_leaves_nothing,
    second_signal_stops_now,
    socket_mode_stale_and_live_socket,
);

fn sigterm_answers_everything_and_leaves_nothing(backend: &str) {
    let mut d = Daemon::start(
        backend,
        &["--max-running", "3", "--drain-timeout", "2s"],
        None,
    );
    let mut c = d.client();
    // Five TERM-ignoring checks: three run, two wait for a slot.
    for i in 0..5 {
        c.send(&json!({"op": "submit", "id": i, "timeout": 120,
            "argv": ["/bin/sh", "-c", "trap '' TERM; sleep 120 & sleep 120; wait"]}));
    }
    d.wait_stats("3 running", |s| {
        s["engine"]["running"] == 3 && s["engine"]["queued"] == 2
    });
    let socket = d.socket.clone();
    d.signal(libc::SIGTERM);
    // While draining, new work is refused with `shutting_down` (checked on
    // the open connection; the socket itself is already gone).
    let end = Instant::now() + PATIENCE;
    loop {
        c.send(&json!({"op": "stats", "id": "st"}));
        let r = c.recv();
        if r["daemon"]["shutting_down"] == true {
            break;
        }
        assert!(Instant::now() < end);
        std::thread::sleep(Duration::from_millis(10));
    }
    c.send(&json!({"op": "submit", "id": "late", "argv": ["/bin/true"]}));
    let r = c.recv();
    assert_eq!(r["code"], "shutting_down", "{r}");
    // Every accepted check is answered, then the connection closes.
    let rest = c.recv_all();
    let results: Vec<&Value> = rest.iter().filter(|r| r["type"] == "result").collect();
    assert_eq!(results.len(), 5, "{rest:#?}");
    let mut ids: Vec<u64> = results.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, [0, 1, 2, 3, 4]);
    let mut groups = Vec::new();
    for r in &results {
        assert_eq!(r["result"]["outcome"]["kind"], "shutdown", "{r}");
        if let Some(pid) = r["result"]["pid"].as_i64() {
            groups.push(pid as i32);
        }
    }
    assert_eq!(groups.len(), 3, "three had started");
    let st = d.wait_exit(PATIENCE);
    assert!(st.success(), "daemon exit status {st}:\n{}", d.log());
    assert!(!socket.exists(), "socket removed");
    let left = processes_in_groups(&groups);
    assert!(left.is_empty(), "processes of checks survived: {left:?}");
}

fn second_signal_stops_now(backend: &str) {
    let mut d = Daemon::start(backend, &["--drain-timeout", "10m"], None);
    let mut c = d.client();
    for i in 0..2 {
        c.send(&json!({"op": "submit", "id": i, "timeout": 600,
            "argv": ["/bin/sh", "-c", "trap '' TERM; sleep 600"]}));
    }
    d.wait_stats("2 running", |s| s["engine"]["running"] == 2);
    // SIGHUP, SIGUSR1 (a log rotation)… are ignored: the daemon carries on.
    for sig in [libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2, libc::SIGALRM] {
        d.signal(sig);
        c.send(&json!({"op": "ping", "id": "after-signal"}));
        assert_eq!(c.recv()["type"], "pong", "{sig}");
    }
    let end = Instant::now() + PATIENCE;
    while !d.log().contains("SIGUSR1 ignored") {
        assert!(Instant::now() < end, "{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    d.signal(libc::SIGTERM);
    let end = Instant::now() + PATIENCE;
    loop {
        c.send(&json!({"op": "ping", "id": "p"}));
        let _ = c.recv();
        if d.log().contains("waiting for in-flight checks") {
            break;
        }
        assert!(Instant::now() < end);
        std::thread::sleep(Duration::from_millis(10));
    }
    let start = Instant::now();
    // SIGQUIT is a stop signal like SIGINT: this one is the second.
    d.signal(libc::SIGQUIT);
    let st = d.wait_exit(PATIENCE);
    assert!(st.success(), "{st}");
    assert!(start.elapsed() < Duration::from_secs(30));
    let results: Vec<Value> = c
        .recv_all()
        .into_iter()
        .filter(|r| r["type"] == "result")
        .collect();
    assert_eq!(results.len(), 2);
    let groups: Vec<i32> = results
        .iter()
        .map(|r| r["result"]["pid"].as_i64().unwrap() as i32)
        .collect();
    assert!(processes_in_groups(&groups).is_empty());
}

fn socket_mode_stale_and_live_socket(backend: &str) {
    let mut first = Daemon::start(backend, &[], None);
    let mode = std::fs::metadata(&first.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");

    // A live socket is not stolen.
    let out = Command::new(BIN)
        .args(["daemon", "--backend", backend, "--socket"])
        .arg(&first.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already listening"), "{err}");
    first.client().good_submit("still-first");

    // A crash leaves a stale socket: the next daemon replaces it.
    first.signal(libc::SIGKILL);
    let _ = first.wait_exit(PATIENCE);
    assert!(first.socket.exists(), "SIGKILL leaves the socket behind");
    let dir = std::mem::replace(&mut first.dir, tempfile::tempdir().unwrap());
    let mut second = Daemon::spawn_on(
        Command::new(BIN),
        dir,
        first.socket.clone(),
        backend,
        &[],
        None,
    );
    second.wait_ready();
    second.client().good_submit("second");

    // A configured group mode, with a group the socket would not get anyway.
    match group_to_give_away() {
        Some((name, gid)) => {
            let config = format!("socket_mode = \"0660\"\nsocket_group = \"{name}\"\n");
            let shared = Daemon::start(backend, &[], Some(&config));
            let meta = std::fs::metadata(&shared.socket).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o660);
            assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid);
        }
        None => eprintln!(
            "\n\n!!!!! SKIPPED socket_group: this user may chown to no group but its own !!!!!\n"
        ),
    }

    // Something that is not a socket is never removed.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let out = Command::new(BIN)
        .args(["daemon", "--backend", backend, "--socket"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

/// A group (name, gid) other than this process's own that it may give a
/// file to: any group for root, else one of its supplementary groups.
fn group_to_give_away() -> Option<(String, u32)> {
    let own = rustix::process::getegid().as_raw();
    let root = rustix::process::geteuid().is_root();
    let mine: Vec<u32> = rustix::process::getgroups()
        .unwrap_or_default()
        .iter()
        .map(|g| g.as_raw())
        .collect();
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let gid: u32 = fields.nth(1)?.parse().ok()?;
        (gid != own && (root || mine.contains(&gid))).then(|| (name.to_string(), gid))
    })
}

#[test]
fn the_socket_directory_is_created_but_not_a_tree_of_them() {
    let dir = tempfile::tempdir().unwrap();
    // A mistyped path: a clear error, and nothing left behind.
    let deep = dir.path().join("no/such/pidring.sock");
    let out = Command::new(BIN)
        .args(["daemon", "--socket"])
        .arg(&deep)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot create directory"), "{err}");
    assert!(!dir.path().join("no").exists());
    // The socket's own directory (as /run/pidring) is created, private.
    let own = dir.path().join("own");
    let mut child = Command::new(BIN)
        .args(["daemon", "--socket"])
        .arg(own.join("pidring.sock"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + PATIENCE;
    while !own.join("pidring.sock").exists() {
        assert!(Instant::now() < end, "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mode = std::fs::metadata(&own).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn sigterm_stops_a_daemon_started_with_it_blocked() {
    // A parent that blocked SIGTERM before exec passes the mask on; the
    // daemon must still drain and stop on it.
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(BIN);
    // SAFETY: only sigprocmask(2) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let mut d = Daemon::start_via(cmd, "auto", &[], None);
    d.signal(libc::SIGHUP);
    d.signal(libc::SIGTERM);
    let st = d.wait_exit(PATIENCE);
    assert!(st.success(), "{st}:\n{}", d.log());
    assert!(d.log().contains("SIGHUP ignored"), "{}", d.log());
}

/// A check the daemon may not signal (EPERM: a plugin run through sudo)
/// cannot hold its shutdown forever: SIGTERM stops the daemon within a
/// bound, with a log line saying why that check was left.
#[test]
fn shutdown_does_not_wait_forever_for_a_check_it_may_not_kill() {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(BIN);
    // SAFETY: refuse_signals only calls prctl(2), which is async-signal-safe.
    unsafe { cmd.pre_exec(seccomp::refuse_signals) };
    // Without containment: with it, cgroup.kill ends the check (that the
    // cgroup kills what may not be signalled is tested in cli_run.rs).
    let args = ["--drain-timeout", "1s", "--cgroup", "off"];
    let mut d = Daemon::start_via(cmd, "auto", &args, None);
    let pidfile = d.dir.path().join("check.pid");
    let mut c = d.client();
    let script = format!("echo $$ > {}; exec sleep 300", pidfile.display());
    c.send(&json!({"op": "submit", "id": 1, "argv": ["/bin/sh", "-c", script]}));
    let end = Instant::now() + PATIENCE;
    let pid = loop {
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        {
            break pid;
        }
        assert!(Instant::now() < end, "check did not start:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    };
    let t0 = Instant::now();
    d.signal(libc::SIGTERM);
    // The client is told its check was left behind, not cut off silently.
    let r = c.recv();
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["code"], "shutting_down", "{r}");
    assert_eq!(r["id"], 1, "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("could not be killed"),
        "{r}"
    );
    let st = d.wait_exit(PATIENCE);
    let took = t0.elapsed();
    // The check outlived the daemon (nobody could kill it but us, now).
    // SAFETY: plain kill(2) of the check's pid, ours to end.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(st.success(), "daemon exit status {st}:\n{}", d.log());
    // Drain (1 s) and the wait for reaps (10 s), not the 5 s flush on top.
    assert!(took < Duration::from_secs(15), "stopped after {took:?}");
    let log = d.log();
    assert!(log.contains("not permitted to signal the check"), "{log}");
    assert!(log.contains("stopping without them"), "{log}");
}
