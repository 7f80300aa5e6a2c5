//! `pidring daemon` and its client commands (`submit`, `stats`, `ping`).

use super::client;
use clap::{Args, Subcommand, ValueEnum};
use pidring::BackendKind;
use pidring_service::daemon::DaemonConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The daemon and the commands that talk to it.
#[derive(Subcommand, Debug)]
pub enum DaemonCommand {
    /// Run the executor service on a Unix socket (newline-delimited JSON, see PROTOCOL.md).
    Daemon(DaemonArgs),
    /// Hand one check to a running daemon, print its output, exit with its Nagios state.
    Submit(client::SubmitArgs),
    /// Show a running daemon's latency percentiles per stage and its counters.
    Stats(client::StatsArgs),
    /// Check that a daemon answers.
    Ping(client::PingArgs),
}

/// Log line format.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Arguments of `pidring daemon` (flags override the config file).
#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Socket path [default: /run/pidring/pidring.sock as root, else $XDG_RUNTIME_DIR/pidring.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// TOML configuration file (see docs/DAEMON.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Checks running at once [default: 1024].
    #[arg(long)]
    max_running: Option<usize>,
    /// Checks waiting for a slot before submits get `queue_full` [default: 100000].
    #[arg(long)]
    queue_limit: Option<usize>,
    /// Event backend: auto, io_uring or epoll [default: auto].
    #[arg(long)]
    backend: Option<BackendKind>,
    /// Containment: auto, off, or a cgroup2 path [default: auto].
    #[arg(long, value_name = "auto|off|PATH")]
    cgroup: Option<pidring::cgroup::Containment>,
    /// Take SCHED_FIFO on the executor's loop while a kill is near, so a
    /// saturated machine cannot make it late: true or false [default: true].
    #[arg(long, value_name = "BOOL")]
    realtime_kills: Option<bool>,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9464.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// How long SIGTERM waits for in-flight checks before killing them [default: 10s].
    #[arg(long, value_parser = pidring::units::parse_duration)]
    drain_timeout: Option<Duration>,
    /// Socket permission bits in octal [default: 0600].
    #[arg(long, value_parser = pidring_service::daemon::config::parse_mode)]
    socket_mode: Option<u32>,
    /// Run checks as this user (name or uid; needs root) [config: user].
    #[arg(long)]
    user: Option<String>,
    /// With --user: the primary group checks run with [config: group].
    #[arg(long, requires = "user")]
    group: Option<String>,
    /// Log format (filter with RUST_LOG, default "info").
    #[arg(long, value_enum, default_value = "human")]
    log_format: LogFormat,
}

/// Run the chosen command.
pub fn main(cmd: DaemonCommand) -> ExitCode {
    match cmd {
        DaemonCommand::Daemon(args) => run_daemon(args),
        DaemonCommand::Submit(args) => client::submit(args),
        DaemonCommand::Stats(args) => client::stats(args),
        DaemonCommand::Ping(args) => client::ping(args),
    }
}

fn run_daemon(args: DaemonArgs) -> ExitCode {
    let json = args.log_format == LogFormat::Json;
    super::logging::init("info", json);
    let mut config = match &args.config {
        Some(path) => match DaemonConfig::load(path) {
            Ok(c) => c,
            Err(e) => return fail(&e.to_string(), json),
        },
        None => DaemonConfig::default(),
    };
    let path = args.config.clone();
    let overrides = Overrides(args);
    overrides.apply(&mut config);
    // SIGHUP re-reads the file, the flags applied over it again.
    let reload = path.map(|path| pidring_service::daemon::Reload {
        path,
        overrides: Box::new(move |c: &mut DaemonConfig| overrides.apply(c)),
    });
    match pidring_service::daemon::run_reloadable(config, reload) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string(), json),
    }
}

/// The flags, which win over the config file (at start and at each reload).
struct Overrides(DaemonArgs);

impl Overrides {
    fn apply(&self, config: &mut DaemonConfig) {
        let args = &self.0;
        if let Some(s) = &args.socket {
            config.socket = Some(s.clone());
        }
        if let Some(n) = args.max_running {
            config.max_running = n;
        }
        if let Some(n) = args.queue_limit {
            config.queue_limit = n;
        }
        if let Some(b) = args.backend {
            config.backend = b;
        }
        if let Some(c) = &args.cgroup {
            config.cgroup = c.clone();
        }
        if let Some(r) = args.realtime_kills {
            config.realtime_kills = r;
        }
        if let Some(m) = args.metrics {
            config.metrics = Some(m);
        }
        if let Some(d) = args.drain_timeout {
            config.drain_timeout = d;
        }
        if let Some(m) = args.socket_mode {
            config.socket_mode = m;
        }
        if let Some(u) = &args.user {
            config.user = Some(u.clone());
        }
        if let Some(g) = &args.group {
            config.group = Some(g.clone());
        }
    }
}

/// Report a fatal error once: as a JSON log line for machines, else as plain text.
fn fail(msg: &str, json: bool) -> ExitCode {
    if json {
        tracing::error!("{msg}");
    } else {
        eprintln!("pidring daemon: {msg}");
    }
    ExitCode::FAILURE
}
