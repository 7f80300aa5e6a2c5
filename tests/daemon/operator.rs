//! Operator policy: `user`, `allowed_commands`, reload on SIGHUP.

use super::*;

impl Daemon {
    /// Wait until the log holds `needle` at least `n` times; the log then.
    fn wait_log(&self, needle: &str, n: usize) -> String {
        let end = Instant::now() + PATIENCE;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= n {
                return log;
            }
            assert!(
                Instant::now() < end,
                "no {needle:?} (x{n}) in the log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Rewrite the config file and send SIGHUP; wait for the reload's log
    /// line (`needle`, seen once more than before).
    fn reload(&self, config: &str, needle: &str) -> String {
        let before = self.log().matches(needle).count();
        std::fs::write(self.dir.path().join("pidring.toml"), config).unwrap();
        self.signal(libc::SIGHUP);
        self.wait_log(needle, before + 1)
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `Uid:`/`Gid:`/`Groups:` lines of /proc/self/status, as the check printed them.
fn status_ids(stdout: &str) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let field = |name: &str| -> Vec<u32> {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {stdout:?}"))
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    (field("Uid:"), field("Gid:"), field("Groups:"))
}

/// The groups `id -G user` lists (the user database's view), sorted.
fn groups_of(user: &str) -> Vec<u32> {
    let out = Command::new("id").args(["-G", user]).output().unwrap();
    let mut g: Vec<u32> = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    g.sort();
    g
}

#[test]
fn checks_run_as_the_configured_user_and_are_still_killed() {
    if !is_root() {
        eprintln!("skipped: needs root to run checks as nobody");
        return;
    }
    let d = Daemon::start(
        "auto",
        &[],
        Some("user = \"nobody\"\nallowed_users = [\"daemon\"]\n"),
    );
    assert!(!d.log().contains("RUNNING CHECKS AS ROOT"), "{}", d.log());
    let nobody = 65534;
    let mut c = d.client();
    let script = format!(
        "grep -E '^(Uid|Gid|Groups):' /proc/self/status; \
         if kill -0 {} 2>/dev/null; then echo SIGNALLED; else echo CANNOT-SIGNAL; fi",
        d.pid()
    );
    c.send(&json!({"op": "submit", "id": 1, "argv": ["/bin/sh", "-c", script]}));
    let r = c.recv();
    assert_eq!(r["type"], "result", "{r}");
    let out = r["result"]["stdout"]["data"].as_str().unwrap();
    let (uid, gid, mut groups) = status_ids(out);
    assert_eq!(uid, [nobody; 4], "real, effective, saved, fs uid: {out}");
    let expect_gid = Command::new("id").args(["-g", "nobody"]).output().unwrap();
    let expect_gid: u32 = String::from_utf8(expect_gid.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(gid, [expect_gid; 4], "{out}");
    groups.sort();
    assert_eq!(groups, groups_of("nobody"), "only nobody's groups: {out}");
    assert!(groups.contains(&gid[0]), "{out}");
    assert!(
        out.contains("CANNOT-SIGNAL"),
        "a check as nobody signalled the daemon: {out}"
    );

    // A submit may name a user of allowed_users, and no other.
    c.send(&json!({"op": "submit", "id": 2, "user": "daemon", "argv": ["/bin/grep", "^Uid:", "/proc/self/status"]}));
    let r = c.recv();
    let daemon_uid = Command::new("id").args(["-u", "daemon"]).output().unwrap();
    let daemon_uid = String::from_utf8(daemon_uid.stdout)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        r["result"]["stdout"]["data"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .nth(1),
        Some(daemon_uid.as_str()),
        "{r}"
    );
    c.send(&json!({"op": "submit", "id": 3, "user": "root", "argv": ["/bin/true"]}));
    let r = c.recv();
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["code"], "forbidden", "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("allowed_users"),
        "{r}"
    );

    // Timed out as nobody: still killed (TERM ignored, so KILL) and reaped.
    let marker = format!("pidring-nobody-{}", std::process::id());
    let script = format!("trap '' TERM; exec -a {marker} sleep 600");
    let start = Instant::now();
    c.send(&json!({"op": "submit", "id": 4, "argv": ["/bin/bash", "-c", script], "timeout": "300ms", "grace": "200ms"}));
    let r = c.recv();
    assert_eq!(r["result"]["outcome"]["kind"], "timed_out", "{r}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let left = Command::new("pgrep")
        .args(["-f", &marker])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "still running: {:?}",
        String::from_utf8_lossy(&left.stdout)
    );
    assert!(zombie_children(d.pid()).is_empty());
    let s = d.wait_stats("nothing running", |s| s["engine"]["running"] == 0);
    assert_eq!(counter(&s, "timed_out"), 1, "{s}");
}

#[test]
fn a_root_daemon_without_user_says_so_and_a_foreign_user_needs_root() {
    if is_root() {
        let d = Daemon::start("auto", &[], None);
        d.wait_log("RUNNING CHECKS AS ROOT", 1);
    }
    // Not root: a user other than itself is a clear start-up error.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "user = \"root\"\n").unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("daemon")
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .arg("--config")
        .arg(&config);
    if is_root() {
        use std::os::unix::process::CommandExt;
        cmd.uid(65534).gid(65534);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot run checks as \"root\""), "{err}");
    assert!(err.contains("not root"), "{err}");
}

#[test]
fn commands_outside_allowed_commands_are_forbidden_and_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let (allowed, outside) = (dir.path().join("allowed"), dir.path().join("outside"));
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let marker = dir.path().join("evil-ran");
    let write_script = |path: &Path, body: &str| {
        std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write_script(&allowed.join("check_ok"), "echo ok; echo \"$0\"");
    write_script(
        &outside.join("evil"),
        &format!("touch {}", marker.display()),
    );
    std::os::unix::fs::symlink(outside.join("evil"), allowed.join("check_link")).unwrap();
    let config = format!(
        "allowed_commands = [\"{}/check_*\"]\nsocket_mode = \"0660\"\n",
        allowed.display()
    );
    let d = Daemon::start("auto", &[], Some(&config));
    let mut c = d.client();
    let ok = allowed.join("check_ok");
    c.send(&json!({"op": "submit", "id": "ok", "argv": [ok]}));
    let r = c.recv();
    assert_eq!(r["result"]["state"], "OK", "{r}");
    // argv[0] stays as given.
    assert_eq!(
        r["result"]["stdout"]["data"],
        format!("ok\n{}\n", ok.display()),
        "{r}"
    );
    let dotdot = allowed.join("../outside/evil");
    let refused = [
        json!({"op": "submit", "id": "link", "argv": [allowed.join("check_link")]}),
        json!({"op": "submit", "id": "dotdot", "argv": [dotdot]}),
        json!({"op": "submit", "id": "outside", "argv": [outside.join("evil")]}),
        json!({"op": "submit", "id": "path", "argv": ["evil"], "env": {"PATH": outside}}),
        json!({"op": "submit", "id": "shell", "command_line": format!("{} | cat", outside.join("evil").display())}),
    ];
    for req in &refused {
        c.send(req);
        let r = c.recv();
        assert_eq!(r["type"], "error", "{r}");
        assert_eq!(r["code"], "forbidden", "{r}");
        assert_eq!(r["id"], req["id"], "{r}");
        let msg = r["message"].as_str().unwrap();
        assert!(msg.contains("allowed_commands"), "{msg}");
    }
    // The messages name the program (and where it really leads).
    c.send(&refused[0]);
    let msg = c.recv()["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("check_link") && msg.contains("outside/evil"),
        "{msg}"
    );
    // Nothing was spawned: the engine saw one check, and no marker.
    c.good_submit_allowed(&ok);
    let s = d.stats();
    assert_eq!(counter(&s, "submitted"), 2, "{s}");
    assert_eq!(s["daemon"]["errors_by_code"]["forbidden"], 6, "{s}");
    assert!(!marker.exists(), "a refused command ran");
    // No warning about an open socket: an allowlist is set.
    assert!(
        !d.log().contains("allowed_commands is empty"),
        "{}",
        d.log()
    );
}

impl Client {
    /// Submit `program` and expect an OK result.
    fn good_submit_allowed(&mut self, program: &Path) {
        self.send(&json!({"op": "submit", "id": "again", "argv": [program]}));
        let r = self.recv();
        assert_eq!(r["result"]["state"], "OK", "{r}");
    }
}

#[test]
fn an_open_socket_without_an_allowlist_is_warned_about() {
    let d = Daemon::start("auto", &[], Some("socket_mode = \"0660\"\n"));
    d.wait_log("allowed_commands is empty", 1);
}

/// A check that waits until `gate` exists, then prints "done".
fn gated(id: impl Into<Value>, gate: &Path) -> Value {
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.02; done; echo done",
        gate.display()
    );
    json!({"op": "submit", "id": id.into(), "argv": ["/bin/sh", "-c", script]})
}

#[test]
fn sighup_applies_a_new_timeout_while_checks_in_flight_finish() {
    let base = "max_running = 100\ntimeout = \"30s\"\n";
    let d = Daemon::start("auto", &[], Some(base));
    let gate = d.dir.path().join("gate");
    let mut clients: Vec<Client> = (0..5).map(|_| d.client()).collect();
    for (n, c) in clients.iter_mut().enumerate() {
        for i in 0..10 {
            c.send(&gated(n * 100 + i, &gate));
        }
    }
    d.wait_stats("50 running", |s| s["engine"]["running"] == 50);
    let log = d.reload(
        "max_running = 100\ntimeout = \"300ms\"\nsocket_mode = \"0640\"\n",
        "configuration reloaded",
    );
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("configuration reloaded"))
        .unwrap();
    assert!(line.contains("timeout 30s -> 300ms"), "{line}");
    assert!(line.contains("kept until a restart: socket_mode"), "{line}");
    // The next submit gets the new default timeout…
    let mut fresh = d.client();
    let start = Instant::now();
    fresh.send(&json!({"op": "submit", "id": "new", "argv": ["/bin/sleep", "30"]}));
    let r = fresh.recv();
    assert_eq!(r["result"]["outcome"]["kind"], "timed_out", "{r}");
    assert!(start.elapsed() < Duration::from_secs(10));
    // …while the 50 in flight keep theirs and finish normally, every
    // client still connected (and the socket where it was).
    std::fs::write(&gate, "").unwrap();
    for c in &mut clients {
        for _ in 0..10 {
            let r = c.recv();
            assert_eq!(r["type"], "result", "{r}");
            assert_eq!(r["result"]["state"], "OK", "{r}");
            assert_eq!(r["result"]["stdout"]["data"], "done\n", "{r}");
        }
        c.send(&json!({"op": "ping", "id": "p"}));
        assert_eq!(c.recv()["type"], "pong");
    }
    let s = d.stats();
    assert_eq!(counter(&s, "timed_out"), 1, "{s}");
    assert_eq!(dcounter(&s, "clients_gone_in_flight"), 0, "{s}");
}

#[test]
fn sighup_with_a_broken_file_keeps_serving_with_the_old_values() {
    let d = Daemon::start("auto", &[], Some("timeout = \"300ms\"\n"));
    let mut c = d.client();
    let log = d.reload("timeout = \"5s\"\nmax_running = [\n", "reload failed");
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("reload failed"))
        .unwrap();
    assert!(line.contains("line 2"), "the error names the line: {line}");
    let log = d.reload("timeout = \"5s\"\nmax_running = 0\n", "reload failed");
    assert!(log.contains("max_running must be at least 1"), "{log}");
    let log = d.reload(
        "timeout = \"5s\"\nuser = \"no-such-user-pidring\"\n",
        "reload failed",
    );
    assert!(log.contains("no-such-user-pidring"), "{log}");
    // Still the old timeout, on the connection opened before.
    let start = Instant::now();
    c.send(&json!({"op": "submit", "id": 1, "argv": ["/bin/sleep", "30"]}));
    let r = c.recv();
    assert_eq!(r["result"]["outcome"]["kind"], "timed_out", "{r}");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    assert!(!d.log().contains("configuration reloaded"));
}

