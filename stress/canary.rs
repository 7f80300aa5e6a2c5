//! The recycled-PID canary test: a fresh PID namespace with a tiny `pid_max`
//! so PIDs come round again within moments, and canary processes that count
//! every signal they get. A correct executor never signals one.

use crate::report::CanaryReport;
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Set in the re-executed harness inside the namespace.
pub const IN_NAMESPACE_ENV: &str = "PIDRING_STRESS_IN_PIDNS";

/// Whether this process is the harness re-executed inside the namespace.
pub fn inside_namespace() -> bool {
    std::env::var_os(IN_NAMESPACE_ENV).is_some()
}

/// Re-run this very command inside a new PID namespace (and mount namespace
/// with its own /proc) through util-linux `unshare`; return its exit code.
pub fn reexec_in_namespace() -> Result<ExitCode, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let status = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child", "--"])
        .arg(&exe)
        .args(std::env::args_os().skip(1))
        .env(IN_NAMESPACE_ENV, "1")
        .status()
        .map_err(|e| {
            format!("--canaries needs util-linux `unshare` (apt-get install util-linux): {e}")
        })?;
    match status.code() {
        Some(0) => Ok(ExitCode::SUCCESS),
        Some(c) => Ok(ExitCode::from(c.clamp(1, 255) as u8)),
        None => Err(format!("the namespaced run died: {status}")),
    }
}

/// How PIDs are made to recycle in the canary namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidSpace {
    /// What was done, for the report.
    pub text: String,
    /// Whether `pid_max` is now small; if not, PID pressure must do it.
    pub shrunk: bool,
}

/// Shrink `pid_max` inside our PID namespace (Linux ≥ 6.14 keeps it per
/// namespace) unless `allowed` is false (testing the fallback); say what happened.
pub fn shrink_pid_space(pid_max: u32, allowed: bool) -> PidSpace {
    let path = "/proc/sys/kernel/pid_max";
    let before = std::fs::read_to_string(path).unwrap_or_default();
    if !allowed {
        return PidSpace {
            text: format!(
                "pid_max left at {} (--no-pid-max: testing the fallback)",
                before.trim()
            ),
            shrunk: false,
        };
    }
    if !pid_max_is_per_namespace() {
        // Before 6.14 there is one pid_max, the host's: writing it here
        // would shrink the whole machine's PID space.
        return PidSpace {
            text: format!(
                "pid_max left at {} (this kernel keeps one pid_max for the whole machine; \
                 a per-namespace one needs Linux >= 6.14)",
                before.trim()
            ),
            shrunk: false,
        };
    }
    match std::fs::write(path, pid_max.to_string()) {
        Ok(()) => {
            let now = std::fs::read_to_string(path).unwrap_or_default();
            PidSpace {
                text: format!(
                    "per-namespace pid_max {} (was {}): PIDs 300..{} recycle",
                    now.trim(),
                    before.trim(),
                    now.trim()
                ),
                shrunk: true,
            }
        }
        Err(e) => PidSpace {
            text: format!(
                "cannot set pid_max in this namespace ({e}; needs Linux >= 6.14 and root), it stays {}",
                before.trim()
            ),
            shrunk: false,
        },
    }
}

/// Whether this kernel keeps `pid_max` per PID namespace (Linux >= 6.14,
/// from `/proc/sys/kernel/osrelease`); if not, writing it changes the host's.
pub fn pid_max_is_per_namespace() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    release_at_least(&release, (6, 14))
}

/// Whether a kernel release string ("6.18.44-fc-v509") is at least `version`.
fn release_at_least(release: &str, version: (u32, u32)) -> bool {
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= version
}

/// The lowest PID the kernel hands out again after a wrap.
pub const RESERVED_PIDS: u32 = 300;

/// What a PID burner did, from its final line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BurnReport {
    /// Children created and reaped.
    pub children: u64,
    /// How long it burned.
    pub elapsed: Duration,
    /// Times a child's PID was lower than the one before: the counter wrapped.
    pub wraps: u64,
    /// Of those, how many it caused by rewinding `ns_last_pid`.
    pub rewinds: u64,
    /// Child creations that failed (PID space or memory exhausted for a moment).
    pub failures: u64,
}

impl BurnReport {
    /// Parse `burned CHILDREN MICROS WRAPS REWINDS FAILURES`.
    pub fn parse(text: &str) -> Option<BurnReport> {
        let line = text.lines().find(|l| l.starts_with("burned "))?;
        let n: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|w| w.parse().ok())
            .collect::<Option<_>>()?;
        let [children, micros, wraps, rewinds, failures] = n.as_slice() else {
            return None;
        };
        Some(BurnReport {
            children: *children,
            elapsed: Duration::from_micros(*micros),
            wraps: *wraps,
            rewinds: *rewinds,
            failures: *failures,
        })
    }

    /// Children per second.
    pub fn rate(&self) -> f64 {
        self.children as f64 / self.elapsed.as_secs_f64().max(1e-6)
    }
}

