//! Load profiles: how many checks should have been submitted by time `t`.
//!
//! A profile is a rate shape (`steady`, `spike`, `ramp`, `burst`) plus a length
//! (a duration, a count, or both: whichever ends first). The submitter asks
//! [`Profile::target_count`] how many submissions are due by now and submits
//! the difference, so a late submitter catches up instead of drifting.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The shape of the submission rate over time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "shape", rename_all = "snake_case")]
pub enum Shape {
    /// `rate` checks per second, all along.
    Steady {
        /// Checks per second.
        rate: f64,
    },
    /// `base` checks/s, and `base * factor` for `spike_secs` every `period_secs`
    /// (the first spike starts at `offset_secs`).
    Spike {
        /// Baseline checks per second.
        base: f64,
        /// Rate multiplier during a spike.
        factor: f64,
        /// Length of one spike, seconds.
        spike_secs: f64,
        /// Time from one spike's start to the next one's, seconds.
        period_secs: f64,
        /// When the first spike starts, seconds.
        offset_secs: f64,
    },
    /// A rate rising linearly from `from` to `to` over `over_secs` (then staying at `to`).
    Ramp {
        /// Starting checks per second.
        from: f64,
        /// Final checks per second.
        to: f64,
        /// Seconds the ramp takes.
        over_secs: f64,
    },
    /// `n` checks at once at t=0 and then every `every_secs` (0: once), over a `base` rate.
    Burst {
        /// Checks per burst.
        n: u64,
        /// Seconds between bursts; 0 for a single burst.
        every_secs: f64,
        /// Background checks per second between bursts.
        base: f64,
    },
}

/// A complete load profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Name shown in reports.
    #[serde(default)]
    pub name: String,
    /// The rate shape.
    #[serde(flatten)]
    pub shape: Shape,
    /// Run length in seconds (whichever of duration and count ends first).
    #[serde(default)]
    pub duration_secs: Option<f64>,
    /// Number of checks to submit.
    #[serde(default)]
    pub count: Option<u64>,
    /// Check timeout in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Time between SIGTERM and SIGKILL, in milliseconds.
    #[serde(default = "default_grace_ms")]
    pub grace_ms: u64,
    /// Behaviour weights by name (missing names keep their default weight).
    #[serde(default)]
    pub weights: BTreeMap<String, u32>,
}

/// Every key a profile file may hold.
const KNOWN_KEYS: &[&str] = &[
    "name",
    "shape",
    "rate",
    "base",
    "factor",
    "spike_secs",
    "period_secs",
    "offset_secs",
    "from",
    "to",
    "over_secs",
    "n",
    "every_secs",
    "duration_secs",
    "count",
    "timeout_ms",
    "grace_ms",
    "weights",
];

fn default_timeout_ms() -> u64 {
    1000
}

fn default_grace_ms() -> u64 {
    500
}

/// Why a profile could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Not a built-in name and not a readable file.
    #[error("unknown profile {0:?}: use steady, spike, ramp, burst or a path to a .toml file")]
    Unknown(String),
    /// The file could not be read.
    #[error("cannot read profile file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid profile.
    #[error("invalid profile file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The TOML error.
        message: String,
    },
    /// The numbers make no sense.
    #[error("invalid profile: {0}")]
    Invalid(String),
}

