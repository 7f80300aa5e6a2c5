//! `pidring run`: the monitoring world's `timeout(1)`.

use clap::Args;
use pidring::{BackendKind, Check, Executor, State};
use std::process::ExitCode;
use std::time::Duration;

/// Arguments of `pidring run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Time the check may run before SIGTERM (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = pidring::units::parse_duration)]
    timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    #[arg(long, default_value = "5s", value_parser = pidring::units::parse_duration)]
    grace: Duration,
    /// Bytes kept per output stream (e.g. 64k, 1MiB).
    #[arg(long, default_value = "64k", value_parser = pidring::units::parse_size)]
    output_cap: usize,
    /// State reported on timeout.
    #[arg(long, default_value = "UNKNOWN")]
    timeout_state: State,
    /// Event backend: auto, io_uring or epoll.
    #[arg(long, default_value = "auto")]
    backend: BackendKind,
    /// Print the whole result as JSON instead of the plugin's output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    command: super::common::CommandArgs,
}

/// Run the check; the exit code is the Nagios state.
pub fn main(args: RunArgs) -> ExitCode {
    super::logging::init("warn", false);
    let check = match (&args.command.command_line, args.command.argv.is_empty()) {
        (Some(line), _) => match Check::command_line(line) {
            Ok(c) => c,
            Err(e) => return fail(&format!("{e}")),
        },
        (None, false) => Check::argv(&args.command.argv),
        (None, true) => {
            return fail(
                "nothing to run: give a command after `--`, or --command-line 'check_x -H host'",
            );
        }
    };
    let check = check
        .timeout(args.timeout)
        .grace(args.grace)
        .output_cap(args.output_cap)
        .timeout_state(args.timeout_state);
    let exec = match Executor::builder()
        .backend(args.backend)
        .max_running(1)
        .build()
    {
        Ok(e) => e,
        Err(e) => return fail(&e.to_string()),
    };
    let pending = match exec.submit(check) {
        Ok(p) => p,
        Err(e) => return fail(&e.to_string()),
    };
    super::common::print_result(&pending.wait(), args.json)
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("pidring run: {msg}");
    ExitCode::from(State::Unknown.code() as u8)
}
