//! What the submitting side and the loop share: the counters, limits and
//! metrics both read, and the callback a result is delivered through. It
//! sits below both (the executor creates it, the loop runs on it).

use crate::metrics::Metrics;
use crate::result::CheckResult;
use crate::waker::Waker;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

/// A callback that receives a check's one result, on the loop thread (keep it short).
pub(crate) type Deliver = Box<dyn FnOnce(CheckResult) + Send>;

/// State shared by the submitting side and the loop.
pub(crate) struct Shared {
    /// Accepted checks whose result is not delivered yet.
    pub outstanding: AtomicUsize,
    /// Checks holding a running slot (spawning, running or draining).
    pub running: AtomicUsize,
    /// Checks accepted since the start.
    pub submitted: AtomicU64,
    /// Set once shutdown began: nothing new is accepted.
    pub closed: AtomicBool,
    /// Wakes the loop.
    pub waker: Arc<Waker>,
    /// Histograms and counters.
    pub metrics: Mutex<Metrics>,
    /// Running-slot limit (changed live by `Executor::set_max_running`).
    pub max_running: AtomicUsize,
    /// Waiting-queue limit (changed live by `Executor::set_queue_limit`).
    pub queue_limit: AtomicUsize,
    /// The loop may take `SCHED_FIFO` near kills (asked for and permitted).
    pub realtime_kills: AtomicBool,
    /// Realtime kills are asked for (`Executor::set_realtime_kills`).
    pub realtime_wanted: AtomicBool,
    /// Which containment is in force (set by the loop at start).
    pub containment: Mutex<crate::cgroup::ContainmentStatus>,
}
