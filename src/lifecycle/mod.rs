//! A check's life, in one place: the per-check state machine.
//!
//! ```text
//! Spawning ──child──▶ Running ──deadline──▶ Terminating ──grace──▶ Killing
//!     │                  │                       │                    │
//!  failed                └──── leader exited (pidfd readable) ────────┘
//!     │                                      │
//!     │                   sweep group if needed (SIGKILL -pgid), then
//!     │                   reap: waitid(P_PIDFD, WEXITED | WNOHANG)
//!     │                                      │
//!     │                  Draining (output still open, bounded by `drain`)
//!     │                                      │
//!     └─────────────────────────────────▶  Done ──▶ one CheckResult
//! ```
//!
//! The invariants this file keeps (see docs/DESIGN.md):
//! - the leader is signalled only through its pidfd, and the group only while
//!   `pidfd` is `Some` — i.e. the leader is unreaped and pins the group id;
//! - the reap is never skipped: a signal's result never decides anything;
//! - the group is swept before the reap after a timeout, cancel or shutdown
//!   (and after a normal exit when `kill_group_on_exit`);
//! - descendants outside the group, found by walking the live leader's
//!   descendants before a kill's first signal, are signalled only through
//!   their own pidfds, and only until the leader is reaped;
//! - deadlines come from the timer alone, never from output or EOF.

mod verdict;

pub(crate) use verdict::unstarted_result;

use crate::backend::Backend;
use crate::cgroup::Leaf;
use crate::check::Limits;
use crate::nagios_state::State;
use crate::process::{self, Child, PreExecChild, Reap, SpawnFailure};
use crate::result::{CheckResult, ExitStatus, Outcome, Output, Rusage, Timings, signal_name};
use crate::shared::Deliver;
use crate::token::{Source, token};
use rustix::fd::{AsFd, OwnedFd};
use rustix::io::Errno;
use rustix::process::{Pid, Signal};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant, SystemTime};

/// Most descendants one check's kill walks through (see `find_descendants`):
/// each costs the loop ~30 µs of `/proc` before the first signal.
const WALK_LIMIT: usize = 16;
/// Most descendants outside its group one check's kill keeps (as pidfds,
/// held until the reap: beyond the 3 per check the descriptor table is
/// sized for) and signals.
const MAX_DESCENDANTS: usize = 4;

/// What a result says of a check whose signals were refused (EPERM).
const REFUSED: &str = "it could not be signalled (not permitted: it runs as another user, \
                       as through sudo or a setuid program)";

/// How often what could not be watched is polled instead.
const RETRY_POLL: Duration = Duration::from_millis(10);

/// Warn that `what` failed and its fd is polled instead, once per check
/// (`said`): the poll retries every `RETRY_POLL`, and each retry may fail
/// again.
fn say_polling(said: &mut bool, id: u64, what: &str, e: &dyn std::fmt::Display) {
    if !std::mem::replace(said, true) {
        tracing::warn!(id, "{what}: {e}; polling instead");
    }
}

/// What a timer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TimerKind {
    /// The timeout: send SIGTERM.
    Deadline,
    /// Grace over: send SIGKILL.
    Grace,
    /// Drain bound over: cut the output.
    Drain,
    /// A watch could not be armed: look at every fd again.
    Retry,
}

impl TimerKind {
    /// Whether firing it signals the check (handled before a turn's events).
    pub fn signals(self) -> bool {
        matches!(self, TimerKind::Deadline | TimerKind::Grace)
    }
}

/// The loop's timers: a min-heap; stale entries are ignored when they fire.
#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize, u32, TimerKind)>>,
}

impl Timers {
    /// Fire `kind` for (slot, generation) at `at`.
    pub fn push(&mut self, at: Instant, slot: usize, generation: u32, kind: TimerKind) {
        self.heap.push(Reverse((at, slot, generation, kind)));
    }

