//! `Check`: what to run, and how long to let it run.
//!
//! A check is validated and turned into C strings (`Prepared`) on the
//! submitting thread, so the event loop never allocates for it.

use crate::cmdline::{self, CommandLine};
use crate::error::CheckError;
use crate::nagios_state::State;
use crate::search_path::SearchPath;
use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Default time a check may run before it is sent SIGTERM.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time between SIGTERM and SIGKILL.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);
/// Default bytes kept per output stream (more is counted and dropped).
pub const DEFAULT_OUTPUT_CAP: usize = 64 * 1024;
/// Default time output is still read after the leader was reaped.
pub const DEFAULT_DRAIN: Duration = Duration::from_millis(200);

/// Shortest timeout accepted: results and logs count timeouts in whole
/// milliseconds, and a shorter one kills the check as it starts.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// Longest timeout, grace or drain accepted (a year): longer is surely a
/// mistake, and deadlines must stay far from `Instant` overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Which environment a check starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EnvPolicy {
    /// The executor's own environment (as it was when the executor was built).
    #[default]
    Inherit,
    /// An empty environment: only the variables added with [`Check::env`].
    Clear,
}

/// One monitoring check: a command plus the limits it runs under.
#[derive(Debug, Clone)]
pub struct Check {
    pub(crate) argv: Vec<OsString>,
    pub(crate) env_policy: EnvPolicy,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) cwd: Option<PathBuf>,
    pub(crate) timeout: Duration,
    pub(crate) grace: Duration,
    pub(crate) drain: Duration,
    pub(crate) output_cap: usize,
    pub(crate) kill_group_on_exit: bool,
    pub(crate) timeout_state: State,
    pub(crate) tag: Option<String>,
    pub(crate) caps: crate::cgroup::Caps,
    /// Run as this user (groups, gid, uid set in the child before exec).
    pub(crate) run_as: Option<Arc<crate::run_as::RunAs>>,
    /// Execute this file instead of looking `argv[0]` up (set by an
    /// allowlist to what it matched; `argv[0]` stays as given).
    pub(crate) exec_path: Option<PathBuf>,
}

