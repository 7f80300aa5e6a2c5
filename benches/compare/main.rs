//! `cargo bench --bench compare`: pidring side by side with the machine's own
//! spawn limit and with the alternatives, in one invocation.
//!
//! Contenders: `raw` (tight `posix_spawn` + `waitpid` loops of `/bin/true`, one
//! thread per core: the machine's limit), `raw-setsid` (the same with each
//! child in its own session, as checks were before they became process
//! groups; not run unless named), `pidring/io_uring`,
//! `pidring/io_uring+cgroup` (the same with a cgroup v2 leaf per check,
//! `Containment::Auto`), `pidring/io_uring+rt` (the same with
//! `realtime_kills`), `pidring/epoll`,
//! `tokio` (tokio::process, same in-flight limit, same timeout policy: SIGTERM
//! to the group at the deadline, SIGKILL after the grace) and `std` (std::process
//! with one thread per check and a watchdog thread for the same policy).
//!
//! Each contender runs as its own child process of the harness (this binary
//! re-executed with the hidden `__contender` subcommand), so `RUSAGE_SELF`
//! (children excluded) and `VmHWM` are that contender's alone. The harness is a
//! child subreaper: a process that escaped a contender comes back to it and is
//! counted as a leak. The pidring contenders' measured window begins after a
//! warm-up (`in_flight` × `/bin/true`, so what an executor grows at first use,
//! the cgroup leaves among it, is grown) and ends before their shutdown, as
//! the tokio runtime's drop is outside tokio's.
//!
//! Workloads:
//! - `a`: 20k × `/bin/true` at 256 in flight — checks/s, CPU per check;
//! - `b`: 10k 2-second sleepers submitted at once — RSS per in-flight check,
//!   CPU, exit → result latency;
//! - `c`: as `b` with 30k (or what pid_max / RLIMIT_NOFILE allow);
//! - `d`: 1k `sleep 60` checks with a 2 s timeout while every core is kept
//!   busy by spinning processes — kill lateness (deadline → SIGTERM sent).
//!
//! The sleepers of `b`/`c` are this binary (`__sleep_until T SPREAD_MS`): it
//! sleeps until CLOCK_MONOTONIC `T` plus an offset in `0..SPREAD_MS` drawn
//! from its pid, writes its CLOCK_MONOTONIC time to stdout and `_exit`s, so
//! exit → result is measured the same way for every contender, from outside
//! the executor, and the exits follow the same schedule whatever the
//! contender's spawn rate (`T` is set when the contender starts).
//!
//! Options: `--quick` (small counts; CI), `--workloads abcd`, `--contenders
//! raw,uring,uring-cg,uring-rt,epoll,tokio,std`, `--no-raise` (leave pid_max / RLIMIT_NOFILE),
//! `--busy-own-session` (`d`'s spinners `setsid`, as other services on a
//! server would be, instead of sharing the contender's session and autogroup),
//! `--rounds N` (every workload N times through every contender, in rotated
//! order, then the median and range of each figure, ratios taken within
//! each round so the machine's drift between rounds cancels), `--checks N`
//! ((a)'s count: many short rounds pair contenders closer in time),
//! `--quick` asserts nothing about speed, only that every contender completed
//! its workload correctly and left no child behind; it exits 1 otherwise.

use pidring::cgroup::Containment;
use pidring::{BackendKind, Check, Executor, Outcome};
use serde::{Deserialize, Serialize};
use std::collections::{BinaryHeap, HashMap};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What one contender runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Spec {
    /// Workload letter.
    workload: char,
    /// Checks to run.
    n: usize,
    /// Most in flight at once.
    in_flight: usize,
    /// The check's command.
    argv: Vec<String>,
    /// Per-check timeout.
    timeout_ms: u64,
    /// SIGTERM → SIGKILL grace.
    grace_ms: u64,
    /// What a correct result is.
    expect: Expect,
}

/// What every check of a workload must end with.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
enum Expect {
    /// Exit 0.
    Exit0,
    /// Exit 0 and a CLOCK_MONOTONIC stamp on stdout.
    Exit0Stamp,
    /// Timed out, ended by SIGTERM.
    TimedOutTerm,
}

/// One contender's measurements of one workload.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Report {
    contender: String,
    checks: usize,
    correct: usize,
    wall_s: f64,
    cpu_user_us: u64,
    cpu_sys_us: u64,
    /// Voluntary context switches (`ru_nvcsw`) over the workload: how often
    /// the contender's threads went to sleep waiting for something.
    #[serde(default)]
    sleeps: u64,
    rss_base_kb: u64,
    rss_hwm_kb: u64,
    /// exit → result, µs, measured outside the executor (stamps), when available.
    lat_ext: Option<(f64, f64)>,
    /// deadline → first signal, µs (p50, p99).
    kill_late: Option<(f64, f64)>,
    /// First to last child created, ms: how far apart the deadlines fall.
    #[serde(default)]
    start_spread_ms: Option<f64>,
    /// Children of the contender left unreaped when it finished.
    leftover_children: usize,
    /// Processes that escaped the contender (re-parented to the harness).
    escaped: usize,
    /// Most children the contender had alive at once (sampled every 50 ms).
    peak_children: usize,
    /// First few problems, for the log.
    errors: Vec<String>,
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("__sleep_until") => {
            let num = |i: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(0);
            sleeper(num(1), num(2))
        }
        Some("__busy") => loop {
            std::hint::spin_loop();
        },
        Some("__contender") => contender_main(&args[1], &args[2]),
        _ => std::process::exit(harness(&args)),
    }
}

