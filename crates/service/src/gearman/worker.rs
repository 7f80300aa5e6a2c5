//! The gearman worker: one connection (and one thread) per gearmand server
//! that keeps up to `max-worker` jobs of all its queues in flight through
//! the shared [`Executor`].
//!
//! Flow control: a GRAB_JOB is sent only while a running slot is free (the
//! slots are shared by every server's connection), a NO_JOB is followed by
//! PRE_SLEEP and the connection waits for gearmand's NOOP. A job's result
//! is queued to its `result_queue` as a background job, and only then is
//! the job completed (WORK_COMPLETE on the same connection, after the
//! submit): a worker that dies before that leaves the job to gearmand,
//! which hands it to another worker.

use super::checks::{self, NotRun};
use super::config::GearmanConfig;
use super::job::{Answer, Crypt, Job};
use super::packet::{self, Decoder, Kind, Packet};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use pidring::executor::{CheckId, Executor};
use pidring::result::CheckResult;
use pidring::waker::Waker;
use rustix::event::{PollFd, PollFlags};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a stop lets jobs in flight finish before killing them.
pub const STOP_DRAIN: Duration = Duration::from_secs(10);
/// How long a killed job may take to be reaped and answered at a stop.
const STOP_KILL_WAIT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// GRAB_JOBs outstanding on one connection at once (fewer round trips under load).
const GRAB_PIPELINE: usize = 4;
/// A sleeping connection asks again after this long even without a NOOP.
const SLEEP_RECHECK: Duration = Duration::from_secs(5);
/// How often the load limits are read.
const LOAD_RECHECK: Duration = Duration::from_secs(1);
/// A connection whose socket accepts nothing for this long is dropped.
const WRITE_STALL: Duration = Duration::from_secs(30);

/// Why the workers could not start.
#[derive(Debug, thiserror::Error)]
pub enum GearmanError {
    /// The configuration cannot work.
    #[error("invalid gearman worker config: {0}")]
    Config(String),
    /// A thread or descriptor could not be had.
    #[error("cannot start the gearman worker: {0}")]
    Setup(#[source] std::io::Error),
}

/// Counters of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounters {
    /// Jobs taken from gearmand.
    pub grabbed: u64,
    /// Jobs run and answered.
    pub done: u64,
    /// Jobs not run because they were older than `max-age` (answered so).
    pub too_old: u64,
    /// Jobs whose data did not decrypt or parse (never run; WORK_FAIL).
    pub undecryptable: u64,
    /// Jobs left to gearmand to hand to another worker (connection lost, or
    /// taken while stopping); their checks here were killed.
    pub requeued: u64,
}

/// A gearmand connection's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerState {
    /// Connected and registered right now.
    pub connected: bool,
    /// Successful connects (first and re-).
    pub connects: u64,
    /// Connections lost.
    pub disconnects: u64,
    /// What went wrong last, if anything.
    pub last_error: Option<String>,
    /// Grabbing is paused by a load limit.
    pub load_paused: bool,
}

/// Counters over all connections, readable while they run.
#[derive(Debug, Default)]
struct Stats {
    queues: Mutex<BTreeMap<String, QueueCounters>>,
    servers: Mutex<BTreeMap<String, ServerState>>,
    results_sent: AtomicU64,
    dup_sent: AtomicU64,
    dup_dropped: AtomicU64,
}

/// A copy of the gearman worker's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GearmanStatsSnapshot {
    /// Per queue.
    pub queues: BTreeMap<String, QueueCounters>,
    /// Per gearmand server.
    pub servers: BTreeMap<String, ServerState>,
    /// Jobs holding a running slot now.
    pub in_flight: usize,
    /// Results queued to a result queue.
    pub results_sent: u64,
    /// Results copied to a dupserver.
    pub dup_sent: u64,
    /// Results a dupserver could not take in time (backlog full).
    pub dup_dropped: u64,
}

impl Stats {
    fn queue(&self, q: &str, f: impl FnOnce(&mut QueueCounters)) {
        let mut m = lock(&self.queues);
        f(m.entry(q.to_string()).or_default());
    }

    fn server(&self, s: &str, f: impl FnOnce(&mut ServerState)) {
        let mut m = lock(&self.servers);
        f(m.entry(s.to_string()).or_default());
    }
}

/// Running slots shared by every connection: a GRAB_JOB takes one, a
/// NO_JOB or a finished job gives it back.
/// Its limit is `max-worker`; a reload may lower it below what is in use,
/// and then no slot is taken until enough are given back.
#[derive(Debug)]
struct Slots {
    limit: AtomicUsize,
    used: AtomicUsize,
}

