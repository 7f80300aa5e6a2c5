//! `pidring nagios-worker`: serve a Nagios 4 core's checks as an external worker.

use clap::Args;
use pidring::BackendKind;
use pidring_service::nagios::{self, NagiosWorkerConfig};
use std::path::PathBuf;
use std::process::ExitCode;

use super::common::{block_signals, service_executor, wait_stop_signal, wait_stop_signal_with};
use pidring::policy::{Policy, SharedPolicy};
use pidring_service::daemon::DaemonConfig;
use std::path::Path;
use std::sync::Arc;

/// Arguments of `pidring nagios-worker`.
#[derive(Args, Debug)]
pub struct NagiosWorkerArgs {
    /// The core's query-handler socket (`query_socket=` in nagios.cfg).
    #[arg(long, default_value = nagios::config::DEFAULT_QH_SOCKET, conflicts_with = "config")]
    qh_socket: PathBuf,
    /// Take over every job whose command starts with this plugin (name or
    /// full path, as in the command definition). Repeat for more plugins;
    /// each gets its own connection.
    #[arg(long = "plugin", value_name = "NAME", conflicts_with = "config")]
    plugins: Vec<String>,
    /// General connections joining the core's round-robin with its own
    /// workers (default: 1 without --plugin, 0 with).
    #[arg(long, conflicts_with = "config")]
    connections: Option<usize>,
    /// Worker name shown in nagios.log.
    #[arg(long, default_value = "pidring", conflicts_with = "config")]
    name: String,
    /// Most jobs the core may hand one connection at once.
    #[arg(long, default_value_t = 4096, conflicts_with = "config")]
    max_jobs: usize,
    /// Event backend: auto, io_uring or epoll.
    #[arg(long, default_value = "auto", conflicts_with = "config")]
    backend: BackendKind,
    /// Containment: a cgroup v2 leaf per check. auto (the delegated own
    /// cgroup under systemd, else as root a fresh one under the cgroup2
    /// mount, else the process-group fallback), off, or a cgroup2 path
    /// owned by this process alone.
    #[arg(
        long,
        value_name = "auto|off|PATH",
        default_value = "auto",
        conflicts_with = "config"
    )]
    cgroup: pidring::cgroup::Containment,
    /// Take SCHED_FIFO on the executor's loop while a kill is near, so a
    /// saturated machine cannot make it late: true or false.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, conflicts_with = "config")]
    realtime_kills: bool,
    /// Most checks running at once; the rest wait in FIFO order.
    #[arg(long, default_value_t = 1024, conflicts_with = "config")]
    max_running: usize,
    /// Run nothing here: put every job into this gearmand (host:port) as a
    /// mod_gearman job, for `pidring gearman-worker`s on any hosts to run.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "config")]
    gearman: Option<String>,
    /// With --gearman: the mod_gearman secret (jobs and results encrypted; default plain).
    #[arg(long, value_name = "SECRET", conflicts_with = "config")]
    gearman_key: Option<String>,
    /// With --gearman: a file whose first line is the secret.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    gearman_keyfile: Option<PathBuf>,
    /// With --gearman: checks of hosts in these hostgroups go to queue
    /// `hostgroup_NAME` (first match in this order), as mod_gearman's `hostgroups=`.
    #[arg(
        long,
        value_name = "NAME,…",
        value_delimiter = ',',
        conflicts_with = "config"
    )]
    gearman_hostgroups: Vec<String>,
    /// With --gearman: checks of services in these servicegroups go to
    /// queue `servicegroup_NAME`, before any hostgroup.
    #[arg(
        long,
        value_name = "NAME,…",
        value_delimiter = ',',
        conflicts_with = "config"
    )]
    gearman_servicegroups: Vec<String>,
    /// With --gearman and groups: the core's object cache (`object_cache_file=`),
    /// read for group members.
    #[arg(long, value_name = "FILE", default_value = pidring_service::nagios::routing::DEFAULT_OBJECTS_CACHE, conflicts_with = "config")]
    objects_cache: PathBuf,
    /// Run every job as this user (name or uid; needs root): its groups,
    /// gid and uid are set before exec.
    #[arg(long, conflicts_with = "config")]
    user: Option<String>,
    /// Read the settings from this TOML file instead (the daemon's format:
    /// its `[nagios]` section, `user`, `group`, `allowed_commands`,
    /// `max_running`, `queue_limit`, `realtime_kills`, `backend`, `cgroup`;
    /// the rest is ignored). SIGHUP re-reads it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