impl std::fmt::Display for BurnReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PID burner: {} children in {:.1} s ({:.0}/s), the PID counter wrapped {} times",
            self.children,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.wraps
        )?;
        if self.rewinds > 0 {
            write!(f, " ({} by rewinding ns_last_pid)", self.rewinds)?;
        }
        if self.failures > 0 {
            write!(f, ", {} failed creations", self.failures)?;
        }
        Ok(())
    }
}

/// A `pidring-plugin pid-burner`: PID-space pressure in the canary namespace
/// where `pid_max` cannot be shrunk. It is a child of ours but reaps its own
/// children; we hold a pidfd to it, so stopping it can never signal another
/// process, even if the executor's orphan scan reaped it first.
pub struct PidBurner {
    child: Child,
    pidfd: OwnedFd,
    stopped: bool,
}

impl PidBurner {
    /// Start burning PIDs; with `rewind = Some((top, low))` the burner also
    /// rewinds `ns_last_pid` to `low` whenever a child's PID reaches `top`.
    /// Call before the executor runs, so nobody else can reap it before its
    /// pidfd is open.
    pub fn start(plugin: &Path, rewind: Option<(u32, u32)>) -> Result<PidBurner, String> {
        let (top, low) = rewind.unwrap_or((0, 0));
        let child = Command::new(plugin)
            .args(["pid-burner", &top.to_string(), &low.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the PID burner ({}): {e}", plugin.display()))?;
        let pid = rustix::process::Pid::from_child(&child);
        let pidfd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(e) => {
                let mut child = child;
                // Not yet reaped by anyone but us: its PID is still its own.
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("pidfd_open of the PID burner: {e}"));
            }
        };
        Ok(PidBurner {
            child,
            pidfd,
            stopped: false,
        })
    }

    /// SIGTERM it (SIGKILL after 5 s), reap it, and return its report.
    pub fn stop(mut self) -> Result<BurnReport, String> {
        self.stopped = true;
        let exited = self.end(rustix::process::Signal::TERM, Duration::from_secs(5))
            || self.end(rustix::process::Signal::KILL, Duration::from_secs(5));
        if !exited {
            return Err("the PID burner did not exit 10 s after SIGTERM and SIGKILL".into());
        }
        let mut text = String::new();
        if let Some(out) = self.child.stdout.as_mut() {
            use std::io::Read;
            let _ = out.read_to_string(&mut text);
        }
        BurnReport::parse(&text).ok_or_else(|| format!("the PID burner did not report: {text:?}"))
    }

    /// Send `sig` through the pidfd, wait up to `bound` for the exit, reap.
    fn end(&mut self, sig: rustix::process::Signal, bound: Duration) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        use rustix::process::{WaitId, WaitIdOptions, waitid};
        // ESRCH: it has exited already, which is what we want.
        let _ = rustix::process::pidfd_send_signal(&self.pidfd, sig);
        let end = Instant::now() + bound;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let timeout = Timespec::try_from(left).unwrap_or_default();
            let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
            match poll(&mut fds, Some(&timeout)) {
                Ok(n) if n > 0 => break,
                Err(rustix::io::Errno::INTR) => continue,
                _ if left.is_zero() => return false,
                _ => {}
            }
        }
        // ECHILD: the executor's orphan scan reaped it first; either way it is gone.
        let _ = waitid(
            WaitId::PidFd(rustix::fd::AsFd::as_fd(&self.pidfd)),
            WaitIdOptions::EXITED,
        );
        true
    }
}

impl Drop for PidBurner {
    fn drop(&mut self) {
        if !self.stopped {
            self.end(rustix::process::Signal::KILL, Duration::from_secs(5));
        }
    }
}

/// One finished canary.
#[derive(Debug, Clone, Copy)]
struct Finished {
    pid: i32,
    hits: u64,
    killed_by: i32,
}

