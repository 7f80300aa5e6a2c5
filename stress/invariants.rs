//! The end-of-run checkers. Each one reads the real system (/proc) or the
//! run's own ledger and says pass or fail with the evidence.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// One line of the verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    /// What was checked.
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// The evidence, for people.
    pub detail: String,
}

impl Verdict {
    /// A verdict line.
    pub fn new(name: &str, ok: bool, detail: impl Into<String>) -> Verdict {
        Verdict {
            name: name.to_string(),
            ok,
            detail: detail.into(),
        }
    }

    /// `PASS name: detail` / `FAIL ...`.
    pub fn line(&self) -> String {
        format!(
            "{} {}: {}",
            if self.ok { "PASS" } else { "FAIL" },
            self.name,
            self.detail
        )
    }
}

/// The fields of /proc/PID/stat the checkers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    /// Process id.
    pub pid: i32,
    /// State letter (R, S, Z, ...).
    pub state: char,
    /// Parent pid.
    pub ppid: i32,
    /// Process group id.
    pub pgid: i32,
    /// Session id.
    pub sid: i32,
    /// When it started, in clock ticks since boot (/proc's `starttime`).
    pub start_ticks: u64,
}

impl ProcInfo {
    /// When it started, microseconds since boot (CLOCK_BOOTTIME).
    pub fn start_us(&self) -> u64 {
        self.start_ticks.saturating_mul(1_000_000) / clock_ticks()
    }
}

/// Clock ticks per second of /proc's times.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Now, microseconds since boot (the clock /proc start times count on).
pub fn boottime_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}

/// Parse one /proc/PID/stat line (the command name may hold spaces and parens).
pub fn parse_stat(line: &str) -> Option<ProcInfo> {
    let pid = line.split_whitespace().next()?.parse().ok()?;
    let rest = &line[line.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgid = f.next()?.parse().ok()?;
    let sid = f.next()?.parse().ok()?;
    // starttime is field 22; we stand after field 6 (session).
    let start_ticks = f.nth(15)?.parse().ok()?;
    Some(ProcInfo {
        pid,
        state,
        ppid,
        pgid,
        sid,
        start_ticks,
    })
}

/// Every process visible in /proc (those that vanish while reading are skipped).
pub fn all_processes() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| parse_stat(&s))
        .collect()
}

/// Zombies whose parent is `parent`.
pub fn zombie_children(procs: &[ProcInfo], parent: i32) -> Vec<i32> {
    procs
        .iter()
        .filter(|p| p.ppid == parent && p.state == 'Z')
        .map(|p| p.pid)
        .collect()
}

/// Number of open fds of a process.
pub fn fd_count(pid: i32) -> std::io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Open fds of a process, by what they point at (`readlink` of each
/// `/proc/PID/fd/N`), sorted. An fd closed between the listing and its
/// readlink is left out.
pub fn fd_targets(pid: i32) -> std::io::Result<Vec<String>> {
    let mut targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .collect();
    targets.sort();
    Ok(targets)
}

/// Open fds of a live executor but those into its cgroup subtree (its pool
/// of leaves, bounded by `max_running` and reused, grows with the most
/// checks it ran at once: not a leak of finished checks; that every one is
/// closed is checked after the executor's shutdown, on the whole process).
fn fds_but_cgroup_leaves(pid: i32) -> std::io::Result<Vec<String>> {
    let mut targets = fd_targets(pid)?;
    targets.retain(|t| !Path::new(t).starts_with("/sys/fs/cgroup"));
    Ok(targets)
}

/// How long [`settled_fds`] samples an executor in this process: its
/// short-lived fds (its orphan scan reads /proc) last less.
pub const SETTLE: Duration = Duration::from_millis(80);

/// How long [`settled_fds`] samples a daemon: it closes the socket of a
/// connection that ended (its threads done) when its accept loop next
/// wakes, which it does at least every 500 ms (`prune_every` in the
/// daemon's server.rs): twice that.
pub const DAEMON_SETTLE: Duration = Duration::from_secs(1);

/// Open fds of a live executor (but its cgroup leaves), settled: the
/// targets of the least of samples 20 ms apart over `window`. The executor
/// opens short-lived fds of its own, which one sample can catch; a leaked
/// fd shows in every one.
pub fn settled_fds(pid: i32, window: Duration) -> std::io::Result<Vec<String>> {
    let end = Instant::now() + window;
    let mut least = fds_but_cgroup_leaves(pid)?;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
        let sample = fds_but_cgroup_leaves(pid)?;
        if sample.len() < least.len() {
            least = sample;
        }
    }
    Ok(least)
}

