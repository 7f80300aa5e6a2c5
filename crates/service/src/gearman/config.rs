//! Settings of the gearman worker, with mod_gearman's option names: read
//! from an existing `worker.cfg`, from `--key=value` arguments, or from the
//! daemon's `[gearman]` TOML section (the same keys).

use super::job::Crypt;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// gearmand's port when an address gives none.
pub const DEFAULT_PORT: u16 = 4730;

/// How to serve mod_gearman queues.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GearmanConfig {
    /// gearmand servers to take jobs from (`host:port`; one connection each).
    pub server: Vec<String>,
    /// gearmand servers that get a copy of every result (`dupserver=`).
    pub dupserver: Vec<String>,
    /// Serve the `host` queue (`None`: yes when no queue is chosen at all).
    pub hosts: Option<bool>,
    /// Serve the `service` queue (same default).
    pub services: Option<bool>,
    /// Serve the `eventhandler` queue (same default).
    pub eventhandler: Option<bool>,
    /// Serve the `notification` queue (same default).
    pub notifications: Option<bool>,
    /// Serve `hostgroup_NAME` for each name.
    pub hostgroups: Vec<String>,
    /// Serve `servicegroup_NAME` for each name.
    pub servicegroups: Vec<String>,
    /// Jobs and results are AES-256 encrypted (default yes, as in mod_gearman).
    pub encryption: bool,
    /// The shared secret.
    pub key: Option<String>,
    /// A file whose first line is the secret.
    pub keyfile: Option<PathBuf>,
    /// This worker's name in results (`source=`) and timeout texts (default: the host name).
    pub identifier: String,
    /// Timeout in seconds of a job that carries none.
    pub job_timeout: u64,
    /// A job queued longer ago than this many seconds is not run (0: off).
    #[serde(rename = "max-age", alias = "max_age")]
    pub max_age: u64,
    /// The return code of a timed-out check (default 3, UNKNOWN).
    pub timeout_return: i32,
    /// Stop taking jobs while the 1/5/15-minute load is above these (0: off).
    pub load_limit1: f64,
    /// See `load_limit1`.
    pub load_limit5: f64,
    /// See `load_limit1`.
    pub load_limit15: f64,
    /// Only run programs under these directories (empty: any).
    pub restrict_path: Vec<String>,
    /// Append standard error to the output of a check that did not exit 0.
    pub show_error_output: bool,
    /// Results sent to a dupserver say `type=passive`.
    pub dup_results_are_passive: bool,
    /// Results waiting for a dupserver at most; older ones are dropped.
    pub dupserver_backlog_queue_size: usize,
    /// `off`, `on` (prefix) or `pre_perfdata`: name the worker in every output.
    pub worker_name_in_result: String,
    /// Most jobs in flight over all servers (`max-worker=`; `None`: the executor's max_running).
    #[serde(rename = "max-worker", alias = "max_worker", alias = "max_jobs")]
    pub max_jobs: Option<usize>,
    /// `gearman-worker` serves Prometheus metrics here (`host:port`; the
    /// daemon uses its own `metrics` address instead).
    pub prometheus_server: Option<String>,
    /// Run every job as this user (`gearman-worker --user`; not a
    /// mod_gearman key: looked up once, before the worker starts).
    #[serde(skip)]
    pub run_as: Option<std::sync::Arc<pidring::policy::RunAs>>,
}

impl Default for GearmanConfig {
    fn default() -> Self {
        GearmanConfig {
            server: Vec::new(),
            dupserver: Vec::new(),
            hosts: None,
            services: None,
            eventhandler: None,
            notifications: None,
            hostgroups: Vec::new(),
            servicegroups: Vec::new(),
            encryption: true,
            key: None,
            keyfile: None,
            identifier: default_identifier(),
            job_timeout: 60,
            max_age: 0,
            timeout_return: 3,
            load_limit1: 0.0,
            load_limit5: 0.0,
            load_limit15: 0.0,
            restrict_path: Vec::new(),
            show_error_output: true,
            dup_results_are_passive: true,
            dupserver_backlog_queue_size: 1000,
            worker_name_in_result: "off".into(),
            max_jobs: None,
            prometheus_server: None,
            run_as: None,
        }
    }
}

