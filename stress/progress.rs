//! The live progress line: an indicatif spinner on a terminal, plain lines otherwise.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// What the line shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    /// Seconds since the start.
    pub elapsed: f64,
    /// Planned run length, seconds (if time-bound).
    pub total: Option<f64>,
    /// Submissions so far.
    pub submitted: u64,
    /// Results so far.
    pub completed: u64,
    /// Checks running now.
    pub running: usize,
    /// Checks waiting for a slot.
    pub queued: usize,
    /// p99 of submit→result so far, µs.
    pub p99_us: u64,
    /// Timed-out results so far.
    pub timeouts: u64,
    /// Refused submissions so far.
    pub rejected: u64,
}

/// The progress reporter.
pub struct Progress {
    bar: Option<ProgressBar>,
    last_plain: Instant,
    last: Option<(Instant, u64)>,
    rate: f64,
}

impl Progress {
    /// A spinner when stderr is a terminal, else plain lines every few seconds.
    pub fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(5));
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b
        });
        Progress {
            bar,
            last_plain: Instant::now(),
            last: None,
            rate: 0.0,
        }
    }

    /// Show a new state.
    pub fn update(&mut self, s: &Snapshot) {
        let now = Instant::now();
        match self.last {
            Some((t, n)) if now - t >= Duration::from_millis(500) => {
                self.rate = (s.completed - n) as f64 / (now - t).as_secs_f64();
                self.last = Some((now, s.completed));
            }
            None => self.last = Some((now, s.completed)),
            _ => {}
        }
        let line = self.line(s);
        match &self.bar {
            Some(b) => {
                b.set_message(line);
                b.tick();
            }
            None => {
                if now - self.last_plain >= Duration::from_secs(5) {
                    self.last_plain = now;
                    eprintln!("{line}");
                }
            }
        }
    }

    fn line(&self, s: &Snapshot) -> String {
        let total = s
            .total
            .map(|t| format!("{t:.0}s"))
            .unwrap_or_else(|| "-".into());
        format!(
            "{:>6.0} checks/s | in flight {:>5} | queued {:>5} | p99 {:>8} | timeouts {:>6} | rejected {} | done {}/{} | {:.0}s/{}",
            self.rate,
            s.running,
            s.queued,
            pidring::metrics::fmt_us(s.p99_us),
            s.timeouts,
            s.rejected,
            s.completed,
            s.submitted,
            s.elapsed,
            total
        )
    }

    /// Remove the live line.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
