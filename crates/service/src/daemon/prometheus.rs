//! Prometheus text exposition (format 0.0.4) over a tiny HTTP/1.0 server.
//!
//! Each connection gets its own short-lived thread with short socket
//! timeouts, so an idle or trickling connection holds only itself (for at
//! most `SCRAPE_TIMEOUT`), never the scrapes after it. At most
//! `MAX_CONNECTIONS` are served at once; past that a connection is answered
//! 503 and closed at once, so idle connections cannot pile up threads.

use super::protocol::DaemonCounters;
use super::server::Daemon;
use pidring::metrics::MetricsSnapshot;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Socket timeout for one scrape, and the bound on reading its request.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Connections served at once (a scraper uses one at a time).
const MAX_CONNECTIONS: usize = 16;

/// Bind `addr` and serve `/metrics` on a background thread; returns the bound address.
pub(crate) fn serve(addr: SocketAddr, daemon: Arc<Daemon>) -> io::Result<SocketAddr> {
    serve_with(
        addr,
        Arc::new(move || {
            let mut body = render(&daemon.exec.metrics(), &daemon.stats.snapshot());
            if let Some(g) = &daemon.gearman {
                render_gearman(&mut body, &g.snapshot());
            }
            body
        }),
    )
}

/// What `/metrics` answers: the exposition text, rendered at each scrape.
pub type Renderer = Arc<dyn Fn() -> String + Send + Sync>;

/// Serve `render`'s text at `http://addr/metrics` on a thread of its own
/// (a few scrapes at once, each bounded in time); returns the bound address.
pub fn serve_with(addr: SocketAddr, daemon: Renderer) -> io::Result<SocketAddr> {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the metrics endpoint is not on loopback: anyone who can reach it can read the metrics");
    }
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("pidring-metrics".into())
        .spawn(move || {
            let open = Arc::new(AtomicUsize::new(0));
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => accept(s, &daemon, &open),
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(bound)
}

/// One of the `MAX_CONNECTIONS` slots, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serve `stream` on a thread of its own, or refuse it if all slots are taken.
fn accept(stream: TcpStream, daemon: &Renderer, open: &Arc<AtomicUsize>) {
    // Only this thread takes slots: a check then an add cannot overshoot.
    if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
        tracing::debug!(
            max = MAX_CONNECTIONS,
            "metrics connection refused: all slots busy"
        );
        refuse(stream);
        return;
    }
    open.fetch_add(1, Ordering::Relaxed);
    let slot = Slot(open.clone());
    let daemon = daemon.clone();
    let spawned = std::thread::Builder::new()
        .name("pidring-scrape".into())
        .spawn(move || {
            let _slot = slot;
            if let Err(e) = scrape(stream, &daemon) {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    if let Err(e) = spawned {
        // The closure, with the connection and its slot, is dropped: closed.
        tracing::warn!(error = %e, "cannot start a thread for a metrics request; connection closed");
    }
}

/// Answer 503 without waiting for the request: never blocks the accept loop.
fn refuse(mut stream: TcpStream) {
    let _ = stream.set_nonblocking(true);
    let body = "busy: too many metrics connections open; retry\n";
    let _ = write!(
        stream,
        "HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Closing with request bytes unread would reset the connection, and the
    // client could lose the answer: read whatever has arrived already.
    let mut buf = [0u8; 1024];
    let mut drained = 0;
    while drained < MAX_HEAD {
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => drained += n,
            _ => break,
        }
    }
}

fn scrape(mut stream: TcpStream, render: &Renderer) -> io::Result<()> {
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    // A bound on the whole request, not just on each read: a client that
    // trickles bytes cannot hold its slot for long.
    let deadline = std::time::Instant::now() + SCRAPE_TIMEOUT;
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head too slow",
            ));
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
    }
    let first = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "use GET\n",
        );
    }
    let path = path.split('?').next().unwrap_or("");
    match path {
        "/metrics" => {
            let body = render();
            let body = if method == "HEAD" { "" } else { body.as_str() };
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            )
        }
        "/" => respond(
            &mut stream,
            "200 OK",
            "text/plain",
            "pidring daemon: metrics at /metrics\n",
        ),
        _ => respond(
            &mut stream,
            "404 Not Found",
            "text/plain",
            "not found; try /metrics\n",
        ),
    }
}

