//! The socket, its connections, and the shutdown sequence.
//!
//! Each connection has a reader thread (parses requests, submits checks) and
//! a writer thread (drains a bounded queue of responses to the socket). The
//! engine delivers results on its loop thread, which must never block: the
//! result callback only does `try_send` into the connection's queue. That
//! queue holds at most `max_client_queue` lines because every queued
//! response and every check in flight holds one of the connection's
//! slots, and the reader takes a slot before it reads the next request — so a client that
//! does not read its answers stops being read (backpressure), and one whose
//! socket takes no bytes for `client_write_timeout` is dropped.
//!
//! Slots bound the number of answers a connection holds, not their size:
//! each check in flight also holds `check_bytes` (and every other request
//! `answer_bytes`) of the connection's `max_client_bytes` and of the
//! daemon's `max_total_bytes` until its answer is written, taken before it
//! is submitted (a submit waits for them), so a client that reads slowly
//! while its checks flood their output holds at most that much.

use super::config::{DaemonConfig, answer_bytes, check_bytes};
use super::protocol::{
    self, ClientId, DaemonCounters, ErrorCode, Request, RequestError, Response, SubmitRequest,
};
use super::{DaemonError, prometheus};
use crossbeam_channel::{Receiver, Sender};
use pidring::check::Check;
use pidring::error::SubmitError;
use pidring::executor::{CheckId, Executor};
use rustix::event::{PollFd, PollFlags};
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes of responses written to a socket in one `write`.
const WRITE_BATCH: usize = 64 * 1024;
/// How long shutdown waits for killed checks to be reaped before it stops
/// without them (ones it may not signal, or stuck in the kernel).
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long shutdown waits for writers to flush before cutting connections.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Daemon-wide counters (atomics: touched from every connection thread).
#[derive(Default)]
pub(crate) struct Stats {
    connections_accepted: AtomicU64,
    connections_open: AtomicU64,
    requests: AtomicU64,
    submits_accepted: AtomicU64,
    results_sent: AtomicU64,
    results_dropped: AtomicU64,
    errors: AtomicU64,
    errors_by_code: [AtomicU64; ErrorCode::ALL.len()],
    clients_dropped_stuck: AtomicU64,
    clients_gone_in_flight: AtomicU64,
    shutting_down: AtomicBool,
    metrics_address: OnceLock<String>,
}

