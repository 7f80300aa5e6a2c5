//! The comparison executor: a plain tokio::process one with the same timeout
//! policy (SIGTERM to the group at the deadline, SIGKILL after the grace), as
//! such executors are commonly written: numeric `kill(-pgid)`, output read to
//! EOF, and a group sweep *after* the leader was reaped — the step that can
//! hit an innocent process once PIDs recycle.
//!
//! In `naive` mode the escalation is the seed's (Icinga 2.13) pattern: the
//! SIGKILL for the group is a timer armed at SIGTERM and not disarmed when the
//! check exits inside the grace window, so it fires at a number that may
//! already belong to someone else.

use crate::behaviour::Spec;
use crate::driver::{Driver, Event, Policy};
use crate::record::{Ending, Record};
use crossbeam_channel::Sender;
use pidring::{MetricsSnapshot, Stage};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// Bytes kept per stream, like the engine's default cap.
const OUTPUT_CAP: usize = 64 * 1024;

struct Job {
    spec: Spec,
    submitted: Instant,
}

/// A tokio::process executor on its own runtime thread.
pub struct TokioDriver {
    tx: tokio::sync::mpsc::UnboundedSender<Job>,
    thread: Option<std::thread::JoinHandle<()>>,
    running: Arc<AtomicUsize>,
    outstanding: Arc<AtomicUsize>,
    queue_limit: usize,
}

impl TokioDriver {
    /// Start the runtime; `naive` selects the seed-style escalation.
    pub fn new(
        policy: Policy,
        naive: bool,
        events: Sender<Event>,
        start: Instant,
    ) -> Result<TokioDriver, String> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let running = Arc::new(AtomicUsize::new(0));
        let outstanding = Arc::new(AtomicUsize::new(0));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let (run2, out2) = (running.clone(), outstanding.clone());
        let queue_limit = policy.queue_limit;
        let thread = std::thread::Builder::new()
            .name("stress-tokio".into())
            .spawn(move || {
                rt.block_on(async move {
                    let slots = Arc::new(tokio::sync::Semaphore::new(policy.max_running));
                    let policy = Arc::new(policy);
                    let mut tasks = tokio::task::JoinSet::new();
                    while let Some(job) = rx.recv().await {
                        let (slots, policy, events) =
                            (slots.clone(), policy.clone(), events.clone());
                        let (running, outstanding) = (run2.clone(), out2.clone());
                        tasks.spawn(async move {
                            let Ok(_permit) = slots.acquire().await else {
                                return;
                            };
                            running.fetch_add(1, Ordering::Relaxed);
                            let rec = run_one(&job, &policy, naive, start).await;
                            running.fetch_sub(1, Ordering::Relaxed);
                            outstanding.fetch_sub(1, Ordering::Relaxed);
                            let _ = events.send(Event::Result(rec));
                        });
                        while tasks.try_join_next().is_some() {}
                    }
                    while tasks.join_next().await.is_some() {}
                });
            })
            .map_err(|e| e.to_string())?;
        Ok(TokioDriver {
            tx,
            thread: Some(thread),
            running,
            outstanding,
            queue_limit,
        })
    }
}

fn killpg(pgid: i32, sig: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe { libc::kill(-pgid, sig) };
}

async fn read_capped<R: tokio::io::AsyncRead + Unpin>(r: Option<R>) -> (usize, bool) {
    let Some(mut r) = r else { return (0, false) };
    let mut buf = vec![0u8; 16 * 1024];
    let mut kept = 0usize;
    let mut truncated = false;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return (kept, truncated),
            Ok(n) => {
                if kept + n > OUTPUT_CAP {
                    truncated = true;
                }
                kept = (kept + n).min(OUTPUT_CAP);
            }
        }
    }
}

