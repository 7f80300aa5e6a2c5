//! Daemon configuration: built-in defaults, a TOML file, and command-line overrides.

use super::DaemonError;
use pidring::backend::BackendKind;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything the daemon can be told. Every field has a working default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Socket path (default: `$XDG_RUNTIME_DIR/pidring.sock`, or `/run/pidring/pidring.sock` as root).
    pub socket: Option<PathBuf>,
    /// Permission bits of the socket (default 0600). In TOML: `0o660` or `"0660"`.
    #[serde(deserialize_with = "de_mode")]
    pub socket_mode: u32,
    /// Group (name or number) given to the socket, for `socket_mode = 0o660`.
    pub socket_group: Option<String>,
    /// Checks running at once.
    pub max_running: usize,
    /// Checks waiting for a slot; past it, submits get `queue_full`.
    pub queue_limit: usize,
    /// Timeout of a submit that gives none.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Grace (SIGTERM → SIGKILL) of a submit that gives none.
    #[serde(deserialize_with = "de_duration")]
    pub grace: Duration,
    /// Output cap per stream of a submit that gives none.
    #[serde(deserialize_with = "de_size")]
    pub output_cap: usize,
    /// Largest output cap a submit may ask for (beyond it: `bad_request`).
    #[serde(deserialize_with = "de_size")]
    pub max_output_cap: usize,
    /// Event backend.
    pub backend: BackendKind,
    /// Containment: `"auto"` (a cgroup v2 leaf per check: the delegated
    /// own cgroup under systemd `Delegate=yes`, else as root a fresh
    /// `<cgroup2 mount>/pidring.<pid>.<n>`; else the process-group
    /// fallback, logged once), `"off"`, or a cgroup2 path this daemon owns
    /// alone (leaves a crashed predecessor left there are killed at start).
    pub cgroup: pidring::cgroup::Containment,
    /// Default `memory_max` of a submit that gives none (none: uncapped).
    /// A cap the host cannot enforce stops the daemon at start.
    pub memory_max: Option<super::protocol::WireSize>,
    /// Default `pids_max` of a submit that gives none.
    pub pids_max: Option<u64>,
    /// Default `cpu_max` (CPUs, e.g. 0.5) of a submit that gives none.
    pub cpu_max: Option<f64>,
    /// Run the executor's loop under `SCHED_FIFO` while a kill is near, so
    /// a saturated machine does not make it late (see
    /// `ExecutorBuilder::realtime_kills`; refused without `CAP_SYS_NICE`,
    /// with a warning).
    pub realtime_kills: bool,
    /// Serve Prometheus text exposition on this address (loopback advised).
    pub metrics: Option<SocketAddr>,
    /// How long SIGTERM waits for in-flight checks before killing them.
    #[serde(deserialize_with = "de_duration")]
    pub drain_timeout: Duration,
    /// Longest request line accepted.
    #[serde(deserialize_with = "de_size")]
    pub max_line_bytes: usize,
    /// Per connection: checks in flight plus answers not yet written. At the
    /// limit the daemon stops reading that connection's requests.
    pub max_client_queue: usize,
    /// Per connection: what its checks in flight and its unwritten results
    /// may hold (see `check_bytes`). At the limit the daemon stops reading
    /// that connection's requests.
    #[serde(deserialize_with = "de_size")]
    pub max_client_bytes: usize,
    /// The same, for all connections together. (Below `max_client_bytes`
    /// it is the binding limit; one check always goes ahead when nothing
    /// else holds any.)
    #[serde(deserialize_with = "de_size")]
    pub max_total_bytes: usize,
    /// Connections served at once (each costs two threads and two
    /// descriptors); more are answered `too_many_clients` and closed.
    pub max_clients: usize,
    /// A client whose socket accepts no bytes for this long is dropped.
    #[serde(deserialize_with = "de_duration")]
    pub client_write_timeout: Duration,
    /// Run checks as this user (name or uid): its supplementary groups,
    /// its primary group (or `group`) and its uid, set before exec. Only
    /// root can; a daemon that is not root may only name itself.
    pub user: Option<String>,
    /// With `user`: run checks with this group (name or gid) as primary.
    pub group: Option<String>,
    /// Users a submit may ask to run as (its `user` field); others get
    /// `forbidden`.
    pub allowed_users: Vec<String>,
    /// What may run: absolute paths or globs (`*` and `?` within a path
    /// segment, `**` across segments), matched against the program as
    /// resolved (PATH search, symlinks and `..` resolved). Empty: anything.
    pub allowed_commands: Vec<String>,
    /// Also serve a Nagios 4 core as an external worker (`[nagios]` section),
    /// through the same executor: its jobs show in the same stats.
    pub nagios: Option<crate::nagios::NagiosWorkerConfig>,
    /// Also serve mod_gearman queues on gearmand (`[gearman]` section, with
    /// mod_gearman's worker.cfg keys), through the same executor.
    pub gearman: Option<crate::gearman::GearmanConfig>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: None,
            socket_mode: 0o600,
            socket_group: None,
            max_running: 1024,
            queue_limit: 100_000,
            timeout: pidring::check::DEFAULT_TIMEOUT,
            grace: pidring::check::DEFAULT_GRACE,
            output_cap: pidring::check::DEFAULT_OUTPUT_CAP,
            max_output_cap: 1024 * 1024,
            backend: BackendKind::Auto,
            cgroup: pidring::cgroup::Containment::Auto,
            memory_max: None,
            pids_max: None,
            cpu_max: None,
            realtime_kills: true,
            metrics: None,
            drain_timeout: Duration::from_secs(10),
            max_line_bytes: 1024 * 1024,
            max_client_queue: 4096,
            max_client_bytes: 256 * 1024 * 1024,
            max_total_bytes: 1024 * 1024 * 1024,
            max_clients: 1024,
            client_write_timeout: Duration::from_secs(30),
            user: None,
            group: None,
            allowed_users: Vec::new(),
            allowed_commands: Vec::new(),
            nagios: None,
            gearman: None,
        }
    }
}