impl Stats {
    fn count_error(&self, code: ErrorCode) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code) {
            self.errors_by_code[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A copy for `stats` and Prometheus.
    pub(crate) fn snapshot(&self) -> DaemonCounters {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DaemonCounters {
            connections_accepted: get(&self.connections_accepted),
            connections_open: get(&self.connections_open),
            requests: get(&self.requests),
            submits_accepted: get(&self.submits_accepted),
            results_sent: get(&self.results_sent),
            results_dropped: get(&self.results_dropped),
            errors: get(&self.errors),
            errors_by_code: ErrorCode::ALL
                .iter()
                .zip(&self.errors_by_code)
                .map(|(c, n)| (c.as_str().to_string(), get(n)))
                .collect(),
            clients_dropped_stuck: get(&self.clients_dropped_stuck),
            clients_gone_in_flight: get(&self.clients_gone_in_flight),
            metrics_address: self.metrics_address.get().cloned(),
            shutting_down: self.shutting_down.load(Ordering::Relaxed),
        }
    }
}

/// What every connection thread shares.
pub(crate) struct Daemon {
    pub(crate) exec: Arc<Executor>,
    /// The configuration in force (replaced by a reload).
    config: RwLock<Arc<DaemonConfig>>,
    /// Who checks run as and what may run (replaced by a reload).
    pub(crate) policy: Arc<pidring::policy::SharedPolicy>,
    pub(crate) stats: Arc<Stats>,
    /// The `[gearman]` worker's counters, when it runs.
    pub(crate) gearman: Option<crate::gearman::GearmanStatsHandle>,
    /// The bytes all connections together may hold (`max_total_bytes`).
    pub(crate) budget: Arc<SharedBudget>,
}

/// Bytes reserved across all connections, within `max_total_bytes`: each
/// connection's own limit bounds one client, this bounds them all.
pub(crate) struct SharedBudget {
    used: AtomicUsize,
    limit: AtomicUsize,
}

impl SharedBudget {
    pub(crate) fn new(limit: usize) -> SharedBudget {
        SharedBudget {
            used: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
        }
    }

    /// Take `bytes` if they fit (always when nothing is held, so one
    /// reservation larger than what is left can still go ahead alone).
    fn try_take(&self, bytes: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        let limit = self.limit.load(Ordering::Relaxed);
        loop {
            if used != 0 && used.saturating_add(bytes) > limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + bytes,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

impl Daemon {
    /// The configuration in force now.
    pub(crate) fn config(&self) -> Arc<DaemonConfig> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn stats_response(&self, id: Option<ClientId>) -> Response {
        Response::Stats {
            id,
            engine: Box::new(self.exec.metrics()),
            daemon: self.stats.snapshot(),
            gearman: self.gearman.as_ref().map(|g| Box::new(g.snapshot())),
        }
    }
}

/// A message for a connection's writer.
enum Outgoing {
    /// A response line: it holds one slot and these bytes (a result: what
    /// its check reserved; other lines: none).
    Line(Response, usize),
    /// Re-check whether the connection is finished (holds no slot).
    Wake,
}

/// One client connection.
struct Conn {
    /// Connection number, for logs.
    no: u64,
    stream: UnixStream,
    stats: Arc<Stats>,
    tx: Sender<Outgoing>,
    /// What is in use: slots (checks in flight plus queued responses plus
    /// the request being handled) and bytes (reserved by checks in flight
    /// and by their queued results).
    held: Mutex<Held>,
    slot_freed: Condvar,
    /// `max_client_queue` and `max_client_bytes` (a reload changes them).
    slot_limit: AtomicUsize,
    byte_limit: AtomicUsize,
    /// The daemon-wide budget this connection's bytes are also taken from.
    budget: Arc<SharedBudget>,
    /// Ids in flight on this connection → the engine's id (None while submitting).
    in_flight: Mutex<HashMap<ClientId, Option<CheckId>>>,
    /// Checks in flight whose result has not been queued yet.
    in_flight_count: AtomicUsize,
    /// The client closed its sending side.
    reader_done: AtomicBool,
    /// The client closed its end entirely, seen while the reader waited.
    hung_up: AtomicBool,
    /// The daemon is shutting down: finish once everything is written.
    finishing: AtomicBool,
    /// Nothing more will be written (finished or dropped).
    closed: AtomicBool,
    /// Shutdown stopped without the results still in flight (checks that
    /// could not be killed): the writer finishes without waiting for them.
    abandoned: AtomicBool,
    /// Held while queueing a line and while closing, so a line is either
    /// queued before the close (and drained, counted) or sees `closed`.
    queue_gate: Mutex<()>,
}

/// A connection's share of its limits in use.
#[derive(Default)]
struct Held {
    slots: usize,
    bytes: usize,
}

impl Conn {
    /// Take a slot, waiting while all are used. False if the connection closed.
    fn acquire_slot(&self) -> bool {
        let limit = self.slot_limit.load(Ordering::Relaxed);
        self.acquire(|held| (held.slots < limit).then(|| held.slots += 1))
    }

    /// Reserve `bytes` for a check's result or an answer, from this
    /// connection's limit and the daemon's, waiting while they do not fit
    /// (they always fit when nothing else holds any: `validate` makes
    /// `max_client_bytes` hold the largest). False if the connection closed.
    fn acquire_bytes(&self, bytes: usize) -> bool {
        self.acquire(|held| {
            let limit = self.byte_limit.load(Ordering::Relaxed);
            let fits = held.bytes == 0 || held.bytes.saturating_add(bytes) <= limit;
            (fits && self.budget.try_take(bytes)).then(|| held.bytes += bytes)
        })
    }

    /// Wait until `take` succeeds, the connection closes, or the client
    /// hangs up (then `hung_up` is set).
    fn acquire(&self, mut take: impl FnMut(&mut Held) -> Option<()>) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.closed.load(Ordering::SeqCst) || self.hung_up.load(Ordering::SeqCst) {
                return false;
            }
            if take(&mut held).is_some() {
                return true;
            }
            // Short: room freed by other connections (the shared budget)
            // wakes nobody here.
            let (h, waited) = self
                .slot_freed
                .wait_timeout(held, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner());
            held = h;
            if waited.timed_out() && self.peer_hung_up(Duration::ZERO) == Ok(true) {
                self.hung_up.store(true, Ordering::SeqCst);
                return false;
            }
        }
    }

    /// Whether the client closes its end entirely within `wait` (not just
    /// its sending side: a half-closed client still reads its answers).
    fn peer_hung_up(&self, wait: Duration) -> Result<bool, rustix::io::Errno> {
        let mut fds = [PollFd::new(&self.stream, PollFlags::empty())];
        let wait = rustix::time::Timespec {
            tv_sec: wait.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: wait.subsec_nanos().into(),
        };
        rustix::event::poll(&mut fds, Some(&wait))?;
        Ok(fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR))
    }

    fn release(&self, slots: usize, bytes: usize) {
        if slots == 0 && bytes == 0 {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.slots = held.slots.saturating_sub(slots);
        let bytes = bytes.min(held.bytes);
        held.bytes -= bytes;
        self.budget.give_back(bytes);
        self.slot_freed.notify_all();
    }

    /// Queue a response that holds a slot; on a closed connection it is dropped.
    fn send(&self, response: Response) {
        self.send_holding(response, 0);
    }

    /// Queue a response that holds a slot and `bytes` of the budget (an
    /// answer that echoes the request's id); on a closed connection it is
    /// dropped.
    fn send_holding(&self, response: Response, bytes: usize) {
        let code = match &response {
            Response::Error { code, .. } => Some(*code),
            _ => None,
        };
        if !self.queue(Outgoing::Line(response, bytes)) {
            self.release(1, bytes);
        } else if let Some(code) = code {
            self.stats.count_error(code);
        }
    }

    /// Put a line in the writer's queue unless the connection is closed. Never blocks
    /// for long: the gate is only held around a `try_send`.
    fn queue(&self, m: Outgoing) -> bool {
        let _gate = self.queue_gate.lock().unwrap_or_else(|p| p.into_inner());
        if self.closed.load(Ordering::SeqCst) {
            return false;
        }
        // Unbounded: fails only when the writer is gone.
        self.tx.try_send(m).is_ok()
    }

    fn wake_writer(&self) {
        let _ = self.tx.try_send(Outgoing::Wake);
    }

    /// The engine's result callback. Runs on the loop thread: never blocks
    /// (the queue has room, reserved by the slot this check holds). The
    /// result goes on holding the check's `reserved` bytes until written.
    fn deliver(
        &self,
        id: ClientId,
        tags: Option<Box<serde_json::value::RawValue>>,
        result: pidring::CheckResult,
        reserved: usize,
    ) {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let line = Outgoing::Line(
            Response::Result {
                id,
                tags,
                result: Box::new(result),
            },
            reserved,
        );
        if !self.queue(line) {
            self.stats.results_dropped.fetch_add(1, Ordering::Relaxed);
            self.release(1, reserved);
        }
        // After the send, so a writer that sees zero in flight also sees the line.
        // The writer may already have taken that line and gone back to sleep
        // while the count still read 1: wake it so it sees it is finished.
        if self.in_flight_count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.wake_writer();
        }
    }

    /// Whether the writer may finish: nothing in flight, nothing queued, and
    /// the client stopped sending or the daemon is stopping.
    fn is_finished(&self, rx: &Receiver<Outgoing>) -> bool {
        // Closed (cut at shutdown): results still owed never come.
        self.closed.load(Ordering::SeqCst)
            || ((self.reader_done.load(Ordering::SeqCst) || self.finishing.load(Ordering::SeqCst))
                && (self.in_flight_count.load(Ordering::SeqCst) == 0
                    || self.abandoned.load(Ordering::SeqCst))
                && rx.is_empty())
    }

    /// Shutdown goes on without the results still in flight (their checks
    /// could not be killed): answer each with an error saying so, and let
    /// the writer finish once those are written. How many there were.
    fn abandon_in_flight(&self) -> usize {
        let ids: Vec<ClientId> = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(id, _)| id)
            .collect();
        for id in &ids {
            let message = "the daemon stopped without this check's result: its process could not \
                           be killed (see the daemon's log); it may still be running"
                .to_string();
            let e = RequestError::new(ErrorCode::ShuttingDown, message)
                .about(Some(id.clone()), Some("submit"));
            self.send(e.into_response());
        }
        self.abandoned.store(true, Ordering::SeqCst);
        self.wake_writer();
        ids.len()
    }

    /// Cancel every check of this connection still in flight (nobody will read the results).
    fn cancel_in_flight(&self, exec: &Executor) -> usize {
        let ids: Vec<CheckId> = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flatten()
            .copied()
            .collect();
        for id in &ids {
            exec.cancel(*id);
        }
        ids.len()
    }

    /// Stop writing: later results are dropped and counted.
    fn close(&self, rx: &Receiver<Outgoing>) {
        {
            let _gate = self.queue_gate.lock().unwrap_or_else(|p| p.into_inner());
            self.closed.store(true, Ordering::SeqCst);
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let (mut slots, mut bytes) = (0, 0);
        while let Ok(m) = rx.try_recv() {
            if let Outgoing::Line(r, held) = m {
                if matches!(r, Response::Result { .. }) {
                    self.stats.results_dropped.fetch_add(1, Ordering::Relaxed);
                }
                slots += 1;
                bytes += held;
            }
        }
        self.release(slots, bytes);
        self.slot_freed.notify_all();
    }
}

/// Removes the socket file on drop, if it is still the one we bound.
struct SocketGuard {
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl SocketGuard {
    fn remove(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.dev_ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Create the socket: refuse a live one, replace a stale one, set mode and group.
fn bind_socket(config: &DaemonConfig) -> Result<(UnixListener, SocketGuard), DaemonError> {
    let path = config.socket_path();
    let sock_err = |what, source| DaemonError::Socket {
        what,
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        // Private unless the socket itself is meant to be shared. Only the
        // socket's own directory (`/run/pidring`): a mistyped path must not
        // leave a tree of directories behind.
        let mode = if config.socket_mode & 0o077 == 0 {
            0o700
        } else {
            0o755
        };
        std::fs::DirBuilder::new()
            .recursive(false)
            .mode(mode)
            .create(dir)
            .map_err(|e| DaemonError::Socket {
                what: "create directory",
                path: dir.to_owned(),
                source: e,
            })?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        check_socket_dir(dir)?;
    }
    match std::fs::symlink_metadata(&path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(DaemonError::NotASocket { path });
            }
            match UnixStream::connect(&path) {
                Ok(_) => return Err(DaemonError::SocketInUse { path }),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    tracing::warn!(socket = %path.display(), "removing stale socket (no daemon answers on it)");
                    std::fs::remove_file(&path).map_err(|e| sock_err("remove stale socket", e))?;
                }
                Err(e) => return Err(sock_err("probe existing socket", e)),
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err("inspect", e)),
    }
    // Bind under a strict umask so the socket is never, even briefly, more
    // open than asked. No check runs yet (the executor starts later), so the
    // process-wide umask change reaches nobody else.
    // Bound now, listening only once its owner and mode are final: a client
    // that can connect sees the socket as configured.
    let socket = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| sock_err("create", e.into()))?;
    let addr = rustix::net::SocketAddrUnix::new(&path).map_err(|e| sock_err("bind", e.into()))?;
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = rustix::net::bind(&socket, &addr);
    rustix::process::umask(old);
    bound.map_err(|e| sock_err("bind", e.into()))?;
    let meta = std::fs::symlink_metadata(&path).map_err(|e| sock_err("inspect", e))?;
    let guard = SocketGuard {
        path: path.clone(),
        dev_ino: (meta.dev(), meta.ino()),
    };
    if let Some(group) = &config.socket_group {
        let gid = resolve_group(group).map_err(|m| DaemonError::Invalid(m.to_string()))?;
        std::os::unix::fs::chown(&path, None, Some(gid)).map_err(|e| sock_err("chown", e))?;
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(config.socket_mode))
        .map_err(|e| sock_err("chmod", e))?;
    rustix::net::listen(&socket, 1024).map_err(|e| sock_err("listen", e.into()))?;
    let listener = UnixListener::from(socket);
    listener
        .set_nonblocking(true)
        .map_err(|e| sock_err("configure", e))?;
    Ok((listener, guard))
}

/// Refuse a socket directory that someone else controls: owned by another
/// (non-root) user, or writable by others without the sticky bit — they
/// could swap the socket for their own.
fn check_socket_dir(dir: &std::path::Path) -> Result<(), DaemonError> {
    let meta = std::fs::metadata(dir).map_err(|e| DaemonError::Socket {
        what: "inspect directory",
        path: dir.to_owned(),
        source: e,
    })?;
    let me = rustix::process::getuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(DaemonError::UnsafeDirectory(format!(
            "socket directory {} belongs to uid {}, not to this user (uid {me}); pick another --socket",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o002 != 0 && meta.mode() & 0o1000 == 0 {
        return Err(DaemonError::UnsafeDirectory(format!(
            "socket directory {} is world-writable without the sticky bit; pick another --socket",
            dir.display()
        )));
    }
    Ok(())
}

/// A group name (from /etc/group) or number.
fn resolve_group(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group to find group {group:?}: {e}"))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?.parse::<u32>().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| format!("socket_group {group:?}: no such group in /etc/group"))
}

/// The daemon's main thread: bind, serve until a signal, shut down.
pub(crate) fn run(config: DaemonConfig, reload: Option<super::Reload>) -> Result<(), DaemonError> {
    // Signals first, so a SIGTERM during startup still means a clean stop.
    let signals = Signals::take()?;
    let (mut running, listener) = Running::start(config)?;
    while running.turn(&listener, &signals, reload.as_ref()) {}
    // 1. Stop accepting (gearman jobs too), and let no other daemon's socket be removed later.
    running.stop_accepting(listener);
    // 2. Let in-flight checks finish, up to the drain timeout; a second signal cuts it short.
    running.drain(&signals);
    // 3. The Nagios and gearman connections answer what they hold.
    running.stop_workers();
    // 4. Kill, sweep and reap what is left; every accepted check is answered.
    running.kill_the_rest();
    // 5. Flush every answer, then close the connections.
    running.close_connections();
    Ok(())
}

/// The daemon's signals: the stop signals write to a pipe the loop polls,
/// the ignored ones (SIGHUP among them) set flags it reads each turn.
struct Signals {
    /// The read end of the stop signals' pipe (non-blocking).
    rx: UnixStream,
    /// Its write end, kept open for as long as the daemon runs.
    _tx: UnixStream,
    /// Each ignored signal with the flag its handler sets.
    ignored: Vec<(i32, Arc<AtomicBool>)>,
}

impl Signals {
    /// Take over every signal whose default action would end the daemon.
    fn take() -> Result<Signals, DaemonError> {
        let (rx, tx) = UnixStream::pair().map_err(DaemonError::Signals)?;
        // A mask inherited with them blocked (a parent that blocked SIGTERM
        // before exec) would leave them pending forever: no handler would run.
        // Threads started from here on inherit the unblocked mask.
        super::change_signal_mask(libc::SIG_UNBLOCK, &super::taken_signals())
            .map_err(DaemonError::Signals)?;
        for sig in super::STOP_SIGNALS {
            let tx = tx.try_clone().map_err(DaemonError::Signals)?;
            signal_hook::low_level::pipe::register(sig, tx).map_err(DaemonError::Signals)?;
        }
        rx.set_nonblocking(true).map_err(DaemonError::Signals)?;
        // SIGHUP (a closed terminal, a `reload`), SIGUSR1 (a log rotation)…
        // must not kill the daemon uncleanly; they mean nothing to it, so they
        // are ignored (and logged).
        let mut ignored = Vec::new();
        for sig in super::IGNORED_SIGNALS {
            let flag = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(sig, flag.clone()).map_err(DaemonError::Signals)?;
            ignored.push((sig, flag));
        }
        Ok(Signals {
            rx,
            _tx: tx,
            ignored,
        })
    }
}

/// What the daemon serves with, from `start` to `close_connections`.
struct Running {
    daemon: Arc<Daemon>,
    socket_guard: SocketGuard,
    /// Taken by `stop_workers`.
    nagios: Option<crate::nagios::NagiosWorkers>,
    gearman: Option<crate::gearman::GearmanWorkers>,
    conns: Vec<(Arc<Conn>, JoinHandle<()>)>,
    acceptor: Acceptor,
}

impl Running {
    /// Set up everything the daemon serves with, and say it is ready; the
    /// listener comes apart so that shutdown can drop it first.
    fn start(config: DaemonConfig) -> Result<(Running, UnixListener), DaemonError> {
        // Users looked up once, here: the child that runs a check cannot.
        let policy = config.policy().map_err(DaemonError::Invalid)?;
        warn_about_policy(&config, &policy);
        let policy = Arc::new(pidring::policy::SharedPolicy::new(policy));
        let (listener, socket_guard) = bind_socket(&config)?;
        let exec = Arc::new(build_executor(&config)?);
        default_caps_enforceable(&config, &exec).map_err(DaemonError::Invalid)?;
        // After the executor raised RLIMIT_NOFILE: what is left for clients.
        let mut config = config;
        fit_clients_to_descriptors(&mut config, exec.containment().mode == "cgroup");
        let (nagios, gearman) = spawn_protocol_workers(&config, &exec, &policy)?;
        let daemon = Arc::new(Daemon {
            exec,
            budget: Arc::new(SharedBudget::new(config.max_total_bytes)),
            config: RwLock::new(Arc::new(config)),
            policy,
            stats: Arc::new(Stats::default()),
            gearman: gearman.as_ref().map(|g| g.stats_handle()),
        });
        serve_metrics(&daemon)?;
        let config = daemon.config();
        tracing::info!(
            socket = %socket_guard.path.display(),
            backend = %daemon.exec.backend(),
            max_running = config.max_running,
            queue_limit = config.queue_limit,
            pid = std::process::id(),
            "pidring daemon ready"
        );
        let running = Running {
            daemon,
            socket_guard,
            nagios,
            gearman,
            conns: Vec::new(),
            acceptor: Acceptor::default(),
        };
        Ok((running, listener))
    }

    /// One turn of the main loop: wait for a client or a signal (at most
    /// half a second), prune ended connections, handle ignored signals,
    /// accept. False when the daemon is to stop.
    fn turn(
        &mut self,
        listener: &UnixListener,
        signals: &Signals,
        reload: Option<&super::Reload>,
    ) -> bool {
        let mut fds = [
            PollFd::new(listener, PollFlags::IN),
            PollFd::new(&signals.rx, PollFlags::IN),
        ];
        // Wake now and then to close the sockets of connections that ended
        // (their threads are done; `conns` still holds the socket).
        let prune_every = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 500_000_000,
        };
        let polled = rustix::event::poll(&mut fds, Some(&prune_every));
        self.conns.retain(|(_, h)| !h.is_finished());
        self.on_ignored_signals(signals, reload);
        match polled {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return true,
            Err(e) => {
                tracing::error!(error = %e, "poll on the listening socket failed; shutting down");
                return false;
            }
        }
        let (listen_ready, signalled) =
            (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if signalled && drain_signals(&signals.rx) {
            tracing::info!("signal received: shutting down");
            return false;
        }
        if listen_ready {
            accept_all(listener, &self.daemon, &mut self.conns, &mut self.acceptor);
        }
        true
    }

    /// The ignored signals that came since the last turn: a SIGHUP reloads
    /// when there is a config file to reread, the others are only logged.
    fn on_ignored_signals(&mut self, signals: &Signals, reload: Option<&super::Reload>) {
        for (sig, flag) in &signals.ignored {
            if !flag.swap(false, Ordering::Relaxed) {
                continue;
            }
            match reload {
                Some(r) if *sig == libc::SIGHUP => reload_config(
                    &self.daemon,
                    r,
                    &self.conns,
                    &mut self.nagios,
                    &mut self.gearman,
                ),
                _ => {
                    let name = pidring::result::signal_name(*sig);
                    tracing::info!("{name} ignored (stop with SIGTERM)");
                }
            }
        }
    }

    /// Shutdown's first step: no new client, no new gearman job, and the
    /// socket file removed while it is still ours.
    fn stop_accepting(&mut self, listener: UnixListener) {
        self.daemon
            .stats
            .shutting_down
            .store(true, Ordering::SeqCst);
        if let Some(g) = &self.gearman {
            g.begin_stop();
        }
        drop(listener);
        self.socket_guard.remove();
    }

    /// Wait for the checks in flight to finish, until the drain timeout
    /// passes or a second signal says to stop now.
    fn drain(&self, signals: &Signals) {
        let exec = &self.daemon.exec;
        let drain = self.daemon.config().drain_timeout;
        let deadline = Instant::now() + drain;
        let outstanding = exec.outstanding();
        if outstanding > 0 {
            tracing::info!(
                outstanding,
                drain_timeout = ?drain,
                "waiting for in-flight checks (send the signal again to stop now)"
            );
        }
        while exec.outstanding() > 0 {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    outstanding = exec.outstanding(),
                    "drain timeout passed: killing the remaining checks"
                );
                break;
            }
            let wait = (deadline - now).min(Duration::from_millis(20));
            let mut fds = [PollFd::new(&signals.rx, PollFlags::IN)];
            let ts = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: wait.as_nanos() as i64,
            };
            if rustix::event::poll(&mut fds, Some(&ts)).unwrap_or(0) > 0
                && drain_signals(&signals.rx)
            {
                tracing::warn!(
                    outstanding = exec.outstanding(),
                    "second signal: killing the remaining checks now"
                );
                break;
            }
        }
    }

    /// Stop the Nagios connections, which answer their in-flight jobs
    /// (cancelled), then the gearman ones, which answer (and complete) what
    /// finished and kill the rest.
    fn stop_workers(&mut self) {
        if let Some(workers) = self.nagios.take() {
            let s = workers.stop();
            tracing::info!(?s, "nagios worker connections stopped");
        }
        if let Some(workers) = self.gearman.take() {
            let s = workers.stop();
            tracing::info!(stats = %serde_json::to_string(&s).unwrap_or_default(), "gearman worker connections stopped");
        }
    }

    /// Kill, sweep and reap every check left. In subreaper mode the
    /// executor's shutdown also kills and reaps every adopted descendant
    /// (escaped, or a group member killed by the sweep). Checks that
    /// outlive the kill wait are answered with an error.
    fn kill_the_rest(&self) {
        let exec = &self.daemon.exec;
        if !exec.shutdown_within(KILL_WAIT) {
            let unanswered: usize = self.conns.iter().map(|(c, _)| c.abandon_in_flight()).sum();
            tracing::error!(
                running = exec.running(),
                unanswered,
                "checks still running {KILL_WAIT:?} after SIGKILL: they may not be signalled \
                 (they run as another user, through sudo or a setuid program) or are stuck in the \
                 kernel (a hung mount); stopping without them (their clients are told so)"
            );
        }
    }

    /// Let every connection write what it owes (up to `FLUSH_TIMEOUT` for
    /// them all), cut those that do not take it, and say the daemon stopped.
    fn close_connections(self) {
        let Running {
            daemon,
            socket_guard,
            conns,
            ..
        } = self;
        for (c, _) in &conns {
            c.finishing.store(true, Ordering::SeqCst);
            c.wake_writer();
        }
        let flush_end = Instant::now() + FLUSH_TIMEOUT;
        for (c, h) in conns {
            while !h.is_finished() && Instant::now() < flush_end {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !h.is_finished() {
                tracing::warn!(
                    conn = c.no,
                    "client did not take its answers in time; closing it"
                );
                c.closed.store(true, Ordering::SeqCst);
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
                // A writer waiting for a result that never comes (its check
                // was left running, unkillable) sees `closed` once woken.
                c.wake_writer();
            }
            let _ = h.join();
        }
        let s = daemon.stats.snapshot();
        tracing::info!(
            connections = s.connections_accepted,
            submits = s.submits_accepted,
            results_sent = s.results_sent,
            results_dropped = s.results_dropped,
            "pidring daemon stopped"
        );
        drop(socket_guard);
    }
}

/// The executor as the config asks, reaping orphans (the daemon is a subreaper).
fn build_executor(config: &DaemonConfig) -> Result<Executor, DaemonError> {
    Ok(Executor::builder()
        .max_running(config.max_running)
        .queue_limit(config.queue_limit)
        .backend(config.backend)
        .cgroup(config.cgroup.clone())
        .realtime_kills(config.realtime_kills)
        .reap_orphans(true)
        .build()?)
}

/// Whether this host can enforce the config's default caps: it refuses
/// ones it cannot (at start and at a reload), rather than run checks
/// without them.
fn default_caps_enforceable(config: &DaemonConfig, exec: &Executor) -> Result<(), String> {
    let defaults = with_caps(
        Check::argv(["/bin/true"]),
        config.memory_max.map(|w| w.0 as u64),
        config.pids_max,
        config.cpu_max,
    );
    match defaults.get_caps().unenforceable(&exec.containment()) {
        Some(why) => Err(format!("the configured default caps: {why}")),
        None => Ok(()),
    }
}

/// The `[nagios]` and `[gearman]` sections' workers, when configured.
fn spawn_protocol_workers(
    config: &DaemonConfig,
    exec: &Arc<Executor>,
    policy: &Arc<pidring::policy::SharedPolicy>,
) -> Result<
    (
        Option<crate::nagios::NagiosWorkers>,
        Option<crate::gearman::GearmanWorkers>,
    ),
    DaemonError,
> {
    let nagios = match &config.nagios {
        Some(n) => Some(crate::nagios::worker::spawn_workers_with_policy(
            n,
            exec.clone(),
            policy.clone(),
        )?),
        None => None,
    };
    let gearman = match &config.gearman {
        Some(g) => {
            // Its jobs run as `user` too (as it is at start: a reload
            // keeps it); `restrict_path` is its allowlist.
            let mut g = g.clone();
            g.run_as = policy.get().run_as.clone();
            Some(crate::gearman::spawn_workers(&g, exec.clone())?)
        }
        None => None,
    };
    Ok((nagios, gearman))
}

/// The Prometheus endpoint, when `metrics` is set; its bound address goes in `stats`.
fn serve_metrics(daemon: &Arc<Daemon>) -> Result<(), DaemonError> {
    if let Some(addr) = daemon.config().metrics {
        let bound = prometheus::serve(addr, daemon.clone())
            .map_err(|source| DaemonError::Metrics { addr, source })?;
        let _ = daemon.stats.metrics_address.set(bound.to_string());
        tracing::info!(address = %bound, "serving Prometheus metrics at http://{bound}/metrics");
    }
    Ok(())
}

/// Say once, loudly, what an operator should know about the policy.
fn warn_about_policy(config: &DaemonConfig, policy: &pidring::policy::Policy) {
    if rustix::process::geteuid().is_root() && policy.run_as.is_none() {
        tracing::warn!(
            "RUNNING CHECKS AS ROOT: this daemon runs as root and no `user` is configured, so every              submitted plugin runs as root; set user = \"nagios\" (or another unprivileged user) in the config"
        );
    }
    if config.socket_mode & 0o077 != 0 && policy.allowed_commands.is_empty() {
        tracing::warn!(
            socket_mode = format!("{:o}", config.socket_mode),
            "the socket is open to a group or others and allowed_commands is empty: anyone who can              connect may run any program as the daemon's user; list the plugins in allowed_commands"
        );
    }
}

/// SIGHUP: re-read the config file and apply what can change live (see
/// PROTOCOL.md "Reload"). A file that does not parse or validate keeps the
/// running configuration. Connections and checks in flight are untouched:
/// a check keeps the limits and identity it was submitted with.
fn reload_config(
    daemon: &Daemon,
    reload: &super::Reload,
    conns: &[(Arc<Conn>, JoinHandle<()>)],
    nagios: &mut Option<crate::nagios::NagiosWorkers>,
    gearman: &mut Option<crate::gearman::GearmanWorkers>,
) {
    let path = reload.path.display();
    let failed = |why: String| {
        tracing::error!("SIGHUP: reload failed, the running configuration is kept: {why}");
    };
    let mut new = match DaemonConfig::load(&reload.path) {
        Ok(c) => c,
        Err(e) => return failed(e.to_string()),
    };
    (reload.overrides)(&mut new);
    if let Err(e) = new.validate() {
        return failed(format!("invalid config file {path}: {e}"));
    }
    let policy = match new.policy() {
        Ok(p) => p,
        Err(e) => return failed(format!("invalid config file {path}: {e}")),
    };
    if let Err(why) = default_caps_enforceable(&new, &daemon.exec) {
        return failed(why);
    }
    let old = daemon.config();
    // What only a restart changes keeps its running value.
    let mut restart = Vec::new();
    macro_rules! keep {
        ($($f:ident),*) => {$(
            if new.$f != old.$f {
                restart.push(stringify!($f));
                new.$f = old.$f.clone();
            }
        )*};
    }
    keep!(socket, socket_mode, socket_group, backend, cgroup, metrics);
    // A [gearman] section added or removed waits for a restart (its
    // counters are wired into `stats` and /metrics at start); changed, it
    // is applied live below.
    if new.gearman.is_some() != old.gearman.is_some() {
        restart.push("gearman");
        new.gearman = old.gearman.clone();
    }
    fit_clients_to_descriptors(&mut new, daemon.exec.containment().mode == "cgroup");
    let mut changed = Vec::new();
    macro_rules! diff {
        ($($f:ident),*) => {$(
            if new.$f != old.$f {
                changed.push(format!("{} {:?} -> {:?}", stringify!($f), old.$f, new.$f));
            }
        )*};
    }
    diff!(
        max_running,
        queue_limit,
        realtime_kills,
        timeout,
        grace,
        output_cap,
        max_output_cap,
        memory_max,
        pids_max,
        cpu_max,
        drain_timeout,
        max_line_bytes,
        max_client_queue,
        max_client_bytes,
        max_total_bytes,
        max_clients,
        client_write_timeout,
        user,
        group,
        allowed_users,
        allowed_commands
    );
    daemon.exec.set_max_running(new.max_running);
    daemon.exec.set_queue_limit(new.queue_limit);
    daemon.exec.set_realtime_kills(new.realtime_kills);
    daemon
        .budget
        .limit
        .store(new.max_total_bytes, Ordering::Relaxed);
    for (c, _) in conns {
        c.slot_limit.store(new.max_client_queue, Ordering::Relaxed);
        c.byte_limit.store(new.max_client_bytes, Ordering::Relaxed);
        let _ = c.stream.set_write_timeout(Some(new.client_write_timeout));
        c.slot_freed.notify_all();
    }
    daemon.policy.set(policy);
    let nagios_note = reload_nagios(daemon, nagios, &old, &mut new);
    let gearman_note = reload_gearman(gearman, &mut new);
    *daemon.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
    let (changed, restart) = super::config::reload_summary(&changed, &restart);
    tracing::info!(
        "SIGHUP: configuration reloaded from {path}: changed {changed}{nagios_note}{gearman_note}{restart}"
    );
}

/// The `[nagios]` part of a reload: connections added, removed (their jobs
/// killed, reaped and answered as on a disconnect), or all started or
/// stopped; the others untouched. `new.nagios` ends as what runs.
fn reload_nagios(
    daemon: &Daemon,
    nagios: &mut Option<crate::nagios::NagiosWorkers>,
    old: &DaemonConfig,
    new: &mut DaemonConfig,
) -> String {
    if new.nagios == old.nagios {
        return String::new();
    }
    let note = match (nagios.as_mut(), &new.nagios) {
        (Some(w), Some(n)) => match w.reconfigure(n) {
            Ok(what) => what,
            Err(e) => format!("[nagios] only partly changed: {e}"),
        },
        (Some(_), None) => {
            if let Some(w) = nagios.take() {
                w.stop();
            }
            "[nagios] connections all stopped".into()
        }
        (None, Some(n)) => {
            match crate::nagios::worker::spawn_workers_with_policy(
                n,
                daemon.exec.clone(),
                daemon.policy.clone(),
            ) {
                Ok(w) => {
                    *nagios = Some(w);
                    "[nagios] connections started".into()
                }
                Err(e) => format!("[nagios] not started: {e}"),
            }
        }
        (None, None) => String::new(),
    };
    new.nagios = nagios.as_ref().map(|w| w.config().clone());
    format!("; {note}")
}

/// The `[gearman]` part of a reload: the section's changes applied to the
/// running workers as `gearman-worker` does at SIGHUP (queues, servers,
/// max-worker, timeouts, key, load limits; no job in flight lost). Jobs
/// keep the `user` they started with. `new.gearman` ends as what runs.
fn reload_gearman(
    gearman: &mut Option<crate::gearman::GearmanWorkers>,
    new: &mut DaemonConfig,
) -> String {
    let (Some(w), Some(g)) = (gearman.as_mut(), new.gearman.as_ref()) else {
        return String::new();
    };
    // Always asked: a keyfile may have changed under the same path.
    let note = match w.reconfigure(g) {
        Ok(changed) if changed.is_empty() => String::new(),
        Ok(changed) => format!("; [gearman] changed {}", changed.join(", ")),
        Err(e) => format!("; [gearman] not (or only partly) changed: {e}"),
    };
    let mut running = w.config().clone();
    running.run_as = None;
    new.gearman = Some(running);
    note
}

/// Descriptors a connection holds: its socket, and a duplicate for its reader.
const FDS_PER_CONNECTION: usize = 2;
/// Descriptors a running check holds: its pidfd and two pipe read ends.
const FDS_PER_CHECK: usize = 3;
/// The least counted as held whatever the load (stdio, the listener, the
/// signal pipe, the ring, the waker, the executor's low descriptor slots
/// (up to 64), spare cgroup leaves, the metrics listener, Nagios
/// connections, log files), when /proc/self/fd cannot be read.
const FDS_FIXED: usize = 128;

/// Lower `max_clients` to what RLIMIT_NOFILE leaves next to `max_running`
/// checks (at least a quarter of it), with a warning: past it, idle
/// connections would take the descriptors checks need (their spawns failing
/// with EMFILE), then `accept` itself would fail and new clients hang
/// unanswered. Lowered, a client past it gets `too_many_clients` at once.
fn fit_clients_to_descriptors(config: &mut DaemonConfig, contained: bool) {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
    // What is open now (the executor's slots, its spare cgroup leaves…) is
    // fixed; a few more come (metrics, Nagios connections, log files).
    // Counted once, at start: at a reload the open count includes clients
    // and checks.
    static FIXED: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let fixed =
        *FIXED.get_or_init(|| open_descriptors().map_or(FDS_FIXED, |n| (n + 16).max(FDS_FIXED)));
    let budget = limit.saturating_sub(fixed);
    // With containment each running check also holds its leaf's.
    let per_check = FDS_PER_CHECK
        + if contained {
            pidring::cgroup::FDS_PER_LEAF
        } else {
            0
        };
    let for_checks = config.max_running.saturating_mul(per_check);
    if for_checks > budget {
        tracing::warn!(
            max_running = config.max_running,
            nofile = limit,
            "RLIMIT_NOFILE {limit} leaves room for about {} running checks, not max_running = {} ({per_check} descriptors each): \
             checks past that fail with EMFILE; raise the limit (LimitNOFILE=) or lower max_running",
            budget / per_check,
            config.max_running
        );
    }
    let for_clients = budget.saturating_sub(for_checks).max(budget / 4);
    let fit = (for_clients / FDS_PER_CONNECTION).max(1);
    if fit < config.max_clients {
        tracing::warn!(
            nofile = limit,
            "RLIMIT_NOFILE {limit} leaves room for {fit} connections next to max_running = {} checks: \
             max_clients lowered from {} to {fit}; raise the limit (LimitNOFILE=) to serve more",
            config.max_running,
            config.max_clients
        );
        config.max_clients = fit;
    }
}

/// How many descriptors this process has open (`/proc/self/fd`).
fn open_descriptors() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

/// Empty the signal pipe; true if a signal arrived.
fn drain_signals(sig_rx: &UnixStream) -> bool {
    let mut buf = [0u8; 64];
    let mut got = false;
    loop {
        match io::Read::read(&mut &*sig_rx, &mut buf) {
            Ok(0) => return got,
            Ok(_) => got = true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return got,
        }
    }
}

/// The accept loop's state.
#[derive(Default)]
struct Acceptor {
    next_conn: u64,
    /// Accept failures (EMFILE lasts, and the listener stays readable all
    /// the while) and connections refused at `max_clients`: logged at most
    /// once a second each, with a count.
    failures: Throttled,
    refusals: Throttled,
}

/// Something that may happen many times a second, logged at most once a second.
#[derive(Default)]
struct Throttled {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Throttled {
    /// Count one; `Some(count since the last log)` when it is time to log.
    fn happened(&mut self) -> Option<u64> {
        self.unlogged += 1;
        if self
            .last_logged
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        self.last_logged = Some(Instant::now());
        Some(std::mem::take(&mut self.unlogged))
    }
}

fn accept_all(
    listener: &UnixListener,
    daemon: &Arc<Daemon>,
    conns: &mut Vec<(Arc<Conn>, JoinHandle<()>)>,
    acceptor: &mut Acceptor,
) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and friends: go on; the client waits in the backlog.
                if let Some(count) = acceptor.failures.happened() {
                    tracing::warn!(error = %e, count, "cannot accept connections");
                }
                std::thread::sleep(Duration::from_millis(10));
                return;
            }
        };
        let max_clients = daemon.config().max_clients;
        if daemon.stats.connections_open.load(Ordering::Relaxed) >= max_clients as u64 {
            refuse(&stream, daemon);
            if let Some(count) = acceptor.refusals.happened() {
                tracing::warn!(max_clients, count, "refused connections: too many clients");
            }
            continue;
        }
        acceptor.next_conn += 1;
        let no = acceptor.next_conn;
        match start_conn(no, stream, daemon) {
            Ok(pair) => conns.push(pair),
            Err(e) => {
                if let Some(count) = acceptor.failures.happened() {
                    tracing::warn!(conn = no, error = %e, count, "cannot serve new connections");
                }
            }
        }
    }
}

