//! External worker connections to a Nagios 4 core: register on the core's
//! query-handler socket, run every job it sends through the shared
//! [`Executor`], answer in the core's format, reconnect when the core restarts.
//!
//! Each connection has two threads: a reader that decodes jobs and submits
//! them, and a writer that sends answers as soon as the executor delivers
//! them (the executor's callback only puts the result on a channel).

use super::codec::{self, Decoder, Message};
use super::config::NagiosWorkerConfig;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use pidring::executor::{CheckId, Executor};
use pidring::result::{CheckResult, Outcome, signal_name};
use pidring::{Check, State, SubmitError};
use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The errno the core reads as "the program timed out" (`ETIME`).
pub const ERROR_TIMED_OUT: i32 = libc::ETIME;
/// Timeout used when a job carries none (or 0): the core's default check timeout.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// Time between SIGTERM and SIGKILL for a job past its timeout.
pub const KILL_GRACE: Duration = Duration::from_secs(1);
/// How long a clean stop waits for cancelled jobs to be answered.
pub const STOP_DRAIN: Duration = Duration::from_secs(10);

const READ_POLL: Duration = Duration::from_millis(200);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why the workers could not start.
#[derive(Debug, thiserror::Error)]
pub enum NagiosError {
    /// The configuration cannot work.
    #[error("invalid nagios worker config: {0}")]
    Config(String),
    /// A connection thread could not be started.
    #[error("cannot start a nagios worker thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Why one registration attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The socket could not be reached.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the registration failed.
    #[error("registration i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The core answered something other than `OK`.
    #[error("the core refused the registration: {0:?}")]
    Refused(String),
}

/// Counters over all connections, readable while they run.
#[derive(Debug, Default)]
pub struct WorkerStats {
    registrations: AtomicU64,
    connected: AtomicUsize,
    jobs: AtomicU64,
    answers: AtomicU64,
    refused: AtomicU64,
}

/// A copy of [`WorkerStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkerStatsSnapshot {
    /// Successful registrations (first connects and reconnects).
    pub registrations: u64,
    /// Connections registered right now.
    pub connected: usize,
    /// Jobs received from the core.
    pub jobs: u64,
    /// Answers written to the core.
    pub answers: u64,
    /// Jobs answered with an error without running (bad command, queue full).
    pub refused: u64,
}