    /// The earliest pending time.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, ..))| *at)
    }

    /// Drop stale timers off the top until the earliest is one that `live`
    /// accepts: the loop then never wakes for a check that is gone or has
    /// moved on (every check that ends before its timeout leaves its
    /// deadline here).
    pub fn prune(&mut self, mut live: impl FnMut(usize, u32, TimerKind) -> bool) {
        while let Some(Reverse((_, slot, generation, kind))) = self.heap.peek() {
            if live(*slot, *generation, *kind) {
                return;
            }
            self.heap.pop();
        }
    }

    /// Keep only the timers `live` accepts, when stale ones outnumber
    /// `live_checks` by far: those behind a live one on top are not pruned
    /// until they reach the top (a timeout later; timeouts may be long), and
    /// under churn they would pile up. Linear, at most once per `SLACK` pushes.
    pub fn compact(
        &mut self,
        live_checks: usize,
        mut live: impl FnMut(usize, u32, TimerKind) -> bool,
    ) {
        const SLACK: usize = 4096;
        if self.heap.len() <= live_checks.saturating_mul(4) + SLACK {
            return;
        }
        self.heap
            .retain(|Reverse((_, slot, generation, kind))| live(*slot, *generation, *kind));
    }

    /// Pop one timer due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(usize, u32, TimerKind)> {
        match self.heap.peek() {
            Some(Reverse((at, ..))) if *at <= now => {
                self.heap.pop().map(|Reverse((_, s, g, k))| (s, g, k))
            }
            _ => None,
        }
    }
}

/// What the loop lends a check while it handles one event.
pub(crate) struct EventCtx<'a> {
    /// The backend, to (re-)arm and cancel watches.
    pub backend: &'a mut Backend,
    /// The loop's timers.
    pub timers: &'a mut Timers,
    /// One shared read buffer (no check owns a buffer while idle).
    pub scratch: &'a mut [u8],
    /// The time this loop turn started.
    pub now: Instant,
}

impl EventCtx<'_> {
    /// Poll check (`slot`, `generation`) in `RETRY_POLL`: for what could
    /// not be watched, or a `waitid` that failed.
    fn poll_soon(&mut self, slot: usize, generation: u32) {
        self.timers
            .push(self.now + RETRY_POLL, slot, generation, TimerKind::Retry);
    }
}

/// Why the executor signalled a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KillReason {
    /// The deadline passed.
    Timeout,
    /// `Executor::cancel`.
    Cancel,
    /// The executor is shutting down.
    Shutdown,
}

/// Where a check is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Admitted; no child created yet.
    Spawning,
    /// The child runs; its deadline is pending.
    Running,
    /// SIGTERM sent; SIGKILL at the end of the grace.
    Terminating,
    /// SIGKILL sent; waiting for the leader's exit.
    Killing,
    /// Leader reaped; output still open, read until EOF or the drain bound.
    Draining,
    /// Ready to be turned into a result.
    Done,
}

/// One output pipe and what was read from it.
#[derive(Default)]
struct Stream {
    fd: Option<OwnedFd>,
    armed: bool,
    out: Output,
}

/// Most reads per readiness event on one pipe, so a flooding plugin cannot
/// starve the others (the watch is re-armed and fires again next turn).
const READS_PER_EVENT: usize = 4;

/// One check, from dispatch to result.
pub(crate) struct Lifecycle {
    id: u64,
    slot: usize,
    generation: u32,
    tag: Option<String>,
    deliver: Option<Deliver>,
    timeout: Duration,
    grace: Duration,
    drain: Duration,
    output_cap: usize,
    kill_group_on_exit: bool,
    timeout_state: State,
    submitted: Instant,
    submitted_wall: SystemTime,
    /// When the loop admitted it (queue wait ends, spawn begins).
    dispatched: Instant,
    phase: Phase,
    pid: Option<Pid>,
    /// `Some` exactly while the leader is unreaped.
    pidfd: Option<OwnedFd>,
    pidfd_armed: bool,
    /// A signal to the leader was refused (EPERM: it runs as another user,
    /// as through sudo or a setuid program that became root).
    refused: bool,
    /// Said (once) that a watch failed and its fd is polled instead: the
    /// poll retries every 10 ms, and would otherwise say it every time.
    said_polling: bool,
    /// Descendants found while the check was being killed (see
    /// `signal_descendants`), as pidfds; closed at the reap.
    descendants: Vec<process::Descendant>,
    started: Option<Instant>,
    deadline: Option<Instant>,
    stdout: Stream,
    stderr: Stream,
    kill: Option<KillReason>,
    last_signal: Option<Signal>,
    escalated: bool,
    first_signal_at: Option<Instant>,
    exited_at: Option<Instant>,
    reaped_at: Option<Instant>,
    exit: Option<ExitStatus>,
    rusage: Option<Rusage>,
    spawn_failure: Option<SpawnFailure>,
    output_cut: bool,
    /// The pidfd fired in this turn and is not handled yet (see `note_exit_pending`).
    exit_pending: bool,
    /// Timed out before its child exec'd: where the child was stuck (see
    /// `process::PreExecChild::stuck`).
    never_started: Option<String>,
    /// The check's cgroup leaf (containment on); every process it starts
    /// is in it, and dies by its `cgroup.kill`.
    leaf: Option<Leaf>,
    /// A watch on the leaf's `cgroup.events` is pending.
    leaf_armed: bool,
    /// The leaf was killed: the result waits until it is empty (bounded
    /// by the drain).
    leaf_wait: bool,
    /// Processes in the leaf when the leader exited.
    escapees: u32,
    /// The child while it may not have exec'd yet (see `process::PreExecChild`).
    /// Declared last: it must drop after `Drop` has killed and reaped the child.
    launch: Option<PreExecChild>,
}

