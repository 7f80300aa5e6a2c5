//! End-to-end tests of `pidring daemon`: the real binary on a temporary
//! socket, driven over the socket. Every scenario runs on both backends.

#[path = "common/escape.rs"]
#[allow(dead_code)]
mod escape;
#[path = "common/seccomp.rs"]
mod seccomp;

use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pidring");
/// Upper bound for anything the tests wait on (never reached when things work).
const PATIENCE: Duration = Duration::from_secs(60);

/// A daemon process on a temporary socket.
struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Daemon {
    /// Start `pidring daemon --backend B --socket S [args]` with an optional config file.
    fn start(backend: &str, args: &[&str], config: Option<&str>) -> Daemon {
        Daemon::start_via(Command::new(BIN), backend, args, config)
    }

    /// Start the daemon as PID 1 of a fresh PID namespace whose `pid_max`
    /// is `pid_max` (Linux >= 6.14); killed with the namespace on drop.
    fn start_in_small_pid_space(backend: &str, pid_max: u32, args: &[&str]) -> Daemon {
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--kill-child", "--mount-proc", "--", "sh", "-c"])
            .arg(format!(
                "echo {pid_max} > /proc/sys/kernel/pid_max && exec \"$0\" \"$@\""
            ))
            .arg(BIN);
        Daemon::start_via(cmd, backend, args, None)
    }

    /// Start `cmd daemon …` on a socket in a fresh directory, and wait until it listens.
    fn start_via(cmd: Command, backend: &str, args: &[&str], config: Option<&str>) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("pidring.sock");
        let mut d = Daemon::spawn_on(cmd, dir, socket, backend, args, config);
        d.wait_ready();
        d
    }

    /// `cmd daemon --socket S --backend B [args]` (`cmd`: the binary, or a
    /// wrapper and its arguments ending in the binary).
    fn spawn_on(
        mut cmd: Command,
        dir: tempfile::TempDir,
        socket: PathBuf,
        backend: &str,
        args: &[&str],
        config: Option<&str>,
    ) -> Daemon {
        cmd.arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .args(["--backend", backend])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("daemon.log")).unwrap());
        if let Some(text) = config {
            let path = dir.path().join("pidring.toml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        let child = cmd.spawn().expect("start pidring daemon");
        Daemon {
            child: Some(child),
            dir,
            socket,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Ready: the socket answers a connect and the daemon has logged
    /// "pidring daemon ready". The socket listens before the executor is
    /// built (a second daemon is refused before it spawns anything), so a
    /// connect alone can come before start-up's own log lines, such as the
    /// `max_clients lowered` warning, are written.
    fn wait_ready(&mut self) {
        let end = Instant::now() + PATIENCE;
        loop {
            if self.log().contains("pidring daemon ready")
                && UnixStream::connect(&self.socket).is_ok()
            {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited with {st}:\n{}", self.log());
            }
            assert!(Instant::now() < end, "daemon not ready:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket)
    }

    /// A `stats` answer over a fresh connection.
    fn stats(&self) -> Value {
        let mut c = self.client();
        c.send(&json!({"op": "stats", "id": "s"}));
        let r = c.recv();
        assert_eq!(r["type"], "stats", "{r}");
        r
    }

    /// Poll `stats` until `pred` holds (or fail after PATIENCE with the last answer).
    fn wait_stats(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + PATIENCE;
        loop {
            let s = self.stats();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < end, "timed out waiting for {what}: {s:#}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0);
    }

    /// Wait for the daemon to exit (bounded).
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(Instant::now() < end, "daemon did not exit:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One connection to the daemon.
struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path).expect("connect to daemon");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    fn send(&mut self, v: &Value) {
        let mut line = serde_json::to_vec(v).unwrap();
        line.push(b'\n');
        self.w.write_all(&line).unwrap();
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }

    fn recv(&mut self) -> Value {
        let line = self.recv_line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad response {line:?}: {e}"))
    }

    /// The next response line as the daemon wrote it.
    fn recv_line(&mut self) -> String {
        let mut line = String::new();
        let n = self.r.read_line(&mut line).expect("read a response");
        assert!(n > 0, "daemon closed the connection");
        line
    }

    /// Read until EOF; every line parsed.
    fn recv_all(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut line = String::new();
        while self.r.read_line(&mut line).expect("read") > 0 {
            out.push(serde_json::from_str(&line).unwrap());
            line.clear();
        }
        out
    }

    /// Submit `/bin/echo fine` under `id` and expect its OK result next.
    fn good_submit(&mut self, id: &str) {
        self.send(&json!({"op": "submit", "id": id, "argv": ["/bin/echo", "fine"]}));
        let r = self.recv();
        assert_eq!(r["type"], "result", "{r}");
        assert_eq!(r["id"], id);
        assert_eq!(r["result"]["state"], "OK");
        assert_eq!(r["result"]["stdout"]["data"], "fine\n");
    }
}

/// (state, ppid, session id) from /proc/<pid>/stat.
fn proc_stat(pid: i32) -> Option<(char, i32, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f[0].chars().next()?, f[1].parse().ok()?, f[3].parse().ok()?))
}

/// Children of `pid` (all threads).
fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out
}

/// Processes whose session id is one of `sids` (a check's leader is its session leader).
fn processes_in_sessions(sids: &[i32]) -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some((_, _, sid)) = proc_stat(pid)
            && sids.contains(&sid)
        {
            out.push((pid, sid));
        }
    }
    out
}

fn zombie_children(pid: i32) -> Vec<i32> {
    children_of(pid)
        .into_iter()
        .filter(|c| matches!(proc_stat(*c), Some(('Z', ..))))
        .collect()
}

fn counter(stats: &Value, name: &str) -> u64 {
    stats["engine"]["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no engine counter {name}: {stats}"))
}

