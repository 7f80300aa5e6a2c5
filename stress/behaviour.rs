//! The weighted mix of check behaviours, each one run by `pidring-plugin`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One kind of check behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Behaviour {
    /// Exit at once with 0, 1, 2, 3 or 42 (rotating).
    Exit,
    /// Sleep 10–100 ms, exit 0.
    ShortSleep,
    /// Sleep past the timeout; dies of SIGTERM.
    LongSleep,
    /// Ignore SIGTERM; needs SIGKILL.
    IgnoreTerm,
    /// Trap SIGTERM and exit just inside the grace window (the seed's race).
    TrapTermExitInGrace,
    /// Leave children in the process group (half of them also time out).
    GroupChildren,
    /// A grandchild escapes with setsid and outlives the check (finite).
    EscapeSetsid,
    /// A setsid grandchild holds stdout open after the leader exits.
    HoldStdout,
    /// Close stdout/stderr and keep running until the timeout.
    CloseStdoutSleep,
    /// Write far more than the output cap.
    Flood,
    /// Die of SIGSEGV.
    CrashSegv,
    /// Die of SIGABRT.
    CrashAbort,
    /// The binary does not exist.
    Missing,
}

impl Behaviour {
    /// Every behaviour, in report order.
    pub const ALL: [Behaviour; 13] = [
        Behaviour::Exit,
        Behaviour::ShortSleep,
        Behaviour::LongSleep,
        Behaviour::IgnoreTerm,
        Behaviour::TrapTermExitInGrace,
        Behaviour::GroupChildren,
        Behaviour::EscapeSetsid,
        Behaviour::HoldStdout,
        Behaviour::CloseStdoutSleep,
        Behaviour::Flood,
        Behaviour::CrashSegv,
        Behaviour::CrashAbort,
        Behaviour::Missing,
    ];

    /// Name used in reports and profile files.
    pub fn name(self) -> &'static str {
        match self {
            Behaviour::Exit => "exit",
            Behaviour::ShortSleep => "short_sleep",
            Behaviour::LongSleep => "long_sleep",
            Behaviour::IgnoreTerm => "ignore_term",
            Behaviour::TrapTermExitInGrace => "trap_term_exit_in_grace",
            Behaviour::GroupChildren => "group_children",
            Behaviour::EscapeSetsid => "escape_setsid",
            Behaviour::HoldStdout => "hold_stdout",
            Behaviour::CloseStdoutSleep => "close_stdout_sleep",
            Behaviour::Flood => "flood",
            Behaviour::CrashSegv => "crash_segv",
            Behaviour::CrashAbort => "crash_abort",
            Behaviour::Missing => "missing_binary",
        }
    }

    /// Default weight: mostly well-behaved checks, every nasty one present.
    pub fn default_weight(self) -> u32 {
        match self {
            Behaviour::Exit => 40,
            Behaviour::ShortSleep => 20,
            Behaviour::LongSleep => 4,
            Behaviour::IgnoreTerm => 3,
            Behaviour::TrapTermExitInGrace => 6,
            Behaviour::GroupChildren => 5,
            Behaviour::EscapeSetsid => 3,
            Behaviour::HoldStdout => 3,
            Behaviour::CloseStdoutSleep => 3,
            Behaviour::Flood => 3,
            Behaviour::CrashSegv => 2,
            Behaviour::CrashAbort => 2,
            Behaviour::Missing => 2,
        }
    }

    /// Whether the check is meant to hit its deadline.
    pub fn expects_timeout(self, seq: u64) -> bool {
        match self {
            Behaviour::LongSleep
            | Behaviour::IgnoreTerm
            | Behaviour::TrapTermExitInGrace
            | Behaviour::CloseStdoutSleep => true,
            Behaviour::GroupChildren => seq % 2 == 1,
            _ => false,
        }
    }

    /// Look a behaviour up by name.
    pub fn from_name(name: &str) -> Option<Behaviour> {
        Behaviour::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// The longest any process a behaviour starts can live, in ms (escaped
/// grandchildren included): the harness waits this long for orphans.
pub const LONGEST_LIFE_MS: u64 = 3_000;

/// How to run one submission.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Submission number (0-based).
    pub seq: u64,
    /// What it does.
    pub behaviour: Behaviour,
    /// Program and arguments.
    pub argv: Vec<String>,
}

/// A weighted, deterministic mix: submission `seq` gets the behaviour at
/// position `seq * stride mod total` of the weight line, so any window of
/// `total` submissions holds each behaviour exactly its weight times.
#[derive(Debug, Clone)]
pub struct Mix {
    /// Cumulative weights, in `Behaviour::ALL` order, zero weights dropped.
    cumulative: Vec<(u64, Behaviour)>,
    total: u64,
    stride: u64,
    plugin: PathBuf,
    timeout_ms: u64,
    grace_ms: u64,
}

impl Mix {
    /// A mix from default weights overridden by `weights` (unknown names are an error).
    pub fn new(
        weights: &BTreeMap<String, u32>,
        plugin: &Path,
        timeout_ms: u64,
        grace_ms: u64,
    ) -> Result<Mix, String> {
        for name in weights.keys() {
            if Behaviour::from_name(name).is_none() {
                let known: Vec<_> = Behaviour::ALL.iter().map(|b| b.name()).collect();
                return Err(format!(
                    "unknown behaviour {name:?} in weights (known: {})",
                    known.join(", ")
                ));
            }
        }
        let mut cumulative = Vec::new();
        let mut total = 0u64;
        for b in Behaviour::ALL {
            let w = weights.get(b.name()).copied().unwrap_or(b.default_weight());
            if w > 0 {
                total += w as u64;
                cumulative.push((total, b));
            }
        }
        if total == 0 {
            return Err("every behaviour weight is 0".into());
        }
        // A stride coprime with the total spreads each behaviour evenly
        // instead of in runs of its weight.
        let stride = (total * 5 / 8..total + 64)
            .find(|s| *s > 0 && gcd(*s, total) == 1)
            .unwrap_or(1);
        Ok(Mix {
            cumulative,
            total,
            stride,
            plugin: plugin.to_path_buf(),
            timeout_ms,
            grace_ms,
        })
    }

