//! Per-stage latency histograms (HdrHistogram) and counters kept by the executor.

use crate::result::{CheckResult, Outcome};
use hdrhistogram::Histogram;
use std::time::Duration;

/// A timed stage of a check's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Stage {
    /// Submission → admitted into a running slot.
    QueueWait,
    /// Admitted → child exists.
    Spawn,
    /// Child exists → leader seen exited.
    Run,
    /// Deadline → first signal sent.
    KillLateness,
    /// Leader seen exited → reaped.
    ExitToReaped,
    /// Leader seen exited → result delivered.
    ExitToDelivered,
    /// Submission → result delivered.
    Total,
}

impl Stage {
    /// Every stage, in lifecycle order.
    pub const ALL: [Stage; 7] = [
        Stage::QueueWait,
        Stage::Spawn,
        Stage::Run,
        Stage::KillLateness,
        Stage::ExitToReaped,
        Stage::ExitToDelivered,
        Stage::Total,
    ];

    /// Its position in `Stage::ALL` (declared in the same order).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The stages a result went through, with their durations (a stage it
    /// never reached, such as the run of a check that never started, is
    /// left out). One place decides this for the executor's histograms and
    /// for anyone recording results the same way.
    pub fn durations(r: &CheckResult) -> impl Iterator<Item = (Stage, Duration)> {
        let t = &r.timings;
        let (started, exited) = (r.pid.is_some(), r.exit.is_some());
        [
            (Stage::QueueWait, Some(t.queue_wait)),
            (Stage::Spawn, started.then_some(t.spawn)),
            (Stage::Run, exited.then_some(t.run)),
            (Stage::KillLateness, t.kill_lateness),
            (Stage::ExitToReaped, exited.then_some(t.exit_to_reaped)),
            (
                Stage::ExitToDelivered,
                exited.then_some(t.exit_to_delivered),
            ),
            (Stage::Total, Some(t.total)),
        ]
        .into_iter()
        .filter_map(|(stage, d)| Some((stage, d?)))
    }

    /// snake_case name, used in JSON, Prometheus and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::QueueWait => "queue_wait",
            Stage::Spawn => "spawn",
            Stage::Run => "run",
            Stage::KillLateness => "kill_lateness",
            Stage::ExitToReaped => "exit_to_reaped",
            Stage::ExitToDelivered => "exit_to_delivered",
            Stage::Total => "total",
        }
    }
}

/// Counters of what the executor did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Counters {
    /// Checks accepted.
    pub submitted: u64,
    /// Checks refused (queue full, shutting down, invalid).
    pub rejected: u64,
    /// Results delivered (all outcomes).
    pub completed: u64,
    /// Results whose plugin exited by itself.
    pub exited: u64,
    /// Results of plugins that died of a signal nobody here sent.
    pub signaled: u64,
    /// Results of checks that timed out.
    pub timed_out: u64,
    /// Timed-out checks that needed SIGKILL after SIGTERM.
    pub escalated: u64,
    /// Checks that could not be started.
    pub spawn_failed: u64,
    /// Checks cancelled on request.
    pub cancelled: u64,
    /// Checks ended by shutdown.
    pub shutdown: u64,
    /// Results whose output was cut after the drain bound.
    pub output_cut: u64,
    /// Descendants of checks re-parented to the executor and reaped by it
    /// (subreaper mode): escaped with setsid, or group members that outlived
    /// their leader's reap (killed by the sweep, collected here).
    pub orphans_reaped: u64,
    /// Processes found alive in a check's cgroup leaf when its leader
    /// exited (killed with the leaf, unless the check opted out).
    #[cfg_attr(feature = "serde", serde(default))]
    pub cgroup_escapees: u64,
}

/// The executor's live metrics (owned by the loop, behind a mutex).
pub(crate) struct Metrics {
    stages: Vec<Histogram<u64>>,
    pub counters: Counters,
}

/// Highest value a histogram records, in microseconds (1 hour); larger values are clamped.
const MAX_US: u64 = 3_600_000_000;

impl Metrics {
    /// Empty histograms (microsecond resolution, 3 significant digits).
    pub fn new() -> Metrics {
        Metrics {
            stages: Stage::ALL
                .iter()
                .map(|_| Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"))
                .collect(),
            counters: Counters::default(),
        }
    }

    /// Record one stage duration.
    pub fn record(&mut self, stage: Stage, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, MAX_US);
        let _ = self.stages[stage.index()].record(us);
    }

    /// Account one delivered result, from what the metrics keep of it.
    pub(crate) fn record_summary(&mut self, s: &ResultSummary) {
        let c = &mut self.counters;
        c.completed += 1;
        match s.outcome {
            OutcomeKind::Exited => c.exited += 1,
            OutcomeKind::Signaled => c.signaled += 1,
            OutcomeKind::TimedOut { escalated } => {
                c.timed_out += 1;
                if escalated {
                    c.escalated += 1;
                }
            }
            OutcomeKind::Cancelled => c.cancelled += 1,
            OutcomeKind::Shutdown => c.shutdown += 1,
            OutcomeKind::SpawnFailed => c.spawn_failed += 1,
        }
        if s.output_cut {
            c.output_cut += 1;
        }
        c.cgroup_escapees += u64::from(s.escapees);
        for (stage, d) in Stage::ALL.iter().zip(s.stages) {
            if let Some(d) = d {
                self.record(*stage, d);
            }
        }
    }

    /// A copy for readers.
    pub fn snapshot(
        &self,
        running: usize,
        queued: usize,
        backend: &'static str,
    ) -> MetricsSnapshot {
        MetricsSnapshot {
            backend: backend.to_string(),
            realtime_kills: false,
            containment: Default::default(),
            running,
            queued,
            counters: self.counters,
            stages: Stage::ALL
                .iter()
                .zip(&self.stages)
                .map(|(s, h)| StageSnapshot::from_histogram(*s, h))
                .collect(),
        }
    }

