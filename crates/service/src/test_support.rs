//! What the service crate's unit tests build the same way in several modules.

use pidring::State;
use pidring::result::{CheckResult, Outcome, Output, Timings};

/// A result of `outcome` that wrote `stdout`: id 1, state OK, and nothing
/// else (no pid, exit status, stderr or timings); a test sets what it reads.
pub(crate) fn check_result(outcome: Outcome, stdout: &[u8]) -> CheckResult {
    CheckResult {
        id: 1,
        tag: None,
        outcome,
        state: State::Ok,
        reason: String::new(),
        exit: None,
        pid: None,
        stdout: Output {
            data: stdout.to_vec(),
            ..Default::default()
        },
        stderr: Output::default(),
        output_cut: false,
        plugin: Default::default(),
        timings: Timings::default(),
        rusage: None,
        cgroup: None,
    }
}
