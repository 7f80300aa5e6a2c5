//! Containment: one cgroup v2 leaf per check, so that every process a
//! check starts — in its group or not, through `setsid`, a double fork or a
//! fork from another thread — ends with it (`cgroup.kill`), and the
//! executor knows when the last one is gone (`cgroup.events`).
//!
//! Layout, in a subtree the executor owns:
//!
//! ```text
//! <base>/              its own cgroup (systemd Delegate=yes), or a path it
//!                      creates as root (`<cgroup2 mount>/pidring.<pid>.<n>`
//!                      or a configured one)
//!   supervisor/        the executor itself (delegated mode only: the
//!                      no-internal-processes rule)
//!   checks/<n>         one leaf per running check, pooled
//! ```
//!
//! A child is created straight into its leaf (`clone3` with
//! `CLONE_INTO_CGROUP` and the leaf's pre-opened directory fd): there is no
//! moment in which it, or anything it forks, is outside. A leaf whose
//! `cgroup.kill` was ever written is never handed out again (Linux 6.18
//! SIGKILLs a child cloned into it at birth): it is removed once empty and
//! replaced. mkdir and rmdir take the kernel's global cgroup lock; they run
//! on a helper thread, never on the loop.
//!
//! Without a usable cgroup2 (no mount, no write access, no `cgroup.kill`,
//! or a start-up self-test that fails) the executor falls back to the
//! process-group sweep and the descendant walk, and says so once.

use crate::rawsys;
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `CLONE_INTO_CGROUP` (Linux 5.7).
pub(crate) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
/// Leaves kept made ahead, beyond those in use (at most `max_running`).
const SPARE: usize = 16;
/// How long the helper waits for a killed leaf to empty before it gives up
/// removing it (a process stuck in an uninterruptible sleep).
const RETIRE_WAIT: Duration = Duration::from_secs(30);
/// Age past which another executor's unlocked subtree is stale whatever
/// its pid says (see `recover_stale`).
const STALE_AFTER: Duration = Duration::from_secs(10);
/// How often leaves a check left populated on purpose are looked at.
const LINGER_POLL: Duration = Duration::from_secs(1);

/// Where checks are contained (see [`crate::ExecutorBuilder::cgroup`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Containment {
    /// No cgroups: the process-group sweep and descendant walk only.
    #[default]
    Off,
    /// The executor's own cgroup if systemd delegated it (`Delegate=yes`;
    /// the executor then moves itself into a `supervisor` leaf), else, as
    /// root, a fresh `<cgroup2 mount>/pidring.<pid>.<n>` removed at shutdown;
    /// else the fallback, said once in the log.
    Auto,
    /// This cgroup v2 directory, created if missing and owned by this
    /// executor alone (locked); leaves a crashed predecessor left in it are
    /// killed and removed at start.
    Path(PathBuf),
}

impl std::str::FromStr for Containment {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" | "" => Ok(Containment::Auto),
            "off" | "none" => Ok(Containment::Off),
            p if p.starts_with('/') => Ok(Containment::Path(PathBuf::from(p))),
            other => Err(format!(
                "unknown cgroup setting {other:?}: expected auto, off or an absolute path"
            )),
        }
    }
}

/// In a configuration file: `"auto"`, `"off"` or an absolute path.
#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Containment {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <String as serde::Deserialize>::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Which containment is in force (in stats and Prometheus).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ContainmentStatus {
    /// `cgroup` (a leaf per check), `fallback` (asked for, not usable:
    /// group sweep and descendant walk) or `off` (not asked for).
    pub mode: String,
    /// The subtree's path (`cgroup`), or why not (`fallback`).
    pub detail: String,
    /// The controllers enabled in the checks' leaves (of `memory`, `pids`
    /// and `cpu`): what their peaks, OOM counts and caps need.
    #[cfg_attr(feature = "serde", serde(default))]
    pub controllers: Vec<String>,
}

impl ContainmentStatus {
    fn off() -> Self {
        ContainmentStatus {
            mode: "off".into(),
            ..Default::default()
        }
    }
}

/// Limits on one check's processes together, enforced by its cgroup leaf
/// (see [`crate::Check::memory_max`]). A cap the host cannot enforce (no
/// containment, or its controller not available) is refused at submit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Caps {
    /// `memory.max`, bytes.
    pub memory_max: Option<u64>,
    /// `pids.max`: most processes (and threads) at once.
    pub pids_max: Option<u64>,
    /// `cpu.max`: (quota, period) in microseconds.
    pub cpu_max: Option<(u64, u64)>,
}

impl Caps {
    /// Whether no cap is set.
    pub fn is_empty(&self) -> bool {
        *self == Caps::default()
    }

    /// The files to write and their values, with the controller each needs.
    fn writes(&self) -> Vec<(&'static str, &'static str, String)> {
        let mut w = Vec::new();
        if let Some(m) = self.memory_max {
            w.push(("memory", "memory.max", m.to_string()));
        }
        if let Some(p) = self.pids_max {
            w.push(("pids", "pids.max", p.to_string()));
        }
        if let Some((q, p)) = self.cpu_max {
            w.push(("cpu", "cpu.max", format!("{q} {p}")));
        }
        w
    }