impl Profile {
    /// A built-in profile by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> Result<Profile, ProfileError> {
        let shape = match name_or_path {
            "steady" => Shape::Steady { rate: 100.0 },
            "spike" => Shape::Spike {
                base: 40.0,
                factor: 8.0,
                spike_secs: 3.0,
                period_secs: 10.0,
                offset_secs: 4.0,
            },
            "ramp" => Shape::Ramp {
                from: 10.0,
                to: 300.0,
                over_secs: 20.0,
            },
            "burst" => Shape::Burst {
                n: 400,
                every_secs: 5.0,
                base: 10.0,
            },
            path if path.ends_with(".toml") || Path::new(path).exists() => {
                return Profile::from_file(Path::new(path));
            }
            other => return Err(ProfileError::Unknown(other.to_string())),
        };
        Ok(Profile {
            name: name_or_path.to_string(),
            shape,
            duration_secs: Some(20.0),
            count: None,
            timeout_ms: default_timeout_ms(),
            grace_ms: default_grace_ms(),
            weights: BTreeMap::new(),
        })
    }

    /// Read a TOML profile file.
    pub fn from_file(path: &Path) -> Result<Profile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut p = Profile::from_toml(&text).map_err(|message| ProfileError::Parse {
            path: path.display().to_string(),
            message,
        })?;
        if p.name.is_empty() {
            p.name = path.display().to_string();
        }
        Ok(p)
    }

    /// Parse a TOML profile.
    pub fn from_toml(text: &str) -> Result<Profile, String> {
        // serde's deny_unknown_fields does not work with a flattened enum:
        // check the keys here so a typo is an error, not a silent default.
        let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        for key in table.keys() {
            if !KNOWN_KEYS.contains(&key.as_str()) {
                return Err(format!(
                    "unknown key {key:?} (known: {})",
                    KNOWN_KEYS.join(", ")
                ));
            }
        }
        let p: Profile = toml::from_str(text).map_err(|e| e.to_string())?;
        p.validate().map_err(|e| e.to_string())?;
        Ok(p)
    }

    /// Reject profiles that could never end or have negative rates.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let bad = |m: &str| Err(ProfileError::Invalid(m.to_string()));
        if self.duration_secs.is_none() && self.count.is_none() {
            return bad("give a duration or a count (or both)");
        }
        if self
            .duration_secs
            .is_some_and(|d| !(d > 0.0 && d.is_finite()))
        {
            return bad("duration must be positive");
        }
        let rates_ok = match &self.shape {
            Shape::Steady { rate } => *rate > 0.0,
            Shape::Spike {
                base,
                factor,
                spike_secs,
                period_secs,
                offset_secs,
            } => {
                *base > 0.0
                    && *factor >= 1.0
                    && *spike_secs >= 0.0
                    && *period_secs > 0.0
                    && spike_secs <= period_secs
                    && *offset_secs >= 0.0
            }
            Shape::Ramp {
                from,
                to,
                over_secs,
            } => *from >= 0.0 && *to > 0.0 && *over_secs > 0.0,
            Shape::Burst {
                n,
                every_secs,
                base,
            } => *n > 0 && *every_secs >= 0.0 && *base >= 0.0,
        };
        if !rates_ok {
            return bad("rates must be positive (spike: factor >= 1, spike_secs <= period_secs)");
        }
        if self.duration_secs.is_none() {
            let never_ends = match &self.shape {
                Shape::Burst {
                    every_secs, base, ..
                } => *every_secs == 0.0 && *base == 0.0 && self.count.is_none(),
                _ => false,
            };
            if never_ends {
                return bad("this profile never reaches its count");
            }
        }
        Ok(())
    }

    /// The instantaneous rate (checks/s) at `t` seconds (bursts excluded).
    pub fn rate_at(&self, t: f64) -> f64 {
        match &self.shape {
            Shape::Steady { rate } => *rate,
            Shape::Spike {
                base,
                factor,
                spike_secs,
                period_secs,
                offset_secs,
            } => {
                if t >= *offset_secs && (t - offset_secs).rem_euclid(*period_secs) < *spike_secs {
                    base * factor
                } else {
                    *base
                }
            }
            Shape::Ramp {
                from,
                to,
                over_secs,
            } => from + (to - from) * (t / over_secs).clamp(0.0, 1.0),
            Shape::Burst { base, .. } => *base,
        }
    }

    /// Whether `t` lies inside a spike (for labelling stats "under spike").
    pub fn in_spike(&self, t: f64) -> bool {
        match &self.shape {
            Shape::Spike { base, .. } => self.rate_at(t) > *base,
            _ => false,
        }
    }

    /// The spike windows (start, end) in seconds within `0..until`.
    pub fn spike_windows(&self, until: f64) -> Vec<(f64, f64)> {
        let Shape::Spike {
            spike_secs,
            period_secs,
            offset_secs,
            ..
        } = &self.shape
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut start = *offset_secs;
        while start < until && *spike_secs > 0.0 {
            out.push((start, (start + spike_secs).min(until)));
            start += period_secs;
        }
        out
    }

    /// How many checks are due by `t` seconds: the integral of the rate plus
    /// the bursts started, capped by `count`.
    pub fn target_count(&self, t: f64) -> u64 {
        let t = match self.duration_secs {
            Some(d) => t.min(d),
            None => t,
        }
        .max(0.0);
        let due = match &self.shape {
            Shape::Steady { rate } => rate * t,
            Shape::Spike {
                base,
                factor,
                spike_secs,
                period_secs,
                offset_secs,
            } => {
                let in_spikes = spike_time(t, *spike_secs, *period_secs, *offset_secs);
                base * t + base * (factor - 1.0) * in_spikes
            }
            Shape::Ramp {
                from,
                to,
                over_secs,
            } => {
                let r = t.min(*over_secs);
                let ramp = from * r + (to - from) * r * r / (2.0 * over_secs);
                ramp + to * (t - r)
            }
            Shape::Burst {
                n,
                every_secs,
                base,
            } => {
                let bursts = if *every_secs > 0.0 {
                    (t / every_secs).floor() + 1.0
                } else {
                    1.0
                };
                base * t + *n as f64 * bursts
            }
        };
        // A tiny epsilon so 100/s × 1s is 100, not 99.99999.
        let due = (due + 1e-9).floor() as u64;
        match self.count {
            Some(c) => due.min(c),
            None => due,
        }
    }

    /// Whether everything has been submitted once `submitted` are out at `t`.
    pub fn finished(&self, t: f64, submitted: u64) -> bool {
        if self.count.is_some_and(|c| submitted >= c) {
            return true;
        }
        match self.duration_secs {
            Some(d) => t >= d && submitted >= self.target_count(d),
            None => false,
        }
    }
}

