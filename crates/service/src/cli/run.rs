//! `pidring run`: the monitoring world's `timeout(1)`.

use clap::Args;
use pidring::{BackendKind, Check, Executor, State};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use super::common::{block_signals, wait_signal};

/// Arguments of `pidring run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Time the check may run before SIGTERM (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = pidring::units::parse_timeout)]
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
    /// Containment: a cgroup v2 leaf per check. auto (the delegated own
    /// cgroup under systemd, else as root a fresh one under the cgroup2
    /// mount, else the process-group fallback), off, or a cgroup2 path
    /// owned by this process alone.
    #[arg(long, value_name = "auto|off|PATH", default_value = "auto")]
    cgroup: pidring::cgroup::Containment,
    /// Take SCHED_FIFO on the executor's loop while the kill is near, so a
    /// saturated machine cannot make it late: true or false.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    realtime_kills: bool,
    /// Run the check as this user (name or uid; needs root): its groups,
    /// gid and uid are set before exec.
    #[arg(long)]
    user: Option<String>,
    /// Print the whole result as JSON instead of the plugin's output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    command: super::common::CommandArgs,
}

/// Run the check; the exit code is the Nagios state, or 128 + the signal
/// number if a stop signal cut it short (as a shell reports it).
pub fn main(args: RunArgs) -> ExitCode {
    super::logging::init("warn", false);
    // Every signal whose default action would end `run` stops it (a
    // service's stop signals and the ones a service ignores alike: `run` is
    // one command, and ends as it would have). The check is killed (its
    // group swept), reaped and reported first; left to their default action
    // they would kill `run` alone, and the check, in its own session, would
    // run on unsupervised.
    let stop_signals = match block_signals(&pidring_service::daemon::taken_signals()) {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot block the stop signals: {e}")),
    };
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
    let check = match args.user.as_deref().map(super::common::run_as_user) {
        Some(Ok(who)) => check.run_as(who),
        Some(Err(e)) => return fail(&e),
        None => check,
    };
    let check = check
        .timeout(args.timeout)
        .grace(args.grace)
        .output_cap(args.output_cap)
        .timeout_state(args.timeout_state);
    let exec = match Executor::builder()
        .backend(args.backend)
        .cgroup(args.cgroup.clone())
        .realtime_kills(args.realtime_kills)
        .max_running(1)
        .build()
    {
        Ok(e) => Arc::new(e),
        Err(e) => return fail(&e.to_string()),
    };
    let pending = match exec.submit(check) {
        Ok(p) => p,
        Err(e) => return fail(&e.to_string()),
    };
    let stopped_by = Arc::new(AtomicI32::new(0));
    // Set once the result is in: a stop signal then ends `run` at once
    // (it may be blocked writing to a full stdout), as does a second one.
    let finished = Arc::new(AtomicBool::new(false));
    {
        let (exec, id) = (exec.clone(), pending.id());
        let (stopped_by, finished) = (stopped_by.clone(), finished.clone());
        // Ends with the process; it only ever waits in sigwait.
        let watcher = std::thread::Builder::new()
            .name("pidring-signals".into())
            .spawn(move || {
                loop {
                    let sig = wait_signal(&stop_signals);
                    let again = stopped_by.swap(sig, Ordering::SeqCst) != 0;
                    if again || finished.load(Ordering::SeqCst) {
                        eprintln!(
                            "pidring run: stopped by {}",
                            pidring::result::signal_name(sig)
                        );
                        std::process::exit(128 + sig);
                    }
                    exec.cancel(id);
                }
            });
        if let Err(e) = watcher {
            return fail(&format!("cannot start the signal thread: {e}"));
        }
    }
    let result = pending.wait();
    finished.store(true, Ordering::SeqCst);
    // The signal thread holds a handle too: stop the executor here, so
    // that it removes its cgroup subtree before the process exits.
    exec.shutdown();
    let code = super::common::print_result(&result, args.json);
    match stopped_by.load(Ordering::SeqCst) {
        // Not a cancel's result: the check ended first, the signal came late.
        sig if sig == 0 || result.outcome != pidring::Outcome::Cancelled => code,
        sig => {
            eprintln!(
                "pidring run: stopped by {}; the check was killed and reaped",
                pidring::result::signal_name(sig)
            );
            ExitCode::from(128 + sig as u8)
        }
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("pidring run: {msg}");
    ExitCode::from(State::Unknown.code() as u8)
}