/// Answer a connection past `max_clients` with one error line and close it
/// (each connection costs two threads and two descriptors).
fn refuse(stream: &UnixStream, daemon: &Daemon) {
    let max = daemon.config().max_clients;
    turn_away(
        stream,
        daemon,
        format!(
            "the daemon serves at most {max} connections at once (max_clients); retry later or reuse a connection"
        ),
    );
}

/// Tell a new connection, in one `too_many_clients` line, why it will not
/// be served; the caller then closes it.
fn turn_away(stream: &UnixStream, daemon: &Daemon, message: String) {
    let response = RequestError::new(ErrorCode::TooManyClients, message).into_response();
    let mut line = Vec::new();
    protocol::write_response(&mut line, &response);
    // A fresh socket's buffer takes one short line; a failure changes nothing.
    let _ = stream.set_nonblocking(true);
    let _ = (&*stream).write_all(&line);
    daemon.stats.count_error(ErrorCode::TooManyClients);
}

/// Serve a new connection on two threads of its own. Out of threads or
/// descriptors, the client is told so (`too_many_clients`) before it is
/// closed, rather than reset without a word.
fn start_conn(
    no: u64,
    stream: UnixStream,
    daemon: &Arc<Daemon>,
) -> io::Result<(Arc<Conn>, JoinHandle<()>)> {
    let failed = |stream: &UnixStream, e: io::Error| {
        let message = format!("the daemon cannot serve another connection now ({e}); retry later");
        turn_away(stream, daemon, message);
        e
    };
    let config = daemon.config();
    let set_up = stream.set_nonblocking(false).and_then(|()| {
        // A client that takes no bytes for this long is dropped (the writer's send fails).
        stream.set_write_timeout(Some(config.client_write_timeout))?;
        stream.try_clone()
    });
    let read_half = set_up.map_err(|e| failed(&stream, e))?;
    let limit = config.max_client_queue;
    // Unbounded as a channel, bounded by the slots: a bounded channel
    // allocates all its `max_client_queue` places up front (~600 KB per
    // connection, idle or not).
    let (tx, rx) = crossbeam_channel::unbounded();
    let conn = Arc::new(Conn {
        no,
        stream,
        stats: daemon.stats.clone(),
        tx,
        held: Mutex::new(Held::default()),
        slot_freed: Condvar::new(),
        slot_limit: AtomicUsize::new(limit),
        byte_limit: AtomicUsize::new(config.max_client_bytes),
        budget: daemon.budget.clone(),
        in_flight: Mutex::new(HashMap::new()),
        in_flight_count: AtomicUsize::new(0),
        reader_done: AtomicBool::new(false),
        hung_up: AtomicBool::new(false),
        finishing: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        abandoned: AtomicBool::new(false),
        queue_gate: Mutex::new(()),
    });
    // Counted before the writer exists: the writer uncounts it when it ends.
    daemon
        .stats
        .connections_open
        .fetch_add(1, Ordering::Relaxed);
    let writer = {
        let (conn, daemon) = (conn.clone(), daemon.clone());
        std::thread::Builder::new()
            .name(format!("pidring-w{no}"))
            .spawn(move || writer_loop(&conn, &daemon, rx))
    };
    let writer = match writer {
        Ok(w) => w,
        Err(e) => {
            daemon
                .stats
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
            return Err(failed(&conn.stream, e));
        }
    };
    {
        let (rconn, daemon) = (conn.clone(), daemon.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("pidring-r{no}"))
            .spawn(move || reader_loop(&rconn, &daemon, read_half));
        if let Err(e) = spawned {
            conn.reader_done.store(true, Ordering::SeqCst);
            conn.wake_writer();
            return Err(failed(&conn.stream, e));
        }
    }
    daemon
        .stats
        .connections_accepted
        .fetch_add(1, Ordering::Relaxed);
    tracing::debug!(conn = no, "client connected");
    Ok((conn, writer))
}