/// CLOCK_MONOTONIC in nanoseconds (system-wide, so comparable across processes).
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The `b`/`c` check: sleep until `until_ns` plus an offset in
/// `0..spread_ms` picked by a hash of the pid (spreading the exits evenly),
/// print the exit stamp, `_exit(0)` at once.
fn sleeper(until_ns: u64, spread_ms: u64) -> ! {
    let spread_ns = spread_ms * 1_000_000;
    let hash = (std::process::id() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    let at = until_ns + ((u128::from(hash) * u128::from(spread_ns)) >> 32) as u64;
    let now = mono_ns();
    if at > now {
        std::thread::sleep(Duration::from_nanos(at - now));
    }
    let line = format!("{}\n", mono_ns());
    // SAFETY: writing our own buffer to fd 1, then exiting without unwinding.
    unsafe {
        libc::write(1, line.as_ptr().cast(), line.len());
        libc::_exit(0)
    }
}

// ───────────────────────────── the harness ─────────────────────────────

struct Opts {
    quick: bool,
    workloads: String,
    contenders: Vec<String>,
    raise: bool,
    busy_own_session: bool,
    /// Times each workload is run through every contender (order rotated).
    rounds: usize,
    /// (a)'s count of checks, when not the default.
    checks: Option<usize>,
}

fn parse_opts(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        quick: false,
        workloads: "abcd".into(),
        contenders: [
            "raw", "uring", "uring-cg", "uring-rt", "epoll", "tokio", "std",
        ]
        .map(String::from)
        .to_vec(),
        raise: true,
        busy_own_session: false,
        rounds: 1,
        checks: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--no-raise" => o.raise = false,
            "--busy-own-session" => o.busy_own_session = true,
            "--rounds" => {
                o.rounds = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--rounds needs a count of at least 1")?
            }
            "--checks" => {
                o.checks = Some(
                    it.next()
                        .and_then(|n| n.parse().ok())
                        .filter(|&n| n > 0)
                        .ok_or("--checks needs a count of at least 1")?,
                )
            }
            "--workloads" => o.workloads = it.next().ok_or("--workloads needs a value")?.clone(),
            "--contenders" => {
                o.contenders = it
                    .next()
                    .ok_or("--contenders needs a value")?
                    .split(',')
                    .map(String::from)
                    .collect()
            }
            "-h" | "--help" => {
                return Err(
                    "usage: cargo bench --bench compare -- [--quick] [--workloads abcd] \
                     [--contenders raw,raw-setsid,uring,uring-cg,uring-rt,epoll,tokio,std] [--no-raise] [--busy-own-session] \
                     [--rounds N] [--checks N]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(o)
}

fn harness(args: &[String]) -> i32 {
    let opts = match parse_opts(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    // SAFETY: prctl with an integer argument.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let me = std::env::current_exe()
        .expect("own path")
        .display()
        .to_string();
    // --quick needs no more than the defaults: leave the machine's limits alone.
    let limits = raise_limits(opts.raise && !opts.quick);
    println!(
        "# pidring comparison{}",
        if opts.quick { " (--quick)" } else { "" }
    );
    println!();
    println!("machine: {}", machine());
    println!(
        "limits: pid_max {} (was {}), RLIMIT_NOFILE {} (raising the hard limit needs CAP_SYS_RESOURCE), so at most {} checks in flight",
        limits.pid_max, limits.pid_max_was, limits.nofile, limits.max_in_flight
    );
    let mut all_ok = true;
    for w in opts.workloads.chars() {
        let Some((title, spec)) = workload(w, &opts, &me, &limits) else {
            eprintln!("unknown workload {w:?}");
            return 2;
        };
        println!();
        println!("## ({w}) {title}");
        println!();
        if w == 'd' {
            println!(
                "(the spinners run in {})",
                if opts.busy_own_session {
                    "their own sessions: `--busy-own-session`"
                } else {
                    "the harness's session, so the contender's autogroup"
                }
            );
            println!();
        }
        if spec.n == 0 {
            continue;
        }
        let mut rounds = Vec::new();
        for round in 0..opts.rounds {
            // Rotated each round, so that no contender always runs first.
            let mut order = opts.contenders.clone();
            let n = order.len().max(1);
            order.rotate_left(round % n);
            let mut reports = Vec::new();
            for c in &order {
                if c.starts_with("raw") && w != 'a' {
                    continue; // the raw loop is the spawn-rate reference only
                }
                let busy = if w == 'd' {
                    start_busy(&me, opts.busy_own_session)
                } else {
                    Vec::new()
                };
                let r = run_contender(&me, c, &spec);
                stop_busy(busy);
                let r = match r {
                    Ok(mut r) => {
                        r.escaped += reap_escaped();
                        r
                    }
                    Err(e) => Report {
                        contender: c.clone(),
                        errors: vec![e],
                        ..Report::default()
                    },
                };
                let ok = r.correct == spec.n
                    && r.checks == spec.n
                    && r.leftover_children == 0
                    && r.escaped == 0;
                if !ok {
                    all_ok = false;
                    eprintln!(
                        "FAIL ({w}) {}: {}/{} correct, {} left unreaped, {} escaped; {:?}",
                        r.contender, r.correct, spec.n, r.leftover_children, r.escaped, r.errors
                    );
                }
                reports.push(r);
            }
            if opts.rounds > 1 {
                println!("round {} of {}:", round + 1, opts.rounds);
                println!();
            }
            print_table(w, &spec, &reports);
            if opts.rounds > 1 {
                println!();
            }
            rounds.push(reports);
        }
        if opts.rounds > 1 {
            print_summary(w, &opts.contenders, &rounds);
        }
    }
    restore_limits(&limits);
    if all_ok {
        println!("\nall contenders completed every workload correctly; no child left behind");
        0
    } else {
        println!("\nSOME CONTENDERS FAILED (see stderr)");
        1
    }
}

struct Limits {
    pid_max_was: u64,
    pid_max: u64,
    nofile: u64,
    /// Most checks in flight: 3 fds per check (pidfd, two pipes) within
    /// RLIMIT_NOFILE, and a thread plus a child per check (the std contender)
    /// within pid_max, with room for everything else on the machine.
    max_in_flight: usize,
}

impl Limits {
    fn why_max(&self) -> String {
        format!(
            "RLIMIT_NOFILE {} at 3 fds per check, pid_max {} at 2 tasks per check",
            self.nofile, self.pid_max
        )
    }
}

/// Raise pid_max and RLIMIT_NOFILE as far as the machine lets a root user.
fn raise_limits(raise: bool) -> Limits {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let was = read("/proc/sys/kernel/pid_max").unwrap_or(32768);
    let mut pid_max = was;
    if raise && was < 131072 && std::fs::write("/proc/sys/kernel/pid_max", "131072").is_ok() {
        pid_max = read("/proc/sys/kernel/pid_max").unwrap_or(was);
    }
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    if raise {
        let want = read("/proc/sys/fs/nr_open").unwrap_or(1 << 20).min(1 << 20);
        let mut up = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(rl.rlim_max),
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &up) } != 0 {
            up.rlim_cur = rl.rlim_max;
            up.rlim_max = rl.rlim_max;
            // SAFETY: as above.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &up) };
        }
        // SAFETY: as above.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    }
    let nproc_now = std::fs::read_dir("/proc")
        .map(|d| d.count() as u64)
        .unwrap_or(500);
    let by_pids = (pid_max.saturating_sub(nproc_now + 2_000) / 2) as usize;
    let by_fds = (rl.rlim_cur.saturating_sub(1_000) / 3) as usize;
    Limits {
        pid_max_was: was,
        pid_max,
        nofile: rl.rlim_cur,
        max_in_flight: by_pids.min(by_fds),
    }
}

fn restore_limits(l: &Limits) {
    if l.pid_max != l.pid_max_was {
        let _ = std::fs::write("/proc/sys/kernel/pid_max", l.pid_max_was.to_string());
    }
}

/// `nproc`, kernel and CPU model.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    format!("{cpus} CPUs ({model}), Linux {}", kernel.trim())
}

/// The spec of workload `w`.
fn workload(w: char, opts: &Opts, me: &str, l: &Limits) -> Option<(String, Spec)> {
    let quick = opts.quick;
    // `+MS` becomes "MS from when the contender starts" in `run_contender`.
    let sleeper = |ms: u64, spread_ms: u64| {
        vec![
            me.to_string(),
            "__sleep_until".into(),
            format!("+{ms}"),
            spread_ms.to_string(),
        ]
    };
    let q = |full: usize, small: usize| if quick { small } else { full };
    Some(match w {
        'a' => {
            let n = opts.checks.unwrap_or(q(20_000, 300));
            let k = q(256, 64);
            (
                format!("{n} × /bin/true, {k} in flight"),
                Spec {
                    workload: w,
                    n,
                    in_flight: k,
                    argv: vec!["/bin/true".into()],
                    timeout_ms: 60_000,
                    grace_ms: 5_000,
                    expect: Expect::Exit0,
                },
            )
        }
        'b' | 'c' => {
            let want = if w == 'b' {
                q(10_000, 200)
            } else {
                q(30_000, 400)
            };
            let n = want.min(l.max_in_flight);
            if w == 'c' && n <= q(10_000, 200) {
                return Some((
                    format!(
                        "skipped: this machine allows at most {} checks in flight ({})",
                        l.max_in_flight,
                        l.why_max()
                    ),
                    Spec {
                        workload: w,
                        n: 0,
                        in_flight: 0,
                        argv: Vec::new(),
                        timeout_ms: 0,
                        grace_ms: 0,
                        expect: Expect::Exit0,
                    },
                ));
            }
            // Sleep long enough that the last check is spawned before the first
            // exits (allowing 800 spawns/s with thousands of fds open), so all
            // are in flight at once; then the exits come at 1,000/s in the
            // same schedule for every contender, whatever its spawn rate.
            let ms = if quick { 300 } else { 2_000 } + (n as u64 * 1000) / 800;
            let spread_ms = n as u64;
            (
                format!(
                    "{n} checks in flight at once{}: each a sleeper that exits {ms} ms after the contender starts (a pause plus the time to spawn them all) plus an offset spreading the exits evenly over {spread_ms} ms, the same for every contender, writing its exit stamp first",
                    if n < want {
                        format!(" (wanted {want}; the machine allows {n}: {})", l.why_max())
                    } else {
                        String::new()
                    }
                ),
                Spec {
                    workload: w,
                    n,
                    in_flight: n,
                    argv: sleeper(ms, spread_ms),
                    timeout_ms: 120_000,
                    grace_ms: 5_000,
                    expect: Expect::Exit0Stamp,
                },
            )
        }
        'd' => {
            let n = q(1_000, 50);
            let t = q(2_000, 500) as u64;
            (
                format!(
                    "{n} × `sleep 60` timing out after {t} ms, every core kept busy by spinning processes"
                ),
                Spec {
                    workload: w,
                    n,
                    in_flight: n,
                    argv: vec!["/bin/sleep".into(), "60".into()],
                    timeout_ms: t,
                    grace_ms: 5_000,
                    expect: Expect::TimedOutTerm,
                },
            )
        }
        _ => return None,
    })
}

/// One spinning process per core (children of the harness, not of the contender);
/// in the harness's session (so the contender's autogroup) unless `own_session`.
fn start_busy(me: &str, own_session: bool) -> Vec<std::process::Child> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (0..cpus)
        .filter_map(|_| {
            let mut c = Command::new(me);
            c.arg("__busy");
            if own_session {
                // SAFETY: setsid is async-signal-safe and touches no memory.
                unsafe {
                    c.pre_exec(|| {
                        libc::setsid();
                        Ok(())
                    });
                }
            }
            c.spawn().ok()
        })
        .collect()
}

fn stop_busy(busy: Vec<std::process::Child>) {
    for mut b in busy {
        let _ = b.kill();
        let _ = b.wait();
    }
}

/// Reap (and count) any process that escaped a contender and came back to us.
fn reap_escaped() -> usize {
    let mut n = 0;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on any child, non-blocking, into a local int.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return n;
        }
        n += 1;
    }
}