#[test]
fn max_running_lowered_under_load_kills_nothing_and_raised_starts_at_once() {
    let d = Daemon::start("auto", &[], Some("max_running = 8\n"));
    let (first, rest) = (d.dir.path().join("first"), d.dir.path().join("rest"));
    let mut c = d.client();
    for i in 0..8 {
        c.send(&gated(i, &first));
    }
    d.wait_stats("8 running", |s| s["engine"]["running"] == 8);
    for i in 8..20 {
        c.send(&gated(i, &rest));
    }
    d.wait_stats("12 queued", |s| s["engine"]["queued"] == 12);
    let log = d.reload("max_running = 2\n", "configuration reloaded");
    assert!(log.contains("max_running 8 -> 2"), "{log}");
    // None of the 8 running is killed; once they end, only 2 start.
    let s = d.stats();
    assert_eq!(s["engine"]["running"], 8, "{s}");
    std::fs::write(&first, "").unwrap();
    for _ in 0..8 {
        let r = c.recv();
        assert_eq!(r["result"]["stdout"]["data"], "done\n", "{r}");
        assert!(r["id"].as_u64().unwrap() < 8, "{r}");
    }
    let s = d.wait_stats("2 running, 10 queued", |s| {
        s["engine"]["running"] == 2 && s["engine"]["queued"] == 10
    });
    assert_eq!(counter(&s, "cancelled") + counter(&s, "signaled"), 0, "{s}");
    // Raised: the queued ones start at once.
    d.reload("max_running = 50\n", "configuration reloaded");
    d.wait_stats("12 running", |s| s["engine"]["running"] == 12);
    std::fs::write(&rest, "").unwrap();
    for _ in 0..12 {
        let r = c.recv();
        assert_eq!(r["result"]["state"], "OK", "{r}");
    }
}