/// A timed-out check's group: its leader's pid and when the leader lived
/// (µs since boot, from spawn to result).
pub type GroupLife = (i32, u64, u64);

/// Slack for /proc's start-time resolution (one clock tick is 10 ms).
const START_SLACK_US: u64 = 20_000;

/// Processes still in the group of a timed-out leader: born while that
/// leader lived, in its group, and not the holder of the
/// recycled number itself. (The birth window keeps a later check that reused
/// the number — and its own descendants — out of an earlier check's verdict.)
pub fn leftovers_in_groups(procs: &[ProcInfo], groups: &[GroupLife]) -> Vec<ProcInfo> {
    let mut by_leader: std::collections::HashMap<i32, Vec<(u64, u64)>> =
        std::collections::HashMap::new();
    for (pid, from, to) in groups {
        by_leader.entry(*pid).or_default().push((*from, *to));
    }
    let born_in = |p: &ProcInfo, leader: i32| {
        by_leader.get(&leader).is_some_and(|lives| {
            let born = p.start_us();
            lives
                .iter()
                .any(|(from, to)| born + START_SLACK_US >= *from && born <= to + START_SLACK_US)
        })
    };
    procs
        .iter()
        .filter(|p| !by_leader.contains_key(&p.pid))
        .filter(|p| born_in(p, p.pgid))
        .copied()
        .collect()
}

/// Whether a process's environment holds `KEY=VALUE` (zombies have none).
pub fn has_marker(pid: i32, marker: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/environ")) {
        Ok(env) => env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()),
        Err(_) => false,
    }
}

/// Live processes started by this run's checks (found by their environment marker).
pub fn marked_processes(procs: &[ProcInfo], marker: &str) -> Vec<ProcInfo> {
    procs
        .iter()
        .filter(|p| p.state != 'Z' && has_marker(p.pid, marker))
        .copied()
        .collect()
}

/// Per-submission result counts checked for "exactly one": returns
/// (missing, duplicated, unknown) submission numbers.
pub fn exactly_once(
    accepted: &HashSet<u64>,
    results: &std::collections::HashMap<u64, u32>,
) -> (Vec<u64>, Vec<u64>, Vec<u64>) {
    let mut missing: Vec<u64> = accepted
        .iter()
        .filter(|s| !results.contains_key(s))
        .copied()
        .collect();
    let mut dup: Vec<u64> = results
        .iter()
        .filter(|(s, n)| accepted.contains(s) && **n > 1)
        .map(|(s, _)| *s)
        .collect();
    let mut unknown: Vec<u64> = results
        .keys()
        .filter(|s| !accepted.contains(s))
        .copied()
        .collect();
    missing.sort_unstable();
    dup.sort_unstable();
    unknown.sort_unstable();
    (missing, dup, unknown)
}

