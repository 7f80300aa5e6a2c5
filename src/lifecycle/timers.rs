//! The loop's timers, and what the loop lends a check while it handles an event.

use crate::backend::Backend;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// How often what could not be watched is polled instead.
const RETRY_POLL: Duration = Duration::from_millis(10);

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
    pub(super) fn poll_soon(&mut self, slot: usize, generation: u32) {
        self.timers
            .push(self.now + RETRY_POLL, slot, generation, TimerKind::Retry);
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
}
