//! From a mod_gearman job to a pidring [`Check`], and from its
//! [`CheckResult`] to the answer the core reads — with mod-gearman-worker-go's
//! texts for timeouts, missing plugins and out-of-range codes.

use super::config::GearmanConfig;
use super::job::{Answer, Job};
use pidring::cmdline::{self, CommandLine};
use pidring::result::{CheckResult, Outcome, signal_name};
use pidring::{Check, State};
#[cfg(test)]
use std::path::Path;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Time between SIGTERM and SIGKILL for a job past its timeout.
pub const KILL_GRACE: Duration = Duration::from_secs(1);

/// A job that is not run, and the answer it gets instead.
#[derive(Debug, Clone, PartialEq)]
pub enum NotRun {
    /// Queued longer ago than `max-age`.
    TooOld {
        /// Seconds since the core queued it.
        age: f64,
    },
    /// The command is not allowed by `restrict_path`, or cannot be parsed.
    Refused(String),
}

/// Seconds since the epoch, as mod_gearman writes times.
pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Build the check for a job, or say why it must not run.
pub fn job_check(job: &Job, cfg: &GearmanConfig, now: f64) -> Result<Check, NotRun> {
    if cfg.max_age > 0 && job.core_time > 0.0 && now - job.core_time > cfg.max_age as f64 {
        return Err(NotRun::TooOld {
            age: now - job.core_time,
        });
    }
    let line = job.command_line.trim();
    if line.is_empty() {
        return Err(NotRun::Refused("the job has no command_line".into()));
    }
    let check = if cfg.restrict_path.is_empty() {
        Check::command_line(line)
            .map_err(|e| NotRun::Refused(format!("cannot run {line:?}: {e}")))?
    } else {
        restricted(line, &cfg.restrict_path)?
    };
    let secs = if job.timeout > 0 {
        job.timeout
    } else if cfg.job_timeout > 0 {
        cfg.job_timeout
    } else {
        60
    };
    let check = match &cfg.run_as {
        Some(who) => check.run_as(who.clone()),
        None => check,
    };
    Ok(check
        .timeout(Duration::from_secs(secs))
        .grace(KILL_GRACE)
        .timeout_state(State::from_exit_code(cfg.timeout_return).unwrap_or(State::Unknown))
        .tag(job.kind.clone()))
}

/// `restrict_path`: the program, resolved through PATH, symlinks and `..`,
/// must lie under one of the directories; the check then runs that
/// resolved path, so what was checked is what runs. A line that needs a
/// shell could run anything and is refused.
fn restricted(line: &str, dirs: &[String]) -> Result<Check, NotRun> {
    let mut argv = match cmdline::parse(line) {
        Ok(CommandLine::Argv(argv)) => argv,
        Ok(CommandLine::Shell(_)) => {
            return Err(NotRun::Refused(
                "command contains bad path: a command line that needs a shell (;, |, $, quotes, redirections) cannot be checked against restrict_path".into(),
            ));
        }
        Err(e) => return Err(NotRun::Refused(format!("cannot run {line:?}: {e}"))),
    };
    let program = PathBuf::from(&argv[0]);
    let path = std::env::var_os("PATH");
    let resolved = pidring::policy::resolve(program.as_os_str(), path.as_deref(), None)
        .ok_or_else(|| {
            NotRun::Refused(format!(
                "command contains bad path: {} was not found",
                program.display()
            ))
        })?;
    let allowed = pidring::policy::Allowlist::directories(dirs).is_ok_and(|a| a.permits(&resolved));
    if !allowed {
        return Err(NotRun::Refused(format!(
            "command contains bad path: {} (resolved {}) is not under restrict_path {}",
            program.display(),
            resolved.display(),
            dirs.join(",")
        )));
    }
    let mut argv: Vec<std::ffi::OsString> = argv.drain(..).map(Into::into).collect();
    argv[0] = resolved.into_os_string();
    Ok(Check::argv(argv))
}

/// Everything but the verdict: who, when, which source.
fn base(job: &Job, cfg: &GearmanConfig, start: f64, finish: f64) -> Answer {
    Answer {
        kind: "active",
        host_name: job.host_name.clone(),
        service_description: job.service_description.clone(),
        core_start_time: job.core_time_text.clone(),
        start_time: start,
        finish_time: finish,
        return_code: 3,
        source: format!("Mod-Gearman Worker @ {}", cfg.identifier),
        output: String::new(),
    }
}

