//! The loop thread's scheduling policy: ordinary, or `SCHED_FIFO` while a
//! kill is near (`ExecutorBuilder::realtime_kills`).
//!
//! Why: on a machine whose cores are saturated by busy processes, a woken
//! ordinary thread can wait for a CPU until the next scheduler tick, so a
//! deadline is enforced late: the incident pidring answers. A `SCHED_FIFO`
//! thread preempts every ordinary one the moment it wakes. The loop takes it
//! only while a timer is due soon: realtime on every wake would make it
//! preempt, after each exit, the children it just created, which costs
//! throughput. And only within a CPU budget (`CLOCK_THREAD_CPUTIME_ID`): a
//! stream of deadlines next to plugins flooding output could otherwise keep
//! it busy at realtime priority for seconds, starving every ordinary thread
//! on its CPU. Dropping back to ordinary right after each turn's signals
//! does not work: the loop is then preempted before it can raise itself
//! again. (Measurements: docs/PERFORMANCE.md.)
//! `SCHED_RESET_ON_FORK` keeps checks out of it: a child created while the
//! loop is realtime starts as `SCHED_OTHER` at nice 0 — which is why the
//! loop takes it only when it is itself `SCHED_OTHER` at nice 0 or below:
//! an executor run under `nice -n 10` or `chrt -b/-i` would otherwise let
//! its checks escape that.

use std::time::{Duration, Instant};

/// How far ahead of its next timer (a deadline, a grace end) the loop takes
/// the realtime priority: more than an ordinary thread's wake-up can be late
/// on a saturated machine (a few scheduler ticks), so that the wake-up at
/// the timer itself is a realtime one.
const AHEAD: Duration = Duration::from_millis(20);

/// `SCHED_FIFO` priority: the lowest, above every ordinary thread and below
/// any realtime one the administrator runs.
const FIFO_PRIORITY: libc::c_int = 1;

/// Share of one CPU the loop may use while realtime, on average.
const BUDGET_SHARE: f64 = 0.3;

/// Most realtime CPU time saved up for a burst.
const BUDGET_BURST: Duration = Duration::from_millis(50);

/// The loop thread's policy and whether it may change it.
#[derive(Debug)]
pub(crate) struct LoopPriority {
    /// Asked for, and not (yet) refused by the kernel.
    enabled: bool,
    /// `Some` while `SCHED_FIFO`: the thread's CPU time when last metered.
    raised: Option<Duration>,
    /// The thread's ordinary policy (`SCHED_OTHER`, or `SCHED_BATCH`/`SCHED_IDLE`
    /// if the process was started so), returned to after each raise.
    ordinary: libc::c_int,
    /// Realtime CPU time the loop may still use.
    budget: Duration,
    /// Overdrawn: ordinary until the budget is back to a full burst's half.
    overdrawn: bool,
    /// When the budget was last topped up.
    last: Option<Instant>,
}

