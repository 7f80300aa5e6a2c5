//! The event loop: one thread that owns every check (a slab of `Lifecycle`s),
//! the FIFO admission queue, the timers, and delivery of results.
//!
//! Each turn: one backend wait (bounded by the nearest deadline) → handle the
//! watches that fired → fire due timers → admit queued checks into free
//! running slots (creating each child right here, without waiting for it to
//! exec: see `process::launch`) → deliver finished checks. Submissions arrive
//! on a channel, announced by the eventfd waker.

use crate::backend::{Backend, BackendKind, Batch};
use crate::check::{Limits, Prepared};
use crate::error::ExecutorError;
use crate::lifecycle::{self, EventCtx, KillReason, Lifecycle, TimerKind, Timers};
use crate::metrics::ResultSummary;
use crate::priority::LoopPriority;
use crate::process;
use crate::result::{CheckResult, Outcome};
use crate::shared::{Deliver, Shared};
use crate::token::{Source, WAKER, WATCH_FAILED, untoken};
use crossbeam_channel::{Receiver, TryRecvError};
use rustix::process::Pid;
use slab::Slab;
use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Size of the one shared read buffer.
const SCRATCH: usize = 64 * 1024;
/// Most children created but not yet exec'd at once, among those created
/// less than `process::STUCK_LAUNCH` ago: it paces spawning, so that a burst
/// does not create children faster than they get CPUs to exec on. Our
/// copies of a child's pipes' write ends are held only until it has its own
/// descriptor table, and are bounded by the low slot pairs (see
/// `ChildLoans::has_slots`). On a saturated machine a child can wait
/// milliseconds for a CPU to exec on, so at a few thousand spawns/s a few
/// dozen are normally in this state.
///
/// A child that has not exec'd after `STUCK_LAUNCH` (a hung mount in its
/// working directory or its program's path) leaves this count (see
/// `stuck`): otherwise 256 such checks of one client would stop every
/// client's checks from starting. It still holds its stack (64 KiB
/// mapped, a few KiB touched) and strings until the kernel lets go; the
/// memory stays bounded because every launch, stuck or not, is a running
/// check: never more than `max_running` of them.
const MAX_PRE_EXEC: usize = 256;
/// How often children stuck before `execve` (see `stuck`) are looked at again.
const STUCK_POLL: Duration = Duration::from_millis(100);
/// Most one warning about newly stuck children per this long (a hung
/// mount sticks a burst of them, a few a turn).
const STUCK_WARN_EVERY: Duration = Duration::from_secs(10);
/// How soon to look again when admission waits for children to exec (which
/// wakes nothing).
const LAUNCH_POLL: Duration = Duration::from_millis(1);
/// From this many running checks on, a wait lingers for more events once
/// one has come (`BUSY_BATCH`): under load each wake then handles several,
/// and the loop sleeps and switches less per check (measured: ~15 µs less
/// executor CPU per check at 256 in flight, docs/PERFORMANCE.md). Below it,
/// an event is handled the moment it comes.
const BATCH_FROM: usize = 64;
/// The lingering: up to 200 µs more for an event (never past a timer, so
/// a kill is never later for it), or until 32 have come.
const BUSY_BATCH: Batch = Batch {
    events: 32,
    within: Duration::from_micros(200),
};
/// Exits in one turn from which the leaves' CPU counters are flushed
/// together before their results read them (`cgroup::Pool::flush_usage`).
const FLUSH_USAGE_FROM: usize = 2;
/// How many events a turn handles between looks at the signalling timers.
const SIGNAL_CHECK_EVERY: usize = 8;
/// How often the orphan scan runs when the executor is a subreaper: one
/// read of the main thread's children list (tens of µs), often enough that
/// group members killed by a sweep, adopted as they die, do not sit as our
/// zombies for long.
const ORPHAN_SCAN: Duration = Duration::from_millis(50);