    /// Why `status` cannot enforce these caps (`None`: it can).
    pub fn unenforceable(&self, status: &ContainmentStatus) -> Option<String> {
        let missing: Vec<&str> = self
            .writes()
            .into_iter()
            .filter(|(c, ..)| status.mode != "cgroup" || !status.controllers.iter().any(|x| x == c))
            .map(|(_, file, _)| file)
            .collect();
        if missing.is_empty() {
            return None;
        }
        Some(if status.mode == "cgroup" {
            format!(
                "{} cannot be enforced: the checks' cgroups have the controllers {:?} \
                 (the host must offer memory/pids/cpu on cgroup v2 to the executor's subtree)",
                missing.join(", "),
                status.controllers
            )
        } else {
            format!(
                "{} cannot be enforced: containment is {} ({})",
                missing.join(", "),
                status.mode,
                status.detail
            )
        })
    }
}

/// What the usage of one check's leaf was (in its result).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CgroupUsage {
    /// CPU time of every process of the check (`cpu.stat` usage_usec).
    pub cpu_us: u64,
    /// Of which user time.
    pub user_us: u64,
    /// Of which system time.
    pub system_us: u64,
    /// Processes in the check's leaf besides its leader: when the leaf was
    /// killed (timeout past the grace, cancel, shutdown), or when the
    /// leader exited (killed with the leaf, unless the check opted out).
    pub escapees: u32,
    /// The leaf was still populated when the result was delivered (the
    /// check opted out of the kill, or a process would not die in time).
    pub left_running: bool,
    /// Most memory the check's processes used at once (`memory.peak`;
    /// only with the memory controller on).
    #[cfg_attr(feature = "serde", serde(default))]
    pub memory_peak_bytes: Option<u64>,
    /// Most processes the check had at once (`pids.peak`; pids controller).
    #[cfg_attr(feature = "serde", serde(default))]
    pub pids_peak: Option<u64>,
    /// Processes of the check the OOM killer killed (`memory.events`
    /// oom_kill; memory controller).
    #[cfg_attr(feature = "serde", serde(default))]
    pub oom_kills: Option<u64>,
}

/// The cgroup2 mount, found as systemd does: /sys/fs/cgroup if it is one
/// (unified), else /sys/fs/cgroup/unified (hybrid).
pub(crate) fn find_mount() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .find(|p| on_cgroup2(Path::new(p)) == Ok(true))
        .map(PathBuf::from)
}

/// Whether `path` is on a cgroup2 file system.
fn on_cgroup2(path: &Path) -> rustix::io::Result<bool> {
    // `f_type`'s width differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    let magic = rustix::fs::statfs(path)?.f_type as i64;
    Ok(magic == CGROUP2_SUPER_MAGIC)
}

/// This process's cgroup v2 path (relative to the mount), from /proc/self/cgroup.
fn own_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_start_matches('/').to_string())
}

/// Whether systemd delegated `dir` (it marks a delegated cgroup with a
/// `trusted.delegate` or `user.delegate` xattr, since v251).
fn delegated(dir: &Path) -> bool {
    ["trusted.delegate", "user.delegate"].iter().any(|name| {
        let mut buf = [0u8; 8];
        matches!(rustix::fs::getxattr(dir, *name, &mut buf[..]), Ok(n) if buf[..n].starts_with(b"1"))
    })
}

/// The fallback's reason for a path outside cgroup2.
fn not_cgroup2(path: &Path) -> String {
    format!("{} is not on a cgroup2 file system", path.display())
}

/// Open a directory or file below `dir`, close-on-exec.
fn open_at(dir: BorrowedFd<'_>, name: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(dir, name, flags | OFlags::CLOEXEC, Mode::empty())
}

/// Read a small cgroup file from offset 0 into `buf` (one `pread`).
fn pread_all<'b>(fd: BorrowedFd<'_>, buf: &'b mut [u8]) -> rustix::io::Result<&'b [u8]> {
    let n = rustix::io::pread(fd, &mut *buf, 0)?;
    Ok(&buf[..n])
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines).
fn keyed(text: &[u8], key: &str) -> Option<u64> {
    text.split(|&b| b == b'\n').find_map(|line| {
        let rest = line.strip_prefix(key.as_bytes())?.strip_prefix(b" ")?;
        std::str::from_utf8(rest).ok()?.trim().parse().ok()
    })
}

/// CPU times from `cpu.stat`, microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cpu {
    usage: u64,
    user: u64,
    system: u64,
}

impl Cpu {
    fn parse(text: &[u8]) -> Cpu {
        Cpu {
            usage: keyed(text, "usage_usec").unwrap_or(0),
            user: keyed(text, "user_usec").unwrap_or(0),
            system: keyed(text, "system_usec").unwrap_or(0),
        }
    }
}

/// Descriptors a pooled leaf holds open: its directory, `cgroup.events`
/// and `cpu.stat` (a service sizing its descriptor budget counts them per
/// check, and for the spare leaves the pool keeps).
pub const FDS_PER_LEAF: usize = 3;

