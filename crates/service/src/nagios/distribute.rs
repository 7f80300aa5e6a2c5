//! `nagios-worker --gearman`: instead of running a Nagios 4 core's jobs
//! here, put each into gearmand as a mod_gearman job (queue `service` or
//! `host`, or a hostgroup or servicegroup queue: see `routing`) and turn its result, taken from a result queue of this
//! instance's own, back into the core's answer. `pidring gearman-worker`
//! on any number of hosts then runs the core's checks.
//!
//! One thread owns the gearmand connection: it submits jobs, takes results
//! (a worker of its own result queue), and answers every job exactly once —
//! with its result, as failed when gearmand cannot be reached, or as timed
//! out when no result came within the job's timeout plus [`MARGIN`].

use crate::gearman::job::{Answer, Crypt, Job};
use crate::gearman::packet::{self, Decoder, Kind};
use crossbeam_channel::{Receiver, Sender};
use pidring::result::{CheckResult, ExitStatus, Outcome, Output, Timings};
use pidring::waker::Waker;
use pidring::{PluginOutput, State};
use rustix::event::{PollFd, PollFlags};
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// How long past its timeout a job's result may come before it is answered as timed out.
pub const MARGIN: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The core's result for one job.
pub type Deliver = Box<dyn FnOnce(CheckResult) + Send>;

enum Cmd {
    Submit {
        id: u64,
        job: Box<Job>,
        queue: String,
        deadline: Instant,
        deliver: Deliver,
    },
    Cancel(u64),
}

struct Pend {
    id: u64,
    key: (String, String, String),
    deadline: Instant,
    submitted: SystemTime,
    timeout: Duration,
    deliver: Deliver,
}

/// Counters of the distribution.
#[derive(Debug, Default)]
pub struct DistributeStats {
    /// Jobs put into gearmand.
    pub submitted: AtomicU64,
    /// Results matched to a job and answered.
    pub answered: AtomicU64,
    /// Jobs answered as timed out: no result in time.
    pub timed_out: AtomicU64,
    /// Results that matched no waiting job (too late, or unknown).
    pub late_dropped: AtomicU64,
    /// Jobs answered as failed: gearmand could not be reached.
    pub failed: AtomicU64,
}

/// The distributing thread; dropped, it answers what waits and stops.
pub struct Distribute {
    tx: Sender<Cmd>,
    waker: Arc<Waker>,
    margin: Duration,
    stop: Arc<AtomicBool>,
    next: AtomicU64,
    thread: Option<JoinHandle<()>>,
    routing: super::routing::Routing,
    /// Counters.
    pub stats: Arc<DistributeStats>,
}

impl std::fmt::Debug for Distribute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distribute").finish_non_exhaustive()
    }
}

/// This instance's result queue: unique per host and process.
pub fn result_queue() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!("check_results_pidring_{host}_{}", std::process::id())
}

impl Distribute {
    /// Start the thread for gearmand at `server` (`host:port`).
    pub fn start(server: &str, crypt: Crypt) -> std::io::Result<Distribute> {
        Distribute::start_with_margin(server, crypt, MARGIN)
    }

    /// [`Distribute::start`] with another margin past each job's timeout.
    pub fn start_with_margin(
        server: &str,
        crypt: Crypt,
        margin: Duration,
    ) -> std::io::Result<Distribute> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let waker = Arc::new(Waker::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(DistributeStats::default());
        let mut t = Thread {
            server: server.to_string(),
            crypt,
            queue: result_queue(),
            rx,
            waker: waker.clone(),
            stop: stop.clone(),
            stats: stats.clone(),
            margin,
            pending: HashMap::new(),
            by_key: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name("pidring-nagios-gm".into())
            .spawn(move || t.run())?;
        tracing::info!(server, result_queue = %result_queue(), "nagios jobs go through gearmand");
        Ok(Distribute {
            tx,
            waker,
            margin,
            stop,
            next: AtomicU64::new(1 << 62),
            thread: Some(thread),
            routing: super::routing::Routing::plain(),
            stats,
        })
    }

    /// Route jobs to hostgroup and servicegroup queues as `routing` says
    /// (default: `service` and `host` only).
    pub fn route_by(mut self, routing: super::routing::Routing) -> Distribute {
        self.routing = routing;
        self
    }

    /// Queue one core job; `deliver` gets its result exactly once. Returns its id.
    pub fn submit(&self, job: Job, timeout: Duration, deliver: Deliver) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let queue = self.routing.queue(&job.host_name, &job.service_description);
        let _ = self.tx.send(Cmd::Submit {
            id,
            job: Box::new(job),
            queue,
            deadline: Instant::now() + timeout + self.margin,
            deliver,
        });
        self.waker.wake();
        id
    }

