//! `pidring-stress`: the load-spike harness. Drives a load profile of
//! misbehaving checks through pidring (in-process, or a running daemon), or
//! through a plain tokio::process executor for comparison, then proves the
//! invariants and writes percentile tables, `.hgrm` files, JSON and an SVG.

mod behaviour;
mod canary;
mod compare;
mod driver;
mod invariants;
mod profile;
mod progress;
mod record;
mod report;
mod socket;
mod strict;

use behaviour::{Behaviour, LONGEST_LIFE_MS, Mix};
use clap::{Parser, ValueEnum};
use driver::{Driver, Event, Policy};
use invariants::Verdict;
use pidring::{BackendKind, Stage};
use profile::{Profile, Shape};
use record::Record;
use report::{StageRow, Summary};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Which executor runs the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExecutorKind {
    /// The pidring library in this process (or the daemon with --socket).
    Pidring,
    /// A plain tokio::process executor with the same timeout policy.
    Tokio,
    /// The same, with the seed's escalation: a SIGKILL timer armed at SIGTERM and never disarmed.
    Naive,
}

/// Load-spike harness for pidring: drives misbehaving checks, proves the
/// invariants (no zombie, no leaked fd, one result each, groups gone, kill
/// lateness bounded, no innocent process signalled) and reports latencies.
#[derive(Parser, Debug)]
#[command(name = "pidring-stress", version, args_override_self = true)]
struct Opts {
    /// Load profile: steady, spike, ramp, burst, or a TOML profile file.
    #[arg(long, default_value = "spike")]
    profile: String,
    /// Run length (e.g. 20s, 5m); overrides the profile's.
    #[arg(long, value_parser = pidring::units::parse_duration)]
    duration: Option<Duration>,
    /// Number of checks to submit (whichever of duration and count ends first).
    #[arg(long)]
    count: Option<u64>,
    /// Base rate (checks/s): steady's rate, spike's baseline, ramp's end, burst's background.
    #[arg(long)]
    rate: Option<f64>,
    /// Spike multiplier (spike profile).
    #[arg(long)]
    factor: Option<f64>,
    /// Check timeout (default 1s).
    #[arg(long, value_parser = pidring::units::parse_duration)]
    timeout: Option<Duration>,
    /// SIGTERM → SIGKILL grace (default 500ms).
    #[arg(long, value_parser = pidring::units::parse_duration)]
    grace: Option<Duration>,
    /// Directory for .hgrm files, summary.json and latency.svg.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run through a running `pidring daemon` listening on this socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Afterwards, run the same load through a plain tokio::process executor and compare.
    #[arg(long)]
    compare: bool,
    /// Recycled-PID canary test: fresh PID namespace, tiny pid_max, signal-counting canaries.
    #[arg(long)]
    canaries: bool,
    /// Canary processes kept alive at once.
    #[arg(long, default_value_t = 24)]
    canary_count: usize,
    /// pid_max inside the canary namespace (PIDs from 300 up to it recycle).
    #[arg(long, default_value_t = 1000)]
    pid_max: u32,
    /// Test the fallback for kernels < 6.14: leave pid_max alone and recycle
    /// PIDs by PID-space pressure (a burner creating and reaping children).
    #[arg(long)]
    no_pid_max: bool,
    /// With the fallback: pure PID burning, without rewinding ns_last_pid.
    #[arg(long, hide = true)]
    no_rewind: bool,
    /// Busy threads saturating the CPUs meanwhile.
    #[arg(long, default_value_t = 0)]
    cpu_hogs: usize,
    /// Engine backend: auto, io_uring or epoll.
    #[arg(long, default_value = "auto")]
    backend: BackendKind,
    /// Take SCHED_FIFO on the in-process executor's loop while a kill is
    /// near (as the daemon does by default): true or false.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    realtime_kills: bool,
    /// Running slots of the executor.
    #[arg(long, default_value_t = 256)]
    max_running: usize,
    /// Queue limit of the executor.
    #[arg(long, default_value_t = 20_000)]
    queue_limit: usize,
    /// Bound on p99 kill lateness (deadline → first signal); a run above it fails.
    #[arg(long, value_parser = pidring::units::parse_duration, default_value = "100ms")]
    kill_bound: Duration,
    /// Only redraw latency.svg in --out from this summary.json (no run).
    #[arg(long)]
    replot: Option<PathBuf>,
    /// Which executor to drive (--compare runs `tokio` after `pidring`).
    #[arg(long, value_enum, default_value = "pidring")]
    executor: ExecutorKind,
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let opts = Opts::parse();
    match run(opts) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("pidring-stress: {msg}");
            ExitCode::from(2)
        }
    }
}

