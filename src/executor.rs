//! `Executor`: the public face of the engine. Accepts checks from any thread
//! and delivers exactly one `CheckResult` per accepted check.

use crate::backend::BackendKind;
use crate::check::Check;
use crate::engine::{self, Request, Submission};
use crate::error::{ExecutorError, SubmitError};
use crate::metrics::{Metrics, MetricsSnapshot, Stage};
use crate::oneshot::{self, Lost};
use crate::result::CheckResult;
use crate::shared::Shared;
use crate::waker::Waker;
use crossbeam_channel::Sender;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// The id the executor gives each accepted check.
pub type CheckId = u64;

/// Configures and starts an [`Executor`].
#[derive(Debug, Clone)]
pub struct ExecutorBuilder {
    max_running: usize,
    queue_limit: usize,
    backend: BackendKind,
    reap_orphans: bool,
    raise_nofile: bool,
    realtime_kills: bool,
    containment: crate::cgroup::Containment,
}

impl Default for ExecutorBuilder {
    fn default() -> Self {
        ExecutorBuilder {
            max_running: 1024,
            queue_limit: 100_000,
            backend: BackendKind::Auto,
            reap_orphans: false,
            raise_nofile: true,
            realtime_kills: false,
            containment: crate::cgroup::Containment::Off,
        }
    }
}

impl ExecutorBuilder {
    /// Most checks running at once (default 1024); the rest wait in FIFO order.
    pub fn max_running(mut self, n: usize) -> Self {
        self.max_running = n.max(1);
        self
    }

    /// Most checks waiting for a slot (default 100,000); past it, `submit` fails at once.
    pub fn queue_limit(mut self, n: usize) -> Self {
        self.queue_limit = n;
        self
    }

    /// Which backend to use (default: io_uring, falling back to epoll).
    pub fn backend(mut self, kind: BackendKind) -> Self {
        self.backend = kind;
        self
    }

    /// Become a child subreaper (`PR_SET_CHILD_SUBREAPER`) and reap descendants
    /// that escaped their check and were re-parented to this process.
    /// Only for a process that runs checks through this executor alone.
    pub fn reap_orphans(mut self, yes: bool) -> Self {
        self.reap_orphans = yes;
        self
    }

    /// Raise this process's soft RLIMIT_NOFILE to its hard limit at build
    /// (default true): every running check holds three fds.
    pub fn raise_nofile_limit(mut self, yes: bool) -> Self {
        self.raise_nofile = yes;
        self
    }

    /// Run the loop thread under `SCHED_FIFO` (priority 1) while a deadline
    /// or grace end is less than 20 ms away (default false), so that on a
    /// machine whose cores are saturated a kill is not a scheduler tick or
    /// more late. Checks never inherit it (`SCHED_RESET_ON_FORK`); the
    /// loop's CPU time while realtime is capped at 30 % of a CPU on average.
    /// Stays off for an executor at nice > 0 or `SCHED_BATCH`/`SCHED_IDLE`
    /// (its checks would start at nice 0 otherwise). Needs `CAP_SYS_NICE`
    /// or `RLIMIT_RTPRIO` >= 1; refused, the executor logs a warning once
    /// and carries on as an ordinary thread.
    pub fn realtime_kills(mut self, yes: bool) -> Self {
        self.realtime_kills = yes;
        self
    }

    /// Contain each check in a cgroup v2 leaf of its own (default
    /// [`Containment::Off`](crate::cgroup::Containment::Off)): every process
    /// it starts, whatever session or group it moves to, is killed with it
    /// (`cgroup.kill`) at a timeout, cancel or shutdown, and after a normal
    /// exit when `kill_group_on_exit` (the default); its result waits
    /// until the leaf is empty and reports the leaf's CPU time. Where
    /// cgroups are unusable the executor falls back to the process-group
    /// sweep and descendant walk, logs why once, and says so in
    /// [`Executor::containment`] and the metrics.
    pub fn cgroup(mut self, containment: crate::cgroup::Containment) -> Self {
        self.containment = containment;
        self
    }

