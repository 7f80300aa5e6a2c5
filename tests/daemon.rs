//! End-to-end tests of `pidring daemon`: the real binary on a temporary
//! socket, driven over the socket. Every scenario runs on both backends.
//!
//! This file holds the harness (a daemon on a temporary socket, a client,
//! /proc readers); the scenarios are in `daemon/`, one module per concern.

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

/// (state, ppid, process group) from /proc/<pid>/stat.
fn proc_stat(pid: i32) -> Option<(char, i32, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f[0].chars().next()?, f[1].parse().ok()?, f[2].parse().ok()?))
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

/// Processes whose process group is one of `pgids` (a check's leader leads its group).
fn processes_in_groups(pgids: &[i32]) -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some((_, _, pgid)) = proc_stat(pid)
            && pgids.contains(&pgid)
        {
            out.push((pid, pgid));
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

/// Connect and ping: `Ok` with the connection if served, `Err` with the
/// line the daemon sent unasked if it turned the connection away.
fn try_connection(d: &Daemon) -> Result<Client, Value> {
    let mut c = d.client();
    // The daemon may already have answered and closed: a failed write is fine.
    let _ = c.w.write_all(b"{\"op\":\"ping\",\"id\":\"p\"}\n");
    let r = c.recv();
    if r["type"] == "pong" { Ok(c) } else { Err(r) }
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

/// Run each scenario on both backends.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod epoll { $( #[test] fn $name() { super::$name("epoll"); } )* }
        mod io_uring { $( #[test] fn $name() { super::$name("io_uring"); } )* }
    };
}

#[path = "daemon/lifecycle.rs"]
mod lifecycle;
#[path = "daemon/limits.rs"]
mod limits;
#[path = "daemon/metrics.rs"]
mod metrics;
#[path = "daemon/operator.rs"]
mod operator;
#[path = "daemon/processes.rs"]
mod processes;
#[path = "daemon/protocol.rs"]
mod protocol;
#[path = "daemon/stuck.rs"]
mod stuck;