impl LoopPriority {
    /// A loop that raises its priority near kills when `enabled`.
    ///
    /// `SCHED_RESET_ON_FORK` is set at once and kept in the ordinary policy
    /// too: an unprivileged thread (allowed realtime by `RLIMIT_RTPRIO`)
    /// cannot clear it again, and keeping it makes children the same before
    /// and after the first raise (ordinary policy, nice reset to 0 only if
    /// the executor's was negative).
    ///
    /// It also asks for the short slice (`LOOP_SLICE`), whether or not
    /// realtime kills are enabled.
    pub fn new(enabled: bool) -> LoopPriority {
        // SAFETY: pid 0 is the calling thread.
        let current = unsafe { libc::sched_getscheduler(0) } & !libc::SCHED_RESET_ON_FORK;
        let nice = current_nice();
        ask_for_short_slice(current, nice);
        let mut p = LoopPriority {
            enabled,
            raised: None,
            ordinary: current,
            budget: BUDGET_BURST,
            overdrawn: false,
            last: None,
        };
        if !enabled {
            return p;
        }
        if matches!(current, libc::SCHED_FIFO | libc::SCHED_RR) {
            // The administrator made the executor realtime: it stays so, but
            // checks must not inherit it (a spinning plugin at the loop's own
            // priority would never let the loop run to kill it).
            // SAFETY: pid 0 is the calling thread; `param` is written by the kernel.
            let mut param = libc::sched_param { sched_priority: 0 };
            let got = unsafe { libc::sched_getparam(0, &mut param) };
            let kept = got == 0 && p.apply(current, param.sched_priority).is_ok();
            tracing::info!(
                "the loop thread is already realtime (policy {current}): left so; checks {}",
                if kept {
                    "start as ordinary processes"
                } else {
                    "inherit it (cannot set SCHED_RESET_ON_FORK)"
                }
            );
            p.enabled = false;
            return p;
        }
        if current != libc::SCHED_OTHER || nice > 0 {
            // A realtime parent's checks start at SCHED_OTHER nice 0: they
            // would escape the priority the executor was given.
            tracing::info!(
                "realtime kills off: the executor runs at policy {current}, nice {nice}, which its checks keep"
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

    /// Leave the realtime priority now, if the loop has it (before a new
    /// `LoopPriority` replaces this one: it reads the thread's policy).
    pub fn lower(&mut self) {
        self.set(false);
    }

    /// Whether the loop may take the realtime priority (asked for, and not refused).
    pub fn available(&self) -> bool {
        self.enabled
    }

    /// Whether the loop is realtime right now.
    #[cfg(test)]
    pub fn is_raised(&self) -> bool {
        self.raised.is_some()
    }

    /// Set the policy for a loop whose next timer is `next`, and say when
    /// the loop must wake: at that timer, or, while ordinary, `AHEAD` of it,
    /// to take the realtime priority before the timer's own wake-up.
    pub fn before_wait(&mut self, next: Option<Instant>, now: Instant) -> Option<Instant> {
        if self.enabled {
            self.meter(now);
        }
        let Some(next) = next else {
            self.set(false);
            return None;
        };
        let raise_at = next.checked_sub(AHEAD).unwrap_or(now);
        self.set(now >= raise_at && !self.overdrawn);
        if self.enabled && self.raised.is_none() && !self.overdrawn {
            Some(raise_at)
        } else {
            Some(next)
        }
    }

    /// Top the budget up for the time passed, and charge it the CPU time
    /// the loop used while realtime since the last call. (The thread's CPU
    /// clock, a system call, is read only while realtime: an ordinary loop
    /// pays nothing for the budget.)
    fn meter(&mut self, now: Instant) {
        if let Some(then) = self.last {
            let refill = now.saturating_duration_since(then).mul_f64(BUDGET_SHARE);
            self.budget = (self.budget + refill).min(BUDGET_BURST);
        }
        self.last = Some(now);
        if let Some(cpu_then) = self.raised {
            let cpu = thread_cpu_time();
            self.budget = self.budget.saturating_sub(cpu.saturating_sub(cpu_then));
            self.raised = Some(cpu);
            if self.budget.is_zero() && !self.overdrawn {
                tracing::debug!("realtime kills: CPU budget used up; ordinary for now");
                self.overdrawn = true;
            }
        }
        if self.overdrawn && self.budget >= BUDGET_BURST / 2 {
            self.overdrawn = false;
        }
    }

    /// Be realtime when `urgent`, ordinary otherwise (a system call only on a change).
    fn set(&mut self, urgent: bool) {
        if !self.enabled || urgent == self.raised.is_some() {
            return;
        }
        // The ordinary policy keeps the nice value, which the kernel kept aside.
        let result = if urgent {
            self.apply(libc::SCHED_FIFO, FIFO_PRIORITY)
        } else {
            self.apply(self.ordinary, 0)
        };
        match result {
            // Realtime from here: its CPU time counts against the budget.
            Ok(()) => self.raised = urgent.then(thread_cpu_time),
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

/// The slice the loop asks the fair scheduler for: much shorter than the
/// default (0.7 ms × (1 + log2 CPUs), 1.4 ms on 2 CPUs).
///
/// Why: the loop uses little CPU but has work the moment a check exits, and
/// on a saturated machine it waits behind the checks queued on its CPU. With
/// a cgroup per check a kworker preempts it thousands of times a second
/// (each leaf's `cgroup.events` notification), and each time it queues
/// again: CPUs went idle, every check in flight an unreaped zombie, while the
/// loop waited (docs/PERFORMANCE.md). EEVDF picks a runnable task with a
/// short slice sooner and lets it preempt on wake-up, without giving it a
/// larger share of the CPU (Linux 6.12; older kernels ignore it).
const LOOP_SLICE: Duration = Duration::from_micros(100);

/// Ask for `LOOP_SLICE` on the calling thread, the loop, which runs at
/// `policy` and `nice`: `sched_setattr` with `SCHED_RESET_ON_FORK`, so that
/// checks start with the default slice. Only for an ordinary thread at nice
/// 0 or above: at a negative nice, resetting on fork would take that nice
/// from the checks, and `SCHED_BATCH`/`SCHED_IDLE` or realtime were chosen
/// by the administrator.
fn ask_for_short_slice(policy: libc::c_int, nice: i32) {
    if policy != libc::SCHED_OTHER || nice < 0 {
        tracing::debug!(
            "short loop slice not asked for: the loop runs at policy {policy}, nice {nice}"
        );
        return;
    }
    // `struct sched_attr` as of Linux 3.14 (SCHED_ATTR_SIZE_VER0, 48 bytes):
    // every kernel with `sched_setattr` knows it.
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        sched_policy: u32,
        sched_flags: u64,
        sched_nice: i32,
        sched_priority: u32,
        sched_runtime: u64,
        sched_deadline: u64,
        sched_period: u64,
    }
    const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: SCHED_FLAG_RESET_ON_FORK,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: LOOP_SLICE.as_nanos() as u64,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: sched_setattr(0, attr, 0) on the calling thread; `attr` is a
    // valid, fully initialised SCHED_ATTR_SIZE_VER0 struct that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc == 0 {
        tracing::debug!("the loop asks for a {LOOP_SLICE:?} scheduler slice");
    } else {
        // ENOSYS (before 3.14), EPERM (a seccomp filter), EINVAL: the
        // default slice, as before.
        let e = std::io::Error::last_os_error();
        tracing::debug!("short loop slice refused ({e}): the default slice");
    }
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The calling thread's nice value.
fn current_nice() -> i32 {
    // SAFETY: getpriority(PRIO_PROCESS, 0) on the calling thread; the raw
    // system call returns 20 - nice (1..=40), never an ambiguous -1.
    let r = unsafe { libc::syscall(libc::SYS_getpriority, libc::PRIO_PROCESS, 0) };
    if r > 0 { 20 - r as i32 } else { 0 }
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

    /// Run `f` on a thread of its own: the scheduling policy is per thread.
    fn on_own_thread(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(f).join().expect("thread");
    }

    #[test]
    fn raises_and_lowers_or_stays_ordinary_when_refused() {
        on_own_thread(|| {
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
        });
    }

    #[test]
    fn wakes_ahead_of_a_far_timer_to_be_realtime_at_it() {
        on_own_thread(|| {
            let now = Instant::now();
            let far = now + Duration::from_secs(1);
            let near = now + Duration::from_millis(5);
            let mut off = LoopPriority::new(false);
            assert_eq!(off.before_wait(Some(far), now), Some(far));
            assert_eq!(off.before_wait(None, now), None);
            let mut p = LoopPriority::new(true);
            if !p.available() {
                // Refused here (no CAP_SYS_NICE, no RLIMIT_RTPRIO): never
                // woken early for a priority it cannot take.
                assert_eq!(p.before_wait(Some(far), now), Some(far));
                assert_eq!(p.before_wait(Some(near), now), Some(near));
                assert!(!p.is_raised());
                assert_eq!(current_policy(), libc::SCHED_OTHER);
                return;
            }
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
        });
    }

    #[test]
    fn a_loop_kept_busy_while_realtime_is_made_ordinary() {
        on_own_thread(|| {
            let mut p = LoopPriority::new(true);
            let now = Instant::now();
            p.before_wait(Some(now + Duration::from_millis(5)), now);
            if !p.is_raised() {
                return; // Not permitted here: nothing to meter.
            }
            // Twice the burst of CPU at realtime priority: overdrawn.
            let until = Instant::now() + BUDGET_BURST * 2;
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            let now = Instant::now();
            p.before_wait(Some(now + Duration::from_millis(5)), now);
            assert!(!p.is_raised(), "still realtime after its budget ran out");
            assert_eq!(current_policy(), libc::SCHED_OTHER);
        });
    }
}