impl Lifecycle {
    /// A check just admitted.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        slot: usize,
        generation: u32,
        limits: &Limits,
        deliver: Deliver,
        submitted: Instant,
        submitted_wall: SystemTime,
        now: Instant,
    ) -> Lifecycle {
        Lifecycle {
            id,
            slot,
            generation,
            tag: limits.tag.clone(),
            deliver: Some(deliver),
            timeout: limits.timeout,
            grace: limits.grace,
            drain: limits.drain,
            output_cap: limits.output_cap,
            kill_group_on_exit: limits.kill_group_on_exit,
            timeout_state: limits.timeout_state,
            submitted,
            submitted_wall,
            dispatched: now,
            phase: Phase::Spawning,
            pid: None,
            pidfd: None,
            pidfd_armed: false,
            said_polling: false,
            refused: false,
            descendants: Vec::new(),
            started: None,
            deadline: None,
            stdout: Stream::default(),
            stderr: Stream::default(),
            kill: None,
            last_signal: None,
            escalated: false,
            first_signal_at: None,
            exited_at: None,
            reaped_at: None,
            exit: None,
            rusage: None,
            spawn_failure: None,
            output_cut: false,
            exit_pending: false,
            never_started: None,
            leaf: None,
            leaf_armed: false,
            leaf_wait: false,
            escapees: 0,
            launch: None,
        }
    }

    /// The executor's id of this check.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The slot generation.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The leader's pid while it is unreaped (for the orphan scan).
    pub fn unreaped_pid(&self) -> Option<Pid> {
        self.pidfd.as_ref().and(self.pid)
    }

    /// Whether the result can be built.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The child exists: watch it and start the clock. `launch` holds what
    /// the child uses until it has exec'd.
    pub fn started(
        &mut self,
        child: Child,
        launch: Option<PreExecChild>,
        leaf: Option<Leaf>,
        picked: Instant,
        ctx: &mut EventCtx<'_>,
    ) {
        self.dispatched = picked;
        self.leaf = leaf;
        self.launch = launch;
        self.pid = Some(child.pid);
        self.started = Some(child.started);
        let deadline = child.started + self.timeout;
        self.deadline = Some(deadline);
        self.pidfd = Some(child.pidfd);
        self.stdout.fd = Some(child.stdout);
        self.stderr.fd = Some(child.stderr);
        self.phase = Phase::Running;
        ctx.timers
            .push(deadline, self.slot, self.generation, TimerKind::Deadline);
        self.watch_all(ctx, true);
        if let Some(reason) = self.kill {
            // Cancelled or shut down while it was being spawned.
            self.kill = None;
            self.kill_now(reason);
        }
    }

    /// The child could not be created.
    pub fn spawn_failed(&mut self, failure: SpawnFailure, picked: Instant) {
        self.dispatched = picked;
        self.spawn_failure = Some(failure);
        self.phase = Phase::Done;
    }

    /// Catch up with a child that had not exec'd yet. True while it still
    /// has not (the loop asks again next turn).
    pub fn poll_launch(&mut self) -> bool {
        let Some(launch) = self.launch.as_mut() else {
            return false;
        };
        match launch.poll() {
            None => true,
            Some(Ok(())) => {
                self.launch = None;
                false
            }
            Some(Err(failure)) => {
                // It is exiting (127); reaped when its pidfd says so.
                self.launch = None;
                self.exec_failed(failure);
                false
            }
        }
    }

    /// The child never became the check (a step before `execve` failed):
    /// the result is that failure, not the child's exit 127.
    fn exec_failed(&mut self, failure: SpawnFailure) {
        tracing::debug!(id = self.id, "spawn failed: {}", failure.message);
        self.spawn_failure = Some(failure);
    }

    /// Whether the child has its own process group yet (before that, it has
    /// no descendants, and only its pidfd is signalled).
    fn grouped(&self) -> bool {
        self.launch.as_ref().is_none_or(PreExecChild::grouped)
    }

    /// Arm every open, unarmed fd (after start, or to recover from a failed arm).
    fn watch_all(&mut self, ctx: &mut EventCtx<'_>, first: bool) {
        let mut failed = false;
        if let (Some(fd), false) = (&self.pidfd, self.pidfd_armed) {
            match ctx.backend.watch(
                fd.as_fd(),
                token(self.slot, self.generation, Source::Pidfd),
                first,
            ) {
                Ok(()) => self.pidfd_armed = true,
                Err(e) => {
                    failed = true;
                    say_polling(&mut self.said_polling, self.id, "cannot watch pidfd", &e);
                }
            }
        }
        for (source, stream) in [
            (Source::Stdout, &mut self.stdout),
            (Source::Stderr, &mut self.stderr),
        ] {
            if let (Some(fd), false) = (&stream.fd, stream.armed) {
                match ctx.backend.watch(
                    fd.as_fd(),
                    token(self.slot, self.generation, source),
                    first,
                ) {
                    Ok(()) => stream.armed = true,
                    Err(e) => {
                        failed = true;
                        say_polling(
                            &mut self.said_polling,
                            self.id,
                            "cannot watch output pipe",
                            &e,
                        );
                    }
                }
            }
        }
        if failed {
            ctx.poll_soon(self.slot, self.generation);
        }
    }

    /// The backend could not arm a watch on `source` (io_uring reported an
    /// error for it): poll it instead, as when arming fails at once.
    pub fn on_watch_failed(&mut self, source: Source, ctx: &mut EventCtx<'_>) {
        match source {
            Source::Pidfd => self.pidfd_armed = false,
            Source::Stdout => self.stdout.armed = false,
            Source::Stderr => self.stderr.armed = false,
            Source::Cgroup => self.leaf_armed = false,
        }
        say_polling(
            &mut self.said_polling,
            self.id,
            "an io_uring poll failed",
            &format_args!("{source:?}"),
        );
        ctx.poll_soon(self.slot, self.generation);
    }

    /// A watched fd fired.
    pub fn on_ready(&mut self, source: Source, ctx: &mut EventCtx<'_>) {
        match source {
            Source::Pidfd => {
                self.pidfd_armed = false;
                self.leader_ready(ctx);
            }
            Source::Stdout | Source::Stderr => self.read_stream(source, ctx),
            Source::Cgroup => {
                self.leaf_armed = false;
                self.watch_leaf(ctx);
                self.maybe_done();
            }
        }
    }

    /// Draining, and nothing left to wait for (output closed, leaf empty): done.
    fn maybe_done(&mut self) {
        if self.phase == Phase::Draining
            && self.stdout.fd.is_none()
            && self.stderr.fd.is_none()
            && !self.leaf_wait
        {
            self.phase = Phase::Done;
        }
    }

    /// While the killed leaf is not empty, watch its `cgroup.events`
    /// (a read first: the change notification comes 10–20 ms late, the
    /// kernel rate-limits them, and a read that says empty is the answer).
    fn watch_leaf(&mut self, ctx: &mut EventCtx<'_>) {
        let Some(leaf) = &self.leaf else {
            self.leaf_wait = false;
            return;
        };
        if !self.leaf_wait || self.leaf_armed {
            return;
        }
        if !leaf.populated() {
            self.leaf_wait = false;
            return;
        }
        let t = token(self.slot, self.generation, Source::Cgroup);
        match ctx.backend.watch_pri(leaf.events(), t, true) {
            Ok(()) => self.leaf_armed = true,
            Err(e) => {
                say_polling(
                    &mut self.said_polling,
                    self.id,
                    "cannot watch cgroup.events",
                    &e,
                );
                ctx.poll_soon(self.slot, self.generation);
            }
        }
    }

    /// The leader is reaped: wait for what is still open (output) or alive
    /// (a killed leaf's processes), bounded by the drain; else done.
    fn after_reap(&mut self, ctx: &mut EventCtx<'_>) {
        self.leaf_wait = self.leaf.as_ref().is_some_and(Leaf::killed);
        self.watch_leaf(ctx);
        if self.stdout.fd.is_some() || self.stderr.fd.is_some() || self.leaf_wait {
            self.phase = Phase::Draining;
            ctx.timers.push(
                ctx.now + self.drain,
                self.slot,
                self.generation,
                TimerKind::Drain,
            );
        } else {
            self.phase = Phase::Done;
        }
    }

    /// Send `sig` to the leader (pidfd), its group, and descendants that
    /// left the group. Only while unreaped.
    fn signal(&mut self, sig: Signal) {
        // The walk first: once signalled, the leader may be gone within
        // microseconds, and its children re-parented out of reach. Not in
        // a cgroup leaf: its kill reaches every process, wherever it went.
        if self.leaf.is_none() {
            self.find_descendants();
        }
        self.signal_leader(sig);
        self.signal_group(sig);
        self.signal_descendants(sig);
        if sig == Signal::KILL
            && self.pidfd.is_some()
            && let Some(leaf) = &mut self.leaf
            && !leaf.killed()
        {
            // Who is there besides the (live, unreaped) leader.
            self.escapees = leaf.count_procs().saturating_sub(1);
            leaf.kill();
        }
    }

    /// Find the leader's descendants outside its group (while the leader
    /// lives, its descendants can be walked through `/proc`; once it is
    /// signalled it may be gone within microseconds, its children
    /// re-parented out of reach) and keep them as pidfds: each signal
    /// reaches them through those (`signal_descendants`), and so does the
    /// SIGKILL before the reap, even once the leader is gone. Only on the
    /// way to killing a check (timeout, cancel, shutdown): a check that ends
    /// by itself may leave a service it started.
    fn find_descendants(&mut self) {
        // Only while the leader is unreaped (`pidfd` is `Some`): its pid is ours.
        let (Some(_), Some(pid), true) = (&self.pidfd, self.pid, self.grouped()) else {
            return;
        };
        let mut found = process::descendants_outside_group(pid, WALK_LIMIT, MAX_DESCENDANTS);
        // Keep those an earlier walk found and this one did not (re-parented
        // away from the leader's tree since).
        for old in self.descendants.drain(..) {
            if found.len() < MAX_DESCENDANTS && !found.iter().any(|d| d.pid == old.pid) {
                found.push(old);
            }
        }
        self.descendants = found;
    }

    /// Send `sig` to the descendants found outside the group (see `find_descendants`).
    fn signal_descendants(&mut self, sig: Signal) {
        for d in &self.descendants {
            tracing::debug!(
                id = self.id,
                pid = d.pid.as_raw_nonzero().get(),
                ?sig,
                "signalling a descendant outside the check's group"
            );
            let _ = process::signal_leader(d.pidfd.as_fd(), sig);
        }
    }

    /// Send `sig` to the leader, through its pidfd. Only while unreaped.
    fn signal_leader(&mut self, sig: Signal) {
        let Some(pidfd) = &self.pidfd else {
            return; // Reaped: nothing of this check is ever signalled again.
        };
        if self.first_signal_at.is_none() {
            self.first_signal_at = Some(Instant::now());
        }
        self.last_signal = Some(sig);
        if let Err(e) = process::signal_leader(pidfd.as_fd(), sig) {
            if e == Errno::PERM && !self.refused {
                tracing::warn!(
                    id = self.id,
                    "not permitted to signal the check ({sig:?}): it runs as another user \
                     (sudo, or a setuid program that became root); it ends only by itself"
                );
            } else if e != Errno::PERM {
                tracing::warn!(id = self.id, "pidfd_send_signal({sig:?}) failed: {e}");
            }
            self.refused |= e == Errno::PERM;
        }
    }

    /// Send `sig` to the leader's group: only while the leader is unreaped
    /// (it pins the group id) and once the group exists.
    fn signal_group(&mut self, sig: Signal) {
        let (Some(_), Some(pid), true) = (&self.pidfd, self.pid, self.grouped()) else {
            return;
        };
        if let Err(e) = process::signal_group_of_unreaped_leader(pid, sig) {
            tracing::warn!(id = self.id, "kill(-pgid, {sig:?}) failed: {e}");
        }
    }

    /// The leader's pidfd fired in this turn; the event is handled after the
    /// turn's signalling timers. Those leave this check alone for now: it
    /// exited before the loop got to its deadline, so it did not time out
    /// (and a SIGTERM that beat the grace is not "ignored").
    pub fn note_exit_pending(&mut self) {
        self.exit_pending = true;
    }

    /// Whether a timer of `kind` would still do something (see `on_timer`).
    pub fn wants_timer(&self, kind: TimerKind) -> bool {
        match kind {
            TimerKind::Deadline => self.phase == Phase::Running,
            TimerKind::Grace => self.phase == Phase::Terminating,
            TimerKind::Drain => self.phase == Phase::Draining,
            TimerKind::Retry => self.phase != Phase::Done,
        }
    }

    /// A timer of this check fired.
    pub fn on_timer(&mut self, kind: TimerKind, ctx: &mut EventCtx<'_>) {
        if self.exit_pending && kind.signals() {
            // Looked at again next turn, after the exit (if it was one).
            ctx.timers.push(ctx.now, self.slot, self.generation, kind);
            return;
        }
        if !self.wants_timer(kind) {
            return; // Stale: the phase moved on.
        }
        match kind {
            TimerKind::Deadline => {
                self.kill = Some(KillReason::Timeout);
                self.poll_launch();
                self.never_started = self.launch.as_ref().and_then(PreExecChild::stuck);
                if let Some(stuck) = &self.never_started {
                    // Still in our code, every signal blocked: SIGTERM could
                    // only wait out the grace, and there is no plugin yet
                    // to clean up (nor any descendant). SIGKILL ends it as
                    // soon as the kernel lets it (a lookup on a hung mount
                    // may hold it longer, even so).
                    tracing::debug!(
                        id = self.id,
                        "timed out before it could start ({stuck}); sending SIGKILL"
                    );
                    self.phase = Phase::Killing;
                    self.signal(Signal::KILL);
                    return;
                }
                self.phase = Phase::Terminating;
                tracing::debug!(id = self.id, "timed out; sending SIGTERM");
                self.signal(Signal::TERM);
                // A stopped process would hold SIGTERM pending until the grace ran out.
                self.signal_group(Signal::CONT);
                let deadline = self.deadline.unwrap_or(ctx.now);
                ctx.timers.push(
                    (deadline + self.grace).max(ctx.now),
                    self.slot,
                    self.generation,
                    TimerKind::Grace,
                );
            }
            TimerKind::Grace => {
                tracing::debug!(id = self.id, "ignored SIGTERM; sending SIGKILL");
                self.escalated = true;
                self.phase = Phase::Killing;
                self.signal(Signal::KILL);
            }
            TimerKind::Drain => {
                self.output_cut = true;
                for (source, stream) in [
                    (Source::Stdout, &mut self.stdout),
                    (Source::Stderr, &mut self.stderr),
                ] {
                    if let Some(fd) = stream.fd.take()
                        && stream.armed
                    {
                        ctx.backend
                            .unwatch(fd.as_fd(), token(self.slot, self.generation, source));
                    }
                }
                if let (Some(leaf), true) = (&self.leaf, self.leaf_armed) {
                    let t = token(self.slot, self.generation, Source::Cgroup);
                    ctx.backend.unwatch(leaf.events(), t);
                    self.leaf_armed = false;
                }
                self.phase = Phase::Done;
            }
            TimerKind::Retry => {
                // Polling for what could not be watched: the leader is
                // swept and reaped only once it has exited (a live one's
                // group must never be killed), else watched again (and
                // polled again if that fails once more).
                if let (Some(pidfd), false) = (&self.pidfd, self.pidfd_armed) {
                    match process::has_exited(pidfd.as_fd()) {
                        Ok(false) => self.watch_all(ctx, false),
                        // Exited, or waitid says why not: the reap says it too.
                        Ok(true) | Err(_) => self.leader_ready(ctx),
                    }
                }
                for source in [Source::Stdout, Source::Stderr] {
                    let stream = if source == Source::Stdout {
                        &self.stdout
                    } else {
                        &self.stderr
                    };
                    if stream.fd.is_some() && !stream.armed {
                        self.read_stream(source, ctx);
                    }
                }
                if self.leaf_wait && !self.leaf_armed {
                    self.watch_leaf(ctx);
                    self.maybe_done();
                }
            }
        }
    }

    /// Kill now (cancel or shutdown): SIGKILL leader and group.
    pub fn kill_now(&mut self, reason: KillReason) {
        match self.phase {
            Phase::Spawning => self.kill = Some(reason),
            Phase::Running | Phase::Terminating => {
                // A check already timing out stays "timed out".
                if self.kill.is_none() {
                    self.kill = Some(reason);
                }
                self.phase = Phase::Killing;
                self.signal(Signal::KILL);
            }
            Phase::Killing | Phase::Draining | Phase::Done => {}
        }
    }

    /// The pidfd is readable: the leader has exited. Sweep, then reap.
    fn leader_ready(&mut self, ctx: &mut EventCtx<'_>) {
        self.exit_pending = false;
        self.poll_launch();
        let grouped = self.grouped();
        let (Some(pidfd), Some(pid)) = (&self.pidfd, self.pid) else {
            return;
        };
        if self.exited_at.is_none() {
            self.exited_at = Some(ctx.now);
        }
        // Sweep before reap: the zombie leader still pins the group id.
        if grouped && (self.kill.is_some() || self.kill_group_on_exit) {
            let _ = process::signal_group_of_unreaped_leader(pid, Signal::KILL);
        }
        // And the descendants found outside the group while killing it (the
        // leader may have died of SIGTERM, leaving them SIGTERM only).
        for d in self.descendants.drain(..) {
            let _ = process::signal_leader(d.pidfd.as_fd(), Signal::KILL);
        }
        // And everything in the leaf (one pread when it holds only the
        // zombie leader): what is still there outlived the leader.
        if let Some(leaf) = &mut self.leaf
            && !leaf.killed()
            && leaf.populated()
        {
            self.escapees = leaf.count_procs();
            if self.kill.is_some() || self.kill_group_on_exit {
                leaf.kill();
            } else {
                leaf.leave_running();
                tracing::debug!(
                    id = self.id,
                    escapees = self.escapees,
                    "processes outlive the check; left running (kill_group_on_exit off)"
                );
            }
        }
        match process::reap(pidfd.as_fd()) {
            Ok(Reap::Reaped(status, rusage)) => {
                self.exit = Some(status);
                self.rusage = Some(rusage);
                self.reaped_at = Some(Instant::now());
                self.pidfd = None; // closes it; its oneshot watch already fired
                if let Some(mut launch) = self.launch.take()
                    && let Err(failure) = launch.reaped()
                {
                    self.exec_failed(failure);
                }
                self.after_reap(ctx);
            }
            Ok(Reap::NotYet) => {
                // Woken early: not exited after all. Watch again.
                self.exited_at = None;
                self.watch_all(ctx, false);
            }
            Err(Errno::CHILD) => {
                // Someone reaped our child behind our back (a foreign
                // waitpid(-1) in this process). Nothing left to signal.
                tracing::error!(
                    id = self.id,
                    "child was reaped by someone else; exit status lost"
                );
                self.pidfd = None;
                self.reaped_at = Some(Instant::now());
                self.after_reap(ctx);
            }
            Err(e) => {
                tracing::warn!(id = self.id, "waitid failed: {e}; retrying");
                ctx.poll_soon(self.slot, self.generation);
            }
        }
    }

    /// A pipe is readable (or hung up): read what is there into the capped buffer.
    fn read_stream(&mut self, source: Source, ctx: &mut EventCtx<'_>) {
        let cap = self.output_cap;
        let stream = if source == Source::Stdout {
            &mut self.stdout
        } else {
            &mut self.stderr
        };
        stream.armed = false;
        let Some(fd) = &stream.fd else { return };
        let mut eof = false;
        for _ in 0..READS_PER_EVENT {
            match rustix::io::read(fd, &mut *ctx.scratch) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => append_capped(&mut stream.out, &ctx.scratch[..n], cap),
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => {}
                Err(e) => {
                    tracing::warn!(id = self.id, "reading output failed: {e}");
                    eof = true;
                    break;
                }
            }
        }
        if eof {
            stream.fd = None;
            self.maybe_done();
        } else {
            // Drained (EAGAIN) or out of budget: either way, wait for more.
            let fd = stream.fd.as_ref().map(|f| f.as_fd());
            if let Some(fd) = fd {
                match ctx
                    .backend
                    .watch(fd, token(self.slot, self.generation, source), false)
                {
                    Ok(()) => stream.armed = true,
                    Err(e) => {
                        say_polling(
                            &mut self.said_polling,
                            self.id,
                            "cannot re-watch output pipe",
                            &e,
                        );
                        ctx.poll_soon(self.slot, self.generation);
                    }
                }
            }
        }
    }

    /// Build the one result and hand back the callback that delivers it,
    /// and the cgroup leaf, if it had one, for the pool.
    pub fn finish(mut self, now: Instant) -> (CheckResult, Deliver, Option<Leaf>) {
        let deliver = self.deliver.take().expect("a lifecycle is finished once");
        (self.build_result(now), deliver, self.leaf.take())
    }
}