/// One check's cgroup: a leaf under `checks/`, with the files the hot path
/// needs opened ahead.
#[derive(Debug)]
pub(crate) struct Leaf {
    name: u64,
    /// The directory (`O_RDONLY`: `CLONE_INTO_CGROUP` takes no `O_PATH` fd).
    dir: OwnedFd,
    /// `cgroup.events`: read for `populated`, polled (POLLPRI) for changes.
    events: OwnedFd,
    /// `cpu.stat` (kept open: opening and closing a kernfs file per check
    /// cost more than reading it).
    cpu: OwnedFd,
    /// The memory and pids controllers are on: read the peaks.
    peaks: bool,
    /// Caps were written into it: not reused.
    capped: bool,
    /// Processes were left running in it on purpose (`kill_group_on_exit`
    /// off): not reused until empty.
    left: bool,
    /// `cgroup.procs`, for a child that moves itself (see `Entry::Write`).
    procs: Option<OwnedFd>,
    /// Its `cgroup.kill` was written: never used again.
    killed: bool,
    /// `cpu.stat` when it was handed out (a leaf is reused).
    cpu_base: Cpu,
}

impl Leaf {
    /// Open leaf `checks/<name>` and the files the hot path needs.
    fn open(checks: BorrowedFd<'_>, name: u64) -> rustix::io::Result<Leaf> {
        let dir = open_at(
            checks,
            &name.to_string(),
            OFlags::RDONLY | OFlags::DIRECTORY,
        )?;
        Ok(Leaf {
            name,
            events: open_at(dir.as_fd(), "cgroup.events", OFlags::RDONLY)?,
            cpu: open_at(dir.as_fd(), "cpu.stat", OFlags::RDONLY)?,
            left: false,
            peaks: false,
            capped: false,
            dir,
            procs: None,
            killed: false,
            cpu_base: Cpu::default(),
        })
    }

    /// The directory fd a child is cloned into.
    pub fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// `cgroup.procs` opened for writing, if the child moves itself.
    pub fn procs(&self) -> Option<BorrowedFd<'_>> {
        self.procs.as_ref().map(|f| f.as_fd())
    }

    /// `cgroup.events`, to watch (POLLPRI) while it is populated.
    pub fn events(&self) -> BorrowedFd<'_> {
        self.events.as_fd()
    }

    /// Whether any process is in the leaf (`populated 1`); a failed read
    /// counts as populated (the caller then kills, or waits).
    pub fn populated(&self) -> bool {
        let mut buf = [0u8; 128];
        match pread_all(self.events.as_fd(), &mut buf) {
            Ok(text) => keyed(text, "populated") != Some(0),
            Err(e) => {
                tracing::warn!(leaf = self.name, "cannot read cgroup.events: {e}");
                true
            }
        }
    }

    /// How many processes are in the leaf now.
    pub fn count_procs(&self) -> u32 {
        let mut buf = [0u8; 4096];
        let Ok(fd) = open_at(self.dir.as_fd(), "cgroup.procs", OFlags::RDONLY) else {
            return 0;
        };
        let mut n = 0u32;
        loop {
            match rustix::io::read(&fd, &mut buf) {
                Ok(0) | Err(_) => return n,
                Ok(k) => n += buf[..k].iter().filter(|&&b| b == b'\n').count() as u32,
            }
        }
    }

    /// SIGKILL every process in the leaf (`cgroup.kill`); the leaf is
    /// retired from then on.
    pub fn kill(&mut self) {
        if self.killed {
            return;
        }
        self.killed = true;
        let r = open_at(self.dir.as_fd(), "cgroup.kill", OFlags::WRONLY)
            .and_then(|fd| rustix::io::write(&fd, b"1"));
        if let Err(e) = r {
            tracing::warn!(leaf = self.name, "cannot write cgroup.kill: {e}");
        }
    }

    /// Write `caps` into the leaf before its check's child is created in
    /// it (an empty leaf: each write completes at once). The leaf then
    /// serves this check only.
    pub fn apply(&mut self, caps: &Caps) -> Result<(), String> {
        self.capped = true;
        for (_, file, value) in caps.writes() {
            open_at(self.dir.as_fd(), file, OFlags::WRONLY)
                .and_then(|fd| rustix::io::write(&fd, value.as_bytes()))
                .map_err(|e| format!("cannot set {file} to {value}: {e}"))?;
        }
        Ok(())
    }

    /// Whether its `cgroup.kill` was written.
    pub fn killed(&self) -> bool {
        self.killed
    }

    /// `cpu.stat`.
    fn read_cpu(&self) -> Cpu {
        let mut buf = [0u8; 512];
        pread_all(self.cpu.as_fd(), &mut buf)
            .map(Cpu::parse)
            .unwrap_or_default()
    }

    /// Processes are left running in it on purpose (`kill_group_on_exit`
    /// off): the pool reuses it only once it is empty.
    pub fn leave_running(&mut self) {
        self.left = true;
    }

    /// Read the leaf's file `name` and `parse` it, if the controllers
    /// that make the peaks are on (`None`: off, or no such file).
    fn peaks_file<T>(&self, name: &str, parse: impl FnOnce(&[u8]) -> Option<T>) -> Option<T> {
        if !self.peaks {
            return None;
        }
        let mut buf = [0u8; 512];
        let fd = open_at(self.dir.as_fd(), name, OFlags::RDONLY).ok()?;
        parse(pread_all(fd.as_fd(), &mut buf).ok()?)
    }

    /// The usage since it was handed out (and the start of the next
    /// check's, if it is reused).
    pub fn usage(&mut self, escapees: u32, left_running: bool) -> CgroupUsage {
        let now = self.read_cpu();
        let base = std::mem::replace(&mut self.cpu_base, now);
        CgroupUsage {
            cpu_us: now.usage.saturating_sub(base.usage),
            user_us: now.user.saturating_sub(base.user),
            system_us: now.system.saturating_sub(base.system),
            escapees,
            left_running,
            memory_peak_bytes: self.peaks_file("memory.peak", |t| {
                std::str::from_utf8(t).ok()?.trim().parse().ok()
            }),
            pids_peak: self.peaks_file("pids.peak", |t| {
                std::str::from_utf8(t).ok()?.trim().parse().ok()
            }),
            oom_kills: self.peaks_file("memory.events", |t| keyed(t, "oom_kill")),
        }
    }
}