async fn run_one(job: &Job, policy: &Policy, naive: bool, start: Instant) -> Record {
    let queue_wait = job.submitted.elapsed();
    let mut stages_us = [None; Stage::ALL.len()];
    let us = |d: Duration| Some(d.as_micros() as u64);
    stages_us[Stage::QueueWait.index()] = us(queue_wait);
    let spawn_start = Instant::now();
    let mut cmd = tokio::process::Command::new(&job.spec.argv[0]);
    cmd.args(&job.spec.argv[1..])
        .env(&policy.marker.0, &policy.marker.1)
        .env(crate::strict::SEQ_VAR, job.spec.seq.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(_) => {
            stages_us[Stage::Total.index()] = us(job.submitted.elapsed());
            return Record {
                seq: job.spec.seq,
                ending: Ending::SpawnFailed,
                pid: None,
                stages_us,
                received_us: start.elapsed().as_micros() as u64,
                output_cut: false,
                truncated: false,
            };
        }
    };
    let spawned = Instant::now();
    stages_us[Stage::Spawn.index()] = us(spawned - spawn_start);
    let pid = child.id().map(|p| p as i32);
    let out = tokio::spawn(read_capped(child.stdout.take()));
    let err = tokio::spawn(read_capped(child.stderr.take()));
    let deadline = spawned + policy.timeout;
    let mut timed_out = false;
    let mut escalated = false;
    let status = tokio::select! {
        s = child.wait() => s,
        _ = tokio::time::sleep_until(deadline.into()) => {
            timed_out = true;
            stages_us[Stage::KillLateness.index()] = us(deadline.elapsed());
            if let Some(p) = pid { killpg(p, libc::SIGTERM) }
            if naive {
                // The seed's escalation: a timer nobody disarms.
                if let Some(p) = pid {
                    let grace = policy.grace;
                    tokio::spawn(async move {
                        tokio::time::sleep(grace).await;
                        killpg(p, libc::SIGKILL);
                    });
                }
                let s = child.wait().await;
                escalated = Instant::now() >= deadline + policy.grace;
                s
            } else { tokio::select! {
                s = child.wait() => s,
                _ = tokio::time::sleep(policy.grace) => {
                    escalated = true;
                    if let Some(p) = pid { killpg(p, libc::SIGKILL) }
                    child.wait().await
                }
            } }
        }
    };
    let exited = Instant::now();
    if timed_out && let Some(p) = pid {
        // Sweep what is left of the group — after the reap: the stale signal.
        killpg(p, libc::SIGKILL);
    }
    // Output to EOF, bounded by the same deadline + grace.
    let bound = (deadline + policy.grace).saturating_duration_since(Instant::now());
    let mut output_cut = false;
    let mut truncated = false;
    match tokio::time::timeout(bound.max(Duration::from_millis(1)), async {
        (out.await, err.await)
    })
    .await
    {
        Ok((o, _)) => truncated = o.map(|(_, t)| t).unwrap_or(false),
        Err(_) => output_cut = true,
    }
    stages_us[Stage::Run.index()] = us(exited - spawned);
    stages_us[Stage::ExitToDelivered.index()] = us(exited.elapsed());
    stages_us[Stage::Total.index()] = us(job.submitted.elapsed());
    let ending = match status {
        Ok(s) if timed_out => {
            if escalated || s.signal() == Some(libc::SIGKILL) {
                Ending::TimedOutKill
            } else {
                Ending::TimedOutTerm
            }
        }
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => Ending::Exited(c),
            (None, Some(sig)) => Ending::Signaled(sig),
            _ => Ending::Error,
        },
        Err(_) => Ending::Error,
    };
    Record {
        seq: job.spec.seq,
        ending,
        pid,
        stages_us,
        received_us: start.elapsed().as_micros() as u64,
        output_cut,
        truncated,
    }
}

impl Driver for TokioDriver {
    fn submit(&mut self, spec: &Spec) -> Result<(), String> {
        let running = self.running.load(Ordering::Relaxed);
        let outstanding = self.outstanding.load(Ordering::Relaxed);
        if outstanding.saturating_sub(running) >= self.queue_limit {
            return Err("queue full".into());
        }
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        self.tx
            .send(Job {
                spec: spec.clone(),
                submitted: Instant::now(),
            })
            .map_err(|_| "tokio executor is gone".to_string())
    }

    fn load(&self) -> Option<(usize, usize)> {
        let running = self.running.load(Ordering::Relaxed);
        let outstanding = self.outstanding.load(Ordering::Relaxed);
        Some((running, outstanding.saturating_sub(running)))
    }

    fn executor_pid(&self) -> i32 {
        std::process::id() as i32
    }

    fn metrics(&self) -> Option<MetricsSnapshot> {
        None
    }

    fn shutdown(mut self: Box<Self>) {
        let (tx, _) = tokio::sync::mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