/// The host name, as mod_gearman's default identifier.
fn default_identifier() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// worker.cfg options that mean nothing to pidring (process pools, embedded
/// Perl, logging, ...): accepted so an existing file reads, and named once in the log.
const IGNORED: &[&str] = &[
    "debug",
    "logfile",
    "logmode",
    "pidfile",
    "daemon",
    "min-worker",
    "idle-timeout",
    "spawn-rate",
    "sink-rate",
    "load_cpu_multi",
    "mem_limit",
    "backgrounding-threshold",
    "num-result-worker",
    "fork_on_exec",
    "enable_embedded_perl",
    "use_embedded_perl_implicitly",
    "use_perl_cache",
    "p1_file",
    "workaround_rc_25",
    "gearman_connection_timeout",
    "internal_negate",
    "internal_check_dummy",
    "internal_check_nsc_web",
    "internal_check_prometheus",
    "max-jobs",
    "retries",
    "retry-interval",
    "debug-profiler",
    "cpuprofile",
    "memprofile",
];

/// What [`GearmanConfig::apply`] did with an option.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// The option is set.
    Set,
    /// A mod_gearman option pidring has no use for.
    Ignored,
}

impl GearmanConfig {
    /// Set one mod_gearman option (`worker.cfg` line or `--key=value`).
    /// `config=` reads another file (or a directory's *.cfg and *.conf).
    pub fn apply(&mut self, key: &str, value: &str) -> Result<Applied, String> {
        let key = key.trim().to_ascii_lowercase();
        let value = value.trim();
        let list = |v: &str| -> Vec<String> {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let yes = |v: &str| -> Result<bool, String> {
            match v.to_ascii_lowercase().as_str() {
                "yes" | "on" | "1" | "true" => Ok(true),
                "no" | "off" | "0" | "false" | "" => Ok(false),
                _ => Err(format!("{key}={v}: expected yes or no")),
            }
        };
        let number = |v: &str| -> Result<u64, String> {
            v.parse::<u64>()
                .or_else(|_| v.parse::<f64>().map(|f| f.max(0.0) as u64))
                .map_err(|_| format!("{key}={v}: expected a number of seconds"))
        };
        let float = |v: &str| -> Result<f64, String> {
            v.parse::<f64>()
                .map_err(|_| format!("{key}={v}: expected a number"))
        };
        match key.as_str() {
            "server" => self.server.extend(list(value)),
            "dupserver" => self.dupserver.extend(list(value)),
            "hosts" => self.hosts = Some(yes(value)?),
            "services" => self.services = Some(yes(value)?),
            "eventhandler" | "eventhandlers" => self.eventhandler = Some(yes(value)?),
            "notifications" | "notification" => self.notifications = Some(yes(value)?),
            "hostgroups" | "hostgroup" => self.hostgroups.extend(list(value)),
            "servicegroups" | "servicegroup" => self.servicegroups.extend(list(value)),
            "encryption" => self.encryption = yes(value)?,
            "key" => self.key = Some(value.to_string()),
            "keyfile" => self.keyfile = Some(PathBuf::from(value)),
            "identifier" => self.identifier = value.to_string(),
            "job_timeout" => self.job_timeout = number(value)?,
            "max-age" | "max_age" => self.max_age = number(value)?,
            "timeout_return" => {
                self.timeout_return = value
                    .parse()
                    .map_err(|_| format!("timeout_return={value}: expected 0, 1, 2 or 3"))?
            }
            "load_limit1" => self.load_limit1 = float(value)?,
            "load_limit5" => self.load_limit5 = float(value)?,
            "load_limit15" => self.load_limit15 = float(value)?,
            "restrict_path" => self.restrict_path.extend(list(value)),
            "show_error_output" => self.show_error_output = yes(value)?,
            "dup_results_are_passive" => self.dup_results_are_passive = yes(value)?,
            "dupserver_backlog_queue_size" => {
                self.dupserver_backlog_queue_size = number(value)? as usize
            }
            "worker_name_in_result" => self.worker_name_in_result = value.to_string(),
            "max-worker" | "max_worker" => self.max_jobs = Some(number(value)? as usize),
            "prometheus_server" => {
                self.prometheus_server = Some(value.to_string()).filter(|v| !v.is_empty())
            }
            "config" => self.read_path(Path::new(value))?,
            k if IGNORED.contains(&k) => return Ok(Applied::Ignored),
            _ => return Err(format!("unknown option {key:?}")),
        }
        Ok(Applied::Set)
    }

    /// Read a worker.cfg (or every *.cfg/*.conf file of a directory).
    pub fn read_path(&mut self, path: &Path) -> Result<(), String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cfg" || x == "conf"))
                .collect();
            files.sort();
            for f in files {
                self.read_path(&f)?;
            }
            return Ok(());
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        self.read_text(&text)
            .map_err(|e| format!("{}:{e}", path.display()))
    }

