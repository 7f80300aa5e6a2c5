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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => cli::run::main(args),
        Command::Daemon(cmd) => cli::daemon::main(cmd),
        Command::NagiosWorker(args) => cli::nagios_worker::main(args),
    }
}