    /// Copies of the full histograms (kept out of `snapshot`: copying them
    /// all under the lock the loop takes for every result costs too much
    /// for a `stats` request or a scrape).
    pub fn histograms(&self) -> Vec<(Stage, Histogram<u64>)> {
        Stage::ALL
            .iter()
            .copied()
            .zip(self.stages.iter().cloned())
            .collect()
    }
}

/// Percentiles of one stage.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct StageSnapshot {
    /// Which stage.
    pub stage: Stage,
    /// Its latency distribution (flattened into the stage's JSON object).
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub latency: Percentiles,
}

impl StageSnapshot {
    /// Percentiles of `h`.
    pub fn from_histogram(stage: Stage, h: &Histogram<u64>) -> StageSnapshot {
        StageSnapshot {
            stage,
            latency: Percentiles::of(h),
        }
    }
}

/// Summary of a latency histogram, in microseconds.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest value.
    pub max_us: u64,
    /// Mean (absent from summaries written before it was kept).
    #[cfg_attr(feature = "serde", serde(default))]
    pub mean_us: f64,
}

impl Percentiles {
    /// Percentiles of `h`.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// What the metrics keep of one result: small and `Copy`, so that the loop
/// can hold a few while a reader has the metrics locked, instead of waiting
/// for it (a realtime loop waiting on an ordinary thread).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResultSummary {
    outcome: OutcomeKind,
    output_cut: bool,
    escapees: u32,
    /// Per stage, in `Stage::ALL` order.
    stages: [Option<Duration>; Stage::ALL.len()],
}

/// The counter an outcome goes to.
#[derive(Debug, Clone, Copy)]
enum OutcomeKind {
    Exited,
    Signaled,
    TimedOut { escalated: bool },
    Cancelled,
    Shutdown,
    SpawnFailed,
}

impl ResultSummary {
    /// The summary of `r`.
    pub(crate) fn of(r: &CheckResult) -> ResultSummary {
        let outcome = match &r.outcome {
            Outcome::Exited { .. } => OutcomeKind::Exited,
            Outcome::Signaled { .. } => OutcomeKind::Signaled,
            Outcome::TimedOut { escalated, .. } => OutcomeKind::TimedOut {
                escalated: *escalated,
            },
            Outcome::Cancelled => OutcomeKind::Cancelled,
            Outcome::Shutdown => OutcomeKind::Shutdown,
            Outcome::SpawnFailed { .. } => OutcomeKind::SpawnFailed,
        };
        let mut stages = [None; Stage::ALL.len()];
        for (stage, d) in Stage::durations(r) {
            stages[stage.index()] = Some(d);
        }
        ResultSummary {
            outcome,
            output_cut: r.output_cut,
            escapees: r.cgroup.map_or(0, |c| c.escapees),
            stages,
        }
    }
}

/// A point-in-time copy of the executor's metrics.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MetricsSnapshot {
    /// The backend in use (`io_uring` or `epoll`).
    pub backend: String,
    /// Whether the loop takes `SCHED_FIFO` near kills (asked for, and
    /// permitted: see `ExecutorBuilder::realtime_kills`).
    #[cfg_attr(feature = "serde", serde(default))]
    pub realtime_kills: bool,
    /// Which containment is in force (see `ExecutorBuilder::cgroup`).
    #[cfg_attr(feature = "serde", serde(default))]
    pub containment: crate::cgroup::ContainmentStatus,
    /// Checks running now (spawning, running, or draining).
    pub running: usize,
    /// Checks waiting for a running slot.
    pub queued: usize,
    /// Counters since the executor started.
    pub counters: Counters,
    /// Percentiles per stage.
    pub stages: Vec<StageSnapshot>,
}

impl MetricsSnapshot {
    /// The percentiles of one stage.
    pub fn stage(&self, stage: Stage) -> Option<&StageSnapshot> {
        self.stages.iter().find(|s| s.stage == stage)
    }

    /// A table of percentiles per stage, for people.
    pub fn render_table(&self) -> String {
        render_percentile_table(self.stages.iter().map(|s| (s.stage.as_str(), &s.latency)))
    }
}

/// A table of percentiles, one row per named distribution, for people.
pub fn render_percentile_table<'a>(
    rows: impl IntoIterator<Item = (&'a str, &'a Percentiles)>,
) -> String {
    let mut out = format!(
        "{:<18} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "stage", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    for (name, p) in rows {
        out.push_str(&format!(
            "{:<18} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            name,
            p.count,
            fmt_us(p.p50_us),
            fmt_us(p.p90_us),
            fmt_us(p.p99_us),
            fmt_us(p.p999_us),
            fmt_us(p.max_us)
        ));
    }
    out
}

/// A microsecond count as a short human duration (`850µs`, `12.3ms`, `4.20s`).
pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_index_is_its_place_in_all() {
        for (i, stage) in Stage::ALL.iter().enumerate() {
            assert_eq!(stage.index(), i, "{stage:?}");
        }
    }

    #[test]
    fn records_and_reports_percentiles() {
        let mut m = Metrics::new();
        for i in 1..=100u64 {
            m.record(Stage::Run, Duration::from_millis(i));
        }
        let s = m.snapshot(0, 0, "epoll");
        let run = s.stage(Stage::Run).unwrap().latency.clone();
        assert_eq!(run.count, 100);
        assert!((49_000..=51_000).contains(&run.p50_us), "{run:?}");
        assert!(run.max_us >= 99_000);
        assert!(s.render_table().contains("run"));
        assert_eq!(fmt_us(1500), "1.5ms");
    }
}
