//! Stats, Prometheus, and the loop's realtime priority.

use super::*;

on_both_backends!(
    stats_and_prometheus_report_counts,
    idle_metrics_connections_do_not_delay_a_scrape,
);

fn stats_and_prometheus_report_counts(backend: &str) {
    let d = Daemon::start(backend, &["--metrics", "127.0.0.1:0"], None);
    let mut c = d.client();
    for i in 0..10 {
        c.send(&json!({"op": "submit", "id": i, "argv": ["/bin/echo", "OK"]}));
    }
    for i in 10..12 {
        c.send(&json!({"op": "submit", "id": i, "argv": ["/bin/sh", "-c", "echo bad; exit 2"]}));
    }
    c.send(
        &json!({"op": "submit", "id": 12, "timeout": "300ms", "grace": "200ms",
        "argv": ["/bin/sh", "-c", "trap '' TERM; sleep 30"]}),
    );
    c.send_raw(b"not json\n{\"op\":\"submit\",\"id\":1000}\n{\"op\":\"nope\"}\n");
    let mut states: HashMap<String, u32> = HashMap::new();
    let mut errors = 0;
    // Whether SIGKILL was needed depends on whether the shell had set its
    // trap before the deadline: count what the results say.
    let mut escalated = 0;
    for _ in 0..16 {
        let r = c.recv();
        match r["type"].as_str().unwrap() {
            "result" => {
                if r["result"]["outcome"]["escalated"] == true {
                    escalated += 1;
                }
                *states
                    .entry(r["result"]["state"].as_str().unwrap().to_string())
                    .or_default() += 1
            }
            "error" => errors += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(errors, 3);
    assert_eq!(states["OK"], 10);
    assert_eq!(states["CRITICAL"], 2);
    assert_eq!(states["UNKNOWN"], 1);

    let s = d.wait_stats("results counted", |s| dcounter(s, "results_sent") == 13);
    assert_eq!(counter(&s, "submitted"), 13);
    assert_eq!(counter(&s, "completed"), 13);
    assert_eq!(counter(&s, "exited"), 12);
    assert_eq!(counter(&s, "timed_out"), 1);
    assert_eq!(counter(&s, "escalated"), escalated);
    assert_eq!(s["daemon"]["errors_by_code"]["bad_request"], 2);
    assert_eq!(s["daemon"]["errors_by_code"]["unknown_op"], 1);
    assert_eq!(s["engine"]["backend"], backend);
    // On by default, where this process may take a realtime priority too.
    let realtime = may_be_realtime();
    assert_eq!(s["engine"]["realtime_kills"], realtime, "{s}");
    let total = s["engine"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["stage"] == "total")
        .unwrap();
    assert_eq!(total["count"], 13);

    // The same numbers over Prometheus.
    let addr = s["daemon"]["metrics_address"].as_str().unwrap().to_string();
    let mut http = std::net::TcpStream::connect(&addr).unwrap();
    http.set_read_timeout(Some(PATIENCE)).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    http.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    assert!(body.contains("text/plain; version=0.0.4"));
    let metric = |line: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(line).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {line} in\n{body}"))
            .parse()
            .unwrap()
    };
    assert_eq!(metric("pidring_checks_submitted_total"), 13.0);
    assert_eq!(
        metric("pidring_realtime_kills"),
        f64::from(u8::from(realtime))
    );
    assert_eq!(metric("pidring_checks_completed_total"), 13.0);
    assert_eq!(metric("pidring_checks_escalated_total"), escalated as f64);
    assert_eq!(
        metric("pidring_checks_outcome_total{outcome=\"exited\"}"),
        12.0
    );
    assert_eq!(
        metric("pidring_checks_outcome_total{outcome=\"timed_out\"}"),
        1.0
    );
    assert_eq!(
        metric("pidring_request_errors_total{code=\"bad_request\"}"),
        2.0
    );
    assert_eq!(metric("pidring_results_sent_total"), 13.0);
    assert_eq!(
        metric("pidring_stage_duration_seconds_count{stage=\"total\"}"),
        13.0
    );
    for q in ["0.5", "0.9", "0.99", "0.999"] {
        let v = metric(&format!(
            "pidring_stage_duration_seconds{{stage=\"run\",quantile=\"{q}\"}}"
        ));
        assert!(v > 0.0);
    }
    // The timed-out check ran ~0.5 s: the max run time shows it.
    assert!(metric("pidring_stage_duration_max_seconds{stage=\"run\"}") >= 0.3);
    assert!(body.contains("# TYPE pidring_stage_duration_seconds summary"));
    assert!(body.contains("# TYPE pidring_checks_submitted_total counter"));
    assert_eq!(
        metric(&format!("pidring_backend_info{{backend=\"{backend}\"}}")),
        1.0
    );
}

/// `GET path` on the metrics endpoint: the whole answer, and how long it took.
fn http_get(addr: &str, path: &str) -> (String, Duration) {
    let start = Instant::now();
    let mut http = std::net::TcpStream::connect(addr).unwrap();
    http.set_read_timeout(Some(PATIENCE)).unwrap();
    http.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .unwrap();
    let mut answer = String::new();
    http.read_to_string(&mut answer).unwrap();
    (answer, start.elapsed())
}

fn idle_metrics_connections_do_not_delay_a_scrape(backend: &str) {
    let d = Daemon::start(backend, &["--metrics", "127.0.0.1:0"], None);
    let s = d.stats();
    let addr = s["daemon"]["metrics_address"].as_str().unwrap().to_string();
    // Connections that never send a byte: each may hold its own slot for
    // the 5 s request bound, but not the scrapes behind it (served one at
    // a time, four of them delayed a scrape by 20 s, past Prometheus' 10 s).
    // Past 16 open at once, a connection is refused at once with a 503
    // (the 16 are well within their 5 s then), not queued behind them. On a
    // loaded machine the 16 may reach their 5 s before the 17th is answered,
    // and are rightly closed: only then is the round tried again.
    let mut rounds = 0;
    let (idle, more) = loop {
        rounds += 1;
        let opened = Instant::now();
        let idle: Vec<_> = (0..4)
            .map(|_| std::net::TcpStream::connect(&addr).unwrap())
            .collect();
        let (answer, took) = http_get(&addr, "/metrics");
        assert!(answer.starts_with("HTTP/1.0 200 OK"), "{answer}");
        assert!(answer.contains("pidring_checks_submitted_total"));
        assert!(
            took < Duration::from_secs(3),
            "a scrape behind 4 idle connections took {took:?}"
        );
        let more: Vec<_> = (4..16)
            .map(|_| std::net::TcpStream::connect(&addr).unwrap())
            .collect();
        // (Read without asking: the answer does not wait for a request.)
        let start = Instant::now();
        let mut refused = std::net::TcpStream::connect(&addr).unwrap();
        refused.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut answer = String::new();
        refused.read_to_string(&mut answer).unwrap();
        if opened.elapsed() >= Duration::from_secs(4) && rounds < 3 {
            eprintln!(
                "the idle connections neared their 5 s bound ({:?}): again",
                opened.elapsed()
            );
            continue;
        }
        assert!(
            answer.starts_with("HTTP/1.0 503 Service Unavailable"),
            "{answer}"
        );
        let took = start.elapsed();
        assert!(took < Duration::from_secs(3), "the refusal took {took:?}");
        break (idle, more);
    };
    // Once they hang up, their slots are free again.
    drop((idle, more));
    let end = Instant::now() + PATIENCE;
    loop {
        let (answer, _) = http_get(&addr, "/metrics");
        if answer.starts_with("HTTP/1.0 200 OK") {
            break;
        }
        assert!(Instant::now() < end, "slots never freed: {answer}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn checks_of_a_daemon_run_realtime_start_ordinary() {
    // `chrt -f 10 pidring daemon`: the daemon stays realtime, but a check
    // must not (a spinning plugin at the loop's own priority would keep the
    // loop from ever running to kill it).
    if !std::process::Command::new("chrt")
        .args(["-f", "1", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("skipped: cannot run realtime here");
        return;
    }
    let mut cmd = Command::new("chrt");
    cmd.args(["-f", "10", BIN]);
    let d = Daemon::start_via(cmd, "auto", &[], None);
    let mut c = d.client();
    c.send(&json!({"op": "submit", "id": 1,
        "argv": ["/usr/bin/cut", "-d", " ", "-f", "40,41", "/proc/self/stat"]}));
    let r = c.recv();
    assert_eq!(
        r["result"]["stdout"]["data"].as_str().unwrap().trim(),
        format!("0 {}", libc::SCHED_OTHER),
        "{r}"
    );
}
