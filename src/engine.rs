//! The event loop: one thread that owns every check (a slab of `Lifecycle`s),
//! the FIFO admission queue, the timers, and delivery of results.
//!
//! Each turn: one backend wait (bounded by the nearest deadline) → handle the
//! watches that fired → fire due timers → admit queued checks into free
//! running slots → deliver finished checks. Submissions and spawner answers
//! arrive on channels, announced by the eventfd waker.

use crate::backend::{Backend, BackendKind};
use crate::check::{Check, Prepared};
use crate::error::ExecutorError;
use crate::executor::{Deliver, Shared};
use crate::lifecycle::{self, Ctx, KillReason, Lifecycle, Timers, unix_us};
use crate::result::{CheckResult, Outcome, Output, Timings};
use crate::spawn;
use crate::spawner::{self, SpawnDone, SpawnGate, SpawnJob, Spawners};
use crate::state::State;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use rustix::fd::OwnedFd;
use rustix::process::Pid;
use slab::Slab;
use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Token of the waker's eventfd (its low byte names no `Source`, and it is
/// not the io_uring backend's private "ignore" token, `u64::MAX`).
const WAKER: u64 = u64::MAX - 1;
/// Size of the one shared read buffer.
const SCRATCH: usize = 64 * 1024;
/// How often the orphan scan runs when the executor is a subreaper.
const ORPHAN_SCAN: Duration = Duration::from_millis(200);

/// How the loop is set up.
pub(crate) struct Config {
    /// Requested backend.
    pub backend: BackendKind,
    /// Spawner threads.
    pub spawn_threads: usize,
    /// Subreaper mode.
    pub reap_orphans: bool,
}

/// A message to the loop.
pub(crate) enum Request {
    /// A new check.
    Submit(Box<Submission>),
    /// Cancel by id.
    Cancel(u64),
    /// Stop everything.
    Shutdown,
}

/// An accepted check, not yet dispatched.
pub(crate) struct Submission {
    /// Executor id.
    pub id: u64,
    /// The check as submitted (limits, tag).
    pub check: Check,
    /// Its spawnable form.
    pub prepared: Prepared,
    /// Monotonic submission time.
    pub submitted: Instant,
    /// Wall-clock submission time.
    pub submitted_wall: SystemTime,
    /// Where its result goes.
    pub deliver: Deliver,
}

/// Start the loop thread (which sets up the backend and reports which one).
pub(crate) fn start(
    config: Config,
    shared: Arc<Shared>,
    requests: Receiver<Request>,
) -> Result<(JoinHandle<()>, BackendKind), ExecutorError> {
    let devnull = Arc::new(
        spawn::open_devnull().map_err(|source| ExecutorError::Setup {
            what: "open /dev/null",
            source,
        })?,
    );
    if config.reap_orphans {
        rustix::process::set_child_subreaper(Some(rustix::process::getpid())).map_err(|e| {
            ExecutorError::Setup {
                what: "prctl(PR_SET_CHILD_SUBREAPER)",
                source: e.into(),
            }
        })?;
    }
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let thread = std::thread::Builder::new()
        .name("pidring-loop".into())
        .spawn(move || {
            // The backend is created on the loop thread: an io_uring set up
            // as single-issuer belongs to the thread that created it.
            let backend = match Backend::new(config.backend) {
                Ok(b) => b,
                Err((name, source)) => {
                    let _ = ready_tx.send(Err(ExecutorError::Backend {
                        backend: name,
                        source,
                    }));
                    return;
                }
            };
            let (job_tx, job_rx) = crossbeam_channel::unbounded();
            let (done_tx, done_rx) = crossbeam_channel::unbounded();
            let gate = Arc::new(SpawnGate::default());
            let spawners = match spawner::start(
                config.spawn_threads,
                job_rx,
                done_tx,
                shared.waker.clone(),
                devnull,
                gate.clone(),
            ) {
                Ok(s) => s,
                Err(source) => {
                    let _ = ready_tx.send(Err(ExecutorError::Setup {
                        what: "spawner threads",
                        source,
                    }));
                    return;
                }
            };
            *shared.backend.lock().unwrap_or_else(|p| p.into_inner()) = backend.kind();
            let _ = ready_tx.send(Ok(backend.kind()));
            let mut engine = Engine {
                backend,
                shared,
                requests,
                jobs: Some(job_tx),
                done: done_rx,
                checks: Slab::new(),
                by_id: HashMap::new(),
                queue: VecDeque::new(),
                timers: Timers::default(),
                scratch: vec![0u8; SCRATCH].into_boxed_slice(),
                spares: Vec::new(),
                fired: Vec::with_capacity(1024),
                next_generation: 1,
                spawning: 0,
                shutting_down: false,
                reap_orphans: config.reap_orphans,
                gate,
                orphan_misses: 0,
                spawners: Some(spawners),
                next_orphan_scan: Instant::now() + ORPHAN_SCAN,
            };
            engine.run();
            if engine.reap_orphans {
                engine.final_orphan_sweep();
            }
            drop(engine.jobs.take());
            if let Some(spawners) = engine.spawners.take() {
                spawners.join();
            }
        })
        .map_err(|source| ExecutorError::Setup {
            what: "loop thread",
            source,
        })?;
    match ready_rx.recv() {
        Ok(Ok(kind)) => Ok((thread, kind)),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(ExecutorError::Setup {
                what: "loop thread",
                source: std::io::Error::other("loop thread died during setup"),
            })
        }
    }
}

