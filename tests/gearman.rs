//! `pidring gearman-worker` against a real gearmand (Debian's
//! gearman-job-server): jobs in mod_gearman's format in, results on the
//! result queue out, flow control, and the faults (a worker SIGKILLed mid-flight,
//! gearmand restarted under a running worker).

mod common;
#[path = "common/gearman.rs"]
mod gearmand;

use gearmand::{self as gm, Gearmand};
use pidring_service::gearman::{Answer, Crypt, Job};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const BIN: &str = env!("CARGO_BIN_EXE_pidring");
const RESULTS: &str = "check_results";

/// A `pidring gearman-worker` process.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn start(dir: &Path, name: &str, gearmand: &Gearmand, extra: &[&str]) -> Worker {
        Worker::start_with(dir, name, gearmand, &[], extra)
    }

    /// [`Worker::start`] with `flags` before `--server` (the mod_gearman
    /// options in `extra` take everything after them).
    fn start_with(
        dir: &Path,
        name: &str,
        gearmand: &Gearmand,
        flags: &[&str],
        extra: &[&str],
    ) -> Worker {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(BIN)
            .arg("gearman-worker")
            .args(flags)
            .arg("--server")
            .arg(gearmand.addr())
            .arg(format!("--identifier={name}"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
            .spawn()
            .expect("start pidring gearman-worker");
        Worker { child, log }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGTERM, and the exit status within `limit`.
    fn stop(mut self, limit: Duration) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < end,
                "the worker did not stop within {limit:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
            + &std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default()
    }

    /// Wait until the worker's log shows `needle`.
    fn wait_log(&self, needle: &str, limit: Duration) {
        let end = Instant::now() + limit;
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < end,
                "no {needle:?} in the worker's log within {limit:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Worker {
    /// [`Worker::ready`] with `--config FILE` (before the mod_gearman options).
    fn ready_with_config(dir: &Path, name: &str, gearmand: &Gearmand, cfg: &Path) -> Worker {
        let cfg = cfg.display().to_string();
        let w = Worker::start_with(dir, name, gearmand, &["--config", &cfg], &[]);
        w.wait_log("connected to gearmand", Duration::from_secs(20));
        w
    }

    /// Start a worker and wait until it is connected.
    fn ready(dir: &Path, name: &str, gearmand: &Gearmand, extra: &[&str]) -> Worker {
        let w = Worker::start(dir, name, gearmand, extra);
        w.wait_log("connected to gearmand", Duration::from_secs(20));
        w
    }
}

/// What every test here starts from: the test lock, a directory, gearmand's
/// binary and a running gearmand; `None` (said loudly) without gearmand.
fn setup(
    test: &str,
) -> Option<(
    std::sync::MutexGuard<'static, ()>,
    tempfile::TempDir,
    PathBuf,
    Gearmand,
)> {
    let bin = gm::gearmand_binary(test)?;
    let serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let g = Gearmand::start(&bin, &[]);
    Some((serial, dir, bin, g))
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn job(kind: &str, host: &str, service: &str, timeout: u64, command: &str) -> Job {
    Job {
        kind: kind.into(),
        result_queue: RESULTS.into(),
        host_name: host.into(),
        service_description: service.into(),
        core_time: now(),
        core_time_text: format!("{:.6}", now()),
        timeout,
        command_line: command.into(),
        ..Job::default()
    }
}

fn seal(c: &Crypt, j: &Job) -> Vec<u8> {
    c.seal(j.to_text().as_bytes())
}

/// Results from the queue, opened and parsed, keyed by host_name.
fn results(g: &Gearmand, c: &Crypt, n: usize, limit: Duration) -> HashMap<String, Vec<Answer>> {
    let mut by_host: HashMap<String, Vec<Answer>> = HashMap::new();
    for data in gm::collect(g.port, RESULTS, n, limit) {
        let text = c.open(&data).expect("a result that opens");
        let a = Answer::parse(&text)
            .unwrap_or_else(|| panic!("not a result: {:?}", String::from_utf8_lossy(&text)));
        by_host.entry(a.host_name.clone()).or_default().push(a);
    }
    by_host
}

/// `GET /metrics` from a local Prometheus endpoint.
fn scrape(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let mut http = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    http.read_to_string(&mut body).unwrap();
    body
}

/// Wait until gearmand says at least `n` jobs of `queue` run.
fn wait_running(g: &Gearmand, queue: &str, n: u64) {
    let end = Instant::now() + Duration::from_secs(30);
    while g.status().get(queue).map(|s| s.1).unwrap_or(0) < n {
        assert!(
            Instant::now() < end,
            "{n} jobs of {queue} never ran at once: {:?}",
            g.status()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `n` service checks into the `service` queue, for hosts `{prefix}0`,
/// `{prefix}1`, … (service `s`, timeout 30 s), each running `command`.
fn submit_services(g: &Gearmand, c: &Crypt, prefix: &str, n: usize, command: &str) {
    let jobs: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            seal(
                c,
                &job("service", &format!("{prefix}{i}"), "s", 30, command),
            )
        })
        .collect();
    gm::submit_many(g.port, "service", &jobs);
}

/// One service check (service `s`) for `host` into the `service` queue.
fn submit_service(g: &Gearmand, c: &Crypt, host: &str, timeout: u64, command: &str) {
    let j = job("service", host, "s", timeout, command);
    gm::submit_bg(g.port, "service", &seal(c, &j));
}

/// Processes whose command line mentions `marker`.
fn pids_with(marker: &str) -> Vec<i32> {
    common::all_pids()
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(marker))
                .unwrap_or(false)
                && !matches!(common::stat(*p), Some(('Z', ..)))
        })
        .collect()
}

fn every_outcome(encrypted: bool) {
    let test = if encrypted {
        "every_outcome_encrypted"
    } else {
        "every_outcome_plain"
    };
    let Some(bin) = gm::gearmand_binary(test) else {
        return;
    };
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let g = Gearmand::start(&bin, &[]);
    let (crypt, crypt_args): (Crypt, Vec<String>) = if encrypted {
        let keyfile = dir.path().join("secret.key");
        std::fs::write(&keyfile, "pidring-test-secret-0123456789abcdef\n").unwrap();
        (
            Crypt::with_secret(b"pidring-test-secret-0123456789ab"),
            vec![
                "--encryption=yes".into(),
                format!("--keyfile={}", keyfile.display()),
            ],
        )
    } else {
        (Crypt::plain(), vec!["--encryption=no".into()])
    };
    let mut extra: Vec<&str> = crypt_args.iter().map(String::as_str).collect();
    extra.extend(["--max-age=60", "--timeout_return=2"]);
    let metrics_port = gm::free_port();
    let metrics_opt = format!("--prometheus_server=127.0.0.1:{metrics_port}");
    extra.push(&metrics_opt);
    let w = Worker::ready(dir.path(), "w1", &g, &extra);
    let marker = dir.path().join("eventhandler-ran");
    let never = dir.path().join("undecryptable-ran");
    let dummy = "/usr/lib/nagios/plugins/check_dummy";
    let have_dummy = Path::new(dummy).exists();
    let state = |code: u8, text: &str| format!("/bin/sh -c 'echo \"{text}\"; exit {code}'");
    let mut jobs = vec![
        (
            "service",
            job("service", "ok", "svc", 10, &state(0, "all good|t=1s;2;3")),
        ),
        (
            "service",
            job(
                "service",
                "warning",
                "svc",
                10,
                &state(1, "a bit much|load=5"),
            ),
        ),
        (
            "service",
            job("service", "critical", "svc", 10, &state(2, "down")),
        ),
        (
            "service",
            job("service", "unknown", "svc", 10, &state(3, "no idea")),
        ),
        ("host", job("host", "timeout", "", 1, "/bin/sleep 30")),
        (
            "service",
            job(
                "service",
                "missing",
                "svc",
                10,
                "/nonexistent/check_nothing -w 1",
            ),
        ),
        (
            "service",
            job(
                "service",
                "multiline",
                "svc",
                10,
                "/bin/sh -c 'printf \"DISK OK - free|/=10MB;;;0\\nline two\\nline three|/home=5MB\\n\"'",
            ),
        ),
        (
            "service",
            job(
                "service",
                "exit7",
                "svc",
                10,
                "/bin/sh -c 'echo odd; exit 7'",
            ),
        ),
        (
            "service",
            Job {
                core_time: now() - 3600.0,
                core_time_text: format!("{:.6}", now() - 3600.0),
                ..job(
                    "service",
                    "too-old",
                    "svc",
                    10,
                    &format!("/bin/touch {}", never.display()),
                )
            },
        ),
    ];
    if have_dummy {
        jobs.push((
            "service",
            job(
                "service",
                "check_dummy",
                "svc",
                10,
                &format!("{dummy} 1 'from a real plugin'"),
            ),
        ));
    }
    for (queue, j) in &jobs {
        gm::submit_bg(g.port, queue, &seal(&crypt, j));
    }
    // An event handler has no result queue: it runs, and nothing is answered.
    let mut eh = job(
        "eventhandler",
        "eh",
        "",
        10,
        &format!("/bin/touch {}", marker.display()),
    );
    eh.result_queue.clear();
    gm::submit_bg(g.port, "eventhandler", &seal(&crypt, &eh));
    // Jobs that do not open: sealed with another key (or garbage), never run.
    let wrong = Crypt::with_secret(b"another key entirely");
    let bad = job(
        "service",
        "bad",
        "svc",
        10,
        &format!("/bin/touch {}", never.display()),
    );
    let bad_data = if encrypted {
        seal(&wrong, &bad)
    } else {
        b"%%% not base64 %%%".to_vec()
    };
    gm::submit_bg(g.port, "service", &bad_data);
    // One job from a client nobody here wrote: gearman-tools' `gearman`.
    let cli_job = job(
        "service",
        "from-gearman-cli",
        "svc",
        10,
        &state(0, "via gearman"),
    );
    let cli = Command::new("gearman")
        .args(["-p", &g.port.to_string(), "-f", "service", "-b"])
        .arg(String::from_utf8(seal(&crypt, &cli_job)).unwrap())
        .status();
    let cli_ran = match cli {
        Ok(st) => {
            assert!(st.success(), "gearman -b failed: {st}");
            true
        }
        Err(e) => {
            assert!(
                std::env::var_os("PIDRING_REQUIRE_GEARMAN").is_none(),
                "gearman (gearman-tools) missing: {e}"
            );
            eprintln!("SKIP part of {test}: the gearman command-line tool is missing: {e}");
            false
        }
    };
    let want = jobs.len() + usize::from(cli_ran);
    let got = results(&g, &crypt, want, Duration::from_secs(60));
    // Nothing more comes (no second answer to any job) within a moment.
    let extra_results = results(&g, &crypt, 1, Duration::from_secs(2));
    assert!(
        extra_results.is_empty(),
        "answered more than once: {extra_results:?}"
    );
    let one = |h: &str| -> &Answer {
        let v = got
            .get(h)
            .unwrap_or_else(|| panic!("no result for {h}: got {:?}\n{}", got.keys(), w.log_text()));
        assert_eq!(v.len(), 1, "{h} answered {} times", v.len());
        &v[0]
    };
    for (_, j) in &jobs {
        let a = one(&j.host_name);
        assert_eq!(a.kind, "active");
        assert_eq!(a.service_description, j.service_description, "{a:?}");
        assert_eq!(a.core_start_time, j.core_time_text, "{a:?}");
        assert_eq!(a.source, "Mod-Gearman Worker @ w1");
        assert!(a.start_time > 1e9 && a.finish_time >= a.start_time, "{a:?}");
    }
    assert_eq!(
        (one("ok").return_code, one("ok").output.as_str()),
        (0, "all good|t=1s;2;3")
    );
    assert_eq!(one("warning").return_code, 1);
    assert_eq!(one("warning").output, "a bit much|load=5");
    assert_eq!(one("critical").return_code, 2);
    assert_eq!(one("unknown").return_code, 3);
    let t = one("timeout");
    assert_eq!(
        (t.return_code, t.output.as_str()),
        (2, "(Host Check Timed Out On Worker: w1)")
    );
    assert!(
        (1.0..5.0).contains(&(t.finish_time - t.start_time)),
        "{t:?}"
    );
    let m = one("missing");
    assert_eq!(m.return_code, 3);
    assert!(
        m.output
            .contains("Make sure the plugin you're trying to run actually exists"),
        "{m:?}"
    );
    assert_eq!(
        one("multiline").output,
        "DISK OK - free|/=10MB;;;0\nline two\nline three|/home=5MB"
    );
    assert_eq!(one("multiline").return_code, 0);
    assert_eq!(one("exit7").return_code, 3);
    assert!(
        one("exit7")
            .output
            .starts_with("CRITICAL: Return code of 7 is out of bounds.")
    );
    let old = one("too-old");
    assert_eq!(
        (old.return_code, old.output.as_str()),
        (3, "Could not start check in time (worker: w1)")
    );
    if have_dummy {
        assert_eq!(one("check_dummy").output, "WARNING: from a real plugin");
        assert_eq!(one("check_dummy").return_code, 1);
    }
    if cli_ran {
        assert_eq!(one("from-gearman-cli").output, "via gearman");
    }
    assert!(
        !got.contains_key("bad"),
        "an undecryptable job was answered"
    );
    assert!(!got.contains_key("eh"), "an event handler was answered");
    let end = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(
            Instant::now() < end,
            "the event handler did not run:\n{}",
            w.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!never.exists(), "an undecryptable or too-old job ran");
    let log = w.log_text();
    assert!(log.contains("job discarded, not run"), "{log}");
    let body = scrape(metrics_port);
    assert!(
        body.contains("pidring_gearman_jobs_total{queue=\"service\",outcome=\"undecryptable\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("pidring_gearman_jobs_total{queue=\"service\",outcome=\"too_old\"} 1"),
        "{body}"
    );
    assert!(body.contains("pidring_checks_completed_total "), "{body}");
    let st = w.stop(Duration::from_secs(30));
    assert!(st.success(), "{st}");
    assert!(
        log.contains("connected to gearmand"),
        "the worker never said it connected"
    );
    g.stop();
}

#[test]
fn every_outcome_is_answered_once_with_every_field_encrypted() {
    every_outcome(true);
}

#[test]
fn every_outcome_is_answered_once_with_every_field_plain() {
    every_outcome(false);
}

/// Two workers share 500 `sleep 2` jobs; one is SIGKILLed while it runs
/// some: gearmand hands its jobs to the other, and every job is answered.
#[test]
fn a_worker_killed_mid_flight_loses_no_job() {
    let Some((_serial, dir, _, g)) = setup("a_worker_killed_mid_flight_loses_no_job") else {
        return;
    };
    let marker = format!("pidring-gm-kill-{}", std::process::id());
    let opts = ["--encryption=no", "--services=yes", "--max-worker=200"];
    let a = Worker::start(dir.path(), "a", &g, &opts);
    let b = Worker::start(dir.path(), "b", &g, &opts);
    a.wait_log("connected to gearmand", Duration::from_secs(20));
    b.wait_log("connected to gearmand", Duration::from_secs(20));
    let crypt = Crypt::plain();
    submit_services(
        &g,
        &crypt,
        "h",
        500,
        &format!("/bin/sh -c 'sleep 2' {marker}"),
    );
    // Kill `a` once both run jobs.
    wait_running(&g, "service", 300);
    a.signal(libc::SIGKILL);
    let got = results(&g, &crypt, 500, Duration::from_secs(90));
    let missing: Vec<String> = (0..500)
        .map(|i| format!("h{i}"))
        .filter(|h| !got.contains_key(h))
        .collect();
    assert!(
        missing.is_empty(),
        "{} jobs lost: {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        b.log_text()
    );
    let twice: Vec<&String> = got
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(h, _)| h)
        .collect();
    eprintln!(
        "a_worker_killed_mid_flight: 500 jobs, 500 answered, {} answered twice",
        twice.len()
    );
    assert!(twice.is_empty(), "answered twice: {twice:?}");
    assert!(
        got.values().flatten().all(|a| a.return_code == 0),
        "a job failed"
    );
    // The killed worker's checks died with it (PR_SET_PDEATHSIG), none runs on.
    let end = Instant::now() + Duration::from_secs(20);
    while !pids_with(&marker).is_empty() {
        assert!(
            Instant::now() < end,
            "checks of the killed worker run on: {:?}",
            pids_with(&marker)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(b.stop(Duration::from_secs(30)).success());
    g.stop();
}

/// gearmand restarts under a running worker: it reconnects and runs the next jobs.
#[test]
fn a_worker_reconnects_when_gearmand_restarts() {
    let Some((_serial, dir, bin, g)) = setup("a_worker_reconnects_when_gearmand_restarts") else {
        return;
    };
    let port = g.port;
    let w = Worker::ready(dir.path(), "w", &g, &["--encryption=no", "--hosts=yes"]);
    let crypt = Crypt::plain();
    gm::submit_bg(
        port,
        "host",
        &seal(&crypt, &job("host", "before", "", 10, "/bin/true")),
    );
    assert!(results(&g, &crypt, 1, Duration::from_secs(30)).contains_key("before"));
    g.stop();
    w.wait_log("connection to gearmand lost", Duration::from_secs(20));
    let g = Gearmand::start_on(&bin, port, &[]);
    let end = Instant::now() + Duration::from_secs(30);
    while g.status().get("host").map(|s| s.2).unwrap_or(0) == 0 {
        assert!(
            Instant::now() < end,
            "the worker did not register again:\n{}",
            w.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    gm::submit_bg(
        port,
        "host",
        &seal(&crypt, &job("host", "after", "", 10, "/bin/true")),
    );
    let got = results(&g, &crypt, 1, Duration::from_secs(30));
    assert_eq!(
        got.get("after").map(Vec::len),
        Some(1),
        "{got:?}\n{}",
        w.log_text()
    );
    assert!(w.stop(Duration::from_secs(30)).success());
}

/// `max-worker=3`: never more than 3 jobs taken at once, on one connection,
/// by a process whose thread count does not grow with its jobs.
#[test]
fn jobs_in_flight_are_bounded_by_max_worker_without_a_thread_per_job() {
    let Some((_serial, dir, _, g)) = setup("jobs_in_flight_are_bounded") else {
        return;
    };
    let w = Worker::ready(
        dir.path(),
        "w",
        &g,
        &["--encryption=no", "--services=yes", "--max-worker=3"],
    );
    let crypt = Crypt::plain();
    submit_services(&g, &crypt, "h", 12, "/bin/sleep 0.5");
    let collector = {
        let port = g.port;
        std::thread::spawn(move || gm::collect(port, RESULTS, 12, Duration::from_secs(60)))
    };
    let mut most = 0;
    while !collector.is_finished() {
        let running = g.status().get("service").map(|s| s.1).unwrap_or(0);
        most = most.max(running);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(collector.join().unwrap().len(), 12);
    assert!(
        (2..=3).contains(&most),
        "jobs running at once: {most} (max-worker=3)"
    );
    // 200 jobs at once, a handful of threads.
    let w2 = Worker::ready(dir.path(), "w2", &g, &["--encryption=no", "--services=yes"]);
    assert!(w.stop(Duration::from_secs(30)).success());
    submit_services(&g, &crypt, "t", 200, "/bin/sleep 3");
    wait_running(&g, "service", 200);
    let threads = std::fs::read_dir(format!("/proc/{}/task", w2.pid()))
        .unwrap()
        .count();
    assert!(threads < 16, "{threads} threads for 200 jobs in flight");
    assert_eq!(results(&g, &crypt, 200, Duration::from_secs(60)).len(), 200);
    assert!(w2.stop(Duration::from_secs(30)).success());
}

/// SIGTERM: no new jobs are taken, a job that ends within the drain is
/// answered with its result, one that does not is killed and answered so,
/// and the worker exits 0.
#[test]
fn sigterm_finishes_the_jobs_in_flight_and_answers_them() {
    let Some((_serial, dir, _, g)) = setup("sigterm_finishes_the_jobs_in_flight") else {
        return;
    };
    let w = Worker::ready(dir.path(), "w", &g, &["--encryption=no", "--services=yes"]);
    let crypt = Crypt::plain();
    submit_service(
        &g,
        &crypt,
        "slow",
        30,
        "/bin/sh -c 'sleep 1; echo finished'",
    );
    submit_service(&g, &crypt, "stuck", 300, "/bin/sleep 100");
    wait_running(&g, "service", 2);
    let stopped_at = Instant::now();
    w.signal(libc::SIGTERM);
    w.wait_log("letting 2 in flight finish", Duration::from_secs(20));
    // Queued after the SIGTERM: left for another worker.
    submit_service(&g, &crypt, "later", 30, "/bin/true");
    // The short one finishes; the long one is killed after the 10 s drain and answered so.
    let got = results(&g, &crypt, 2, Duration::from_secs(40));
    assert_eq!(
        got.get("slow").map(|v| v[0].output.as_str()),
        Some("finished"),
        "{got:?}"
    );
    let stuck = &got.get("stuck").expect("the long job was not answered")[0];
    assert_eq!(stuck.return_code, 3);
    assert!(stuck.output.contains("shutting down"), "{stuck:?}");
    assert!(w.stop(Duration::from_secs(30)).success());
    assert!(
        stopped_at.elapsed() < Duration::from_secs(25),
        "the stop took {:?}",
        stopped_at.elapsed()
    );
    assert_eq!(
        g.status().get("service").map(|s| s.0),
        Some(1),
        "the later job was not left queued"
    );
}

/// `pidring daemon --socket SOCK --config CFG`, its log read as a worker's,
/// once it is connected to gearmand.
fn start_daemon(dir: &Path, sock: &Path, cfg: &Path) -> Worker {
    let log = dir.join("daemon.log");
    let child = Command::new(BIN)
        .arg("daemon")
        .arg("--socket")
        .arg(sock)
        .arg("--config")
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let d = Worker { child, log };
    d.wait_log("connected to gearmand", Duration::from_secs(20));
    d
}

/// The daemon's `[gearman]` section serves the queues through the daemon's
/// executor; `stats` and `/metrics` count the jobs per queue.
#[test]
fn the_daemon_serves_gearman_queues_and_counts_them() {
    let Some((_serial, dir, _, g)) = setup("the_daemon_serves_gearman_queues") else {
        return;
    };
    let sock = dir.path().join("d.sock");
    let metrics_port = gm::free_port();
    let cfg = dir.path().join("pidring.toml");
    std::fs::write(
        &cfg,
        format!(
            "metrics = \"127.0.0.1:{metrics_port}\"\n[gearman]\nserver = [\"{}\"]\nencryption = false\nservices = true\nidentifier = \"daemon1\"\n",
            g.addr()
        ),
    )
    .unwrap();
    let d = start_daemon(dir.path(), &sock, &cfg);
    let crypt = Crypt::plain();
    submit_service(&g, &crypt, "via-daemon", 10, "/bin/echo OK from the daemon");
    gm::submit_bg(g.port, "service", b"not base64 at all %%%");
    let got = results(&g, &crypt, 1, Duration::from_secs(30));
    let a = &got.get("via-daemon").expect("a result")[0];
    assert_eq!(
        (a.return_code, a.output.as_str(), a.source.as_str()),
        (0, "OK from the daemon", "Mod-Gearman Worker @ daemon1")
    );
    // The undecryptable one is counted once it was taken.
    let stats = || -> serde_json::Value {
        let out = Command::new(BIN)
            .args(["stats", "--json", "--socket"])
            .arg(&sock)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let end = Instant::now() + Duration::from_secs(20);
    let mut v = stats();
    while v["gearman"]["queues"]["service"]["undecryptable"] != 1 {
        assert!(Instant::now() < end, "stats never counted the bad job: {v}");
        std::thread::sleep(Duration::from_millis(50));
        v = stats();
    }
    let s = v.to_string();
    assert_eq!(v["gearman"]["queues"]["service"]["done"], 1, "{s}");
    assert_eq!(v["gearman"]["queues"]["service"]["grabbed"], 2, "{s}");
    assert_eq!(v["gearman"]["servers"][g.addr()]["connected"], true, "{s}");
    let body = scrape(metrics_port);
    assert!(
        body.contains("pidring_gearman_jobs_total{queue=\"service\",outcome=\"done\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("pidring_gearman_jobs_total{queue=\"service\",outcome=\"undecryptable\"} 1"),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            "pidring_gearman_server_connected{{server=\"{}\"}} 1",
            g.addr()
        )),
        "{body}"
    );
    assert!(d.stop(Duration::from_secs(30)).success());
}

/// A load limit below the machine's load keeps the worker from taking jobs.
#[test]
fn a_load_limit_pauses_grabbing() {
    let Some((_serial, dir, _, g)) = setup("a_load_limit_pauses_grabbing") else {
        return;
    };
    let load1: f64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    if load1 <= 0.001 {
        eprintln!(
            "SKIP a_load_limit_pauses_grabbing: the 1-minute load is {load1}, no limit can be below it"
        );
        return;
    }
    let w = Worker::ready(
        dir.path(),
        "w",
        &g,
        &["--encryption=no", "--services=yes", "--load_limit1=0.001"],
    );
    w.wait_log("load limit exceeded", Duration::from_secs(20));
    let crypt = Crypt::plain();
    submit_service(&g, &crypt, "held", 10, "/bin/true");
    // Given 3 s (three load checks), the job stays queued, untaken.
    let got = results(&g, &crypt, 1, Duration::from_secs(3));
    assert!(
        got.is_empty(),
        "a job was taken over the load limit: {got:?}"
    );
    assert_eq!(g.status().get("service").map(|s| (s.0, s.1)), Some((1, 0)));
    assert!(w.stop(Duration::from_secs(30)).success());
}

/// `dupserver`: every result also goes to a second gearmand, as `type=passive`.
#[test]
fn results_are_copied_to_the_dupserver_as_passive() {
    let Some((_serial, dir, bin, g)) = setup("results_are_copied_to_the_dupserver") else {
        return;
    };
    let dup = Gearmand::start(&bin, &[]);
    let dup_opt = format!("--dupserver={}", dup.addr());
    let w = Worker::ready(
        dir.path(),
        "w",
        &g,
        &["--encryption=no", "--services=yes", &dup_opt],
    );
    let crypt = Crypt::plain();
    for i in 0..5 {
        submit_service(&g, &crypt, &format!("d{i}"), 10, "/bin/echo copied");
    }
    let main = results(&g, &crypt, 5, Duration::from_secs(30));
    let copies = results(&dup, &crypt, 5, Duration::from_secs(30));
    assert_eq!(main.len(), 5, "{main:?}");
    assert_eq!(copies.len(), 5, "{copies:?}\n{}", w.log_text());
    for (h, v) in &copies {
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].kind, "passive", "{h}");
        assert_eq!(v[0].output, "copied");
        assert_eq!(main[h][0].kind, "active");
    }
    // A dupserver that goes away never holds up the real results.
    dup.stop();
    submit_service(&g, &crypt, "after-dup-died", 10, "/bin/true");
    assert!(results(&g, &crypt, 1, Duration::from_secs(30)).contains_key("after-dup-died"));
    assert!(w.stop(Duration::from_secs(30)).success());
}

/// A "server" that answers garbage (an HTTP server on the wrong port, a
/// length of 4 GiB) gets a reconnect, not a crash or an allocation of its size.
#[test]
fn a_server_speaking_garbage_is_dropped_and_retried() {
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let log = dir.path().join("w.log");
    let child = Command::new(BIN)
        .args(["gearman-worker", "--server", &addr, "--encryption=no"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let w = Worker { child, log };
    use std::io::Write as _;
    for garbage in [
        b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
        b"\0RES\0\0\0\x0b\xff\xff\xff\xf0".to_vec(),
        b"\0RES\0\0\0\x0a\0\0\0\0".to_vec(), // NO_JOB nobody asked for... or did
    ] {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(&garbage);
        std::thread::sleep(Duration::from_millis(100));
    }
    w.wait_log("bad packet magic", Duration::from_secs(20));
    w.wait_log("larger than", Duration::from_secs(20));
    // Still alive and still trying.
    let (_s, _) = listener.accept().unwrap();
    assert!(w.stop(Duration::from_secs(30)).success());
}

/// The Nagios bridge's own guarantees: a job whose result never comes is
/// answered as timed out; a result for no waiting job is dropped and
/// counted; with gearmand unreachable a job is answered at once as failed.
#[test]
fn the_nagios_bridge_answers_every_job_once_even_without_a_result() {
    use pidring_service::nagios::distribute::Distribute;
    use std::sync::atomic::Ordering;
    let Some((_serial, _dir, _, g)) = setup("the_nagios_bridge_answers_every_job") else {
        return;
    };
    let d =
        Distribute::start_with_margin(&g.addr(), Crypt::plain(), Duration::from_secs(1)).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    let submit = |d: &Distribute, host: &str| {
        let tx = tx.clone();
        let j = Job {
            kind: "service".into(),
            host_name: host.into(),
            service_description: "s".into(),
            timeout: 1,
            command_line: "/bin/true".into(),
            ..Job::default()
        };
        d.submit(
            j,
            Duration::from_secs(1),
            Box::new(move |r| tx.send(r).unwrap()),
        )
    };
    // No gearman-worker runs: nothing answers the job, the deadline does.
    bridge_connected(&g);
    let started = Instant::now();
    let id = submit(&d, "nobody-runs-this");
    let r = rx.recv_timeout(Duration::from_secs(20)).expect("answered");
    assert_eq!(r.id, id);
    assert!(
        matches!(&r.outcome, pidring::Outcome::SpawnFailed { errno: Some(e), message } if *e == libc::ETIME && message.contains("no result from gearmand")),
        "{r:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "answered before timeout + margin"
    );
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "answered twice"
    );
    // A result nobody waits for.
    let a = Answer {
        kind: "active",
        host_name: "stranger".into(),
        output: "x".into(),
        ..Answer::default()
    };
    gm::submit_bg(
        g.port,
        &pidring_service::nagios::distribute::result_queue(),
        &Crypt::plain().seal(a.to_text().as_bytes()),
    );
    let end = Instant::now() + Duration::from_secs(20);
    while d.stats.late_dropped.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < end, "the stray result was not taken");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.stats.timed_out.load(Ordering::Relaxed), 1);
    drop(d);
    // gearmand unreachable: answered at once, as failed.
    let port = g.port;
    g.stop();
    let d = Distribute::start(&format!("127.0.0.1:{port}"), Crypt::plain()).unwrap();
    submit(&d, "unreachable");
    let r = rx.recv_timeout(Duration::from_secs(10)).expect("answered");
    assert!(
        matches!(&r.outcome, pidring::Outcome::SpawnFailed { errno: Some(e), .. } if *e == libc::ENOTCONN),
        "{r:?}"
    );
}

/// Wait until the bridge is a worker of its own result queue (it is
/// connected: jobs submitted now reach gearmand).
fn bridge_connected(g: &Gearmand) {
    let end = Instant::now() + Duration::from_secs(30);
    while !g
        .status()
        .iter()
        .any(|(q, s)| q.starts_with("check_results_pidring_") && s.2 > 0)
    {
        assert!(
            Instant::now() < end,
            "the bridge never connected: {:?}",
            g.status()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The bridge picks queues as mod_gearman's NEB module does, with group
/// members from the core's object cache: a configured servicegroup first,
/// then a configured hostgroup, else `service` / `host`; and a
/// `gearman-worker --hostgroups=` takes its group's job and answers it.
#[test]
fn the_nagios_bridge_routes_checks_to_hostgroup_and_servicegroup_queues() {
    use pidring_service::nagios::distribute::Distribute;
    use pidring_service::nagios::routing::Routing;
    let Some((_serial, dir, _, g)) = setup("the_nagios_bridge_routes_checks") else {
        return;
    };
    let cache = dir.path().join("objects.cache");
    std::fs::write(
        &cache,
        "define hostgroup {\n\thostgroup_name\tweb\n\tmembers\th1,h2\n\t}\n\
         define servicegroup {\n\tservicegroup_name\tdisk\n\tmembers\th1,root fs\n\t}\n",
    )
    .unwrap();
    let d = Distribute::start(&g.addr(), Crypt::plain())
        .unwrap()
        .route_by(Routing::new(vec!["web".into()], vec!["disk".into()], cache));
    bridge_connected(&g);
    let (tx, rx) = crossbeam_channel::unbounded();
    let submit = |host: &str, service: &str| {
        let tx = tx.clone();
        let j = Job {
            kind: if service.is_empty() {
                "host"
            } else {
                "service"
            }
            .into(),
            host_name: host.into(),
            service_description: service.into(),
            timeout: 30,
            command_line: format!("/bin/echo OK - {}", format!("{host} {service}").trim()),
            ..Job::default()
        };
        d.submit(
            j,
            Duration::from_secs(30),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
    };
    submit("h1", "root fs");
    submit("h1", "load");
    submit("h2", "");
    submit("h9", "load");
    submit("h9", "");
    let want = [
        ("servicegroup_disk", 1),
        ("hostgroup_web", 2),
        ("service", 1),
        ("host", 1),
    ];
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let st = g.status();
        if want
            .iter()
            .all(|(q, n)| st.get(*q).map(|s| s.0) == Some(*n))
        {
            break;
        }
        assert!(Instant::now() < end, "queues {st:?}, wanted {want:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A worker of hostgroup_web only runs those two and nothing else.
    let _w = Worker::ready(
        dir.path(),
        "hg",
        &g,
        &["--encryption=no", "--hostgroups=web"],
    );
    let mut texts: Vec<String> = (0..2)
        .map(|_| {
            let r = rx.recv_timeout(Duration::from_secs(30)).expect("a result");
            assert_eq!(r.state, pidring::State::Ok, "{r:?}");
            r.plugin.text
        })
        .collect();
    texts.sort();
    assert_eq!(texts, ["OK - h1 load", "OK - h2"]);
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "only its group's jobs ran"
    );
}

/// Write a worker.cfg for the reload tests.
fn write_cfg(path: &Path, text: &str) {
    // Written aside and renamed: a reload never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// How many times the worker's log shows `needle`.
fn log_count(w: &Worker, needle: &str) -> usize {
    w.log_text().matches(needle).count()
}

/// SIGHUP and wait for the reload's own log line (success or failure).
fn sighup(w: &Worker, expect: &str) {
    let before = log_count(w, expect);
    w.signal(libc::SIGHUP);
    let end = Instant::now() + Duration::from_secs(20);
    while log_count(w, expect) <= before {
        assert!(
            Instant::now() < end,
            "no new {expect:?} in the worker's log within 20 s:\n{}",
            w.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait for `host`'s one result on `g` and check its output.
fn expect_output(g: &Gearmand, c: &Crypt, w: &Worker, host: &str, output: &str) {
    let got = results(g, c, 1, Duration::from_secs(30));
    assert_eq!(
        got.get(host).map(|v| v[0].output.as_str()),
        Some(output),
        "{got:?}\n{}",
        w.log_text()
    );
}

const RELOADED: &str = "SIGHUP: configuration reloaded from";
const RELOAD_FAILED: &str = "SIGHUP: reload failed, the running configuration is kept";

/// SIGHUP re-reads `--config`: a queue added there is served at once (a
/// job already waiting in it too), and a job in flight across the reload
/// is answered exactly once.
#[test]
fn sighup_reloads_the_config_and_serves_the_new_queue() {
    let Some((_serial, dir, _, g)) = setup("sighup_reloads_the_config") else {
        return;
    };
    let cfg = dir.path().join("worker.cfg");
    write_cfg(&cfg, "services=yes\nencryption=no\n");
    let w = Worker::ready_with_config(dir.path(), "w", &g, &cfg);
    let crypt = Crypt::plain();
    let web = job("host", "web1", "", 30, "/bin/echo web is up");
    gm::submit_bg(g.port, "hostgroup_web", &seal(&crypt, &web));
    submit_service(
        &g,
        &crypt,
        "inflight",
        30,
        "/bin/sh -c 'sleep 1; echo survived'",
    );
    wait_running(&g, "service", 1);
    assert_eq!(
        g.status().get("hostgroup_web").copied(),
        Some((1, 0, 0)),
        "hostgroup_web is served before the reload"
    );
    write_cfg(&cfg, "services=yes\nhostgroups=web\nencryption=no\n");
    sighup(&w, RELOADED);
    assert!(
        w.log_text().contains("hostgroup_web"),
        "the reload line names the new queue:\n{}",
        w.log_text()
    );
    let got = results(&g, &crypt, 2, Duration::from_secs(30));
    assert_eq!(
        got.get("web1").map(|v| v[0].output.as_str()),
        Some("web is up"),
        "{got:?}\n{}",
        w.log_text()
    );
    assert_eq!(
        got.get("inflight").map(|v| v.len()),
        Some(1),
        "{got:?}\n{}",
        w.log_text()
    );
    assert_eq!(got["inflight"][0].output, "survived");
    // Nothing answered twice: no further result comes.
    let more = gm::collect(g.port, RESULTS, 1, Duration::from_secs(2));
    assert!(more.is_empty(), "a job was answered twice");
    // The queue removed again: the worker says CANT_DO.
    write_cfg(&cfg, "services=yes\nencryption=no\n");
    sighup(&w, RELOADED);
    let end = Instant::now() + Duration::from_secs(20);
    while g.status().get("hostgroup_web").map(|s| s.2) != Some(0) {
        assert!(
            Instant::now() < end,
            "hostgroup_web still has a worker: {:?}",
            g.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(w.stop(Duration::from_secs(30)).success());
}

/// A broken file at SIGHUP is logged, and the worker goes on with its
/// running configuration (the file given as the mod_gearman option
/// `--config=FILE` here, which reloads too).
#[test]
fn sighup_with_a_broken_config_keeps_serving() {
    let Some((_serial, dir, _, g)) = setup("sighup_with_a_broken_config") else {
        return;
    };
    let cfg = dir.path().join("worker.cfg");
    write_cfg(&cfg, "services=yes\nencryption=no\n");
    let cfg_opt = format!("--config={}", cfg.display());
    let w = Worker::ready(dir.path(), "w", &g, &[&cfg_opt]);
    let crypt = Crypt::plain();
    write_cfg(&cfg, "services=maybe\nencryption=no\n");
    sighup(&w, RELOAD_FAILED);
    assert!(
        w.log_text().contains("services=maybe: expected yes or no"),
        "the error names the problem:\n{}",
        w.log_text()
    );
    // Valid but unusable: encryption without a key.
    write_cfg(&cfg, "services=yes\n");
    sighup(&w, RELOAD_FAILED);
    submit_service(&g, &crypt, "still", 10, "/bin/echo still here");
    expect_output(&g, &crypt, &w, "still", "still here");
    assert!(w.stop(Duration::from_secs(30)).success());
}

/// A server added by a reload is connected; removed again, it answers the
/// job it holds before its connection closes.
#[test]
fn sighup_connects_an_added_server_and_drains_a_removed_one() {
    let Some((_serial, dir, bin, g)) = setup("sighup_connects_an_added_server") else {
        return;
    };
    let g2 = Gearmand::start(&bin, &[]);
    let cfg = dir.path().join("worker.cfg");
    write_cfg(&cfg, "services=yes\nencryption=no\n");
    let w = Worker::ready_with_config(dir.path(), "w", &g, &cfg);
    let crypt = Crypt::plain();
    write_cfg(
        &cfg,
        &format!("services=yes\nencryption=no\nserver={}\n", g2.addr()),
    );
    sighup(&w, RELOADED);
    submit_service(&g2, &crypt, "second", 10, "/bin/echo from g2");
    expect_output(&g2, &crypt, &w, "second", "from g2");
    // A job in flight on g2 when g2 is removed: answered, then closed.
    submit_service(
        &g2,
        &crypt,
        "last",
        30,
        "/bin/sh -c 'sleep 2; echo drained'",
    );
    wait_running(&g2, "service", 1);
    write_cfg(&cfg, "services=yes\nencryption=no\n");
    sighup(&w, RELOADED);
    w.wait_log(
        "connection to a removed server closed",
        Duration::from_secs(30),
    );
    expect_output(&g2, &crypt, &w, "last", "drained");
    let end = Instant::now() + Duration::from_secs(20);
    while g2.status().get("service").map(|s| s.2) != Some(0) {
        assert!(
            Instant::now() < end,
            "the removed server still has the worker: {:?}",
            g2.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first server is untouched.
    submit_service(&g, &crypt, "first", 10, "/bin/echo from g");
    expect_output(&g, &crypt, &w, "first", "from g");
    assert!(w.stop(Duration::from_secs(30)).success());
}

/// The daemon's `[gearman]` section is reloaded live as well: a queue
/// added there at SIGHUP is served.
#[test]
fn the_daemon_reloads_its_gearman_section_on_sighup() {
    let Some((_serial, dir, _, g)) = setup("the_daemon_reloads_its_gearman_section") else {
        return;
    };
    let sock = dir.path().join("d.sock");
    let cfg = dir.path().join("pidring.toml");
    let section = |extra: &str| {
        format!(
            "[gearman]\nserver = [\"{}\"]\nencryption = false\nservices = true\n{extra}",
            g.addr()
        )
    };
    write_cfg(&cfg, &section(""));
    let d = start_daemon(dir.path(), &sock, &cfg);
    let crypt = Crypt::plain();
    let web = job("host", "web1", "", 30, "/bin/echo web via the daemon");
    gm::submit_bg(g.port, "hostgroup_web", &seal(&crypt, &web));
    write_cfg(&cfg, &section("hostgroups = [\"web\"]\n"));
    sighup(&d, RELOADED);
    assert!(
        d.log_text().contains("[gearman] changed queues"),
        "{}",
        d.log_text()
    );
    expect_output(&g, &crypt, &d, "web1", "web via the daemon");
    assert!(d.stop(Duration::from_secs(30)).success());
}