impl Slots {
    fn take(&self) -> bool {
        let limit = self.limit.load(Ordering::SeqCst);
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn give(&self) {
        self.used.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a reload changes under running connections: each connection takes
/// the newest settings before its next step.
struct Live {
    cfg: Arc<GearmanConfig>,
    crypt: Crypt,
    queues: Vec<String>,
    dup: Option<Sender<Vec<u8>>>,
}

/// The newest [`Live`], and its number (a connection compares it with its own).
struct LiveCell {
    generation: AtomicU64,
    live: Mutex<Arc<Live>>,
}

impl LiveCell {
    fn get(&self) -> (u64, Arc<Live>) {
        let live = lock(&self.live);
        (self.generation.load(Ordering::SeqCst), live.clone())
    }

    fn set(&self, new: Live) {
        let mut live = lock(&self.live);
        *live = Arc::new(new);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// A connection's thread, and how to end it alone (a reload removed its server).
#[derive(Debug)]
struct ConnHandle {
    addr: String,
    retire: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: JoinHandle<()>,
}

/// The running worker; [`GearmanWorkers::stop`] (or drop) ends it.
pub struct GearmanWorkers {
    stop: Arc<AtomicBool>,
    conns: Vec<ConnHandle>,
    /// Connections of removed servers finishing their jobs in flight.
    retired: Vec<JoinHandle<()>>,
    stats: Arc<Stats>,
    slots: Arc<Slots>,
    dup: Option<super::dup::DupServers>,
    /// Dupservers a reload replaced, sending what they still hold.
    retired_dups: Vec<super::dup::DupServers>,
    live: Arc<LiveCell>,
    config: GearmanConfig,
    exec: Arc<Executor>,
}

impl std::fmt::Debug for GearmanWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GearmanWorkers")
            .field("servers", &self.config.server_addrs())
            .field("queues", &self.config.queues())
            .finish_non_exhaustive()
    }
}

/// Reads the worker's counters from anywhere (the daemon's `stats` and `/metrics`).
#[derive(Debug, Clone)]
pub struct GearmanStatsHandle {
    stats: Arc<Stats>,
    slots: Arc<Slots>,
}

impl GearmanStatsHandle {
    /// A copy of the counters now.
    pub fn snapshot(&self) -> GearmanStatsSnapshot {
        GearmanStatsSnapshot {
            queues: lock(&self.stats.queues).clone(),
            servers: lock(&self.stats.servers).clone(),
            in_flight: self.slots.used.load(Ordering::Relaxed),
            results_sent: self.stats.results_sent.load(Ordering::Relaxed),
            dup_sent: self.stats.dup_sent.load(Ordering::Relaxed),
            dup_dropped: self.stats.dup_dropped.load(Ordering::Relaxed),
        }
    }
}

impl GearmanWorkers {
    /// Counters over all connections.
    pub fn stats(&self) -> GearmanStatsSnapshot {
        self.stats_handle().snapshot()
    }

    /// A handle that reads the counters, also after the workers are gone.
    pub fn stats_handle(&self) -> GearmanStatsHandle {
        GearmanStatsHandle {
            stats: self.stats.clone(),
            slots: self.slots.clone(),
        }
    }

    /// Stop taking jobs now; [`GearmanWorkers::stop`] then waits for those in flight.
    pub fn begin_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Stop grabbing, let jobs in flight finish for [`STOP_DRAIN`], kill and
    /// answer the rest, close the connections; returns the final counters.
    pub fn stop(mut self) -> GearmanStatsSnapshot {
        self.stop_and_join();
        self.stats()
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let threads = self.conns.drain(..).map(|c| c.thread);
        for t in threads.chain(self.retired.drain(..)).collect::<Vec<_>>() {
            if t.join().is_err() {
                tracing::error!("a gearman connection thread panicked");
            }
        }
        for d in self
            .dup
            .take()
            .into_iter()
            .chain(self.retired_dups.drain(..))
        {
            d.stop();
        }
    }

    /// The settings the worker runs with (after the last reload).
    pub fn config(&self) -> &GearmanConfig {
        &self.config
    }

    /// Apply changed settings without losing a job in flight (a SIGHUP
    /// reload): the queues (CAN_DO/CANT_DO on each open connection), the
    /// servers (an added one is connected; a removed one takes no new job,
    /// answers those in flight, then closes), the dupservers, `max-worker`,
    /// the timeouts, `max-age`, the key and the load limits. `run_as` keeps
    /// its running value (looked up once, at start). Returns what changed,
    /// one entry each; an invalid config changes nothing.
    pub fn reconfigure(&mut self, config: &GearmanConfig) -> Result<Vec<String>, GearmanError> {
        config.validate().map_err(GearmanError::Config)?;
        let crypt = config.crypt().map_err(GearmanError::Config)?;
        let mut new = config.clone();
        new.run_as = self.config.run_as.clone();
        let old = &self.config;
        let dups_changed = new.dupserver_addrs() != old.dupserver_addrs()
            || new.dupserver_backlog_queue_size != old.dupserver_backlog_queue_size;
        let new_dup = if dups_changed {
            start_dup(&new, &self.stats)?
        } else {
            None
        };
        let changed = config_changes(old, &new, &self.live.get().1.crypt, &crypt);
        if dups_changed {
            let replaced = std::mem::replace(&mut self.dup, new_dup);
            if let Some(d) = replaced {
                d.begin_stop();
                self.retired_dups.push(d);
            }
        }
        let limit = new
            .max_jobs
            .unwrap_or_else(|| self.exec.max_running())
            .max(1);
        self.slots.limit.store(limit, Ordering::SeqCst);
        self.live.set(Live {
            cfg: Arc::new(new.clone()),
            crypt,
            queues: new.queues(),
            dup: self.dup.as_ref().map(|d| d.sender()),
        });
        let wanted = new.server_addrs();
        let (gone, stay): (Vec<_>, Vec<_>) = std::mem::take(&mut self.conns)
            .into_iter()
            .partition(|c| !wanted.contains(&c.addr));
        self.conns = stay;
        for c in gone {
            tracing::info!(server = %c.addr, "server removed by a reload: taking no new jobs from it, closing once its jobs in flight are answered");
            c.retire.store(true, Ordering::SeqCst);
            c.waker.wake();
            self.retired.push(c.thread);
        }
        self.retired.retain(|t| !t.is_finished());
        self.config = new;
        for c in &self.conns {
            c.waker.wake();
        }
        for addr in wanted {
            if !self.conns.iter().any(|c| c.addr == addr) {
                self.start_conn(&addr)?;
            }
        }
        Ok(changed)
    }

    /// Start the connection (and its thread) to one server.
    fn start_conn(&mut self, addr: &str) -> Result<(), GearmanError> {
        self.stats.server(addr, |_| {});
        let waker = Arc::new(Waker::new().map_err(GearmanError::Setup)?);
        let retire = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let (generation, live) = self.live.get();
        let conn = Conn {
            addr: addr.to_string(),
            cfg: live.cfg.clone(),
            crypt: live.crypt.clone(),
            queues: live.queues.clone(),
            dup: live.dup.clone(),
            live: self.live.clone(),
            generation,
            exec: self.exec.clone(),
            stop: self.stop.clone(),
            retire: retire.clone(),
            stats: self.stats.clone(),
            slots: self.slots.clone(),
            waker: waker.clone(),
            done_tx,
            done_rx,
            inflight: HashMap::new(),
            session: 0,
            load: LoadGate::new(&live.cfg),
        };
        let thread = std::thread::Builder::new()
            .name("pidring-gearman".into())
            .spawn(move || conn.run())
            .map_err(GearmanError::Setup)?;
        self.conns.push(ConnHandle {
            addr: addr.to_string(),
            retire,
            waker,
            thread,
        });
        Ok(())
    }
}

/// What differs between two configs, for a reload's log line (a key only as "changed").
fn config_changes(
    old: &GearmanConfig,
    new: &GearmanConfig,
    old_crypt: &Crypt,
    new_crypt: &Crypt,
) -> Vec<String> {
    let mut changed = Vec::new();
    let mut note = |what: &str, a: String, b: String| {
        if a != b {
            changed.push(format!("{what} {a} -> {b}"));
        }
    };
    note(
        "queues",
        format!("{:?}", old.queues()),
        format!("{:?}", new.queues()),
    );
    note(
        "server",
        format!("{:?}", old.server_addrs()),
        format!("{:?}", new.server_addrs()),
    );
    note(
        "dupserver",
        format!("{:?}", old.dupserver_addrs()),
        format!("{:?}", new.dupserver_addrs()),
    );
    macro_rules! diff {
        ($($f:ident),*) => {$(
            note(stringify!($f), format!("{:?}", old.$f), format!("{:?}", new.$f));
        )*};
    }
    note(
        "max-worker",
        format!("{:?}", old.max_jobs),
        format!("{:?}", new.max_jobs),
    );
    note("max-age", old.max_age.to_string(), new.max_age.to_string());
    diff!(
        encryption,
        keyfile,
        identifier,
        job_timeout,
        timeout_return,
        load_limit1,
        load_limit5,
        load_limit15,
        restrict_path,
        show_error_output,
        dup_results_are_passive,
        dupserver_backlog_queue_size,
        worker_name_in_result
    );
    // The secret itself is never logged: compare what it seals.
    let sample = |c: &Crypt| c.seal(b"pidring reload");
    if old.encryption && new.encryption && sample(old_crypt) != sample(new_crypt) {
        changed.push("the encryption key".into());
    }
    changed
}

fn start_dup(
    config: &GearmanConfig,
    stats: &Arc<Stats>,
) -> Result<Option<super::dup::DupServers>, GearmanError> {
    if config.dupserver.is_empty() {
        return Ok(None);
    }
    super::dup::DupServers::start(
        &config.dupserver_addrs(),
        config.dupserver_backlog_queue_size,
        stats_dup(stats),
    )
    .map(Some)
    .map_err(GearmanError::Setup)
}

impl Drop for GearmanWorkers {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Start one connection per server, each on its own thread; they connect
/// (and keep reconnecting with backoff) in the background.
pub fn spawn_workers(
    config: &GearmanConfig,
    exec: Arc<Executor>,
) -> Result<GearmanWorkers, GearmanError> {
    config.validate().map_err(GearmanError::Config)?;
    let crypt = config.crypt().map_err(GearmanError::Config)?;
    let stats = Arc::new(Stats::default());
    let limit = config.max_jobs.unwrap_or_else(|| exec.max_running()).max(1);
    let slots = Arc::new(Slots {
        limit: AtomicUsize::new(limit),
        used: AtomicUsize::new(0),
    });
    let dup = start_dup(config, &stats)?;
    let queues = config.queues();
    let live = Arc::new(LiveCell {
        generation: AtomicU64::new(0),
        live: Mutex::new(Arc::new(Live {
            cfg: Arc::new(config.clone()),
            crypt: crypt.clone(),
            queues: queues.clone(),
            dup: dup.as_ref().map(|d| d.sender()),
        })),
    });
    let mut workers = GearmanWorkers {
        stop: Arc::new(AtomicBool::new(false)),
        conns: Vec::new(),
        retired: Vec::new(),
        stats,
        slots,
        dup,
        retired_dups: Vec::new(),
        live,
        config: config.clone(),
        exec,
    };
    for addr in config.server_addrs() {
        workers.start_conn(&addr)?; // on error `workers` drops: started threads stop
    }
    tracing::info!(
        servers = ?config.server_addrs(),
        queues = ?queues,
        max_in_flight = limit,
        encryption = crypt.encrypts(),
        identifier = %config.identifier,
        "gearman worker started"
    );
    Ok(workers)
}

fn stats_dup(stats: &Arc<Stats>) -> super::dup::DupCounters {
    let (s1, s2) = (stats.clone(), stats.clone());
    super::dup::DupCounters {
        sent: Box::new(move || {
            s1.dup_sent.fetch_add(1, Ordering::Relaxed);
        }),
        dropped: Box::new(move || {
            s2.dup_dropped.fetch_add(1, Ordering::Relaxed);
        }),
    }
}

/// A job's result, from the executor's loop to its connection.
struct Done {
    id: CheckId,
    result: Box<CheckResult>,
}

/// A job running here.
struct Running {
    handle: Vec<u8>,
    session: u64,
    queue: String,
    job: Job,
    /// Its connection ended: gearmand has it back, the check was killed,
    /// and its result goes nowhere.
    abandoned: bool,
}

/// What a reply on the connection answers, in the order they were sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Grab,
    Created,
}

/// One connection to gearmand.
struct Session {
    stream: TcpStream,
    id: u64,
    out: Vec<u8>,
    decoder: Decoder,
    expect: VecDeque<Expect>,
    grabbing: usize,
    /// A NO_JOB came since the last job: grab no more until a NOOP.
    empty: bool,
    /// PRE_SLEEP sent, waiting for NOOP.
    sleeping: Option<Instant>,
    /// Since when the socket refused our bytes.
    stalled: Option<Instant>,
}

enum End {
    Stopped,
    Broken(String),
}

/// The load limits (`load_limit1/5/15`), read at most once a second.
struct LoadGate {
    limits: [f64; 3],
    checked: Option<Instant>,
    over: bool,
}

impl LoadGate {
    fn new(cfg: &GearmanConfig) -> LoadGate {
        LoadGate {
            limits: [cfg.load_limit1, cfg.load_limit5, cfg.load_limit15],
            checked: None,
            over: false,
        }
    }

    /// Whether a limit is exceeded now; `Some(changed)` tells when that flipped.
    fn exceeded(&mut self, addr: &str) -> bool {
        if self.limits.iter().all(|&l| l <= 0.0) {
            return false;
        }
        if self.checked.is_some_and(|t| t.elapsed() < LOAD_RECHECK) {
            return self.over;
        }
        self.checked = Some(Instant::now());
        let Some(load) = read_loadavg() else {
            return false;
        };
        let over = load
            .iter()
            .zip(self.limits)
            .any(|(&l, limit)| limit > 0.0 && l > limit);
        if over != self.over {
            if over {
                tracing::warn!(server = %addr, load = ?load, limits = ?self.limits, "load limit exceeded: taking no new jobs");
            } else {
                tracing::info!(server = %addr, load = ?load, "load back under the limits: taking jobs again");
            }
        }
        self.over = over;
        over
    }
}

fn read_loadavg() -> Option<[f64; 3]> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

struct Conn {
    addr: String,
    /// From the [`Live`] of `generation`.
    cfg: Arc<GearmanConfig>,
    crypt: Crypt,
    queues: Vec<String>,
    dup: Option<Sender<Vec<u8>>>,
    live: Arc<LiveCell>,
    generation: u64,
    exec: Arc<Executor>,
    /// The whole worker stops.
    stop: Arc<AtomicBool>,
    /// This connection ends alone: its server was removed by a reload.
    retire: Arc<AtomicBool>,
    stats: Arc<Stats>,
    slots: Arc<Slots>,
    waker: Arc<Waker>,
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    inflight: HashMap<CheckId, Running>,
    session: u64,
    load: LoadGate,
}

impl Conn {
    fn run(mut self) {
        let mut backoff = BACKOFF_FIRST;
        let mut failures = 0u32;
        while !self.stopping() {
            self.refresh(None);
            match self.connect() {
                Ok(mut s) => {
                    failures = 0;
                    backoff = BACKOFF_FIRST;
                    self.stats.server(&self.addr, |st| {
                        st.connected = true;
                        st.connects += 1;
                    });
                    tracing::info!(server = %self.addr, queues = ?self.queues, "connected to gearmand");
                    let end = self.serve(&mut s);
                    self.stats.server(&self.addr, |st| {
                        st.connected = false;
                        st.load_paused = false;
                        if let End::Broken(why) = &end {
                            st.disconnects += 1;
                            st.last_error = Some(why.clone());
                        }
                    });
                    let _ = s.stream.shutdown(std::net::Shutdown::Both);
                    match end {
                        End::Stopped => {
                            self.abandon("the worker stopped");
                            self.wait_abandoned();
                            self.forget_if_retired();
                            return;
                        }
                        End::Broken(why) => {
                            tracing::warn!(server = %self.addr, "connection to gearmand lost: {why}; reconnecting");
                            self.abandon("the connection to gearmand was lost");
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    let msg = e.to_string();
                    self.stats
                        .server(&self.addr, |st| st.last_error = Some(msg.clone()));
                    if failures <= 3 {
                        tracing::debug!(server = %self.addr, "cannot connect to gearmand yet: {e}");
                    } else {
                        tracing::warn!(server = %self.addr, retry_in = ?backoff, "cannot connect to gearmand: {e}");
                    }
                }
            }
            self.idle(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        self.abandon("the worker stopped");
        self.wait_abandoned();
        self.forget_if_retired();
    }

    /// A removed server leaves the counters once its connection is done.
    fn forget_if_retired(&self) {
        if self.retire.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
            lock(&self.stats.servers).remove(&self.addr);
            tracing::info!(server = %self.addr, "connection to a removed server closed");
        }
    }

    /// Wait `d` (unless stopped), collecting results of abandoned jobs meanwhile.
    fn idle(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stopping() && Instant::now() < end {
            if let Ok(done) = self.done_rx.recv_timeout(Duration::from_millis(50)) {
                self.finish(None, done);
            }
        }
    }

    fn connect(&mut self) -> std::io::Result<Session> {
        let addrs: Vec<_> = self.addr.to_socket_addrs()?.collect();
        let mut last = std::io::Error::new(ErrorKind::NotFound, "no address");
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_nonblocking(true)?;
                    self.session += 1;
                    let mut s = Session {
                        stream,
                        id: self.session,
                        out: Vec::with_capacity(64 * 1024),
                        decoder: Decoder::new(),
                        expect: VecDeque::new(),
                        grabbing: 0,
                        empty: false,
                        sleeping: None,
                        stalled: None,
                    };
                    let id = format!("pidring@{}", self.cfg.identifier);
                    packet::encode_into(
                        packet::REQ,
                        Kind::SetClientId,
                        &[id.as_bytes()],
                        &mut s.out,
                    );
                    for q in &self.queues {
                        packet::encode_into(packet::REQ, Kind::CanDo, &[q.as_bytes()], &mut s.out);
                    }
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn serve(&mut self, s: &mut Session) -> End {
        let mut stop_at: Option<Instant> = None;
        // A retired connection lets its jobs run to their own timeouts;
        // only a stop of the whole worker kills them after STOP_DRAIN.
        let mut bounded = false;
        let mut killed = false;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let stop = self.stop.load(Ordering::SeqCst);
            if (stop && !bounded) || (self.stopping() && stop_at.is_none()) {
                stop_at = Some(Instant::now());
                bounded = stop;
                let n = self.live_jobs();
                if n > 0 && bounded {
                    tracing::info!(server = %self.addr, jobs = n, "stopping: taking no new jobs, letting {n} in flight finish for up to {STOP_DRAIN:?}");
                } else if n > 0 {
                    tracing::info!(server = %self.addr, jobs = n, "server removed: taking no new jobs, letting {n} in flight finish");
                }
            }
            if stop_at.is_none() {
                self.refresh(Some(s));
            }
            while let Ok(done) = self.done_rx.try_recv() {
                self.finish(Some(s), done);
            }
            if let Some(t) = stop_at {
                // Done once every answer is written and gearmand has taken
                // every result: closing with its replies unread would send a
                // reset, which may cost it our last bytes. (A GRAB_JOB still
                // unanswered is not waited for: closing hands its job back.)
                if self.live_jobs() == 0 && s.out.is_empty() && !s.expect.contains(&Expect::Created)
                {
                    return End::Stopped;
                }
                if !bounded {
                    // Retired: wait for the jobs' own timeouts.
                } else if !killed && t.elapsed() >= STOP_DRAIN {
                    killed = true;
                    tracing::warn!(server = %self.addr, jobs = self.live_jobs(), "stopping: killing jobs still running after {STOP_DRAIN:?}; they are answered as killed");
                    for id in self.inflight.keys() {
                        self.exec.cancel(*id);
                    }
                }
                if bounded && t.elapsed() >= STOP_DRAIN + STOP_KILL_WAIT {
                    tracing::error!(server = %self.addr, jobs = self.live_jobs(), "stopping: killed jobs were not answered in time; closing anyway");
                    return End::Stopped;
                }
            } else {
                self.grab(s);
            }
            if let Err(e) = flush(s) {
                return End::Broken(e);
            }
            let waker_fd = self.waker.fd();
            let mut fds = [
                PollFd::new(
                    &s.stream,
                    if s.out.is_empty() {
                        PollFlags::IN
                    } else {
                        PollFlags::IN | PollFlags::OUT
                    },
                ),
                PollFd::new(&waker_fd, PollFlags::IN),
            ];
            let timeout = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 250_000_000,
            };
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return End::Broken(format!("poll: {e}")),
            }
            let sock = fds[0].revents();
            if fds[1].revents().contains(PollFlags::IN) {
                self.waker.reset();
            }
            if sock.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) {
                loop {
                    match s.stream.read(&mut buf) {
                        Ok(0) => return End::Broken("gearmand closed the connection".into()),
                        Ok(n) => s.decoder.feed(&buf[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return End::Broken(format!("read: {e}")),
                    }
                }
                loop {
                    match s.decoder.next_packet() {
                        Ok(Some(p)) => {
                            if let Err(e) = self.on_packet(s, p, stop_at.is_some()) {
                                return End::Broken(e);
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return End::Broken(format!("protocol: {e}")),
                    }
                }
            }
        }
    }

    /// The worker stops, or this connection's server was removed.
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || self.retire.load(Ordering::SeqCst)
    }

    /// Take the settings of a reload, if one came since; on an open
    /// connection `s`, register for the queues added (and grab from them
    /// now) and unregister the ones removed.
    fn refresh(&mut self, s: Option<&mut Session>) {
        if self.live.generation.load(Ordering::SeqCst) == self.generation {
            return;
        }
        let (generation, live) = self.live.get();
        self.generation = generation;
        if let Some(s) = s {
            let removed: Vec<&String> = self
                .queues
                .iter()
                .filter(|q| !live.queues.contains(q))
                .collect();
            let added: Vec<&String> = live
                .queues
                .iter()
                .filter(|q| !self.queues.contains(q))
                .collect();
            for q in &removed {
                packet::encode_into(packet::REQ, Kind::CantDo, &[q.as_bytes()], &mut s.out);
            }
            for q in &added {
                packet::encode_into(packet::REQ, Kind::CanDo, &[q.as_bytes()], &mut s.out);
            }
            if live.cfg.identifier != self.cfg.identifier {
                let id = format!("pidring@{}", live.cfg.identifier);
                packet::encode_into(packet::REQ, Kind::SetClientId, &[id.as_bytes()], &mut s.out);
            }
            if !added.is_empty() {
                // Jobs may wait there already: gearmand wakes no sleeper for them.
                s.sleeping = None;
                s.empty = false;
            }
            if !added.is_empty() || !removed.is_empty() {
                tracing::info!(server = %self.addr, added = ?added, removed = ?removed, queues = ?live.queues, "queues changed by a reload");
            }
        }
        self.cfg = live.cfg.clone();
        self.crypt = live.crypt.clone();
        self.queues = live.queues.clone();
        self.dup = live.dup.clone();
        self.load = LoadGate::new(&live.cfg);
    }

    /// Jobs of this connection still running (abandoned ones don't count).
    fn live_jobs(&self) -> usize {
        self.inflight.values().filter(|r| !r.abandoned).count()
    }

    /// Send GRAB_JOBs while a slot is free, the queue is not known empty and the load allows.
    fn grab(&mut self, s: &mut Session) {
        if let Some(since) = s.sleeping {
            if since.elapsed() < SLEEP_RECHECK {
                return;
            }
            // No NOOP for a while: ask again (a lost wake-up costs seconds, not forever).
            s.sleeping = None;
        }
        let paused = self.load.exceeded(&self.addr);
        self.stats.server(&self.addr, |st| st.load_paused = paused);
        if paused {
            return;
        }
        while !s.empty && s.grabbing < GRAB_PIPELINE && self.slots.take() {
            packet::encode_into(packet::REQ, Kind::GrabJob, &[], &mut s.out);
            s.expect.push_back(Expect::Grab);
            s.grabbing += 1;
        }
        if s.empty && s.grabbing == 0 {
            packet::encode_into(packet::REQ, Kind::PreSleep, &[], &mut s.out);
            s.sleeping = Some(Instant::now());
            s.empty = false;
        }
    }

    fn on_packet(&mut self, s: &mut Session, p: Packet, stopping: bool) -> Result<(), String> {
        match p.kind {
            Kind::Noop => {
                s.sleeping = None;
                s.empty = false;
            }
            Kind::NoJob => {
                self.expect(s, Expect::Grab, &p)?;
                s.grabbing -= 1;
                self.slots.give();
                s.empty = true;
            }
            Kind::JobAssign => {
                self.expect(s, Expect::Grab, &p)?;
                s.grabbing -= 1;
                s.empty = false;
                let [handle, func, data]: [Vec<u8>; 3] = p
                    .args
                    .try_into()
                    .map_err(|_| "JOB_ASSIGN arity".to_string())?;
                let queue = String::from_utf8_lossy(&func).into_owned();
                self.stats.queue(&queue, |c| c.grabbed += 1);
                if stopping {
                    // Not run, not completed: closing hands it back to gearmand.
                    self.slots.give();
                    self.stats.queue(&queue, |c| c.requeued += 1);
                    return Ok(());
                }
                self.start(s, handle, queue, &data);
            }
            Kind::JobCreated => {
                self.expect(s, Expect::Created, &p)?;
            }
            Kind::Error => {
                let what = s.expect.pop_front();
                tracing::warn!(server = %self.addr, code = %p.text(0), "gearmand error: {} (answering {what:?})", p.text(1));
                if what == Some(Expect::Grab) {
                    s.grabbing -= 1;
                    self.slots.give();
                }
            }
            other => {
                tracing::debug!(server = %self.addr, "ignoring {other:?} from gearmand");
            }
        }
        Ok(())
    }

    /// The reply `p` must answer the oldest request of kind `want`.
    fn expect(&self, s: &mut Session, want: Expect, p: &Packet) -> Result<(), String> {
        match s.expect.pop_front() {
            Some(got) if got == want => Ok(()),
            got => Err(format!(
                "gearmand sent {:?} while {got:?} was expected",
                p.kind
            )),
        }
    }

    /// A job came: decrypt, parse, check its age and command, run it.
    fn start(&mut self, s: &mut Session, handle: Vec<u8>, queue: String, data: &[u8]) {
        let job = match self.crypt.open(data).and_then(|t| Job::parse(&t)) {
            Ok(j) => j,
            Err(e) => {
                self.stats.queue(&queue, |c| c.undecryptable += 1);
                tracing::warn!(server = %self.addr, queue = %queue, handle = %String::from_utf8_lossy(&handle), bytes = data.len(), "job discarded, not run: {e}");
                packet::encode_into(packet::REQ, Kind::WorkFail, &[&handle], &mut s.out);
                self.slots.give();
                return;
            }
        };
        let check = match checks::job_check(&job, &self.cfg, checks::now_secs()) {
            Ok(c) => c,
            Err(why) => {
                match &why {
                    NotRun::TooOld { age } => {
                        self.stats.queue(&queue, |c| c.too_old += 1);
                        tracing::info!(server = %self.addr, queue = %queue, host = %job.host_name, service = %job.service_description, "discarded a job {age:.0} s old (max-age {} s)", self.cfg.max_age);
                    }
                    NotRun::Refused(msg) => {
                        self.stats.queue(&queue, |c| c.done += 1);
                        tracing::warn!(server = %self.addr, queue = %queue, host = %job.host_name, service = %job.service_description, "job not run: {msg}");
                    }
                }
                let answer = checks::not_run_answer(&job, &self.cfg, &why);
                self.answer(Some(&mut *s), &job, &answer);
                packet::encode_into(packet::REQ, Kind::WorkComplete, &[&handle, b""], &mut s.out);
                self.slots.give();
                return;
            }
        };
        let tx = self.done_tx.clone();
        let waker = self.waker.clone();
        let submitted = self.exec.submit_with(check, move |result| {
            let id = result.id;
            let _ = tx.send(Done {
                id,
                result: Box::new(result),
            });
            waker.wake();
        });
        match submitted {
            Ok(id) => {
                self.inflight.insert(
                    id,
                    Running {
                        handle,
                        session: s.id,
                        queue,
                        job,
                        abandoned: false,
                    },
                );
            }
            Err(e) => {
                self.stats.queue(&queue, |c| c.done += 1);
                tracing::warn!(server = %self.addr, queue = %queue, "job not run: {e}");
                let answer = checks::not_run_answer(
                    &job,
                    &self.cfg,
                    &NotRun::Refused(format!("pidring: {e}")),
                );
                self.answer(Some(&mut *s), &job, &answer);
                packet::encode_into(packet::REQ, Kind::WorkComplete, &[&handle, b""], &mut s.out);
                self.slots.give();
            }
        }
    }

    /// A check ended: queue its result, complete its job, free its slot.
    fn finish(&mut self, s: Option<&mut Session>, done: Done) {
        let Some(run) = self.inflight.remove(&done.id) else {
            return;
        };
        self.slots.give();
        if run.abandoned {
            return;
        }
        let Some(s) = s.filter(|s| s.id == run.session) else {
            return;
        };
        let answer = checks::result_answer(&run.job, &self.cfg, &done.result);
        self.stats.queue(&run.queue, |c| c.done += 1);
        self.answer(Some(&mut *s), &run.job, &answer);
        packet::encode_into(
            packet::REQ,
            Kind::WorkComplete,
            &[&run.handle, b""],
            &mut s.out,
        );
    }

    /// Queue a job's answer to its result queue (and a copy to the dupservers).
    fn answer(&self, s: Option<&mut Session>, job: &Job, answer: &Answer) {
        if !job.wants_result() {
            return;
        }
        if let Some(s) = s {
            let sealed = self.crypt.seal(answer.to_text().as_bytes());
            packet::encode_into(
                packet::REQ,
                Kind::SubmitJobBg,
                &[job.result_queue.as_bytes(), b"", &sealed],
                &mut s.out,
            );
            s.expect.push_back(Expect::Created);
            self.stats.results_sent.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(dup) = &self.dup {
            let mut copy = answer.clone();
            if self.cfg.dup_results_are_passive {
                copy.kind = "passive";
            }
            let sealed = self.crypt.seal(copy.to_text().as_bytes());
            let mut pkt = Vec::new();
            packet::encode_into(
                packet::REQ,
                Kind::SubmitJobBg,
                &[job.result_queue.as_bytes(), b"", &sealed],
                &mut pkt,
            );
            if let Err(TrySendError::Full(_)) = dup.try_send(pkt) {
                self.stats.dup_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The connection ended: its jobs belong to gearmand again (it hands
    /// them to another worker), so their checks here are killed and their
    /// results dropped when they come.
    fn abandon(&mut self, why: &str) {
        let mut n = 0;
        for (id, run) in self.inflight.iter_mut().filter(|(_, r)| !r.abandoned) {
            run.abandoned = true;
            self.exec.cancel(*id);
            self.stats.queue(&run.queue, |c| c.requeued += 1);
            n += 1;
        }
        if n > 0 {
            tracing::warn!(server = %self.addr, jobs = n, "{why} with {n} jobs in flight: killed them; gearmand hands them to another worker");
        }
    }

    /// Wait (bounded) until every killed job has been reaped.
    fn wait_abandoned(&mut self) {
        let end = Instant::now() + STOP_KILL_WAIT;
        while !self.inflight.is_empty() && Instant::now() < end {
            if let Ok(done) = self.done_rx.recv_timeout(Duration::from_millis(50)) {
                self.finish(None, done);
            }
        }
    }
}

/// Write what the socket takes now; an error if it took nothing for [`WRITE_STALL`].
fn flush(s: &mut Session) -> Result<(), String> {
    while !s.out.is_empty() {
        match s.stream.write(&s.out) {
            Ok(0) => return Err("write: connection closed".into()),
            Ok(n) => {
                s.out.drain(..n);
                s.stalled = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let since = *s.stalled.get_or_insert_with(Instant::now);
                if since.elapsed() > WRITE_STALL {
                    return Err(format!("gearmand took no bytes for {WRITE_STALL:?}"));
                }
                return Ok(());
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("write: {e}")),
        }
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> GearmanConfig {
        let mut c = GearmanConfig::default();
        c.read_text(text).unwrap();
        c
    }

    #[test]
    fn a_reload_names_what_changed_but_never_the_secret() {
        let old = cfg("server=a\nservices=yes\nkey=first-secret\nmax-worker=5\n");
        let new = cfg("server=a,b\nservices=yes\nhostgroups=web\nkey=second-secret\nmax-age=30\n");
        let changed = config_changes(&old, &new, &old.crypt().unwrap(), &new.crypt().unwrap());
        let text = changed.join(", ");
        assert!(
            text.contains(r#"queues ["service"] -> ["hostgroup_web", "service"]"#),
            "{text}"
        );
        assert!(
            text.contains(r#"server ["a:4730"] -> ["a:4730", "b:4730"]"#),
            "{text}"
        );
        assert!(text.contains("max-worker Some(5) -> None"), "{text}");
        assert!(text.contains("max-age 0 -> 30"), "{text}");
        assert!(text.contains("the encryption key"), "{text}");
        assert!(!text.contains("secret"), "{text}");
        assert!(
            config_changes(&old, &old, &old.crypt().unwrap(), &old.crypt().unwrap()).is_empty()
        );
    }
}