/// How a child enters its leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// `clone3(CLONE_INTO_CGROUP)`: born in it.
    CloneInto,
    /// The child writes itself into `cgroup.procs` before anything else
    /// (as systemd does), where the self-test found `CLONE_INTO_CGROUP`
    /// unusable.
    Write,
}

/// Work for the helper thread (mkdir and rmdir take the kernel's global
/// cgroup lock: never on the loop).
enum Job {
    /// Make this many leaves.
    Make(usize),
    /// Wait until this killed leaf is empty, then remove it.
    Retire(Leaf),
}

/// The subtree and its pool of leaves; owned by the loop thread.
pub(crate) struct Pool {
    /// Fresh or clean leaves, ready for a check.
    ready: Vec<Leaf>,
    /// Leaves a check left populated on purpose (`kill_group_on_exit` off),
    /// reused once empty; killed at shutdown.
    lingering: Vec<Leaf>,
    next_linger_poll: Instant,
    /// Leaves asked of the helper, not received yet.
    in_flight: usize,
    /// Leaves kept ready ahead (and most made beyond `max_running`).
    spare: usize,
    max_running: usize,
    /// Leaves are not reused (their `memory.peak`/`pids.peak` would
    /// carry the last check's).
    single_use: bool,
    jobs: Option<crossbeam_channel::Sender<Job>>,
    made: crossbeam_channel::Receiver<Leaf>,
    helper: Option<std::thread::JoinHandle<()>>,
    entry: Entry,
    subtree: Subtree,
    status: ContainmentStatus,
}

/// The directories of the subtree, removed at shutdown (those it created).
struct Subtree {
    /// The base, and whether this executor created it (removed at the end).
    base: PathBuf,
    remove_base: bool,
    /// `<base>/checks`, open (leaves are made and removed relative to it).
    checks: std::sync::Arc<OwnedFd>,
    /// The base directory, open and flock'ed while the executor lives.
    _lock: OwnedFd,
    /// `cgroup.procs` of the base and of each cgroup above it, held open
    /// (`O_PATH`; see `pin_procs`).
    pinned: Vec<OwnedFd>,
    /// `checks/cpu.stat`: one read flushes every leaf's CPU counters (see
    /// `Pool::flush_usage`).
    checks_cpu: Option<OwnedFd>,
}

/// Counts a process's executors (the `<n>` of `pidring.<pid>.<n>`).
static NEXT_SUBTREE: AtomicU64 = AtomicU64::new(0);

/// What setting up could not do: the fallback's reason.
type Why = String;

impl Pool {
    /// Set up the subtree for `containment`, recover what a crashed
    /// predecessor left in it, and test that a child cloned into a fresh
    /// leaf lives. `Ok(None)`: off. `Err(why)`: asked for but not usable
    /// (the caller falls back, and says so once). Called on the loop
    /// thread before it runs (every signal blocked there).
    pub fn setup(containment: &Containment, max_running: usize) -> Result<Option<Pool>, Why> {
        let Some(Base {
            path: base,
            create,
            delegated: delegated_mode,
        }) = choose_base(containment)?
        else {
            return Ok(None);
        };
        let why = |what: &str, e: &dyn std::fmt::Display| format!("{what} {}: {e}", base.display());
        let (subtree, controllers) = open_subtree(&base, create, delegated_mode)?;
        // Peaks count from a leaf's creation: with them, a leaf serves one check.
        let single_use = controllers.iter().any(|c| c == "memory" || c == "pids");
        let checks = subtree.checks.clone();
        let names = std::sync::Arc::new(AtomicU64::new(0));
        let entry = entry_by_self_test(checks.as_fd(), &names, &base)?;
        let spare = SPARE.min(max_running).max(1);
        let mut ready = Vec::with_capacity(spare);
        for _ in 0..spare {
            let leaf = make_leaf(checks.as_fd(), &names, entry)
                .map_err(|e| why("cannot create a leaf in", &e))?;
            ready.push(leaf);
        }
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let (made_tx, made_rx) = crossbeam_channel::unbounded::<Leaf>();
        let helper = std::thread::Builder::new()
            .name("pidring-cgroup".into())
            .spawn(move || helper(&checks, &names, entry, jobs_rx, made_tx))
            .map_err(|e| format!("cannot start the cgroup helper thread: {e}"))?;
        let status = ContainmentStatus {
            mode: "cgroup".into(),
            detail: base.display().to_string(),
            controllers: controllers.clone(),
        };
        tracing::info!(subtree = %base.display(), delegated = delegated_mode, entry = ?entry, "containment: one cgroup per check");
        Ok(Some(Pool {
            ready,
            lingering: Vec::new(),
            next_linger_poll: Instant::now() + LINGER_POLL,
            in_flight: 0,
            spare,
            max_running,
            single_use,
            jobs: Some(jobs_tx),
            made: made_rx,
            helper: Some(helper),
            entry,
            subtree,
            status,
        }))
    }

