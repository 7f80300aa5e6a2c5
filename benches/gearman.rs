//! `cargo bench --bench gearman`: end-to-end checks/s of `/bin/true` through a
//! real gearmand, in one run, side by side with:
//! - `raw`: the machine's spawn limit (`posix_spawn` + `waitpid` loops, one
//!   thread per core, no gearmand);
//! - `pidring`: one `pidring gearman-worker` process;
//! - `fork-exec`: a minimal reference worker written here (this binary
//!   re-executed as `__reference`): 20 connections on 20 threads, as
//!   mod-gearman-worker-go runs 20 workers by default, each running its job
//!   with a plain `fork` + `execv` + `waitpid` and answering like mod_gearman.
//!
//! Each gearman contender gets a fresh gearmand whose `service` queue already
//! holds N jobs (encryption=no); the clock runs from the worker's start to
//! the N-th result taken from `check_results` by a collector here. CPU is
//! the worker process's own (`wait4` rusage) and gearmand's (`/proc`), per check.
//!
//! Options: `--jobs N` (default 20000), `--rounds R` (default 3; contenders
//! in rotated order, then the median and range), `--quick` (500 jobs, one
//! round; checks correctness only and exits 1 if a job was not answered OK).

use pidring_service::gearman::packet::{self, Decoder, Kind};
use pidring_service::gearman::{Answer, Crypt, Job};
use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PIDRING: &str = env!("CARGO_BIN_EXE_pidring");
const REFERENCE_THREADS: usize = 20;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("__reference") {
        reference_worker(&args[1]);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let jobs = value("--jobs").unwrap_or(if quick { 500 } else { 20_000 });
    let rounds = value("--rounds").unwrap_or(if quick { 1 } else { 3 });
    let Some(gearmand) = ["/usr/sbin/gearmand", "/usr/bin/gearmand"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        eprintln!(
            "SKIP gearman bench: gearmand is not installed (apt-get install gearman-job-server)"
        );
        if std::env::var_os("PIDRING_REQUIRE_GEARMAN").is_some_and(|v| v == "1") {
            std::process::exit(1);
        }
        return;
    };
    let contenders = ["raw", "pidring", "fork-exec"];
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); contenders.len()];
    let mut ok = true;
    for round in 0..rounds {
        for k in 0..contenders.len() {
            let i = (k + round) % contenders.len();
            let r = match contenders[i] {
                "raw" => raw(jobs),
                name => through_gearmand(gearmand, name, jobs),
            };
            eprintln!(
                "round {} {:<10} {:>8.0} checks/s  worker {:>6.1} µs/check  gearmand {:>6.1} µs/check  ok {}/{}",
                round + 1,
                contenders[i],
                r.rate(),
                r.worker_cpu_us,
                r.gearmand_cpu_us,
                r.ok,
                jobs
            );
            ok &= r.ok == jobs;
            runs[i].push(r);
        }
    }
    println!(
        "\n{jobs} × /bin/true through gearmand 1.1.20 (plain jobs), {rounds} round(s), {} cores\n",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "| contender | checks/s (median, range) | × raw | worker CPU µs/check | gearmand CPU µs/check |"
    );
    println!("|---|---|---|---|---|");
    let raw_rates: Vec<f64> = runs[0].iter().map(Run::rate).collect();
    for (i, name) in contenders.iter().enumerate() {
        let rates: Vec<f64> = runs[i].iter().map(Run::rate).collect();
        // Ratios within each round: the machine's drift between rounds cancels.
        let ratios: Vec<f64> = rates.iter().zip(&raw_rates).map(|(r, b)| r / b).collect();
        let cpu: Vec<f64> = runs[i].iter().map(|r| r.worker_cpu_us).collect();
        let gcpu: Vec<f64> = runs[i].iter().map(|r| r.gearmand_cpu_us).collect();
        println!(
            "| {name} | {:.0} ({:.0}–{:.0}) | {:.2} | {} | {} |",
            median(&rates),
            min(&rates),
            max(&rates),
            median(&ratios),
            if i == 0 {
                "—".to_string()
            } else {
                format!("{:.1}", median(&cpu))
            },
            if i == 0 {
                "—".to_string()
            } else {
                format!("{:.1}", median(&gcpu))
            },
        );
    }
    if !ok {
        eprintln!("FAILED: a contender did not answer every job OK");
        std::process::exit(1);
    }
}