fn dcounter(stats: &Value, name: &str) -> u64 {
    stats["daemon"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no daemon counter {name}: {stats}"))
}

/// Kibibytes of `field` (`VmRSS`, `VmHWM`) in /proc/<pid>/status.
fn vm_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

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

/// Run each scenario on both backends.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod epoll { $( #[test] fn $name() { super::$name("epoll"); } )* }
        mod io_uring { $( #[test] fn $name() { super::$name("io_uring"); } )* }
    };
}

on_both_backends!(
    caps_that_cannot_be_enforced_are_refused,
    escapees_are_gone_when_the_daemon_answers,
    a_crashed_daemons_leftovers_are_killed_at_the_next_start,
    concurrent_clients_pipelining,
    bad_input_keeps_connection_usable,
    queue_full_then_recovery,
    client_disconnecting_mid_flight,
    client_that_never_reads,
    slow_reader_holds_bounded_bytes,
    the_byte_budget_bounds_all_connections_together,
    connections_past_max_clients_are_refused_with_a_reason,
    idle_connections_cannot_take_the_descriptors_checks_need,
    a_client_hanging_up_while_its_reader_waits_for_room_is_noticed,
    a_sibling_made_with_clone_parent_is_reaped,
    answers_echoing_big_ids_count_against_the_byte_budget,
    numeric_ids_are_echoed_as_written,
    escaped_grandchild_reaped_as_orphan,
    sigterm_answers_everything_and_leaves_nothing,
    second_signal_stops_now,
    stats_and_prometheus_report_counts,
    idle_metrics_connections_do_not_delay_a_scrape,
    socket_mode_stale_and_live_socket,
    client_commands_and_json_logs,
    half_closed_client_gets_every_answer,
    finished_connections_leave_no_descriptor_behind,
    pid_space_runs_out,
    idle_connections_hold_no_copy_of_big_answers,
    a_long_path_costs_no_memory_per_entry,
    stuck_changing_directory_holds_up_no_one,
    stuck_before_its_own_descriptors_holds_up_no_one,
);

fn concurrent_clients_pipelining(backend: &str) {
    const CLIENTS: usize = 3;
    const PER_CLIENT: usize = 300;
    let d = Daemon::start(backend, &["--max-running", "64"], None);
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let mut client = d.client();
            std::thread::spawn(move || {
                let mut w = client.w.try_clone().unwrap();
                // Send everything from another thread while this one reads: pipelined.
                let writer = std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    for i in 0..PER_CLIENT {
                        // Alternate string and numeric ids.
                        let id = if i.is_multiple_of(2) {
                            json!(format!("c{c}-{i}"))
                        } else {
                            json!(c * 100_000 + i)
                        };
                        let req = json!({"op": "submit", "id": id,
                            "argv": ["/bin/echo", format!("OK {c}-{i}")],
                            "tags": {"client": c, "n": i}});
                        serde_json::to_writer(&mut buf, &req).unwrap();
                        buf.push(b'\n');
                        if buf.len() > 16 * 1024 {
                            w.write_all(&buf).unwrap();
                            buf.clear();
                        }
                    }
                    w.write_all(&buf).unwrap();
                });
                let mut seen: HashMap<String, usize> = HashMap::new();
                for _ in 0..PER_CLIENT {
                    let r = client.recv();
                    assert_eq!(r["type"], "result", "{r}");
                    let i = r["tags"]["n"].as_u64().unwrap() as usize;
                    assert_eq!(r["tags"]["client"], c);
                    let want_id = if i.is_multiple_of(2) {
                        json!(format!("c{c}-{i}"))
                    } else {
                        json!(c * 100_000 + i)
                    };
                    assert_eq!(r["id"], want_id, "wrong id for {r}");
                    assert_eq!(r["result"]["state"], "OK");
                    assert_eq!(r["result"]["stdout"]["data"], format!("OK {c}-{i}\n"));
                    *seen.entry(r["id"].to_string()).or_default() += 1;
                }
                writer.join().unwrap();
                assert_eq!(seen.len(), PER_CLIENT, "every submit answered");
                assert!(seen.values().all(|n| *n == 1), "answered exactly once");
                // Nothing more comes: a ping is the next line.
                client.send(&json!({"op": "ping", "id": "end"}));
                assert_eq!(client.recv()["type"], "pong");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = d.wait_stats("all results sent", |s| {
        dcounter(s, "results_sent") == (CLIENTS * PER_CLIENT) as u64
    });
    assert_eq!(counter(&s, "completed"), (CLIENTS * PER_CLIENT) as u64);
    assert_eq!(dcounter(&s, "results_dropped"), 0);
}

fn bad_input_keeps_connection_usable(backend: &str) {
    let d = Daemon::start(backend, &[], Some("max_line_bytes = \"4k\"\n"));
    let mut c = d.client();
    let mut other = d.client();
    let expect_error = |c: &mut Client, code: &str| -> Value {
        let r = c.recv();
        assert_eq!(r["type"], "error", "{r}");
        assert_eq!(r["code"], code, "{r}");
        assert!(!r["message"].as_str().unwrap().is_empty());
        r
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("malformed", b"{nope\n".to_vec(), "bad_request"),
        ("not an object", b"[1,2,3]\n".to_vec(), "bad_request"),
        ("missing op", b"{\"id\":1}\n".to_vec(), "bad_request"),
        ("op not a string", b"{\"op\":5}\n".to_vec(), "bad_request"),
        (
            "unknown op",
            b"{\"op\":\"frobnicate\",\"id\":\"u\"}\n".to_vec(),
            "unknown_op",
        ),
        (
            "unknown field",
            b"{\"op\":\"submit\",\"id\":\"f\",\"argv\":[\"/bin/true\"],\"colour\":\"red\"}\n"
                .to_vec(),
            "bad_request",
        ),
        (
            "wrong type",
            b"{\"op\":\"submit\",\"id\":\"t\",\"argv\":\"/bin/true\"}\n".to_vec(),
            "bad_request",
        ),
        (
            "argv and command_line",
            b"{\"op\":\"submit\",\"id\":\"b\",\"argv\":[\"/bin/true\"],\"command_line\":\"/bin/true\"}\n".to_vec(),
            "bad_request",
        ),
        (
            "nothing to run",
            b"{\"op\":\"submit\",\"id\":\"n\"}\n".to_vec(),
            "bad_request",
        ),
        (
            "empty argv",
            b"{\"op\":\"submit\",\"id\":\"e\",\"argv\":[]}\n".to_vec(),
            "bad_request",
        ),
        (
            "zero timeout",
            b"{\"op\":\"submit\",\"id\":\"z\",\"argv\":[\"/bin/true\"],\"timeout\":0}\n".to_vec(),
            "bad_request",
        ),
        (
            "sub-millisecond timeout",
            b"{\"op\":\"submit\",\"id\":\"z\",\"argv\":[\"/bin/true\"],\"timeout\":1e-9}\n".to_vec(),
            "bad_request",
        ),
        (
            "bad duration",
            b"{\"op\":\"submit\",\"id\":\"z\",\"argv\":[\"/bin/true\"],\"timeout\":\"soon\"}\n"
                .to_vec(),
            "bad_request",
        ),
        (
            "submit without id",
            b"{\"op\":\"submit\",\"argv\":[\"/bin/true\"]}\n".to_vec(),
            "bad_request",
        ),
        (
            "invalid utf-8",
            b"{\"op\":\"ping\",\"id\":\"\xff\xfe\"}\n".to_vec(),
            "invalid_utf8",
        ),
        (
            "cancel of nothing",
            b"{\"op\":\"cancel\",\"id\":\"nobody\"}\n".to_vec(),
            "not_found",
        ),
    ];
    let mut by_code: HashMap<&str, u64> = HashMap::new();
    for (i, (what, line, code)) in cases.iter().enumerate() {
        c.send_raw(line);
        let r = expect_error(&mut c, code);
        if *what == "unknown op" {
            assert_eq!(r["id"], "u", "the id is echoed when readable");
        }
        if *what == "sub-millisecond timeout" {
            // Not accepted and then reported as "timed out after 0ms".
            let m = r["message"].as_str().unwrap();
            assert!(m.contains("timeout must be at least 1ms"), "{r}");
        }
        if *what == "unknown field" {
            assert!(r["message"].as_str().unwrap().contains("colour"), "{r}");
            assert_eq!(r["id"], "f");
        }
        *by_code.entry(code).or_default() += 1;
        c.good_submit(&format!("good-{i}"));
    }

    // An oversize line (arriving in pieces), then a good request on the same connection.
    let mut long = b"{\"op\":\"submit\",\"id\":\"long\",\"argv\":[\"/bin/echo\",\"".to_vec();
    long.extend(std::iter::repeat_n(b'x', 100_000));
    long.extend_from_slice(b"\"]}\n");
    for piece in long.chunks(7_000) {
        c.send_raw(piece);
    }
    expect_error(&mut c, "line_too_long");
    *by_code.entry("line_too_long").or_default() += 1;
    c.good_submit("after-long");

    // A duplicate id while the first is in flight, then cancel it.
    c.send(&json!({"op": "submit", "id": "dup", "argv": ["/bin/sleep", "30"]}));
    c.send(&json!({"op": "submit", "id": "dup", "argv": ["/bin/true"]}));
    let r = expect_error(&mut c, "duplicate_id");
    assert_eq!(r["id"], "dup");
    *by_code.entry("duplicate_id").or_default() += 1;
    c.send(&json!({"op": "cancel", "id": "dup"}));
    let r = c.recv();
    assert_eq!(r["type"], "result", "{r}");
    assert_eq!(r["id"], "dup");
    assert_eq!(r["result"]["outcome"]["kind"], "cancelled");
    // The id is free again.
    c.good_submit("dup");

    // A program that cannot start is a result (spawn_failed), not an error.
    c.send(&json!({"op": "submit", "id": "nx", "argv": ["/nonexistent/check_x"]}));
    let r = c.recv();
    assert_eq!(r["type"], "result", "{r}");
    assert_eq!(r["result"]["outcome"]["kind"], "spawn_failed");
    assert_eq!(r["result"]["state"], "UNKNOWN");
    c.good_submit("after-spawn-failure");

    // Another client never noticed any of it.
    other.send(&json!({"op": "ping", "id": 1}));
    let r = other.recv();
    assert_eq!(r["type"], "pong");
    assert_eq!(r["id"], 1);

    let s = d.stats();
    for (code, n) in by_code {
        assert_eq!(
            s["daemon"]["errors_by_code"][code].as_u64(),
            Some(n),
            "{code}: {s:#}"
        );
    }
}

fn queue_full_then_recovery(backend: &str) {
    let d = Daemon::start(backend, &["--max-running", "2", "--queue-limit", "2"], None);
    let mut c = d.client();
    for i in 0..4 {
        c.send(&json!({"op": "submit", "id": i, "argv": ["/bin/sleep", "30"]}));
    }
    let start = Instant::now();
    c.send(&json!({"op": "submit", "id": 99, "argv": ["/bin/true"]}));
    let r = c.recv();
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["code"], "queue_full");
    assert_eq!(r["id"], 99);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "queue_full must be immediate, took {:?}",
        start.elapsed()
    );
    // Load drops: cancel the sleepers, each answered once.
    for i in 0..4 {
        c.send(&json!({"op": "cancel", "id": i}));
    }
    let mut ids: Vec<u64> = (0..4)
        .map(|_| {
            let r = c.recv();
            assert_eq!(r["type"], "result", "{r}");
            assert_eq!(r["result"]["outcome"]["kind"], "cancelled");
            r["id"].as_u64().unwrap()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, [0, 1, 2, 3]);
    // Recovered.
    c.good_submit("after");
    let s = d.stats();
    assert_eq!(s["daemon"]["errors_by_code"]["queue_full"], 1);
    assert_eq!(counter(&s, "rejected"), 1);
}