/// The loop's state. Only the loop thread touches it.
struct Engine {
    backend: Backend,
    shared: Arc<Shared>,
    requests: Receiver<Request>,
    jobs: Option<Sender<SpawnJob>>,
    done: Receiver<SpawnDone>,
    checks: Slab<Lifecycle>,
    by_id: HashMap<u64, usize>,
    queue: VecDeque<Box<Submission>>,
    timers: Timers,
    scratch: Box<[u8]>,
    /// Finished checks' descriptors kept for this turn's admissions (`Ctx::spare`).
    spares: Vec<OwnedFd>,
    fired: Vec<u64>,
    next_generation: u32,
    /// The spawner threads, their hand-off sockets and descriptor reserve
    /// (`None` only once the loop has ended).
    spawners: Option<Spawners>,
    /// Jobs handed to spawners whose answer has not come back.
    spawning: usize,
    shutting_down: bool,
    reap_orphans: bool,
    /// Held for reading by spawners from before creating a child until the
    /// answer is sent; the orphan scan runs only when it can take it for
    /// writing, so every child of ours is then known to the loop.
    gate: Arc<SpawnGate>,
    /// Consecutive scans that found a spawn in progress.
    orphan_misses: u32,
    next_orphan_scan: Instant,
}

impl Engine {
    fn run(&mut self) {
        if let Err(e) = self.backend.watch(self.shared.waker.fd(), WAKER, true) {
            // Without the waker nothing can reach us: fail loudly.
            panic!("pidring: cannot watch the waker eventfd: {e}");
        }
        loop {
            let now = Instant::now();
            let mut timeout = self.timers.next().map(|t| t.saturating_duration_since(now));
            if self.reap_orphans {
                let scan = self.next_orphan_scan.saturating_duration_since(now);
                timeout = Some(timeout.map_or(scan, |t| t.min(scan)));
            }
            let mut fired = std::mem::take(&mut self.fired);
            if let Err(e) = self.backend.wait(&mut fired, timeout) {
                tracing::error!("backend wait failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            let now = Instant::now();
            for token in fired.drain(..) {
                if token == WAKER {
                    self.on_wake(now);
                } else {
                    self.on_ready(token, now);
                }
            }
            self.fired = fired;
            while let Some((slot, generation, kind)) = self.timers.pop_due(now) {
                self.with_check(slot, generation, now, |c, ctx| c.on_timer(kind, ctx));
            }
            if self.reap_orphans && now >= self.next_orphan_scan {
                self.scan_orphans();
            }
            self.admit(now);
            // Spares no admission took: closed now, so an idle executor holds none.
            self.spares.clear();
            if self.shutting_down
                && self.checks.is_empty()
                && self.spawning == 0
                && self.shared.outstanding.load(Ordering::SeqCst) == 0
            {
                break;
            }
        }
        tracing::info!("executor loop stopped");
    }

    /// Let the check in (slot, generation) handle one event with the loop's
    /// context, then put it back or deliver it. Stale tokens do nothing.
    fn with_check(
        &mut self,
        slot: usize,
        generation: u32,
        now: Instant,
        f: impl FnOnce(&mut Lifecycle, &mut Ctx<'_>),
    ) {
        if let Some(mut check) = self.take_check(slot, generation) {
            let mut ctx = Ctx {
                backend: &mut self.backend,
                timers: &mut self.timers,
                scratch: &mut self.scratch,
                now,
                spares: &mut self.spares,
            };
            f(&mut check, &mut ctx);
            self.put_back(slot, check);
        }
    }

    /// Detach a check from the slab while it handles an event (it needs the
    /// backend and timers mutably at the same time). `None` if stale.
    fn take_check(&mut self, slot: usize, generation: u32) -> Option<Lifecycle> {
        match self.checks.get(slot) {
            Some(c) if c.generation() == generation => Some(self.checks.remove(slot)),
            _ => None,
        }
    }

    /// Put a check back in its slot, or deliver it if it is done.
    fn put_back(&mut self, slot: usize, check: Lifecycle) {
        if check.is_done() {
            self.by_id.remove(&check.id());
            self.finish(check);
        } else {
            // The slot is free (we just removed it) and slab reuses the most
            // recently freed slot first, so the same index comes back.
            let entry = self.checks.vacant_entry();
            debug_assert_eq!(entry.key(), slot);
            entry.insert(check);
        }
    }

    fn on_ready(&mut self, token: u64, now: Instant) {
        let (slot, generation, source) = lifecycle::untoken(token);
        let Some(source) = source else { return };
        self.with_check(slot, generation, now, |c, ctx| c.on_ready(source, ctx));
    }

    fn on_wake(&mut self, now: Instant) {
        self.shared.waker.reset();
        if let Err(e) = self.backend.watch(self.shared.waker.fd(), WAKER, false) {
            panic!("pidring: cannot re-watch the waker eventfd: {e}");
        }
        self.drain_spawned(now);
        loop {
            match self.requests.try_recv() {
                Ok(Request::Submit(sub)) => {
                    if self.shutting_down {
                        let r = unstarted_result(&sub, Outcome::Shutdown, "executor shutting down");
                        self.deliver(r, sub.deliver);
                    } else {
                        self.queue.push_back(sub);
                    }
                }
                Ok(Request::Cancel(id)) => self.cancel(id, now),
                Ok(Request::Shutdown) => self.begin_shutdown(now),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    // The Executor handle is gone without a shutdown request.
                    if !self.shutting_down {
                        self.begin_shutdown(now);
                    }
                    break;
                }
            }
        }
    }

    /// Take the spawners' answers: start watching each new child.
    fn drain_spawned(&mut self, now: Instant) {
        while let Ok(done) = self.done.try_recv() {
            self.spawning -= 1;
            let result = match (done.result, self.spawners.as_mut()) {
                (Ok(spawned), Some(spawners)) => spawners.receive(done.spawner, spawned),
                (Err(failure), spawners) => {
                    if let Some(s) = spawners {
                        s.release();
                    }
                    Err(failure)
                }
                (Ok(_), None) => unreachable!("spawners outlive the loop"),
            };
            let known = self
                .checks
                .get(done.slot)
                .is_some_and(|c| c.generation() == done.generation);
            if !known {
                // Cannot happen (a slot is held until its spawn answers); be safe anyway.
                if let Ok(child) = result {
                    tracing::error!("spawn answer for an unknown check; killing the child");
                    spawn::kill_and_reap(child);
                }
                continue;
            }
            self.with_check(done.slot, done.generation, now, |c, ctx| match result {
                Ok(child) => c.started(child, done.picked, ctx),
                Err(failure) => {
                    tracing::debug!(id = c.id(), "spawn failed: {}", failure.message);
                    c.spawn_failed(failure, done.picked);
                }
            });
        }
    }

    /// Move queued checks into free running slots, oldest first.
    fn admit(&mut self, now: Instant) {
        while self.checks.len() < self.shared.max_running {
            let Some(sub) = self.queue.pop_front() else {
                break;
            };
            let Submission {
                id,
                check,
                prepared,
                submitted,
                submitted_wall,
                deliver,
            } = *sub;
            let generation = self.next_generation;
            self.next_generation = self.next_generation.wrapping_add(1).max(1);
            let entry = self.checks.vacant_entry();
            let slot = entry.key();
            entry.insert(Lifecycle::new(
                id,
                slot,
                generation,
                &check,
                deliver,
                submitted,
                submitted_wall,
                now,
            ));
            self.by_id.insert(id, slot);
            // Descriptor slots for the child's pidfd and pipes, held until
            // they arrive: EMFILE fails the check here, before any child exists.
            let reserved = (self.spawners.as_mut()).map_or(Ok(()), |s| s.reserve(&mut self.spares));
            if let Err(e) = reserved {
                let mut c = self.checks.remove(slot);
                self.by_id.remove(&id);
                let failure = spawn::SpawnFailure::new(
                    &prepared.program(),
                    "cannot reserve descriptors for",
                    e,
                );
                c.spawn_failed(failure, now);
                self.finish(c);
                continue;
            }
            self.spawning += 1;
            let job = SpawnJob {
                slot,
                generation,
                prepared,
            };
            let sent = self
                .jobs
                .as_ref()
                .is_some_and(|jobs| jobs.send(job).is_ok());
            if !sent {
                // Spawners gone (cannot happen before the loop ends).
                self.spawning -= 1;
                if let Some(s) = self.spawners.as_mut() {
                    s.release();
                }
                let mut c = self.checks.remove(slot);
                self.by_id.remove(&id);
                c.spawn_failed(spawn_gone(), now);
                self.finish(c);
            }
        }
        self.shared
            .running
            .store(self.checks.len(), Ordering::Relaxed);
    }

    fn cancel(&mut self, id: u64, now: Instant) {
        if let Some(&slot) = self.by_id.get(&id) {
            let generation = self.checks[slot].generation();
            self.with_check(slot, generation, now, |c, _| c.kill_now(KillReason::Cancel));
        } else if let Some(pos) = self.queue.iter().position(|s| s.id == id)
            && let Some(sub) = self.queue.remove(pos)
        {
            let r = unstarted_result(
                &sub,
                Outcome::Cancelled,
                "Check cancelled before it started",
            );
            self.deliver(r, sub.deliver);
        }
    }

    fn begin_shutdown(&mut self, now: Instant) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        self.shared.closed.store(true, Ordering::SeqCst);
        tracing::info!(
            running = self.checks.len(),
            queued = self.queue.len(),
            "shutting down: killing running checks"
        );
        while let Some(sub) = self.queue.pop_front() {
            let r = unstarted_result(&sub, Outcome::Shutdown, "executor shutting down");
            self.deliver(r, sub.deliver);
        }
        let slots: Vec<(usize, u32)> = self
            .checks
            .iter()
            .map(|(s, c)| (s, c.generation()))
            .collect();
        for (slot, generation) in slots {
            self.with_check(slot, generation, now, |c, _| {
                c.kill_now(KillReason::Shutdown)
            });
        }
    }

    fn finish(&mut self, check: Lifecycle) {
        // Stamp delivery at the moment it happens, not at the turn's start.
        let (result, deliver) = check.finish(Instant::now());
        self.deliver(result, deliver);
        self.shared
            .running
            .store(self.checks.len(), Ordering::Relaxed);
    }

    /// Hand one result to its callback (a panicking callback cannot kill the loop).
    fn deliver(&mut self, result: CheckResult, deliver: Deliver) {
        if let Ok(mut m) = self.shared.metrics.lock() {
            m.record_result(&result);
        }
        if std::panic::catch_unwind(AssertUnwindSafe(move || deliver(result))).is_err() {
            tracing::error!("a result callback panicked");
        }
        self.shared.outstanding.fetch_sub(1, Ordering::SeqCst);
    }

    /// Reap descendants that escaped their check and were re-parented to us.
    fn scan_orphans(&mut self) {
        let gate = self.gate.clone();
        // Never block the loop: if a spawner is mid-spawn, try again soon.
        let Some(_exclusive) = gate.try_exclusive() else {
            self.orphan_misses += 1;
            if self.orphan_misses >= 5 {
                gate.pause();
            }
            self.next_orphan_scan = Instant::now() + Duration::from_millis(1);
            return;
        };
        self.orphan_misses = 0;
        gate.resume();
        self.next_orphan_scan = Instant::now() + ORPHAN_SCAN;
        // With the gate held no spawn is in progress; take the answers that
        // were sent, so every child of ours that is a check is in the slab.
        self.drain_spawned(Instant::now());
        let ours: HashSet<i32> = self
            .checks
            .iter()
            .filter_map(|(_, c)| c.unreaped_pid())
            .map(|p| p.as_raw_nonzero().get())
            .collect();
        let (reaped, _alive) = reap_exited_orphans(&ours);
        self.count_orphans(reaped);
    }

    fn count_orphans(&self, reaped: u64) {
        if reaped > 0 {
            tracing::info!(reaped, "reaped orphaned descendants of checks");
            if let Ok(mut m) = self.shared.metrics.lock() {
                m.counters.orphans_reaped += reaped;
            }
        }
    }

    /// At the end of a shutdown in subreaper mode: every check is reaped, so
    /// every child left is an adopted descendant (escaped, or killed with its
    /// group and not yet collected). SIGKILL the live ones through a pidfd
    /// and reap them all, for a bounded time, so nothing outlives the executor.
    fn final_orphan_sweep(&mut self) {
        const BOUND: Duration = Duration::from_secs(5);
        let end = Instant::now() + BOUND;
        let mut signalled = HashSet::new();
        let mut total = 0;
        loop {
            let (reaped, alive) = reap_exited_orphans(&HashSet::new());
            total += reaped;
            if alive.is_empty() {
                break;
            }
            for pid in alive {
                // An unreaped child of ours: its pid cannot be reused under us.
                if signalled.insert(pid)
                    && let Ok(fd) =
                        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                {
                    let _ = spawn::signal_leader(
                        rustix::fd::AsFd::as_fd(&fd),
                        rustix::process::Signal::KILL,
                    );
                }
            }
            if Instant::now() >= end {
                tracing::error!(left = ?children_of_self(), "descendants still alive {BOUND:?} after SIGKILL (uninterruptible sleep?)");
                break;
            }
            // The loop serves nobody any more: a short sleep is the wait.
            std::thread::sleep(Duration::from_millis(2));
        }
        self.count_orphans(total);
    }
}

/// Reap every exited child of this process that is not in `ours` (check
/// leaders, which are reaped only through their pidfds). Returns how many
/// were reaped and the children still alive.
fn reap_exited_orphans(ours: &HashSet<i32>) -> (u64, Vec<Pid>) {
    let mut reaped = 0;
    let mut alive = Vec::new();
    for pid in children_of_self() {
        if ours.contains(&pid) {
            continue;
        }
        let Some(pid) = Pid::from_raw(pid) else {
            continue;
        };
        match rustix::process::waitid(
            rustix::process::WaitId::Pid(pid),
            rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOHANG,
        ) {
            Ok(Some(_)) => reaped += 1,
            Ok(None) => alive.push(pid),
            Err(_) => {} // gone meanwhile
        }
    }
    (reaped, alive)
}

/// If the loop dies (a bug), still answer what is queued; running checks are
/// killed and reaped by `Lifecycle`'s own drop.
impl Drop for Engine {
    fn drop(&mut self) {
        for sub in std::mem::take(&mut self.queue) {
            let r = unstarted_result(&sub, Outcome::Shutdown, "executor loop stopped");
            let _ = std::panic::catch_unwind(AssertUnwindSafe(move || (sub.deliver)(r)));
        }
    }
}

/// Every child of this process (all threads), from /proc.
pub(crate) fn children_of_self() -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return pids;
    };
    for task in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    pids
}

fn spawn_gone() -> crate::spawn::SpawnFailure {
    crate::spawn::SpawnFailure {
        errno: None,
        message: "spawner threads are gone".into(),
    }
}

/// The result of a check that never got a child (cancelled or shut down while queued).
pub(crate) fn unstarted_result(sub: &Submission, outcome: Outcome, reason: &str) -> CheckResult {
    let now = Instant::now();
    let waited = now.saturating_duration_since(sub.submitted);
    CheckResult {
        id: sub.id,
        tag: sub.check.tag.clone(),
        outcome,
        state: State::Unknown,
        reason: reason.to_string(),
        exit: None,
        pid: None,
        stdout: Output::default(),
        stderr: Output::default(),
        output_cut: false,
        plugin: Default::default(),
        timings: Timings {
            submitted_unix_us: unix_us(sub.submitted_wall),
            queue_wait: waited,
            total: waited,
            ..Timings::default()
        },
        rusage: None,
    }
}