impl Check {
    /// A check that runs `argv[0]` with the given arguments (no shell).
    pub fn argv<I, S>(argv: I) -> Check
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Check {
            argv: argv.into_iter().map(|s| s.as_ref().to_owned()).collect(),
            env_policy: EnvPolicy::Inherit,
            env: Vec::new(),
            cwd: None,
            timeout: DEFAULT_TIMEOUT,
            grace: DEFAULT_GRACE,
            drain: DEFAULT_DRAIN,
            output_cap: DEFAULT_OUTPUT_CAP,
            kill_group_on_exit: true,
            timeout_state: State::Unknown,
            tag: None,
            caps: Default::default(),
            run_as: None,
            exec_path: None,
        }
    }

    /// A check from a Nagios-style command line: split like Nagios does, and
    /// run through `/bin/sh -c` only when it holds shell metacharacters.
    pub fn command_line(line: &str) -> Result<Check, CheckError> {
        match cmdline::parse(line).map_err(CheckError::CommandLine)? {
            CommandLine::Argv(argv) => Ok(Check::argv(argv)),
            CommandLine::Shell(line) => Ok(Check::argv(["/bin/sh", "-c", line.as_str()])),
        }
    }

    /// Seconds the check may run before SIGTERM (counted from the moment the child exists).
    pub fn timeout(mut self, timeout: Duration) -> Check {
        self.timeout = timeout;
        self
    }

    /// Time between SIGTERM and SIGKILL when the check does not exit.
    pub fn grace(mut self, grace: Duration) -> Check {
        self.grace = grace;
        self
    }

    /// How long output is still read after the leader was reaped (a
    /// descendant may hold the pipe open; past this the output is cut).
    pub fn drain(mut self, drain: Duration) -> Check {
        self.drain = drain;
        self
    }

    /// Bytes kept per output stream; the excess is read, counted and dropped.
    pub fn output_cap(mut self, bytes: usize) -> Check {
        self.output_cap = bytes;
        self
    }

    /// Start from an empty environment instead of the executor's.
    pub fn env_clear(mut self) -> Check {
        self.env_policy = EnvPolicy::Clear;
        self
    }

    /// Choose the environment the check starts from.
    pub fn env_policy(mut self, policy: EnvPolicy) -> Check {
        self.env_policy = policy;
        self
    }

    /// Set one environment variable (added to, or replacing in, the base environment).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Check {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Run the check as this user: its supplementary groups, then its gid,
    /// then its uid are set in the child before exec, with no way back
    /// (needs root; see [`crate::run_as::RunAs::usable`]).
    pub fn run_as(mut self, who: Arc<crate::run_as::RunAs>) -> Check {
        self.run_as = Some(who);
        self
    }

    /// Working directory of the check (default: the executor's).
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Check {
        self.cwd = Some(dir.into());
        self
    }

    /// Whether the check's process group is SIGKILLed after a normal exit too
    /// (default true: a check's descendants end with it). After a timeout the
    /// group is always swept.
    pub fn kill_group_on_exit(mut self, yes: bool) -> Check {
        self.kill_group_on_exit = yes;
        self
    }

    /// The state reported when the check times out (default `Unknown`).
    pub fn timeout_state(mut self, state: State) -> Check {
        self.timeout_state = state;
        self
    }

    /// Most memory the check's processes may use together (`memory.max`
    /// of its cgroup leaf; past it the kernel reclaims, then OOM-kills in
    /// the leaf, counted in the result). Needs containment with the memory
    /// controller: else `submit` refuses the check.
    pub fn memory_max(mut self, bytes: u64) -> Check {
        self.caps.memory_max = Some(bytes);
        self
    }

    /// Most processes (and threads) the check may have at once
    /// (`pids.max`; a fork past it fails with EAGAIN). Needs the pids controller.
    pub fn pids_max(mut self, n: u64) -> Check {
        self.caps.pids_max = Some(n);
        self
    }

    /// CPU time the check's processes may use together: `quota` per
    /// `period` (`cpu.max`; 50 ms per 100 ms is half a CPU). Needs the cpu controller.
    pub fn cpu_max(mut self, quota: Duration, period: Duration) -> Check {
        self.caps.cpu_max = Some((quota.as_micros() as u64, period.as_micros() as u64));
        self
    }

    /// An opaque label echoed back in the result.
    pub fn tag(mut self, tag: impl Into<String>) -> Check {
        self.tag = Some(tag.into());
        self
    }

    /// The argument vector that will be executed.
    pub fn args(&self) -> &[OsString] {
        &self.argv
    }

    /// The caps set on this check.
    pub fn get_caps(&self) -> &crate::cgroup::Caps {
        &self.caps
    }

    /// The timeout set on this check.
    /// The variables this check adds to (or sets in) its environment.
    pub fn get_env(&self) -> &[(OsString, OsString)] {
        &self.env
    }

    /// The output cap per stream, in bytes.
    pub fn get_output_cap(&self) -> usize {
        self.output_cap
    }

    pub fn get_timeout(&self) -> Duration {
        self.timeout
    }

    /// `prepare_with` from a plain list of variables (tests).
    #[cfg(test)]
    pub(crate) fn prepare(
        &self,
        inherited: &[(OsString, OsString)],
    ) -> Result<Prepared, CheckError> {
        self.prepare_with(&InheritedEnv::new(inherited.to_vec()))
    }

    /// Check the request and turn it into C strings ready for `execve`.
    /// A check that inherits the executor's environment unchanged shares its
    /// one converted copy (no per-check strings).
    pub(crate) fn prepare_with(&self, inherited: &InheritedEnv) -> Result<Prepared, CheckError> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(CheckError::EmptyArgv);
        }
        if let Some((quota, period)) = self.caps.cpu_max
            && (!(1000..=1_000_000).contains(&period) || quota < 1000)
        {
            return Err(CheckError::Cap(format!(
                "cpu_max {quota}us per {period}us is out of range: the period must be 1ms to 1s, the quota at least 1ms"
            )));
        }
        if self.timeout < MIN_TIMEOUT {
            return Err(CheckError::TimeoutTooShort);
        }
        for (what, d) in [
            ("timeout", self.timeout),
            ("grace", self.grace),
            ("drain", self.drain),
        ] {
            if d > MAX_DURATION {
                return Err(CheckError::TooLong(what));
            }
        }
        let argv = self
            .argv
            .iter()
            .map(|a| cstring(a.as_bytes(), "argument"))
            .collect::<Result<Vec<_>, _>>()?;

        let exec = self
            .exec_path
            .as_ref()
            .map(|p| cstring(p.as_os_str().as_bytes(), "program path"))
            .transpose()?;
        let run_as = self.run_as.clone().filter(|r| r.changes_identity());
        let cwd = || match &self.cwd {
            Some(dir) => cstring(dir.as_os_str().as_bytes(), "working directory").map(Some),
            None => Ok(None),
        };
        if self.env_policy == EnvPolicy::Inherit && self.env.is_empty() {
            return Ok(Prepared {
                argv,
                envp: inherited.envp.clone(),
                cwd: cwd()?,
                path: inherited.path.clone(),
                exec,
                run_as,
            });
        }

        // Later entries win, as with `env(1)`: base first, then additions.
        let mut vars: Vec<(&OsStr, &OsStr)> = match self.env_policy {
            EnvPolicy::Inherit => inherited
                .vars
                .iter()
                .map(|(k, v)| (k.as_os_str(), v.as_os_str()))
                .collect(),
            EnvPolicy::Clear => Vec::new(),
        };
        for (k, v) in &self.env {
            if k.is_empty() || k.as_bytes().contains(&b'=') {
                return Err(CheckError::BadEnvName(k.to_string_lossy().into_owned()));
            }
            vars.retain(|(ek, _)| *ek != k.as_os_str());
            vars.push((k, v));
        }
        // Split again only if this check's PATH is not the inherited one
        // (a Nagios job sets its macros in `env`, rarely PATH).
        let own_path = self.env.iter().any(|(k, _)| k.as_bytes() == b"PATH");
        let path = if self.env_policy == EnvPolicy::Inherit && !own_path {
            inherited.path.clone()
        } else {
            path_of(vars.iter().copied())
        };
        let envp = vars
            .iter()
            .map(|(k, v)| cstring(&env_entry(k, v), "environment variable"))
            .collect::<Result<Arc<[CString]>, _>>()?;
        Ok(Prepared {
            argv,
            envp,
            cwd: cwd()?,
            path,
            exec,
            run_as,
        })
    }
}

