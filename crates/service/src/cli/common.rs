//! What the commands share: how a check is named on the command line, how
//! its result is shown to a person, and how stop signals are taken.

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
/// return the exit code that is its Nagios state — UNKNOWN if the output
/// could not be written (a caller would otherwise read a state without
/// the text that goes with it).
pub fn print_result(result: &CheckResult, json: bool) -> ExitCode {
    let written = write_result(&mut std::io::stdout().lock(), result, json);
    let _ = std::io::stderr().write_all(&result.stderr.data);
    match written {
        Ok(()) => ExitCode::from(result.state.code() as u8),
        Err(e) => {
            eprintln!("pidring: cannot write the check's output: {e}");
            ExitCode::from(pidring::State::Unknown.code() as u8)
        }
    }
}

fn write_result(out: &mut impl Write, result: &CheckResult, json: bool) -> std::io::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, result)?;
        writeln!(out)?;
    } else {
        if !result.reason.is_empty() {
            writeln!(out, "{}: {}", result.state, result.reason)?;
        }
        out.write_all(&result.stdout.data)?;
        if result.stdout.truncated {
            writeln!(
                out,
                "\n[output truncated: {} bytes dropped]",
                result.stdout.dropped_bytes
            )?;
        }
    }
    out.flush()
}

/// Block `signals` in this thread, and so in every thread it starts later
/// (checks do not inherit it: the child resets its mask before exec), so
/// that one thread takes them with [`wait_signal`] instead of the default
/// action killing the process under its checks. Call before any thread exists.
pub fn block_signals(signals: &[i32]) -> std::io::Result<libc::sigset_t> {
    pidring_service::daemon::change_signal_mask(libc::SIG_BLOCK, signals)
}

/// Wait for one of the signals in `set` (blocked by [`block_signals`]).
pub fn wait_signal(set: &libc::sigset_t) -> i32 {
    loop {
        let mut sig = 0;
        // SAFETY: `set` is an initialised sigset_t and `sig` a valid out-pointer.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc == 0 {
            return sig;
        }
    }
}

/// Wait for a stop signal in `set`; the ignored ones (SIGHUP, SIGUSR1, …) are logged and waited past.
pub fn wait_stop_signal(set: &libc::sigset_t) -> i32 {
    wait_stop_signal_with(set, None)
}

/// [`wait_stop_signal`], calling `on_hup` (a reload) at each SIGHUP instead.
pub fn wait_stop_signal_with(set: &libc::sigset_t, mut on_hup: Option<&mut dyn FnMut()>) -> i32 {
    loop {
        match wait_signal(set) {
            libc::SIGHUP if on_hup.is_some() => {
                if let Some(f) = on_hup.as_mut() {
                    f();
                }
            }
            sig if pidring_service::daemon::IGNORED_SIGNALS.contains(&sig) => {
                let name = pidring::result::signal_name(sig);
                tracing::info!("{name} ignored (stop with SIGTERM)");
            }
            sig => return sig,
        }
    }
}

/// The executor of a worker service (`nagios-worker`, `gearman-worker`): a
/// child subreaper, since it runs checks and nothing else.
pub fn service_executor(
    backend: pidring::BackendKind,
    containment: pidring::cgroup::Containment,
    max_running: usize,
    realtime_kills: bool,
) -> Result<std::sync::Arc<pidring::Executor>, pidring::ExecutorError> {
    pidring::Executor::builder()
        .backend(backend)
        .cgroup(containment)
        .max_running(max_running)
        .realtime_kills(realtime_kills)
        .reap_orphans(true)
        .build()
        .map(std::sync::Arc::new)
}

/// `--user NAME`: the user looked up (its groups too) and checked to be one
/// this process can run checks as.
pub fn run_as_user(user: &str) -> Result<std::sync::Arc<pidring::policy::RunAs>, String> {
    let who = pidring::policy::RunAs::lookup(user, None).map_err(|e| format!("--user: {e}"))?;
    who.usable().map_err(|e| format!("--user: {e}"))?;
    Ok(std::sync::Arc::new(who))
}
