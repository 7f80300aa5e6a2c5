//! What the harness keeps of each result, whatever executor produced it.

use pidring::{CheckResult, Outcome, Stage};
use serde::{Deserialize, Serialize};

/// How a check ended, reduced to what the reports count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Ending {
    /// Exited by itself with a code.
    Exited(i32),
    /// Died of a signal nobody in the executor sent.
    Signaled(i32),
    /// Timed out; SIGTERM was enough.
    TimedOutTerm,
    /// Timed out; SIGKILL was needed.
    TimedOutKill,
    /// Could not be started.
    SpawnFailed,
    /// Cancelled.
    Cancelled,
    /// Ended by executor shutdown.
    Shutdown,
    /// The daemon answered with an error instead of a result.
    Error,
}

impl Ending {
    /// Short label for tables.
    pub fn label(self) -> String {
        match self {
            Ending::Exited(c) => format!("exited({c})"),
            Ending::Signaled(s) => format!("signaled({s})"),
            Ending::TimedOutTerm => "timed_out(TERM)".into(),
            Ending::TimedOutKill => "timed_out(KILL)".into(),
            Ending::SpawnFailed => "spawn_failed".into(),
            Ending::Cancelled => "cancelled".into(),
            Ending::Shutdown => "shutdown".into(),
            Ending::Error => "error".into(),
        }
    }

    /// Whether the executor timed the check out.
    pub fn timed_out(self) -> bool {
        matches!(self, Ending::TimedOutTerm | Ending::TimedOutKill)
    }
}

/// One result, as the harness keeps it.
#[derive(Debug, Clone)]
pub struct Record {
    /// The harness's submission number.
    pub seq: u64,
    /// How it ended.
    pub ending: Ending,
    /// The leader's pid, if it was started.
    pub pid: Option<i32>,
    /// Microseconds per stage, in `Stage::ALL` order (None: stage not reached).
    pub stages_us: [Option<u64>; Stage::ALL.len()],
    /// When the harness received it, µs since the run started.
    pub received_us: u64,
    /// Whether output was cut at the drain bound.
    pub output_cut: bool,
    /// Whether stdout was truncated at the cap.
    pub truncated: bool,
}

impl Record {
    /// A record from an engine result.
    pub fn from_result(seq: u64, r: &CheckResult, received_us: u64) -> Record {
        let ending = match &r.outcome {
            Outcome::Exited { code } => Ending::Exited(*code),
            Outcome::Signaled { signal, .. } => Ending::Signaled(*signal),
            Outcome::TimedOut { escalated, .. } => {
                if *escalated {
                    Ending::TimedOutKill
                } else {
                    Ending::TimedOutTerm
                }
            }
            Outcome::Cancelled => Ending::Cancelled,
            Outcome::Shutdown => Ending::Shutdown,
            Outcome::SpawnFailed { .. } => Ending::SpawnFailed,
        };
        let mut stages_us = [None; Stage::ALL.len()];
        for (stage, d) in Stage::durations(r) {
            stages_us[stage.index()] = Some(d.as_micros() as u64);
        }
        Record {
            seq,
            ending,
            pid: r.pid,
            stages_us,
            received_us,
            output_cut: r.output_cut,
            truncated: r.stdout.truncated,
        }
    }

    /// The value of one stage.
    pub fn stage(&self, stage: Stage) -> Option<u64> {
        self.stages_us[stage.index()]
    }
}