fn writer_loop(conn: &Conn, daemon: &Daemon, rx: Receiver<Outgoing>) {
    'outer: loop {
        if conn.is_finished(&rx) {
            break;
        }
        let Ok(first) = rx.recv() else { break };
        // Lines go straight into the socket through a buffer of
        // WRITE_BATCH bytes: a line is never held whole (a result can
        // serialise to ~18 MiB, which no budget counts), and an idle
        // connection holds no buffer at all.
        let mut out = io::BufWriter::with_capacity(
            WRITE_BATCH,
            Counted {
                stream: &conn.stream,
                written: 0,
            },
        );
        let (mut lines, mut bytes, mut results) = (0usize, 0usize, 0u64);
        let mut written = Ok(());
        let mut next = Some(first);
        while let Some(m) = next {
            if let Outgoing::Line(r, held) = m {
                if written.is_ok() {
                    written = protocol::stream_response(&mut out, &r);
                }
                lines += 1;
                bytes += held;
                if matches!(r, Response::Result { .. }) {
                    results += 1;
                }
            }
            let batch = out.get_ref().written + out.buffer().len();
            next = if written.is_ok() && batch < WRITE_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if lines == 0 {
            continue;
        }
        let written = written.and_then(|()| out.flush());
        // Without a flush on drop: after an error, another write would wait
        // out client_write_timeout again.
        let _ = out.into_parts();
        match written {
            Ok(()) => {
                conn.stats
                    .results_sent
                    .fetch_add(results, Ordering::Relaxed);
                conn.release(lines, bytes);
            }
            Err(e) => {
                conn.stats
                    .results_dropped
                    .fetch_add(results, Ordering::Relaxed);
                conn.release(lines, bytes);
                let stuck = matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
                let cancelled = conn.cancel_in_flight(&daemon.exec);
                if stuck {
                    conn.stats
                        .clients_dropped_stuck
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        conn = conn.no,
                        timeout = ?daemon.config().client_write_timeout,
                        cancelled,
                        "dropping client: it has not read its responses (its checks are cancelled and their results dropped)"
                    );
                } else if !conn.closed.load(Ordering::SeqCst) {
                    tracing::info!(conn = conn.no, error = %e, cancelled, "client went away; its results are dropped");
                }
                break 'outer;
            }
        }
    }
    conn.close(&rx);
    daemon
        .stats
        .connections_open
        .fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(conn = conn.no, "connection closed");
}