/// The safety net for a loop that dies (a bug, a panic while unwinding):
/// a check dropped before it finished is still killed, swept, reaped and
/// answered. A finished check has no pidfd and no callback left: no-op.
impl Drop for Lifecycle {
    fn drop(&mut self) {
        if let (Some(pidfd), Some(pid)) = (self.pidfd.take(), self.pid) {
            let _ = process::signal_leader(pidfd.as_fd(), Signal::KILL);
            let _ = process::signal_group_of_unreaped_leader(pid, Signal::KILL);
            if let Some(leaf) = &mut self.leaf {
                leaf.kill();
            }
            // Blocking, but only on this abnormal path: SIGKILL was just sent.
            let _ = rustix::process::waitid(
                rustix::process::WaitId::PidFd(pidfd.as_fd()),
                rustix::process::WaitIdOptions::EXITED,
            );
            self.reaped_at = Some(Instant::now());
        }
        if let Some(deliver) = self.deliver.take() {
            self.kill = Some(KillReason::Shutdown);
            let result = self.build_result(Instant::now());
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || deliver(result)));
        }
    }
}

/// Keep at most `cap` bytes; count the rest.
fn append_capped(out: &mut Output, data: &[u8], cap: usize) {
    let room = cap.saturating_sub(out.data.len());
    let take = room.min(data.len());
    if take > 0 {
        out.data.extend_from_slice(&data[..take]);
    }
    if take < data.len() {
        out.truncated = true;
        out.dropped_bytes += (data.len() - take) as u64;
    }
}