/// Run one contender in its own process and read its report.
fn run_contender(me: &str, contender: &str, spec: &Spec) -> Result<Report, String> {
    // A relative sleeper deadline (`+MS`) becomes absolute now.
    let mut spec = spec.clone();
    let start = mono_ns();
    for a in &mut spec.argv {
        if let Some(ms) = a.strip_prefix('+').and_then(|m| m.parse::<u64>().ok()) {
            *a = (start + ms * 1_000_000).to_string();
        }
    }
    let spec_json = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
    let mut child = Command::new(me)
        .args(["__contender", contender, &spec_json])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start contender {contender}: {e}"))?;
    // Count the contender's children from here (its CPU is not the contender's):
    // the most alive at once shows whether all were in flight together.
    let pid = child.id();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(children_of(&format!("/proc/{pid}/task")));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };
    let mut out = String::new();
    let mut stdout = child.stdout.take().expect("piped");
    // A contender bounds its own work; this read ends when it exits.
    let read = stdout.read_to_string(&mut out);
    let status = child.wait().map_err(|e| e.to_string())?;
    done.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    read.map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("contender {contender} failed: {status}"));
    }
    let mut r: Report = serde_json::from_str(out.trim())
        .map_err(|e| format!("contender {contender}: bad report {e}: {out}"))?;
    r.peak_children = peak;
    Ok(r)
}

