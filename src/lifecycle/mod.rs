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
//!   the phase holds the `Leader` — i.e. the leader is unreaped and pins the
//!   group id (`Running`, `Terminating`, `Killing`: the reap takes it out);
//! - the reap is never skipped: a signal's result never decides anything;
//! - the group is swept before the reap after a timeout, cancel or shutdown
//!   (and after a normal exit when `kill_group_on_exit`);
//! - descendants outside the group, found by walking the live leader's
//!   descendants before a kill's first signal, are signalled only through
//!   their own pidfds, and only until the leader is reaped;
//! - deadlines come from the timer alone, never from output or EOF.

mod timers;
mod verdict;

pub(crate) use timers::{EventCtx, TimerKind, Timers};

pub(crate) use verdict::unstarted_result;

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

/// Warn that `what` failed and its fd is polled instead, once per check
/// (`said`): the poll retries every 10 ms, and each retry may fail
/// again.
fn say_polling(said: &mut bool, id: u64, what: &str, e: &dyn std::fmt::Display) {
    if !std::mem::replace(said, true) {
        tracing::warn!(id, "{what}: {e}; polling instead");
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

/// Where a check is in its life, with what only that part of it has: the
/// unreaped leader exists in `Running`, `Terminating` and `Killing` alone,
/// so nothing can signal it (or its group) once it is reaped.
enum Phase {
    /// Admitted; no child created yet. A kill asked for now waits for it.
    Spawning { kill_asked: Option<KillReason> },
    /// The child runs; its deadline is pending.
    Running(Leader),
    /// SIGTERM sent; SIGKILL at the end of the grace.
    Terminating(Leader),
    /// SIGKILL sent; waiting for the leader's exit.
    Killing(Leader),
    /// Leader reaped; output still open (or a killed leaf not yet empty):
    /// read until EOF or the drain bound.
    Draining,
    /// Ready to be turned into a result.
    Done,
}

impl Phase {
    /// The unreaped leader, if there is one.
    fn leader(&self) -> Option<&Leader> {
        match self {
            Phase::Running(l) | Phase::Terminating(l) | Phase::Killing(l) => Some(l),
            _ => None,
        }
    }

    /// The unreaped leader, to change.
    fn leader_mut(&mut self) -> Option<&mut Leader> {
        match self {
            Phase::Running(l) | Phase::Terminating(l) | Phase::Killing(l) => Some(l),
            _ => None,
        }
    }

    /// The leader, taken out at its reap (the phase is `Done` until the
    /// caller says what follows).
    fn take_leader(&mut self) -> Option<Leader> {
        match std::mem::replace(self, Phase::Done) {
            Phase::Running(l) | Phase::Terminating(l) | Phase::Killing(l) => Some(l),
            other => {
                *self = other;
                None
            }
        }
    }

    /// Move an unreaped leader on to `next` (`Phase::Terminating` or
    /// `Phase::Killing`); other phases stay.
    fn signalled(&mut self, next: fn(Leader) -> Phase) {
        if let Some(l) = self.take_leader() {
            *self = next(l);
        }
    }
}

/// The child from its creation to its reap: the only handle it is
/// signalled and reaped through, and what it uses until it has exec'd.
struct Leader {
    /// Closed at the reap, with the rest of this.
    pidfd: OwnedFd,
    /// A watch on `pidfd` is pending.
    armed: bool,
    /// The pidfd fired in this turn and is not handled yet (see `note_exit_pending`).
    exit_pending: bool,
    /// Descendants found while the check was being killed (see
    /// `find_descendants`), as pidfds; closed at the reap.
    descendants: Vec<process::Descendant>,
    /// The child while it may not have exec'd yet (see `process::PreExecChild`).
    /// Declared last: it must drop after the pidfd's reap, never before.
    launch: Option<PreExecChild>,
}

impl Leader {
    /// Whether the child has its own process group yet (before that, it has
    /// no descendants, and only its pidfd is signalled).
    fn grouped(&self) -> bool {
        self.launch.as_ref().is_none_or(PreExecChild::grouped)
    }
}

/// What the check was asked for (from its `Limits`).
struct Plan {
    tag: Option<String>,
    timeout: Duration,
    grace: Duration,
    drain: Duration,
    output_cap: usize,
    kill_group_on_exit: bool,
    timeout_state: State,
}

/// When things happened to the check.
struct Clock {
    submitted: Instant,
    submitted_wall: SystemTime,
    /// When the loop admitted it (queue wait ends, spawn begins).
    dispatched: Instant,
    started: Option<Instant>,
    deadline: Option<Instant>,
    first_signal_at: Option<Instant>,
    exited_at: Option<Instant>,
    reaped_at: Option<Instant>,
}

/// How the check ended, as far as known: what the verdict is made of.
#[derive(Default)]
struct Ending {
    kill: Option<KillReason>,
    last_signal: Option<Signal>,
    escalated: bool,
    /// A signal to the leader was refused (EPERM: it runs as another user,
    /// as through sudo or a setuid program that became root).
    refused: bool,
    /// Timed out before its child exec'd: where the child was stuck (see
    /// `process::PreExecChild::stuck`).
    never_started: Option<String>,
    exit: Option<ExitStatus>,
    rusage: Option<Rusage>,
    spawn_failure: Option<SpawnFailure>,
    output_cut: bool,
    /// Processes in the leaf when the leader exited.
    escapees: u32,
}

/// The check's cgroup leaf (containment on): every process it starts is
/// in it, and dies by its `cgroup.kill`.
struct CheckLeaf {
    leaf: Leaf,
    /// A watch on the leaf's `cgroup.events` is pending.
    armed: bool,
    /// The leaf was killed: the result waits until it is empty (bounded
    /// by the drain); still set at the result if the drain ran out first.
    wait: bool,
}

/// One output pipe and what was read from it.
#[derive(Default)]
struct Stream {
    fd: Option<OwnedFd>,
    armed: bool,
    out: Output,
}

/// Longest a result waits, after the leader's reap, for its killed cgroup
/// leaf to empty (SIGKILLed processes exit within milliseconds unless stuck
/// in the kernel, as on a hung mount).
const LEAF_EMPTY_BOUND: Duration = Duration::from_secs(10);

/// Most reads per readiness event on one pipe, so a flooding plugin cannot
/// starve the others (the watch is re-armed and fires again next turn).
const READS_PER_EVENT: usize = 4;

/// One check, from dispatch to result.
pub(crate) struct Lifecycle {
    id: u64,
    slot: usize,
    generation: u32,
    deliver: Option<Deliver>,
    plan: Plan,
    clock: Clock,
    phase: Phase,
    /// The leader's pid, from its creation on (the result carries it).
    pid: Option<Pid>,
    stdout: Stream,
    stderr: Stream,
    leaf: Option<CheckLeaf>,
    ending: Ending,
    /// Said (once) that a watch failed and its fd is polled instead: the
    /// poll retries every 10 ms, and would otherwise say it every time.
    said_polling: bool,
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
            deliver: Some(deliver),
            plan: Plan {
                tag: limits.tag.clone(),
                timeout: limits.timeout,
                grace: limits.grace,
                drain: limits.drain,
                output_cap: limits.output_cap,
                kill_group_on_exit: limits.kill_group_on_exit,
                timeout_state: limits.timeout_state,
            },
            clock: Clock {
                submitted,
                submitted_wall,
                dispatched: now,
                started: None,
                deadline: None,
                first_signal_at: None,
                exited_at: None,
                reaped_at: None,
            },
            phase: Phase::Spawning { kill_asked: None },
            pid: None,
            stdout: Stream::default(),
            stderr: Stream::default(),
            leaf: None,
            ending: Ending::default(),
            said_polling: false,
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
        self.phase.leader().and(self.pid)
    }

    /// Whether the result can be built.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
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
        let kill_asked = match self.phase {
            Phase::Spawning { kill_asked } => kill_asked,
            _ => None,
        };
        self.clock.dispatched = picked;
        self.leaf = leaf.map(|leaf| CheckLeaf {
            leaf,
            armed: false,
            wait: false,
        });
        self.pid = Some(child.pid);
        self.clock.started = Some(child.started);
        let deadline = child.started + self.plan.timeout;
        self.clock.deadline = Some(deadline);
        self.phase = Phase::Running(Leader {
            pidfd: child.pidfd,
            armed: false,
            exit_pending: false,
            descendants: Vec::new(),
            launch,
        });
        self.stdout.fd = Some(child.stdout);
        self.stderr.fd = Some(child.stderr);
        ctx.timers
            .push(deadline, self.slot, self.generation, TimerKind::Deadline);
        self.watch_all(ctx, true);
        if let Some(reason) = kill_asked {
            // Cancelled or shut down while it was being spawned.
            self.kill_now(reason, ctx);
        }
    }

    /// The child could not be created.
    pub fn spawn_failed(&mut self, failure: SpawnFailure, picked: Instant) {
        self.clock.dispatched = picked;
        self.ending.spawn_failure = Some(failure);
        self.phase = Phase::Done;
    }

    /// Catch up with a child that had not exec'd yet. True while it still
    /// has not (the loop asks again next turn).
    pub fn poll_launch(&mut self) -> bool {
        let Some(leader) = self.phase.leader_mut() else {
            return false;
        };
        let Some(launch) = leader.launch.as_mut() else {
            return false;
        };
        let failure = match launch.poll() {
            None => return true,
            Some(result) => result.err(),
        };
        leader.launch = None;
        if let Some(failure) = failure {
            // It is exiting (127); reaped when its pidfd says so.
            self.exec_failed(failure);
        }
        false
    }

    /// The child never became the check (a step before `execve` failed):
    /// the result is that failure, not the child's exit 127.
    fn exec_failed(&mut self, failure: SpawnFailure) {
        tracing::debug!(id = self.id, "spawn failed: {}", failure.message);
        self.ending.spawn_failure = Some(failure);
    }

    /// Arm every open, unarmed fd (after start, or to recover from a failed arm).
    fn watch_all(&mut self, ctx: &mut EventCtx<'_>, first: bool) {
        let mut failed = false;
        if let Some(leader) = self.phase.leader_mut()
            && !leader.armed
        {
            let t = token(self.slot, self.generation, Source::Pidfd);
            match ctx.backend.watch(leader.pidfd.as_fd(), t, first) {
                Ok(()) => leader.armed = true,
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
            Source::Pidfd => {
                if let Some(leader) = self.phase.leader_mut() {
                    leader.armed = false;
                }
            }
            Source::Stdout => self.stdout.armed = false,
            Source::Stderr => self.stderr.armed = false,
            Source::Cgroup => {
                if let Some(leaf) = &mut self.leaf {
                    leaf.armed = false;
                }
            }
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
                if let Some(leader) = self.phase.leader_mut() {
                    leader.armed = false;
                }
                self.leader_ready(ctx);
            }
            Source::Stdout | Source::Stderr => self.read_stream(source, ctx),
            Source::Cgroup => {
                if let Some(leaf) = &mut self.leaf {
                    leaf.armed = false;
                }
                self.watch_leaf(ctx);
                self.maybe_done();
            }
        }
    }

    /// Whether a killed leaf still holds processes the result waits for.
    fn leaf_waits(&self) -> bool {
        self.leaf.as_ref().is_some_and(|l| l.wait)
    }

    /// Draining, and nothing left to wait for (output closed, leaf empty): done.
    fn maybe_done(&mut self) {
        if matches!(self.phase, Phase::Draining)
            && self.stdout.fd.is_none()
            && self.stderr.fd.is_none()
            && !self.leaf_waits()
        {
            self.phase = Phase::Done;
        }
    }

    /// While the killed leaf is not empty, watch its `cgroup.events`
    /// (a read first: the change notification comes 10–20 ms late, the
    /// kernel rate-limits them, and a read that says empty is the answer).
    fn watch_leaf(&mut self, ctx: &mut EventCtx<'_>) {
        let Some(l) = &mut self.leaf else {
            return;
        };
        if !l.wait || l.armed {
            return;
        }
        if !l.leaf.populated() {
            l.wait = false;
            return;
        }
        let t = token(self.slot, self.generation, Source::Cgroup);
        match ctx.backend.watch_pri(l.leaf.events(), t, true) {
            Ok(()) => l.armed = true,
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
        if let Some(l) = &mut self.leaf {
            l.wait = l.leaf.killed();
        }
        self.watch_leaf(ctx);
        if self.stdout.fd.is_some() || self.stderr.fd.is_some() || self.leaf_waits() {
            self.phase = Phase::Draining;
            ctx.timers.push(
                ctx.now + self.plan.drain,
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
            && self.phase.leader().is_some()
            && let Some(l) = &mut self.leaf
            && !l.leaf.killed()
        {
            // Who is there besides the (live, unreaped) leader.
            self.ending.escapees = l.leaf.count_procs().saturating_sub(1);
            l.leaf.kill();
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
        // Only while the leader is unreaped: its pid is ours.
        let (Some(leader), Some(pid)) = (self.phase.leader_mut(), self.pid) else {
            return;
        };
        if !leader.grouped() {
            return;
        }
        let mut found = process::descendants_outside_group(pid, WALK_LIMIT, MAX_DESCENDANTS);
        // Keep those an earlier walk found and this one did not (re-parented
        // away from the leader's tree since).
        for old in leader.descendants.drain(..) {
            if found.len() < MAX_DESCENDANTS && !found.iter().any(|d| d.pid == old.pid) {
                found.push(old);
            }
        }
        leader.descendants = found;
    }

    /// Send `sig` to the descendants found outside the group (see `find_descendants`).
    fn signal_descendants(&mut self, sig: Signal) {
        let Some(leader) = self.phase.leader() else {
            return;
        };
        for d in &leader.descendants {
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
        let Some(leader) = self.phase.leader() else {
            return; // Reaped: nothing of this check is ever signalled again.
        };
        if self.clock.first_signal_at.is_none() {
            self.clock.first_signal_at = Some(Instant::now());
        }
        let ending = &mut self.ending;
        ending.last_signal = Some(sig);
        if let Err(e) = process::signal_leader(leader.pidfd.as_fd(), sig) {
            if e == Errno::PERM && !ending.refused {
                tracing::warn!(
                    id = self.id,
                    "not permitted to signal the check ({sig:?}): it runs as another user \
                     (sudo, or a setuid program that became root); it ends only by itself"
                );
            } else if e != Errno::PERM {
                tracing::warn!(id = self.id, "pidfd_send_signal({sig:?}) failed: {e}");
            }
            ending.refused |= e == Errno::PERM;
        }
    }

    /// Send `sig` to the leader's group: only while the leader is unreaped
    /// (it pins the group id) and once the group exists.
    fn signal_group(&mut self, sig: Signal) {
        let (Some(leader), Some(pid)) = (self.phase.leader(), self.pid) else {
            return;
        };
        if !leader.grouped() {
            return;
        }
        if let Err(e) = process::signal_group_of_unreaped_leader(pid, sig) {
            tracing::warn!(id = self.id, "kill(-pgid, {sig:?}) failed: {e}");
        }
    }

    /// The leader's pidfd fired in this turn; the event is handled after the
    /// turn's signalling timers. Those leave this check alone for now: it
    /// exited before the loop got to its deadline, so it did not time out
    /// (and a SIGTERM that beat the grace is not "ignored").
    pub fn note_exit_pending(&mut self) {
        if let Some(leader) = self.phase.leader_mut() {
            leader.exit_pending = true;
        }
    }

    /// Whether a timer of `kind` would still do something (see `on_timer`).
    pub fn wants_timer(&self, kind: TimerKind) -> bool {
        match kind {
            TimerKind::Deadline => matches!(self.phase, Phase::Running(_)),
            TimerKind::Grace => matches!(self.phase, Phase::Terminating(_)),
            TimerKind::Drain => matches!(self.phase, Phase::Draining),
            TimerKind::Retry => !self.is_done(),
        }
    }

    /// A timer of this check fired.
    pub fn on_timer(&mut self, kind: TimerKind, ctx: &mut EventCtx<'_>) {
        if self.phase.leader().is_some_and(|l| l.exit_pending) && kind.signals() {
            // Looked at again next turn, after the exit (if it was one).
            ctx.timers.push(ctx.now, self.slot, self.generation, kind);
            return;
        }
        if !self.wants_timer(kind) {
            return; // Stale: the phase moved on.
        }
        match kind {
            TimerKind::Deadline => self.timed_out(ctx),
            TimerKind::Grace => {
                tracing::debug!(id = self.id, "ignored SIGTERM; sending SIGKILL");
                self.ending.escalated = true;
                self.phase.signalled(Phase::Killing);
                self.signal(Signal::KILL);
            }
            TimerKind::Drain => self.cut_drain(ctx),
            TimerKind::Retry => self.retry(ctx),
        }
    }

    /// The deadline passed: SIGTERM, and SIGKILL at the end of the grace
    /// (at once if the child never got to exec).
    fn timed_out(&mut self, ctx: &mut EventCtx<'_>) {
        self.ending.kill = Some(KillReason::Timeout);
        self.poll_launch();
        self.ending.never_started = self
            .phase
            .leader()
            .and_then(|l| l.launch.as_ref())
            .and_then(PreExecChild::stuck);
        if let Some(stuck) = &self.ending.never_started {
            // Still in our code, every signal blocked: SIGTERM could
            // only wait out the grace, and there is no plugin yet
            // to clean up (nor any descendant). SIGKILL ends it as
            // soon as the kernel lets it (a lookup on a hung mount
            // may hold it longer, even so).
            tracing::debug!(
                id = self.id,
                "timed out before it could start ({stuck}); sending SIGKILL"
            );
            self.phase.signalled(Phase::Killing);
            self.signal(Signal::KILL);
            return;
        }
        self.phase.signalled(Phase::Terminating);
        tracing::debug!(id = self.id, "timed out; sending SIGTERM");
        self.signal(Signal::TERM);
        // A stopped process would hold SIGTERM pending until the grace ran out.
        self.signal_group(Signal::CONT);
        let deadline = self.clock.deadline.unwrap_or(ctx.now);
        ctx.timers.push(
            (deadline + self.plan.grace).max(ctx.now),
            self.slot,
            self.generation,
            TimerKind::Grace,
        );
    }

    /// The drain bound passed (or a kill came while draining): stop
    /// reading. A killed leaf not empty yet is waited for still, up to
    /// `LEAF_EMPTY_BOUND` after the reap: its processes are dying of
    /// SIGKILL, which on a loaded machine may take longer than a drain, and
    /// no process of a check may outlive its result.
    fn cut_drain(&mut self, ctx: &mut EventCtx<'_>) {
        for (source, stream) in [
            (Source::Stdout, &mut self.stdout),
            (Source::Stderr, &mut self.stderr),
        ] {
            if let Some(fd) = stream.fd.take() {
                self.ending.output_cut = true;
                if stream.armed {
                    ctx.backend
                        .unwatch(fd.as_fd(), token(self.slot, self.generation, source));
                }
            }
        }
        let bound = self.clock.reaped_at.unwrap_or(ctx.now) + LEAF_EMPTY_BOUND;
        if self.leaf_waits() && ctx.now < bound {
            ctx.timers
                .push(bound, self.slot, self.generation, TimerKind::Drain);
            return;
        }
        if self.leaf_waits() {
            tracing::warn!(
                id = self.id,
                "processes of the check still in its killed cgroup {}s after its end \
                 (stuck in the kernel?); its result says so (left_running)",
                LEAF_EMPTY_BOUND.as_secs()
            );
        }
        if let Some(l) = &mut self.leaf
            && l.armed
        {
            let t = token(self.slot, self.generation, Source::Cgroup);
            ctx.backend.unwatch(l.leaf.events(), t);
            l.armed = false;
        }
        self.phase = Phase::Done;
    }

    /// Polling for what could not be watched: the leader is swept and
    /// reaped only once it has exited (a live one's group must never be
    /// killed), else watched again (and polled again if that fails once
    /// more).
    fn retry(&mut self, ctx: &mut EventCtx<'_>) {
        if let Some(leader) = self.phase.leader()
            && !leader.armed
        {
            match process::has_exited(leader.pidfd.as_fd()) {
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
        if self.leaf.as_ref().is_some_and(|l| l.wait && !l.armed) {
            self.watch_leaf(ctx);
            self.maybe_done();
        }
    }

    /// Kill now (cancel or shutdown): SIGKILL leader and group. A check
    /// whose leader has already ended and that only drains its output
    /// (an escaped descendant holds the pipe) stops draining: its result,
    /// the leader's own end with the output cut, is not held for the bound.
    pub fn kill_now(&mut self, reason: KillReason, ctx: &mut EventCtx<'_>) {
        match &mut self.phase {
            Phase::Spawning { kill_asked } => *kill_asked = Some(reason),
            Phase::Running(_) | Phase::Terminating(_) => {
                // A check already timing out stays "timed out".
                if self.ending.kill.is_none() {
                    self.ending.kill = Some(reason);
                }
                self.phase.signalled(Phase::Killing);
                self.signal(Signal::KILL);
            }
            Phase::Draining => self.cut_drain(ctx),
            Phase::Killing(_) | Phase::Done => {}
        }
    }

    /// The pidfd is readable: the leader has exited. Sweep, then reap.
    fn leader_ready(&mut self, ctx: &mut EventCtx<'_>) {
        self.poll_launch();
        let (Some(leader), Some(pid)) = (self.phase.leader_mut(), self.pid) else {
            return;
        };
        leader.exit_pending = false;
        if self.clock.exited_at.is_none() {
            self.clock.exited_at = Some(ctx.now);
        }
        let sweep = self.ending.kill.is_some() || self.plan.kill_group_on_exit;
        // Sweep before reap: the zombie leader still pins the group id.
        if leader.grouped() && sweep {
            let _ = process::signal_group_of_unreaped_leader(pid, Signal::KILL);
        }
        // And the descendants found outside the group while killing it (the
        // leader may have died of SIGTERM, leaving them SIGTERM only).
        for d in leader.descendants.drain(..) {
            let _ = process::signal_leader(d.pidfd.as_fd(), Signal::KILL);
        }
        // And everything in the leaf (one pread when it holds only the
        // zombie leader): what is still there outlived the leader.
        if let Some(l) = &mut self.leaf
            && !l.leaf.killed()
            && l.leaf.populated()
        {
            self.ending.escapees = l.leaf.count_procs();
            if sweep {
                l.leaf.kill();
            } else {
                l.leaf.leave_running();
                tracing::debug!(
                    id = self.id,
                    escapees = self.ending.escapees,
                    "processes outlive the check; left running (kill_group_on_exit off)"
                );
            }
        }
        match process::reap(leader.pidfd.as_fd()) {
            Ok(Reap::Reaped(status, rusage)) => {
                self.ending.exit = Some(status);
                self.ending.rusage = Some(rusage);
                self.reaped(true, ctx);
            }
            Ok(Reap::NotYet) => {
                // Woken early: not exited after all. Watch again.
                self.clock.exited_at = None;
                self.watch_all(ctx, false);
            }
            Err(Errno::CHILD) => {
                // Someone reaped our child behind our back (a foreign
                // waitpid(-1) in this process). Nothing left to signal.
                tracing::error!(
                    id = self.id,
                    "child was reaped by someone else; exit status lost"
                );
                self.reaped(false, ctx);
            }
            Err(e) => {
                tracing::warn!(id = self.id, "waitid failed: {e}; retrying");
                ctx.poll_soon(self.slot, self.generation);
            }
        }
    }

    /// The leader is gone: close its pidfd (its oneshot watch already
    /// fired), release what it used before exec (and, when its exit status
    /// is known, take the failure its code before exec reported), move on.
    fn reaped(&mut self, status_known: bool, ctx: &mut EventCtx<'_>) {
        self.clock.reaped_at = Some(Instant::now());
        if let Some(Leader { pidfd, launch, .. }) = self.phase.take_leader() {
            drop(pidfd);
            if let Some(mut launch) = launch.filter(|_| status_known)
                && let Err(failure) = launch.reaped()
            {
                self.exec_failed(failure);
            }
        }
        self.after_reap(ctx);
    }

    /// A pipe is readable (or hung up): read what is there into the capped buffer.
    fn read_stream(&mut self, source: Source, ctx: &mut EventCtx<'_>) {
        let cap = self.plan.output_cap;
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
        (
            self.build_result(now),
            deliver,
            self.leaf.take().map(|l| l.leaf),
        )
    }
}

/// The safety net for a loop that dies (a bug, a panic while unwinding):
/// a check dropped before it finished is still killed, swept, reaped and
/// answered. A finished check has no leader and no callback left: no-op.
impl Drop for Lifecycle {
    fn drop(&mut self) {
        if let Some(leader) = self.phase.take_leader() {
            let _ = process::signal_leader(leader.pidfd.as_fd(), Signal::KILL);
            if let Some(pid) = self.pid {
                let _ = process::signal_group_of_unreaped_leader(pid, Signal::KILL);
            }
            if let Some(l) = &mut self.leaf {
                l.leaf.kill();
            }
            // Blocking, but only on this abnormal path: SIGKILL was just sent.
            // (An application's SIGCHLD handler may run on this thread.)
            while let Err(Errno::INTR) = rustix::process::waitid(
                rustix::process::WaitId::PidFd(leader.pidfd.as_fd()),
                rustix::process::WaitIdOptions::EXITED,
            ) {}
            self.clock.reaped_at = Some(Instant::now());
            // `leader` (and what the child used before exec) drops here,
            // after the reap.
        }
        if let Some(deliver) = self.deliver.take() {
            self.ending.kill = Some(KillReason::Shutdown);
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