/// Microseconds since the Unix epoch.
pub(crate) use crate::result::unix_us;

/// A duration for people: `10s`, `1.5s`, `250ms`.
pub(crate) fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else if d.as_secs() > 0 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_timers_behind_a_live_one_are_compacted_away() {
        let mut t = Timers::default();
        let now = Instant::now();
        // One live check's deadline first, then 5,000 stale ones behind it.
        t.push(now, 0, 1, TimerKind::Deadline);
        for i in 1..=5000 {
            t.push(
                now + Duration::from_millis(i),
                i as usize,
                1,
                TimerKind::Deadline,
            );
        }
        let live = |slot: usize, _: u32, _: TimerKind| slot == 0;
        t.prune(live);
        assert_eq!(t.heap.len(), 5001, "prune stops at the live top");
        t.compact(1, live);
        assert_eq!(t.heap.len(), 1);
        assert_eq!(t.next(), Some(now));
        // Few stale ones: left for prune.
        t.push(now + Duration::from_secs(1), 7, 1, TimerKind::Deadline);
        t.compact(1, live);
        assert_eq!(t.heap.len(), 2);
    }

    #[test]
    fn output_is_capped_and_counted() {
        let mut o = Output::default();
        append_capped(&mut o, b"hello", 8);
        append_capped(&mut o, b"world", 8);
        assert_eq!(o.data, b"hellowor");
        assert!(o.truncated);
        assert_eq!(o.dropped_bytes, 2);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_secs(10)), "10s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human(Duration::from_millis(250)), "250ms");
    }
}