    /// Answer a waiting job as cancelled now (its core connection ended).
    pub fn cancel(&self, id: u64) {
        let _ = self.tx.send(Cmd::Cancel(id));
        self.waker.wake();
    }
}

impl Drop for Distribute {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Thread {
    server: String,
    crypt: Crypt,
    queue: String,
    rx: Receiver<Cmd>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    stats: Arc<DistributeStats>,
    margin: Duration,
    pending: HashMap<u64, Pend>,
    by_key: HashMap<(String, String, String), VecDeque<u64>>,
}

/// A result for the core, from what gearmand said or did not say.
fn result(
    p: &Pend,
    outcome: Outcome,
    exit: Option<ExitStatus>,
    out: String,
    start: f64,
    finish: f64,
) -> CheckResult {
    let us = |s: f64| (s * 1e6) as u64;
    let state = match &outcome {
        Outcome::Exited { code } => State::from_exit_code(*code).unwrap_or(State::Unknown),
        _ => State::Unknown,
    };
    let data = out.into_bytes();
    CheckResult {
        id: p.id,
        tag: None,
        outcome,
        state,
        reason: String::new(),
        exit,
        pid: None,
        plugin: PluginOutput::parse(&data),
        stdout: Output {
            data,
            ..Output::default()
        },
        stderr: Output::default(),
        output_cut: false,
        timings: Timings {
            submitted_unix_us: pidring::result::unix_us(p.submitted),
            started_unix_us: us(start),
            exited_unix_us: us(finish),
            run: Duration::from_secs_f64((finish - start).max(0.0)),
            ..Timings::default()
        },
        rusage: None,
        cgroup: None,
    }
}

fn failed(p: &Pend, errno: i32, message: String) -> CheckResult {
    let now = crate::gearman::checks::now_secs();
    result(
        p,
        Outcome::SpawnFailed {
            errno: Some(errno),
            message,
        },
        None,
        String::new(),
        now,
        now,
    )
}

impl Thread {
    fn run(&mut self) {
        let mut backoff = Duration::from_millis(100);
        while !self.stop.load(Ordering::SeqCst) {
            match self.connect() {
                Ok(s) => {
                    backoff = Duration::from_millis(100);
                    tracing::info!(server = %self.server, "connected to gearmand for the core's jobs");
                    if let Err(e) = self.serve(s) {
                        tracing::warn!(server = %self.server, "gearmand connection lost: {e}; reconnecting");
                    }
                }
                Err(e) => tracing::warn!(server = %self.server, "cannot connect to gearmand: {e}"),
            }
            // Meanwhile, jobs are answered as failed, and deadlines still run.
            let end = Instant::now() + backoff;
            while Instant::now() < end && !self.stop.load(Ordering::SeqCst) {
                self.commands(None);
                self.expire();
                std::thread::sleep(Duration::from_millis(20));
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        for (_, p) in self.pending.drain() {
            let r = failed(
                &p,
                libc::ECANCELED,
                "pidring: the worker is shutting down".into(),
            );
            (p.deliver)(r);
        }
    }

    fn connect(&self) -> std::io::Result<TcpStream> {
        let a = self
            .server
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "no address"))?;
        let s = TcpStream::connect_timeout(&a, CONNECT_TIMEOUT)?;
        s.set_nodelay(true)?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        s.set_nonblocking(true)?;
        Ok(s)
    }