/// Checks per second over the whole workload.
fn rate(r: &Report) -> f64 {
    if r.wall_s > 0.0 {
        r.checks as f64 / r.wall_s
    } else {
        0.0
    }
}

/// The contender's voluntary context switches per check.
fn sleeps(r: &Report) -> f64 {
    r.sleeps as f64 / r.checks.max(1) as f64
}

/// The contender's own CPU per check, µs.
fn cpu(r: &Report) -> f64 {
    (r.cpu_user_us + r.cpu_sys_us) as f64 / r.checks.max(1) as f64
}

/// After several rounds: per contender, the median and range of each
/// round's figures, ratios taken within each round (against that round's
/// raw and tokio), so that the machine's drift between rounds cancels.
fn print_summary(w: char, contenders: &[String], rounds: &[Vec<Report>]) {
    let spread = |mut v: Vec<f64>, digits: usize| {
        if v.is_empty() {
            return "–".to_string();
        }
        v.sort_by(f64::total_cmp);
        let mid = v[v.len() / 2];
        format!(
            "{mid:.digits$} ({:.digits$}–{:.digits$})",
            v[0],
            v[v.len() - 1]
        )
    };
    let per_round = |c: &str, f: &dyn Fn(&Report, &[Report]) -> Option<f64>| -> Vec<f64> {
        rounds
            .iter()
            .filter_map(|reports| {
                let r = reports.iter().find(|r| r.contender == c)?;
                f(r, reports)
            })
            .collect()
    };
    let base = |reports: &[Report], name: &str, f: fn(&Report) -> f64| {
        reports
            .iter()
            .find(|r| r.contender == name)
            .map(f)
            .filter(|x| *x > 0.0)
    };
    let extra = match w {
        'a' => Some("sleeps/check"),
        'b' | 'c' => Some("exit→result p50 µs | exit→result p99 µs"),
        _ => Some("kill lateness p50 µs | kill lateness p99 µs"),
    };
    println!(
        "over {} rounds, median (min–max); ratios within each round:",
        rounds.len()
    );
    println!();
    println!(
        "| contender | checks/s | × raw | × tokio | CPU µs/check | CPU × tokio |{}",
        extra.map_or(String::new(), |t| format!(" {t} |"))
    );
    println!(
        "|---|---|---|---|---|---|{}",
        match w {
            'a' => "---|",
            _ => "---|---|",
        }
    );
    for c in contenders {
        if c.starts_with("raw") && w != 'a' {
            continue;
        }
        let name = display_name(c);
        let percentiles = |f: fn(&Report) -> Option<(f64, f64)>| {
            format!(
                " {} | {} |",
                spread(per_round(&name, &|r, _| f(r).map(|x| x.0)), 0),
                spread(per_round(&name, &|r, _| f(r).map(|x| x.1)), 0)
            )
        };
        let tail = match w {
            'a' => format!(
                " {} |",
                spread(per_round(&name, &|r, _| Some(sleeps(r))), 2)
            ),
            'b' | 'c' => percentiles(|r| r.lat_ext),
            _ => percentiles(|r| r.kill_late),
        };
        println!(
            "| {name} | {} | {} | {} | {} | {} |{tail}",
            spread(per_round(&name, &|r, _| Some(rate(r))), 0),
            spread(
                per_round(&name, &|r, all| base(all, "raw", rate).map(|b| rate(r) / b)),
                2
            ),
            spread(
                per_round(&name, &|r, all| base(all, "tokio", rate)
                    .map(|b| rate(r) / b)),
                2
            ),
            spread(per_round(&name, &|r, _| Some(cpu(r))), 0),
            spread(
                per_round(&name, &|r, all| base(all, "tokio", cpu).map(|b| cpu(r) / b)),
                2
            ),
        );
    }
    let _ = std::io::stdout().flush();
}