/// A connection's socket, counting the bytes written to it.
struct Counted<'a> {
    stream: &'a UnixStream,
    written: usize,
}

impl Write for Counted<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let n = self.stream.write(bytes)?;
        self.written += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn reader_loop(conn: &Arc<Conn>, daemon: &Daemon, stream: UnixStream) {
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut line: Vec<u8> = Vec::new();
    // Inside an oversize line (already answered): skip to its newline.
    let mut skipping = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if buf.is_empty() {
            // EOF: a last line without its newline still counts.
            if !skipping && !line.is_empty() && !handle_line(conn, daemon, &line) {
                return reader_gave_up(conn, daemon);
            }
            break;
        }
        let (chunk, newline) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], true),
            None => (buf, false),
        };
        let used = chunk.len() + usize::from(newline);
        let max = daemon.config().max_line_bytes;
        if !skipping {
            if line.len() + chunk.len() > max {
                skipping = true;
                line.clear();
                line.shrink_to(64 * 1024);
                if !conn.acquire_slot() {
                    return reader_gave_up(conn, daemon);
                }
                conn.stats.requests.fetch_add(1, Ordering::Relaxed);
                conn.send(
                    RequestError::new(
                        ErrorCode::LineTooLong,
                        format!(
                            "request line longer than {max} bytes; the rest of the line is skipped"
                        ),
                    )
                    .into_response(),
                );
            } else {
                line.extend_from_slice(chunk);
            }
        }
        reader.consume(used);
        if newline {
            if skipping {
                skipping = false;
            } else if !handle_line(conn, daemon, &line) {
                return reader_gave_up(conn, daemon);
            }
            line.clear();
        }
    }
    conn.reader_done.store(true, Ordering::SeqCst);
    conn.wake_writer();
    watch_hangup(conn, daemon);
}

