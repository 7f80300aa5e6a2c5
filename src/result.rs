//! `CheckResult`: how a check ended, what it printed, and how long each stage took.

use crate::nagios_state::State;
use crate::plugin_output::PluginOutput;
use std::time::Duration;

/// How a reaped process ended, as `waitid` reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(tag = "kind", rename_all = "snake_case"))]
pub enum ExitStatus {
    /// `exit(code)`.
    Exited {
        /// The exit code (0..=255).
        code: i32,
    },
    /// Ended by a signal.
    Signaled {
        /// The signal number.
        signal: i32,
        /// Whether a core was dumped.
        core_dumped: bool,
    },
}

impl ExitStatus {
    /// The raw wait(2) status word (`code << 8`, or the signal | 0x80 for a core).
    pub fn wait_status(self) -> i32 {
        match self {
            ExitStatus::Exited { code } => (code & 0xff) << 8,
            ExitStatus::Signaled {
                signal,
                core_dumped,
            } => signal | if core_dumped { 0x80 } else { 0 },
        }
    }
}

/// How the check ended, from the executor's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(tag = "kind", rename_all = "snake_case"))]
pub enum Outcome {
    /// The plugin exited by itself.
    Exited {
        /// Its exit code.
        code: i32,
    },
    /// The plugin died of a signal nobody in the executor sent (a crash).
    Signaled {
        /// The signal number.
        signal: i32,
        /// Whether a core was dumped.
        core_dumped: bool,
    },
    /// The deadline passed; the executor signalled the check.
    TimedOut {
        /// The timeout that was exceeded, in milliseconds.
        timeout_ms: u64,
        /// The last signal the executor sent (SIGTERM, or SIGKILL after escalation).
        signal: i32,
        /// Whether SIGTERM was not enough and SIGKILL was needed.
        escalated: bool,
    },
    /// Cancelled on request; the check was killed.
    Cancelled,
    /// The executor shut down while the check was queued or running.
    Shutdown,
    /// The check could not be started.
    SpawnFailed {
        /// The errno, when the kernel gave one.
        errno: Option<i32>,
        /// What went wrong, for a person.
        message: String,
    },
}

/// One captured output stream, capped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Output {
    /// The bytes kept (at most the cap), as text (invalid UTF-8 replaced).
    #[cfg_attr(feature = "serde", serde(with = "lossy"))]
    pub data: Vec<u8>,
    /// Whether bytes were dropped because the cap was reached.
    pub truncated: bool,
    /// How many bytes were read but dropped.
    pub dropped_bytes: u64,
}

impl Output {
    /// The kept bytes as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

#[cfg(feature = "serde")]
mod lossy {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&String::from_utf8_lossy(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(String::deserialize(d)?.into_bytes())
    }
}

/// Resource usage of the reaped leader (and its reaped descendants), from `waitid`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Rusage {
    /// User CPU time, microseconds.
    pub user_us: u64,
    /// System CPU time, microseconds.
    pub system_us: u64,
    /// Peak resident set size, KiB.
    pub max_rss_kb: u64,
}

/// When each stage of the check happened, relative to its submission.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Timings {
    /// Wall-clock time of submission, microseconds since the Unix epoch.
    pub submitted_unix_us: u64,
    /// Wall-clock time the child started, microseconds since the Unix epoch (0 if never).
    pub started_unix_us: u64,
    /// Wall-clock time the leader was seen exited, microseconds since the Unix epoch (0 if never).
    pub exited_unix_us: u64,
    /// Submission → admitted into a running slot.
    #[cfg_attr(feature = "serde", serde(with = "micros"))]
    pub queue_wait: Duration,
    /// The spawn call itself (pipes, clone + exec, pidfd).
    #[cfg_attr(feature = "serde", serde(with = "micros"))]
    pub spawn: Duration,
    /// Child existed → leader seen exited.
    #[cfg_attr(feature = "serde", serde(with = "micros"))]
    pub run: Duration,
    /// Deadline → first signal sent (only when the check timed out).
    #[cfg_attr(feature = "serde", serde(with = "opt_micros"))]
    pub kill_lateness: Option<Duration>,
    /// Leader seen exited → reaped.
    #[cfg_attr(feature = "serde", serde(with = "micros"))]
    pub exit_to_reaped: Duration,
    /// Leader seen exited → result delivered.
    #[cfg_attr(feature = "serde", serde(with = "micros"))]
    pub exit_to_delivered: Duration,
    /// Submission → result delivered.
    #[cfg_attr(feature = "serde", serde(with = "micros"))]
    pub total: Duration,
}

#[cfg(feature = "serde")]
mod micros {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_micros() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_micros(u64::deserialize(d)?))
    }
}

#[cfg(feature = "serde")]
mod opt_micros {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_micros() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_micros))
    }
}

/// Everything known about one finished check. Exactly one per accepted check.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CheckResult {
    /// The id the executor gave the check at submission.
    pub id: u64,
    /// The tag set on the check, echoed back.
    pub tag: Option<String>,
    /// How the check ended.
    pub outcome: Outcome,
    /// The Nagios state.
    pub state: State,
    /// Why the state is what it is, when the plugin's exit code does not say it
    /// (timeout, crash, out-of-range code, spawn failure); empty otherwise.
    pub reason: String,
    /// The raw exit status of the leader, if it ran and was reaped.
    pub exit: Option<ExitStatus>,
    /// The leader's pid (for logs only: it may already belong to someone else).
    pub pid: Option<i32>,
    /// Captured standard output.
    pub stdout: Output,
    /// Captured standard error.
    pub stderr: Output,
    /// Output was still open when the drain bound after the reap ran out
    /// (a descendant held the pipe): what came later is lost.
    pub output_cut: bool,
    /// Standard output parsed as Nagios plugin output.
    pub plugin: PluginOutput,
    /// Stage timings.
    pub timings: Timings,
    /// Resource usage from the reap.
    pub rusage: Option<Rusage>,
    /// The usage of the check's cgroup leaf: every process it started
    /// (`None`: it ran without containment, or never ran).
    #[cfg_attr(feature = "serde", serde(default))]
    pub cgroup: Option<crate::cgroup::CgroupUsage>,
}

impl CheckResult {
    /// One line for a person: the reason (if any) and the plugin's text.
    pub fn summary(&self) -> String {
        match (self.reason.is_empty(), self.plugin.text.is_empty()) {
            (true, _) => self.plugin.text.clone(),
            (false, true) => self.reason.clone(),
            (false, false) => format!("{} ({})", self.reason, self.plugin.text),
        }
    }

    /// Whether the check ran into its timeout.
    pub fn timed_out(&self) -> bool {
        matches!(self.outcome, Outcome::TimedOut { .. })
    }
}

pub use crate::signal::signal_name;

/// Microseconds since the Unix epoch, as results give wall-clock times (0 before it).
pub fn unix_us(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_status_matches_wait_macros() {
        assert_eq!(ExitStatus::Exited { code: 2 }.wait_status(), 512);
        assert_eq!(
            ExitStatus::Signaled {
                signal: 9,
                core_dumped: false
            }
            .wait_status(),
            9
        );
        assert_eq!(
            ExitStatus::Signaled {
                signal: 11,
                core_dumped: true
            }
            .wait_status(),
            11 | 0x80
        );
    }

    #[cfg(feature = "serde")]
    #[test]
    fn output_serializes_as_text() {
        let o = Output {
            data: b"a\xffb".to_vec(),
            truncated: false,
            dropped_bytes: 0,
        };
        let json = serde_json::to_string(&o).unwrap();
        assert!(json.contains("a\u{fffd}b"), "{json}");
    }
}