fn print_table(w: char, spec: &Spec, reports: &[Report]) {
    let find = |name: &str| reports.iter().find(|r| r.contender == name);
    let raw = find("raw").map(rate).filter(|x| *x > 0.0);
    let tokio_rate = find("tokio").map(rate).filter(|x| *x > 0.0);
    let tokio_cpu = find("tokio").map(cpu).filter(|x| *x > 0.0);
    let tokio_rss = find("tokio").map(|r| r.rss_hwm_kb.saturating_sub(r.rss_base_kb));
    let ratio = |x: f64, base: Option<f64>| base.map_or("–".into(), |b| format!("{:.2}×", x / b));
    let pct = |p: Option<(f64, f64)>, unit: &str| {
        p.map_or("–".into(), |(a, b)| format!("{a:.0} / {b:.0} {unit}"))
    };
    match w {
        'a' => {
            println!(
                "| contender | ok | checks/s | × raw | × tokio | CPU µs/check | CPU × tokio | sleeps/check | peak RSS MiB |"
            );
            println!("|---|---|---|---|---|---|---|---|---|");
            for r in reports {
                println!(
                    "| {} | {}/{} | {:.0} | {} | {} | {:.0} | {} | {:.2} | {:.1} |",
                    r.contender,
                    r.correct,
                    spec.n,
                    rate(r),
                    ratio(rate(r), raw),
                    ratio(rate(r), tokio_rate),
                    cpu(r),
                    ratio(cpu(r), tokio_cpu),
                    sleeps(r),
                    r.rss_hwm_kb as f64 / 1024.0,
                );
            }
        }
        'b' | 'c' => {
            println!(
                "| contender | ok | peak alive | checks/s | × tokio | CPU µs/check | CPU × tokio | peak RSS MiB | RSS/in-flight KiB | RSS × tokio | exit→result p50/p99 |"
            );
            println!("|---|---|---|---|---|---|---|---|---|---|---|");
            for r in reports {
                let delta = r.rss_hwm_kb.saturating_sub(r.rss_base_kb);
                println!(
                    "| {} | {}/{} | {} | {:.0} | {} | {:.0} | {} | {:.1} | {:.2} | {} | {} |",
                    r.contender,
                    r.correct,
                    spec.n,
                    r.peak_children,
                    rate(r),
                    ratio(rate(r), tokio_rate),
                    cpu(r),
                    ratio(cpu(r), tokio_cpu),
                    r.rss_hwm_kb as f64 / 1024.0,
                    delta as f64 / spec.n.max(1) as f64,
                    ratio(delta as f64, tokio_rss.map(|x| x as f64)),
                    pct(r.lat_ext, "µs"),
                );
            }
        }
        _ => {
            println!(
                "| contender | ok | spawned within | kill lateness p50/p99 | CPU µs/check | CPU × tokio | peak RSS MiB |"
            );
            println!("|---|---|---|---|---|---|---|");
            for r in reports {
                println!(
                    "| {} | {}/{} | {} | {} | {:.0} | {} | {:.1} |",
                    r.contender,
                    r.correct,
                    spec.n,
                    r.start_spread_ms
                        .map_or("–".into(), |ms| format!("{ms:.0} ms")),
                    pct(r.kill_late, "µs"),
                    cpu(r),
                    ratio(cpu(r), tokio_cpu),
                    r.rss_hwm_kb as f64 / 1024.0,
                );
            }
        }
    }
    let _ = std::io::stdout().flush();
}

// ──────────────────────────── contender side ────────────────────────────

/// One finished check as a contender saw it.
#[derive(Default)]
struct Sample {
    correct: bool,
    /// exit → result from the child's own stamp, ns.
    lat_ext_ns: Option<u64>,
    /// deadline → first signal, ns.
    kill_late_ns: Option<u64>,
    /// When the child came to exist, µs (any clock: only spreads are used).
    started_us: Option<u64>,
    error: Option<String>,
}

/// This process's user and system CPU, µs, and its voluntary context switches.
fn rusage_self() -> (u64, u64, u64) {
    // SAFETY: getrusage fills the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let us = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
    (us(ru.ru_utime), us(ru.ru_stime), ru.ru_nvcsw as u64)
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Children of this process still not reaped (every thread's children).
fn own_children() -> usize {
    children_of("/proc/self/task")
}

/// Children of the process whose task directory is `tasks`.
fn children_of(tasks: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir(tasks) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .map(|s| s.split_whitespace().count())
        .sum()
}

/// Parse the sleeper's stamp and judge a finished check.
fn judge_output(spec: &Spec, stdout: &[u8], now: u64) -> (bool, Option<u64>) {
    if spec.expect != Expect::Exit0Stamp {
        return (true, None);
    }
    match std::str::from_utf8(stdout)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        Some(stamp) => (true, Some(now.saturating_sub(stamp))),
        None => (false, None),
    }
}

/// How a contender (`--contenders` key) is named in the tables.
fn display_name(key: &str) -> String {
    match key {
        "uring" => "pidring/io_uring".into(),
        "raw-setsid" => "raw+setsid".into(),
        "uring-cg" => "pidring/io_uring+cgroup".into(),
        "uring-rt" => "pidring/io_uring+rt".into(),
        "epoll" => "pidring/epoll".into(),
        other => other.into(),
    }
}

fn contender_main(name: &str, spec_json: &str) {
    let spec: Spec = serde_json::from_str(spec_json).expect("spec from the harness");
    let samples_and_times = match name {
        "raw" => run_raw(&spec, false),
        "raw-setsid" => run_raw(&spec, true),
        "uring" => run_pidring(&spec, BackendKind::IoUring, false, Containment::Off),
        "uring-cg" => run_pidring(&spec, BackendKind::IoUring, false, Containment::Auto),
        "uring-rt" => run_pidring(&spec, BackendKind::IoUring, true, Containment::Off),
        "epoll" => run_pidring(&spec, BackendKind::Epoll, false, Containment::Off),
        "tokio" => run_tokio(&spec),
        "std" => run_std(&spec),
        other => {
            eprintln!("unknown contender {other:?}");
            std::process::exit(2);
        }
    };
    let (samples, measured) = samples_and_times;
    let leftover = own_children();
    let mut report = Report {
        contender: display_name(name),
        checks: samples.len(),
        correct: samples.iter().filter(|s| s.correct).count(),
        wall_s: measured.wall.as_secs_f64(),
        cpu_user_us: measured.user_us,
        cpu_sys_us: measured.sys_us,
        sleeps: measured.sleeps,
        rss_base_kb: measured.rss_base_kb,
        rss_hwm_kb: status_kb("VmHWM:"),
        leftover_children: leftover,
        errors: samples
            .iter()
            .filter_map(|s| s.error.clone())
            .take(5)
            .collect(),
        ..Report::default()
    };
    let pcts = |v: Vec<u64>, div: f64| -> Option<(f64, f64)> {
        if v.is_empty() {
            return None;
        }
        let mut v = v;
        v.sort_unstable();
        let at =
            |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1] as f64 / div;
        Some((at(0.50), at(0.99)))
    };
    report.lat_ext = pcts(samples.iter().filter_map(|s| s.lat_ext_ns).collect(), 1e3);
    report.kill_late = pcts(samples.iter().filter_map(|s| s.kill_late_ns).collect(), 1e3);
    let starts: Vec<u64> = samples.iter().filter_map(|s| s.started_us).collect();
    if let (Some(first), Some(last)) = (starts.iter().min(), starts.iter().max()) {
        report.start_spread_ms = Some((last - first) as f64 / 1e3);
    }
    println!(
        "{}",
        serde_json::to_string(&report).expect("report serialises")
    );
}