    /// Read worker.cfg lines; an error names its line number.
    pub fn read_text(&mut self, text: &str) -> Result<(), String> {
        let mut ignored = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("{}: expected key=value, got {line:?}", n + 1))?;
            if self.apply(k, v).map_err(|e| format!("{}: {e}", n + 1))? == Applied::Ignored {
                ignored.push(k.trim().to_string());
            }
        }
        if !ignored.is_empty() {
            tracing::info!(options = ?ignored, "mod_gearman options pidring has no use for were ignored");
        }
        Ok(())
    }

    /// Options in mod_gearman's command-line form: `--key=value`, `--key value`,
    /// `key=value`, and bare `--flag` meaning yes.
    pub fn apply_args(&mut self, args: &[String]) -> Result<(), String> {
        let mut it = args.iter().peekable();
        while let Some(arg) = it.next() {
            let a = arg.trim_start_matches('-');
            let (k, v) = match a.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None if arg.starts_with("--") => match it.peek() {
                    Some(next) if !next.starts_with("--") => {
                        (a.to_string(), it.next().unwrap().clone())
                    }
                    _ => (a.to_string(), "yes".to_string()),
                },
                None => return Err(format!("{arg:?}: expected --key=value")),
            };
            self.apply(&k, &v).map_err(|e| format!("{arg}: {e}"))?;
        }
        Ok(())
    }

    /// The queues to register for, in mod_gearman's names.
    pub fn queues(&self) -> Vec<String> {
        let chosen = [
            self.hosts,
            self.services,
            self.eventhandler,
            self.notifications,
        ];
        let none_chosen = chosen.iter().all(Option::is_none)
            && self.hostgroups.is_empty()
            && self.servicegroups.is_empty();
        let on = |o: Option<bool>| o.unwrap_or(none_chosen);
        let mut q = Vec::new();
        for (name, o) in [
            ("host", self.hosts),
            ("service", self.services),
            ("eventhandler", self.eventhandler),
            ("notification", self.notifications),
        ] {
            if on(o) {
                q.push(name.to_string());
            }
        }
        q.extend(self.hostgroups.iter().map(|g| format!("hostgroup_{g}")));
        q.extend(
            self.servicegroups
                .iter()
                .map(|g| format!("servicegroup_{g}")),
        );
        q.sort();
        q.dedup();
        q
    }

    /// The servers, each as `host:port` (gearmand's port when none is given).
    pub fn server_addrs(&self) -> Vec<String> {
        normalize_addrs(&self.server)
    }

    /// The dupservers, the same way.
    pub fn dupserver_addrs(&self) -> Vec<String> {
        normalize_addrs(&self.dupserver)
    }

    /// The sealing the config asks for: reads `keyfile` if `key` is not given.
    pub fn crypt(&self) -> Result<Crypt, String> {
        if !self.encryption {
            return Ok(Crypt::plain());
        }
        if let Some(k) = self.key.as_deref().filter(|k| !k.is_empty()) {
            return Ok(Crypt::with_secret(k.as_bytes()));
        }
        let Some(path) = &self.keyfile else {
            return Err("encryption=yes needs key= or keyfile= (or set encryption=no)".into());
        };
        let data = std::fs::read(path).map_err(|e| format!("keyfile {}: {e}", path.display()))?;
        // mod_gearman reads the first 32 bytes of the first line, right-trimmed.
        let line = data.split(|&b| b == b'\n').next().unwrap_or(&[]);
        let line = line.trim_ascii_end();
        if line.is_empty() {
            return Err(format!(
                "keyfile {}: the first line is empty",
                path.display()
            ));
        }
        Ok(Crypt::with_secret(line))
    }

    /// Check the settings; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.server.is_empty() {
            return Err("no gearmand server: give server=host:port".into());
        }
        for a in self.server_addrs().iter().chain(&self.dupserver_addrs()) {
            let (_, port) = a
                .rsplit_once(':')
                .ok_or_else(|| format!("server {a:?}: expected host:port"))?;
            port.parse::<u16>()
                .map_err(|_| format!("server {a:?}: {port:?} is not a port"))?;
        }
        if self.queues().is_empty() {
            return Err("no queue to serve: every one of hosts, services, eventhandler, notifications is no and no hostgroups/servicegroups are given".into());
        }
        if !(0..=3).contains(&self.timeout_return) {
            return Err(format!(
                "timeout_return={}: must be 0, 1, 2 or 3",
                self.timeout_return
            ));
        }
        if !matches!(
            self.worker_name_in_result.as_str(),
            "off" | "on" | "pre_perfdata" | ""
        ) {
            return Err(format!(
                "worker_name_in_result={}: must be off, on or pre_perfdata",
                self.worker_name_in_result
            ));
        }
        if self.max_jobs == Some(0) {
            return Err("max-worker must be at least 1".into());
        }
        for p in &self.restrict_path {
            if !p.starts_with('/') {
                return Err(format!("restrict_path={p}: must be an absolute directory"));
            }
        }
        if let Some(p) = &self.prometheus_server {
            p.parse::<std::net::SocketAddr>().map_err(|_| {
                format!("prometheus_server={p}: expected an address such as 127.0.0.1:9050")
            })?;
        }
        self.crypt().map(|_| ())
    }
}