/// `KEY=value`, as `envp` holds it.
fn env_entry(k: &OsStr, v: &OsStr) -> Vec<u8> {
    let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
    kv.extend_from_slice(k.as_bytes());
    kv.push(b'=');
    kv.extend_from_slice(v.as_bytes());
    kv
}

/// The PATH among `vars` (or the default), split for resolving bare
/// program names: here, on the submitting thread, not on the loop.
fn path_of<'a>(mut vars: impl Iterator<Item = (&'a OsStr, &'a OsStr)>) -> Arc<SearchPath> {
    match vars.find(|(k, _)| k.as_bytes() == b"PATH") {
        Some((_, v)) => Arc::new(SearchPath::new(v.as_bytes())),
        None => SearchPath::default_path(),
    }
}

fn cstring(bytes: &[u8], what: &'static str) -> Result<CString, CheckError> {
    CString::new(bytes).map_err(|_| CheckError::NulByte(what))
}

/// What the loop keeps of a check besides its `Prepared` form: the limits
/// it runs under and its tag (the command itself is in `Prepared`).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub timeout: Duration,
    pub grace: Duration,
    pub drain: Duration,
    pub output_cap: usize,
    pub kill_group_on_exit: bool,
    pub timeout_state: State,
    pub tag: Option<String>,
    pub caps: crate::cgroup::Caps,
}

impl Check {
    /// Its limits and tag, dropping the command (prepared by then).
    pub(crate) fn into_limits(self) -> Limits {
        Limits {
            timeout: self.timeout,
            grace: self.grace,
            drain: self.drain,
            output_cap: self.output_cap,
            kill_group_on_exit: self.kill_group_on_exit,
            timeout_state: self.timeout_state,
            tag: self.tag,
            caps: self.caps,
        }
    }
}

/// A validated check in the form `execve` takes.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// Arguments; `argv[0]` is also the program (resolved through PATH if it has no `/`).
    pub argv: Vec<CString>,
    /// `KEY=value` strings (shared with the executor's when inherited unchanged).
    pub envp: Arc<[CString]>,
    /// Working directory, if not the executor's.
    pub cwd: Option<CString>,
    /// The check's PATH (or the default), for resolving a bare program name.
    pub path: Arc<SearchPath>,
    /// The file to execute, if not `argv[0]` looked up in `path`.
    pub exec: Option<CString>,
    /// Who to become before exec (None: stay as the executor).
    pub run_as: Option<Arc<crate::run_as::RunAs>>,
}

impl Prepared {
    /// The program name as given (for messages).
    pub fn program(&self) -> String {
        String::from_utf8_lossy(self.argv[0].as_bytes()).into_owned()
    }
}