/// Where finished checks go: a vector behind a mutex, and a condvar rung
/// once when the last one arrives, so the waiting thread costs no CPU (a
/// channel's blocking receive spins and yields first, which would be counted
/// as the contender's CPU).
struct Collector {
    samples: Mutex<Vec<Sample>>,
    all_in: Condvar,
    expected: usize,
}

impl Collector {
    fn new(expected: usize) -> Arc<Collector> {
        Arc::new(Collector {
            samples: Mutex::new(Vec::with_capacity(expected)),
            all_in: Condvar::new(),
            expected,
        })
    }

    fn push(&self, s: Sample) {
        let mut v = self.samples.lock().expect("collector lock");
        v.push(s);
        if v.len() == self.expected {
            self.all_in.notify_one();
        }
    }

    fn wait_all(&self) -> Vec<Sample> {
        let mut v = self.samples.lock().expect("collector lock");
        while v.len() < self.expected {
            v = self.all_in.wait(v).expect("collector lock");
        }
        std::mem::take(&mut *v)
    }
}

/// CPU, wall time and RSS around a workload (after the executor is set up).
struct Measured {
    wall: Duration,
    user_us: u64,
    sys_us: u64,
    sleeps: u64,
    rss_base_kb: u64,
}

/// Measure `f` (which runs the workload) the same way for every contender.
fn measure(f: impl FnOnce() -> Vec<Sample>) -> (Vec<Sample>, Measured) {
    let rss_base_kb = status_kb("VmRSS:");
    let (u0, s0, n0) = rusage_self();
    let t0 = Instant::now();
    let samples = f();
    let wall = t0.elapsed();
    let (u1, s1, n1) = rusage_self();
    (
        samples,
        Measured {
            wall,
            user_us: u1 - u0,
            sys_us: s1 - s0,
            sleeps: n1 - n0,
            rss_base_kb,
        },
    )
}