impl DaemonConfig {
    /// Read a TOML file.
    pub fn load(path: &Path) -> Result<DaemonConfig, DaemonError> {
        let text = std::fs::read_to_string(path).map_err(|source| DaemonError::ConfigRead {
            path: path.to_owned(),
            source,
        })?;
        DaemonConfig::parse(&text).map_err(|message| DaemonError::Config {
            path: path.to_owned(),
            message,
        })
    }

    /// Parse TOML text. Values are checked by `validate`, once command-line
    /// overrides are applied (a file's `max_running = 0` may be overridden).
    pub fn parse(text: &str) -> Result<DaemonConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Reject values that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_running == 0 {
            return Err("max_running must be at least 1".into());
        }
        if self.timeout < pidring::check::MIN_TIMEOUT {
            return Err("timeout must be at least 1ms".into());
        }
        if self.max_line_bytes < 64 {
            return Err("max_line_bytes must be at least 64".into());
        }
        if self.max_client_queue == 0 {
            return Err("max_client_queue must be at least 1".into());
        }
        if self.max_clients == 0 {
            return Err("max_clients must be at least 1".into());
        }
        if self.output_cap > self.max_output_cap {
            return Err(format!(
                "output_cap ({} bytes) is above max_output_cap ({} bytes)",
                self.output_cap, self.max_output_cap
            ));
        }
        let largest = check_bytes(self.max_line_bytes, self.max_output_cap)
            .max(answer_bytes(self.max_line_bytes));
        if self.max_client_bytes < largest {
            return Err(format!(
                "max_client_bytes ({} bytes) cannot hold the largest check: one with a request of max_line_bytes ({}) and output at max_output_cap ({}) needs {largest} bytes",
                self.max_client_bytes, self.max_line_bytes, self.max_output_cap
            ));
        }
        if self.client_write_timeout.is_zero() {
            return Err("client_write_timeout must be greater than zero".into());
        }
        if self.group.is_some() && self.user.is_none() {
            return Err("group is set without user: name the user checks run as".into());
        }
        pidring::policy::Allowlist::new(&self.allowed_commands)
            .map_err(|e| format!("allowed_commands: {e}"))?;
        if let Some(n) = &self.nagios {
            n.validate().map_err(|e| format!("[nagios]: {e}"))?;
        }
        if let Some(g) = &self.gearman {
            g.validate().map_err(|e| format!("[gearman]: {e}"))?;
        }
        Ok(())
    }

    /// The policy these settings make: the users looked up (once, here:
    /// the child that runs a check cannot), and each checked to be one
    /// this process can take.
    pub fn policy(&self) -> Result<pidring::policy::Policy, String> {
        use pidring::policy::{Allowlist, Policy, RunAs};
        use std::sync::Arc;
        let lookup = |key: &str, user: &str, group: Option<&str>| {
            let who = RunAs::lookup(user, group).map_err(|e| format!("{key}: {e}"))?;
            who.usable().map_err(|e| format!("{key}: {e}"))?;
            Ok::<_, String>(Arc::new(who))
        };
        let run_as = match &self.user {
            Some(u) => Some(lookup("user", u, self.group.as_deref())?),
            None => None,
        };
        let allowed_users = self
            .allowed_users
            .iter()
            .map(|u| lookup("allowed_users", u, None))
            .collect::<Result<_, _>>()?;
        let allowed_commands =
            Allowlist::new(&self.allowed_commands).map_err(|e| format!("allowed_commands: {e}"))?;
        Ok(Policy {
            allowed_commands,
            run_as,
            allowed_users,
        })
    }

    /// The socket path to use: the configured one or the default.
    pub fn socket_path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(default_socket_path)
    }
}