/// The executor's environment, converted once for `execve`.
#[derive(Debug)]
pub(crate) struct InheritedEnv {
    /// The variables, for checks that add to or override them.
    vars: Vec<(OsString, OsString)>,
    /// `KEY=value` strings, shared by every check that inherits them unchanged.
    envp: Arc<[CString]>,
    /// Its PATH (or the default), split once.
    path: Arc<SearchPath>,
}

impl InheritedEnv {
    /// Convert `vars` once (a variable with a NUL byte, which no real
    /// environment has, is left out).
    pub fn new(vars: Vec<(OsString, OsString)>) -> InheritedEnv {
        let envp = vars
            .iter()
            .filter_map(|(k, v)| CString::new(env_entry(k, v)).ok())
            .collect();
        let path = path_of(vars.iter().map(|(k, v)| (k.as_os_str(), v.as_os_str())));
        InheritedEnv { vars, envp, path }
    }
}

/// Snapshot of this process's environment, for `EnvPolicy::Inherit`.
pub(crate) fn inherited_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .map(|(k, v)| (OsString::from_vec(k.into_vec()), v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_argv_is_rejected() {
        let empty: [&str; 0] = [];
        assert!(matches!(
            Check::argv(empty).prepare(&[]),
            Err(CheckError::EmptyArgv)
        ));
        assert!(matches!(
            Check::argv([""]).prepare(&[]),
            Err(CheckError::EmptyArgv)
        ));
    }

    #[test]
    fn timeouts_below_a_millisecond_are_rejected() {
        // 1 ns used to be accepted and reported as "timed out after 0ms".
        for short in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_micros(999),
        ] {
            let c = Check::argv(["x"]).timeout(short);
            let e = c.prepare(&[]).unwrap_err();
            assert!(matches!(e, CheckError::TimeoutTooShort), "{short:?}");
            assert_eq!(e.to_string(), "timeout must be at least 1ms");
        }
        assert!(Check::argv(["x"]).timeout(MIN_TIMEOUT).prepare(&[]).is_ok());
    }

    #[test]
    fn absurd_durations_are_rejected() {
        let c = Check::argv(["x"]).timeout(Duration::from_secs(u64::MAX));
        assert!(matches!(
            c.prepare(&[]),
            Err(CheckError::TooLong("timeout"))
        ));
        let c = Check::argv(["x"]).grace(Duration::MAX);
        assert!(matches!(c.prepare(&[]), Err(CheckError::TooLong("grace"))));
    }

    #[test]
    fn nul_bytes_are_rejected() {
        assert!(matches!(
            Check::argv(["/bin/echo", "a\0b"]).prepare(&[]),
            Err(CheckError::NulByte("argument"))
        ));
    }

    #[test]
    fn env_additions_override_inherited() {
        let inherited = vec![
            (OsString::from("PATH"), OsString::from("/bin")),
            (OsString::from("A"), OsString::from("1")),
        ];
        let p = Check::argv(["x"])
            .env("A", "2")
            .env("B", "3")
            .prepare(&inherited)
            .unwrap();
        let envp: Vec<_> = p.envp.iter().map(|c| c.to_str().unwrap()).collect();
        assert_eq!(envp, ["PATH=/bin", "A=2", "B=3"]);
        assert_eq!(p.path.value(), b"/bin");

        let p = Check::argv(["x"])
            .env_clear()
            .env("B", "3")
            .prepare(&inherited)
            .unwrap();
        assert_eq!(p.envp.len(), 1);
        assert_eq!(p.path.value(), crate::search_path::DEFAULT_PATH);
        // The inherited PATH, split once, is shared by a check that sets
        // other variables; one that sets PATH gets its own.
        let env = InheritedEnv::new(inherited.clone());
        let p = Check::argv(["x"]).env("A", "2").prepare_with(&env).unwrap();
        assert!(Arc::ptr_eq(&p.path, &env.path));
        let p = Check::argv(["x"])
            .env("PATH", "/usr/bin")
            .prepare_with(&env)
            .unwrap();
        assert_eq!(p.path.value(), b"/usr/bin");
        assert!(matches!(
            Check::argv(["x"]).env("A=B", "1").prepare(&inherited),
            Err(CheckError::BadEnvName(_))
        ));
    }

    #[test]
    fn command_line_uses_shell_only_for_metacharacters() {
        let c = Check::command_line("/bin/echo 'a b' c").unwrap();
        assert_eq!(c.args(), ["/bin/echo", "a b", "c"]);
        let c = Check::command_line("/bin/echo a > /dev/null").unwrap();
        assert_eq!(c.args()[..2], ["/bin/sh", "-c"]);
    }
}
