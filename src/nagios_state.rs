//! The Nagios service state a check ends in.

use std::fmt;

/// Nagios/Icinga check state: exit code 0..=3, anything else is `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "UPPERCASE"))]
pub enum State {
    /// Exit code 0.
    Ok,
    /// Exit code 1.
    Warning,
    /// Exit code 2.
    Critical,
    /// Exit code 3, and every way a check can end without a valid code.
    Unknown,
}

impl State {
    /// The state for a plugin exit code; `None` when the code is outside 0..=3.
    pub fn from_exit_code(code: i32) -> Option<State> {
        match code {
            0 => Some(State::Ok),
            1 => Some(State::Warning),
            2 => Some(State::Critical),
            3 => Some(State::Unknown),
            _ => None,
        }
    }

    /// The exit code that stands for this state (0..=3).
    pub fn code(self) -> i32 {
        match self {
            State::Ok => 0,
            State::Warning => 1,
            State::Critical => 2,
            State::Unknown => 3,
        }
    }

    /// Upper-case name, as Nagios prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ok => "OK",
            State::Warning => "WARNING",
            State::Critical => "CRITICAL",
            State::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "OK" | "0" => Ok(State::Ok),
            "WARNING" | "WARN" | "1" => Ok(State::Warning),
            "CRITICAL" | "CRIT" | "2" => Ok(State::Critical),
            "UNKNOWN" | "3" => Ok(State::Unknown),
            other => Err(format!(
                "unknown state {other:?}: expected OK, WARNING, CRITICAL or UNKNOWN"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_map_like_nagios() {
        assert_eq!(State::from_exit_code(0), Some(State::Ok));
        assert_eq!(State::from_exit_code(2), Some(State::Critical));
        assert_eq!(State::from_exit_code(4), None);
        assert_eq!(State::from_exit_code(-1), None);
        assert_eq!("crit".parse::<State>().unwrap(), State::Critical);
        assert!("bogus".parse::<State>().is_err());
    }
}