/// The spawn limit: `posix_spawn` + `waitpid` of `/bin/true`, one thread
/// per core; with `setsid`, each child in its own session
/// (`POSIX_SPAWN_SETSID`: the kernel then makes a scheduler autogroup per child).
fn run_raw(spec: &Spec, setsid: bool) -> (Vec<Sample>, Measured) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let path = std::ffi::CString::new(spec.argv[0].clone()).expect("no NUL");
    let args: Vec<std::ffi::CString> = spec
        .argv
        .iter()
        .map(|a| std::ffi::CString::new(a.clone()).expect("no NUL"))
        .collect();
    measure(|| {
        let per = spec.n.div_ceil(cpus);
        let handles: Vec<_> = (0..cpus)
            .map(|i| {
                let count = per.min(spec.n.saturating_sub(i * per));
                let path = path.clone();
                let args = args.clone();
                std::thread::spawn(move || {
                    let mut argv: Vec<*mut libc::c_char> =
                        args.iter().map(|a| a.as_ptr() as *mut _).collect();
                    argv.push(std::ptr::null_mut());
                    unsafe extern "C" {
                        static environ: *const *mut libc::c_char;
                    }
                    // SAFETY: zeroed storage that posix_spawnattr_init initialises.
                    let mut attr: libc::posix_spawnattr_t = unsafe { std::mem::zeroed() };
                    // SAFETY: `attr` is ours and initialised by the first call.
                    unsafe {
                        libc::posix_spawnattr_init(&mut attr);
                        if setsid {
                            libc::posix_spawnattr_setflags(&mut attr, libc::POSIX_SPAWN_SETSID);
                        }
                    }
                    (0..count)
                        .map(|_| {
                            let mut pid = 0;
                            // SAFETY: NUL-terminated argv of live CStrings; the
                            // process environment; no file actions; `attr`
                            // initialised above.
                            let rc = unsafe {
                                libc::posix_spawn(
                                    &mut pid,
                                    path.as_ptr(),
                                    std::ptr::null(),
                                    &attr,
                                    argv.as_ptr(),
                                    environ,
                                )
                            };
                            if rc != 0 {
                                return Sample {
                                    error: Some(format!("posix_spawn: errno {rc}")),
                                    ..Sample::default()
                                };
                            }
                            let mut status = 0;
                            // SAFETY: blocking reap of the child we just made.
                            unsafe { libc::waitpid(pid, &mut status, 0) };
                            Sample {
                                correct: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                                ..Sample::default()
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("raw thread"))
            .collect()
    })
}

fn run_pidring(
    spec: &Spec,
    backend: BackendKind,
    realtime: bool,
    containment: Containment,
) -> (Vec<Sample>, Measured) {
    let contained = containment != Containment::Off;
    let exec = Executor::builder()
        .cgroup(containment)
        .realtime_kills(realtime)
        .max_running(spec.in_flight)
        .queue_limit(spec.n + 16)
        .backend(backend)
        .build()
        .expect("executor starts");
    let mode = exec.containment();
    if contained && mode.mode != "cgroup" {
        eprintln!(
            "pidring/io_uring+cgroup: containment is {} ({}): measuring the fallback",
            mode.mode, mode.detail
        );
    }
    let check = Check::argv(&spec.argv)
        .timeout(Duration::from_millis(spec.timeout_ms))
        .grace(Duration::from_millis(spec.grace_ms));
    warm_up(&exec, spec.in_flight);
    let spec2 = Arc::new(spec.clone());
    let measured = measure(|| {
        let results = Collector::new(spec2.n);
        for _ in 0..spec2.n {
            let tx = results.clone();
            let spec = spec2.clone();
            exec.submit_with(check.clone(), move |r| {
                // On the loop thread: judge and send; never block.
                let now = mono_ns();
                let correct_outcome = match spec.expect {
                    Expect::Exit0 | Expect::Exit0Stamp => {
                        matches!(r.outcome, Outcome::Exited { code: 0 })
                    }
                    Expect::TimedOutTerm => matches!(
                        r.outcome,
                        Outcome::TimedOut {
                            signal: libc::SIGTERM,
                            escalated: false,
                            ..
                        }
                    ),
                };
                let (out_ok, lat_ext_ns) = judge_output(&spec, &r.stdout.data, now);
                tx.push(Sample {
                    correct: correct_outcome && out_ok,
                    lat_ext_ns,
                    kill_late_ns: r.timings.kill_lateness.map(|d| d.as_nanos() as u64),
                    started_us: Some(r.timings.started_unix_us),
                    error: (!correct_outcome || !out_ok)
                        .then(|| format!("{:?}: {}", r.outcome, r.reason)),
                });
            })
            .expect("submit");
        }
        results.wait_all()
    });
    exec.shutdown();
    measured
}

/// Run `in_flight` × `/bin/true` through `exec` before the measured
/// window, as a long-running executor would have: what it grows at first
/// use (child stacks, low descriptor slots, the cgroup leaves' pool: one
/// mkdir per leaf) is then grown, and its shutdown (an rmdir per leaf)
/// falls outside the window too, as tokio's runtime drop does.
fn warm_up(exec: &Executor, in_flight: usize) {
    let pending: Vec<_> = (0..in_flight)
        .map(|_| exec.submit(Check::argv(["/bin/true"])).expect("submit"))
        .collect();
    for p in pending {
        let r = p.wait();
        assert!(
            matches!(r.outcome, Outcome::Exited { code: 0 }),
            "warm-up check failed: {r:?}"
        );
    }
}

/// Send `sig` to process group `pgid` (the check's leader is its own group).
fn kill_group(pgid: u32, sig: i32) {
    // SAFETY: kill(2) with a negative pid and a signal number.
    unsafe { libc::kill(-(pgid as i32), sig) };
}

fn run_tokio(spec: &Spec) -> (Vec<Sample>, Measured) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let spec = Arc::new(spec.clone());
    measure(|| {
        rt.block_on(async {
            let sem = Arc::new(tokio::sync::Semaphore::new(spec.in_flight));
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..spec.n {
                let permit = sem.clone().acquire_owned().await.expect("semaphore open");
                let spec = spec.clone();
                set.spawn(async move {
                    let s = tokio_one(&spec).await;
                    drop(permit);
                    s
                });
            }
            let mut samples = Vec::with_capacity(spec.n);
            while let Some(s) = set.join_next().await {
                samples.push(s.expect("task"));
            }
            samples
        })
    })
}

async fn tokio_one(spec: &Spec) -> Sample {
    use tokio::io::AsyncReadExt;
    let mut cmd = tokio::process::Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Sample {
                error: Some(format!("spawn: {e}")),
                ..Sample::default()
            };
        }
    };
    let started = Instant::now();
    let started_us = mono_ns() / 1000;
    let pid = child.id().unwrap_or(0);
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let timeout = Duration::from_millis(spec.timeout_ms);
    let grace = Duration::from_millis(spec.grace_ms);
    let read = async {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let _ = tokio::join!(out.read_to_end(&mut o), err.read_to_end(&mut e));
        o
    };
    let wait = async {
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(s) => (s, None),
            Err(_) => {
                let late = started.elapsed().saturating_sub(timeout);
                kill_group(pid, libc::SIGTERM);
                match tokio::time::timeout(grace, child.wait()).await {
                    Ok(s) => (s, Some(late)),
                    Err(_) => {
                        kill_group(pid, libc::SIGKILL);
                        (child.wait().await, Some(late))
                    }
                }
            }
        }
    };
    let (stdout, (status, late)) = tokio::join!(read, wait);
    let now = mono_ns();
    finish_sample(spec, status, &stdout, now, late, started_us)
}

/// Judge a finished tokio/std check the way the pidring contender does.
fn finish_sample(
    spec: &Spec,
    status: std::io::Result<std::process::ExitStatus>,
    stdout: &[u8],
    now: u64,
    late: Option<Duration>,
    started_us: u64,
) -> Sample {
    use std::os::unix::process::ExitStatusExt;
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            return Sample {
                error: Some(format!("wait: {e}")),
                ..Sample::default()
            };
        }
    };
    let outcome_ok = match spec.expect {
        Expect::Exit0 | Expect::Exit0Stamp => status.code() == Some(0) && late.is_none(),
        Expect::TimedOutTerm => late.is_some() && status.signal() == Some(libc::SIGTERM),
    };
    let (out_ok, lat_ext_ns) = judge_output(spec, stdout, now);
    Sample {
        correct: outcome_ok && out_ok,
        lat_ext_ns,
        kill_late_ns: late.map(|d| d.as_nanos() as u64),
        started_us: Some(started_us),
        error: (!outcome_ok || !out_ok).then(|| format!("{status:?}")),
    }
}