    /// What is in force.
    pub fn status(&self) -> ContainmentStatus {
        self.status.clone()
    }

    /// How children enter their leaves.
    pub fn entry(&self) -> Entry {
        self.entry
    }

    /// The status for containment `c` when `setup` said `r`.
    pub fn status_of(r: &Result<Option<Pool>, Why>) -> ContainmentStatus {
        match r {
            Ok(Some(p)) => p.status(),
            Ok(None) => ContainmentStatus::off(),
            Err(why) => ContainmentStatus {
                mode: "fallback".into(),
                detail: why.clone(),
                controllers: Vec::new(),
            },
        }
    }

    /// Take in what the helper made.
    fn collect(&mut self, now: Instant) {
        while let Ok(leaf) = self.made.try_recv() {
            self.in_flight = self.in_flight.saturating_sub(1);
            self.ready.push(leaf);
        }
        if !self.lingering.is_empty() && now >= self.next_linger_poll {
            self.next_linger_poll = now + LINGER_POLL;
            let mut i = 0;
            while i < self.lingering.len() {
                if self.lingering[i].populated() {
                    i += 1;
                } else {
                    let mut leaf = self.lingering.swap_remove(i);
                    leaf.left = false;
                    leaf.cpu_base = leaf.read_cpu();
                    self.ready.push(leaf);
                }
            }
        }
    }

    /// Follow a changed `max_running` (leaves made ahead are bounded by it).
    pub fn set_max_running(&mut self, n: usize) {
        self.max_running = n;
    }

    /// Whether a leaf is ready for the next check (else admission waits
    /// for the helper, which is asked for more here).
    pub fn has_leaf(&mut self, in_use: usize, now: Instant) -> bool {
        self.collect(now);
        let coming = self.ready.len() + self.in_flight;
        let have = in_use + coming + self.lingering.len();
        let room = (self.max_running + self.spare).saturating_sub(have);
        // Refill below half the spare, not at each take: a steady load
        // then reuses the same leaves (and holds the same descriptors).
        let n = self.spare.saturating_sub(coming).min(room);
        if coming < self.spare.div_ceil(2)
            && n > 0
            && let Some(jobs) = &self.jobs
            && jobs.send(Job::Make(n)).is_ok()
        {
            self.in_flight += n;
        }
        !self.ready.is_empty()
    }

    /// Flush the CPU counters of every leaf at once, before a turn reads
    /// several leaves' `cpu.stat`: each read flushes its own cgroup's
    /// per-CPU counters first, and one flush of `checks/` costs about what
    /// one leaf's does, so the reads that follow it find nothing to flush.
    pub fn flush_usage(&self) {
        if let Some(fd) = &self.subtree.checks_cpu {
            let mut buf = [0u8; 512];
            let _ = pread_all(fd.as_fd(), &mut buf);
        }
    }

    /// A leaf for the next check (`has_leaf` said there is one).
    pub fn take(&mut self) -> Option<Leaf> {
        let mut leaf = self.ready.pop()?;
        leaf.peaks = self.single_use;
        Some(leaf)
    }

    /// Have the helper remove `leaf` (once empty).
    fn retire(&mut self, leaf: Leaf) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Job::Retire(leaf));
        }
    }

    /// A check is done with its leaf.
    pub fn give_back(&mut self, leaf: Leaf) {
        if leaf.killed || leaf.capped || self.single_use {
            self.retire(leaf);
        } else if leaf.left {
            // One read here, not one per clean leaf: a leaf that was empty
            // when its leader exited stays empty.
            self.lingering.push(leaf);
        } else {
            // Kept, however many: a turn ends many checks before the next
            // admits as many (retiring past a watermark made every burst
            // an rmdir and a mkdir per check). At most `max_running` +
            // `spare` leaves exist (see `has_leaf`).
            self.ready.push(leaf);
        }
    }
}

impl Drop for Pool {
    /// At the executor's end: kill what checks left running on purpose,
    /// remove every leaf, and the subtree directories it created.
    fn drop(&mut self) {
        for mut leaf in self.lingering.drain(..) {
            leaf.kill();
            self.ready.push(leaf);
        }
        drop(self.jobs.take());
        if let Some(helper) = self.helper.take() {
            let _ = helper.join();
        }
        for leaf in self.made.try_iter() {
            self.ready.push(leaf);
        }
        for leaf in self.ready.drain(..) {
            retire(self.subtree.checks.as_fd(), leaf);
        }
        self.subtree.pinned.clear();
        let s = &self.subtree;
        if let Err(e) = rustix::fs::rmdir(s.base.join("checks")) {
            tracing::warn!("cannot remove {}/checks: {e}", s.base.display());
        }
        if s.remove_base
            && let Err(e) = rustix::fs::rmdir(&s.base)
        {
            tracing::warn!("cannot remove {}: {e}", s.base.display());
        }
    }
}

