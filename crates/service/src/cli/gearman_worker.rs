//! `pidring gearman-worker`: a mod_gearman worker that runs its jobs through pidring.

use clap::Args;
use pidring::BackendKind;
use pidring_service::gearman::{self, GearmanConfig, GearmanError, GearmanWorkers};
use std::path::PathBuf;
use std::process::ExitCode;

use super::common::{block_signals, service_executor, wait_stop_signal, wait_stop_signal_with};

/// Arguments of `pidring gearman-worker`.
#[derive(Args, Debug)]
#[command(
    after_help = "Any other mod_gearman worker option is given as --KEY=VALUE, e.g. \
--services=yes --hostgroups=web,db --encryption=no --key=SECRET --keyfile=/etc/mod-gearman/secret.key \
--identifier=NAME --job_timeout=60 --max-age=120 --timeout_return=3 --load_limit1=20 \
--restrict_path=/usr/lib/nagios/plugins --max-worker=200 --dupserver=HOST:PORT \
--prometheus_server=127.0.0.1:9050. \
With no queue option, host, service, eventhandler and notification are served. \
SIGHUP re-reads the --config files (the options above still apply on top) and changes \
queues, servers, max-worker, timeouts, keys and load limits live; without --config it is ignored."
)]
pub struct GearmanWorkerArgs {
    /// A mod_gearman worker.cfg to read (repeatable; a directory reads its
    /// *.cfg and *.conf). SIGHUP re-reads it.
    #[arg(long = "config", value_name = "FILE")]
    configs: Vec<PathBuf>,
    /// A gearmand server, host:port (repeatable; one connection each).
    #[arg(long = "server", value_name = "HOST:PORT")]
    servers: Vec<String>,
    /// Event backend: auto, io_uring or epoll.
    #[arg(long, default_value = "auto")]
    backend: BackendKind,
    /// Containment: a cgroup v2 leaf per check: auto (the delegated own
    /// cgroup under systemd, else as root a fresh one under the cgroup2
    /// mount, else the process-group fallback), off, or a cgroup2 path
    /// owned by this process alone.
    #[arg(long, value_name = "auto|off|PATH", default_value = "auto")]
    cgroup: pidring::cgroup::Containment,
    /// Most checks running at once (jobs in flight are bounded by max-worker, or this).
    #[arg(long, default_value_t = 1024)]
    max_running: usize,
    /// Take SCHED_FIFO on the executor's loop while a kill is near: true or false.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    realtime_kills: bool,
    /// Run every job as this user (name or uid; needs root): its groups,
    /// gid and uid are set before exec.
    #[arg(long)]
    user: Option<String>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// mod_gearman options, --KEY=VALUE (see below).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "--KEY=VALUE"
    )]
    options: Vec<String>,
}

/// The worker's settings from files, then --server, then the other options, in order.
fn config(args: &GearmanWorkerArgs) -> Result<GearmanConfig, String> {
    let mut c = file_config(args)?;
    if let Some(user) = &args.user {
        c.run_as = Some(super::common::run_as_user(user)?);
    }
    Ok(c)
}

/// [`config`] but `--user` (looked up once, at start): what a reload reads.
fn file_config(args: &GearmanWorkerArgs) -> Result<GearmanConfig, String> {
    let mut c = GearmanConfig::default();
    for f in &args.configs {
        c.read_path(f)?;
    }
    for s in &args.servers {
        c.apply("server", s)?;
    }
    c.apply_args(&args.options)?;
    c.validate()?;
    Ok(c)
}

/// The files a reload re-reads: `--config`, and `config=` among the
/// mod_gearman options (`--config=FILE` after them is one).
fn config_files(args: &GearmanWorkerArgs) -> Vec<String> {
    let mut files: Vec<String> = args
        .configs
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let mut it = args.options.iter();
    while let Some(o) = it.next() {
        let o = o.trim_start_matches('-');
        match o.split_once('=') {
            Some((k, v)) if k.trim().eq_ignore_ascii_case("config") => files.push(v.into()),
            None if o.eq_ignore_ascii_case("config") => files.extend(it.next().cloned()),
            _ => {}
        }
    }
    files
}

