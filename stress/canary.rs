//! The recycled-PID canary test: a fresh PID namespace with a tiny `pid_max`
//! so PIDs come round again within moments, and canary processes that count
//! every signal they get. A correct executor never signals one.

use crate::report::CanaryReport;
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
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

/// Shrink `pid_max` inside our PID namespace (Linux ≥ 6.14 keeps it per
/// namespace); say what happened.
pub fn shrink_pid_space(pid_max: u32) -> String {
    let path = "/proc/sys/kernel/pid_max";
    let before = std::fs::read_to_string(path).unwrap_or_default();
    match std::fs::write(path, pid_max.to_string()) {
        Ok(()) => {
            let now = std::fs::read_to_string(path).unwrap_or_default();
            format!(
                "per-namespace pid_max {} (was {}): PIDs 300..{} recycle",
                now.trim(),
                before.trim(),
                now.trim()
            )
        }
        Err(e) => format!(
            "cannot set pid_max in this namespace ({e}; needs Linux >= 6.14 and root): \
             relying on PID-space pressure from the namespace's own allocations only"
        ),
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
