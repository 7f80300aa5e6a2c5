//! The executors the harness can drive, behind one small trait; and the
//! in-process one (the `pidring` library itself).

use crate::behaviour::Spec;
use crate::record::Record;
use crossbeam_channel::Sender;
use pidring::{BackendKind, Check, Executor, MetricsSnapshot};
use std::time::{Duration, Instant};

/// What a driver reports back to the collector.
#[derive(Debug)]
pub enum Event {
    /// A result arrived.
    Result(Record),
    /// A submission was refused after it was sent (e.g. the daemon's queue was full).
    Rejected {
        /// The harness's submission number.
        seq: u64,
        /// Why.
        reason: String,
    },
}

/// Everything a driver needs to know about the checks it runs.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Time before SIGTERM.
    pub timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Running-slot limit.
    pub max_running: usize,
    /// Queue limit.
    pub queue_limit: usize,
    /// `ExecutorBuilder::realtime_kills` for the in-process executor.
    pub realtime_kills: bool,
    /// Environment variable set on every check (name, value): it marks the
    /// check's processes and all their descendants in /proc.
    pub marker: (String, String),
}

/// An executor under test.
pub trait Driver {
    /// Submit one check. `Err` means refused at once (no result will come).
    fn submit(&mut self, spec: &Spec) -> Result<(), String>;
    /// (running, queued) now, if the executor can tell.
    fn load(&self) -> Option<(usize, usize)>;
    /// The process that runs the checks (whose zombies and fds are checked).
    fn executor_pid(&self) -> i32;
    /// The engine's own metrics, if this driver has them.
    fn metrics(&self) -> Option<MetricsSnapshot>;
    /// Stop the executor; every outstanding check gets its result first.
    fn shutdown(self: Box<Self>);
    /// Which containment is in force (`cgroup`, `fallback`, `off`), if
    /// this driver can tell.
    fn containment(&self) -> Option<String> {
        None
    }
}

/// The `pidring` library in this process.
pub struct InProcess {
    exec: Executor,
    policy: Policy,
    tx: Sender<Event>,
    start: Instant,
}

impl InProcess {
    /// Build an executor: subreaper on, so escaped grandchildren come back to us and are reaped.
    pub fn new(
        backend: BackendKind,
        policy: Policy,
        tx: Sender<Event>,
        start: Instant,
    ) -> Result<InProcess, String> {
        let exec = Executor::builder()
            .backend(backend)
            .max_running(policy.max_running)
            .queue_limit(policy.queue_limit)
            .realtime_kills(policy.realtime_kills)
            .reap_orphans(true)
            .cgroup(pidring::cgroup::Containment::Auto)
            .build()
            .map_err(|e| format!("cannot start the executor: {e}"))?;
        Ok(InProcess {
            exec,
            policy,
            tx,
            start,
        })
    }

    /// The backend the executor runs on.
    pub fn backend(&self) -> BackendKind {
        self.exec.backend()
    }
}

impl Driver for InProcess {
    fn submit(&mut self, spec: &Spec) -> Result<(), String> {
        let check = Check::argv(&spec.argv)
            .timeout(self.policy.timeout)
            .grace(self.policy.grace)
            .env(&self.policy.marker.0, &self.policy.marker.1)
            .env(crate::strict::SEQ_VAR, spec.seq.to_string());
        let tx = self.tx.clone();
        let seq = spec.seq;
        let start = self.start;
        self.exec
            .submit_with(check, move |r| {
                let rec = Record::from_result(seq, &r, start.elapsed().as_micros() as u64);
                let _ = tx.send(Event::Result(rec));
            })
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn load(&self) -> Option<(usize, usize)> {
        Some((self.exec.running(), self.exec.queued()))
    }

    fn executor_pid(&self) -> i32 {
        std::process::id() as i32
    }

    fn metrics(&self) -> Option<MetricsSnapshot> {
        Some(self.exec.metrics())
    }

    fn shutdown(self: Box<Self>) {
        self.exec.shutdown();
    }

    fn containment(&self) -> Option<String> {
        Some(self.exec.containment().mode)
    }
}