/// Poll `f` until it returns an empty list or `bound` passes; the last answer.
pub fn wait_until_empty<T>(bound: Duration, mut f: impl FnMut() -> Vec<T>) -> Vec<T> {
    let end = Instant::now() + bound;
    loop {
        let v = f();
        if v.is_empty() || Instant::now() >= end {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Zombie check on `parent`, waiting up to `bound` for pending reaps.
pub fn check_zombies(parent: i32, bound: Duration) -> Verdict {
    let z = wait_until_empty(bound, || zombie_children(&all_processes(), parent));
    Verdict::new(
        "zero zombie children",
        z.is_empty(),
        if z.is_empty() {
            format!("no child of pid {parent} in state Z")
        } else {
            format!("{} zombie(s) of pid {parent}: {:?}", z.len(), first(&z))
        },
    )
}

/// Fd-count check: `now` must equal `start`.
pub fn check_fds(what: &str, start: usize, now: usize) -> Verdict {
    Verdict::new(
        what,
        now == start,
        format!(
            "{start} at start, {now} now ({:+})",
            now as i64 - start as i64
        ),
    )
}

/// [`check_fds`] on two fd samples' targets ([`settled_fds`]): when the
/// counts differ, the evidence names the targets only one sample has.
pub fn check_fd_targets(what: &str, start: &[String], now: &[String]) -> Verdict {
    let mut v = check_fds(what, start.len(), now.len());
    if !v.ok {
        let (gone, new) = (only_in(start, now), only_in(now, start));
        v.detail.push_str(&format!(
            "; only at start: [{}]; only now: [{}]",
            gone.join(", "),
            new.join(", ")
        ));
    }
    v
}

/// The items of sorted `a` that sorted `b` lacks, counting repeats
/// (`anon_inode:[eventpoll]` twice in `a`, once in `b`, is one).
fn only_in(a: &[String], b: &[String]) -> Vec<String> {
    let (mut out, mut j) = (Vec::new(), 0);
    for x in a {
        while j < b.len() && b[j] < *x {
            j += 1;
        }
        if j < b.len() && b[j] == *x {
            j += 1;
        } else {
            out.push(x.clone());
        }
    }
    out
}

/// The first few items of a list, for evidence.
pub fn first<T: Clone>(v: &[T]) -> Vec<T> {
    v.iter().take(10).cloned().collect()
}

/// Tests that spawn children or open fds take this, so the fd and zombie
/// checker tests see only their own doing.
#[cfg(test)]
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::process::Command;

    #[test]
    fn parses_stat_with_odd_names() {
        let p =
            parse_stat("42 (a) b (c)) Z 7 42 40 0 -1 4194564 0 0 0 0 0 0 0 0 20 0 1 0 12345 0 0")
                .unwrap();
        assert_eq!(
            p,
            ProcInfo {
                pid: 42,
                state: 'Z',
                ppid: 7,
                pgid: 42,
                sid: 40,
                start_ticks: 12345
            }
        );
        assert!(parse_stat("garbage").is_none());
    }

    /// The zombie and fd checkers must fail when there is a zombie or a leaked
    /// fd. One test, so no other test of this binary opens fds meanwhile.
    #[test]
    fn checkers_fail_on_a_real_zombie_and_a_leaked_fd() {
        let _serial = serial();
        let me = std::process::id() as i32;
        // A real zombie: a child that exits and is not waited for.
        let mut child = Command::new("/bin/true").spawn().unwrap();
        let pid = child.id() as i32;
        let end = Instant::now() + Duration::from_secs(10);
        while !zombie_children(&all_processes(), me).contains(&pid) {
            assert!(Instant::now() < end, "child {pid} never became a zombie");
            std::thread::sleep(Duration::from_millis(10));
        }
        let v = check_zombies(me, Duration::from_millis(200));
        assert!(!v.ok, "{v:?}");
        assert!(v.detail.contains(&pid.to_string()), "{v:?}");
        child.wait().unwrap();
        let v = check_zombies(me, Duration::from_secs(5));
        assert!(v.ok, "{v:?}");

        // A leaked fd.
        let start = fd_count(me).unwrap();
        let leaked = std::fs::File::open("/proc/self/stat").unwrap();
        let v = check_fds("fds", start, fd_count(me).unwrap());
        assert!(!v.ok && v.detail.contains("+1"), "{v:?}");
        // Settling filters transient fds, never a leaked one.
        let v = check_fds("fds", start, settled_fds(me, SETTLE).unwrap().len());
        assert!(!v.ok && v.detail.contains("+1"), "{v:?}");
        drop(leaked);
        assert!(check_fds("fds", start, fd_count(me).unwrap()).ok);

        // The targets' verdict names the leaked fd.
        let start = settled_fds(me, SETTLE).unwrap();
        let leaked = std::fs::File::open("/proc/self/stat").unwrap();
        let now = settled_fds(me, SETTLE).unwrap();
        let v = check_fd_targets("fds", &start, &now);
        let stat = format!("/proc/{me}/stat");
        assert!(!v.ok && v.detail.contains("+1"), "{v:?}");
        assert!(
            v.detail
                .contains(&format!("only at start: []; only now: [{stat}]")),
            "{v:?}"
        );
        drop(leaked);
        assert!(check_fd_targets("fds", &start, &settled_fds(me, SETTLE).unwrap()).ok);
    }

    #[test]
    fn fd_target_differences_count_repeats() {
        let s = |v: &[&str]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        let start = s(&[
            "/dev/null",
            "anon_inode:[eventpoll]",
            "anon_inode:[eventpoll]",
            "socket:[7]",
        ]);
        let now = s(&[
            "/dev/null",
            "anon_inode:[eventpoll]",
            "socket:[7]",
            "socket:[9]",
        ]);
        assert_eq!(only_in(&start, &now), s(&["anon_inode:[eventpoll]"]));
        assert_eq!(only_in(&now, &start), s(&["socket:[9]"]));
        let v = check_fd_targets("fds", &start, &now[..3]);
        assert!(!v.ok, "{v:?}");
        assert!(
            v.detail
                .ends_with("(-1); only at start: [anon_inode:[eventpoll]]; only now: []"),
            "{v:?}"
        );
        // Equal counts pass, whatever the targets (a socket's inode may change).
        assert!(check_fd_targets("fds", &start, &now).ok);
    }

    #[test]
    fn group_checker_finds_a_left_behind_group_member() {
        let _serial = serial();
        // A real group: sh leads it, sleep stays in it after we kill sh.
        let mut leader = {
            use std::os::unix::process::CommandExt;
            Command::new("/bin/sh")
                .args(["-c", "sleep 30 & wait"])
                .process_group(0)
                .spawn()
                .unwrap()
        };
        let lpid = leader.id() as i32;
        let born = boottime_us();
        let leaders: Vec<GroupLife> =
            vec![(lpid, born.saturating_sub(1_000_000), born + 60_000_000)];
        let end = Instant::now() + Duration::from_secs(10);
        let found = loop {
            let l = leftovers_in_groups(&all_processes(), &leaders);
            if !l.is_empty() || Instant::now() > end {
                break l;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].pgid, lpid);
        // Clean up while the leader pins the group id: kill the group, reap.
        // SAFETY: kill(2) on a group whose leader is our unreaped child.
        unsafe { libc::kill(-lpid, libc::SIGKILL) };
        leader.wait().unwrap();
        let gone = wait_until_empty(Duration::from_secs(10), || {
            leftovers_in_groups(&all_processes(), &leaders)
                .into_iter()
                .filter(|p| p.state != 'Z')
                .collect()
        });
        assert!(gone.is_empty(), "{gone:?}");
        // A process that merely holds the recycled number is not a leftover,
        // nor one born in a later group that reused the number.
        let t = clock_ticks();
        let p = ProcInfo {
            pid: 5,
            state: 'S',
            ppid: 1,
            pgid: 5,
            sid: 5,
            start_ticks: 10 * t,
        };
        let life = [(5, 9_000_000, 11_000_000)];
        assert!(leftovers_in_groups(&[p], &life).is_empty());
        let member = ProcInfo { pid: 6, ..p };
        assert_eq!(leftovers_in_groups(&[member], &life).len(), 1);
        let later = ProcInfo {
            pid: 7,
            start_ticks: 20 * t,
            ..p
        };
        assert!(leftovers_in_groups(&[later], &life).is_empty());
    }

    #[test]
    fn exactly_once_finds_missing_duplicate_and_unknown() {
        let accepted: HashSet<u64> = [1, 2, 3, 4].into();
        let results: HashMap<u64, u32> = [(1, 1), (2, 2), (4, 1), (9, 1)].into();
        let (missing, dup, unknown) = exactly_once(&accepted, &results);
        assert_eq!(missing, vec![3]);
        assert_eq!(dup, vec![2]);
        assert_eq!(unknown, vec![9]);
        let ok: HashMap<u64, u32> = [(1, 1), (2, 1), (3, 1), (4, 1)].into();
        let (m, d, u) = exactly_once(&accepted, &ok);
        assert!(m.is_empty() && d.is_empty() && u.is_empty());
    }

    #[test]
    fn marker_is_found_in_a_childs_environment() {
        let _serial = serial();
        let marker = format!("PIDRING_STRESS_TEST={}", std::process::id());
        let (k, v) = marker.split_once('=').unwrap();
        let mut child = Command::new("/bin/sleep")
            .arg("30")
            .env(k, v)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Until exec, /proc shows the parent's environment: poll.
        let end = Instant::now() + Duration::from_secs(10);
        while !marked_processes(&all_processes(), &marker)
            .iter()
            .any(|p| p.pid == pid)
        {
            assert!(Instant::now() < end, "marker of {pid} never seen");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!has_marker(pid, &marker));
    }
}