/// After the client's EOF: if it hangs up entirely while checks are in flight,
/// cancel them (their results have nowhere to go). A client that only shut
/// down its sending side keeps getting its results.
fn watch_hangup(conn: &Conn, daemon: &Daemon) {
    while !conn.closed.load(Ordering::SeqCst) {
        match conn.peer_hung_up(Duration::from_millis(200)) {
            Ok(true) => return cancel_for_hangup(conn, daemon),
            Ok(false) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => return,
        }
    }
}

/// The reader stopped waiting for room (a slot or bytes): the connection
/// closed, or the client hung up, which it saw while waiting (parked, it
/// would never have read the EOF): then as `watch_hangup`.
fn reader_gave_up(conn: &Conn, daemon: &Daemon) {
    if conn.hung_up.load(Ordering::SeqCst) {
        conn.reader_done.store(true, Ordering::SeqCst);
        conn.wake_writer();
        cancel_for_hangup(conn, daemon);
    }
}

/// The client hung up entirely: its checks in flight are cancelled (their
/// results have nowhere to go).
fn cancel_for_hangup(conn: &Conn, daemon: &Daemon) {
    if conn.in_flight_count.load(Ordering::SeqCst) > 0 {
        let cancelled = conn.cancel_in_flight(&daemon.exec);
        conn.stats
            .clients_gone_in_flight
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            conn = conn.no,
            cancelled,
            "client hung up with checks in flight: cancelling them, their results are dropped"
        );
    }
}

