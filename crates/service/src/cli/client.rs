//! Client commands for a running daemon: `pidring submit`, `pidring stats`, `pidring ping`.

use clap::Args;
use pidring::State;
use pidring_service::daemon::protocol::{ClientId, Response};
use serde_json::json;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Arguments of `pidring submit`.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// Daemon socket [default: as `pidring daemon`].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Time the check may run before SIGTERM [default: the daemon's].
    #[arg(long, value_parser = pidring::units::parse_timeout)]
    timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL [default: the daemon's].
    #[arg(long, value_parser = pidring::units::parse_duration)]
    grace: Option<Duration>,
    /// Bytes kept per output stream, e.g. 64k [default: the daemon's].
    #[arg(long, value_parser = pidring::units::parse_size)]
    output_cap: Option<usize>,
    /// Set an environment variable for the check (KEY=VALUE; repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Print the whole response as JSON instead of the plugin's output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    command: super::common::CommandArgs,
}

/// Arguments of `pidring stats`.
#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Daemon socket [default: as `pidring daemon`].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Print the raw JSON answer.
    #[arg(long)]
    json: bool,
}

/// Arguments of `pidring ping`.
#[derive(Args, Debug)]
pub struct PingArgs {
    /// Daemon socket [default: as `pidring daemon`].
    #[arg(long)]
    socket: Option<PathBuf>,
}

/// A request/response session with the daemon.
struct Session {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Session {
    fn connect(socket: Option<PathBuf>) -> Result<Session, String> {
        let path = socket.unwrap_or_else(pidring_service::daemon::default_socket_path);
        let stream = UnixStream::connect(&path).map_err(|e| connect_error(&path, &e))?;
        let reader = BufReader::new(
            stream
                .try_clone()
                .map_err(|e| format!("cannot use the connection: {e}"))?,
        );
        Ok(Session {
            path,
            writer: stream,
            reader,
        })
    }

    /// Send one request and read lines until the answer with `id` comes.
    fn call(&mut self, request: serde_json::Value, id: &ClientId) -> Result<Response, String> {
        let mut line = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|e| format!("cannot send to {}: {e}", self.path.display()))?;
        loop {
            let mut buf = String::new();
            let n = self
                .reader
                .read_line(&mut buf)
                .map_err(|e| format!("lost the connection to {}: {e}", self.path.display()))?;
            if n == 0 {
                return Err(format!(
                    "the daemon at {} closed the connection without answering (is it shutting down?)",
                    self.path.display()
                ));
            }
            let response: Response = serde_json::from_str(&buf)
                .map_err(|e| format!("unexpected answer from the daemon ({e}): {}", buf.trim()))?;
            let rid = match &response {
                Response::Result { id, .. } => Some(id),
                Response::Error { id, .. }
                | Response::Stats { id, .. }
                | Response::Pong { id, .. } => id.as_ref(),
            };
            if rid.is_none() || rid == Some(id) {
                return Ok(response);
            }
        }
    }
}

/// A connect error a person can act on.
fn connect_error(path: &Path, e: &std::io::Error) -> String {
    let p = path.display();
    match e.kind() {
        ErrorKind::NotFound => {
            format!("cannot connect to {p}: no such file (is `pidring daemon` running?)")
        }
        ErrorKind::ConnectionRefused => format!(
            "cannot connect to {p}: connection refused (a stale socket: is `pidring daemon` running?)"
        ),
        ErrorKind::PermissionDenied => format!(
            "cannot connect to {p}: permission denied (the socket is owner-only by default: run as the daemon's user, or set socket_mode/socket_group)"
        ),
        _ => format!("cannot connect to {p}: {e}"),
    }
}

/// `pidring submit`: exit code is the check's Nagios state (3 UNKNOWN on any error).
pub fn submit(args: SubmitArgs) -> ExitCode {
    super::logging::init("warn", false);
    let mut req = json!({"op": "submit", "id": 1});
    match (&args.command.command_line, args.command.argv.is_empty()) {
        (Some(line), _) => req["command_line"] = json!(line),
        (None, false) => req["argv"] = json!(args.command.argv),
        (None, true) => {
            return fail(
                "submit",
                "nothing to run: give a command after `--`, or --command-line 'check_x -H host'",
            );
        }
    }
    if let Some(t) = args.timeout {
        req["timeout"] = json!(t.as_secs_f64());
    }
    if let Some(g) = args.grace {
        req["grace"] = json!(g.as_secs_f64());
    }
    if let Some(c) = args.output_cap {
        req["output_cap"] = json!(c);
    }
    if !args.env.is_empty() {
        let mut env = serde_json::Map::new();
        for kv in &args.env {
            let Some((k, v)) = kv.split_once('=') else {
                return fail("submit", &format!("--env {kv:?}: expected KEY=VALUE"));
            };
            env.insert(k.to_string(), json!(v));
        }
        req["env"] = serde_json::Value::Object(env);
    }
    let (_, response) = match ask("submit", args.socket, req, ClientId::Num(1.into())) {
        Ok(answer) => answer,
        Err(code) => return code,
    };
    if args.json {
        print_json(&response);
    }
    match response {
        Response::Result { result, .. } => {
            if args.json {
                // The whole response was printed above.
                ExitCode::from(result.state.code() as u8)
            } else {
                super::common::print_result(&result, false)
            }
        }
        Response::Error { code, message, .. } => {
            if args.json {
                ExitCode::from(State::Unknown.code() as u8)
            } else {
                fail("submit", &format!("{}: {message}", code.as_str()))
            }
        }
        other => unexpected("submit", &other),
    }
}

