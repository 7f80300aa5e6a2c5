//! The loop thread's scheduling policy: ordinary, or `SCHED_FIFO` while a
//! kill is near (`ExecutorBuilder::realtime_kills`).
//!
//! Why: on a machine whose cores are saturated by busy processes, a woken
//! ordinary thread can wait for a CPU until the next scheduler tick (4 ms at
//! `CONFIG_HZ=250`, more under load), so a deadline is enforced late: the
//! incident pidring answers. A `SCHED_FIFO` thread preempts every ordinary
//! one the moment it wakes. The loop takes it only while a timer is due
//! soon (a deadline, a grace end): realtime on every wake would make it
//! preempt the children it just created after each exit, which costs
//! throughput (measured 0.80× the raw spawn limit against 0.92–0.96×).
//! `SCHED_RESET_ON_FORK` keeps checks out of it: a child created while the
//! loop is realtime starts as an ordinary process, with the loop's nice.

use std::time::{Duration, Instant};

/// How far ahead of its next timer (a deadline, a grace end) the loop takes
/// the realtime priority: more than an ordinary thread's wake-up can be late
/// on a saturated machine (a few scheduler ticks), so that the wake-up at
/// the timer itself is a realtime one.
const AHEAD: Duration = Duration::from_millis(20);

/// `SCHED_FIFO` priority: the lowest, above every ordinary thread and below
/// any realtime one the administrator runs.
const FIFO_PRIORITY: libc::c_int = 1;

/// The loop thread's policy and whether it may change it.
#[derive(Debug)]
pub(crate) struct LoopPriority {
    /// Asked for, and not (yet) refused by the kernel.
    enabled: bool,
    /// Currently `SCHED_FIFO`.
    raised: bool,
    /// The thread's ordinary policy (`SCHED_OTHER`, or `SCHED_BATCH`/`SCHED_IDLE`
    /// if the process was started so), returned to after each raise.
    ordinary: libc::c_int,
}

impl LoopPriority {
    /// A loop that raises its priority near kills when `enabled`.
    ///
    /// `SCHED_RESET_ON_FORK` is set at once and kept in the ordinary policy
    /// too: an unprivileged thread (allowed realtime by `RLIMIT_RTPRIO`)
    /// cannot clear it again, and keeping it makes children the same before
    /// and after the first raise (ordinary policy, nice reset to 0 only if
    /// the executor's was negative).
    pub fn new(enabled: bool) -> LoopPriority {
        // SAFETY: pid 0 is the calling thread.
        let current = unsafe { libc::sched_getscheduler(0) } & !libc::SCHED_RESET_ON_FORK;
        let mut p = LoopPriority {
            enabled,
            raised: false,
            ordinary: current,
        };
        if !enabled {
            return p;
        }
        if !matches!(
            current,
            libc::SCHED_OTHER | libc::SCHED_BATCH | libc::SCHED_IDLE
        ) {
            // Already realtime (or unknown): the administrator chose; leave it.
            tracing::info!(
                "realtime kills: the loop thread already has policy {current}; left as it is"
            );
            p.enabled = false;
            return p;
        }
        // Probe once, so that a refusal is reported at startup rather than
        // at the first kill.
        p.set(true);
        p.set(false);
        if p.enabled {
            tracing::debug!(
                "realtime kills: the loop may take SCHED_FIFO priority {FIFO_PRIORITY}"
            );
        }
        p
    }