    /// Start the loop thread.
    pub fn build(self) -> Result<Executor, ExecutorError> {
        // First, before any descriptor of ours could take fd 0, 1 or 2.
        crate::process::ensure_std_fds();
        crate::process::keep_exit_statuses();
        if self.raise_nofile {
            crate::process::raise_nofile_limit();
        }
        let waker = Arc::new(Waker::new().map_err(|source| ExecutorError::Setup {
            what: "eventfd",
            source,
        })?);
        let shared = Arc::new(Shared {
            outstanding: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            submitted: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            waker,
            metrics: Mutex::new(Metrics::new()),
            max_running: AtomicUsize::new(self.max_running),
            queue_limit: AtomicUsize::new(self.queue_limit),
            realtime_kills: AtomicBool::new(false),
            realtime_wanted: AtomicBool::new(self.realtime_kills),
            containment: Mutex::new(Default::default()),
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let config = engine::Config {
            backend: self.backend,
            reap_orphans: self.reap_orphans,
            realtime_kills: self.realtime_kills,
            containment: self.containment,
        };
        let (loop_thread, backend) = engine::start(config, shared.clone(), rx)?;
        tracing::info!(backend = %backend, max_running = self.max_running, queue_limit = self.queue_limit, "executor started");
        Ok(Executor {
            shared,
            tx,
            loop_thread: Mutex::new(Some(loop_thread)),
            next_id: AtomicU64::new(1),
            inherited: Arc::new(crate::check::InheritedEnv::new(
                crate::check::inherited_env(),
            )),
            backend,
        })
    }
}

/// Runs checks. Cheap to share across threads (`Arc<Executor>`); dropping it
/// shuts it down (every running check killed, swept, reaped and answered).
pub struct Executor {
    shared: Arc<Shared>,
    tx: Sender<Request>,
    loop_thread: Mutex<Option<JoinHandle<()>>>,
    next_id: AtomicU64,
    inherited: Arc<crate::check::InheritedEnv>,
    backend: BackendKind,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("backend", &self.backend)
            .field("running", &self.running())
            .field("queued", &self.queued())
            .finish()
    }
}

impl Executor {
    /// Which containment is in force (see [`ExecutorBuilder::cgroup`]).
    pub fn containment(&self) -> crate::cgroup::ContainmentStatus {
        self.shared
            .containment
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// An executor with default settings.
    pub fn new() -> Result<Executor, ExecutorError> {
        Executor::builder().build()
    }

    /// Configure an executor.
    pub fn builder() -> ExecutorBuilder {
        ExecutorBuilder::default()
    }

    /// The backend the loop runs on.
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// Submit a check; wait for its result with [`Pending::wait`], or `.await` it.
    pub fn submit(&self, check: Check) -> Result<Pending, SubmitError> {
        let (tx, rx) = oneshot::channel();
        let id = self.submit_with(check, move |r| tx.send(r))?;
        Ok(Pending { id, rx })
    }

    /// Most checks running at once (the builder's `max_running`, or the
    /// last [`set_max_running`](Self::set_max_running)).
    pub fn max_running(&self) -> usize {
        self.shared.max_running.load(Ordering::Relaxed)
    }

    /// Change how many checks may run at once (at least 1). Raised, queued
    /// checks start at once; lowered, no new check starts while more than
    /// `n` run — none that runs is killed.
    pub fn set_max_running(&self, n: usize) {
        self.shared.max_running.store(n.max(1), Ordering::SeqCst);
        self.shared.waker.wake();
    }

    /// Turn realtime kills (see [`ExecutorBuilder::realtime_kills`]) on or
    /// off; the loop applies it at its next turn.
    pub fn set_realtime_kills(&self, yes: bool) {
        self.shared.realtime_wanted.store(yes, Ordering::SeqCst);
        self.shared.waker.wake();
    }

    /// Most checks waiting for a slot (the builder's `queue_limit`, or the
    /// last [`set_queue_limit`](Self::set_queue_limit)).
    pub fn queue_limit(&self) -> usize {
        self.shared.queue_limit.load(Ordering::Relaxed)
    }

    /// Change how many checks may wait for a slot; past it `submit` fails
    /// (checks already queued stay queued).
    pub fn set_queue_limit(&self, n: usize) {
        self.shared.queue_limit.store(n, Ordering::SeqCst);
    }

    /// Submit a check; `deliver` is called exactly once with its result, on
    /// the executor's loop thread — it must not block (send it on a channel).
    pub fn submit_with<F>(&self, check: Check, deliver: F) -> Result<CheckId, SubmitError>
    where
        F: FnOnce(CheckResult) + Send + 'static,
    {
        let prepared = match check.prepare_with(&self.inherited) {
            Ok(p) => p,
            Err(e) => {
                self.count_rejected();
                return Err(e.into());
            }
        };
        if !check.caps.is_empty()
            && let Some(why) = check.caps.unenforceable(&self.containment())
        {
            self.count_rejected();
            return Err(crate::error::CheckError::Cap(why).into());
        }
        // Reserve a place first, then look at `closed`: the loop sets `closed`
        // and then waits for `outstanding` to reach zero, so either it sees
        // this reservation and waits for the message, or we see `closed`.
        let queue_limit = self.queue_limit();
        let limit = self.max_running().saturating_add(queue_limit);
        let reserved =
            self.shared
                .outstanding
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < limit).then_some(n + 1)
                });
        if let Err(n) = reserved {
            self.count_rejected();
            let running = self.shared.running.load(Ordering::Relaxed);
            return Err(SubmitError::QueueFull {
                running,
                queued: n.saturating_sub(running),
                limit: queue_limit,
            });
        }
        if self.shared.closed.load(Ordering::SeqCst) {
            self.shared.outstanding.fetch_sub(1, Ordering::SeqCst);
            self.count_rejected();
            return Err(SubmitError::ShuttingDown);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.shared.submitted.fetch_add(1, Ordering::Relaxed);
        let sub = Submission {
            id,
            limits: check.into_limits(),
            prepared,
            submitted: Instant::now(),
            submitted_wall: SystemTime::now(),
            deliver: Box::new(deliver),
        };
        if let Err(lost) = self.tx.send(Request::Submit(Box::new(sub))) {
            // The loop is gone (it panicked): answer here rather than never.
            self.shared.outstanding.fetch_sub(1, Ordering::SeqCst);
            if let Request::Submit(sub) = lost.0 {
                let result = engine::unstarted_result(
                    &sub,
                    crate::result::Outcome::Shutdown,
                    "executor loop is not running",
                );
                (sub.deliver)(result);
            }
            return Ok(id);
        }
        self.shared.waker.wake();
        Ok(id)
    }