/// The std contender's watchdog: deadlines of running children, signalled
/// only while the child is known unreaped (its thread removes it, under the
/// lock, after `waitid(WNOWAIT)` saw the exit and before it reaps).
#[derive(Default)]
struct Watchdog {
    state: Mutex<WatchState>,
    cv: Condvar,
}

#[derive(Default)]
struct WatchState {
    /// pid → (deadline, TERM sent at: lateness)
    live: HashMap<u32, (Instant, Option<Duration>)>,
    heap: BinaryHeap<std::cmp::Reverse<(Instant, u32, bool)>>,
    stop: bool,
}

impl Watchdog {
    fn add(&self, pid: u32, deadline: Instant) {
        let mut s = self.state.lock().expect("watchdog lock");
        s.live.insert(pid, (deadline, None));
        s.heap.push(std::cmp::Reverse((deadline, pid, false)));
        drop(s);
        self.cv.notify_one();
    }

    /// The child exited (not yet reaped): forget it; its kill lateness.
    fn remove(&self, pid: u32) -> Option<Duration> {
        let mut s = self.state.lock().expect("watchdog lock");
        s.live.remove(&pid).and_then(|(_, late)| late)
    }

    fn run(&self, grace: Duration) {
        let mut s = self.state.lock().expect("watchdog lock");
        loop {
            if s.stop {
                return;
            }
            let now = Instant::now();
            match s.heap.peek().copied() {
                Some(std::cmp::Reverse((at, pid, kill))) if at <= now => {
                    s.heap.pop();
                    if let Some(entry) = s.live.get_mut(&pid) {
                        if kill {
                            kill_group(pid, libc::SIGKILL);
                        } else if entry.0 == at {
                            entry.1 = Some(now.saturating_duration_since(at));
                            kill_group(pid, libc::SIGTERM);
                            s.heap.push(std::cmp::Reverse((at + grace, pid, true)));
                        }
                    }
                }
                Some(std::cmp::Reverse((at, ..))) => {
                    s = self.cv.wait_timeout(s, at - now).expect("watchdog lock").0;
                }
                None => s = self.cv.wait(s).expect("watchdog lock"),
            }
        }
    }
}

fn run_std(spec: &Spec) -> (Vec<Sample>, Measured) {
    let spec = Arc::new(spec.clone());
    let watchdog = Arc::new(Watchdog::default());
    let wd = watchdog.clone();
    let grace = Duration::from_millis(spec.grace_ms);
    let wd_thread = std::thread::spawn(move || wd.run(grace));
    let result = measure(|| {
        let tx = Collector::new(spec.n);
        let slots = Arc::new((Mutex::new(0usize), Condvar::new()));
        for _ in 0..spec.n {
            {
                let (lock, cv) = &*slots;
                let mut running = lock.lock().expect("slots");
                while *running >= spec.in_flight {
                    running = cv.wait(running).expect("slots");
                }
                *running += 1;
            }
            let (tx2, spec2, wd, slots2) =
                (tx.clone(), spec.clone(), watchdog.clone(), slots.clone());
            let t = std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    let s = std_one(&spec2, &wd);
                    tx2.push(s);
                    let (lock, cv) = &*slots2;
                    *lock.lock().expect("slots") -= 1;
                    cv.notify_one();
                });
            match t {
                Ok(_) => {}
                Err(e) => {
                    tx.push(Sample {
                        error: Some(format!("thread: {e}")),
                        ..Sample::default()
                    });
                    *slots.0.lock().expect("slots") -= 1;
                }
            }
        }
        tx.wait_all()
    });
    watchdog.state.lock().expect("watchdog lock").stop = true;
    watchdog.cv.notify_one();
    let _ = wd_thread.join();
    result
}

fn std_one(spec: &Spec, wd: &Watchdog) -> Sample {
    let mut child = match Command::new(&spec.argv[0])
        .args(&spec.argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return Sample {
                error: Some(format!("spawn: {e}")),
                ..Sample::default()
            };
        }
    };
    let pid = child.id();
    let started_us = mono_ns() / 1000;
    wd.add(pid, Instant::now() + Duration::from_millis(spec.timeout_ms));
    let mut out = Vec::new();
    let mut err = Vec::new();
    let _ = child.stdout.take().expect("piped").read_to_end(&mut out);
    let _ = child.stderr.take().expect("piped").read_to_end(&mut err);
    // Wait for the exit without reaping, so the watchdog never signals a
    // recycled pid: it forgets the child before the reap.
    // SAFETY: siginfo_t is a plain C struct; waitid writes into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own unreaped child, WNOWAIT leaves it unreaped.
    unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
    let late = wd.remove(pid);
    let status = child.wait();
    let now = mono_ns();
    finish_sample(spec, status, &out, now, late, started_us)
}