/// Seconds of [0, t] that fall inside spikes of length `len` starting at
/// `offset + k * period`.
fn spike_time(t: f64, len: f64, period: f64, offset: f64) -> f64 {
    if t <= offset {
        return 0.0;
    }
    let since = t - offset;
    let whole = (since / period).floor();
    let partial = since - whole * period;
    whole * len + partial.min(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spike() -> Profile {
        Profile::load("spike").unwrap()
    }

    #[test]
    fn steady_is_rate_times_time() {
        let p = Profile::load("steady").unwrap();
        assert_eq!(p.target_count(0.0), 0);
        assert_eq!(p.target_count(1.0), 100);
        assert_eq!(p.target_count(2.5), 250);
        // Capped at the duration.
        assert_eq!(p.target_count(100.0), 2000);
    }

    #[test]
    fn spike_adds_factor_during_windows() {
        let p = spike(); // base 40, ×8 for 3 s every 10 s from t=4
        assert_eq!(p.target_count(4.0), 160);
        assert_eq!(p.target_count(5.0), 160 + 320);
        assert_eq!(p.target_count(7.0), 160 + 3 * 320);
        assert_eq!(p.target_count(10.0), 400 + 3 * 280);
        // Two whole spikes by t=20 (4–7, 14–17).
        assert_eq!(p.target_count(20.0), 800 + 6 * 280);
        assert!(p.in_spike(5.0) && !p.in_spike(8.0) && p.in_spike(14.5));
        assert_eq!(p.rate_at(5.0), 320.0);
        assert_eq!(p.rate_at(3.0), 40.0);
        assert_eq!(p.spike_windows(20.0), vec![(4.0, 7.0), (14.0, 17.0)]);
    }

    #[test]
    fn ramp_integrates_linearly() {
        let mut p = Profile::load("ramp").unwrap(); // 10 → 300 over 20 s
        p.duration_secs = Some(30.0);
        assert_eq!(
            p.target_count(20.0),
            (10.0 * 20.0 + 290.0 * 20.0 / 2.0) as u64
        );
        assert_eq!(p.target_count(30.0), 3100 + 3000);
        assert_eq!(p.rate_at(10.0), 155.0);
    }

    #[test]
    fn burst_submits_n_at_once() {
        let p = Profile::load("burst").unwrap(); // 400 every 5 s over 10/s
        assert_eq!(p.target_count(0.0), 400);
        assert_eq!(p.target_count(4.9), 400 + 49);
        assert_eq!(p.target_count(5.0), 800 + 50);
    }

    #[test]
    fn count_caps_and_finishes() {
        let mut p = Profile::load("steady").unwrap();
        p.count = Some(150);
        assert_eq!(p.target_count(10.0), 150);
        assert!(!p.finished(1.0, 100));
        assert!(p.finished(1.0, 150));
        p.count = None;
        assert!(p.finished(20.0, 2000));
        assert!(!p.finished(20.0, 1999));
    }

    #[test]
    fn toml_profile_round_trip_and_errors() {
        let p = Profile::from_toml(
            "name = \"ci\"\nshape = \"spike\"\nbase = 50\nfactor = 4\nspike_secs = 2\n\
             period_secs = 8\noffset_secs = 3\nduration_secs = 24\n\
             [weights]\nflood = 0\n",
        )
        .unwrap();
        assert_eq!(p.name, "ci");
        assert_eq!(p.timeout_ms, 1000);
        assert_eq!(p.weights.get("flood"), Some(&0));
        assert_eq!(p.target_count(3.0), 150);
        assert!(Profile::from_toml("shape = \"steady\"\nrate = 5\n").is_err()); // no length
        assert!(Profile::from_toml("shape = \"wobble\"\nduration_secs = 1\n").is_err());
        assert!(Profile::from_toml("shape = \"steady\"\nrate = -1\nduration_secs = 1\n").is_err());
        assert!(
            Profile::from_toml("shape = \"steady\"\nrate = 5\nduraton_secs = 1\n")
                .unwrap_err()
                .contains("duraton_secs")
        );
        assert!(matches!(
            Profile::load("nonsense"),
            Err(ProfileError::Unknown(_))
        ));
    }
}
