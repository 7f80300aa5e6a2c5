//! `pidring nagios-worker`: serve a Nagios 4 core's checks as an external worker.

use clap::Args;
use pidring::BackendKind;
use pidring::nagios::{self, NagiosWorkerConfig};
use std::path::PathBuf;
use std::process::ExitCode;

use super::common::{block_signals, service_executor, wait_stop_signal};

/// Arguments of `pidring nagios-worker`.
#[derive(Args, Debug)]
pub struct NagiosWorkerArgs {
    /// The core's query-handler socket (`query_socket=` in nagios.cfg).
    #[arg(long, default_value = nagios::config::DEFAULT_QH_SOCKET)]
    qh_socket: PathBuf,
    /// Take over every job whose command starts with this plugin (name or
    /// full path, as in the command definition). Repeat for more plugins;
    /// each gets its own connection.
    #[arg(long = "plugin", value_name = "NAME")]
    plugins: Vec<String>,
    /// General connections joining the core's round-robin with its own
    /// workers (default: 1 without --plugin, 0 with).
    #[arg(long)]
    connections: Option<usize>,
    /// Worker name shown in nagios.log.
    #[arg(long, default_value = "pidring")]
    name: String,
    /// Most jobs the core may hand one connection at once.
    #[arg(long, default_value_t = 4096)]
    max_jobs: usize,
    /// Event backend: auto, io_uring or epoll.
    #[arg(long, default_value = "auto")]
    backend: BackendKind,
    /// Containment: a cgroup v2 leaf per check. auto (the delegated own
    /// cgroup under systemd, else as root a fresh one under the cgroup2
    /// mount, else the process-group fallback), off, or a cgroup2 path
    /// owned by this process alone.
    #[arg(long, value_name = "auto|off|PATH", default_value = "auto")]
    cgroup: pidring::cgroup::Containment,
    /// Take SCHED_FIFO on the executor's loop while a kill is near, so a
    /// saturated machine cannot make it late: true or false.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    realtime_kills: bool,
    /// Most checks running at once; the rest wait in FIFO order.
    #[arg(long, default_value_t = 1024)]
    max_running: usize,
    /// Run nothing here: put every job into this gearmand (host:port) as a
    /// mod_gearman job, for `pidring gearman-worker`s on any hosts to run.
    #[arg(long, value_name = "HOST:PORT")]
    gearman: Option<String>,
    /// With --gearman: the mod_gearman secret (jobs and results encrypted; default plain).
    #[arg(long, value_name = "SECRET")]
    gearman_key: Option<String>,
    /// With --gearman: a file whose first line is the secret.
    #[arg(long, value_name = "FILE")]
    gearman_keyfile: Option<PathBuf>,
    /// Run every job as this user (name or uid; needs root): its groups,
    /// gid and uid are set before exec.
    #[arg(long)]
    user: Option<String>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

/// Run until SIGTERM, SIGINT or SIGQUIT (SIGHUP, SIGUSR1… are ignored, as by the daemon: a
/// closed terminal must not kill the worker under its checks).
pub fn main(args: NagiosWorkerArgs) -> ExitCode {
    super::logging::init("info", args.log_json);
    let stop_signals = match block_signals(&pidring::daemon::taken_signals()) {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot block the stop signals: {e}")),
    };
    let config = NagiosWorkerConfig {
        qh_socket: args.qh_socket,
        plugins: args.plugins,
        connections: args.connections,
        name: args.name,
        max_jobs: args.max_jobs,
        gearman: args.gearman,
        gearman_key: args.gearman_key,
        gearman_keyfile: args.gearman_keyfile,
    };
    if let Err(e) = config.validate() {
        return fail(&e);
    }
    let run_as = match args.user.as_deref().map(super::common::run_as_user) {
        Some(Ok(who)) => Some(who),
        Some(Err(e)) => return fail(&e),
        None => None,
    };
    if run_as.is_none() && rustix::process::geteuid().is_root() {
        tracing::warn!(
            "RUNNING CHECKS AS ROOT: nagios-worker runs as root without --user, so every job runs as root; pass --user nagios"
        );
    }
    let policy = std::sync::Arc::new(pidring::policy::SharedPolicy::new(
        pidring::policy::Policy {
            run_as,
            ..Default::default()
        },
    ));
    let exec = match service_executor(
        args.backend,
        args.cgroup.clone(),
        args.max_running,
        args.realtime_kills,
    ) {
        Ok(e) => e,
        Err(e) => return fail(&e.to_string()),
    };
    let workers = match nagios::worker::spawn_workers_with_policy(&config, exec.clone(), policy) {
        Ok(w) => w,
        Err(e) => return fail(&e.to_string()),
    };
    tracing::info!(
        socket = %config.qh_socket.display(),
        plugins = ?config.plugins,
        general = config.general_connections(),
        "pidring nagios-worker running; stop with SIGTERM"
    );
    let sig = wait_stop_signal(&stop_signals);
    tracing::info!(
        signal = sig,
        "stopping: killing and answering jobs in flight"
    );
    let stats = workers.stop();
    exec.shutdown();
    tracing::info!(
        jobs = stats.jobs,
        answers = stats.answers,
        registrations = stats.registrations,
        "stopped\n{}",
        exec.metrics().render_table()
    );
    ExitCode::SUCCESS
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("pidring nagios-worker: {msg}");
    ExitCode::from(2)
}