/// Serve one request line. False when the connection is closed.
fn handle_line(conn: &Arc<Conn>, daemon: &Daemon, raw: &[u8]) -> bool {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    // Its answer may echo the request's id (a whole line's worth, and an
    // error message may repeat it): budgeted like a result.
    let answer = answer_bytes(raw.len());
    let send = |response: Response| conn.send_holding(response, answer);
    if raw.iter().all(u8::is_ascii_whitespace) {
        return true;
    }
    if !conn.acquire_slot() {
        return false;
    }
    if !conn.acquire_bytes(answer) {
        conn.release(1, 0);
        return false;
    }
    conn.stats.requests.fetch_add(1, Ordering::Relaxed);
    let text = match std::str::from_utf8(raw) {
        Ok(t) => t,
        Err(e) => {
            send(
                RequestError::new(
                    ErrorCode::InvalidUtf8,
                    format!("request is not valid UTF-8 ({e})"),
                )
                .into_response(),
            );
            return true;
        }
    };
    let request = match protocol::parse_request(text) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(conn = conn.no, code = e.code.as_str(), message = %e.message, "bad request");
            send(e.into_response());
            return true;
        }
    };
    match request {
        Request::Submit(s) => {
            if let Err(e) = submit(conn, daemon, *s, raw.len(), answer) {
                if conn.hung_up.load(Ordering::SeqCst) {
                    // Gone while the submit waited for room: nobody to tell.
                    conn.release(1, answer);
                    return false;
                }
                send(e.into_response());
            }
            // Accepted: the slot and the bytes now belong to the check (and
            // then its result).
        }
        Request::Cancel(c) => {
            let engine_id = conn
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&c.id)
                .copied()
                .flatten();
            match engine_id {
                Some(eid) => {
                    // The check's own result (outcome "cancelled", or how it
                    // ended if it finished first) is the answer.
                    daemon.exec.cancel(eid);
                    conn.release(1, answer);
                }
                None => send(
                    RequestError::new(
                        ErrorCode::NotFound,
                        format!("no check with id {} is in flight on this connection", c.id),
                    )
                    .about(Some(c.id), Some("cancel"))
                    .into_response(),
                ),
            }
        }
        Request::Stats(p) => send(daemon.stats_response(p.id)),
        Request::Ping(p) => send(Response::Pong {
            id: p.id,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }),
    }
    true
}