/// The helper thread: make leaves, retire killed ones.
fn helper(
    checks: &OwnedFd,
    names: &AtomicU64,
    entry: Entry,
    jobs: crossbeam_channel::Receiver<Job>,
    made: crossbeam_channel::Sender<Leaf>,
) {
    for job in jobs {
        match job {
            Job::Make(n) => {
                for _ in 0..n {
                    match make_leaf(checks.as_fd(), names, entry) {
                        Ok(leaf) => {
                            if made.send(leaf).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::error!("cannot create a cgroup leaf: {e}");
                            break;
                        }
                    }
                }
            }
            Job::Retire(leaf) => retire(checks.as_fd(), leaf),
        }
    }
}

/// Where the subtree is, whether this executor creates it, and whether it
/// is the service's own delegated cgroup.
struct Base {
    path: PathBuf,
    create: bool,
    delegated: bool,
}

/// The subtree for `containment` (see `Containment`): the given path, the
/// delegated cgroup this process is in, or, as root, a fresh one at the
/// mount's top (after removing what crashed executors left there).
fn choose_base(containment: &Containment) -> Result<Option<Base>, Why> {
    Ok(Some(match containment {
        Containment::Off => return Ok(None),
        Containment::Path(p) => Base {
            path: p.clone(),
            create: true,
            delegated: false,
        },
        Containment::Auto => {
            let mount = find_mount().ok_or("no cgroup2 file system is mounted")?;
            match own_cgroup() {
                Some(own) if !own.is_empty() && delegated(&mount.join(&own)) => Base {
                    path: mount.join(own),
                    create: false,
                    delegated: true,
                },
                _ if rustix::process::geteuid().is_root() => {
                    recover_stale(&mount);
                    let n = NEXT_SUBTREE.fetch_add(1, Ordering::Relaxed);
                    let pid = rustix::process::getpid().as_raw_nonzero().get();
                    Base {
                        path: mount.join(format!("pidring.{pid}.{n}")),
                        create: true,
                        delegated: false,
                    }
                }
                _ => {
                    return Err("not root, and this process's cgroup is not delegated \
                                    (systemd Delegate=yes)"
                        .into());
                }
            }
        }
    }))
}

/// Create (if asked) and lock the subtree at `base`, move into its
/// supervisor leaf when delegated, make `checks/`, enable the controllers
/// for it, and kill and remove what a crashed predecessor left there. The
/// subtree, and the controllers the checks' leaves have.
fn open_subtree(base: &Path, create: bool, delegated: bool) -> Result<(Subtree, Vec<String>), Why> {
    let why = |what: &str, e: &dyn std::fmt::Display| format!("{what} {}: {e}", base.display());
    if create {
        // Nothing is created outside a cgroup2 file system.
        let parent = base.parent().unwrap_or(Path::new("/"));
        match on_cgroup2(parent) {
            Ok(true) => {}
            Ok(false) => return Err(not_cgroup2(base)),
            Err(e) => return Err(why("cannot stat the parent of", &e)),
        }
        match std::fs::create_dir(base) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(why("cannot create", &e)),
        }
    }
    if !on_cgroup2(base).map_err(|e| why("cannot stat", &e))? {
        return Err(not_cgroup2(base));
    }
    let lock = rustix::fs::open(
        base,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| why("cannot open", &e))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|e| why("another executor owns", &e))?;
    if delegated {
        move_self_to_supervisor(base)
            .map_err(|e| why("cannot move into the supervisor leaf of", &e))?;
    }
    match rustix::fs::mkdirat(&lock, "checks", Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(why("cannot create checks/ in", &e)),
    }
    let checks = open_at(lock.as_fd(), "checks", OFlags::RDONLY | OFlags::DIRECTORY)
        .map_err(|e| why("cannot open checks/ in", &e))?;
    let controllers = enable_controllers(lock.as_fd(), checks.as_fd());
    let found = recover(checks.as_fd());
    if found > 0 {
        tracing::warn!(
            processes = found,
            "killed {found} processes a previous executor left in {}/checks",
            base.display()
        );
    }
    let subtree = Subtree {
        base: base.to_path_buf(),
        remove_base: create,
        checks_cpu: open_at(checks.as_fd(), "cpu.stat", OFlags::RDONLY).ok(),
        checks: std::sync::Arc::new(checks),
        _lock: lock,
        pinned: pin_procs(base),
    };
    Ok((subtree, controllers))
}

/// How children enter their leaf: cloned straight into it if a test child
/// cloned into a fresh leaf lives (Linux 6.18 kills one cloned into a leaf
/// that was ever killed, and before 5.7 there is no `CLONE_INTO_CGROUP`),
/// else by writing their own pid to its `cgroup.procs`.
fn entry_by_self_test(
    checks: BorrowedFd<'_>,
    names: &AtomicU64,
    base: &Path,
) -> Result<Entry, Why> {
    let why = |what: &str, e: &dyn std::fmt::Display| format!("{what} {}: {e}", base.display());
    let mut test_leaf = make_leaf(checks, names, Entry::CloneInto)
        .map_err(|e| why("cannot create a leaf in", &e))?;
    if open_at(test_leaf.dir(), "cgroup.kill", OFlags::WRONLY).is_err() {
        return Err(format!(
            "{} has no cgroup.kill (Linux 5.14 or later needed)",
            base.display()
        ));
    }
    let entry = match self_test(&test_leaf, Entry::CloneInto) {
        Ok(()) => Entry::CloneInto,
        Err(first) => {
            // `clone3` into it is not possible here (before Linux 5.7,
            // or it kills the child): try moving in by write.
            test_leaf.procs = open_at(test_leaf.dir(), "cgroup.procs", OFlags::WRONLY).ok();
            match self_test(&test_leaf, Entry::Write) {
                Ok(()) => {
                    tracing::warn!(
                        "a child cloned into a cgroup did not live ({first}); children move themselves in instead"
                    );
                    Entry::Write
                }
                Err(second) => return Err(format!("self-test: {first}; {second}")),
            }
        }
    };
    // The test child was there: the leaf is not reused (it was not
    // killed, but nothing is gained by trusting it).
    retire(checks, test_leaf);
    Ok(entry)
}