    /// Sum of the weights (the mix repeats every `total()` submissions).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The behaviour of submission `seq`.
    pub fn pick(&self, seq: u64) -> Behaviour {
        let slot = (seq % self.total) * self.stride % self.total;
        self.cumulative
            .iter()
            .find(|(upto, _)| slot < *upto)
            .map(|(_, b)| *b)
            .unwrap_or(Behaviour::Exit)
    }

    /// The behaviours with a non-zero weight.
    pub fn present(&self) -> Vec<Behaviour> {
        self.cumulative.iter().map(|(_, b)| *b).collect()
    }

    /// The full spec of submission `seq`.
    pub fn spec(&self, seq: u64) -> Spec {
        let behaviour = self.pick(seq);
        Spec {
            seq,
            behaviour,
            argv: self.argv(behaviour, seq),
        }
    }

    fn argv(&self, b: Behaviour, seq: u64) -> Vec<String> {
        let plugin = self.plugin.display().to_string();
        let past_deadline = (self.timeout_ms + self.grace_ms) * 4;
        // A cheap per-submission jitter in 0..100.
        let jitter = seq.wrapping_mul(2_654_435_761) % 100;
        let args: Vec<String> = match b {
            Behaviour::Exit => {
                let code = [0, 1, 2, 3, 42][(seq / self.total % 5) as usize];
                vec!["exit".into(), code.to_string()]
            }
            Behaviour::ShortSleep => vec!["sleep".into(), (10 + jitter * 9 / 10).to_string()],
            Behaviour::LongSleep => vec!["sleep".into(), past_deadline.to_string()],
            Behaviour::IgnoreTerm => vec!["ignore-term".into(), past_deadline.to_string()],
            Behaviour::TrapTermExitInGrace => {
                // Exit 0–49 ms before SIGKILL is due: under load the two race.
                let delay = self.grace_ms.saturating_sub(1 + jitter / 2);
                vec![
                    "trap-term-exit-after".into(),
                    past_deadline.to_string(),
                    delay.to_string(),
                ]
            }
            Behaviour::GroupChildren => {
                let lead = if seq % 2 == 1 { past_deadline } else { 0 };
                vec![
                    "group-children".into(),
                    "2".into(),
                    "30000".into(),
                    lead.to_string(),
                ]
            }
            Behaviour::EscapeSetsid => vec!["escape".into(), LONGEST_LIFE_MS.to_string()],
            Behaviour::HoldStdout => vec!["hold-stdout".into(), "2000".into()],
            Behaviour::CloseStdoutSleep => {
                vec!["close-stdout-sleep".into(), past_deadline.to_string()]
            }
            Behaviour::Flood => vec!["flood".into(), (1 << 20).to_string()],
            Behaviour::CrashSegv => vec!["crash".into(), "segv".into()],
            Behaviour::CrashAbort => vec!["crash".into(), "abort".into()],
            Behaviour::Missing => {
                return vec![format!(
                    "/nonexistent/pidring-stress/check_missing_{}",
                    seq % 7
                )];
            }
        };
        std::iter::once(plugin).chain(args).collect()
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix(weights: &[(&str, u32)]) -> Mix {
        let w = weights.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        Mix::new(&w, Path::new("/p"), 1000, 500).unwrap()
    }

    #[test]
    fn each_window_holds_each_behaviour_by_weight() {
        let m = mix(&[]);
        let mut counts = BTreeMap::new();
        for seq in 0..m.total() * 3 {
            *counts.entry(m.pick(seq)).or_insert(0u64) += 1;
        }
        for b in Behaviour::ALL {
            assert_eq!(counts[&b], 3 * b.default_weight() as u64, "{b:?}");
        }
        // Spread out: the first 30 submissions already hold several behaviours.
        let early: std::collections::BTreeSet<_> = (0..30).map(|s| m.pick(s)).collect();
        assert!(early.len() >= 5, "{early:?}");
    }

    #[test]
    fn weights_override_and_zero_removes() {
        let m = mix(&[("flood", 0), ("exit", 1), ("missing_binary", 9)]);
        assert!(!m.present().contains(&Behaviour::Flood));
        let n_missing = (0..m.total())
            .filter(|s| m.pick(*s) == Behaviour::Missing)
            .count();
        assert_eq!(n_missing, 9);
        let w = [("wobble".to_string(), 1)].into_iter().collect();
        assert!(
            Mix::new(&w, Path::new("/p"), 1, 1)
                .unwrap_err()
                .contains("wobble")
        );
        let zero = Behaviour::ALL
            .iter()
            .map(|b| (b.name().to_string(), 0))
            .collect();
        assert!(Mix::new(&zero, Path::new("/p"), 1, 1).is_err());
    }

    #[test]
    fn argv_matches_behaviour() {
        let m = mix(&[]);
        for seq in 0..m.total() {
            let s = m.spec(seq);
            match s.behaviour {
                Behaviour::Missing => assert!(s.argv[0].starts_with("/nonexistent/")),
                _ => assert_eq!(s.argv[0], "/p"),
            }
            if s.behaviour == Behaviour::TrapTermExitInGrace {
                let delay: u64 = s.argv[3].parse().unwrap();
                assert!((450..500).contains(&delay), "{delay}");
            }
        }
    }
}
