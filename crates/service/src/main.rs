//! The `pidring` command line.

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// pidring: a monitoring-check executor that never leaves a zombie.
#[derive(Parser, Debug)]
#[command(name = "pidring", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one check through the engine, print its output and exit with its
    /// Nagios state (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).
    Run(cli::run::RunArgs),
    /// `daemon`, `submit`, `stats`, `ping`: the executor service and its clients.
    #[command(flatten)]
    Daemon(cli::daemon::DaemonCommand),
    /// Serve a Nagios 4 core's checks as an external worker on its
    /// query-handler socket, until SIGTERM.
    NagiosWorker(cli::nagios_worker::NagiosWorkerArgs),
    /// Serve mod_gearman's gearmand queues as a drop-in mod_gearman worker,
    /// until SIGTERM.
    GearmanWorker(cli::gearman_worker::GearmanWorkerArgs),
}

/// The exit code of a command line that cannot be used: UNKNOWN, as for
/// pidring's own argument errors. clap's usual 2 is CRITICAL to a monitoring
/// core, which would blame the service for a typo in its check command.
const USAGE_ERROR: u8 = 3;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version come this way too, for stdout and exit 0.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(USAGE_ERROR)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Run(args) => cli::run::main(args),
        Command::Daemon(cmd) => cli::daemon::main(cmd),
        Command::NagiosWorker(args) => cli::nagios_worker::main(args),
        Command::GearmanWorker(args) => cli::gearman_worker::main(args),
    }
}