    /// Set `policy` (with `SCHED_RESET_ON_FORK`) at `priority` on this thread.
    fn apply(&self, policy: libc::c_int, priority: libc::c_int) -> std::io::Result<()> {
        let param = libc::sched_param {
            sched_priority: priority,
        };
        // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
        let rc = unsafe { libc::sched_setscheduler(0, policy | libc::SCHED_RESET_ON_FORK, &param) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Whether the loop may take the realtime priority (asked for, and not refused).
    pub fn available(&self) -> bool {
        self.enabled
    }

    /// Whether the loop is realtime right now.
    #[cfg(test)]
    pub fn is_raised(&self) -> bool {
        self.raised
    }

    /// Set the policy for a loop whose next timer is `next`, and say when
    /// the loop must wake: at that timer, or, while ordinary, `AHEAD` of it,
    /// to take the realtime priority before the timer's own wake-up.
    pub fn before_wait(&mut self, next: Option<Instant>, now: Instant) -> Option<Instant> {
        let Some(next) = next else {
            self.set(false);
            return None;
        };
        let raise_at = next.checked_sub(AHEAD).unwrap_or(now);
        self.set(now >= raise_at);
        if self.enabled && !self.raised {
            Some(raise_at)
        } else {
            Some(next)
        }
    }

    /// Be realtime when `urgent`, ordinary otherwise (a system call only on a change).
    fn set(&mut self, urgent: bool) {
        if !self.enabled || urgent == self.raised {
            return;
        }
        // The ordinary policy keeps the nice value, which the kernel kept aside.
        let result = if urgent {
            self.apply(libc::SCHED_FIFO, FIFO_PRIORITY)
        } else {
            self.apply(self.ordinary, 0)
        };
        match result {
            Ok(()) => self.raised = urgent,
            Err(e) if urgent => {
                // Refused (no CAP_SYS_NICE, RLIMIT_RTPRIO 0, a container, or
                // the cgroup's realtime budget is 0): stop asking.
                tracing::warn!(
                    "realtime kills unavailable ({e}): on a saturated machine deadlines may be enforced a scheduler tick late; \
                     grant CAP_SYS_NICE or RLIMIT_RTPRIO >= 1 to the executor"
                );
                self.enabled = false;
            }
            Err(e) => {
                // Still realtime: try again at the next turn, loudly.
                tracing::error!("cannot leave SCHED_FIFO: {e}");
            }
        }
    }
}

impl Drop for LoopPriority {
    fn drop(&mut self) {
        // The thread may go on (the loop ended early): leave it ordinary.
        self.set(false);
    }
}

/// The calling thread's scheduling policy (without `SCHED_RESET_ON_FORK`).
#[cfg(test)]
fn current_policy() -> libc::c_int {
    // SAFETY: pid 0 is the calling thread.
    unsafe { libc::sched_getscheduler(0) & !libc::SCHED_RESET_ON_FORK }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_and_lowers_or_stays_ordinary_when_refused() {
        // On a thread of its own: the policy is per thread.
        std::thread::spawn(|| {
            let mut p = LoopPriority::new(true);
            p.set(true);
            if p.is_raised() {
                assert_eq!(current_policy(), libc::SCHED_FIFO);
                p.set(false);
                assert!(!p.is_raised());
            }
            // Refused or lowered: ordinary either way.
            assert_eq!(current_policy(), libc::SCHED_OTHER);
            let mut off = LoopPriority::new(false);
            off.set(true);
            assert!(!off.is_raised());
            assert_eq!(current_policy(), libc::SCHED_OTHER);
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn wakes_ahead_of_a_far_timer_to_be_realtime_at_it() {
        std::thread::spawn(|| {
            let now = Instant::now();
            let far = now + Duration::from_secs(1);
            let near = now + Duration::from_millis(5);
            let mut off = LoopPriority::new(false);
            assert_eq!(off.before_wait(Some(far), now), Some(far));
            assert_eq!(off.before_wait(None, now), None);
            let mut p = LoopPriority::new(true);
            // Ordinary until AHEAD before the timer, and woken then.
            assert_eq!(p.before_wait(Some(far), now), Some(far - AHEAD));
            assert!(!p.is_raised());
            // Near: realtime (where permitted), woken at the timer itself.
            assert_eq!(p.before_wait(Some(near), now), Some(near));
            if p.is_raised() {
                assert_eq!(current_policy(), libc::SCHED_FIFO);
            }
            // Nothing pending: ordinary again.
            assert_eq!(p.before_wait(None, now), None);
            assert!(!p.is_raised());
            assert_eq!(current_policy(), libc::SCHED_OTHER);
        })
        .join()
        .expect("thread");
    }
}