    fn count_rejected(&self) {
        if let Ok(mut m) = self.shared.metrics.lock() {
            m.counters.rejected += 1;
        }
    }

    /// Cancel a check: a queued one is answered without running, a running one
    /// is killed (group swept), reaped and answered with `Outcome::Cancelled`.
    /// Unknown or finished ids are ignored.
    pub fn cancel(&self, id: CheckId) {
        if self.tx.send(Request::Cancel(id)).is_ok() {
            self.shared.waker.wake();
        }
    }

    /// Checks holding a running slot now.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::Relaxed)
    }

    /// Checks waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.shared
            .outstanding
            .load(Ordering::Relaxed)
            .saturating_sub(self.running())
    }

    /// Accepted checks whose result is not yet delivered.
    pub fn outstanding(&self) -> usize {
        self.shared.outstanding.load(Ordering::SeqCst)
    }

    /// Wait until no check is running or queued, or `timeout` passes; true if idle.
    /// (Polls every few milliseconds: meant for shutdown drains, not hot paths.)
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.outstanding() == 0 {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The full per-stage histograms, for merging or writing `.hgrm` files.
    pub fn histograms(&self) -> Vec<(Stage, hdrhistogram::Histogram<u64>)> {
        let m = self
            .shared
            .metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.histograms()
    }

    /// Percentiles per stage, and counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        let m = self
            .shared
            .metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut snap = m.snapshot(self.running(), self.queued(), self.backend.as_str());
        snap.counters.submitted = self.shared.submitted.load(Ordering::Relaxed);
        snap.realtime_kills = self.shared.realtime_kills.load(Ordering::Relaxed);
        snap.containment = self.containment();
        snap
    }

    /// Stop: refuse new checks, answer queued ones with `Outcome::Shutdown`,
    /// SIGKILL every running check and its group, reap all, answer all, and
    /// join the loop. Idempotent.
    pub fn shutdown(&self) {
        self.stop(None);
    }

    /// [`shutdown`](Executor::shutdown), waiting at most `timeout` for the
    /// loop to kill and reap everything; true if it did. Past it, the loop
    /// is left to finish by itself (detached: dropping the executor no
    /// longer waits for it). For a process about to exit that must not
    /// hang on a check it cannot kill: one it may not signal (EPERM), or
    /// one stuck in the kernel (D state on a hung mount).
    pub fn shutdown_within(&self, timeout: Duration) -> bool {
        self.stop(Some(Instant::now() + timeout))
    }

    /// Ask the loop to stop and join it, giving up (detaching it) at `end`;
    /// true if it was joined (or already was).
    fn stop(&self, end: Option<Instant>) -> bool {
        let _ = self.tx.send(Request::Shutdown);
        self.shared.waker.wake();
        let mut guard = self.loop_thread.lock().unwrap_or_else(|p| p.into_inner());
        let Some(h) = guard.as_ref() else {
            return true;
        };
        // Called from a result callback (on the loop thread itself): the loop
        // stops by itself once everything is answered; joining would deadlock.
        if h.thread().id() == std::thread::current().id() {
            return false;
        }
        if let Some(end) = end {
            while !h.is_finished() {
                if Instant::now() >= end {
                    // Dropping the handle detaches the thread.
                    drop(guard.take());
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if let Some(h) = guard.take()
            && h.join().is_err()
        {
            tracing::error!("executor loop thread panicked");
        }
        true
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A submitted check's future result: block on it ([`wait`](Pending::wait)),
/// or `.await` it from any async runtime (the loop wakes the task).
///
/// Dropping it is harmless: the check still runs and its result is dropped.
/// Polling it after it returned `Ready`, or after
/// [`try_result`](Pending::try_result) or [`wait_timeout`](Pending::wait_timeout)
/// took the result, panics (as does `wait` then).
#[derive(Debug)]
pub struct Pending {
    id: CheckId,
    rx: oneshot::Receiver<CheckResult>,
}

impl Pending {
    /// The check's id.
    pub fn id(&self) -> CheckId {
        self.id
    }

    /// Block until the result arrives.
    pub fn wait(self) -> CheckResult {
        match self.rx.recv_until(None) {
            Some(got) => got.unwrap_or_else(|lost| no_result(lost)),
            None => unreachable!("waiting without a deadline"),
        }
    }

    /// Block up to `timeout` for the result.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<CheckResult> {
        self.rx.recv_until(Some(Instant::now() + timeout))?.ok()
    }

    /// The result if it is already there.
    pub fn try_result(&self) -> Option<CheckResult> {
        self.rx.try_recv()?.ok()
    }
}

impl Future for Pending {
    type Output = CheckResult;

    /// Ready with the result once the loop delivered it; panics if it was taken already.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CheckResult> {
        self.rx
            .poll_recv(cx)
            .map(|got| got.unwrap_or_else(|lost| no_result(lost)))
    }
}

/// Why a `Pending` asked for its result has none: both are the caller's or the loop's bug.
fn no_result(lost: Lost) -> ! {
    match lost {
        Lost::Taken => panic!("this check's result was already taken from its Pending"),
        Lost::Abandoned => {
            panic!("pidring executor loop died without answering a check (this is a bug)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::Outcome;

    /// Invariant 4, the loop never blocks: with the metrics mutex held by
    /// somebody else all along, checks still start, exit, time out, fail to
    /// spawn and are answered; what the loop could not record then is
    /// recorded once the mutex is free, none of it lost.
    #[test]
    fn the_loop_never_waits_for_the_metrics_mutex() {
        for backend in [BackendKind::Epoll, BackendKind::IoUring] {
            let Ok(exec) = Executor::builder().backend(backend).build() else {
                tracing::warn!("{backend:?} unavailable here; not tested");
                continue;
            };
            let held = exec.shared.metrics.lock().unwrap();
            let mut pending: Vec<_> = (0..60)
                .map(|_| exec.submit(Check::argv(["/bin/true"])).unwrap())
                .collect();
            for _ in 0..3 {
                let check = Check::argv(["/bin/sleep", "30"])
                    .timeout(Duration::from_millis(100))
                    .grace(Duration::from_millis(100));
                pending.push(exec.submit(check).unwrap());
            }
            pending.push(exec.submit(Check::argv(["/nonexistent/plugin"])).unwrap());
            let results: Vec<CheckResult> = pending
                .iter()
                .map(|p| {
                    p.wait_timeout(Duration::from_secs(60))
                        .expect("no answer while the metrics mutex was held: the loop waits for it")
                })
                .collect();
            let exited = Outcome::Exited { code: 0 };
            assert!(results[..60].iter().all(|r| r.outcome == exited));
            assert!(results[60..63].iter().all(|r| r.timed_out()));
            assert!(matches!(results[63].outcome, Outcome::SpawnFailed { .. }));
            drop(held);
            let end = Instant::now() + Duration::from_secs(10);
            let counted = loop {
                let c = exec.metrics().counters;
                if c.completed == 64 || Instant::now() > end {
                    break c;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            assert_eq!(
                (
                    counted.completed,
                    counted.exited,
                    counted.timed_out,
                    counted.spawn_failed
                ),
                (64, 60, 3, 1),
                "{backend:?}: results recorded once the mutex was free"
            );
        }
    }
}