/// A reload's log line parts: what changed ("nothing" if nothing), and
/// what waits for a restart (empty, or "; changed in the file but …").
pub fn reload_summary(changed: &[String], restart: &[&str]) -> (String, String) {
    let changed = if changed.is_empty() {
        "nothing".to_string()
    } else {
        changed.join(", ")
    };
    let restart = if restart.is_empty() {
        String::new()
    } else {
        format!(
            "; changed in the file but kept until a restart: {}",
            restart.join(", ")
        )
    };
    (changed, restart)
}

/// Bytes a result takes besides its two output streams (an estimate for
/// accounting, not a cap).
pub const RESULT_OVERHEAD: usize = 2048;

/// What a check submitted in a request line of `line_len` bytes, with
/// output cap `cap`, may hold in memory for its client until its answer is
/// written, counted against `max_client_bytes` and `max_total_bytes`: the
/// check itself (its strings, and their C copies for exec: twice the line
/// at most), both streams full, the parsed plugin text (a copy of stdout at
/// most; its perfdata is bounded, see `plugin::MAX_PERFDATA`), and the rest
/// of the result. (The serialised line, up to 6 bytes per output byte, is
/// never held: the writer streams it through a buffer of 64 KiB.)
pub fn check_bytes(line_len: usize, cap: usize) -> usize {
    line_len
        .saturating_mul(2)
        .saturating_add(cap.saturating_mul(3))
        .saturating_add(RESULT_OVERHEAD)
}

/// What the answer to a request line of `line_len` bytes may hold, counted
/// against `max_client_bytes` until written: it may echo the request's id
/// (at most the line), and an error's message may name it again.
pub fn answer_bytes(line_len: usize) -> usize {
    line_len.saturating_mul(3).saturating_add(RESULT_OVERHEAD)
}

/// The default socket: `/run/pidring/pidring.sock` as root, else
/// `$XDG_RUNTIME_DIR/pidring.sock`, else `/tmp/pidring-$UID/pidring.sock`.
pub fn default_socket_path() -> PathBuf {
    let uid = rustix::process::getuid();
    if uid.is_root() {
        return PathBuf::from("/run/pidring/pidring.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("pidring.sock"),
        _ => PathBuf::from(format!("/tmp/pidring-{}", uid.as_raw())).join("pidring.sock"),
    }
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    super::protocol::WireDuration::deserialize(d).map(|w| w.0)
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    super::protocol::WireSize::deserialize(d).map(|w| w.0)
}

fn de_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(u32),
        Text(String),
    }
    let mode = match Raw::deserialize(d)? {
        Raw::Num(n) => n,
        Raw::Text(t) => parse_mode(&t).map_err(serde::de::Error::custom)?,
    };
    if mode > 0o777 {
        return Err(serde::de::Error::custom(format!(
            "socket_mode {mode} is not a permission mode: write it in octal, e.g. 0o660 or \"0660\""
        )));
    }
    Ok(mode)
}