fn run(opts: Opts) -> Result<ExitCode, String> {
    if let Some(path) = &opts.replot {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let summary: Summary = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a pidring-stress summary: {e}", path.display()))?;
        let out = opts.out.clone().unwrap_or_else(|| PathBuf::from("."));
        std::fs::create_dir_all(&out)
            .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
        let svg = out.join("latency.svg");
        report::svg(&svg, &summary).map_err(|e| format!("cannot draw {}: {e}", svg.display()))?;
        println!("wrote {}", svg.display());
        return Ok(ExitCode::SUCCESS);
    }
    if opts.canaries && !canary::inside_namespace() {
        if !rustix::process::geteuid().is_root() {
            return Err("--canaries needs root (it creates a PID namespace)".into());
        }
        return canary::reexec_in_namespace();
    }
    let profile = build_profile(&opts)?;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let plugin = exe.with_file_name("pidring-plugin");
    if !plugin.exists() {
        return Err(format!(
            "{} is missing: build both binaries (`cargo build --bins`)",
            plugin.display()
        ));
    }
    let mix = Mix::new(
        &profile.weights,
        &plugin,
        profile.timeout_ms,
        profile.grace_ms,
    )?;
    let summary = drive(&opts, &profile, &mix, &plugin)?;
    let ok = summary.ok;
    if opts.compare && opts.executor == ExecutorKind::Pidring {
        compare_run(&opts, &summary)?;
    }
    // Reap whatever a comparison run re-parented to us (we stay a subreaper).
    reap_stray_children();
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn build_profile(opts: &Opts) -> Result<Profile, String> {
    let mut p = Profile::load(&opts.profile).map_err(|e| e.to_string())?;
    if let Some(d) = opts.duration {
        p.duration_secs = Some(d.as_secs_f64());
    }
    if let Some(c) = opts.count {
        p.count = Some(c);
        if opts.duration.is_none() {
            p.duration_secs = None;
        }
    }
    if let Some(t) = opts.timeout {
        p.timeout_ms = t.as_millis() as u64;
    }
    if let Some(g) = opts.grace {
        p.grace_ms = g.as_millis() as u64;
    }
    match (&mut p.shape, opts.rate, opts.factor) {
        (Shape::Steady { rate }, Some(r), _) => *rate = r,
        (Shape::Spike { base, factor, .. }, r, k) => {
            if let Some(r) = r {
                *base = r;
            }
            if let Some(k) = k {
                *factor = k;
            }
        }
        (Shape::Ramp { to, .. }, Some(r), _) => *to = r,
        (Shape::Burst { base, .. }, Some(r), _) => *base = r,
        _ => {}
    }
    if let (Shape::Ramp { over_secs, .. }, Some(d)) = (&mut p.shape, opts.duration)
        && opts.profile == "ramp"
    {
        *over_secs = d.as_secs_f64();
    }
    p.validate().map_err(|e| e.to_string())?;
    Ok(p)
}

/// Busy threads that keep the CPUs saturated until dropped.
struct CpuHogs {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuHogs {
    fn start(n: usize) -> CpuHogs {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for i in 0..10_000u64 {
                            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                        }
                    }
                })
            })
            .collect();
        CpuHogs { stop, threads }
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the submit/collect loop gathered.
#[derive(Default)]
struct Ledger {
    accepted: HashSet<u64>,
    rejected: u64,
    results: HashMap<u64, u32>,
    records: Vec<Record>,
    submitted_per_s: Vec<u64>,
    timeouts: u64,
    total_hist: Option<hdrhistogram::Histogram<u64>>,
    per_behaviour: BTreeMap<Behaviour, u64>,
    load_1m: Vec<f64>,
    /// The strict orphan watch (see `strict`).
    strict: Option<strict::Strict>,
}

impl Ledger {
    fn take(&mut self, ev: Event) {
        match ev {
            Event::Result(r) => {
                if let Some(s) = &self.strict {
                    s.delivered(r.seq);
                }
                *self.results.entry(r.seq).or_insert(0) += 1;
                if r.ending.timed_out() {
                    self.timeouts += 1;
                }
                if let (Some(h), Some(t)) = (self.total_hist.as_mut(), r.stage(Stage::Total)) {
                    let _ = h.record(t.clamp(1, 3_600_000_000));
                }
                self.records.push(r);
            }
            Event::Rejected { seq, reason } => {
                tracing::debug!(seq, "rejected: {reason}");
                self.accepted.remove(&seq);
                self.rejected += 1;
            }
        }
    }

    fn answered(&self) -> usize {
        self.results.len()
    }
}

/// Everything a run set up before its first submit, for the phases after it.
struct Run {
    /// What was done to the PID space (`--canaries`), for the report.
    pid_space: Option<String>,
    /// `KEY=value` every check of this run carries in its environment.
    marker_kv: String,
    /// Busy threads (`--cpu-hogs`), stopped when the run is proven.
    hogs: Option<CpuHogs>,
    me: i32,
    fds_before_build: usize,
    canaries: Option<canary::CanaryPool>,
    burner: Option<canary::PidBurner>,
    rx: crossbeam_channel::Receiver<Event>,
    start: Instant,
    start_boot_us: u64,
    drv: Box<dyn Driver>,
    executor_name: &'static str,
    backend: String,
    exec_pid: i32,
    /// The executor's open fds (but its cgroup leaves) once it is up.
    fds_start: Vec<String>,
}