/// Enable what of `memory`, `pids` and `cpu` the base offers in its
/// subtree and in `checks/` (for the leaves' peaks, OOM counts and caps);
/// the names enabled. With `cpu` every check is a scheduling group of its
/// own (equal weights).
fn enable_controllers(base: BorrowedFd<'_>, checks: BorrowedFd<'_>) -> Vec<String> {
    let mut buf = [0u8; 512];
    let offered = open_at(base, "cgroup.controllers", OFlags::RDONLY)
        .and_then(|fd| pread_all(fd.as_fd(), &mut buf).map(|t| t.to_vec()))
        .unwrap_or_default();
    let offered = String::from_utf8_lossy(&offered).into_owned();
    let mut on = Vec::new();
    for name in ["memory", "pids", "cpu"] {
        if !offered.split_whitespace().any(|c| c == name) {
            continue;
        }
        let change = format!("+{name}");
        let ok = [base, checks].iter().all(|dir| {
            open_at(*dir, "cgroup.subtree_control", OFlags::WRONLY)
                .and_then(|fd| rustix::io::write(&fd, change.as_bytes()))
                .is_ok()
        });
        if ok {
            on.push(name.to_string());
        } else {
            tracing::warn!("cannot enable the {name} controller for the checks' cgroups");
        }
    }
    on
}

/// Make leaf `checks/<n>` and open what the hot path needs.
fn make_leaf(checks: BorrowedFd<'_>, names: &AtomicU64, entry: Entry) -> rustix::io::Result<Leaf> {
    let mut name;
    loop {
        name = names.fetch_add(1, Ordering::Relaxed);
        match rustix::fs::mkdirat(checks, name.to_string(), Mode::from_raw_mode(0o755)) {
            Ok(()) => break,
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e),
        }
    }
    let mut leaf = Leaf::open(checks, name)?;
    // A cached dentry for its `cgroup.procs` (see `pin_procs`): looked up
    // once here, kept by the dentry cache.
    let _ = rustix::fs::statat(leaf.dir(), "cgroup.procs", AtFlags::SYMLINK_NOFOLLOW);
    if entry == Entry::Write {
        leaf.procs = Some(open_at(leaf.dir(), "cgroup.procs", OFlags::WRONLY)?);
    }
    // The first poll of a kernfs file fires at once, until it was read.
    let _ = leaf.populated();
    Ok(leaf)
}

/// Keep the inodes of the `cgroup.procs` files that `clone3` into a leaf
/// checks for write permission (the leaf's and its common ancestor's with
/// the executor's own cgroup, which is the base or a cgroup above it) in
/// the inode cache. kernfs frees an inode at its last `iput`: without a
/// dentry or an open file holding it, each `CLONE_INTO_CGROUP` allocated,
/// initialised and evicted two inodes (`cgroup_may_write`), ~1.5 µs of the
/// loop's CPU per check (perf, 2 vCPU). The base and each ancestor up to
/// the mount are held here; leaves by a lookup when made (`make_leaf`).
/// Without these, clone3 is only slower.
fn pin_procs(base: &Path) -> Vec<OwnedFd> {
    let mut pinned = Vec::new();
    let mut dir = Some(base);
    while let Some(d) = dir {
        match rustix::fs::open(
            d.join("cgroup.procs"),
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => pinned.push(fd),
            Err(_) => break,
        }
        // The mount's root is the last cgroup (its parent is not on cgroup2).
        dir = d.parent().filter(|p| on_cgroup2(p) == Ok(true));
    }
    pinned
}

/// Wait (bounded) until a leaf is empty, then remove it. Not on the loop.
fn retire(checks: BorrowedFd<'_>, leaf: Leaf) {
    let end = Instant::now() + RETIRE_WAIT;
    while leaf.populated() && Instant::now() < end {
        let mut fds = [rustix::event::PollFd::new(
            &leaf.events,
            rustix::event::PollFlags::PRI,
        )];
        let _ = rustix::event::poll(
            &mut fds,
            Some(&rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            }),
        );
    }
    let name = leaf.name.to_string();
    drop(leaf);
    if let Err(e) = rustix::fs::unlinkat(checks, &name, AtFlags::REMOVEDIR) {
        tracing::warn!("cannot remove cgroup leaf checks/{name}: {e}");
    }
}

/// Kill and remove every leaf in `checks` (what a crashed executor left);
/// how many processes they held.
fn recover(checks: BorrowedFd<'_>) -> u32 {
    let Ok(dir) = rustix::fs::Dir::read_from(checks) else {
        return 0;
    };
    let mut found = 0;
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(n) = name.parse::<u64>() else { continue };
        if entry.file_type() != rustix::fs::FileType::Directory {
            continue;
        }
        let Ok(mut leaf) = Leaf::open(checks, n) else {
            continue;
        };
        if leaf.populated() {
            found += leaf.count_procs();
            leaf.kill();
        }
        retire(checks, leaf);
    }
    found
}