/// SIGHUP: re-read the files and apply what changed (see docs/GEARMAN.md
/// "Reload"); a file that fails keeps the running configuration.
fn reload(args: &GearmanWorkerArgs, workers: &mut GearmanWorkers) {
    let paths = config_files(args).join(", ");
    let failed = |why: String| {
        tracing::error!("SIGHUP: reload failed, the running configuration is kept: {why}");
    };
    let mut new = match file_config(args) {
        Ok(c) => c,
        Err(e) => return failed(format!("invalid config file {paths}: {e}")),
    };
    // What only a restart changes keeps its running value (the executor's
    // --backend, --cgroup, --max-running and --user are flags: a file
    // cannot change them).
    let mut restart = Vec::new();
    let old = workers.config();
    if new.prometheus_server != old.prometheus_server {
        restart.push("prometheus_server");
        new.prometheus_server = old.prometheus_server.clone();
    }
    match workers.reconfigure(&new) {
        Ok(changed) => {
            let (changed, restart) =
                pidring_service::daemon::config::reload_summary(&changed, &restart);
            tracing::info!(
                "SIGHUP: configuration reloaded from {paths}: changed {changed}{restart}"
            );
        }
        Err(GearmanError::Config(e)) => failed(format!("invalid config file {paths}: {e}")),
        Err(e) => tracing::error!("SIGHUP: configuration from {paths} only partly applied: {e}"),
    }
}

/// Run until SIGTERM, SIGINT or SIGQUIT; SIGHUP reloads `--config` (or, without one, is ignored).
pub fn main(args: GearmanWorkerArgs) -> ExitCode {
    super::logging::init("info", args.log_json);
    let stop_signals = match block_signals(&pidring_service::daemon::taken_signals()) {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot block the stop signals: {e}")),
    };
    let config = match config(&args) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let exec = match service_executor(
        args.backend,
        args.cgroup.clone(),
        args.max_running,
        args.realtime_kills,
    ) {
        Ok(e) => e,
        Err(e) => return fail(&e.to_string()),
    };
    let mut workers = match gearman::spawn_workers(&config, exec.clone()) {
        Ok(w) => w,
        Err(e) => return fail(&e.to_string()),
    };
    if let Some(addr) = config
        .prometheus_server
        .as_deref()
        .and_then(|a| a.parse().ok())
    {
        let stats = workers.stats_handle();
        let e = exec.clone();
        let render: pidring_service::daemon::prometheus::Renderer =
            std::sync::Arc::new(move || {
                let mut body = pidring_service::daemon::prometheus::render_engine(&e.metrics());
                pidring_service::daemon::prometheus::render_gearman(&mut body, &stats.snapshot());
                body
            });
        match pidring_service::daemon::prometheus::serve_with(addr, render) {
            Ok(bound) => {
                tracing::info!(address = %bound, "serving Prometheus metrics at http://{bound}/metrics")
            }
            Err(e) => return fail(&format!("cannot serve metrics on {addr}: {e}")),
        }
    }
    tracing::info!("pidring gearman-worker running; stop with SIGTERM");
    let sig = if config_files(&args).is_empty() {
        wait_stop_signal(&stop_signals)
    } else {
        wait_stop_signal_with(&stop_signals, Some(&mut || reload(&args, &mut workers)))
    };
    tracing::info!(
        signal = sig,
        "stopping: taking no new jobs; finishing those in flight"
    );
    let stats = workers.stop();
    exec.shutdown();
    tracing::info!(
        stats = %serde_json::to_string(&stats).unwrap_or_default(),
        "stopped\n{}",
        exec.metrics().render_table()
    );
    ExitCode::SUCCESS
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("pidring gearman-worker: {msg}");
    ExitCode::from(2)
}
