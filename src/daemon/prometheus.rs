//! Prometheus text exposition (format 0.0.4) over a tiny HTTP/1.0 server.
//!
//! One thread serves one scrape at a time with short socket timeouts: a
//! scraper is one client every few seconds, and a stuck one cannot hold the
//! endpoint for more than the timeout.

use super::protocol::DaemonCounters;
use super::server::Daemon;
use crate::metrics::MetricsSnapshot;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Socket timeout for one scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;

/// Bind `addr` and serve `/metrics` on a background thread; returns the bound address.
pub(crate) fn serve(addr: SocketAddr, daemon: Arc<Daemon>) -> io::Result<SocketAddr> {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the metrics endpoint is not on loopback: anyone who can reach it can read the metrics");
    }
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("pidring-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = scrape(s, &daemon) {
                            tracing::debug!(error = %e, "metrics request failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(bound)
}

fn scrape(mut stream: TcpStream, daemon: &Daemon) -> io::Result<()> {
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    // A bound on the whole request, not just on each read: a client that
    // trickles bytes cannot hold the (single) metrics thread.
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
            let body = render(&daemon.exec.metrics(), &daemon.stats.snapshot());
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
    let mut out = String::with_capacity(8 * 1024);
    let secs = |us: u64| us as f64 / 1e6;

    family(
        &mut out,
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
    family(
        &mut out,
        "pidring_stage_duration_max_seconds",
        "gauge",
        "Largest latency seen per stage since start.",
    );
    for s in &engine.stages {
        let _ = writeln!(
            out,
            "pidring_stage_duration_max_seconds{{stage=\"{}\"}} {}",
            s.stage.as_str(),
            secs(s.latency.max_us)
        );
    }

    let c = &engine.counters;
    let counters: [(&str, &str, u64); 6] = [
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
    ];
    for (name, help, v) in counters {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {v}");
    }
    family(
        &mut out,
        "pidring_checks_outcome_total",
        "counter",
        "Results by outcome.",
    );
    for (outcome, v) in [
        ("exited", c.exited),
        ("signaled", c.signaled),
        ("timed_out", c.timed_out),
        ("cancelled", c.cancelled),
        ("shutdown", c.shutdown),
        ("spawn_failed", c.spawn_failed),
    ] {
        let _ = writeln!(
            out,
            "pidring_checks_outcome_total{{outcome=\"{outcome}\"}} {v}"
        );
    }
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
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    }
    family(
        &mut out,
        "pidring_backend_info",
        "gauge",
        "The event backend in use (value is always 1).",
    );
    let _ = writeln!(
        out,
        "pidring_backend_info{{backend=\"{}\"}} 1",
        engine.backend
    );

    let d = daemon;
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
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {v}");
    }
    family(
        &mut out,
        "pidring_request_errors_total",
        "counter",
        "Error responses by code.",
    );
    for (code, v) in &d.errors_by_code {
        let _ = writeln!(out, "pidring_request_errors_total{{code=\"{code}\"}} {v}");
    }
    family(
        &mut out,
        "pidring_connections_open",
        "gauge",
        "Client connections open now.",
    );
    let _ = writeln!(out, "pidring_connections_open {}", d.connections_open);
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}