#[test]
fn sighup_turns_realtime_kills_off_and_on_again() {
    let d = Daemon::start("auto", &[], Some("realtime_kills = false\n"));
    d.wait_stats("realtime off", |s| s["engine"]["realtime_kills"] == false);
    let log = d.reload("realtime_kills = true\n", "configuration reloaded");
    assert!(log.contains("realtime_kills false -> true"), "{log}");
    let on = may_be_realtime();
    d.wait_stats("realtime as permitted", |s| {
        s["engine"]["realtime_kills"] == on
    });
    d.reload("realtime_kills = false\n", "configuration reloaded");
    d.wait_stats("realtime off again", |s| {
        s["engine"]["realtime_kills"] == false
    });
    // Still serving.
    d.client().good_submit("after");
}

#[test]
fn sighup_starts_and_stops_the_nagios_section_without_dropping_clients() {
    let d = Daemon::start("auto", &[], Some("timeout = \"10s\"\n"));
    let qh = d.dir.path().join("nagios.qh");
    let listener = std::os::unix::net::UnixListener::bind(&qh).unwrap();
    let mut client = d.client();
    let section = format!(
        "[nagios]\nqh_socket = \"{}\"\nname = \"reload\"\n",
        qh.display()
    );
    let log = d.reload(&section, "configuration reloaded");
    assert!(log.contains("[nagios] connections started"), "{log}");
    // The worker registers with the "core".
    let (mut core, _) = listener.accept().unwrap();
    core.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut req = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != 0 || req.is_empty() {
        assert_eq!(core.read(&mut b).unwrap(), 1, "worker hung up");
        req.push(b[0]);
    }
    assert!(String::from_utf8_lossy(&req).contains("name=reload"));
    core.write_all(b"OK\0").unwrap();
    // Removed again: the worker closes its connection; clients stay.
    let log = d.reload("timeout = \"10s\"\n", "configuration reloaded");
    assert!(log.contains("[nagios] connections all stopped"), "{log}");
    let mut rest = Vec::new();
    let _ = core.read_to_end(&mut rest);
    client.good_submit("still");
}
