//! How a check's result is shown to a person (shared by `run` and `submit`).

use pidring::CheckResult;
use std::io::Write;
use std::process::ExitCode;

/// Print the result (the plugin's output, or the whole result as JSON) and
/// return the exit code that is its Nagios state.
pub fn print_result(result: &CheckResult, json: bool) -> ExitCode {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = serde_json::to_writer_pretty(&mut out, result);
        let _ = writeln!(out);
    } else {
        if !result.reason.is_empty() {
            let _ = writeln!(out, "{}: {}", result.state, result.reason);
        }
        let _ = out.write_all(&result.stdout.data);
        if result.stdout.truncated {
            let _ = writeln!(
                out,
                "\n[output truncated: {} bytes dropped]",
                result.stdout.dropped_bytes
            );
        }
        let _ = std::io::stderr().write_all(&result.stderr.data);
    }
    ExitCode::from(result.state.code() as u8)
}
