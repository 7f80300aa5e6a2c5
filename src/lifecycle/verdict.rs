//! A check's result: the one place one is built, for a check that ran
//! (`build_result`, with `verdict` writing its outcome, state and reason
//! text) and for one that never got a child (`unstarted_result`).

use super::*;

impl Lifecycle {
    /// The result, from what is known now (takes the captured output).
    pub(super) fn build_result(&mut self, now: Instant) -> CheckResult {
        let (outcome, state, reason) = self.verdict();
        let exited = self.clock.exited_at.or(self.clock.reaped_at);
        let since = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) => b.saturating_duration_since(a),
            _ => Duration::ZERO,
        };
        let wall = |at: Option<Instant>| {
            at.map(|at| {
                unix_us(self.clock.submitted_wall)
                    + at.saturating_duration_since(self.clock.submitted)
                        .as_micros() as u64
            })
            .unwrap_or(0)
        };
        let timings = Timings {
            submitted_unix_us: unix_us(self.clock.submitted_wall),
            started_unix_us: wall(self.clock.started),
            exited_unix_us: wall(exited),
            queue_wait: self
                .clock
                .dispatched
                .saturating_duration_since(self.clock.submitted),
            spawn: since(Some(self.clock.dispatched), self.clock.started),
            run: since(self.clock.started, exited),
            kill_lateness: match (
                self.ending.kill,
                self.clock.deadline,
                self.clock.first_signal_at,
            ) {
                (Some(KillReason::Timeout), Some(d), Some(s)) => {
                    Some(s.saturating_duration_since(d))
                }
                _ => None,
            },
            exit_to_reaped: since(exited, self.clock.reaped_at),
            exit_to_delivered: since(exited, Some(now)),
            total: now.saturating_duration_since(self.clock.submitted),
        };
        let plugin = crate::plugin_output::PluginOutput::parse(&self.stdout.out.data);
        CheckResult {
            id: self.id,
            tag: self.plan.tag.take(),
            outcome,
            state,
            reason,
            // A child that failed before `execve` never was the check.
            exit: self
                .ending
                .exit
                .filter(|_| self.ending.spawn_failure.is_none()),
            pid: (self.pid)
                .filter(|_| self.ending.spawn_failure.is_none())
                .map(|p| p.as_raw_nonzero().get()),
            stdout: std::mem::take(&mut self.stdout.out),
            stderr: std::mem::take(&mut self.stderr.out),
            output_cut: self.ending.output_cut,
            plugin,
            timings,
            rusage: self.ending.rusage,
            cgroup: match (self.leaf.as_mut(), self.clock.started) {
                (Some(l), Some(_)) => {
                    let left = l.wait || (self.ending.escapees > 0 && !l.leaf.killed());
                    Some(l.leaf.usage(self.ending.escapees, left))
                }
                _ => None,
            },
        }
    }

    /// For a cancel or a shutdown: that the kill was refused, if it was.
    fn refused_note(&self) -> String {
        match (self.ending.refused, self.killed_by_cgroup()) {
            (true, true) => format!("; {REFUSED}, and was killed through its cgroup"),
            (true, false) => format!("; {REFUSED} and ended by itself"),
            _ => String::new(),
        }
    }

    /// Whether the leader died of SIGKILL after its leaf's `cgroup.kill`
    /// was written (the one kill that reaches a process we may not signal).
    fn killed_by_cgroup(&self) -> bool {
        self.leaf.as_ref().is_some_and(|l| l.leaf.killed())
            && matches!(
                self.ending.exit,
                Some(ExitStatus::Signaled {
                    signal: libc::SIGKILL,
                    ..
                })
            )
    }

    /// Outcome, Nagios state and the reason text.
    fn verdict(&self) -> (Outcome, State, String) {
        if let Some(f) = &self.ending.spawn_failure {
            return (
                Outcome::SpawnFailed {
                    errno: f.errno,
                    message: f.message.clone(),
                },
                State::Unknown,
                f.message.clone(),
            );
        }
        match self.ending.kill {
            Some(KillReason::Timeout) => self.timeout_verdict(),
            Some(KillReason::Cancel) => (
                Outcome::Cancelled,
                State::Unknown,
                format!("Check cancelled{}", self.refused_note()),
            ),
            Some(KillReason::Shutdown) => (
                Outcome::Shutdown,
                State::Unknown,
                format!(
                    "Check killed: executor shutting down{}",
                    self.refused_note()
                ),
            ),
            None => self.exit_verdict(),
        }
    }

    /// A check that timed out: what was sent, and what it did.
    fn timeout_verdict(&self) -> (Outcome, State, String) {
        let sig = self.ending.last_signal.unwrap_or(Signal::TERM);
        if let Some(stuck) = &self.ending.never_started {
            return (
                Outcome::TimedOut {
                    timeout_ms: self.plan.timeout.as_millis() as u64,
                    signal: sig.as_raw(),
                    escalated: false,
                },
                self.plan.timeout_state,
                format!(
                    "Check timed out after {} before it could start its program: {stuck}; killed by SIGKILL",
                    human(self.plan.timeout)
                ),
            );
        }
        // Say what the signal did: a plugin may have been exiting
        // on its own as the deadline fell (or trap TERM and exit).
        let sent = if !self.ending.escalated {
            "sent SIGTERM".to_string()
        } else if self.plan.grace.is_zero() {
            "sent SIGTERM and SIGKILL (no grace)".to_string()
        } else {
            format!(
                "sent SIGTERM, then SIGKILL after {} grace",
                human(self.plan.grace)
            )
        };
        let how = match self.ending.exit {
            _ if self.ending.refused && self.killed_by_cgroup() => {
                format!(
                    "{REFUSED}, and was killed through its cgroup (cgroup.kill) after {} grace",
                    human(self.plan.grace)
                )
            }
            _ if self.ending.refused => {
                let end = match self.ending.exit {
                    Some(ExitStatus::Exited { code }) => format!("exited with code {code}"),
                    Some(ExitStatus::Signaled { signal, .. }) => {
                        format!("died of {}", signal_name(signal))
                    }
                    None => "ended".to_string(),
                };
                format!("{REFUSED} and {end} by itself")
            }
            Some(ExitStatus::Signaled {
                signal: libc::SIGKILL,
                ..
            }) if self.ending.escalated && self.plan.grace.is_zero() => {
                "killed by SIGKILL (no grace)".to_string()
            }
            Some(ExitStatus::Signaled {
                signal: libc::SIGKILL,
                ..
            }) if self.ending.escalated => format!(
                "ignored SIGTERM, killed by SIGKILL after {} grace",
                human(self.plan.grace)
            ),
            Some(ExitStatus::Signaled {
                signal: libc::SIGTERM,
                ..
            }) => "stopped by SIGTERM".to_string(),
            Some(ExitStatus::Exited { code }) => {
                format!("{sent}, it exited with code {code}")
            }
            Some(ExitStatus::Signaled { signal, .. }) => {
                format!("{sent}, it died of {}", signal_name(signal))
            }
            None => format!("{sent}, its exit status was lost"),
        };
        (
            Outcome::TimedOut {
                timeout_ms: self.plan.timeout.as_millis() as u64,
                signal: sig.as_raw(),
                escalated: self.ending.escalated,
            },
            self.plan.timeout_state,
            format!("Check timed out after {}; {how}", human(self.plan.timeout)),
        )
    }

    /// A check that ended by itself: its exit code or signal.
    fn exit_verdict(&self) -> (Outcome, State, String) {
        match self.ending.exit {
            Some(ExitStatus::Exited { code }) => match State::from_exit_code(code) {
                Some(state) => (Outcome::Exited { code }, state, String::new()),
                None => {
                    let why = match code {
                        126 => "plugin could not be executed (exit code 126)".to_string(),
                        127 => "plugin not found (exit code 127)".to_string(),
                        _ => format!("exit code {code} is out of bounds (0-3)"),
                    };
                    (Outcome::Exited { code }, State::Unknown, why)
                }
            },
            Some(ExitStatus::Signaled {
                signal,
                core_dumped,
            }) => (
                Outcome::Signaled {
                    signal,
                    core_dumped,
                },
                State::Unknown,
                format!(
                    "plugin killed by {}{}",
                    signal_name(signal),
                    if core_dumped { " (core dumped)" } else { "" }
                ),
            ),
            None => (
                Outcome::Shutdown,
                State::Unknown,
                "exit status lost: the child was reaped outside the executor (a waitpid(-1) elsewhere in this process, or SIGCHLD set to SIG_IGN after the executor started)".to_string(),
            ),
        }
    }
}

/// The result of a check that never got a child (cancelled or shut down while queued).
pub(crate) fn unstarted_result(
    limits: &Limits,
    id: u64,
    submitted: Instant,
    submitted_wall: SystemTime,
    outcome: Outcome,
    reason: &str,
) -> CheckResult {
    let now = Instant::now();
    let waited = now.saturating_duration_since(submitted);
    CheckResult {
        id,
        tag: limits.tag.clone(),
        outcome,
        state: State::Unknown,
        reason: reason.to_string(),
        exit: None,
        pid: None,
        stdout: Output::default(),
        stderr: Output::default(),
        output_cut: false,
        plugin: Default::default(),
        timings: Timings {
            submitted_unix_us: unix_us(submitted_wall),
            queue_wait: waited,
            total: waited,
            ..Timings::default()
        },
        rusage: None,
        cgroup: None,
    }
}