/// How the loop is set up.
pub(crate) struct Config {
    /// Requested backend.
    pub backend: BackendKind,
    /// Subreaper mode.
    pub reap_orphans: bool,
    /// Realtime priority while a kill is near (see `priority`).
    pub realtime_kills: bool,
    /// Where checks are contained (see `cgroup`).
    pub containment: crate::cgroup::Containment,
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
    /// Its limits and tag.
    pub limits: Limits,
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
            let reap_orphans = config.reap_orphans;
            let mut engine = match Engine::set_up(config, shared, requests) {
                Ok(engine) => engine,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(engine.backend.kind()));
            engine.run();
            // Subreaper or not: a plugin's `clone(CLONE_PARENT)` sibling
            // is a child of this thread, and ours to kill and reap.
            engine.final_orphan_sweep(reap_orphans);
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

/// The cgroup leaves' pool, if containment can be had (said once in the
/// log when it cannot, and in the shared status either way).
fn containment_pool(config: &Config, shared: &Shared) -> Option<crate::cgroup::Pool> {
    let pool = crate::cgroup::Pool::setup(
        &config.containment,
        shared.max_running.load(Ordering::Relaxed),
    );
    let status = crate::cgroup::Pool::status_of(&pool);
    if let Err(why) = &pool {
        tracing::warn!(
            "containment: no cgroup per check ({why}); checks are confined by their \
             process group, the descendant walk at a kill{}",
            if config.reap_orphans {
                " and the subreaper"
            } else {
                ""
            }
        );
    }
    *shared.containment.lock().unwrap_or_else(|p| p.into_inner()) = status;
    pool.ok().flatten()
}

/// The loop's state. Only the loop thread touches it.
struct Engine {
    backend: Backend,
    shared: Arc<Shared>,
    requests: Receiver<Request>,
    /// Checks whose child has not exec'd (or exited) yet, and when it was
    /// created (oldest first): polled every turn, to close our copies of
    /// its pipes' write ends and give its stack back as soon as it is done
    /// with them. Counted against `MAX_PRE_EXEC`.
    pre_exec: VecDeque<(usize, u32, Instant)>,
    /// Checks whose child has not exec'd `STUCK_LAUNCH` after it was
    /// created: polled every `STUCK_POLL`, not counted against
    /// `MAX_PRE_EXEC`.
    stuck: Vec<(usize, u32)>,
    /// When `stuck` is polled next.
    next_stuck_poll: Instant,
    /// When children stuck before `execve` were last warned about.
    stuck_warned: Option<Instant>,
    /// This turn's due timers that do not signal (kept for its allocation).
    due: Vec<(usize, u32, TimerKind)>,
    /// Scratch for `fire_signal_timers`.
    popped: Vec<(usize, u32, TimerKind)>,
    checks: Slab<Lifecycle>,
    by_id: HashMap<u64, usize>,
    queue: VecDeque<Box<Submission>>,
    timers: Timers,
    scratch: Box<[u8]>,
    fired: Vec<u64>,
    next_generation: u32,
    shutting_down: bool,
    reap_orphans: bool,
    next_orphan_scan: Instant,
    /// Outside subreaper mode, scan this thread's children even with no
    /// check running: a check's `CLONE_PARENT` sibling may be alive (or
    /// the last check just ended and may have left one). See `scans`.
    scan_siblings: bool,
    /// The last running check ended this turn: scan once, now (an idle
    /// executor does not wake for it later unless a sibling is left).
    scan_when_idle: bool,
    /// The loop thread's scheduling policy (realtime near kills, if asked).
    priority: LoopPriority,
    /// What `priority` was made for (`Shared::realtime_wanted` may change).
    realtime_wanted: bool,
    /// Results delivered but not yet in the shared metrics (see `record_results`).
    unrecorded: Vec<ResultSummary>,
    /// Orphans reaped but not yet counted in the shared metrics.
    unrecorded_orphans: u64,
    // Declared after `checks` (fields drop in order): a check dropped with
    // its child not yet exec'd gives back what it borrowed from here.
    /// Stacks and low descriptor slots lent to children until they exec.
    loans: process::ChildLoans,
    /// The cgroup leaves checks run in (containment on); dropped after
    /// `checks`, it removes them.
    cgroups: Option<crate::cgroup::Pool>,
}

impl Engine {
    /// Set the loop thread up (on it: its io_uring, signal mask and
    /// scheduling policy are per thread) and build the loop's state.
    fn set_up(
        config: Config,
        shared: Arc<Shared>,
        requests: Receiver<Request>,
    ) -> Result<Engine, ExecutorError> {
        // The backend is created on the loop thread: an io_uring set up
        // as single-issuer belongs to the thread that created it.
        let backend = Backend::new(config.backend)
            .map_err(|(backend, source)| ExecutorError::Backend { backend, source })?;
        // Made at once (while the descriptor table is small), so that its
        // low slots get low numbers.
        let loans = process::ChildLoans::new(shared.max_running.load(Ordering::Relaxed)).map_err(
            |source| ExecutorError::Setup {
                what: "open /dev/null for the children",
                source,
            },
        )?;
        // Before any child shares the table: see `process::presize_fd_table`.
        process::presize_fd_table(
            shared.waker.fd(),
            shared.max_running.load(Ordering::Relaxed),
        );
        // This thread creates every child: see `process::block_all_signals_on_this_thread`.
        process::block_all_signals_on_this_thread().map_err(|source| ExecutorError::Setup {
            what: "block signals on the loop thread",
            source,
        })?;
        // Signals are blocked here: the self-test creates a child.
        let cgroups = containment_pool(&config, &shared);
        // On this thread: the policy and the slice are per thread. Probed
        // now, so that the executor's metrics say from the start whether
        // realtime kills are on.
        let priority = LoopPriority::new(config.realtime_kills);
        shared
            .realtime_kills
            .store(priority.available(), Ordering::Relaxed);
        Ok(Engine {
            backend,
            shared,
            requests,
            loans,
            pre_exec: VecDeque::new(),
            stuck: Vec::new(),
            next_stuck_poll: Instant::now(),
            stuck_warned: None,
            due: Vec::new(),
            popped: Vec::new(),
            checks: Slab::new(),
            by_id: HashMap::new(),
            queue: VecDeque::new(),
            timers: Timers::default(),
            scratch: vec![0u8; SCRATCH].into_boxed_slice(),
            fired: Vec::with_capacity(1024),
            next_generation: 1,
            shutting_down: false,
            reap_orphans: config.reap_orphans,
            next_orphan_scan: Instant::now() + ORPHAN_SCAN,
            scan_siblings: false,
            scan_when_idle: false,
            priority,
            realtime_wanted: config.realtime_kills,
            unrecorded: Vec::new(),
            unrecorded_orphans: 0,
            cgroups,
        })
    }