impl WorkerStats {
    fn snapshot(&self) -> WorkerStatsSnapshot {
        WorkerStatsSnapshot {
            registrations: self.registrations.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
            jobs: self.jobs.load(Ordering::Relaxed),
            answers: self.answers.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// Running worker connections; [`NagiosWorkers::stop`] (or drop) ends them.
#[derive(Debug)]
pub struct NagiosWorkers {
    conns: Vec<RunningConn>,
    stats: Arc<WorkerStats>,
    /// What new connections are started with (see `reconfigure`).
    exec: Arc<Executor>,
    dist: Option<Arc<super::distribute::Distribute>>,
    policy: Arc<pidring::policy::SharedPolicy>,
    /// The settings in force.
    config: NagiosWorkerConfig,
}

/// One connection's thread, and how to stop it alone.
#[derive(Debug)]
struct RunningConn {
    spec: ConnSpec,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl RunningConn {
    fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("a nagios worker connection thread panicked");
        }
    }
}

impl NagiosWorkers {
    /// Counters over all connections.
    pub fn stats(&self) -> WorkerStatsSnapshot {
        self.stats.snapshot()
    }

    /// Stop reading jobs, kill and reap the jobs in flight, answer them while
    /// the connection is up, close every connection and join the threads.
    /// Returns the final counters.
    pub fn stop(mut self) -> WorkerStatsSnapshot {
        self.stop_and_join();
        self.stats.snapshot()
    }

    fn stop_and_join(&mut self) {
        for c in &self.conns {
            c.stop.store(true, Ordering::SeqCst);
        }
        for c in self.conns.drain(..) {
            c.join();
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &NagiosWorkerConfig {
        &self.config
    }

    /// Start a connection's thread.
    fn start(&mut self, spec: ConnSpec) -> Result<(), NagiosError> {
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = ConnCtx {
            spec: spec.clone(),
            exec: self.exec.clone(),
            dist: self.dist.clone(),
            policy: self.policy.clone(),
            stop: stop.clone(),
            stats: self.stats.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("pidring-nagios".into())
            .spawn(move || ctx.run())
            .map_err(NagiosError::Thread)?;
        self.conns.push(RunningConn { spec, stop, thread });
        Ok(())
    }

    /// Change to `config` (a reload): connections it no longer asks for are
    /// stopped as on [`stop`](Self::stop) (their jobs in flight killed,
    /// reaped and answered), new ones started; the others, and their jobs,
    /// are untouched. The `gearman*` keys change only with a restart: they
    /// keep their values. Returns what changed, for the log.
    pub fn reconfigure(&mut self, config: &NagiosWorkerConfig) -> Result<String, NagiosError> {
        config.validate().map_err(NagiosError::Config)?;
        let mut config = config.clone();
        let mut kept = String::new();
        let gearman_keys = |c: &NagiosWorkerConfig| {
            (
                c.gearman.clone(),
                c.gearman_key.clone(),
                c.gearman_keyfile.clone(),
                c.gearman_hostgroups.clone(),
                c.gearman_servicegroups.clone(),
                c.objects_cache.clone(),
            )
        };
        if gearman_keys(&config) != gearman_keys(&self.config) {
            kept = " (its gearman keys wait for a restart)".into();
            config.gearman = self.config.gearman.clone();
            config.gearman_key = self.config.gearman_key.clone();
            config.gearman_keyfile = self.config.gearman_keyfile.clone();
            config.gearman_hostgroups = self.config.gearman_hostgroups.clone();
            config.gearman_servicegroups = self.config.gearman_servicegroups.clone();
            config.objects_cache = self.config.objects_cache.clone();
        }
        let wanted = conn_specs(&config);
        let (gone, stay): (Vec<_>, Vec<_>) = std::mem::take(&mut self.conns)
            .into_iter()
            .partition(|c| !wanted.contains(&c.spec));
        self.conns = stay;
        for c in &gone {
            c.stop.store(true, Ordering::SeqCst);
        }
        let removed: Vec<String> = gone.iter().map(|c| c.spec.label.clone()).collect();
        for c in gone {
            c.join();
        }
        let mut added = Vec::new();
        for spec in wanted {
            if !self.conns.iter().any(|c| c.spec == spec) {
                added.push(spec.label.clone());
                self.start(spec)?;
            }
        }
        self.config = config;
        Ok(format!(
            "[nagios] connections added {added:?}, removed {removed:?}{kept}"
        ))
    }
}

impl Drop for NagiosWorkers {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// One connection to open: what to register as.
#[derive(Debug, Clone, PartialEq)]
struct ConnSpec {
    /// For logs.
    label: String,
    /// The `@wproc register ...` request, NUL included.
    request: Vec<u8>,
    socket: PathBuf,
}

/// The registration request for one connection. Never carries `pid=`: the
/// core would SIGKILL that pid when the connection closes.
pub fn register_request(name: &str, max_jobs: usize, plugin: Option<&str>) -> Vec<u8> {
    let mut s = format!("@wproc register name={name};max_jobs={max_jobs}");
    if let Some(p) = plugin {
        s.push_str(";plugin=");
        s.push_str(p);
    }
    let mut v = s.into_bytes();
    v.retain(|&b| b != 0);
    v.push(0);
    v
}

/// Start one connection per plugin plus the general connections, each on
/// its own threads; they connect (and keep reconnecting) in the background.
pub fn spawn_workers(
    config: &NagiosWorkerConfig,
    exec: Arc<Executor>,
) -> Result<NagiosWorkers, NagiosError> {
    spawn_workers_with_policy(config, exec, Default::default())
}

/// [`spawn_workers`], each job put through `policy` (who it runs as, what
/// may run) before it is submitted; a refused job is answered as an
/// UNKNOWN check saying why. (Jobs sent on to gearmand are not: they run
/// elsewhere, under that worker's policy.)
pub fn spawn_workers_with_policy(
    config: &NagiosWorkerConfig,
    exec: Arc<Executor>,
    policy: Arc<pidring::policy::SharedPolicy>,
) -> Result<NagiosWorkers, NagiosError> {
    config.validate().map_err(NagiosError::Config)?;
    let dist = match &config.gearman {
        Some(server) => {
            let crypt = config.gearman_crypt().map_err(NagiosError::Config)?;
            Some(Arc::new(
                super::distribute::Distribute::start(server, crypt)
                    .map_err(NagiosError::Thread)?
                    .route_by(super::routing::Routing::new(
                        config.gearman_hostgroups.clone(),
                        config.gearman_servicegroups.clone(),
                        config.objects_cache.clone(),
                    )),
            ))
        }
        None => None,
    };
    let mut workers = NagiosWorkers {
        conns: Vec::new(),
        stats: Arc::new(WorkerStats::default()),
        exec,
        dist,
        policy,
        config: config.clone(),
    };
    for spec in conn_specs(config) {
        workers.start(spec)?; // `workers` drops: started threads stop
    }
    Ok(workers)
}

/// The connections `config` asks for: one per plugin, then the general ones.
fn conn_specs(config: &NagiosWorkerConfig) -> Vec<ConnSpec> {
    let mut specs = Vec::new();
    for plugin in &config.plugins {
        let name = format!("{} {}", config.name, plugin);
        specs.push(ConnSpec {
            label: format!("plugin {plugin}"),
            request: register_request(&name, config.max_jobs, Some(plugin)),
            socket: config.qh_socket.clone(),
        });
    }
    for i in 0..config.general_connections() {
        let name = format!("{} {}", config.name, i + 1);
        specs.push(ConnSpec {
            label: format!("general #{}", i + 1),
            request: register_request(&name, config.max_jobs, None),
            socket: config.qh_socket.clone(),
        });
    }
    specs
}

/// Connect to the socket, register, and read the core's `OK`. Returns the
/// stream and whatever the core sent after the `OK` (jobs may follow at once).
pub fn register(socket: &Path, request: &[u8]) -> Result<(UnixStream, Vec<u8>), RegisterError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| RegisterError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    stream.set_write_timeout(Some(REGISTER_TIMEOUT))?;
    stream.set_read_timeout(Some(REGISTER_TIMEOUT))?;
    stream.write_all(request)?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + REGISTER_TIMEOUT;
    loop {
        if let Some(nul) = got.iter().position(|&b| b == 0) {
            let answer = String::from_utf8_lossy(&got[..nul]).into_owned();
            if answer != "OK" {
                return Err(RegisterError::Refused(answer));
            }
            return Ok((stream, got[nul + 1..].to_vec()));
        }
        if Instant::now() >= end || got.len() > 64 * 1024 {
            return Err(RegisterError::Refused(
                String::from_utf8_lossy(&got).into_owned(),
            ));
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                return Err(RegisterError::Refused(format!(
                    "connection closed after {:?}",
                    String::from_utf8_lossy(&got)
                )));
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

struct ConnCtx {
    spec: ConnSpec,
    exec: Arc<Executor>,
    /// Jobs go to gearmand instead of `exec` (`--gearman`).
    dist: Option<Arc<super::distribute::Distribute>>,
    /// Who jobs run as, what may run.
    policy: Arc<pidring::policy::SharedPolicy>,
    stop: Arc<AtomicBool>,
    stats: Arc<WorkerStats>,
}

/// What a job gets back: the executor's result, or an error found before it ran.
enum Answer {
    Done {
        echo: Vec<(String, String)>,
        result: Box<CheckResult>,
    },
    Refused {
        echo: Vec<(String, String)>,
        code: i32,
        message: String,
        at_us: u64,
    },
    /// Refused by the policy: answered as a check that ran and said UNKNOWN
    /// with this text, so the service shows why.
    Forbidden {
        echo: Vec<(String, String)>,
        message: String,
        at_us: u64,
    },
    /// A `log=` message: the core writes it to nagios.log.
    Log(String),
}

impl ConnCtx {
    fn run(self) {
        let mut backoff = BACKOFF_FIRST;
        let mut failures = 0u32;
        while !self.stop.load(Ordering::SeqCst) {
            match register(&self.spec.socket, &self.spec.request) {
                Ok((stream, leftover)) => {
                    failures = 0;
                    backoff = BACKOFF_FIRST;
                    self.stats.registrations.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(conn = %self.spec.label, socket = %self.spec.socket.display(), "registered with the nagios core");
                    self.stats.connected.fetch_add(1, Ordering::Relaxed);
                    let end = self.serve(stream, leftover);
                    self.stats.connected.fetch_sub(1, Ordering::Relaxed);
                    match end {
                        SessionEnd::Stopped => return,
                        SessionEnd::Closed => {
                            tracing::info!(conn = %self.spec.label, "the core closed the connection (restart or shutdown); reconnecting")
                        }
                        SessionEnd::Broken(why) => {
                            tracing::warn!(conn = %self.spec.label, "connection to the core broke: {why}; reconnecting")
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    // The socket is absent for a moment during every restart: quiet at first.
                    if failures <= 3 {
                        tracing::debug!(conn = %self.spec.label, "cannot register yet: {e}");
                    } else {
                        tracing::warn!(conn = %self.spec.label, retry_in = ?backoff, "cannot register with the nagios core: {e}");
                    }
                }
            }
            self.sleep_unless_stopped(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn sleep_unless_stopped(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= end {
                return;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }

    fn serve(&self, stream: UnixStream, leftover: Vec<u8>) -> SessionEnd {
        let writer_stream = match stream
            .try_clone()
            .and_then(|s| s.set_write_timeout(Some(WRITE_TIMEOUT)).map(|_| s))
            .and_then(|s| stream.set_read_timeout(Some(READ_POLL)).map(|_| s))
        {
            Ok(s) => s,
            Err(e) => return SessionEnd::Broken(format!("socket setup: {e}")),
        };
        let (tx, rx) = crossbeam_channel::unbounded::<Answer>();
        let inflight: Arc<Mutex<HashSet<CheckId>>> = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let writer = {
            let (inflight, alive, stats) = (inflight.clone(), alive.clone(), self.stats.clone());
            let label = self.spec.label.clone();
            std::thread::Builder::new()
                .name("pidring-nagios-w".into())
                .spawn(move || write_loop(writer_stream, rx, inflight, alive, stats, &label))
        };
        let writer = match writer {
            Ok(w) => w,
            Err(e) => return SessionEnd::Broken(format!("cannot start writer thread: {e}")),
        };
        let session = Session {
            tx,
            inflight,
            alive,
        };
        let _ = session.tx.send(Answer::Log(format!(
            "pidring worker connected ({}); checks run through pidring",
            self.spec.label
        )));
        let end = self.read_loop(&stream, leftover, &session);
        if matches!(end, SessionEnd::Stopped) {
            self.drain(&session);
        }
        session.alive.store(false, Ordering::SeqCst);
        let _ = stream.shutdown(std::net::Shutdown::Both);
        let inflight = session.inflight.clone();
        drop(session);
        let rx = match writer.join() {
            Ok(rx) => Some(rx),
            Err(_) => {
                tracing::error!("nagios writer thread panicked");
                None
            }
        };
        // The core is gone (closed, broken, or we stopped and could not wait
        // any longer): no one will read these jobs' answers, so none may run
        // on. Kill and reap them now, as Nagios' own workers do when their
        // master goes away, before the next registration adds a new set.
        // (A stop has cancelled them in `drain` already: not twice.)
        let why = match &end {
            SessionEnd::Stopped => None,
            SessionEnd::Closed => Some("the core closed the connection"),
            SessionEnd::Broken(_) => Some("the connection to the core broke"),
        };
        if let Some(why) = why {
            self.abandon(why, &inflight, rx.as_ref());
        }
        end
    }

    /// Cancel every job of a connection that has ended and wait (bounded)
    /// until each has been reaped: its result comes through `rx` (the
    /// session's channel, which the writer no longer reads) and is dropped.
    fn abandon(
        &self,
        why: &str,
        inflight: &Mutex<HashSet<CheckId>>,
        rx: Option<&Receiver<Answer>>,
    ) {
        let ids: Vec<CheckId> = lock(inflight).iter().copied().collect();
        if ids.is_empty() {
            return;
        }
        tracing::warn!(
            conn = %self.spec.label,
            jobs = ids.len(),
            "{why} with jobs in flight: killing them (their results have no one to go to)"
        );
        for &id in &ids {
            self.cancel(id);
        }
        let Some(rx) = rx else { return };
        let end = Instant::now() + STOP_DRAIN;
        while !lock(inflight).is_empty() {
            let now = Instant::now();
            if now >= end {
                tracing::warn!(
                    conn = %self.spec.label,
                    jobs = lock(inflight).len(),
                    "killed jobs of a closed connection were not reaped in time; reconnecting anyway"
                );
                return;
            }
            match rx.recv_timeout(end - now) {
                Ok(Answer::Done { result, .. }) => {
                    lock(inflight).remove(&result.id);
                }
                Ok(_) => {}
                // Every sender gone: every job has delivered its result.
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        tracing::info!(conn = %self.spec.label, jobs = ids.len(), "the closed connection's jobs are killed and reaped");
    }

    fn read_loop(&self, mut stream: &UnixStream, leftover: Vec<u8>, s: &Session) -> SessionEnd {
        let mut decoder = Decoder::new();
        decoder.feed(&leftover);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            loop {
                match decoder.next_message() {
                    Ok(Some(msg)) => self.start_job(msg, s),
                    Ok(None) => break,
                    Err(e) => return SessionEnd::Broken(e.to_string()),
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                return SessionEnd::Stopped;
            }
            if !s.alive.load(Ordering::SeqCst) {
                return SessionEnd::Broken("writing an answer failed".into());
            }
            match stream.read(&mut buf) {
                Ok(0) => return SessionEnd::Closed,
                Ok(n) => decoder.feed(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return SessionEnd::Broken(format!("read: {e}")),
            }
        }
    }

    /// Kill the jobs still in flight and give the writer time to answer them.
    fn drain(&self, s: &Session) {
        let ids: Vec<CheckId> = lock(&s.inflight).iter().copied().collect();
        if !ids.is_empty() {
            tracing::info!(conn = %self.spec.label, jobs = ids.len(), "stopping: killing jobs in flight");
        }
        for id in ids {
            self.cancel(id);
        }
        let end = Instant::now() + STOP_DRAIN;
        while !lock(&s.inflight).is_empty() && s.alive.load(Ordering::SeqCst) {
            if Instant::now() >= end {
                tracing::warn!(conn = %self.spec.label, "stopping: some cancelled jobs were not answered in time");
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn start_job(&self, msg: Message, s: &Session) {
        self.stats.jobs.fetch_add(1, Ordering::Relaxed);
        if msg.get("job_id").is_none() {
            tracing::warn!(conn = %self.spec.label, "message from the core without job_id ignored: {:?}", msg.pairs);
            return;
        }
        let check = match job_check(&msg) {
            Ok(c) => c,
            Err((code, message)) => return self.refuse(s, &msg, code, message),
        };
        let echo = echo_pairs(&msg);
        let tx = s.tx.clone();
        let mut inflight = lock(&s.inflight);
        if let Some(dist) = &self.dist {
            let job = crate::gearman::Job {
                kind: if msg.get("service_description").is_some() {
                    "service"
                } else {
                    "host"
                }
                .into(),
                // The core's worker jobs may not name their host: the
                // job id then does (results are matched on it, and the
                // mod_gearman result format needs a host).
                host_name: msg
                    .get("host_name")
                    .filter(|h| !h.is_empty())
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("job-{}", msg.get("job_id").unwrap_or_default())),
                service_description: msg
                    .get("service_description")
                    .unwrap_or_default()
                    .to_string(),
                timeout: check.get_timeout().as_secs().max(1),
                command_line: msg.get("command").unwrap_or_default().to_string(),
                ..crate::gearman::Job::default()
            };
            let id = dist.submit(
                job,
                check.get_timeout(),
                Box::new(move |result| {
                    let _ = tx.send(Answer::Done {
                        echo,
                        result: Box::new(result),
                    });
                }),
            );
            inflight.insert(id);
            return;
        }
        let check = match self.policy.get().apply(check, None) {
            Ok(c) => c,
            Err(f) => {
                drop(inflight);
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(conn = %self.spec.label, job = ?msg.get("job_id"), "job refused: {f}");
                let _ = s.tx.send(Answer::Forbidden {
                    echo,
                    message: format!("UNKNOWN: pidring: forbidden: {f}\n"),
                    at_us: pidring::result::unix_us(std::time::SystemTime::now()),
                });
                return;
            }
        };
        let submitted = self.exec.submit_with(check, move |result| {
            let _ = tx.send(Answer::Done {
                echo,
                result: Box::new(result),
            });
        });
        match submitted {
            Ok(id) => {
                inflight.insert(id);
            }
            Err(e) => {
                drop(inflight);
                let code = match e {
                    SubmitError::QueueFull { .. } => libc::EAGAIN,
                    SubmitError::ShuttingDown => libc::ESHUTDOWN,
                    SubmitError::Invalid(_) => libc::EINVAL,
                };
                self.refuse(s, &msg, code, format!("pidring: {e}"));
            }
        }
    }

    /// Kill a job in flight: the executor's check, or the job waiting on gearmand.
    fn cancel(&self, id: CheckId) {
        match &self.dist {
            Some(d) => d.cancel(id),
            None => self.exec.cancel(id),
        }
    }

    fn refuse(&self, s: &Session, msg: &Message, code: i32, message: String) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(conn = %self.spec.label, job = ?msg.get("job_id"), "job refused: {message}");
        let _ = s.tx.send(Answer::Refused {
            echo: echo_pairs(msg),
            code,
            message,
            at_us: pidring::result::unix_us(std::time::SystemTime::now()),
        });
    }
}

struct Session {
    tx: Sender<Answer>,
    inflight: Arc<Mutex<HashSet<CheckId>>>,
    alive: Arc<AtomicBool>,
}

enum SessionEnd {
    Stopped,
    Closed,
    Broken(String),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_loop(
    mut stream: UnixStream,
    rx: Receiver<Answer>,
    inflight: Arc<Mutex<HashSet<CheckId>>>,
    alive: Arc<AtomicBool>,
    stats: Arc<WorkerStats>,
    label: &str,
) -> Receiver<Answer> {
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout) => {
                if alive.load(Ordering::SeqCst) {
                    continue;
                }
                return rx;
            }
            Err(RecvTimeoutError::Disconnected) => return rx,
        };
        buf.clear();
        let mut answers = 0u64;
        // Batch what is already there into one write.
        for answer in std::iter::once(first).chain(rx.try_iter().take(255)) {
            match answer {
                Answer::Done { echo, result } => {
                    lock(&inflight).remove(&result.id);
                    codec::encode_into(response_pairs(&echo, &result), &mut buf);
                    answers += 1;
                }
                Answer::Log(text) => codec::encode_into([("log", text)], &mut buf),
                Answer::Refused {
                    echo,
                    code,
                    message,
                    at_us,
                } => {
                    codec::encode_into(refusal_pairs(&echo, code, &message, at_us), &mut buf);
                    answers += 1;
                }
                Answer::Forbidden {
                    echo,
                    message,
                    at_us,
                } => {
                    codec::encode_into(forbidden_pairs(&echo, &message, at_us), &mut buf);
                    answers += 1;
                }
            }
        }
        if let Err(e) = stream.write_all(&buf) {
            tracing::warn!(conn = %label, "cannot write answers to the core: {e}");
            alive.store(false, Ordering::SeqCst);
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return rx;
        }
        stats.answers.fetch_add(answers, Ordering::Relaxed);
    }
}

/// The request's pairs that go back in the answer: all but `env`.
pub fn echo_pairs(msg: &Message) -> Vec<(String, String)> {
    msg.pairs
        .iter()
        .filter(|(k, _)| k != "env")
        .cloned()
        .collect()
}

/// Turn a job into a check: its command line (split like Nagios does), its
/// timeout, and its environment macros. Err: (errno, message) for the core.
pub fn job_check(msg: &Message) -> Result<Check, (i32, String)> {
    let command = msg
        .get("command")
        .filter(|c| !c.trim().is_empty())
        .ok_or((libc::EINVAL, "pidring: the job has no command".to_string()))?;
    let timeout = msg
        .get("timeout")
        .and_then(|t| t.trim().parse::<u64>().ok())
        .filter(|&t| t > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_JOB_TIMEOUT);
    let mut check = Check::command_line(command)
        .map_err(|e| {
            (
                libc::EINVAL,
                format!("pidring: cannot run {command:?}: {e}"),
            )
        })?
        .timeout(timeout)
        .grace(KILL_GRACE)
        .timeout_state(State::Unknown);
    if let Some(env) = msg.get("env") {
        for line in env.split('\n') {
            match line.split_once('=') {
                Some((k, v)) if !k.is_empty() => check = check.env(k, v),
                _ if line.is_empty() => {}
                _ => tracing::debug!("ignoring environment line without a name: {line:?}"),
            }
        }
    }
    Ok(check)
}

/// What a job's answer says after the echoed request.
struct Reply {
    /// `wait_status`, as `waitpid` gives it.
    wait_status: i32,
    /// `start`, µs since the epoch.
    start_us: u64,
    /// `stop`, µs since the epoch.
    stop_us: u64,
    /// `runtime`.
    runtime: std::time::Duration,
    /// `exited_ok` is 0 and (`error_code`, `error_msg`) say why; `None`: 1.
    failure: Option<(i32, String)>,
    /// `outstd`.
    outstd: Vec<u8>,
    /// `outerr`.
    outerr: Vec<u8>,
}

impl Reply {
    /// The echoed request, then `wait_status`, `start`, `stop`, `runtime`,
    /// `exited_ok` (plus `error_code`/`error_msg` when 0), `outstd`, `outerr`.
    fn into_pairs(self, echo: &[(String, String)]) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = echo
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
            .collect();
        let mut push = |k: &str, v: Vec<u8>| out.push((k.to_string(), v));
        push("wait_status", self.wait_status.to_string().into_bytes());
        push("start", codec::format_timeval(self.start_us).into_bytes());
        push("stop", codec::format_timeval(self.stop_us).into_bytes());
        push(
            "runtime",
            format!("{:.6}", self.runtime.as_secs_f64()).into_bytes(),
        );
        match self.failure {
            None => push("exited_ok", b"1".to_vec()),
            Some((code, msg)) => {
                push("exited_ok", b"0".to_vec());
                push("error_code", code.to_string().into_bytes());
                push("error_msg", msg.into_bytes());
            }
        }
        push("outstd", self.outstd);
        push("outerr", self.outerr);
        out
    }
}

/// The answer to a job that ran (or was cancelled): see `Reply::into_pairs`.
/// No `ru_*` keys.
pub fn response_pairs(echo: &[(String, String)], r: &CheckResult) -> Vec<(String, Vec<u8>)> {
    let start_us = if r.timings.started_unix_us > 0 {
        r.timings.started_unix_us
    } else {
        r.timings.submitted_unix_us
    };
    let stop_us = if r.timings.exited_unix_us > 0 {
        r.timings.exited_unix_us
    } else {
        pidring::result::unix_us(std::time::SystemTime::now()).max(start_us)
    };
    let mut wait_status = r.exit.map(|e| e.wait_status());
    let mut outerr = r.stderr.data.clone();
    let failure: Option<(i32, String)> = match &r.outcome {
        Outcome::Exited { .. } | Outcome::Signaled { .. } => None,
        Outcome::TimedOut {
            timeout_ms, signal, ..
        } => Some((
            ERROR_TIMED_OUT,
            format!(
                "pidring: timed out after {:.3} s; killed with {}",
                *timeout_ms as f64 / 1000.0,
                signal_name(*signal)
            ),
        )),
        Outcome::Cancelled | Outcome::Shutdown => Some((
            libc::ECANCELED,
            "pidring: check killed because the worker is shutting down".to_string(),
        )),
        Outcome::SpawnFailed { errno, message } => match errno {
            // What a fork+exec worker reports for a missing or non-executable
            // plugin, so the core prints its usual "plugin may be missing" hint.
            Some(e) if *e == libc::ENOENT || *e == libc::EACCES => {
                wait_status = Some(if *e == libc::ENOENT { 127 } else { 126 } << 8);
                outerr = format!("pidring: {message}").into_bytes();
                None
            }
            _ => Some((
                errno.unwrap_or(libc::EINVAL),
                format!("pidring: cannot start the check: {message}"),
            )),
        },
    };
    Reply {
        wait_status: wait_status.unwrap_or(0),
        start_us,
        stop_us,
        runtime: r.timings.run,
        failure,
        outstd: r.stdout.data.clone(),
        outerr,
    }
    .into_pairs(echo)
}

/// The answer to a job the policy refused: a check that "exited" 3
/// (UNKNOWN) with `text` as its output, which the core shows as the
/// service's status (it never ran).
pub fn forbidden_pairs(
    echo: &[(String, String)],
    text: &str,
    at_us: u64,
) -> Vec<(String, Vec<u8>)> {
    Reply {
        wait_status: 3 << 8,
        start_us: at_us,
        stop_us: at_us,
        runtime: std::time::Duration::ZERO,
        failure: None,
        outstd: text.as_bytes().to_vec(),
        outerr: Vec::new(),
    }
    .into_pairs(echo)
}

/// The answer to a job that never ran (no command, queue full, ...).
pub fn refusal_pairs(
    echo: &[(String, String)],
    code: i32,
    message: &str,
    at_us: u64,
) -> Vec<(String, Vec<u8>)> {
    Reply {
        wait_status: 0,
        start_us: at_us,
        stop_us: at_us,
        runtime: std::time::Duration::ZERO,
        failure: Some((code, message.to_string())),
        outstd: Vec::new(),
        outerr: message.as_bytes().to_vec(),
    }
    .into_pairs(echo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::check_result;
    use pidring::result::{ExitStatus, Timings};
    use std::os::unix::net::UnixListener;

    fn result(outcome: Outcome, exit: Option<ExitStatus>, stdout: &[u8]) -> CheckResult {
        CheckResult {
            exit,
            pid: Some(10),
            timings: Timings {
                submitted_unix_us: 1_700_000_000_000_000,
                started_unix_us: 1_700_000_000_000_007,
                exited_unix_us: 1_700_000_001_250_000,
                run: Duration::from_micros(1_249_993),
                ..Default::default()
            },
            ..check_result(outcome, stdout)
        }
    }

    fn as_map(pairs: &[(String, Vec<u8>)]) -> std::collections::HashMap<&str, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    fn job(pairs: &[(&str, &str)]) -> Message {
        Message {
            pairs: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn register_request_has_no_pid() {
        assert_eq!(
            register_request("pidring check_dummy", 64, Some("check_dummy")),
            b"@wproc register name=pidring check_dummy;max_jobs=64;plugin=check_dummy\0"
        );
        assert_eq!(
            register_request("pidring 1", 8, None),
            b"@wproc register name=pidring 1;max_jobs=8\0"
        );
    }

    #[test]
    fn answer_echoes_request_but_not_env() {
        let m = job(&[
            ("job_id", "3"),
            ("type", "0"),
            ("command", "check_x"),
            ("timeout", "60"),
            ("env", "NAGIOS_HOSTNAME=h\nNAGIOS_X=y"),
        ]);
        let r = result(
            Outcome::Exited { code: 2 },
            Some(ExitStatus::Exited { code: 2 }),
            b"CRIT",
        );
        let pairs = response_pairs(&echo_pairs(&m), &r);
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "job_id",
                "type",
                "command",
                "timeout",
                "wait_status",
                "start",
                "stop",
                "runtime",
                "exited_ok",
                "outstd",
                "outerr"
            ]
        );
        let m = as_map(&pairs);
        assert_eq!(m["wait_status"], "512");
        assert_eq!(m["start"], "1700000000.000007");
        assert_eq!(m["stop"], "1700000001.250000");
        assert_eq!(m["runtime"], "1.249993");
        assert_eq!(m["exited_ok"], "1");
        assert_eq!(m["outstd"], "CRIT");
    }

    #[test]
    fn timeout_is_etime_and_signal_is_raw_status() {
        let r = result(
            Outcome::TimedOut {
                timeout_ms: 2000,
                signal: libc::SIGTERM,
                escalated: false,
            },
            Some(ExitStatus::Signaled {
                signal: libc::SIGTERM,
                core_dumped: false,
            }),
            b"",
        );
        let m = response_pairs(&[], &r);
        let m = as_map(&m);
        assert_eq!(m["exited_ok"], "0");
        assert_eq!(m["error_code"], "62");
        assert_eq!(m["wait_status"], libc::SIGTERM.to_string());
        assert!(m["error_msg"].contains("timed out after 2.000 s"), "{m:?}");

        let r = result(
            Outcome::Signaled {
                signal: libc::SIGSEGV,
                core_dumped: true,
            },
            Some(ExitStatus::Signaled {
                signal: libc::SIGSEGV,
                core_dumped: true,
            }),
            b"",
        );
        let m = response_pairs(&[], &r);
        let m = as_map(&m);
        assert_eq!(m["wait_status"], (libc::SIGSEGV | 0x80).to_string());
        assert_eq!(m["exited_ok"], "1");
        assert!(!m.keys().any(|k| k.starts_with("ru_")));
    }

    #[test]
    fn missing_plugin_looks_like_exit_127_and_cancel_is_an_error() {
        let mut r = result(
            Outcome::SpawnFailed {
                errno: Some(libc::ENOENT),
                message: "/nope: No such file".into(),
            },
            None,
            b"",
        );
        r.timings.started_unix_us = 0;
        r.timings.exited_unix_us = 0;
        let m = response_pairs(&[], &r);
        let m = as_map(&m);
        assert_eq!(m["wait_status"], (127 << 8).to_string());
        assert_eq!(m["exited_ok"], "1");
        assert!(m["outerr"].contains("No such file"));
        assert_eq!(m["start"], "1700000000.000000");

        let r = result(Outcome::Cancelled, None, b"");
        let m = response_pairs(&[], &r);
        let m = as_map(&m);
        assert_eq!(m["exited_ok"], "0");
        assert_eq!(m["error_code"], libc::ECANCELED.to_string());
    }

    #[test]
    fn job_check_splits_command_and_applies_timeout_and_env() {
        let m = job(&[
            ("job_id", "1"),
            ("command", "/bin/echo 'a b' c"),
            ("timeout", "7"),
            ("env", "NAGIOS_A=1\nbad line\nNAGIOS_B=x=y\n"),
        ]);
        let c = job_check(&m).unwrap();
        assert_eq!(c.args(), ["/bin/echo", "a b", "c"]);
        assert_eq!(c.get_timeout(), Duration::from_secs(7));
        assert!(
            c.get_env()
                .iter()
                .any(|(k, v)| k == "NAGIOS_B" && v == "x=y")
        );
        assert_eq!(c.get_env().len(), 2);
        let c = job_check(&job(&[("command", "x"), ("timeout", "0")])).unwrap();
        assert_eq!(c.get_timeout(), DEFAULT_JOB_TIMEOUT);
        // The core sends whole seconds; anything else is no timeout of 0 s.
        for odd in ["1e-9", "0.0001", "-1", ""] {
            let c = job_check(&job(&[("command", "x"), ("timeout", odd)])).unwrap();
            assert_eq!(c.get_timeout(), DEFAULT_JOB_TIMEOUT, "{odd}");
        }
        assert_eq!(
            job_check(&job(&[("job_id", "1")])).unwrap_err().0,
            libc::EINVAL
        );
        assert_eq!(
            job_check(&job(&[("command", "  ")])).unwrap_err().0,
            libc::EINVAL
        );
    }

    /// A stand-in for the core's side of one connection.
    struct FakeCore {
        stream: UnixStream,
        decoder: Decoder,
    }

    impl FakeCore {
        fn accept(listener: &UnixListener, first_jobs: &[u8]) -> (FakeCore, String) {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1];
            while b[0] != 0 || req.is_empty() {
                match stream.read(&mut b) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    r => assert_eq!(r.unwrap(), 1, "worker hung up"),
                }
                req.push(b[0]);
            }
            // OK and the first jobs in one write: the worker must keep the rest.
            let mut out = b"OK\0".to_vec();
            out.extend_from_slice(first_jobs);
            stream.write_all(&out).unwrap();
            let req = String::from_utf8(req[..req.len() - 1].to_vec()).unwrap();
            (
                FakeCore {
                    stream,
                    decoder: Decoder::new(),
                },
                req,
            )
        }

        /// The next answer to a job (log messages skipped).
        fn answer(&mut self) -> Message {
            let mut buf = [0u8; 4096];
            loop {
                while let Some(m) = self.decoder.next_message().unwrap() {
                    if m.get("log").is_none() {
                        return m;
                    }
                }
                let n = match self.stream.read(&mut buf) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    r => r.expect("no answer within 30 s"),
                };
                assert!(n > 0, "worker closed the connection");
                self.decoder.feed(&buf[..n]);
            }
        }
    }

    fn temp_socket(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pidring-nagios-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("nagios.qh")
    }

    /// Pids of live (not zombie) processes whose environment holds `marker`.
    fn marked_processes(marker: &str) -> Vec<i32> {
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(env) = std::fs::read(e.path().join("environ")) else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('Z'));
            if !zombie && env.split(|&b| b == 0).any(|v| v == marker.as_bytes()) {
                pids.push(pid);
            }
        }
        pids
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(Instant::now() < end, "{what}: not within 30 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn jobs_of_a_connection_that_ends_are_killed_and_reaped() {
        let socket = temp_socket("abandon");
        let listener = UnixListener::bind(&socket).unwrap();
        let exec = Arc::new(Executor::builder().max_running(16).build().unwrap());
        let config = NagiosWorkerConfig {
            qh_socket: socket.clone(),
            name: "test".into(),
            ..Default::default()
        };
        let workers = spawn_workers(&config, exec.clone()).unwrap();
        // Three long jobs, each with a child of its own in its group.
        let jobs = |round: u32| {
            let mark = format!("NAGIOS_PIDRING_ABANDON={}-{round}", std::process::id());
            let mut out = Vec::new();
            for i in 0..3 {
                codec::encode_into(
                    [
                        ("job_id", format!("{round}{i}")),
                        ("type", "0".into()),
                        ("command", "/bin/sh -c 'sleep 100 & exec sleep 100'".into()),
                        ("timeout", "100".into()),
                        ("env", mark.clone()),
                    ],
                    &mut out,
                );
            }
            (mark, out)
        };

        // 1: the core closes the connection (a restart).
        let (mark, first) = jobs(1);
        let (core, _) = FakeCore::accept(&listener, &first);
        wait_until("6 job processes running", || {
            marked_processes(&mark).len() == 6
        });
        drop(core);
        wait_until("the closed connection's jobs killed", || {
            marked_processes(&mark).is_empty()
        });
        wait_until("the killed jobs reaped", || exec.running() == 0);

        // 2: the worker registers again; this time the core sends garbage
        // (no delimiter within MAX_MESSAGE), so the worker breaks it off.
        let (mark, first) = jobs(2);
        let (mut core, _) = FakeCore::accept(&listener, &first);
        wait_until("6 job processes running again", || {
            marked_processes(&mark).len() == 6
        });
        let garbage = vec![b'x'; codec::MAX_MESSAGE + 4096];
        let _ = core.stream.write_all(&garbage);
        wait_until("the broken connection's jobs killed", || {
            marked_processes(&mark).is_empty()
        });
        wait_until("the killed jobs reaped", || exec.running() == 0);

        // 3: and it still serves the next connection.
        let job = codec::encode([
            ("job_id", "30"),
            ("type", "0"),
            ("command", "/bin/sh -c 'echo again'"),
            ("timeout", "10"),
        ]);
        let (mut core, _) = FakeCore::accept(&listener, &job);
        assert_eq!(core.answer().get("outstd"), Some("again\n"));
        assert!(workers.stop().registrations >= 3);
        assert!(exec.wait_idle(Duration::from_secs(10)));
        let _ = std::fs::remove_dir_all(socket.parent().unwrap());
    }

    #[test]
    fn a_job_outside_allowed_commands_is_an_unknown_check_saying_why() {
        let socket = temp_socket("forbidden");
        let listener = UnixListener::bind(&socket).unwrap();
        let exec = Arc::new(Executor::builder().max_running(4).build().unwrap());
        let config = NagiosWorkerConfig {
            qh_socket: socket.clone(),
            name: "test".into(),
            ..Default::default()
        };
        let marker = socket.parent().unwrap().join("ran");
        let policy = pidring::policy::Policy {
            allowed_commands: pidring::policy::Allowlist::new(&["/nonexistent-pidring/*"]).unwrap(),
            ..Default::default()
        };
        let policy = Arc::new(pidring::policy::SharedPolicy::new(policy));
        let workers = spawn_workers_with_policy(&config, exec.clone(), policy).unwrap();
        let job = codec::encode([
            ("job_id", "7".to_string()),
            ("type", "0".into()),
            ("command", format!("/usr/bin/touch {}", marker.display())),
            ("timeout", "10".into()),
        ]);
        let (mut core, _) = FakeCore::accept(&listener, &job);
        let a = core.answer();
        assert_eq!(a.get("job_id"), Some("7"));
        assert_eq!(a.get("exited_ok"), Some("1"));
        assert_eq!(a.get("wait_status"), Some("768"), "exit 3: UNKNOWN");
        let out = a.get("outstd").unwrap();
        assert!(out.starts_with("UNKNOWN: pidring: forbidden: "), "{out}");
        assert!(
            out.contains("touch") && out.contains("allowed_commands"),
            "{out}"
        );
        workers.stop();
        assert_eq!(exec.metrics().counters.submitted, 0);
        assert!(!marker.exists());
        let _ = std::fs::remove_dir_all(socket.parent().unwrap());
    }

    #[test]
    fn reconfigure_adds_and_removes_connections_leaving_the_others_alone() {
        let socket = temp_socket("reconf");
        let listener = UnixListener::bind(&socket).unwrap();
        let exec = Arc::new(Executor::builder().max_running(8).build().unwrap());
        let general = NagiosWorkerConfig {
            qh_socket: socket.clone(),
            name: "test".into(),
            ..Default::default()
        };
        let mut workers = spawn_workers(&general, exec.clone()).unwrap();
        let mark = format!("NAGIOS_PIDRING_RECONF={}", std::process::id());
        let long = codec::encode([
            ("job_id", "1".to_string()),
            ("type", "0".into()),
            ("command", "/bin/sleep 100".into()),
            ("timeout", "100".into()),
            ("env", mark.clone()),
        ]);
        let (mut first, req) = FakeCore::accept(&listener, &long);
        assert!(!req.contains("plugin="), "{req}");
        wait_until("the job running", || marked_processes(&mark).len() == 1);

        // Added: a plugin connection registers; the general one stays, job and all.
        let both = NagiosWorkerConfig {
            plugins: vec!["/bin/sh".into()],
            connections: Some(1),
            ..general.clone()
        };
        let what = workers.reconfigure(&both).unwrap();
        assert!(
            what.contains("added [\"plugin /bin/sh\"], removed []"),
            "{what}"
        );
        let echo = codec::encode([
            ("job_id", "2"),
            ("type", "0"),
            ("command", "/bin/sh -c 'echo plugin'"),
            ("timeout", "10"),
        ]);
        let (mut second, req) = FakeCore::accept(&listener, &echo);
        assert!(req.contains("plugin=/bin/sh"), "{req}");
        assert_eq!(second.answer().get("outstd"), Some("plugin\n"));
        assert_eq!(
            marked_processes(&mark).len(),
            1,
            "the first job is untouched"
        );
        assert_eq!(workers.stats().registrations, 2);

        // Removed: the general connection's job is killed, reaped and answered.
        let plugin_only = NagiosWorkerConfig {
            connections: Some(0),
            ..both
        };
        let what = workers.reconfigure(&plugin_only).unwrap();
        assert!(what.contains("removed [\"general #1\"]"), "{what}");
        assert_eq!(first.answer().get("job_id"), Some("1"));
        wait_until("the removed connection's job killed", || {
            marked_processes(&mark).is_empty()
        });
        wait_until("and reaped", || exec.running() == 0);
        let mut b = [0u8; 64];
        assert_eq!(first.stream.read(&mut b).unwrap_or(0), 0, "closed");
        // The plugin connection still serves.
        second.stream.write_all(&echo).unwrap();
        assert_eq!(second.answer().get("outstd"), Some("plugin\n"));
        workers.stop();
        let _ = std::fs::remove_dir_all(socket.parent().unwrap());
    }

    #[test]
    fn serves_jobs_reconnects_and_answers_on_stop() {
        let socket = temp_socket("serve");
        let listener = UnixListener::bind(&socket).unwrap();
        let exec = Arc::new(Executor::builder().max_running(16).build().unwrap());
        let config = NagiosWorkerConfig {
            qh_socket: socket.clone(),
            plugins: vec!["/bin/sh".into()],
            name: "test".into(),
            ..Default::default()
        };
        let workers = spawn_workers(&config, exec.clone()).unwrap();

        let first = codec::encode([
            ("job_id", "1"),
            ("type", "0"),
            (
                "command",
                "/bin/sh -c 'echo out $NAGIOS_X; echo err >&2; exit 2'",
            ),
            ("timeout", "10"),
            ("env", "NAGIOS_X=from-env"),
        ]);
        let (mut core, req) = FakeCore::accept(&listener, &first);
        assert_eq!(
            req,
            "@wproc register name=test /bin/sh;max_jobs=4096;plugin=/bin/sh"
        );
        let a = core.answer();
        assert_eq!(a.get("job_id"), Some("1"));
        assert_eq!(a.get("type"), Some("0"));
        assert_eq!(a.get("env"), None);
        assert_eq!(a.get("wait_status"), Some("512"));
        assert_eq!(a.get("exited_ok"), Some("1"));
        assert_eq!(a.get("outstd"), Some("out from-env\n"));
        assert_eq!(a.get("outerr"), Some("err\n"));
        let start = a.get("start").unwrap();
        assert_eq!(start.split('.').nth(1).unwrap().len(), 6, "{start}");

        // A timeout, and several jobs in one write.
        let mut jobs = codec::encode([
            ("job_id", "2"),
            ("type", "0"),
            ("command", "/bin/sh -c 'exec sleep 30'"),
            ("timeout", "1"),
        ]);
        for id in 3..13 {
            codec::encode_into(
                [
                    ("job_id", id.to_string()),
                    ("type", "0".into()),
                    ("command", format!("/bin/sh -c 'echo {id}'")),
                    ("timeout", "10".into()),
                ],
                &mut jobs,
            );
        }
        core.stream.write_all(&jobs).unwrap();
        let mut seen = HashSet::new();
        let mut timed_out = None;
        for _ in 2..13 {
            let a = core.answer();
            let id: u32 = a.get("job_id").unwrap().parse().unwrap();
            if id == 2 {
                timed_out = Some(a);
            } else {
                assert_eq!(a.get("outstd"), Some(format!("{id}\n").as_str()));
            }
            seen.insert(id);
        }
        assert_eq!(seen.len(), 11);
        let t = timed_out.unwrap();
        assert_eq!(t.get("exited_ok"), Some("0"));
        assert_eq!(t.get("error_code"), Some("62"));

        // The core restarts: the worker registers again and keeps serving.
        drop(core);
        let job = codec::encode([
            ("job_id", "20"),
            ("type", "0"),
            ("command", "/bin/sh -c 'echo again'"),
            ("timeout", "10"),
        ]);
        let (mut core, _) = FakeCore::accept(&listener, &job);
        assert_eq!(core.answer().get("outstd"), Some("again\n"));
        assert!(workers.stats().registrations >= 2);

        // Stop with a job in flight: it is killed, reaped and answered.
        core.stream
            .write_all(&codec::encode([
                ("job_id", "21"),
                ("type", "0"),
                ("command", "/bin/sh -c 'exec sleep 60'"),
                ("timeout", "100"),
            ]))
            .unwrap();
        let end = Instant::now() + Duration::from_secs(30);
        while exec.running() == 0 {
            assert!(Instant::now() < end, "job 21 never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        let stopper = std::thread::spawn(move || workers.stop());
        let a = core.answer();
        assert_eq!(a.get("job_id"), Some("21"));
        assert_eq!(a.get("exited_ok"), Some("0"));
        assert_eq!(
            a.get("error_code"),
            Some(libc::ECANCELED.to_string().as_str())
        );
        stopper.join().unwrap();
        assert!(exec.wait_idle(Duration::from_secs(10)));
        let _ = std::fs::remove_dir_all(socket.parent().unwrap());
    }
}