fn normalize_addrs(list: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in list {
        let s = s.trim();
        let a = match s.rsplit_once(':') {
            // "[::1]:4730", "host:4730"
            Some((h, p)) if !h.is_empty() && !p.is_empty() && !h.ends_with(':') => s.to_string(),
            // ":4730": every interface, as mod_gearman reads it; here the loopback.
            Some(("", p)) => format!("127.0.0.1:{p}"),
            _ => format!("{s}:{DEFAULT_PORT}"),
        };
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_go_workers_sample_worker_cfg() {
        let text = "# comment\ndebug=0\nlogfile=/var/log/gearman/worker.log\nserver=localhost:4730\n\
                    eventhandler=yes\nnotifications=yes\nservices=yes\nhosts=yes\nencryption=yes\n\
                    key=should_be_changed\njob_timeout=60\nmin-worker=5\nmax-worker=50\n\
                    idle-timeout=30\nspawn-rate=3\nsink-rate=1\nbackgrounding-threshold=30\n\
                    load_cpu_multi=2.5\nmem_limit=70\nshow_error_output=yes\nenable_embedded_perl=on\n\
                    use_embedded_perl_implicitly=off\nuse_perl_cache=on\nhostgroups=web, db\nmax-age=120\n";
        let mut c = GearmanConfig::default();
        c.read_text(text).unwrap();
        assert_eq!(c.server_addrs(), vec!["localhost:4730"]);
        assert_eq!(c.max_jobs, Some(50));
        assert_eq!(c.max_age, 120);
        assert_eq!(
            c.queues(),
            vec![
                "eventhandler",
                "host",
                "hostgroup_db",
                "hostgroup_web",
                "notification",
                "service"
            ]
        );
        c.validate().unwrap();
    }

    #[test]
    fn only_the_chosen_queues_when_any_is_chosen() {
        let mut c = GearmanConfig::default();
        c.apply_args(&[
            "--server".into(),
            "gm1".into(),
            "--servicegroups=a".into(),
            "--encryption=no".into(),
        ])
        .unwrap();
        assert_eq!(c.queues(), vec!["servicegroup_a"]);
        assert_eq!(c.server_addrs(), vec!["gm1:4730"]);
        c.apply("services", "yes").unwrap();
        assert_eq!(c.queues(), vec!["service", "servicegroup_a"]);
        let d = GearmanConfig {
            server: vec!["x".into()],
            encryption: false,
            ..GearmanConfig::default()
        };
        assert_eq!(
            d.queues(),
            vec!["eventhandler", "host", "notification", "service"]
        );
    }

    #[test]
    fn bad_values_name_the_option_and_line() {
        let mut c = GearmanConfig::default();
        let e = c.read_text("server=a\nencryption=maybe\n").unwrap_err();
        assert!(e.starts_with("2: encryption=maybe"), "{e}");
        let e = c.read_text("no_such_thing=1").unwrap_err();
        assert!(e.contains("unknown option"), "{e}");
        let c = GearmanConfig {
            server: vec!["a".into()],
            ..GearmanConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("key= or keyfile="));
    }

    #[test]
    fn a_keyfile_gives_its_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret.key");
        std::fs::write(&p, "topsecret\nsecond line\n").unwrap();
        let c = GearmanConfig {
            keyfile: Some(p),
            ..GearmanConfig::default()
        };
        let sealed = c.crypt().unwrap().seal(b"type=x");
        assert_eq!(Crypt::with_secret(b"topsecret").seal(b"type=x"), sealed);
    }

    #[test]
    fn the_daemon_section_takes_the_same_keys_in_toml() {
        let c: GearmanConfig = toml::from_str(
            "server = [\"127.0.0.1:4730\"]\nencryption = false\nservices = true\n\"max-age\" = 30\nhostgroups = [\"web\"]\n",
        )
        .unwrap();
        assert_eq!(c.max_age, 30);
        assert_eq!(c.queues(), vec!["hostgroup_web", "service"]);
    }
}