fn client_disconnecting_mid_flight(backend: &str) {
    let d = Daemon::start(backend, &[], None);
    {
        let mut c = d.client();
        for i in 0..5 {
            c.send(&json!({"op": "submit", "id": i, "argv": ["/bin/sleep", "30"]}));
        }
        d.wait_stats("5 running", |s| s["engine"]["running"] == 5);
        // The connection drops here with 5 checks in flight.
    }
    let s = d.wait_stats("results dropped", |s| {
        dcounter(s, "results_dropped") == 5 && s["engine"]["running"] == 0
    });
    assert_eq!(dcounter(&s, "clients_gone_in_flight"), 1);
    assert_eq!(counter(&s, "cancelled"), 5);
    assert_eq!(counter(&s, "completed"), 5);
    // Killed and reaped: the daemon has no children left, and no zombie.
    let end = Instant::now() + PATIENCE;
    while !children_of(d.pid()).is_empty() {
        assert!(
            Instant::now() < end,
            "children left: {:?}",
            children_of(d.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Others are unaffected.
    d.client().good_submit("still-fine");
}

/// From a thread, submit 200 checks over `conn` that print ~60 KB each (a
/// socket buffer fills after a few results), never reading an answer;
/// the thread ends with how many were written before the daemon hung up.
fn submit_big_outputs(conn: &UnixStream) -> std::thread::JoinHandle<usize> {
    let mut w = conn.try_clone().unwrap();
    std::thread::spawn(move || {
        for i in 0..200 {
            let req = json!({"op": "submit", "id": i,
                "argv": ["/bin/sh", "-c", "head -c 60000 /dev/zero | tr '\\0' a"]});
            let mut line = serde_json::to_vec(&req).unwrap();
            line.push(b'\n');
            if w.write_all(&line).is_err() {
                return i; // the daemon dropped us
            }
        }
        200
    })
}

fn client_that_never_reads(backend: &str) {
    let d = Daemon::start(
        backend,
        &[],
        Some("max_client_queue = 8\nclient_write_timeout = \"1s\"\n"),
    );
    let stuck = UnixStream::connect(&d.socket).unwrap();
    let writer = submit_big_outputs(&stuck);
    let s = d.wait_stats("stuck client dropped", |s| {
        dcounter(s, "clients_dropped_stuck") == 1
    });
    // Backpressure: the daemon stopped reading long before all 200 submits.
    let accepted = dcounter(&s, "submits_accepted");
    assert!(accepted < 100, "daemon kept reading a stuck client: {s:#}");
    let log = d.log();
    assert!(log.contains("dropping client"), "{log}");
    // Everything accepted is accounted for: sent (into the socket buffer) or dropped.
    let s = d.wait_stats("accounted", |s| {
        s["engine"]["running"] == 0
            && s["engine"]["queued"] == 0
            && dcounter(s, "results_sent") + dcounter(s, "results_dropped")
                == dcounter(s, "submits_accepted")
    });
    assert!(dcounter(&s, "results_dropped") > 0);
    drop(stuck);
    let _ = writer.join();
    // The daemon is fine for everyone else.
    d.client().good_submit("other");
}

/// A daemon whose connections may hold `max_client_bytes` (requests of at
/// most 64 KiB, output caps of at most `max_output_cap`), plus `extra` config.
fn with_byte_budget(
    backend: &str,
    max_client_bytes: &str,
    max_output_cap: &str,
    extra: &str,
) -> Daemon {
    let config = format!(
        "max_client_bytes = {max_client_bytes:?}\nmax_output_cap = {max_output_cap:?}\n\
         max_line_bytes = \"64KiB\"\n{extra}"
    );
    Daemon::start(backend, &[], Some(&config))
}

fn slow_reader_holds_bounded_bytes(backend: &str) {
    // Slots alone (4096 by default) would let a client that does not read
    // hold 4096 results of two 64 KiB streams each: 512 MiB.
    let d = with_byte_budget(
        backend,
        "1MiB",
        "256KiB",
        "client_write_timeout = \"60s\"\n",
    );
    // Asking for more than max_output_cap is refused, and says why.
    let mut c = d.client();
    c.send(&json!({"op": "submit", "id": "big", "argv": ["/bin/true"], "output_cap": "100GiB"}));
    let r = c.recv();
    assert_eq!(r["code"], "bad_request", "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("max_output_cap"),
        "{r}"
    );

    let slow = UnixStream::connect(&d.socket).unwrap();
    let writer = submit_big_outputs(&slow);
    // Everything accepted has run; what is not written stays held.
    // At least what the budget holds is accepted (5 × ~195 KiB in 1 MiB).
    let s = d.wait_stats("the slow client's checks done", |s| {
        dcounter(s, "submits_accepted") >= 5
            && s["engine"]["running"] == 0
            && s["engine"]["queued"] == 0
    });
    // A few more than 5 got in while earlier results went into the
    // socket's buffer; without the budget all 200 would be.
    let accepted = dcounter(&s, "submits_accepted");
    assert!(
        (5..40).contains(&accepted),
        "{accepted} accepted from a client that reads nothing: {s:#}"
    );
    // The limit is per connection: another client is served meanwhile.
    d.client().good_submit("other");
    drop(slow);
    let _ = writer.join();
    d.wait_stats("everything accounted", |s| {
        s["engine"]["running"] == 0
            && dcounter(s, "results_sent") + dcounter(s, "results_dropped")
                == dcounter(s, "submits_accepted")
    });
}

fn the_byte_budget_bounds_all_connections_together(backend: &str) {
    // Three clients that read nothing, 4 MiB each but 1 MiB for all: 5
    // checks (~195 KiB each) in the budget, plus at most ~3 results each
    // socket's buffer takes: 6 measured, where 4 MiB each let 63 in.
    let d = with_byte_budget(
        backend,
        "4MiB",
        "256KiB",
        "max_total_bytes = \"1MiB\"\nclient_write_timeout = \"60s\"\n",
    );
    let clients: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    let writers: Vec<_> = clients.iter().map(submit_big_outputs).collect();
    d.wait_stats("the first checks accepted", |s| {
        dcounter(s, "submits_accepted") >= 5
    });
    // Watch a while: the readers wait for room instead of reading on.
    let end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        let s = d.stats();
        let accepted = dcounter(&s, "submits_accepted");
        assert!(
            accepted < 30,
            "{accepted} accepted from three clients that read nothing: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for c in &clients {
        c.shutdown(std::net::Shutdown::Both).unwrap();
    }
    for w in writers {
        let _ = w.join();
    }
    // Room comes back once they are gone.
    d.wait_stats("the budget given back", |s| s["engine"]["running"] == 0);
    d.client().good_submit("after");
}

fn a_client_hanging_up_while_its_reader_waits_for_room_is_noticed(backend: &str) {
    // Three sleeps fit in 600 KiB (~195 KiB each); the reader waits for
    // room for the fourth, so it never reads the EOF. The hangup must be
    // seen anyway, and the three cancelled, not left to their 600 s.
    let d = with_byte_budget(backend, "600KiB", "64KiB", "");
    let mut c = d.client();
    for i in 0..6 {
        c.send(&json!({"op": "submit", "id": i, "argv": ["sleep", "600"], "timeout": "600s"}));
    }
    d.wait_stats("three running, the reader waiting", |s| {
        s["engine"]["running"] == 3 && dcounter(s, "submits_accepted") == 3
    });
    drop(c);
    // Noticed by the waiting reader, or by the writer failing to answer:
    // either way the three are cancelled.
    let s = d.wait_stats("the hangup noticed and the checks cancelled", |s| {
        s["engine"]["running"] == 0 && counter(s, "cancelled") == 3
    });
    assert_eq!(dcounter(&s, "submits_accepted"), 3, "{s:#}");
    assert!(zombie_children(d.pid()).is_empty());
}

fn answers_echoing_big_ids_count_against_the_byte_budget(backend: &str) {
    // A pong echoes its 60 KB id: ~180 KiB budgeted each, so 1 MiB holds
    // five unwritten; a client that reads none must not get all 40 answered
    // into the daemon's memory.
    let d = with_byte_budget(backend, "1MiB", "64KiB", "client_write_timeout = \"60s\"\n");
    let quiet = UnixStream::connect(&d.socket).unwrap();
    let mut w = quiet.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..40 {
            let id = format!("{i}-{}", "x".repeat(60_000));
            let mut line = serde_json::to_vec(&json!({"op": "ping", "id": id})).unwrap();
            line.push(b'\n');
            if w.write_all(&line).is_err() {
                return;
            }
        }
    });
    // `requests` counts these stats requests too: subtract them.
    let mut c = d.client();
    let mut asked = 0;
    let mut pings_read = || {
        c.send(&json!({"op": "stats", "id": "s"}));
        asked += 1;
        let s = c.recv();
        dcounter(&s, "requests") - asked
    };
    let end = Instant::now() + PATIENCE;
    while pings_read() < 5 {
        assert!(Instant::now() < end, "the pings were never read");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Watch a while: the reader waits for room instead of reading on.
    let end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        let n = pings_read();
        assert!(n < 20, "{n} pings answered into memory unbudgeted");
        std::thread::sleep(Duration::from_millis(50));
    }
    quiet.shutdown(std::net::Shutdown::Both).unwrap(); // ends the blocked sender too
    drop(quiet);
    let _ = sender.join();
}

fn numeric_ids_are_echoed_as_written(backend: &str) {
    let d = Daemon::start(backend, &[], None);
    let mut c = d.client();
    // u64::MAX + 1 and + 2: distinct ids, both in flight at once.
    let ids = ["18446744073709551616", "18446744073709551617"];
    for (id, secs) in ids.iter().zip(["0.5", "0"]) {
        c.send_raw(
            format!("{{\"op\":\"submit\",\"id\":{id},\"argv\":[\"/bin/sleep\",\"{secs}\"]}}\n")
                .as_bytes(),
        );
    }
    let mut echoed = Vec::new();
    for _ in ids {
        let line = c.recv_line();
        assert!(line.starts_with("{\"type\":\"result\",\"id\":"), "{line}");
        let id = &line["{\"type\":\"result\",\"id\":".len()..];
        echoed.push(id[..id.find(',').unwrap()].to_string());
    }
    echoed.sort();
    assert_eq!(echoed, ids);
    // Tags too are echoed as written.
    let tags = r#"{"host":"a","big":18446744073709551617,"ratio":1.50,"list":[1e2,-0]}"#;
    c.send_raw(
        format!("{{\"op\":\"submit\",\"id\":\"t\",\"argv\":[\"/bin/true\"],\"tags\":{tags}}}\n")
            .as_bytes(),
    );
    let line = c.recv_line();
    assert!(
        line.starts_with(&format!(
            "{{\"type\":\"result\",\"id\":\"t\",\"tags\":{tags},"
        )),
        "{line}"
    );
    for id in ["1e2", "-0", "1.50", "123456789012345678901234567890"] {
        c.send_raw(format!("{{\"op\":\"ping\",\"id\":{id}}}\n").as_bytes());
        let line = c.recv_line();
        assert!(
            line.starts_with(&format!("{{\"type\":\"pong\",\"id\":{id},")),
            "{line}"
        );
    }
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

fn connections_past_max_clients_are_refused_with_a_reason(backend: &str) {
    let d = Daemon::start(backend, &[], Some("max_clients = 2\n"));
    let ping = |c: &mut Client| {
        c.send(&json!({"op": "ping", "id": "p"}));
        let r = c.recv();
        assert_eq!(r["type"], "pong", "{r}");
    };
    // Until the daemon has seen a closed connection end, it still counts.
    let only_one_open = |a: &mut Client| {
        let end = Instant::now() + PATIENCE;
        loop {
            a.send(&json!({"op": "stats", "id": "s"}));
            let s = a.recv();
            if dcounter(&s, "connections_open") == 1 {
                return;
            }
            assert!(Instant::now() < end, "connections never counted out: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut a = d.client();
    only_one_open(&mut a); // the readiness probe's is gone
    let mut b = d.client();
    ping(&mut b);
    // The third is told why, then closed.
    let mut c = d.client();
    let r = c.recv();
    assert_eq!(r["code"], "too_many_clients", "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("max_clients"),
        "{r}"
    );
    assert!(c.recv_all().is_empty());
    // Once one goes, a new one is served.
    drop(b);
    only_one_open(&mut a);
    ping(&mut d.client());
    a.send(&json!({"op": "stats", "id": "s"}));
    let s = a.recv();
    assert_eq!(s["daemon"]["errors_by_code"]["too_many_clients"], 1, "{s}");
}

fn escaped_grandchild_reaped_as_orphan(backend: &str) {
    let d = Daemon::start(backend, &[], None);
    let mut c = d.client();
    // The grandchild leaves the check's session and outlives the check.
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
    if let Some((state, ppid, sid)) = proc_stat(grandchild)
        && state != 'Z'
    {
        assert_eq!(ppid, d.pid(), "orphan re-parented to the daemon");
        assert_ne!(sid, check_pid, "it escaped the check's session");
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
    let mut sessions = Vec::new();
    for r in &results {
        assert_eq!(r["result"]["outcome"]["kind"], "shutdown", "{r}");
        if let Some(pid) = r["result"]["pid"].as_i64() {
            sessions.push(pid as i32);
        }
    }
    assert_eq!(sessions.len(), 3, "three had started");
    let st = d.wait_exit(PATIENCE);
    assert!(st.success(), "daemon exit status {st}:\n{}", d.log());
    assert!(!socket.exists(), "socket removed");
    let left = processes_in_sessions(&sessions);
    assert!(left.is_empty(), "processes of checks survived: {left:?}");
}

/// Connect and ping: `Ok` with the connection if served, `Err` with the
/// line the daemon sent unasked if it turned the connection away.
fn try_connection(d: &Daemon) -> Result<Client, Value> {
    let mut c = d.client();
    // The daemon may already have answered and closed: a failed write is fine.
    let _ = c.w.write_all(b"{\"op\":\"ping\",\"id\":\"p\"}\n");
    let r = c.recv();
    if r["type"] == "pong" { Ok(c) } else { Err(r) }
}

fn idle_connections_cannot_take_the_descriptors_checks_need(backend: &str) {
    // RLIMIT_NOFILE 256 cannot hold max_running = 1024 checks and
    // max_clients = 1024 connections: the daemon lowers max_clients (and
    // says so), so idle connections get `too_many_clients` rather than the
    // descriptors checks need, and `accept` never fails for want of them
    // (a client left unanswered in the backlog).
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=256:256", "--", BIN]);
    let d = Daemon::start_via(cmd, backend, &[], None);
    assert!(d.log().contains("max_clients lowered"), "{}", d.log());
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..110 {
        match try_connection(&d) {
            Ok(c) => held.push(c),
            Err(r) => {
                assert_eq!(r["code"], "too_many_clients", "{r}");
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0 && !held.is_empty(),
        "{} held, {refused} refused",
        held.len()
    );
    // One connection ends; a new client gets its place.
    drop(held.pop());
    let end = Instant::now() + PATIENCE;
    let mut c = loop {
        match try_connection(&d) {
            Ok(c) => break c,
            Err(r) => assert!(Instant::now() < end, "never served again: {r}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // With every other connection still open, checks get their descriptors.
    for i in 0..20 {
        c.send(&json!({"op": "submit", "id": i, "argv": ["/bin/sh", "-c", "sleep 0.2; echo ok"]}));
    }
    for _ in 0..20 {
        let r = c.recv();
        assert_eq!(r["type"], "result", "{r}");
        assert_eq!(r["result"]["outcome"]["kind"], "exited", "{r}");
        assert_eq!(r["result"]["stdout"]["data"], "ok\n", "{r}");
    }
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
    let sessions: Vec<i32> = results
        .iter()
        .map(|r| r["result"]["pid"].as_i64().unwrap() as i32)
        .collect();
    assert!(processes_in_sessions(&sessions).is_empty());
}

/// Whether a thread of this process may take SCHED_FIFO (as the daemon's loop will try).
fn may_be_realtime() -> bool {
    std::thread::spawn(|| {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: pid 0 is this (throwaway) thread; `param` is valid.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
    })
    .join()
    .unwrap()
}

fn stats_and_prometheus_report_counts(backend: &str) {
    let d = Daemon::start(backend, &["--metrics", "127.0.0.1:0"], None);
    let mut c = d.client();
    for i in 0..10 {
        c.send(&json!({"op": "submit", "id": i, "argv": ["/bin/echo", "OK"]}));
    }
    for i in 10..12 {
        c.send(&json!({"op": "submit", "id": i, "argv": ["/bin/sh", "-c", "echo bad; exit 2"]}));
    }
    c.send(
        &json!({"op": "submit", "id": 12, "timeout": "300ms", "grace": "200ms",
        "argv": ["/bin/sh", "-c", "trap '' TERM; sleep 30"]}),
    );
    c.send_raw(b"not json\n{\"op\":\"submit\",\"id\":1000}\n{\"op\":\"nope\"}\n");
    let mut states: HashMap<String, u32> = HashMap::new();
    let mut errors = 0;
    // Whether SIGKILL was needed depends on whether the shell had set its
    // trap before the deadline: count what the results say.
    let mut escalated = 0;
    for _ in 0..16 {
        let r = c.recv();
        match r["type"].as_str().unwrap() {
            "result" => {
                if r["result"]["outcome"]["escalated"] == true {
                    escalated += 1;
                }
                *states
                    .entry(r["result"]["state"].as_str().unwrap().to_string())
                    .or_default() += 1
            }
            "error" => errors += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(errors, 3);
    assert_eq!(states["OK"], 10);
    assert_eq!(states["CRITICAL"], 2);
    assert_eq!(states["UNKNOWN"], 1);

    let s = d.wait_stats("results counted", |s| dcounter(s, "results_sent") == 13);
    assert_eq!(counter(&s, "submitted"), 13);
    assert_eq!(counter(&s, "completed"), 13);
    assert_eq!(counter(&s, "exited"), 12);
    assert_eq!(counter(&s, "timed_out"), 1);
    assert_eq!(counter(&s, "escalated"), escalated);
    assert_eq!(s["daemon"]["errors_by_code"]["bad_request"], 2);
    assert_eq!(s["daemon"]["errors_by_code"]["unknown_op"], 1);
    assert_eq!(s["engine"]["backend"], backend);
    // On by default, where this process may take a realtime priority too.
    let realtime = may_be_realtime();
    assert_eq!(s["engine"]["realtime_kills"], realtime, "{s}");
    let total = s["engine"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["stage"] == "total")
        .unwrap();
    assert_eq!(total["count"], 13);

    // The same numbers over Prometheus.
    let addr = s["daemon"]["metrics_address"].as_str().unwrap().to_string();
    let mut http = std::net::TcpStream::connect(&addr).unwrap();
    http.set_read_timeout(Some(PATIENCE)).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    http.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    assert!(body.contains("text/plain; version=0.0.4"));
    let metric = |line: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(line).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {line} in\n{body}"))
            .parse()
            .unwrap()
    };
    assert_eq!(metric("pidring_checks_submitted_total"), 13.0);
    assert_eq!(
        metric("pidring_realtime_kills"),
        f64::from(u8::from(realtime))
    );
    assert_eq!(metric("pidring_checks_completed_total"), 13.0);
    assert_eq!(metric("pidring_checks_escalated_total"), escalated as f64);
    assert_eq!(
        metric("pidring_checks_outcome_total{outcome=\"exited\"}"),
        12.0
    );
    assert_eq!(
        metric("pidring_checks_outcome_total{outcome=\"timed_out\"}"),
        1.0
    );
    assert_eq!(
        metric("pidring_request_errors_total{code=\"bad_request\"}"),
        2.0
    );
    assert_eq!(metric("pidring_results_sent_total"), 13.0);
    assert_eq!(
        metric("pidring_stage_duration_seconds_count{stage=\"total\"}"),
        13.0
    );
    for q in ["0.5", "0.9", "0.99", "0.999"] {
        let v = metric(&format!(
            "pidring_stage_duration_seconds{{stage=\"run\",quantile=\"{q}\"}}"
        ));
        assert!(v > 0.0);
    }
    // The timed-out check ran ~0.5 s: the max run time shows it.
    assert!(metric("pidring_stage_duration_max_seconds{stage=\"run\"}") >= 0.3);
    assert!(body.contains("# TYPE pidring_stage_duration_seconds summary"));
    assert!(body.contains("# TYPE pidring_checks_submitted_total counter"));
    assert_eq!(
        metric(&format!("pidring_backend_info{{backend=\"{backend}\"}}")),
        1.0
    );
}

/// `GET path` on the metrics endpoint: the whole answer, and how long it took.
fn http_get(addr: &str, path: &str) -> (String, Duration) {
    let start = Instant::now();
    let mut http = std::net::TcpStream::connect(addr).unwrap();
    http.set_read_timeout(Some(PATIENCE)).unwrap();
    http.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .unwrap();
    let mut answer = String::new();
    http.read_to_string(&mut answer).unwrap();
    (answer, start.elapsed())
}

fn idle_metrics_connections_do_not_delay_a_scrape(backend: &str) {
    let d = Daemon::start(backend, &["--metrics", "127.0.0.1:0"], None);
    let s = d.stats();
    let addr = s["daemon"]["metrics_address"].as_str().unwrap().to_string();
    // Connections that never send a byte: each may hold its own slot for
    // the 5 s request bound, but not the scrapes behind it (served one at
    // a time, four of them delayed a scrape by 20 s, past Prometheus' 10 s).
    let idle: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let (answer, took) = http_get(&addr, "/metrics");
    assert!(answer.starts_with("HTTP/1.0 200 OK"), "{answer}");
    assert!(answer.contains("pidring_checks_submitted_total"));
    assert!(
        took < Duration::from_secs(3),
        "a scrape behind 4 idle connections took {took:?}"
    );
    // Past 16 open at once, a connection is refused at once with a 503
    // (the 16 are well within their 5 s here), not queued behind them.
    let more: Vec<_> = (4..16)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    // (Read without asking: the answer does not wait for a request.)
    let start = Instant::now();
    let mut refused = std::net::TcpStream::connect(&addr).unwrap();
    refused.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut answer = String::new();
    refused.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.0 503 Service Unavailable"),
        "{answer}"
    );
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "the refusal took {took:?}");
    // Once they hang up, their slots are free again.
    drop((idle, more));
    let end = Instant::now() + PATIENCE;
    loop {
        let (answer, _) = http_get(&addr, "/metrics");
        if answer.starts_with("HTTP/1.0 200 OK") {
            break;
        }
        assert!(Instant::now() < end, "slots never freed: {answer}");
        std::thread::sleep(Duration::from_millis(20));
    }
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

fn client_commands_and_json_logs(backend: &str) {
    let d = Daemon::start(backend, &["--log-format", "json"], None);
    let run = |args: &[&str]| {
        // `--socket` right after the subcommand: after `--` it would be argv.
        let out = Command::new(BIN)
            .arg(args[0])
            .arg("--socket")
            .arg(&d.socket)
            .args(&args[1..])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["ping"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("pong"), "{out}");

    // `submit` prints the plugin output and exits with the check's state.
    let (code, out, _) = run(&["submit", "--", "/bin/echo", "OK - fine|t=1"]);
    assert_eq!((code, out.as_str()), (Some(0), "OK - fine|t=1\n"));
    let (code, out, _) = run(&["submit", "--command-line", "/bin/sh -c 'echo WARN; exit 1'"]);
    assert_eq!((code, out.as_str()), (Some(1), "WARN\n"));
    let (code, out, _) = run(&[
        "submit",
        "--timeout",
        "200ms",
        "--grace",
        "100ms",
        "--",
        "/bin/sleep",
        "30",
    ]);
    assert_eq!(code, Some(3));
    assert!(out.contains("timed out"), "{out}");
    let (code, out, _) = run(&["submit", "--json", "--", "/bin/echo", "x"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["type"], "result");

    // `stats`: a table, or JSON.
    let (code, out, _) = run(&["stats"]);
    assert_eq!(code, Some(0));
    for word in ["stage", "p99.9", "total", "submitted", "results sent"] {
        assert!(out.contains(word), "{word} missing in\n{out}");
    }
    let (code, out, _) = run(&["stats", "--json"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["engine"]["counters"]["completed"], 4);

    // A missing daemon: a human message, exit UNKNOWN.
    let out = Command::new(BIN)
        .args(["ping", "--socket"])
        .arg(d.dir.path().join("nothing.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no such file (is `pidring daemon` running?)"),
        "{err}"
    );

    // --log-format json: every log line is a JSON object.
    let log = d.log();
    assert!(log.contains("pidring daemon ready"), "{log}");
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(v["level"].is_string());
    }
}

fn half_closed_client_gets_every_answer(backend: &str) {
    let d = Daemon::start(backend, &[], None);
    let mut c = d.client();
    for i in 0..20 {
        c.send(&json!({"op": "submit", "id": i, "argv": ["/bin/sh", "-c", "sleep 0.2; echo OK"]}));
    }
    // Done sending; keep reading.
    c.w.shutdown(std::net::Shutdown::Write).unwrap();
    let answers = c.recv_all();
    let mut ids: Vec<u64> = answers
        .iter()
        .map(|r| {
            assert_eq!(r["type"], "result", "{r}");
            assert_eq!(r["result"]["state"], "OK");
            r["id"].as_u64().unwrap()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, (0..20).collect::<Vec<_>>());
    let s = d.wait_stats("closed", |s| dcounter(s, "connections_open") == 1);
    assert_eq!(dcounter(&s, "results_dropped"), 0);
}

fn finished_connections_leave_no_descriptor_behind(backend: &str) {
    // Started without the usual readiness probe (a connection of its own):
    // ready is the log line written once the executor exists, before the
    // first accept, so the count below holds no client connection at all.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("pidring.sock");
    let d = Daemon::spawn_on(Command::new(BIN), dir, socket, backend, &[], None);
    let end = Instant::now() + PATIENCE;
    while !d.log().contains("pidring daemon ready") {
        assert!(Instant::now() < end, "daemon not ready:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .map(|e| e.count())
            .unwrap_or(0)
    };
    let before = fds();
    for i in 0..30 {
        let mut c = d.client();
        c.send(&json!({"op": "submit", "id": i, "argv": ["/bin/true"]}));
        assert_eq!(c.recv()["type"], "result");
    }
    // Each connection's socket closes once its threads are done (within the
    // daemon's prune interval), not at the next accept or never.
    let end = Instant::now() + PATIENCE;
    while fds() != before && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        fds(),
        before,
        "the daemon kept descriptors of finished connections"
    );
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

#[test]
fn checks_of_a_daemon_run_realtime_start_ordinary() {
    // `chrt -f 10 pidring daemon`: the daemon stays realtime, but a check
    // must not (a spinning plugin at the loop's own priority would keep the
    // loop from ever running to kill it).
    if !std::process::Command::new("chrt")
        .args(["-f", "1", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("skipped: cannot run realtime here");
        return;
    }
    let mut cmd = Command::new("chrt");
    cmd.args(["-f", "10", BIN]);
    let d = Daemon::start_via(cmd, "auto", &[], None);
    let mut c = d.client();
    c.send(&json!({"op": "submit", "id": 1,
        "argv": ["/usr/bin/cut", "-d", " ", "-f", "40,41", "/proc/self/stat"]}));
    let r = c.recv();
    assert_eq!(
        r["result"]["stdout"]["data"].as_str().unwrap().trim(),
        format!("0 {}", libc::SCHED_OTHER),
        "{r}"
    );
}

fn idle_connections_hold_no_copy_of_big_answers(backend: &str) {
    // A result with 1 MiB of control bytes on each stream (output_cap at the
    // default max_output_cap) is ~18 MiB of JSON: `\u0001` is 6 bytes, and
    // stdout, stderr and the plugin text are each escaped. Serialised whole
    // into the connection's write buffer, which kept its capacity while the
    // connection lived, 10 idle clients held ~180 MiB (and peaked higher),
    // counted by no budget.
    const CLIENTS: usize = 10;
    const MIB: u64 = 1024;
    let d = Daemon::start(backend, &[], None);
    let (rss0, hwm0) = (vm_kib(d.pid(), "VmRSS"), vm_kib(d.pid(), "VmHWM"));
    let script = "head -c 1048576 /dev/zero | tr '\\0' '\\1'; \
                  head -c 1048576 /dev/zero | tr '\\0' '\\1' >&2";
    let mut clients: Vec<Client> = (0..CLIENTS)
        .map(|i| {
            let mut c = d.client();
            c.send(
                &json!({"op": "submit", "id": i, "argv": ["/bin/sh", "-c", script],
                "output_cap": "1MiB"}),
            );
            c
        })
        .collect();
    // Every result arrives whole.
    for c in &mut clients {
        let line = c.recv_line();
        assert!(line.len() > 18 << 20, "{} bytes", line.len());
        let r: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(r["type"], "result");
        for stream in ["stdout", "stderr"] {
            let data = r["result"][stream]["data"].as_str().unwrap();
            assert_eq!(data.len(), 1 << 20, "{stream}");
            assert!(data.bytes().all(|b| b == 1), "{stream}");
        }
    }
    d.wait_stats("every result written", |s| {
        dcounter(s, "results_sent") == CLIENTS as u64
    });
    // The clients are idle, their connections open: nothing of their
    // answers is left, and no connection ever held a whole line (the
    // results themselves, ~3 MiB each, are what the budget counts).
    let (rss, hwm) = (vm_kib(d.pid(), "VmRSS"), vm_kib(d.pid(), "VmHWM"));
    assert!(
        rss < rss0 + 40 * MIB,
        "{CLIENTS} idle connections hold {} MiB (from {} MiB)",
        rss / MIB,
        rss0 / MIB
    );
    assert!(
        hwm < hwm0 + CLIENTS as u64 * 8 * MIB,
        "peak {} MiB (from {} MiB) for {CLIENTS} results",
        hwm / MIB,
        hwm0 / MIB
    );
    drop(clients);
}

fn a_long_path_costs_no_memory_per_entry(backend: &str) {
    // A 1 MiB request: a PATH of a million `:` and a 250-byte bare name.
    // One candidate string per PATH entry came to ~300 MB of daemon memory
    // per check (and ~4 s of failed execve calls in its child), where the
    // byte budget counted the ~1 MiB line.
    const CHECKS: usize = 4;
    const MIB: u64 = 1024;
    let d = Daemon::start(backend, &[], None);
    let hwm0 = vm_kib(d.pid(), "VmHWM");
    let mut c = d.client();
    let path = ":".repeat(1_000_000);
    for i in 0..CHECKS {
        c.send(&json!({"op": "submit", "id": i, "argv": ["n".repeat(250)],
            "env": {"PATH": path}, "timeout": "60s"}));
    }
    for _ in 0..CHECKS {
        let r = c.recv();
        assert_eq!(r["result"]["outcome"]["kind"], "spawn_failed", "{r}");
        let message = r["result"]["outcome"]["message"].as_str().unwrap();
        assert!(message.starts_with("cannot find nnn"), "{message}");
    }
    let hwm = vm_kib(d.pid(), "VmHWM");
    assert!(
        hwm < hwm0 + 64 * MIB,
        "peak {} MiB (from {} MiB) for {CHECKS} requests of 1 MiB",
        hwm / MIB,
        hwm0 / MIB
    );
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

/// A daemon whose children's `syscall` waits on this test, as a lookup on
/// a hung NFS or FUSE mount waits on a server that never answers: the
/// daemon runs under a seccomp filter that turns the call into a
/// notification (SECCOMP_RET_USER_NOTIF) to a supervisor thread here, which
/// holds it unanswered while `hold` is set (the caller stays blocked, and
/// only SIGKILL ends it) and lets it through otherwise. The daemon itself
/// never makes the call; its children make it before they exec. Dropping
/// this closes the notification fd: a call still held then fails (ENOSYS).
struct HungSyscall {
    hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The pid of each caller held.
    held: std::sync::mpsc::Receiver<u32>,
    /// Every caller held so far.
    pids: std::cell::RefCell<Vec<u32>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HungSyscall {
    /// Start the daemon under the filter, and the supervisor holding calls.
    fn start(backend: &str, syscall: libc::c_long) -> (Daemon, HungSyscall) {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        use std::os::unix::process::CommandExt;
        let mut pair = [-1; 2];
        // SAFETY: socketpair writes two new fds into `pair`.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                pair.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
        // SAFETY: both were just created and are owned by nothing else.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
        let filter = [
            bpf(0x20, 0, 0, 0), // load the syscall number
            bpf(0x15, 0, 1, syscall as u32),
            bpf(0x06, 0, 0, libc::SECCOMP_RET_USER_NOTIF),
            bpf(0x06, 0, 0, libc::SECCOMP_RET_ALLOW),
        ];
        let to_test = theirs.as_raw_fd();
        let mut cmd = Command::new(BIN);
        // SAFETY: between fork and exec the closure calls only prctl,
        // seccomp, sendmsg and close (async-signal-safe), and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                let prog = libc::sock_fprog {
                    len: filter.len() as u16,
                    filter: filter.as_ptr() as *mut _,
                };
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                let fd = libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                    &prog as *const libc::sock_fprog,
                ) as libc::c_int;
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let sent = send_fd(to_test, fd);
                libc::close(fd);
                sent
            })
        };
        // Stuck checks never finish: shutdown kills them after 1 s.
        let daemon = Daemon::start_via(cmd, backend, &["--drain-timeout", "1s"], None);
        drop(theirs);
        let listener = recv_fd(&ours);
        let hold = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, held) = std::sync::mpsc::channel();
        let thread = std::thread::spawn({
            let (hold, stop) = (hold.clone(), stop.clone());
            move || supervise(listener, &hold, &stop, tx)
        });
        let hung = HungSyscall {
            hold,
            stop,
            held,
            pids: Default::default(),
            thread: Some(thread),
        };
        (daemon, hung)
    }

    /// Hold calls from now on (`true`), or let them through.
    fn hold(&self, hold: bool) {
        self.hold.store(hold, std::sync::atomic::Ordering::SeqCst);
    }

    /// Wait until `n` more calls are held, for at most `limit`: how many were.
    fn wait_held(&self, n: usize, limit: Duration) -> usize {
        let end = Instant::now() + limit;
        let mut got = 0;
        while got < n {
            let left = end.saturating_duration_since(Instant::now());
            match self.held.recv_timeout(left) {
                Ok(pid) => self.pids.borrow_mut().push(pid),
                Err(_) => break,
            }
            got += 1;
        }
        got
    }
}

impl Drop for HungSyscall {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answer seccomp notifications on `listener` until `stop`: hold each
/// unanswered while `hold` (sending its caller's pid on `held`), else
/// let the call run.
fn supervise(
    listener: std::os::fd::OwnedFd,
    hold: &std::sync::atomic::AtomicBool,
    stop: &std::sync::atomic::AtomicBool,
    held: std::sync::mpsc::Sender<u32>,
) {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    let fd = listener.as_raw_fd();
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd passed.
        if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 || pfd.revents & libc::POLLIN == 0 {
            continue;
        }
        // SAFETY: all-zero is a valid seccomp_notif (and RECV requires it).
        let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: the kernel fills `req`, which lives across the call.
        if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut req) } != 0 {
            continue; // The caller died meanwhile.
        }
        if hold.load(Ordering::SeqCst) {
            let _ = held.send(req.pid);
            continue;
        }
        let mut resp = libc::seccomp_notif_resp {
            id: req.id,
            val: 0,
            error: 0,
            flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        };
        // SAFETY: the kernel reads `resp`, which lives across the call.
        unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp) };
    }
    // Dropping `listener` fails every call still held with ENOSYS.
}

/// Run `f` on a one-byte message with room for one descriptor
/// (SCM_RIGHTS), for `send_fd` and `recv_fd`. Allocates nothing: used
/// between fork and exec.
fn fd_message<R>(f: impl FnOnce(&mut libc::msghdr) -> R) -> R {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // 8-byte aligned, and room for CMSG_SPACE(4) (24 bytes).
    let mut space = [0u64; 4];
    // SAFETY: msghdr is a plain C struct for which all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&space) as _;
    f(&mut msg)
}

/// Send `fd` over the Unix socket `sock` (SCM_RIGHTS). Async-signal-safe:
/// called between fork and exec.
fn send_fd(sock: libc::c_int, fd: libc::c_int) -> std::io::Result<()> {
    fd_message(|msg| {
        // SAFETY: the control buffer (see `fd_message`) holds the one cmsg
        // written here; every pointer in `msg` lives across sendmsg.
        unsafe {
            msg.msg_controllen = libc::CMSG_SPACE(4) as _;
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd);
            if libc::sendmsg(sock, msg, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    })
}

/// Receive the fd `send_fd` sent.
fn recv_fd(sock: &std::os::fd::OwnedFd) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    fd_message(|msg| {
        // SAFETY: recvmsg fills the buffers `msg` points to (see
        // `fd_message`); the fd is read from the one cmsg, checked first,
        // and is a new descriptor owned by nothing else.
        unsafe {
            let n = libc::recvmsg(sock.as_raw_fd(), msg, libc::MSG_CMSG_CLOEXEC);
            assert!(
                n > 0,
                "no notification fd from the daemon: {}",
                std::io::Error::last_os_error()
            );
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            assert!(!cmsg.is_null() && (*cmsg).cmsg_type == libc::SCM_RIGHTS);
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
            std::os::fd::OwnedFd::from_raw_fd(fd)
        }
    })
}

/// One BPF instruction.
fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Checks whose children are stuck before `execve` (`syscall`, made while
/// a child sets itself up, never returns: as with a hung mount in their
/// working directory or PATH) hold up no other client's check for longer
/// than the bound after which a launch counts as stuck (1 s), however
/// many there are: more than the 256 launches in flight, more than the
/// 32 low descriptor slot pairs. A stuck check that times out says so,
/// and is killed at once; shutdown still kills and answers every one.
fn stuck_children(backend: &str, syscall: libc::c_long, cwd: bool, stuck_text: &str) {
    const N: usize = 300;
    let (mut d, hung) = HungSyscall::start(backend, syscall);
    let mut stuck = d.client();
    let dir = d.dir.path().to_str().unwrap().to_string();
    for i in 0..N {
        let mut submit = json!({"op": "submit", "id": i, "timeout": 600, "argv": ["/bin/true"]});
        if cwd {
            submit["cwd"] = json!(dir);
        }
        stuck.send(&submit);
    }
    // Until the fix, only as many got stuck as could launch at once (256,
    // or 32 before they take their own descriptor table): the others and
    // any later check waited for their 600 s timeout.
    let held = hung.wait_held(N, Duration::from_secs(20));
    hung.hold(false);
    let mut other = d.client();
    other
        .w
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let sent = Instant::now();
    other.send(&json!({"op": "submit", "id": "other", "argv": ["/bin/echo", "fine"]}));
    let mut line = String::new();
    let answered = other.r.read_line(&mut line);
    let waited = sent.elapsed();
    assert!(
        matches!(answered, Ok(n) if n > 0),
        "another client's check got no result in {waited:?} ({held} of {N} checks stuck before exec): {answered:?}"
    );
    let r: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(r["result"]["stdout"]["data"], "fine\n", "{r}");
    assert_eq!(held, N, "every stuck check was started");
    // 1 s to count a launch as stuck; the rest is a noisy machine's slack.
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");

    // A stuck check that times out says where it was stuck, and is killed
    // at once: SIGTERM would wait out the grace (it blocks every signal).
    hung.hold(true);
    let mut submit =
        json!({"op": "submit", "id": "late", "timeout": 1, "grace": 30, "argv": ["/bin/true"]});
    if cwd {
        submit["cwd"] = json!(dir);
    }
    other.send(&submit);
    assert_eq!(hung.wait_held(1, PATIENCE), 1);
    let r = other.recv();
    let reason = r["result"]["reason"].as_str().unwrap();
    assert_eq!(r["result"]["outcome"]["kind"], "timed_out", "{r}");
    assert!(
        reason.contains("before it could start its program") && reason.contains(stuck_text),
        "{reason}"
    );
    assert!(
        r["result"]["timings"]["total"].as_u64().unwrap() < 20_000_000,
        "not killed at once: {r}"
    );

    // Shutdown kills them all (SIGKILL ends the wait) and answers each.
    let pid = d.pid();
    d.signal(libc::SIGTERM);
    let results: Vec<Value> = stuck
        .recv_all()
        .into_iter()
        .filter(|r| r["type"] == "result")
        .collect();
    assert_eq!(results.len(), N);
    assert!(
        results
            .iter()
            .all(|r| r["result"]["outcome"]["kind"] == "shutdown")
    );
    let st = d.wait_exit(PATIENCE);
    assert!(st.success(), "daemon exit status {st}:\n{}", d.log());
    assert!(children_of(pid).is_empty());
    // Each was killed and reaped, before the daemon exited.
    let pids = hung.pids.borrow().clone();
    let left: Vec<u32> = pids
        .into_iter()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .collect();
    assert!(left.is_empty(), "stuck children left: {left:?}");
    drop(hung);
}

fn stuck_changing_directory_holds_up_no_one(backend: &str) {
    stuck_children(
        backend,
        libc::SYS_chdir,
        true,
        "stuck changing to its working directory",
    );
}

fn stuck_before_its_own_descriptors_holds_up_no_one(backend: &str) {
    stuck_children(
        backend,
        libc::SYS_setsid,
        false,
        "stuck setting up its session",
    );
}

// ---- Operator policy: `user`, `allowed_commands`, reload on SIGHUP ----

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
