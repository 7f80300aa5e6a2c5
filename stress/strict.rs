//! The strict orphan invariant (with cgroup containment): no process of a
//! check is alive once its result is delivered. A watcher thread scans
//! /proc for this run's marked processes while the run goes on; a process
//! whose check's result was already taken in, and that is still alive
//! after that was seen, breaks it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The environment variable that names a process's check (its submission number).
pub const SEQ_VAR: &str = "PIDRING_STRESS_SEQ";

/// How often /proc is scanned.
const EVERY: Duration = Duration::from_millis(200);

/// Delivered results, and the watcher that holds checks to them.
pub struct Strict {
    delivered: Arc<Mutex<HashSet<u64>>>,
    stop: Arc<AtomicBool>,
    scans: Arc<AtomicU64>,
    found: Arc<Mutex<Vec<(i32, u64)>>>,
    thread: Option<JoinHandle<()>>,
}

impl Strict {
    /// Start watching this run's processes (`marker` is `KEY=VALUE`).
    pub fn start(marker: String) -> Strict {
        let delivered = Arc::new(Mutex::new(HashSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let scans = Arc::new(AtomicU64::new(0));
        let found = Arc::new(Mutex::new(Vec::new()));
        let (d, s, n, f) = (
            delivered.clone(),
            stop.clone(),
            scans.clone(),
            found.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("stress-strict".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    scan(&marker, &d, &f);
                    n.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(EVERY);
                }
            })
            .ok();
        Strict {
            delivered,
            stop,
            scans,
            found,
            thread,
        }
    }

    /// Check `seq`'s result was taken in.
    pub fn delivered(&self, seq: u64) {
        self.delivered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(seq);
    }

    /// Stop watching: (scans made, (pid, seq) of processes found alive
    /// after their check's result).
    pub fn finish(mut self) -> (u64, Vec<(i32, u64)>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let found = std::mem::take(&mut *self.found.lock().unwrap_or_else(|p| p.into_inner()));
        (self.scans.load(Ordering::Relaxed), found)
    }
}

/// `KEY=` values from a process's environment: (has the run marker, its check's seq).
fn marker_and_seq(pid: i32, marker: &str) -> Option<u64> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let mut ours = false;
    let mut seq = None;
    let prefix = format!("{SEQ_VAR}=");
    for kv in env.split(|b| *b == 0) {
        if kv == marker.as_bytes() {
            ours = true;
        } else if let Some(v) = kv.strip_prefix(prefix.as_bytes()) {
            seq = std::str::from_utf8(v).ok().and_then(|v| v.parse().ok());
        }
    }
    seq.filter(|_| ours)
}

/// One scan: every live marked process whose check's result was taken in
/// before it was seen alive (the order of the reads says so).
fn scan(marker: &str, delivered: &Mutex<HashSet<u64>>, found: &Mutex<Vec<(i32, u64)>>) {
    for p in crate::invariants::all_processes() {
        if p.state == 'Z' {
            continue;
        }
        let Some(seq) = marker_and_seq(p.pid, marker) else {
            continue;
        };
        let done = delivered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&seq);
        // Alive after its result was seen: its environment (gone with
        // its memory as it exits) is read again after the look-up.
        if done && marker_and_seq(p.pid, marker) == Some(seq) {
            let mut f = found.lock().unwrap_or_else(|e| e.into_inner());
            if f.len() < 64 && !f.iter().any(|&(pid, _)| pid == p.pid) {
                f.push((p.pid, seq));
            }
        }
    }
}