/// Parse an octal permission mode such as `0600`, `600` or `0o660`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "invalid socket mode {s:?}: expected octal permission bits such as 0600 or 0660"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(DaemonConfig::parse("").unwrap(), DaemonConfig::default());
    }

    #[test]
    fn parses_every_field() {
        let c = DaemonConfig::parse(
            r#"
            socket = "/tmp/x.sock"
            socket_mode = 0o660
            socket_group = "nagios"
            max_running = 8
            queue_limit = 100
            timeout = "30s"
            grace = 2
            output_cap = "16k"
            backend = "epoll"
            realtime_kills = false
            metrics = "127.0.0.1:9100"
            drain_timeout = "1m"
            max_line_bytes = "64KiB"
            max_client_queue = 10
            max_output_cap = "256k"
            max_client_bytes = "8MiB"
            client_write_timeout = "5s"
            "#,
        )
        .unwrap();
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(c.grace, Duration::from_secs(2));
        assert_eq!(c.output_cap, 16 * 1024);
        assert_eq!(c.backend, BackendKind::Epoll);
        assert!(!c.realtime_kills);
        assert!(DaemonConfig::default().realtime_kills);
        assert_eq!(c.drain_timeout, Duration::from_secs(60));
        assert_eq!(c.max_line_bytes, 64 * 1024);
        assert_eq!(c.max_output_cap, 256 * 1024);
        assert_eq!(c.max_client_bytes, 8 * 1024 * 1024);
        assert_eq!(
            DaemonConfig::parse("socket_mode = \"0640\"")
                .unwrap()
                .socket_mode,
            0o640
        );
    }

    #[test]
    fn rejects_bad_values() {
        let checked = |text| DaemonConfig::parse(text).and_then(|c| c.validate());
        assert!(checked("socket_mode = 600").is_err());
        assert!(checked("max_runing = 3").is_err());
        assert!(checked("timeout = \"soon\"").is_err());
        assert!(checked("timeout = 1e-9").is_err(), "below 1ms");
        assert!(checked("timeout = \"999us\"").is_err(), "below 1ms");
        assert!(checked("timeout = \"1ms\"").is_ok());
        assert!(checked("max_running = 0").is_err());
        assert!(
            checked("output_cap = \"2MiB\"").is_err(),
            "above max_output_cap"
        );
        let tight = "max_output_cap = \"1MiB\"\nmax_client_bytes = \"2MiB\"";
        assert!(checked(tight).is_err(), "cannot hold one check");
        let roomy = "max_output_cap = \"1MiB\"\nmax_client_bytes = \"6MiB\"";
        assert!(checked(roomy).is_ok());
        assert!(DaemonConfig::default().validate().is_ok());
        assert!(
            checked("group = \"nogroup\"").is_err(),
            "group without user"
        );
        assert!(
            checked("allowed_commands = [\"bin/*\"]").is_err(),
            "relative"
        );
        assert!(checked("allowed_commands = [\"/usr/lib/nagios/plugins/*\"]").is_ok());
    }

    #[test]
    fn the_policy_looks_users_up_and_refuses_unknown_ones() {
        let c = DaemonConfig::parse("user = \"root\"\nallowed_users = [\"0\"]").unwrap();
        if rustix::process::geteuid().is_root() {
            let p = c.policy().unwrap();
            assert_eq!(p.run_as.unwrap().uid, 0);
            assert_eq!(p.allowed_users[0].user, "root");
        } else {
            assert!(c.policy().unwrap_err().contains("not root"));
        }
        let c = DaemonConfig::parse("user = \"no-such-user-pidring\"").unwrap();
        assert!(c.policy().unwrap_err().starts_with("user: no user"));
    }

    #[test]
    fn a_check_holds_its_request_twice_and_its_cap_three_times() {
        assert_eq!(check_bytes(1000, 65536), 2000 + 3 * 65536 + RESULT_OVERHEAD);
        assert_eq!(check_bytes(usize::MAX, 1), usize::MAX);
    }

    #[test]
    fn a_bad_file_value_can_be_overridden_before_validation() {
        let mut c = DaemonConfig::parse("max_running = 0").unwrap();
        assert!(c.validate().is_err());
        c.max_running = 8; // --max-running 8
        assert!(c.validate().is_ok());
    }
}
