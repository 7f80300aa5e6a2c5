//! Checks that leave processes behind in three ways the process group
//! misses, each marked in its environment so that a test can find every
//! survivor in /proc afterwards; and the cgroup-or-skip rule.

use std::sync::atomic::{AtomicU64, Ordering};

/// How a check's descendant escapes its process group.
#[derive(Debug, Clone, Copy)]
pub enum Escape {
    /// `setsid` in a double fork (re-parented to init at once).
    SetsidDoubleFork,
    /// Job control (`set -m`): a background job in a group of its own.
    SetMinusM,
    /// A fork from a thread other than the main one, which starts a new session.
    ThreadForkSetsid,
}

pub const ESCAPES: [Escape; 3] = [
    Escape::SetsidDoubleFork,
    Escape::SetMinusM,
    Escape::ThreadForkSetsid,
];

/// The environment variable the escapees carry.
pub const MARK: &str = "PIDRING_ESCAPE_MARK";

/// A fresh marker value (unique per process and call).
pub fn marker() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "esc-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl Escape {
    /// The shell script that leaves a long sleeper behind, then says
    /// `started` and (if `then_exit`) exits 0, else sleeps.
    pub fn script(self, then_exit: bool) -> String {
        let leave = match self {
            Escape::SetsidDoubleFork => {
                "(setsid sh -c 'touch \"$PIDRING_READY\"; while :; do sleep 1; done' &)"
            }
            Escape::SetMinusM => {
                // dash turns job control off without a tty; bash does not.
                "bash -c 'set -m; sh -c '\\''touch \"$PIDRING_READY\"; while :; do sleep 1; done'\\'' & \
                 sleep 100' &"
            }
            Escape::ThreadForkSetsid => {
                "python3 -c 'import os, threading, time\n\
                 def f():\n    \
                   if os.fork() == 0:\n        \
                     os.setsid()\n        \
                     open(os.environ[\"PIDRING_READY\"], \"w\").close()\n        \
                     time.sleep(1000)\n        \
                     os._exit(0)\n\
                 t = threading.Thread(target=f); t.start(); t.join()\n' &"
            }
        };
        // Wait until the escapee exists, so that the check does not end
        // before there is anything to contain.
        let wait = "n=0; while [ ! -e \"$PIDRING_READY\" ] && [ $n -lt 1000 ]; do \
                    n=$((n+1)); sleep 0.01; done";
        let end = if then_exit { "exit 0" } else { "sleep 100" };
        format!("{leave}\n{wait}\necho started\n{end}")
    }

    /// The environment a check running `script` needs: (name, value) pairs.
    pub fn env(marker: &str) -> [(String, String); 2] {
        [
            (MARK.to_string(), marker.to_string()),
            (
                "PIDRING_READY".to_string(),
                std::env::temp_dir()
                    .join(format!("{marker}.ready"))
                    .display()
                    .to_string(),
            ),
        ]
    }
}

/// Live processes whose environment carries `marker` (zombies have none).
pub fn alive_with(marker: &str) -> Vec<i32> {
    let needle = format!("{MARK}={marker}");
    let me = std::process::id() as i32;
    let pids: Vec<i32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.into_iter()
        .filter(|&p| p != me)
        .filter(|&p| {
            std::fs::read(format!("/proc/{p}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == needle.as_bytes()))
        })
        .filter(|&p| {
            // Not a zombie (dead, waiting for its parent).
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                let state = s
                    .rfind(')')
                    .and_then(|i| s[i + 1..].split_whitespace().next());
                !matches!(state, Some("Z" | "X") | None)
            })
        })
        .collect()
}

/// What is left alive of `marker`'s checks; then kill it (so that a failed
/// test leaves nothing either) and remove the ready file.
pub fn survivors(marker: &str) -> Vec<i32> {
    let left = alive_with(marker);
    cleanup(marker);
    let _ = std::fs::remove_file(&Escape::env(marker)[1].1);
    left
}

/// Kill what a failed test left (only our marked processes).
pub fn cleanup(marker: &str) {
    for p in alive_with(marker) {
        // SAFETY: kill(2) with a pid we just found carrying our marker.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
}

/// Whether cgroup containment must be there (PIDRING_REQUIRE_CGROUP=1).
pub fn require_cgroup() -> bool {
    std::env::var("PIDRING_REQUIRE_CGROUP").is_ok_and(|v| v == "1")
}

/// True if `mode` is `cgroup`; else print a SKIP line (or fail, if required).
pub fn cgroup_or_skip(test: &str, mode: &str, detail: &str) -> bool {
    if mode == "cgroup" {
        return true;
    }
    assert!(
        !require_cgroup(),
        "{test}: containment is {mode} ({detail}) and PIDRING_REQUIRE_CGROUP=1"
    );
    eprintln!("SKIP {test}: no cgroup containment here ({mode}: {detail})");
    false
}