/// Build the check from a request line of `line_len` bytes and hand it to the engine.
/// The request's line already holds `answer` bytes (for an error answer);
/// accepted, the check holds `check_bytes` instead, until its result is
/// written. On `Err` the line still holds exactly `answer`.
fn submit(
    conn: &Arc<Conn>,
    daemon: &Daemon,
    req: SubmitRequest,
    line_len: usize,
    answer: usize,
) -> Result<(), RequestError> {
    let id = req.id.clone().unwrap_or(ClientId::Num(0.into()));
    let err = |code, message: String| {
        RequestError::new(code, message).about(Some(id.clone()), Some("submit"))
    };
    if conn.stats.shutting_down.load(Ordering::SeqCst) {
        return Err(err(
            ErrorCode::ShuttingDown,
            "the daemon is shutting down and accepts no new checks".into(),
        ));
    }
    let check =
        build_check(&daemon.config(), &req, &id).map_err(|m| err(ErrorCode::BadRequest, m))?;
    let check = daemon
        .policy
        .get()
        .apply(check, req.user.as_deref())
        .map_err(|f| {
            tracing::warn!(conn = conn.no, id = %id, "check refused: {f}");
            err(ErrorCode::Forbidden, f.0)
        })?;
    // Held until the result is written (or dropped); taken before the id is
    // in flight, so a submit waiting here cannot be cancelled half-made.
    // The line's `answer` bytes count towards it; the rest is taken now.
    let reserved = check_bytes(line_len, check.get_output_cap()).max(answer);
    if !conn.acquire_bytes(reserved - answer) {
        // The connection closed while waiting: this error goes nowhere.
        return Err(err(ErrorCode::ShuttingDown, "connection closed".into()));
    }
    {
        let mut map = conn.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&id) {
            drop(map);
            conn.release(0, reserved - answer);
            return Err(err(
                ErrorCode::DuplicateId,
                format!("a check with id {id} is still in flight on this connection"),
            ));
        }
        map.insert(id.clone(), None);
    }
    conn.in_flight_count.fetch_add(1, Ordering::SeqCst);
    // Counted before the engine sees it, so `completed` never passes `submitted`.
    conn.stats.submits_accepted.fetch_add(1, Ordering::Relaxed);
    let cb_conn = conn.clone();
    let cb_id = id.clone();
    let tags = req.tags;
    match daemon
        .exec
        .submit_with(check, move |r| cb_conn.deliver(cb_id, tags, r, reserved))
    {
        Ok(engine_id) => {
            // The result may already have been delivered (and the id removed).
            if let Some(slot) = conn
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&id)
            {
                *slot = Some(engine_id);
            }
            Ok(())
        }
        Err(e) => {
            conn.in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            conn.in_flight_count.fetch_sub(1, Ordering::SeqCst);
            conn.stats.submits_accepted.fetch_sub(1, Ordering::Relaxed);
            conn.release(0, reserved - answer);
            Err(match e {
                SubmitError::QueueFull { .. } => err(ErrorCode::QueueFull, e.to_string()),
                SubmitError::ShuttingDown => err(
                    ErrorCode::ShuttingDown,
                    "the daemon is shutting down and accepts no new checks".into(),
                ),
                SubmitError::Invalid(_) => err(ErrorCode::BadRequest, e.to_string()),
            })
        }
    }
}

fn build_check(config: &DaemonConfig, req: &SubmitRequest, id: &ClientId) -> Result<Check, String> {
    let check = match (&req.argv, &req.command_line) {
        (Some(argv), None) => Check::argv(argv),
        (None, Some(line)) => Check::command_line(line).map_err(|e| e.to_string())?,
        (Some(_), Some(_)) => {
            return Err("give either \"argv\" or \"command_line\", not both".into());
        }
        (None, None) => {
            return Err(
                "nothing to run: give \"argv\" (an array) or \"command_line\" (a string)".into(),
            );
        }
    };
    let output_cap = req.output_cap.map_or(config.output_cap, |s| s.0);
    if output_cap > config.max_output_cap {
        return Err(format!(
            "output_cap of {output_cap} bytes is above this daemon's max_output_cap ({} bytes): ask for less, or raise max_output_cap in the daemon's config",
            config.max_output_cap
        ));
    }
    let mut check = check
        .timeout(req.timeout.map_or(config.timeout, |d| d.0))
        .grace(req.grace.map_or(config.grace, |d| d.0))
        .output_cap(output_cap)
        .tag(id.as_text());
    if req.env_clear {
        check = check.env_clear();
    }
    if let Some(env) = &req.env {
        for (k, v) in env {
            check = check.env(k, v);
        }
    }
    if let Some(cwd) = &req.cwd {
        check = check.cwd(cwd);
    }
    if let Some(yes) = req.kill_group_on_exit {
        check = check.kill_group_on_exit(yes);
    }
    if let Some(state) = req.timeout_state {
        check = check.timeout_state(state);
    }
    let memory = req.memory_max.or(config.memory_max).map(|w| w.0 as u64);
    Ok(with_caps(
        check,
        memory,
        req.pids_max.or(config.pids_max),
        req.cpu_max.or(config.cpu_max),
    ))
}

/// `check` with these caps (`cpu`: CPUs, over a 100 ms period).
fn with_caps(mut check: Check, memory: Option<u64>, pids: Option<u64>, cpu: Option<f64>) -> Check {
    if let Some(m) = memory {
        check = check.memory_max(m);
    }
    if let Some(p) = pids {
        check = check.pids_max(p);
    }
    if let Some(c) = cpu {
        let period = Duration::from_millis(100);
        check = check.cpu_max(period.mul_f64(c.clamp(0.0, 1e6)), period);
    }
    check
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttled_logs_once_a_second_with_the_count() {
        let mut t = Throttled::default();
        assert_eq!(t.happened(), Some(1));
        assert_eq!(t.happened(), None);
        assert_eq!(t.happened(), None);
        t.last_logged = Instant::now().checked_sub(Duration::from_secs(2));
        assert_eq!(t.happened(), Some(3));
        assert_eq!(t.happened(), None);
    }
}