    fn run(&mut self) {
        if let Err(e) = self.backend.watch(self.shared.waker.fd(), WAKER, true) {
            // Without the waker nothing can reach us: fail loudly.
            panic!("pidring: cannot watch the waker eventfd: {e}");
        }
        loop {
            let now = Instant::now();
            let checks = &self.checks;
            let live = |slot, generation, kind| {
                checks.get(slot).is_some_and(|c: &Lifecycle| {
                    c.generation() == generation && c.wants_timer(kind)
                })
            };
            self.timers.prune(live);
            self.timers.compact(checks.len(), live);
            let wanted = self.shared.realtime_wanted.load(Ordering::Relaxed);
            if wanted != self.realtime_wanted {
                self.realtime_wanted = wanted;
                self.priority.lower();
                self.priority = LoopPriority::new(wanted);
                self.shared
                    .realtime_kills
                    .store(self.priority.available(), Ordering::Relaxed);
            }
            let wake = self.priority.before_wait(self.timers.next(), now);
            let mut timeout = wake.map(|t| t.saturating_duration_since(now));
            if self.scans() {
                let scan = self.next_orphan_scan.saturating_duration_since(now);
                timeout = Some(timeout.map_or(scan, |t| t.min(scan)));
            }
            if self.has_unrecorded() {
                // Results wait to be recorded: soon, without waiting on a reader.
                self.record_results(false);
                if self.has_unrecorded() {
                    timeout = Some(timeout.map_or(LAUNCH_POLL, |t| t.min(LAUNCH_POLL)));
                }
            }
            if !self.stuck.is_empty() {
                let poll = self.next_stuck_poll.saturating_duration_since(now);
                timeout = Some(timeout.map_or(poll, |t| t.min(poll)));
            }
            if !self.queue.is_empty() && !self.may_launch(now) {
                // Admission waits for a child to exec or to let go of its
                // slots, which wakes nothing.
                timeout = Some(timeout.map_or(LAUNCH_POLL, |t| t.min(LAUNCH_POLL)));
            }
            let mut fired = std::mem::take(&mut self.fired);
            let batch = if self.checks.len() >= BATCH_FROM {
                BUSY_BATCH
            } else {
                Batch::NONE
            };
            if let Err(e) = self.backend.wait(&mut fired, timeout, batch) {
                tracing::error!("backend wait failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            let now = Instant::now();
            // Signals first: under a storm of exits and deadlines, a deadline
            // must not wait behind a turn's worth of reaps and reads. A
            // check whose exit is among this turn's events is not signalled
            // (see `Lifecycle::note_exit_pending`).
            let mut exits = 0usize;
            for &token in &fired {
                if token & WATCH_FAILED != 0 {
                    continue;
                }
                if let (slot, generation, Some(Source::Pidfd)) = untoken(token)
                    && let Some(c) = self.checks.get_mut(slot)
                    && c.generation() == generation
                {
                    c.note_exit_pending();
                    exits += 1;
                }
            }
            if exits >= FLUSH_USAGE_FROM
                && let Some(pool) = &self.cgroups
            {
                pool.flush_usage();
            }
            let mut due = std::mem::take(&mut self.due);
            self.fire_signal_timers(now, &mut due);
            for (i, token) in fired.drain(..).enumerate() {
                if token == WAKER {
                    self.on_wake(now);
                } else {
                    self.on_ready(token, now);
                }
                // A long turn of reaps must not hold back deadlines falling due meanwhile.
                if i % SIGNAL_CHECK_EVERY == SIGNAL_CHECK_EVERY - 1 {
                    self.fire_signal_timers(Instant::now(), &mut due);
                }
            }
            self.fired = fired;
            self.poll_launches(now);
            for (slot, generation, kind) in due.drain(..) {
                self.with_check(slot, generation, now, |c, ctx| c.on_timer(kind, ctx));
            }
            self.due = due;
            if self.scans() && now >= self.next_orphan_scan {
                self.scan_orphans();
            }
            self.admit(now);
            if std::mem::take(&mut self.scan_when_idle) && self.checks.is_empty() {
                self.scan_orphans();
            }
            if self.shutting_down
                && self.checks.is_empty()
                && self.shared.outstanding.load(Ordering::SeqCst) == 0
            {
                break;
            }
        }
        self.record_results(true);
        tracing::info!("executor loop stopped");
    }

    /// Fire the due timers that signal (deadlines, grace ends); set the
    /// others aside in `later`, for after this turn's events.
    fn fire_signal_timers(&mut self, now: Instant, later: &mut Vec<(usize, u32, TimerKind)>) {
        // Popped before any fires: a timer put back for now (see
        // `Lifecycle::on_timer`) waits for the next call.
        let mut popped = std::mem::take(&mut self.popped);
        while let Some(timer) = self.timers.pop_due(now) {
            popped.push(timer);
        }
        for (slot, generation, kind) in popped.drain(..) {
            if kind.signals() {
                self.with_check(slot, generation, now, |c, ctx| c.on_timer(kind, ctx));
            } else {
                later.push((slot, generation, kind));
            }
        }
        self.popped = popped;
    }

    /// Let the check in (slot, generation) handle one event with the loop's
    /// context, then put it back or deliver it. Stale tokens do nothing.
    fn with_check(
        &mut self,
        slot: usize,
        generation: u32,
        now: Instant,
        f: impl FnOnce(&mut Lifecycle, &mut EventCtx<'_>),
    ) {
        if let Some(mut check) = self.take_check(slot, generation) {
            let mut ctx = EventCtx {
                backend: &mut self.backend,
                timers: &mut self.timers,
                scratch: &mut self.scratch,
                now,
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
        let (slot, generation, source) = untoken(token);
        let Some(source) = source else { return };
        if token & WATCH_FAILED != 0 {
            self.with_check(slot, generation, now, |c, ctx| {
                c.on_watch_failed(source, ctx)
            });
        } else {
            self.with_check(slot, generation, now, |c, ctx| c.on_ready(source, ctx));
        }
    }

    fn on_wake(&mut self, now: Instant) {
        self.shared.waker.reset();
        if let Err(e) = self.backend.watch(self.shared.waker.fd(), WAKER, false) {
            panic!("pidring: cannot re-watch the waker eventfd: {e}");
        }
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

    /// Catch up with children that had not exec'd yet (see `pre_exec`),
    /// and set aside those that are stuck (see `stuck`).
    fn poll_launches(&mut self, now: Instant) {
        let checks = &mut self.checks;
        let mut still = |slot: usize, generation: u32| match checks.get_mut(slot) {
            Some(c) if c.generation() == generation => c.poll_launch(),
            _ => false,
        };
        self.pre_exec
            .retain(|&(slot, generation, _)| still(slot, generation));
        if !self.stuck.is_empty() && now >= self.next_stuck_poll {
            self.next_stuck_poll = now + STUCK_POLL;
            self.stuck
                .retain(|&(slot, generation)| still(slot, generation));
        }
        let before = self.stuck.len();
        while let Some(&(slot, generation, at)) = self.pre_exec.front()
            && now.saturating_duration_since(at) >= process::STUCK_LAUNCH
        {
            self.pre_exec.pop_front();
            self.stuck.push((slot, generation));
        }
        if self.stuck.len() > before {
            if before == 0 {
                self.next_stuck_poll = now + STUCK_POLL;
            }
            let said = self
                .stuck_warned
                .is_some_and(|t| now < t + STUCK_WARN_EVERY);
            if said {
                return;
            }
            self.stuck_warned = Some(now);
            tracing::warn!(
                new = self.stuck.len() - before,
                stuck = self.stuck.len(),
                "children have not started their program {:?} after they were created (a hung mount in a check's working directory or path?); other checks start meanwhile",
                process::STUCK_LAUNCH
            );
        }
    }

    /// Another child may be created now: few enough are between clone and
    /// exec (stuck ones aside), and a low slot pair is free for its pipes.
    /// With containment, a cgroup leaf must be ready too (the helper
    /// thread makes them; the loop never waits on mkdir).
    fn may_launch(&mut self, now: Instant) -> bool {
        let in_use = self.checks.len();
        self.pre_exec.len() < MAX_PRE_EXEC
            && self.loans.has_slots(now)
            && self
                .cgroups
                .as_mut()
                .is_none_or(|p| p.has_leaf(in_use, now))
    }

    /// Move queued checks into free running slots, oldest first.
    fn admit(&mut self, now: Instant) {
        let max_running = self.shared.max_running.load(Ordering::Relaxed);
        if let Some(pool) = self.cgroups.as_mut() {
            pool.set_max_running(max_running);
        }
        while self.checks.len() < max_running && self.may_launch(now) {
            let Some(sub) = self.queue.pop_front() else {
                break;
            };
            let Submission {
                id,
                limits,
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
                &limits,
                deliver,
                submitted,
                submitted_wall,
                now,
            ));
            self.by_id.insert(id, slot);
            let picked = Instant::now();
            let mut leaf = self.cgroups.as_mut().and_then(|p| p.take());
            let entry = self.cgroups.as_ref().map(|p| p.entry());
            // Caps go into the (empty) leaf before the child is created in it.
            let capped = match (&mut leaf, limits.caps.is_empty()) {
                (Some(leaf), false) => leaf.apply(&limits.caps),
                _ => Ok(()),
            };
            let launched = match capped {
                Ok(()) => process::launch(prepared, &self.loans, leaf.as_ref().zip(entry)),
                Err(message) => Err(process::SpawnFailure {
                    errno: None,
                    message: format!("{message} for {}", prepared.program()),
                }),
            };
            match launched {
                Ok((child, launch)) => {
                    self.pre_exec.push_back((slot, generation, picked));
                    self.with_check(slot, generation, now, |c, ctx| {
                        c.started(child, Some(launch), leaf, picked, ctx)
                    });
                }
                Err(failure) => {
                    if let (Some(leaf), Some(pool)) = (leaf, self.cgroups.as_mut()) {
                        pool.give_back(leaf);
                    }
                    let mut c = self.checks.remove(slot);
                    self.by_id.remove(&id);
                    tracing::debug!(id, "spawn failed: {}", failure.message);
                    c.spawn_failed(failure, picked);
                    self.finish(c);
                }
            }
        }
        self.shared
            .running
            .store(self.checks.len(), Ordering::Relaxed);
    }

    fn cancel(&mut self, id: u64, now: Instant) {
        if let Some(&slot) = self.by_id.get(&id) {
            let generation = self.checks[slot].generation();
            self.with_check(slot, generation, now, |c, ctx| {
                c.kill_now(KillReason::Cancel, ctx)
            });
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
            self.with_check(slot, generation, now, |c, ctx| {
                c.kill_now(KillReason::Shutdown, ctx)
            });
        }
    }

    fn finish(&mut self, check: Lifecycle) {
        // Stamp delivery at the moment it happens, not at the turn's start.
        let (result, deliver, leaf) = check.finish(Instant::now());
        if let (Some(leaf), Some(pool)) = (leaf, self.cgroups.as_mut()) {
            pool.give_back(leaf);
        }
        self.deliver(result, deliver);
        self.shared
            .running
            .store(self.checks.len(), Ordering::Relaxed);
        // The last check may have left a sibling: scan once more, at the
        // end of this turn (see `scans`).
        self.scan_when_idle |= self.checks.is_empty() && !self.reap_orphans;
    }

    /// Hand one result to its callback (a panicking callback cannot kill the loop).
    fn deliver(&mut self, result: CheckResult, deliver: Deliver) {
        self.unrecorded.push(ResultSummary::of(&result));
        self.record_results(false);
        if std::panic::catch_unwind(AssertUnwindSafe(move || deliver(result))).is_err() {
            tracing::error!("a result callback panicked");
        }
        self.shared.outstanding.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether results or orphan counts wait to be recorded.
    fn has_unrecorded(&self) -> bool {
        !self.unrecorded.is_empty() || self.unrecorded_orphans > 0
    }

    /// Record the results delivered and orphans reaped so far in the shared
    /// metrics. Unless `wait`, only if nobody holds them: the loop never
    /// blocks (invariant 4), not even on a reader building a snapshot
    /// (`stats`); the next turn tries again (see `run`).
    fn record_results(&mut self, wait: bool) {
        let metrics = if wait {
            self.shared.metrics.lock().ok()
        } else {
            self.shared.metrics.try_lock().ok()
        };
        if let Some(mut m) = metrics {
            for s in self.unrecorded.drain(..) {
                m.record_summary(&s);
            }
            m.counters.orphans_reaped += std::mem::take(&mut self.unrecorded_orphans);
        }
    }

    /// Whether the orphan scan is due to run: always in subreaper mode;
    /// else while checks run (any may make a sibling of its leader with
    /// `clone(CLONE_PARENT)`: a child of this thread, which nobody else
    /// reaps) and while one is left (see `scan_siblings`); once more as the
    /// last check ends (`scan_when_idle`). An idle executor without
    /// siblings does not wake for it.
    fn scans(&self) -> bool {
        self.reap_orphans || !self.checks.is_empty() || self.scan_siblings
    }

    /// Reap descendants that escaped their check and were re-parented to
    /// us (subreaper mode), and siblings of check leaders (any mode: the
    /// loop thread's children that are no leader).
    fn scan_orphans(&mut self) {
        self.next_orphan_scan = Instant::now() + ORPHAN_SCAN;
        // Children are created on this thread, and each is in the slab (with
        // its pidfd) from the moment `clone` returned: none can be mistaken
        // for an orphan.
        let ours: HashSet<i32> = self
            .checks
            .iter()
            .filter_map(|(_, c)| c.unreaped_pid())
            .map(|p| p.as_raw_nonzero().get())
            .collect();
        let adopters = if self.reap_orphans {
            Adopters::MainAndLoopThread
        } else {
            Adopters::LoopThread
        };
        let (reaped, alive) = reap_exited_orphans(&ours, adopters);
        self.scan_siblings = !alive.is_empty();
        self.count_orphans(reaped);
    }

    fn count_orphans(&mut self, reaped: u64) {
        if reaped > 0 {
            tracing::info!(reaped, "reaped orphaned descendants of checks");
            self.unrecorded_orphans += reaped;
            self.record_results(false);
        }
    }

    /// At the end of a shutdown: every check is reaped, so every child left
    /// is an adopted descendant (subreaper mode: escaped, or killed with its
    /// group and not yet collected) or a leader's `CLONE_PARENT` sibling (a
    /// child of this thread, in any mode). SIGKILL the live ones through a
    /// pidfd and reap them all, for a bounded time, so nothing outlives the
    /// executor, nor becomes a zombie nobody reaps.
    fn final_orphan_sweep(&mut self, reap_orphans: bool) {
        let adopters = if reap_orphans {
            Adopters::AllThreads
        } else {
            Adopters::LoopThread
        };
        const BOUND: Duration = Duration::from_secs(5);
        let end = Instant::now() + BOUND;
        let mut signalled = HashSet::new();
        let mut total = 0;
        loop {
            let (reaped, alive) = reap_exited_orphans(&HashSet::new(), adopters);
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
                    let _ = process::signal_leader(
                        rustix::fd::AsFd::as_fd(&fd),
                        rustix::process::Signal::KILL,
                    );
                }
            }
            if Instant::now() >= end {
                tracing::error!(left = ?children_of_self(adopters), "descendants still alive {BOUND:?} after SIGKILL (uninterruptible sleep?)");
                break;
            }
            // The loop serves nobody any more: a short sleep is the wait.
            std::thread::sleep(Duration::from_millis(2));
        }
        self.count_orphans(total);
        self.record_results(true);
    }
}

/// Reap every exited child of `adopters` that is not in `ours` (check
/// leaders, which are reaped only through their pidfds). Returns how many
/// were reaped and the children still alive.
fn reap_exited_orphans(ours: &HashSet<i32>, adopters: Adopters) -> (u64, Vec<Pid>) {
    let mut reaped = 0;
    let mut alive = Vec::new();
    for pid in children_of_self(adopters) {
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

/// Whose children to list.
#[derive(Clone, Copy)]
enum Adopters {
    /// The main thread's and the loop thread's. The kernel gives a
    /// subreaper's orphans to the first live thread of the process, which
    /// is the main thread while it lives; and a plugin's `clone(CLONE_PARENT)`
    /// makes a sibling of its leader, a child of the loop thread (the
    /// thread that created the leader). Two files to read, however many
    /// threads the process has (the daemon has two per connection: reading
    /// every thread's list made the periodic scan cost the loop ~70 ms at
    /// 3,000 connections). Called on the loop thread.
    MainAndLoopThread,
    /// The loop thread's alone (outside subreaper mode: only leaders and
    /// their `CLONE_PARENT` siblings are, never another part of the
    /// process's children). Called on the loop thread.
    LoopThread,
    /// Every thread's (the final sweep, once: nothing may be missed).
    AllThreads,
}

/// Children of this process, from /proc (children belong to the thread
/// that created or adopted them).
fn children_of_self(adopters: Adopters) -> Vec<i32> {
    match adopters {
        Adopters::MainAndLoopThread => {
            let me = std::process::id();
            let mut pids = process::children_listed(format!("/proc/self/task/{me}/children"));
            pids.extend(process::children_listed("/proc/thread-self/children"));
            pids
        }
        Adopters::LoopThread => process::children_listed("/proc/thread-self/children"),
        Adopters::AllThreads => std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|task| process::children_listed(task.path().join("children")))
            .collect(),
    }
}

/// The result of a check that never got a child (see `lifecycle::unstarted_result`).
pub(crate) fn unstarted_result(sub: &Submission, outcome: Outcome, reason: &str) -> CheckResult {
    lifecycle::unstarted_result(
        &sub.limits,
        sub.id,
        sub.submitted,
        sub.submitted_wall,
        outcome,
        reason,
    )
}