/// Run until SIGTERM, SIGINT or SIGQUIT (SIGHUP, SIGUSR1… are ignored, as by the daemon: a
/// closed terminal must not kill the worker under its checks).
pub fn main(args: NagiosWorkerArgs) -> ExitCode {
    super::logging::init("info", args.log_json);
    let stop_signals = match block_signals(&pidring_service::daemon::taken_signals()) {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot block the stop signals: {e}")),
    };
    let mut current = match &args.config {
        Some(path) => Settings::from_file(path),
        None => Settings::from_flags(&args),
    }
    .unwrap_or_else(|e| {
        eprintln!("pidring nagios-worker: {e}");
        std::process::exit(2)
    });
    if current.policy.run_as.is_none() && rustix::process::geteuid().is_root() {
        tracing::warn!(
            "RUNNING CHECKS AS ROOT: nagios-worker runs as root without --user (or user in its config), so every job runs as root; pass --user nagios"
        );
    }
    let policy = Arc::new(SharedPolicy::new(current.policy.clone()));
    let exec = match service_executor(
        current.backend,
        current.cgroup.clone(),
        current.max_running,
        current.realtime_kills,
    ) {
        Ok(e) => e,
        Err(e) => return fail(&e.to_string()),
    };
    if let Some(n) = current.queue_limit {
        exec.set_queue_limit(n);
    }
    let config = current.nagios.clone();
    let mut workers =
        match nagios::worker::spawn_workers_with_policy(&config, exec.clone(), policy.clone()) {
            Ok(w) => w,
            Err(e) => return fail(&e.to_string()),
        };
    tracing::info!(
        socket = %config.qh_socket.display(),
        plugins = ?config.plugins,
        general = config.general_connections(),
        "pidring nagios-worker running; stop with SIGTERM"
    );
    let mut on_hup = |path: &Path| reload(path, &mut current, &exec, &mut workers, &policy);
    let sig = match &args.config {
        Some(path) => wait_stop_signal_with(&stop_signals, Some(&mut || on_hup(path))),
        None => wait_stop_signal(&stop_signals),
    };
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

/// What the worker runs with: from its flags, or from `--config`'s file.
struct Settings {
    nagios: NagiosWorkerConfig,
    policy: Policy,
    max_running: usize,
    /// None: the executor's default.
    queue_limit: Option<usize>,
    realtime_kills: bool,
    backend: BackendKind,
    cgroup: pidring::cgroup::Containment,
}

impl Settings {
    fn from_flags(args: &NagiosWorkerArgs) -> Result<Settings, String> {
        let nagios = NagiosWorkerConfig {
            qh_socket: args.qh_socket.clone(),
            plugins: args.plugins.clone(),
            connections: args.connections,
            name: args.name.clone(),
            max_jobs: args.max_jobs,
            gearman: args.gearman.clone(),
            gearman_key: args.gearman_key.clone(),
            gearman_keyfile: args.gearman_keyfile.clone(),
            gearman_hostgroups: args.gearman_hostgroups.clone(),
            gearman_servicegroups: args.gearman_servicegroups.clone(),
            objects_cache: args.objects_cache.clone(),
        };
        nagios.validate()?;
        let run_as = args
            .user
            .as_deref()
            .map(super::common::run_as_user)
            .transpose()?;
        Ok(Settings {
            nagios,
            policy: Policy {
                run_as,
                ..Default::default()
            },
            max_running: args.max_running,
            queue_limit: None,
            realtime_kills: args.realtime_kills,
            backend: args.backend,
            cgroup: args.cgroup.clone(),
        })
    }

    fn from_file(path: &Path) -> Result<Settings, String> {
        let c = DaemonConfig::load(path).map_err(|e| e.to_string())?;
        let invalid = |e: String| format!("invalid config file {}: {e}", path.display());
        c.validate().map_err(invalid)?;
        let nagios = c.nagios.clone().ok_or_else(|| {
            invalid("no [nagios] section: nothing to serve (see README, nagios-worker)".into())
        })?;
        Ok(Settings {
            nagios,
            policy: c.policy().map_err(invalid)?,
            max_running: c.max_running,
            queue_limit: Some(c.queue_limit),
            realtime_kills: c.realtime_kills,
            backend: c.backend,
            cgroup: c.cgroup,
        })
    }
}

/// SIGHUP: re-read the file and apply it (see PROTOCOL.md "Reload"); a
/// file that fails keeps the running settings.
fn reload(
    path: &Path,
    current: &mut Settings,
    exec: &pidring::Executor,
    workers: &mut nagios::NagiosWorkers,
    policy: &SharedPolicy,
) {
    let new = match Settings::from_file(path) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("SIGHUP: reload failed, the running configuration is kept: {e}");
            return;
        }
    };
    let mut changed = Vec::new();
    let mut note = |what: &str, old: String, new: String| {
        if old != new {
            changed.push(format!("{what} {old} -> {new}"));
        }
    };
    let user = |p: &Policy| format!("{:?}", p.run_as.as_ref().map(|r| r.user.clone()));
    let allowed = |p: &Policy| format!("{:?}", p.allowed_commands.entries());
    note(
        "max_running",
        current.max_running.to_string(),
        new.max_running.to_string(),
    );
    note(
        "queue_limit",
        format!("{:?}", current.queue_limit),
        format!("{:?}", new.queue_limit),
    );
    note(
        "realtime_kills",
        current.realtime_kills.to_string(),
        new.realtime_kills.to_string(),
    );
    note("user", user(&current.policy), user(&new.policy));
    note(
        "allowed_commands",
        allowed(&current.policy),
        allowed(&new.policy),
    );
    let mut restart = Vec::new();
    if new.backend != current.backend {
        restart.push("backend");
    }
    if new.cgroup != current.cgroup {
        restart.push("cgroup");
    }
    exec.set_max_running(new.max_running);
    exec.set_queue_limit(new.queue_limit.unwrap_or(exec.queue_limit()));
    exec.set_realtime_kills(new.realtime_kills);
    policy.set(new.policy.clone());
    let connections = match workers.reconfigure(&new.nagios) {
        Ok(what) => what,
        Err(e) => format!("[nagios] only partly changed: {e}"),
    };
    *current = Settings {
        nagios: workers.config().clone(),
        backend: current.backend,
        cgroup: current.cgroup.clone(),
        ..new
    };
    let (changed, restart) = pidring_service::daemon::config::reload_summary(&changed, &restart);
    tracing::info!(
        "SIGHUP: configuration reloaded from {}: changed {changed}; {connections}{restart}",
        path.display()
    );
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("pidring nagios-worker: {msg}");
    ExitCode::from(2)
}