/// One run: set up, submit by the profile while collecting, prove the
/// invariants with the executor still running, then report.
fn drive(opts: &Opts, profile: &Profile, mix: &Mix, plugin: &Path) -> Result<Summary, String> {
    let mut run = set_up(opts, profile, mix, plugin)?;
    let (mut ledger, seq, submit_end, elapsed) = submit_and_collect(&mut run, profile, mix);
    let proof = prove(opts, mix, run, &mut ledger)?;
    report(opts, profile, mix, ledger, proof, seq, submit_end, elapsed)
}

/// The PID space, the canaries, the marker, CPU hogs and the executor.
fn set_up(opts: &Opts, profile: &Profile, mix: &Mix, plugin: &Path) -> Result<Run, String> {
    let pid_space =
        (opts.canaries).then(|| canary::shrink_pid_space(opts.pid_max, !opts.no_pid_max));
    let needs_pressure = pid_space.as_ref().is_some_and(|p| !p.shrunk);
    let mut pid_space = pid_space.map(|p| p.text);
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let marker = ("PIDRING_STRESS_RUN".to_string(), run_id);
    let marker_kv = format!("{}={}", marker.0, marker.1);
    let policy = Policy {
        timeout: Duration::from_millis(profile.timeout_ms),
        grace: Duration::from_millis(profile.grace_ms),
        max_running: opts.max_running,
        queue_limit: opts.queue_limit,
        realtime_kills: opts.realtime_kills,
        marker,
    };
    let hogs = CpuHogs::start(opts.cpu_hogs);
    let me = std::process::id() as i32;
    let fds_before_build = invariants::fd_count(me).map_err(|e| e.to_string())?;
    let canaries = if opts.canaries {
        Some(canary::CanaryPool::start(
            plugin,
            opts.canary_count,
            20,
            400,
        )?)
    } else {
        None
    };
    // Started before the executor exists, so nobody else can reap it before
    // its pidfd is open.
    let burner = if needs_pressure {
        let rewind = (!opts.no_rewind).then_some((opts.pid_max, canary::RESERVED_PIDS));
        if let Some(text) = &mut pid_space {
            text.push_str("; PID-space pressure instead: a burner creating and reaping children");
            if let Some((top, low)) = rewind {
                text.push_str(&format!(
                    ", rewinding ns_last_pid to {low} when its PIDs reach {top}"
                ));
            }
        }
        Some(canary::PidBurner::start(plugin, rewind)?)
    } else {
        None
    };
    let (tx, rx) = crossbeam_channel::unbounded::<Event>();
    let start = Instant::now();
    let start_boot_us = invariants::boottime_us();
    let (drv, executor_name, backend): (Box<dyn Driver>, &str, String) =
        match (opts.executor, &opts.socket) {
            (ExecutorKind::Tokio, _) => (
                Box::new(compare::TokioDriver::new(policy.clone(), false, tx, start)?),
                "tokio",
                "tokio".into(),
            ),
            (ExecutorKind::Naive, _) => (
                Box::new(compare::TokioDriver::new(policy.clone(), true, tx, start)?),
                "naive",
                "tokio/seed".into(),
            ),
            (ExecutorKind::Pidring, Some(path)) => (
                Box::new(socket::SocketDriver::connect(
                    path,
                    policy.clone(),
                    tx,
                    start,
                )?),
                "pidring-daemon",
                "daemon".into(),
            ),
            (ExecutorKind::Pidring, None) => {
                let d = driver::InProcess::new(opts.backend, policy.clone(), tx, start)?;
                let b = d.backend().to_string();
                (Box::new(d), "pidring", b)
            }
        };
    let exec_pid = drv.executor_pid();
    let fds_start =
        invariants::settled_fds(exec_pid, fd_settle(opts)).map_err(|e| e.to_string())?;
    eprintln!(
        "pidring-stress: {} profile through {executor_name} ({backend}), timeout {}ms grace {}ms, mix of {} repeating every {} checks: {}",
        profile.name,
        profile.timeout_ms,
        profile.grace_ms,
        mix.present().len(),
        mix.total(),
        mix.present()
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Some(p) = &pid_space {
        eprintln!("pidring-stress: canaries: {p}");
    }
    Ok(Run {
        pid_space,
        marker_kv,
        hogs: Some(hogs),
        me,
        fds_before_build,
        canaries,
        burner,
        rx,
        start,
        start_boot_us,
        drv,
        executor_name,
        backend,
        exec_pid,
        fds_start,
    })
}

/// Submit by the profile, collecting results as they come, then wait for
/// every accepted check's answer.
fn submit_and_collect(
    run: &mut Run,
    profile: &Profile,
    mix: &Mix,
) -> (Ledger, u64, Duration, Duration) {
    let Run {
        rx,
        start,
        drv,
        marker_kv,
        ..
    } = run;
    let start = *start;
    let mut ledger = Ledger {
        total_hist: Some(report::histogram()),
        strict: Some(strict::Strict::start(marker_kv.clone())),
        ..Ledger::default()
    };
    let mut progress = progress::Progress::new();
    let mut seq = 0u64;
    let mut last_draw = Instant::now();
    let planned = profile.duration_secs;
    let snapshot = |ledger: &Ledger, drv: &dyn Driver, seq: u64, t: f64| {
        let (running, queued) = drv.load().unwrap_or((0, 0));
        progress::Snapshot {
            elapsed: t,
            total: planned,
            submitted: seq,
            completed: ledger.answered() as u64,
            running,
            queued,
            p99_us: ledger
                .total_hist
                .as_ref()
                .map(|h| h.value_at_quantile(0.99))
                .unwrap_or(0),
            timeouts: ledger.timeouts,
            rejected: ledger.rejected,
        }
    };
    loop {
        let t = start.elapsed().as_secs_f64();
        if profile.finished(t, seq) {
            break;
        }
        let due = profile.target_count(t);
        while seq < due {
            let spec = mix.spec(seq);
            let sec = t as usize;
            if ledger.submitted_per_s.len() <= sec {
                ledger.submitted_per_s.resize(sec + 1, 0);
            }
            ledger.submitted_per_s[sec] += 1;
            *ledger.per_behaviour.entry(spec.behaviour).or_insert(0) += 1;
            ledger.accepted.insert(seq);
            if let Err(e) = drv.submit(&spec) {
                tracing::debug!(seq, "refused: {e}");
                ledger.accepted.remove(&seq);
                ledger.rejected += 1;
            }
            seq += 1;
        }
        while let Ok(ev) = rx.try_recv() {
            ledger.take(ev);
        }
        if ledger.load_1m.len() <= t as usize {
            ledger.load_1m.push(report::load_1m());
        }
        if last_draw.elapsed() >= Duration::from_millis(100) {
            last_draw = Instant::now();
            progress.update(&snapshot(&ledger, drv.as_ref(), seq, t));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let submit_end = start.elapsed();
    // Wait for every accepted check's answer; give up only when nothing arrives for a while.
    let stall =
        Duration::from_millis(profile.timeout_ms + profile.grace_ms) * 3 + Duration::from_secs(30);
    let mut last_progress = Instant::now();
    while ledger.answered() < ledger.accepted.len() {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(ev) => {
                ledger.take(ev);
                last_progress = Instant::now();
            }
            Err(_) if last_progress.elapsed() > stall => break,
            Err(_) => {}
        }
        if last_draw.elapsed() >= Duration::from_millis(100) {
            last_draw = Instant::now();
            let t = start.elapsed().as_secs_f64();
            progress.update(&snapshot(&ledger, drv.as_ref(), seq, t));
        }
    }
    // Late duplicates would show up here.
    std::thread::sleep(Duration::from_millis(200));
    while let Ok(ev) = rx.try_recv() {
        ledger.take(ev);
    }
    progress.finish();
    let elapsed = start.elapsed();
    (ledger, seq, submit_end, elapsed)
}

/// What the invariant phase found, for the report.
struct Proof {
    executor_name: &'static str,
    backend: String,
    verdicts: Vec<Verdict>,
    hists: Vec<(Stage, hdrhistogram::Histogram<u64>)>,
    metrics: Option<pidring::MetricsSnapshot>,
    canary: Option<report::CanaryReport>,
}

/// What the answers alone prove: every behaviour ran, and every accepted
/// check got exactly one result.
fn answers_verdicts(mix: &Mix, ledger: &Ledger) -> Vec<Verdict> {
    let mut verdicts = Vec::new();
    let mut answered_by_behaviour: BTreeMap<Behaviour, u64> = BTreeMap::new();
    let mut unexpected: BTreeMap<&str, u64> = BTreeMap::new();
    for r in &ledger.records {
        let b = mix.pick(r.seq);
        *answered_by_behaviour.entry(b).or_insert(0) += 1;
        let spawned = r.ending != record::Ending::SpawnFailed;
        if spawned && b.expects_timeout(r.seq) != r.ending.timed_out() {
            *unexpected.entry(b.name()).or_insert(0) += 1;
        }
    }
    let absent: Vec<&str> = mix
        .present()
        .into_iter()
        .filter(|b| answered_by_behaviour.get(b).copied().unwrap_or(0) == 0)
        .map(|b| b.name())
        .collect();
    verdicts.push(Verdict::new(
        "every behaviour of the mix exercised",
        absent.is_empty(),
        format!(
            "{} behaviours, submitted {:?}; none answered: {:?}",
            mix.present().len(),
            ledger
                .per_behaviour
                .iter()
                .map(|(b, n)| format!("{}={n}", b.name()))
                .collect::<Vec<_>>(),
            absent
        ),
    ));
    if !unexpected.is_empty() {
        // Not an invariant: under heavy CPU load a short sleeper may time out.
        eprintln!(
            "note: timeouts other than the behaviour intends (load-dependent): {unexpected:?}"
        );
    }
    let (missing, dup, unknown) = invariants::exactly_once(&ledger.accepted, &ledger.results);
    verdicts.push(Verdict::new(
        "exactly one result per submission",
        missing.is_empty() && dup.is_empty() && unknown.is_empty(),
        format!(
            "{} accepted, {} results, {} refused at submit; missing {} {:?}, duplicated {} {:?}, unknown {} {:?}",
            ledger.accepted.len(),
            ledger.records.len(),
            ledger.rejected,
            missing.len(),
            invariants::first(&missing),
            dup.len(),
            invariants::first(&dup),
            unknown.len(),
            invariants::first(&unknown)
        ),
    ));
    verdicts
}

/// How long the executor's fds are sampled, at the start and the end. A
/// daemon closes the socket of a client that just went (CI's `pidring
/// ping`) only at its accept loop's next wake: sampled over longer.
fn fd_settle(opts: &Opts) -> Duration {
    if opts.socket.is_some() {
        invariants::DAEMON_SETTLE
    } else {
        invariants::SETTLE
    }
}

/// The invariants, with the executor still running (it reaps orphans),
/// then the executor's shutdown and what must hold after it.
fn prove(opts: &Opts, mix: &Mix, run: Run, ledger: &mut Ledger) -> Result<Proof, String> {
    let Run {
        mut pid_space,
        marker_kv,
        hogs,
        me,
        fds_before_build,
        canaries,
        burner,
        start_boot_us,
        drv,
        executor_name,
        backend,
        exec_pid,
        fds_start,
        ..
    } = run;
    let mut verdicts = answers_verdicts(mix, ledger);
    let fds_end = invariants::settled_fds(exec_pid, fd_settle(opts)).map_err(|e| e.to_string())?;
    // Stop the PID burner now that the run is over, before the process
    // checks (its pidfd and pipe were open at fds_start too).
    verdicts.extend(stop_burner(burner, &mut pid_space));
    verdicts.push(invariants::check_fd_targets(
        &format!("executor fd count back to start (pid {exec_pid}, executor running)"),
        &fds_start,
        &fds_end,
    ));
    verdicts.push(groups_gone(ledger, start_boot_us, &marker_kv));
    let hists = report::stage_histograms(&ledger.records);
    verdicts.push(kill_lateness_within(&hists, opts.kill_bound));
    verdicts.extend(nothing_alive_after_result(ledger, drv.containment()));
    verdicts.push(no_orphan_left(&marker_kv));
    verdicts.push(invariants::check_zombies(exec_pid, Duration::from_secs(5)));
    let metrics = drv.metrics();
    verdicts.extend(metrics.as_ref().map(|m| counters_agree(m, ledger)));
    // The canary pool is a child of ours but no check: stop it before the
    // executor's shutdown, which (subreaper mode) SIGKILLs every other child.
    let check_pids: HashSet<i32> = ledger.records.iter().filter_map(|r| r.pid).collect();
    let canary = canaries.map(|c| c.finish(&check_pids, pid_space.clone().unwrap_or_default()));
    verdicts.extend(canary.as_ref().map(no_canary_signalled));
    drv.shutdown();
    if opts.socket.is_none() {
        let fds_after = invariants::fd_count(me).map_err(|e| e.to_string())?;
        verdicts.push(invariants::check_fds(
            "process fd count back to start after executor shutdown",
            fds_before_build,
            fds_after,
        ));
    }
    drop(hogs);
    if opts.executor != ExecutorKind::Pidring {
        kill_marked(&marker_kv);
    }
    Ok(Proof {
        executor_name,
        backend,
        verdicts,
        hists,
        metrics,
        canary,
    })
}

/// Stop the PID burner (its pidfd and pipe were open at the start's fd
/// count too) and say whether it exited; its report goes into `pid_space`.
fn stop_burner(
    burner: Option<canary::PidBurner>,
    pid_space: &mut Option<String>,
) -> Option<Verdict> {
    let b = burner?;
    let stopped = b.stop();
    if let (Ok(r), Some(text)) = (&stopped, pid_space) {
        text.push_str(&format!("; {r}"));
    }
    Some(Verdict::new(
        "PID burner stopped and reaped",
        stopped.is_ok(),
        match &stopped {
            Ok(r) => format!(
                "{} children created and reaped by it; it exited",
                r.children
            ),
            Err(e) => e.clone(),
        },
    ))
}

/// Every timed-out check's process group empty (but zombies), within 5 s.
fn groups_gone(ledger: &Ledger, start_boot_us: u64, marker_kv: &str) -> Verdict {
    let leaders: Vec<invariants::GroupLife> = ledger
        .records
        .iter()
        .filter(|r| r.ending.timed_out())
        .filter_map(|r| {
            let pid = r.pid?;
            let end = r.received_us;
            let born = end.saturating_sub(r.stage(Stage::Total)?) + r.stage(Stage::QueueWait)?;
            Some((pid, start_boot_us + born, start_boot_us + end))
        })
        .collect();
    let left = invariants::wait_until_empty(Duration::from_secs(5), || {
        invariants::leftovers_in_groups(&invariants::all_processes(), &leaders)
            .into_iter()
            .filter(|p| p.state != 'Z' && invariants::has_marker(p.pid, marker_kv))
            .collect()
    });
    Verdict::new(
        "every timed-out check's process group gone",
        left.is_empty(),
        format!(
            "{} timed-out groups; {} process(es) left in them {:?}",
            leaders.len(),
            left.len(),
            invariants::first(&left)
                .iter()
                .map(|p| (p.pid, p.pgid))
                .collect::<Vec<_>>()
        ),
    )
}

/// Kill lateness (deadline to first signal) p99 within `bound`.
fn kill_lateness_within(
    hists: &[(Stage, hdrhistogram::Histogram<u64>)],
    bound: Duration,
) -> Verdict {
    let kl = hists
        .iter()
        .find(|(s, _)| *s == Stage::KillLateness)
        .map(|(_, h)| StageRow::from_histogram("kill_lateness", h))
        .unwrap_or_default();
    Verdict::new(
        "kill lateness p99 within bound",
        kl.latency.count == 0 || Duration::from_micros(kl.latency.p99_us) <= bound,
        format!(
            "p99 {} (max {}, {} timeouts) <= bound {}",
            pidring::metrics::fmt_us(kl.latency.p99_us),
            pidring::metrics::fmt_us(kl.latency.max_us),
            kl.latency.count,
            pidring::metrics::fmt_us(bound.as_micros() as u64)
        ),
    )
}

/// With a cgroup per check: nothing of a check alive once its result was
/// delivered, watched all through the run (`strict`). Without one, only
/// that escapees end is checked (`no_orphan_left`), and this says so.
fn nothing_alive_after_result(ledger: &mut Ledger, contained: Option<String>) -> Option<Verdict> {
    let (scans, strict_found) = ledger
        .strict
        .take()
        .map(strict::Strict::finish)
        .unwrap_or_default();
    if contained.as_deref() == Some("cgroup") {
        return Some(Verdict::new(
            "no process of a check alive once its result is delivered (cgroup per check)",
            strict_found.is_empty(),
            format!(
                "{} scan(s) of /proc during the run; {} process(es) alive after their check's result: {:?} (pid, check)",
                scans,
                strict_found.len(),
                &strict_found[..strict_found.len().min(8)]
            ),
        ));
    }
    eprintln!(
        "pidring-stress: containment {}: the strict orphan invariant is not checked, only that escapees end",
        contained
            .as_deref()
            .unwrap_or("unknown (not reported through this driver)")
    );
    None
}

/// Escaped grandchildren live at most `LONGEST_LIFE_MS` after their check:
/// none of this run's marked processes alive past that (and 5 s).
fn no_orphan_left(marker_kv: &str) -> Verdict {
    let orphan_bound = Duration::from_millis(LONGEST_LIFE_MS + 5_000);
    let orphans = invariants::wait_until_empty(orphan_bound, || {
        invariants::marked_processes(&invariants::all_processes(), marker_kv)
    });
    Verdict::new(
        "no escaped orphan left running",
        orphans.is_empty(),
        format!(
            "{} process(es) of this run's checks alive {}s after the end: {:?}",
            orphans.len(),
            orphan_bound.as_secs(),
            invariants::first(&orphans)
                .iter()
                .map(|p| p.pid)
                .collect::<Vec<_>>()
        ),
    )
}

/// The engine counted as many submitted and completed checks as the harness.
fn counters_agree(m: &pidring::MetricsSnapshot, ledger: &Ledger) -> Verdict {
    let c = m.counters;
    Verdict::new(
        "engine counters agree with the harness",
        c.submitted == ledger.accepted.len() as u64 && c.completed == ledger.records.len() as u64,
        format!(
            "engine: {} submitted, {} completed, {} rejected, {} orphans reaped",
            c.submitted, c.completed, c.rejected, c.orphans_reaped
        ),
    )
}

/// No canary (a process on a recycled PID) got a signal.
fn no_canary_signalled(c: &report::CanaryReport) -> Verdict {
    Verdict::new(
        "no canary signalled",
        c.hits() == 0,
        format!(
            "{} canaries ({} on a PID a check of this run had), {} signals received, {} killed",
            c.canaries, c.on_recycled_check_pid, c.signals, c.killed
        ),
    )
}

/// The summary: printed, and written out with `--out`.
#[allow(clippy::too_many_arguments)]
fn report(
    opts: &Opts,
    profile: &Profile,
    mix: &Mix,
    ledger: Ledger,
    proof: Proof,
    seq: u64,
    submit_end: Duration,
    elapsed: Duration,
) -> Result<Summary, String> {
    let Proof {
        executor_name,
        backend,
        verdicts,
        hists,
        metrics,
        canary,
    } = proof;
    let stages: Vec<StageRow> = hists
        .iter()
        .map(|(s, h)| StageRow::from_histogram(s.as_str(), h))
        .collect();
    let mut outcomes = BTreeMap::new();
    let mut behaviours: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for r in &ledger.records {
        *outcomes.entry(r.ending.label()).or_insert(0) += 1;
        let b = mix.pick(r.seq);
        *behaviours
            .entry(b.name().to_string())
            .or_default()
            .entry(r.ending.label())
            .or_insert(0) += 1;
    }
    let cut = ledger.records.iter().filter(|r| r.output_cut).count();
    let truncated = ledger.records.iter().filter(|r| r.truncated).count();
    *outcomes
        .entry("(output cut at drain bound)".into())
        .or_insert(0) += cut as u64;
    *outcomes
        .entry("(stdout truncated at cap)".into())
        .or_insert(0) += truncated as u64;
    let ok = verdicts.iter().all(|v| v.ok);
    let summary = Summary {
        executor: executor_name.to_string(),
        backend,
        profile: profile.name.clone(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        host: report::Host::detect(),
        elapsed_s: elapsed.as_secs_f64(),
        submitted: seq,
        rejected: ledger.rejected,
        results: ledger.records.len() as u64,
        peak_rate_per_s: ledger.submitted_per_s.iter().copied().max().unwrap_or(0),
        kill_lateness_under_spike: kill_lateness_under_spike(&ledger.records, profile),
        stages,
        outcomes,
        behaviours,
        canary,
        engine_counters: metrics.map(|m| serde_json::to_value(m.counters).unwrap_or_default()),
        invariants: verdicts,
        load_1m_mean: ledger.load_1m.iter().sum::<f64>() / ledger.load_1m.len().max(1) as f64,
        load_1m_max: ledger.load_1m.iter().copied().fold(0.0, f64::max),
        timeline: report::timeline(
            &ledger.records,
            &ledger.submitted_per_s,
            (submit_end.as_secs() / 150).max(1),
        ),
        spike_windows: profile.spike_windows(submit_end.as_secs_f64()),
        ok,
    };
    print_summary(&summary, submit_end, mix);
    if let Some(dir) = &opts.out {
        report::write_out(dir, &summary, &hists)?;
        println!(
            "wrote {}/{{summary.json,latency.svg,<stage>.hgrm}}",
            dir.display()
        );
    }
    Ok(summary)
}

/// Kill-lateness percentiles of checks whose deadline fell inside a spike or within 2 s after.
fn kill_lateness_under_spike(records: &[Record], profile: &Profile) -> Option<StageRow> {
    if !matches!(profile.shape, Shape::Spike { .. }) {
        return None;
    }
    let mut h = report::histogram();
    for r in records {
        let (Some(k), Some(total)) = (r.stage(Stage::KillLateness), r.stage(Stage::Total)) else {
            continue;
        };
        let submitted_us = r.received_us.saturating_sub(total);
        let deadline_us = submitted_us
            + r.stage(Stage::QueueWait).unwrap_or(0)
            + r.stage(Stage::Spawn).unwrap_or(0)
            + profile.timeout_ms * 1000;
        let d = deadline_us as f64 / 1e6;
        if profile.in_spike(d) || profile.in_spike(d - 1.0) || profile.in_spike(d - 2.0) {
            let _ = h.record(k.clamp(1, 3_600_000_000));
        }
    }
    Some(StageRow::from_histogram("kill_lateness_under_spike", &h))
}

fn print_summary(s: &Summary, submit_end: Duration, mix: &Mix) {
    println!();
    println!(
        "== pidring-stress: {} through {} ({}) on {}",
        s.profile,
        s.executor,
        s.backend,
        s.host.line()
    );
    println!(
        "machine load (1-min average) during the run: mean {:.1}, max {:.1}",
        s.load_1m_mean, s.load_1m_max
    );
    println!(
        "{} submitted in {:.1}s (peak {}/s), {} refused, {} results, all answered after {:.1}s",
        s.submitted,
        submit_end.as_secs_f64(),
        s.peak_rate_per_s,
        s.rejected,
        s.results,
        s.elapsed_s
    );
    println!();
    print!("{}", report::render_table(&s.stages));
    if let Some(k) = &s.kill_lateness_under_spike {
        println!(
            "kill lateness under spike: {} timeouts, p50 {} p99 {} max {}",
            k.latency.count,
            pidring::metrics::fmt_us(k.latency.p50_us),
            pidring::metrics::fmt_us(k.latency.p99_us),
            pidring::metrics::fmt_us(k.latency.max_us)
        );
    }
    println!();
    println!("outcomes:");
    for (k, v) in &s.outcomes {
        println!("  {k:<30} {v}");
    }
    println!("by behaviour:");
    for b in Behaviour::ALL {
        if let Some(m) = s.behaviours.get(b.name()) {
            let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("  {:<24} {}", b.name(), parts.join(", "));
        } else if mix.present().contains(&b) {
            println!("  {:<24} (no result)", b.name());
        }
    }
    if let Some(c) = &s.canary {
        println!("canaries: {}", c.pid_space);
    }
    println!();
    for v in &s.invariants {
        println!("{}", v.line());
    }
    println!(
        "{}",
        if s.ok {
            "ALL INVARIANTS HOLD"
        } else {
            "INVARIANTS FAILED"
        }
    );
}

/// Re-run this command through the tokio executor (and, with --canaries, the
/// seed-style naive one) and print the runs side by side.
fn compare_run(opts: &Opts, ours: &Summary) -> Result<(), String> {
    let mut kinds = vec![("tokio", "tokio::process")];
    if opts.canaries {
        kinds.push(("naive", "naive (seed)"));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut runs: Vec<(&str, Summary)> = vec![("pidring", ours.clone())];
    for (kind, label) in kinds {
        let dir = match &opts.out {
            Some(d) => d.join(format!("compare-{kind}")),
            None => std::env::temp_dir().join(format!(
                "pidring-stress-compare-{kind}-{}",
                std::process::id()
            )),
        };
        let args: Vec<std::ffi::OsString> = std::env::args_os()
            .skip(1)
            .filter(|a| a != "--compare")
            .collect();
        println!("\n== the same load through {label} ==");
        let mut child = std::process::Command::new(&exe)
            .args(args)
            .args(["--executor", kind, "--out"])
            .arg(&dir)
            .spawn()
            .map_err(|e| format!("cannot run the comparison: {e}"))?;
        // Orphans of the comparison run are re-parented to us (a subreaper,
        // or PID 1 in the canary namespace) and our executor is gone: reap
        // them meanwhile, or they pin PIDs and exhaust a small PID space.
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => return Err(format!("comparison run: {e}")),
            }
            reap_stray_children_except(child.id() as i32);
            std::thread::sleep(Duration::from_millis(50));
        };
        let text = std::fs::read_to_string(dir.join("summary.json"))
            .map_err(|e| format!("comparison run ({status}) wrote no summary: {e}"))?;
        let theirs: Summary = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        runs.push((label, theirs));
    }
    println!("\n== side by side ==");
    let mut head = format!("{:<30}", "");
    for (label, _) in &runs {
        head.push_str(&format!(" {label:>16}"));
    }
    println!("{head}");
    let row = |name: &str, f: &dyn Fn(&Summary) -> String| {
        let mut line = format!("{name:<30}");
        for (_, s) in &runs {
            line.push_str(&format!(" {:>16}", f(s)));
        }
        println!("{line}");
    };
    row("backend", &|s| s.backend.chars().take(16).collect());
    row("results", &|s| s.results.to_string());
    for (i, stage) in ours.stages.iter().enumerate() {
        row(&format!("{} p99", stage.stage), &|s| {
            s.stages
                .get(i)
                .map(|r| pidring::metrics::fmt_us(r.latency.p99_us))
                .unwrap_or_default()
        });
    }
    for k in [
        "timed_out(TERM)",
        "timed_out(KILL)",
        "(output cut at drain bound)",
    ] {
        row(k, &|s| s.outcomes.get(k).copied().unwrap_or(0).to_string());
    }
    if ours.canary.is_some() {
        row("canary hits", &|s| {
            s.canary
                .as_ref()
                .map(|c| c.hits().to_string())
                .unwrap_or_default()
        });
    }
    row("invariants", &|s| {
        if s.ok { "all hold" } else { "FAILED" }.to_string()
    });
    for (label, s) in &runs[1..] {
        let failed: Vec<String> = s
            .invariants
            .iter()
            .filter(|v| !v.ok)
            .map(|v| v.line())
            .collect();
        if !failed.is_empty() {
            println!("{label} failed:");
            for f in failed {
                println!("  {f}");
            }
        }
    }
    Ok(())
}

/// SIGKILL the processes a comparison run left behind, through pidfds (and
/// only after re-reading the marker through the pidfd's process).
fn kill_marked(marker: &str) {
    for p in invariants::marked_processes(&invariants::all_processes(), marker) {
        let Some(pid) = rustix::process::Pid::from_raw(p.pid) else {
            continue;
        };
        if let Ok(fd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            && invariants::has_marker(p.pid, marker)
        {
            let _ = rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::KILL);
        }
    }
}

/// Reap our zombie children other than `keep` (by pid, so `keep`'s status stays ours).
fn reap_stray_children_except(keep: i32) {
    let me = std::process::id() as i32;
    for pid in invariants::zombie_children(&invariants::all_processes(), me) {
        if pid == keep {
            continue;
        }
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG);
        }
    }
}

/// Reap exited children nobody else will (we are a subreaper after an in-process run).
fn reap_stray_children() {
    while let Ok(Some(_)) = rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG) {}
}