/// Recover the subtrees of executors of this kind (`pidring.<pid>.<n>`
/// under the mount) whose process is gone and whose lock is free.
fn recover_stale(mount: &Path) {
    let Ok(entries) = std::fs::read_dir(mount) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("pidring.")
            .and_then(|r| r.split('.').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // Its lock is what says whether an owner lives; its pid only
        // guards the moment between an owner's mkdir and its flock (a pid
        // from another PID namespace, such as 1, may name anyone here:
        // past a few seconds, the lock alone decides).
        let young = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < STALE_AFTER));
        if young && Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        let Ok(lock) = rustix::fs::open(
            &path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            continue;
        };
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            continue;
        }
        if let Ok(checks) = open_at(lock.as_fd(), "checks", OFlags::RDONLY | OFlags::DIRECTORY) {
            let found = recover(checks.as_fd());
            tracing::warn!(
                processes = found,
                "removed the cgroup subtree {} of an executor that is gone; killed {found} processes in it",
                path.display()
            );
            drop(checks);
            let _ = rustix::fs::rmdir(path.join("checks"));
        }
        let _ = rustix::fs::rmdir(&path);
    }
}

/// Move this process into `<base>/supervisor` (created if missing).
fn move_self_to_supervisor(base: &Path) -> std::io::Result<()> {
    let sup = base.join("supervisor");
    match std::fs::create_dir(&sup) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let pid = rustix::process::getpid().as_raw_nonzero().get();
    std::fs::write(sup.join("cgroup.procs"), pid.to_string())
}

/// A child for the self-test: exits 0 at once.
extern "C" fn test_child(arg: *mut libc::c_void) -> libc::c_int {
    let procs = arg as usize as i32;
    if procs >= 0 && rawsys::write(procs, b"0") < 0 {
        return 2;
    }
    0
}

/// Create a child in `leaf` the way checks are (`entry`) and see that it
/// lives to exit 0 (Linux 6.18 SIGKILLs a child cloned into a leaf whose
/// `cgroup.kill` was written; some kernel may do it to a fresh one).
fn self_test(leaf: &Leaf, entry: Entry) -> Result<(), String> {
    // u128s: the stack's top must be 16-byte aligned.
    let mut stack = vec![0u128; 1024];
    let mut pidfd: libc::c_int = -1;
    let procs = match entry {
        Entry::CloneInto => -1,
        Entry::Write => leaf
            .procs()
            .map(|f| f.as_raw_fd())
            .ok_or("cannot open cgroup.procs for writing")?,
    };
    let mut args = rawsys::CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_PIDFD) as u64,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack.as_mut_ptr() as u64,
        stack_size: std::mem::size_of_val(&stack[..]) as u64,
        ..Default::default()
    };
    if entry == Entry::CloneInto {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = leaf.dir().as_raw_fd() as u64;
    }
    // SAFETY: the child runs `test_child` on `stack`, which lives until it
    // is reaped below; it only makes raw system calls. Signals are blocked
    // on the calling (loop) thread.
    let pid = unsafe { rawsys::clone3(&args, test_child, procs as usize as *mut libc::c_void) };
    if pid < 0 {
        return Err(format!(
            "clone3 into a cgroup failed: {}",
            std::io::Error::from_raw_os_error((-pid) as i32)
        ));
    }
    // SAFETY: CLONE_PIDFD stored a new pidfd that nothing else owns.
    let pidfd = unsafe { <OwnedFd as rustix::fd::FromRawFd>::from_raw_fd(pidfd) };
    let status = rustix::process::waitid(
        rustix::process::WaitId::PidFd(pidfd.as_fd()),
        rustix::process::WaitIdOptions::EXITED,
    );
    drop(stack);
    match status {
        Ok(Some(s)) if s.exit_status() == Some(0) => Ok(()),
        Ok(Some(s)) => Err(format!(
            "a child created in a fresh cgroup leaf did not live: {:?}",
            s.terminating_signal().map_or_else(
                || format!("exit {:?}", s.exit_status()),
                crate::signal::signal_name
            )
        )),
        Ok(None) => Err("waitid said nothing".into()),
        Err(e) => Err(format!("waitid: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files_parse() {
        let t = b"populated 1\nfrozen 0\n";
        assert_eq!(keyed(t, "populated"), Some(1));
        assert_eq!(keyed(t, "frozen"), Some(0));
        assert_eq!(keyed(t, "nope"), None);
        let c = Cpu::parse(b"usage_usec 120\nuser_usec 100\nsystem_usec 20\nnr_periods 0\n");
        assert_eq!((c.usage, c.user, c.system), (120, 100, 20));
    }

    #[test]
    fn settings_parse() {
        assert_eq!("auto".parse::<Containment>(), Ok(Containment::Auto));
        assert_eq!("off".parse::<Containment>(), Ok(Containment::Off));
        assert_eq!(
            "/sys/fs/cgroup/x".parse::<Containment>(),
            Ok(Containment::Path("/sys/fs/cgroup/x".into()))
        );
        assert!("x".parse::<Containment>().is_err());
    }
}