/// The answer to a job that was not run.
pub fn not_run_answer(job: &Job, cfg: &GearmanConfig, why: &NotRun) -> Answer {
    let now = now_secs();
    let mut a = base(job, cfg, now, now);
    a.output = match why {
        NotRun::TooOld { .. } => {
            format!("Could not start check in time (worker: {})", cfg.identifier)
        }
        NotRun::Refused(msg) => format!("UNKNOWN: {msg} (worker: {})", cfg.identifier),
    };
    a
}

/// The answer to a job whose data could not be read, when it still names a result queue.
pub fn bad_job_answer(job: &Job, cfg: &GearmanConfig, why: &str) -> Answer {
    not_run_answer(job, cfg, &NotRun::Refused(why.to_string()))
}

fn secs(unix_us: u64) -> f64 {
    unix_us as f64 / 1e6
}

/// The answer to a job that ran (or was killed).
pub fn result_answer(job: &Job, cfg: &GearmanConfig, r: &CheckResult) -> Answer {
    let start = if r.timings.started_unix_us > 0 {
        secs(r.timings.started_unix_us)
    } else {
        secs(r.timings.submitted_unix_us)
    };
    let finish = if r.timings.exited_unix_us > 0 {
        secs(r.timings.exited_unix_us)
    } else {
        now_secs().max(start)
    };
    let mut a = base(job, cfg, start, finish);
    let id = &cfg.identifier;
    let stdout = trim_output(&r.stdout.data);
    let stderr = trim_output(&r.stderr.data);
    match &r.outcome {
        Outcome::Exited { code } => {
            let mut out = stdout;
            if cfg.show_error_output && *code != 0 && !stderr.is_empty() {
                out = format!("{out}\n[{stderr}]");
            }
            let (rc, text) = match *code {
                0..=3 => (*code, name_worker(cfg, out)),
                126 => (
                    3,
                    format!(
                        "UNKNOWN: Return code of 126 is out of bounds. Make sure the plugin you're trying to run is executable. (worker: {id})\n{out}"
                    ),
                ),
                127 => (
                    3,
                    format!(
                        "UNKNOWN: Return code of 127 is out of bounds. Make sure the plugin you're trying to run actually exists. (worker: {id})\n{out}"
                    ),
                ),
                c => (
                    3,
                    format!("CRITICAL: Return code of {c} is out of bounds. (worker: {id})\n{out}"),
                ),
            };
            a.return_code = rc;
            a.output = text;
        }
        Outcome::Signaled { signal, .. } => {
            a.return_code = 3;
            let out = join_stderr(cfg, stdout, &stderr);
            a.output = format!(
                "UNKNOWN: Return code of {signal} is out of bounds. Plugin exited by signal: {}. (worker: {id})\n{out}",
                signal_name(*signal)
            );
        }
        Outcome::TimedOut { .. } => {
            a.return_code = cfg.timeout_return;
            let head = match job.kind.as_str() {
                "service" => format!("(Service Check Timed Out On Worker: {id})"),
                "host" => format!("(Host Check Timed Out On Worker: {id})"),
                _ => format!("(Check Timed Out On Worker: {id})"),
            };
            a.output = if stdout.is_empty() {
                head
            } else {
                format!("{head}\n{stdout}")
            };
        }
        Outcome::Cancelled | Outcome::Shutdown => {
            a.return_code = 3;
            a.output = format!(
                "UNKNOWN: check killed: the pidring worker is shutting down (worker: {id})"
            );
        }
        Outcome::SpawnFailed { errno, message } => {
            a.return_code = 3;
            a.output = match errno {
                Some(e) if *e == libc::ENOENT => format!(
                    "UNKNOWN: Return code of 127 is out of bounds. Make sure the plugin you're trying to run actually exists. (worker: {id})\n{message}"
                ),
                Some(e) if *e == libc::EACCES => format!(
                    "UNKNOWN: Return code of 126 is out of bounds. Make sure the plugin you're trying to run is executable. (worker: {id})\n{message}"
                ),
                _ => format!("UNKNOWN: {message} (worker: {id})"),
            };
        }
    }
    a
}

fn join_stderr(cfg: &GearmanConfig, out: String, stderr: &str) -> String {
    if cfg.show_error_output && !stderr.is_empty() {
        format!("{out}\n[{stderr}]")
    } else {
        out
    }
}

/// `worker_name_in_result`: `on` prefixes the output, `pre_perfdata` puts the name before the perfdata.
fn name_worker(cfg: &GearmanConfig, out: String) -> String {
    let id = &cfg.identifier;
    match cfg.worker_name_in_result.as_str() {
        "on" => format!("(worker: {id}) {out}"),
        "pre_perfdata" => match out.split_once('|') {
            Some((text, perf)) => format!("{text} (worker: {id}) |{perf}"),
            None => format!("{out} (worker: {id})"),
        },
        _ => out,
    }
}