/// A `pidring-plugin canary-pool` keeping canaries alive.
pub struct CanaryPool {
    child: Child,
    seen: Arc<Mutex<Vec<Finished>>>,
    done: Arc<Mutex<bool>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl CanaryPool {
    /// Start `n` canaries, each living `min_ms..max_ms` and then replaced.
    pub fn start(plugin: &Path, n: usize, min_ms: u64, max_ms: u64) -> Result<CanaryPool, String> {
        let mut child = Command::new(plugin)
            .args([
                "canary-pool",
                &n.to_string(),
                &min_ms.to_string(),
                &max_ms.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the canary pool ({}): {e}", plugin.display()))?;
        let out = child.stdout.take().ok_or("canary pool has no stdout")?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(Mutex::new(false));
        let (seen2, done2) = (seen.clone(), done.clone());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let f: Vec<&str> = line.split_whitespace().collect();
                match f.as_slice() {
                    ["c", pid, hits, _mask, killed] => {
                        if let Ok(mut s) = seen2.lock() {
                            s.push(Finished {
                                pid: pid.parse().unwrap_or(0),
                                hits: hits.parse().unwrap_or(0),
                                killed_by: killed.parse().unwrap_or(0),
                            });
                        }
                    }
                    ["done"] => {
                        if let Ok(mut d) = done2.lock() {
                            *d = true;
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(CanaryPool {
            child,
            seen,
            done,
            reader: Some(reader),
        })
    }

    /// Stop replacing canaries, wait for the last ones (bounded), and report.
    pub fn finish(mut self, check_pids: &HashSet<i32>, pid_space: String) -> CanaryReport {
        drop(self.child.stdin.take());
        let end = Instant::now() + Duration::from_secs(10);
        while !*self.done.lock().unwrap_or_else(|e| e.into_inner()) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        // The pool may already have been reaped by the executor's subreaper scan.
        let _ = self.child.try_wait();
        if *self.done.lock().unwrap_or_else(|e| e.into_inner())
            && let Some(r) = self.reader.take()
        {
            let _ = r.join();
        }
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut report = CanaryReport {
            canaries: seen.len() as u64,
            pid_space,
            ..CanaryReport::default()
        };
        for f in seen.iter() {
            report.signals += f.hits;
            if f.killed_by != 0 {
                report.killed += 1;
            }
            if check_pids.contains(&f.pid) {
                report.on_recycled_check_pid += 1;
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invariants;

    /// `pidring-plugin` next to this test binary's directory; built if missing
    /// (`cargo test --bin pidring-stress` does not build the other binary).
    fn plugin() -> std::path::PathBuf {
        let exe = std::env::current_exe().expect("current_exe");
        let dir = exe.parent().and_then(Path::parent).expect("target dir");
        let plugin = dir.join("pidring-plugin");
        if !plugin.exists() {
            let status = Command::new(env!("CARGO"))
                .args(["build", "--bin", "pidring-plugin", "--manifest-path"])
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
                .status()
                .expect("run cargo");
            assert!(status.success(), "cargo build --bin pidring-plugin failed");
        }
        plugin
    }

    /// The PID counter of our namespace (the last PID handed out).
    fn last_pid() -> i64 {
        std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn pid_max_is_written_only_where_it_is_per_namespace() {
        assert!(release_at_least("6.18.44-fc-v509\n", (6, 14)));
        assert!(release_at_least("6.14.0", (6, 14)));
        assert!(release_at_least("7.0.1", (6, 14)));
        assert!(!release_at_least("6.13.12-200.fc41.x86_64", (6, 14)));
        assert!(!release_at_least("5.15.0-91-generic", (6, 14)));
        assert!(!release_at_least("", (6, 14)));
    }

    #[test]
    fn parses_the_burner_report() {
        let r = BurnReport::parse("burned 2000 1000000 3 2 1\n").unwrap();
        assert_eq!(r.children, 2000);
        assert_eq!(r.elapsed, Duration::from_secs(1));
        assert_eq!((r.wraps, r.rewinds, r.failures), (3, 2, 1));
        assert!((r.rate() - 2000.0).abs() < 1e-9);
        assert!(r.to_string().contains("wrapped 3 times (2 by rewinding"));
        assert_eq!(BurnReport::parse("burned 1 2 3\n"), None);
        assert_eq!(BurnReport::parse("burned 1 2 3 x 5\n"), None);
        assert_eq!(BurnReport::parse(""), None);
    }

    #[test]
    fn burner_stops_and_leaves_no_zombie() {
        let plugin = plugin();
        let _serial = invariants::serial();
        let me = std::process::id() as i32;
        let before = last_pid();
        // No rewinding here: ns_last_pid is the host's.
        let burner = PidBurner::start(&plugin, None).expect("start");
        let pid = burner.child.id() as i32;
        // Wait for the real event: the PID counter moved on by a thousand.
        let end = Instant::now() + Duration::from_secs(20);
        while last_pid() < before + 1000 && last_pid() >= before && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        let report = burner.stop().expect("stop");
        assert!(report.children > 0, "{report}");
        assert_eq!(report.failures, 0, "{report}");
        let procs = invariants::all_processes();
        assert!(
            !procs.iter().any(|p| p.pid == pid && p.ppid == me),
            "burner {pid} not reaped"
        );
        assert!(
            !procs.iter().any(|p| p.ppid == pid),
            "burner {pid} left children"
        );
        assert_eq!(invariants::zombie_children(&procs, me), Vec::<i32>::new());
    }

    #[test]
    fn dropped_burner_is_killed_and_reaped() {
        let plugin = plugin();
        let _serial = invariants::serial();
        let me = std::process::id() as i32;
        let burner = PidBurner::start(&plugin, None).expect("start");
        let pid = burner.child.id() as i32;
        drop(burner);
        let procs = invariants::all_processes();
        assert!(
            !procs.iter().any(|p| p.pid == pid && p.ppid == me),
            "burner {pid} not reaped"
        );
        assert_eq!(invariants::zombie_children(&procs, me), Vec::<i32>::new());
    }
}