#[derive(Clone, Default)]
struct Run {
    n: usize,
    ok: usize,
    secs: f64,
    worker_cpu_us: f64,
    gearmand_cpu_us: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.n as f64 / self.secs
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// The spawn limit: `posix_spawn` + `waitpid` of /bin/true, one loop per core.
fn raw(n: usize) -> Run {
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    let start = Instant::now();
    let per = n.div_ceil(cpus);
    let ok: usize = (0..cpus)
        .map(|i| {
            let count = per.min(n.saturating_sub(i * per));
            std::thread::spawn(move || (0..count).filter(|_| spawn_wait("/bin/true") == 0).count())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .sum();
    Run {
        n,
        ok,
        secs: start.elapsed().as_secs_f64(),
        ..Run::default()
    }
}

/// Run `path` with no arguments; its exit code (or 255).
fn spawn_wait(path: &str) -> i32 {
    unsafe extern "C" {
        static environ: *const *mut libc::c_char;
    }
    let p = CString::new(path).unwrap();
    let argv = [p.as_ptr() as *mut libc::c_char, std::ptr::null_mut()];
    let mut pid = 0;
    // SAFETY: NUL-terminated argv of a live CString; the process environment.
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            p.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            argv.as_ptr(),
            environ,
        )
    };
    if rc != 0 {
        return 255;
    }
    let mut status = 0;
    // SAFETY: blocking reap of the child just made.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        255
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// CPU seconds (user + system) of a process, from /proc.
fn proc_cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn through_gearmand(gearmand: &str, contender: &str, n: usize) -> Run {
    let port = free_port();
    let mut g = Command::new(gearmand)
        .args([
            format!("--port={port}"),
            "--listen=127.0.0.1".into(),
            "--log-file=none".into(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start gearmand");
    let end = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "gearmand did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    fill(port, n);
    let g_cpu0 = proc_cpu_secs(g.id());
    let collector = std::thread::spawn(move || collect(port, n));
    let start = Instant::now();
    let server = format!("127.0.0.1:{port}");
    let mut worker = match contender {
        "pidring" => Command::new(PIDRING)
            .args([
                "gearman-worker",
                "--server",
                &server,
                "--encryption=no",
                "--services=yes",
                "--identifier=bench",
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
        _ => Command::new(std::env::current_exe().unwrap())
            .args(["__reference", &server])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    };
    let ok = collector.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    let g_cpu = proc_cpu_secs(g.id()) - g_cpu0;
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(worker.id() as i32, libc::SIGTERM) };
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: reaps our own child and fills `ru` with its rusage.
    unsafe { libc::wait4(worker.id() as i32, &mut status, 0, &mut ru) };
    let _ = worker.try_wait();
    let cpu = ru.ru_utime.tv_sec as f64
        + ru.ru_utime.tv_usec as f64 / 1e6
        + ru.ru_stime.tv_sec as f64
        + ru.ru_stime.tv_usec as f64 / 1e6;
    let _ = g.kill();
    let _ = g.wait();
    Run {
        n,
        ok,
        secs,
        worker_cpu_us: cpu * 1e6 / n as f64,
        gearmand_cpu_us: g_cpu * 1e6 / n as f64,
    }
}

/// Queue `n` plain service jobs of /bin/true.
fn fill(port: u16, n: usize) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let crypt = Crypt::plain();
    let mut d = Decoder::new();
    let mut buf = [0u8; 65536];
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut out = Vec::new();
        for i in chunk {
            let job = Job {
                kind: "service".into(),
                result_queue: "check_results".into(),
                host_name: format!("h{i}"),
                service_description: "true".into(),
                core_time: 1.0,
                timeout: 60,
                command_line: "/bin/true".into(),
                ..Job::default()
            };
            let data = crypt.seal(job.to_text().as_bytes());
            packet::encode_into(
                packet::REQ,
                Kind::SubmitJobBg,
                &[b"service", b"", &data],
                &mut out,
            );
        }
        s.write_all(&out).unwrap();
        let mut created = 0;
        while created < chunk.len() {
            match d.next_packet().unwrap() {
                Some(p) if p.kind == Kind::JobCreated => created += 1,
                Some(p) => panic!("fill: {p:?}"),
                None => {
                    let k = s.read(&mut buf).unwrap();
                    assert!(k > 0);
                    d.feed(&buf[..k]);
                }
            }
        }
    }
}

/// Take `n` results; how many say OK.
fn collect(port: u16, n: usize) -> usize {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut out = packet::request(Kind::CanDo, &[b"check_results"]);
    for _ in 0..4 {
        out.extend(packet::request(Kind::GrabJob, &[]));
    }
    s.write_all(&out).unwrap();
    let mut d = Decoder::new();
    let mut buf = [0u8; 65536];
    let (mut got, mut ok) = (0, 0);
    let crypt = Crypt::plain();
    while got < n {
        match d.next_packet().unwrap() {
            Some(p) if p.kind == Kind::JobAssign => {
                got += 1;
                let text = crypt.open(&p.args[2]).unwrap_or_default();
                if Answer::parse(&text).is_some_and(|a| a.return_code == 0) {
                    ok += 1;
                }
                let mut o = Vec::new();
                packet::complete_and_grab(&p.args[0], &mut o);
                s.write_all(&o).unwrap();
            }
            Some(p) if p.kind == Kind::NoJob => {
                s.write_all(&packet::request(Kind::PreSleep, &[])).unwrap();
            }
            Some(p) if p.kind == Kind::Noop => {
                s.write_all(&packet::request(Kind::GrabJob, &[])).unwrap();
            }
            Some(_) => {}
            None => {
                let k = s.read(&mut buf).expect("collector: no result for 120 s");
                assert!(k > 0);
                d.feed(&buf[..k]);
            }
        }
    }
    ok
}

/// The reference: 20 blocking connections, each job a fork + execv + waitpid.
fn reference_worker(server: &str) {
    let threads: Vec<_> = (0..REFERENCE_THREADS)
        .map(|_| {
            let server = server.to_string();
            std::thread::spawn(move || reference_connection(&server))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

fn reference_connection(server: &str) {
    let Ok(mut s) = TcpStream::connect(server) else {
        return;
    };
    let crypt = Crypt::plain();
    let _ = s.write_all(&packet::request(Kind::CanDo, &[b"service"]));
    let mut d = Decoder::new();
    let mut buf = [0u8; 65536];
    let _ = s.write_all(&packet::request(Kind::GrabJob, &[]));
    loop {
        let p = loop {
            match d.next_packet() {
                Ok(Some(p)) => break p,
                Ok(None) => match s.read(&mut buf) {
                    Ok(k) if k > 0 => d.feed(&buf[..k]),
                    _ => return,
                },
                Err(_) => return,
            }
        };
        match p.kind {
            Kind::JobAssign => {
                let job = crypt
                    .open(&p.args[2])
                    .ok()
                    .and_then(|t| Job::parse(&t).ok())
                    .unwrap_or_default();
                let start = now();
                let code = fork_exec(&job.command_line);
                let answer = Answer {
                    kind: "active",
                    host_name: job.host_name.clone(),
                    service_description: job.service_description.clone(),
                    start_time: start,
                    finish_time: now(),
                    return_code: code,
                    source: "reference".into(),
                    ..Answer::default()
                };
                let mut out = Vec::new();
                let sealed = crypt.seal(answer.to_text().as_bytes());
                packet::encode_into(
                    packet::REQ,
                    Kind::SubmitJobBg,
                    &[job.result_queue.as_bytes(), b"", &sealed],
                    &mut out,
                );
                packet::complete_and_grab(&p.args[0], &mut out);
                if s.write_all(&out).is_err() {
                    return;
                }
            }
            Kind::NoJob => {
                let _ = s.write_all(&packet::request(Kind::PreSleep, &[]));
            }
            Kind::Noop => {
                let _ = s.write_all(&packet::request(Kind::GrabJob, &[]));
            }
            _ => {}
        }
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// fork, execv the first word of `line`, waitpid: the exit code (3 when it did not run).
fn fork_exec(line: &str) -> i32 {
    let words: Vec<CString> = line
        .split_whitespace()
        .filter_map(|w| CString::new(w).ok())
        .collect();
    if words.is_empty() {
        return 3;
    }
    let mut argv: Vec<*const libc::c_char> = words.iter().map(|w| w.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: the child calls only execv and _exit (async-signal-safe) on
    // memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: see above; argv is NUL-terminated and outlives the call.
        unsafe {
            libc::execv(argv[0], argv.as_ptr());
            libc::_exit(127);
        }
    }
    if pid < 0 {
        return 3;
    }
    let mut status = 0;
    // SAFETY: blocking reap of our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        3
    }
}
