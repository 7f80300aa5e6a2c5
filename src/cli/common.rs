//! What `run` and `submit` share: how a check is named on the command line,
//! and how its result is shown to a person.

use clap::Args;
use pidring::CheckResult;
use std::io::Write;
use std::process::ExitCode;

/// The check to run: a plugin with its arguments, or a Nagios command line.
#[derive(Args, Debug)]
pub struct CommandArgs {
    /// A Nagios-style command line (split like Nagios; shell only for metacharacters).
    #[arg(long, conflicts_with = "argv")]
    pub command_line: Option<String>,
    /// The plugin and its arguments (after `--`).
    #[arg(last = true)]
    pub argv: Vec<String>,
}

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