/// A stream as text, without NULs and surrounding blanks (as the Go worker trims it).
fn trim_output(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    text.trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::check_result;
    use pidring::result::{Output, Timings};

    fn cfg() -> GearmanConfig {
        GearmanConfig {
            identifier: "w1".into(),
            encryption: false,
            server: vec!["x".into()],
            ..GearmanConfig::default()
        }
    }

    fn job(kind: &str) -> Job {
        Job {
            kind: kind.into(),
            result_queue: "check_results".into(),
            host_name: "h".into(),
            service_description: if kind == "service" {
                "s".into()
            } else {
                String::new()
            },
            core_time: 100.0,
            core_time_text: "100.000000".into(),
            timeout: 5,
            command_line: "/bin/true".into(),
            ..Job::default()
        }
    }

    fn result(outcome: Outcome, stdout: &str, stderr: &str) -> CheckResult {
        CheckResult {
            stderr: Output {
                data: stderr.as_bytes().to_vec(),
                ..Default::default()
            },
            timings: Timings {
                started_unix_us: 1_000_500_000,
                exited_unix_us: 1_001_000_000,
                ..Default::default()
            },
            ..check_result(outcome, stdout.as_bytes())
        }
    }

    #[test]
    fn a_warning_keeps_its_code_and_perfdata() {
        let r = result(
            Outcome::Exited { code: 1 },
            "WARN - x|a=1\nlong|b=2\n",
            "oops",
        );
        let a = result_answer(&job("service"), &cfg(), &r);
        assert_eq!(a.return_code, 1);
        assert_eq!(a.output, "WARN - x|a=1\nlong|b=2\n[oops]");
        assert_eq!(a.start_time, 1000.5);
        assert_eq!(a.finish_time, 1001.0);
        assert_eq!(a.core_start_time, "100.000000");
        assert_eq!(a.service_description, "s");
    }

    #[test]
    fn timeouts_and_bad_codes_read_as_mod_gearmans() {
        let t = Outcome::TimedOut {
            timeout_ms: 5000,
            signal: libc::SIGKILL,
            escalated: true,
        };
        let a = result_answer(&job("service"), &cfg(), &result(t.clone(), "", ""));
        assert_eq!(a.output, "(Service Check Timed Out On Worker: w1)");
        assert_eq!(a.return_code, 3);
        let c = GearmanConfig {
            timeout_return: 2,
            ..cfg()
        };
        let a = result_answer(&job("host"), &c, &result(t, "partial", ""));
        assert_eq!(a.output, "(Host Check Timed Out On Worker: w1)\npartial");
        assert_eq!(a.return_code, 2);
        let a = result_answer(
            &job("host"),
            &cfg(),
            &result(Outcome::Exited { code: 7 }, "x", ""),
        );
        assert_eq!(a.return_code, 3);
        assert!(
            a.output
                .starts_with("CRITICAL: Return code of 7 is out of bounds."),
            "{}",
            a.output
        );
        let missing = Outcome::SpawnFailed {
            errno: Some(libc::ENOENT),
            message: "no such file".into(),
        };
        let a = result_answer(&job("host"), &cfg(), &result(missing, "", ""));
        assert!(a.output.contains("actually exists"), "{}", a.output);
    }

    #[test]
    fn too_old_jobs_and_restricted_paths_are_not_run() {
        let c = GearmanConfig {
            max_age: 10,
            ..cfg()
        };
        assert!(matches!(
            job_check(&job("service"), &c, 200.0),
            Err(NotRun::TooOld { .. })
        ));
        assert!(job_check(&job("service"), &c, 105.0).is_ok());
        let r = GearmanConfig {
            restrict_path: vec!["/usr/lib/nagios/plugins".into()],
            ..cfg()
        };
        let mut j = job("service");
        j.command_line = "/usr/lib/nagios/plugins/../../../bin/true".into();
        assert!(
            matches!(job_check(&j, &r, 0.0), Err(NotRun::Refused(m)) if m.contains("bad path"))
        );
        j.command_line = "/usr/lib/nagios/plugins/check_dummy 0; /bin/sh".into();
        assert!(matches!(job_check(&j, &r, 0.0), Err(NotRun::Refused(_))));
        let ok = GearmanConfig {
            restrict_path: vec!["/bin".into(), "/usr/bin".into()],
            ..cfg()
        };
        j.command_line = "true".into();
        let check = job_check(&j, &ok, 0.0).unwrap();
        assert!(check.args()[0].to_string_lossy().ends_with("/true"));
        assert!(Path::new(&check.args()[0]).is_absolute());
    }
}