fn respond(stream: &mut TcpStream, status: &str, ctype: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

/// Render every metric as Prometheus text exposition.
pub fn render(engine: &MetricsSnapshot, daemon: &DaemonCounters) -> String {
    let mut out = render_engine(engine);
    render_daemon(&mut out, daemon);
    out
}

/// The engine's metrics: stage latencies, check counters, backend.
pub fn render_engine(engine: &MetricsSnapshot) -> String {
    let mut out = String::with_capacity(8 * 1024);
    render_stages(&mut out, engine);
    render_engine_counters(&mut out, engine);
    render_engine_gauges(&mut out, engine);
    out
}

/// Per-stage latency: quantile summaries and the largest seen.
fn render_stages(out: &mut String, engine: &MetricsSnapshot) {
    let secs = |us: u64| us as f64 / 1e6;
    family(
        out,
        "pidring_stage_duration_seconds",
        "summary",
        "Latency of each stage of a check's life (HDR histogram quantiles).",
    );
    for s in &engine.stages {
        let stage = s.stage.as_str();
        for (q, v) in [
            ("0.5", s.latency.p50_us),
            ("0.9", s.latency.p90_us),
            ("0.99", s.latency.p99_us),
            ("0.999", s.latency.p999_us),
        ] {
            let _ = writeln!(
                out,
                "pidring_stage_duration_seconds{{stage=\"{stage}\",quantile=\"{q}\"}} {}",
                secs(v)
            );
        }
        let _ = writeln!(
            out,
            "pidring_stage_duration_seconds_sum{{stage=\"{stage}\"}} {}",
            s.latency.mean_us * s.latency.count as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "pidring_stage_duration_seconds_count{{stage=\"{stage}\"}} {}",
            s.latency.count
        );
    }
    labelled(
        out,
        "pidring_stage_duration_max_seconds",
        "gauge",
        "Largest latency seen per stage since start.",
        "stage",
        engine
            .stages
            .iter()
            .map(|s| (s.stage.as_str(), secs(s.latency.max_us))),
    );
}

/// The engine's counters, and results by outcome.
fn render_engine_counters(out: &mut String, engine: &MetricsSnapshot) {
    let c = &engine.counters;
    let counters: [(&str, &str, u64); 7] = [
        (
            "pidring_checks_submitted_total",
            "Checks accepted by the engine.",
            c.submitted,
        ),
        (
            "pidring_checks_rejected_total",
            "Checks refused (queue full, shutting down, invalid).",
            c.rejected,
        ),
        (
            "pidring_checks_completed_total",
            "Results delivered, all outcomes.",
            c.completed,
        ),
        (
            "pidring_checks_escalated_total",
            "Timed-out checks that needed SIGKILL after SIGTERM.",
            c.escalated,
        ),
        (
            "pidring_checks_output_cut_total",
            "Results whose output was cut after the drain bound.",
            c.output_cut,
        ),
        (
            "pidring_orphans_reaped_total",
            "Escaped descendants of checks reaped as subreaper.",
            c.orphans_reaped,
        ),
        (
            "pidring_cgroup_escapees_total",
            "Processes found in a check's cgroup leaf besides its leader when the leaf was killed or the leader exited.",
            c.cgroup_escapees,
        ),
    ];
    for (name, help, v) in counters {
        scalar(out, name, "counter", help, v);
    }
    labelled(
        out,
        "pidring_checks_outcome_total",
        "counter",
        "Results by outcome.",
        "outcome",
        [
            ("exited", c.exited),
            ("signaled", c.signaled),
            ("timed_out", c.timed_out),
            ("cancelled", c.cancelled),
            ("shutdown", c.shutdown),
            ("spawn_failed", c.spawn_failed),
        ],
    );
}

/// Running and queued checks, and which backend, realtime kills and containment are in force.
fn render_engine_gauges(out: &mut String, engine: &MetricsSnapshot) {
    for (name, help, v) in [
        (
            "pidring_checks_running",
            "Checks holding a running slot.",
            engine.running,
        ),
        (
            "pidring_checks_queued",
            "Checks waiting for a running slot.",
            engine.queued,
        ),
    ] {
        scalar(out, name, "gauge", help, v);
    }
    labelled(
        out,
        "pidring_backend_info",
        "gauge",
        "The event backend in use (value is always 1).",
        "backend",
        [(&engine.backend, 1)],
    );
    scalar(
        out,
        "pidring_realtime_kills",
        "gauge",
        "1 if the loop takes SCHED_FIFO near kills (realtime_kills asked for and permitted), else 0.",
        u8::from(engine.realtime_kills),
    );
    labelled(
        out,
        "pidring_containment_info",
        "gauge",
        "Which containment is in force: cgroup (a cgroup v2 leaf per check), fallback (asked for, not usable: process-group sweep and descendant walk) or off (value is always 1).",
        "mode",
        [(&engine.containment.mode, 1)],
    );
}

/// The daemon's own counters: clients, requests, errors.
fn render_daemon(out: &mut String, d: &DaemonCounters) {
    let daemon_counters: [(&str, &str, u64); 6] = [
        (
            "pidring_connections_total",
            "Client connections accepted.",
            d.connections_accepted,
        ),
        ("pidring_requests_total", "Request lines read.", d.requests),
        (
            "pidring_results_sent_total",
            "Results written to clients.",
            d.results_sent,
        ),
        (
            "pidring_results_dropped_total",
            "Results whose client was gone or dropped.",
            d.results_dropped,
        ),
        (
            "pidring_clients_dropped_stuck_total",
            "Clients dropped for not reading their responses.",
            d.clients_dropped_stuck,
        ),
        (
            "pidring_clients_gone_in_flight_total",
            "Clients that hung up with checks in flight.",
            d.clients_gone_in_flight,
        ),
    ];
    for (name, help, v) in daemon_counters {
        scalar(out, name, "counter", help, v);
    }
    labelled(
        out,
        "pidring_request_errors_total",
        "counter",
        "Error responses by code.",
        "code",
        &d.errors_by_code,
    );
    scalar(
        out,
        "pidring_connections_open",
        "gauge",
        "Client connections open now.",
        d.connections_open,
    );
}

/// The `[gearman]` worker's metrics: jobs per queue and outcome, connection state.
pub fn render_gearman(out: &mut String, g: &crate::gearman::GearmanStatsSnapshot) {
    family(
        out,
        "pidring_gearman_jobs_total",
        "counter",
        "mod_gearman jobs by queue and what became of them (grabbed, done, too_old, undecryptable, requeued).",
    );
    for (q, c) in &g.queues {
        for (what, v) in [
            ("grabbed", c.grabbed),
            ("done", c.done),
            ("too_old", c.too_old),
            ("undecryptable", c.undecryptable),
            ("requeued", c.requeued),
        ] {
            let _ = writeln!(
                out,
                "pidring_gearman_jobs_total{{queue=\"{}\",outcome=\"{what}\"}} {v}",
                label(q)
            );
        }
    }
    type PerServer = fn(&crate::gearman::worker::ServerState) -> u64;
    let per_server: [(&str, &str, &str, PerServer); 3] = [
        (
            "pidring_gearman_server_connected",
            "gauge",
            "1 while the connection to this gearmand is up.",
            |st| u64::from(st.connected),
        ),
        (
            "pidring_gearman_server_connects_total",
            "counter",
            "Connections made to this gearmand (first and re-).",
            |st| st.connects,
        ),
        (
            "pidring_gearman_load_paused",
            "gauge",
            "1 while a load limit keeps this connection from taking jobs.",
            |st| u64::from(st.load_paused),
        ),
    ];
    for (name, kind, help, value) in per_server {
        labelled(
            out,
            name,
            kind,
            help,
            "server",
            g.servers.iter().map(|(s, st)| (label(s), value(st))),
        );
    }
    for (name, kind, help, v) in [
        (
            "pidring_gearman_jobs_in_flight",
            "gauge",
            "mod_gearman jobs holding a running slot.",
            g.in_flight as u64,
        ),
        (
            "pidring_gearman_results_sent_total",
            "counter",
            "Results queued to a result queue.",
            g.results_sent,
        ),
        (
            "pidring_gearman_dup_sent_total",
            "counter",
            "Result copies accepted by a dupserver.",
            g.dup_sent,
        ),
        (
            "pidring_gearman_dup_dropped_total",
            "counter",
            "Result copies dropped (dupserver backlog full or down).",
            g.dup_dropped,
        ),
    ] {
        scalar(out, name, kind, help, v);
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A family of one unlabelled sample: its HELP, its TYPE, and the value.
fn scalar(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// A family of samples told apart by one label: its HELP, its TYPE, and
/// `name{key="k"} v` for each `(k, v)` (`k` written as it is).
fn labelled<K: std::fmt::Display, V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    key: &str,
    samples: impl IntoIterator<Item = (K, V)>,
) {
    family(out, name, kind, help);
    for (k, v) in samples {
        let _ = writeln!(out, "{name}{{{key}=\"{k}\"}} {v}");
    }
}

/// The HELP and TYPE lines that open a family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}