    fn serve(&mut self, mut s: TcpStream) -> Result<(), String> {
        let mut out = packet::request(Kind::CanDo, &[self.queue.as_bytes()]);
        out.extend(packet::request(Kind::GrabJob, &[]));
        let mut d = Decoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut asleep = false;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            self.commands(Some(&mut out));
            self.expire();
            if !out.is_empty() {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                let w = s.write_all(&out);
                s.set_nonblocking(true).map_err(|e| e.to_string())?;
                w.map_err(|e| format!("write: {e}"))?;
                out.clear();
            }
            let waker_fd = self.waker.fd();
            let mut fds = [
                PollFd::new(&s, PollFlags::IN),
                PollFd::new(&waker_fd, PollFlags::IN),
            ];
            let ts = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 200_000_000,
            };
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(format!("poll: {e}")),
            }
            let readable = !fds[0].revents().is_empty();
            if !fds[1].revents().is_empty() {
                self.waker.reset();
            }
            if !readable {
                continue;
            }
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return Err("gearmand closed the connection".into()),
                    Ok(n) => d.feed(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
            while let Some(p) = d.next_packet().map_err(|e| e.to_string())? {
                match p.kind {
                    Kind::JobAssign => {
                        self.on_result(&p.args[2]);
                        packet::complete_and_grab(&p.args[0], &mut out);
                    }
                    Kind::NoJob => {
                        packet::encode_into(packet::REQ, Kind::PreSleep, &[], &mut out);
                        asleep = true;
                    }
                    Kind::Noop if asleep => {
                        asleep = false;
                        packet::encode_into(packet::REQ, Kind::GrabJob, &[], &mut out);
                    }
                    Kind::Error => {
                        tracing::warn!(server = %self.server, "gearmand error: {}", p.text(1));
                    }
                    _ => {}
                }
            }
        }
    }

    /// Take submits and cancels; with no connection, answer submits as failed.
    fn commands(&mut self, mut out: Option<&mut Vec<u8>>) {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Submit {
                    id,
                    mut job,
                    queue,
                    deadline,
                    deliver,
                } => {
                    let now = SystemTime::now();
                    let core = now
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0);
                    job.core_time = core;
                    job.core_time_text = format!("{core:.6}");
                    job.result_queue = self.queue.clone();
                    let key = (
                        job.host_name.clone(),
                        job.service_description.clone(),
                        job.core_time_text.clone(),
                    );
                    let p = Pend {
                        id,
                        key: key.clone(),
                        deadline,
                        submitted: now,
                        timeout: Duration::from_secs(job.timeout),
                        deliver,
                    };
                    match out.as_deref_mut() {
                        Some(out) => {
                            let sealed = self.crypt.seal(job.to_text().as_bytes());
                            packet::encode_into(
                                packet::REQ,
                                Kind::SubmitJobBg,
                                &[queue.as_bytes(), b"", &sealed],
                                out,
                            );
                            self.stats.submitted.fetch_add(1, Ordering::Relaxed);
                            self.by_key.entry(key).or_default().push_back(id);
                            self.pending.insert(id, p);
                        }
                        None => {
                            self.stats.failed.fetch_add(1, Ordering::Relaxed);
                            let r = failed(
                                &p,
                                libc::ENOTCONN,
                                format!("pidring: gearmand at {} cannot be reached", self.server),
                            );
                            (p.deliver)(r);
                        }
                    }
                }
                Cmd::Cancel(id) => {
                    if let Some(p) = self.take(id) {
                        let r = failed(&p, libc::ECANCELED, "pidring: cancelled".into());
                        (p.deliver)(r);
                    }
                }
            }
        }
    }

    fn take(&mut self, id: u64) -> Option<Pend> {
        let p = self.pending.remove(&id)?;
        if let Some(q) = self.by_key.get_mut(&p.key) {
            q.retain(|&x| x != id);
            if q.is_empty() {
                self.by_key.remove(&p.key);
            }
        }
        Some(p)
    }

    /// Answer the jobs whose result did not come in time.
    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(p) = self.take(id) {
                self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                let msg = format!(
                    "pidring: no result from gearmand within {}s (timeout {}s + {}s)",
                    (p.timeout + self.margin).as_secs(),
                    p.timeout.as_secs(),
                    self.margin.as_secs()
                );
                let r = failed(&p, libc::ETIME, msg);
                (p.deliver)(r);
            }
        }
    }

    /// A result from the queue: match it to its job and answer the core.
    fn on_result(&mut self, data: &[u8]) {
        let Some(a) = self.crypt.open(data).ok().and_then(|t| Answer::parse(&t)) else {
            self.stats.late_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("a result on the result queue does not open: dropped");
            return;
        };
        let key = (
            a.host_name.clone(),
            a.service_description.clone(),
            a.core_start_time.clone(),
        );
        let id = self.by_key.get(&key).and_then(|q| q.front().copied());
        let Some(p) = id.and_then(|id| self.take(id)) else {
            self.stats.late_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::info!(host = %a.host_name, service = %a.service_description, "a result came after its job was answered: dropped");
            return;
        };
        self.stats.answered.fetch_add(1, Ordering::Relaxed);
        let code = a.return_code;
        let r = result(
            &p,
            Outcome::Exited { code },
            Some(ExitStatus::Exited { code }),
            a.output.clone(),
            a.start_time,
            a.finish_time,
        );
        (p.deliver)(r);
    }
}