/// `pidring stats`: percentiles per stage and counters.
pub fn stats(args: StatsArgs) -> ExitCode {
    super::logging::init("warn", false);
    let request = json!({"op": "stats", "id": "stats"});
    let (_, response) = match ask("stats", args.socket, request, ClientId::Str("stats".into())) {
        Ok(answer) => answer,
        Err(code) => return code,
    };
    if args.json {
        print_json(&response);
        return ExitCode::SUCCESS;
    }
    let Response::Stats {
        engine,
        daemon,
        gearman,
        ..
    } = response
    else {
        return unexpected("stats", &response);
    };
    let mut out = String::new();
    out.push_str(&format!(
        "backend {}   realtime kills {}   running {}   queued {}\n",
        engine.backend,
        if engine.realtime_kills { "on" } else { "off" },
        engine.running,
        engine.queued
    ));
    out.push_str(&format!(
        "containment {}{}\n\n",
        engine.containment.mode,
        match engine.containment.detail.as_str() {
            "" => String::new(),
            d => format!(" ({d})"),
        }
    ));
    out.push_str(&engine.render_table());
    let c = &engine.counters;
    out.push_str("\nchecks\n");
    for (name, v) in [
        ("submitted", c.submitted),
        ("rejected", c.rejected),
        ("completed", c.completed),
        ("exited", c.exited),
        ("signaled", c.signaled),
        ("timed out", c.timed_out),
        ("escalated to SIGKILL", c.escalated),
        ("spawn failed", c.spawn_failed),
        ("cancelled", c.cancelled),
        ("ended by shutdown", c.shutdown),
        ("output cut", c.output_cut),
        ("orphans reaped", c.orphans_reaped),
        ("cgroup escapees", c.cgroup_escapees),
    ] {
        out.push_str(&format!("  {name:<22} {v:>10}\n"));
    }
    out.push_str("\nclients\n");
    for (name, v) in [
        ("connections", daemon.connections_accepted),
        ("open now", daemon.connections_open),
        ("requests", daemon.requests),
        ("results sent", daemon.results_sent),
        ("results dropped", daemon.results_dropped),
        ("dropped (not reading)", daemon.clients_dropped_stuck),
        ("hung up in flight", daemon.clients_gone_in_flight),
        ("error responses", daemon.errors),
    ] {
        out.push_str(&format!("  {name:<22} {v:>10}\n"));
    }
    for (code, v) in daemon.errors_by_code.iter().filter(|(_, v)| **v > 0) {
        out.push_str(&format!("    {code:<20} {v:>10}\n"));
    }
    if let Some(g) = gearman {
        out.push_str(&format!(
            "\ngearman   in flight {}   results sent {}   dup sent {}   dup dropped {}\n",
            g.in_flight, g.results_sent, g.dup_sent, g.dup_dropped
        ));
        for (server, st) in &g.servers {
            out.push_str(&format!(
                "  {server:<22} {}   connects {}   lost {}{}\n",
                if st.connected { "connected" } else { "DOWN" },
                st.connects,
                st.disconnects,
                if st.load_paused {
                    "   paused by load limit"
                } else {
                    ""
                }
            ));
        }
        out.push_str(
            "  queue                     grabbed       done    too old  undecrypt   requeued\n",
        );
        for (q, c) in &g.queues {
            out.push_str(&format!(
                "  {q:<22} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
                c.grabbed, c.done, c.too_old, c.undecryptable, c.requeued
            ));
        }
    }
    if let Some(addr) = &daemon.metrics_address {
        out.push_str(&format!("\nPrometheus metrics: http://{addr}/metrics\n"));
    }
    print!("{out}");
    ExitCode::SUCCESS
}

/// `pidring ping`: exit 0 if the daemon answers.
pub fn ping(args: PingArgs) -> ExitCode {
    super::logging::init("warn", false);
    let start = Instant::now();
    let request = json!({"op": "ping", "id": "ping"});
    match ask("ping", args.socket, request, ClientId::Str("ping".into())) {
        Ok((session, Response::Pong { version, .. })) => {
            println!(
                "pong from pidring {version} at {} in {:.1}ms",
                session.path.display(),
                start.elapsed().as_secs_f64() * 1e3
            );
            ExitCode::SUCCESS
        }
        Ok((_, other)) => unexpected("ping", &other),
        Err(code) => code,
    }
}

/// Connect, send one request and wait for its answer; a failure is
/// reported (`pidring CMD: …`) and becomes the exit code.
fn ask(
    cmd: &str,
    socket: Option<PathBuf>,
    request: serde_json::Value,
    id: ClientId,
) -> Result<(Session, Response), ExitCode> {
    let mut session = Session::connect(socket).map_err(|e| fail(cmd, &e))?;
    let response = session.call(request, &id).map_err(|e| fail(cmd, &e))?;
    Ok((session, response))
}

/// Print a whole answer as indented JSON.
fn print_json(response: &Response) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, response);
    let _ = writeln!(out);
}

/// An answer of the wrong kind: the daemon speaks another version?
fn unexpected(cmd: &str, response: &Response) -> ExitCode {
    fail(
        cmd,
        &format!("unexpected answer (is the daemon another version of pidring?): {response:?}"),
    )
}

/// Report `msg` for `pidring CMD`; the exit code of a check that could not run (UNKNOWN).
fn fail(cmd: &str, msg: &str) -> ExitCode {
    eprintln!("pidring {cmd}: {msg}");
    ExitCode::from(State::Unknown.code() as u8)
}
