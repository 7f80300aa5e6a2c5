//! End to end: a real Nagios 4 core (Debian's `nagios4-core`) hands its
//! checks to `pidring nagios-worker`; status.dat must show pidring's results,
//! including a timeout and a CRITICAL, before and after a SIGHUP restart;
//! and, with general connections, the core shares its jobs with pidring.
//!
//! Skips (loudly) only when /usr/sbin/nagios4 is not installed.

mod common;
#[path = "common/gearman.rs"]
mod gearmand;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const NAGIOS: &str = "/usr/sbin/nagios4";
const CHECK_DUMMY: &str = "/usr/lib/nagios/plugins/check_dummy";
const PROBES: usize = 100;
const DUMMIES: usize = 20;
/// Generous: CI machines are slow and shared.
const PHASE_LIMIT: Duration = Duration::from_secs(120);

/// Every process this test starts, stopped on drop even when an assertion fails.
struct Procs {
    dir: PathBuf,
    nagios: Option<Child>,
    pidring: Option<Child>,
}

impl Procs {
    fn signal(child: &Child, sig: i32) {
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe {
            libc::kill(child.id() as i32, sig);
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; always reaped.
    fn stop(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        Self::signal(child, libc::SIGTERM);
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        if let Some(mut p) = self.pidring.take() {
            Self::stop(&mut p, Duration::from_secs(15));
        }
        if let Some(mut n) = self.nagios.take() {
            Self::stop(&mut n, Duration::from_secs(15));
        }
        // Nagios' own worker processes and any plugin still running name our
        // private directory on their command line: kill exactly those.
        for pid in pids_mentioning(&self.dir) {
            // SAFETY: kill(2) with a pid read from /proc; it names our directory.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn pids_mentioning(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline"))
            && String::from_utf8_lossy(&cmd).contains(&needle)
        {
            out.push(pid);
        }
    }
    out
}

/// Zombie children of `parent` right now (state Z, ppid == parent).
fn zombie_children(parent: u32) -> std::collections::HashSet<i32> {
    let mut out = std::collections::HashSet::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = tail.split_whitespace();
        let (state, ppid) = (f.next(), f.next().and_then(|p| p.parse::<u32>().ok()));
        if state == Some("Z")
            && ppid == Some(parent)
            && let Some(pid) = head.split_whitespace().next().and_then(|p| p.parse().ok())
        {
            out.insert(pid);
        }
    }
    out
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The services in status.dat: description → (key → value).
fn services(status: &Path) -> HashMap<String, HashMap<String, String>> {
    let mut out = HashMap::new();
    let Ok(text) = fs::read_to_string(status) else {
        return out;
    };
    let mut block: Option<HashMap<String, String>> = None;
    for line in text.lines() {
        let line = line.trim();
        if line == "servicestatus {" {
            block = Some(HashMap::new());
        } else if line == "}" {
            if let Some(b) = block.take()
                && let Some(name) = b.get("service_description")
            {
                out.insert(name.clone(), b);
            }
        } else if let Some(b) = block.as_mut()
            && let Some((k, v)) = line.split_once('=')
        {
            b.insert(k.to_string(), v.to_string());
        }
    }
    out
}

/// Timestamps of nagios.log lines containing `needle`, at or after `since`.
fn log_times(log: &Path, needle: &str, since: u64) -> Vec<u64> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .filter(|&t| t >= since)
        .collect()
}

/// Poll until `f` returns Some, or fail with `what` and the last complaint.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let end = Instant::now() + PHASE_LIMIT;
    loop {
        match f() {
            Ok(v) => return v,
            Err(why) if Instant::now() >= end => {
                panic!("timed out after {PHASE_LIMIT:?} waiting for {what}: {why}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn write_config(dir: &Path) {
    let d = dir.display();
    let probe = dir.join("probe");
    // The plugin names the process that started it (its parent) and that pid,
    // and the service it checks from the core's environment macros (`env`).
    fs::write(
        &probe,
        "#!/bin/sh\n\
         parent=$(cat /proc/$PPID/comm 2>/dev/null)\n\
         case \"$1\" in\n\
           sleep) exec sleep 30 ;;\n\
           crit) echo \"CRITICAL via $parent $PPID\"; exit 2 ;;\n\
         esac\n\
         echo \"OK via $parent $PPID for $NAGIOS_SERVICEDESC|probe=1\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&probe, fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir_all(dir.join("spool")).unwrap();
    fs::create_dir_all(dir.join("tmp")).unwrap();

    let mut objects = String::from("define timeperiod {\n timeperiod_name always\n alias always\n");
    for day in [
        "sunday",
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
    ] {
        writeln!(objects, " {day} 00:00-24:00").unwrap();
    }
    objects.push_str("}\n");
    // `$$PPID` is a literal `$PPID`: the `$` makes both pidring and Nagios run
    // the line through /bin/sh, whose $PPID is the executor that started it.
    write!(
        objects,
        "define command {{\n command_name notify\n command_line /bin/true\n}}\n\
         define command {{\n command_name dummy\n command_line {CHECK_DUMMY} $ARG1$ \"$ARG2$ via $$PPID\"\n}}\n\
         define command {{\n command_name probe\n command_line {d}/probe $ARG1$\n}}\n\
         define contact {{\n contact_name nobody\n host_notifications_enabled 0\n service_notifications_enabled 0\n\
          host_notification_period always\n service_notification_period always\n host_notification_options n\n\
          service_notification_options n\n host_notification_commands notify\n service_notification_commands notify\n}}\n\
         define host {{\n host_name h1\n address 127.0.0.1\n check_command dummy!0!host up\n max_check_attempts 1\n\
          check_interval 1\n retry_interval 1\n check_period always\n contacts nobody\n notification_interval 0\n\
          notification_period always\n notifications_enabled 0\n}}\n\
         define service {{\n name svc\n register 0\n host_name h1\n max_check_attempts 1\n check_interval 1\n\
          retry_interval 1\n check_period always\n notification_interval 0\n notification_period always\n\
          contacts nobody\n notifications_enabled 0\n}}\n"
    )
    .unwrap();
    let mut service = |desc: &str, cmd: &str| {
        writeln!(
            objects,
            "define service {{\n use svc\n service_description {desc}\n check_command {cmd}\n}}"
        )
        .unwrap();
    };
    for i in 0..PROBES {
        service(&format!("probe{i:03}"), "probe!ok");
    }
    for i in 0..DUMMIES {
        service(
            &format!("dummy{i:02}"),
            &format!("dummy!{}!dummy {i}", i % 2),
        );
    }
    service("crit", "probe!crit");
    service("slow", "probe!sleep");
    fs::write(dir.join("objects.cfg"), objects).unwrap();

    let cfg = format!(
        "log_file={d}/nagios.log\n\
         cfg_file={d}/objects.cfg\n\
         object_cache_file={d}/objects.cache\n\
         precached_object_file={d}/objects.precache\n\
         status_file={d}/status.dat\n\
         status_update_interval=1\n\
         nagios_user=root\n\
         nagios_group=root\n\
         check_external_commands=0\n\
         command_file={d}/nagios.cmd\n\
         lock_file={d}/nagios.lock\n\
         temp_file={d}/nagios.tmp\n\
         temp_path={d}/tmp\n\
         check_result_path={d}/spool\n\
         query_socket={d}/nagios.qh\n\
         state_retention_file={d}/retention.dat\n\
         retain_state_information=0\n\
         use_syslog=0\n\
         interval_length=1\n\
         service_check_timeout=2\n\
         host_check_timeout=2\n\
         enable_notifications=0\n\
         enable_flap_detection=0\n\
         check_workers=1\n\
         check_result_reaper_frequency=1\n\
         max_check_result_reaper_time=5\n\
         service_inter_check_delay_method=n\n\
         host_inter_check_delay_method=n\n\
         max_service_check_spread=1\n\
         max_host_check_spread=1\n\
         log_rotation_method=n\n\
         log_archive_path={d}\n\
         debug_level=0\n\
         enable_environment_macros=1\n"
    );
    fs::write(dir.join("nagios.cfg"), cfg).unwrap();
}

/// Registrations of both pidring connections logged at or after `since`;
/// returns the second after the later one (checks started then are pidring's).
fn registered_after(log: &Path, since: u64) -> Result<u64, String> {
    let dummy = log_times(log, "Registry request: name=pidring check_dummy;", since);
    let probe = log_times(log, "Registry request: name=pidring /", since);
    match (dummy.first(), probe.first()) {
        (Some(a), Some(b)) => Ok(*a.max(b) + 1),
        _ => Err(format!(
            "pidring registrations since {since}: check_dummy {dummy:?}, probe {probe:?}"
        )),
    }
}

/// One service's latest result, as status.dat has it.
struct Latest<'a> {
    last_check: u64,
    state: &'a str,
    output: &'a str,
}

/// `s[k]`, or "" if status.dat left it out.
fn field<'a>(s: &'a HashMap<String, String>, k: &str) -> &'a str {
    s.get(k).map(String::as_str).unwrap_or("")
}

/// Every service's latest result, or why status.dat does not hold them all yet.
fn latest_results(
    svcs: &HashMap<String, HashMap<String, String>>,
) -> Result<Vec<(&str, Latest<'_>)>, String> {
    let expected = PROBES + DUMMIES + 2;
    if svcs.len() != expected {
        return Err(format!(
            "status.dat has {} of {expected} services",
            svcs.len()
        ));
    }
    Ok(svcs
        .iter()
        .map(|(name, s)| {
            let latest = Latest {
                last_check: field(s, "last_check").parse().unwrap_or(0),
                state: field(s, "current_state"),
                output: field(s, "plugin_output"),
            };
            (name.as_str(), latest)
        })
        .collect())
}

/// Every service has a result that started at or after `since` and names pidring.
fn all_fresh_from_pidring(status: &Path, pidring_pid: u32, since: u64) -> Result<(), String> {
    let svcs = services(status);
    let via = format!("via pidring {pidring_pid}");
    let via_dummy = format!("via {pidring_pid}");
    let mut stale = Vec::new();
    for (name, r) in latest_results(&svcs)? {
        let (last, state, out) = (r.last_check, r.state, r.output);
        let ok = last >= since
            && match name {
                "crit" => state == "2" && out == format!("CRITICAL {via}"),
                "slow" => out.starts_with("(Service check timed out after"),
                n if n.starts_with("probe") => state == "0" && out == format!("OK {via} for {n}"),
                _ => out.ends_with(&via_dummy),
            };
        if !ok {
            stale.push(format!(
                "{name}: last_check={last} state={state} output={out:?}"
            ));
        }
    }
    if stale.is_empty() {
        Ok(())
    } else {
        stale.sort();
        Err(format!(
            "{} services not yet fresh from pidring since {since}, e.g. {:?}",
            stale.len(),
            &stale[..stale.len().min(3)]
        ))
    }
}

#[test]
fn nagios_core_runs_its_checks_through_pidring() {
    e2e(Mode::Worker);
}

/// The same, through `pidring daemon` with a `[nagios]` section in its config:
/// one daemon serves its own socket and the core, and counts both in stats.
#[test]
fn nagios_core_runs_its_checks_through_the_daemon() {
    e2e(Mode::Daemon);
}

/// Without `--plugin`, pidring's general connections join the core's
/// round-robin next to the core's own worker: every service keeps getting
/// correct results, some run by pidring and some by the core.
#[test]
fn nagios_core_shares_its_jobs_with_pidrings_general_connections() {
    let Some((mut procs, started)) = start_core("round-robin") else {
        return;
    };
    let dir = procs.dir.clone();
    let (log, status) = (dir.join("nagios.log"), dir.join("status.dat"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pidring"));
    cmd.args(["nagios-worker", "--qh-socket"])
        .arg(dir.join("nagios.qh"))
        .args(["--connections", "3"]);
    let pidring_pid = spawn_pidring(&mut procs, cmd);
    let since = wait_for("pidring's three general connections to register", || {
        let t: Vec<u64> = (1..=3)
            .filter_map(|i| {
                let needle = format!("Registry request: name=pidring {i};");
                log_times(&log, &needle, started).first().copied()
            })
            .collect();
        match t.iter().max() {
            Some(last) if t.len() == 3 => Ok(last + 1),
            _ => Err(format!("registered so far at {t:?}")),
        }
    });
    let (mut by_pidring, mut by_core) = (0, 0);
    wait_for(
        "fresh, correct results for every service, run by pidring and by the core",
        || {
            let svcs = services(&status);
            (by_pidring, by_core) = (0, 0);
            let mut wrong = Vec::new();
            for (name, r) in latest_results(&svcs)? {
                let (last, state, out) = (r.last_check, r.state, r.output);
                // "… via COMM PID …": who started the plugin.
                let runner = out.split(" via ").nth(1).map(|r| {
                    let mut w = r.split(' ');
                    (w.next().unwrap_or(""), w.next().unwrap_or(""))
                });
                let ok = last >= since
                    && match name {
                        "crit" => state == "2" && out.starts_with("CRITICAL via "),
                        "slow" => out.starts_with("(Service check timed out after"),
                        n if n.starts_with("probe") => {
                            state == "0" && out.ends_with(&format!(" for {n}"))
                        }
                        _ => out
                            .rsplit(' ')
                            .next()
                            .is_some_and(|p| p.parse::<u32>().is_ok()),
                    };
                if !ok {
                    wrong.push(format!(
                        "{name}: last_check={last} state={state} output={out:?}"
                    ));
                } else if name.starts_with("probe") {
                    match runner {
                        Some(("pidring", pid)) if pid == pidring_pid.to_string() => by_pidring += 1,
                        Some((comm, _)) if comm != "pidring" => by_core += 1,
                        _ => wrong.push(format!("{name}: run by whom? {out:?}")),
                    }
                }
            }
            if !wrong.is_empty() {
                wrong.sort();
                return Err(format!(
                    "{} services not fresh and right: {:?}",
                    wrong.len(),
                    &wrong[..wrong.len().min(3)]
                ));
            }
            // Three of pidring's connections to the core's one: most jobs.
            if by_pidring <= by_core || by_core == 0 {
                return Err(format!(
                    "probe results so far: {by_pidring} by pidring, {by_core} by the core"
                ));
            }
            Ok(())
        },
    );
    eprintln!(
        "latest probe results: {by_pidring} run by pidring, {by_core} by the core's own worker"
    );
    no_lingering_zombies(pidring_pid);
    stop_cleanly(procs);
}

/// How pidring is started against the core.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    /// `pidring nagios-worker`.
    Worker,
    /// `pidring daemon --config` with a `[nagios]` section.
    Daemon,
}

/// A core running on the generated config in a fresh directory, and when it
/// started (unix seconds); `None`, said loudly, if Nagios is not installed.
fn start_core(name: &str) -> Option<(Procs, u64)> {
    if !Path::new(NAGIOS).exists() {
        eprintln!(
            "\n\n!!!!! SKIPPED: {NAGIOS} is not installed; this end-to-end test needs \
             `apt-get install --no-install-recommends nagios4-core monitoring-plugins-basic` !!!!!\n"
        );
        return None;
    }
    assert!(
        Path::new(CHECK_DUMMY).exists(),
        "{CHECK_DUMMY} is missing: install monitoring-plugins-basic"
    );
    let dir =
        std::env::temp_dir().join(format!("pidring-nagios-e2e-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    // Kept on failure for a look at nagios.log, status.dat and pidring.log.
    eprintln!("nagios e2e working directory: {}", dir.display());
    write_config(&dir);
    let mut procs = Procs {
        dir: dir.clone(),
        nagios: None,
        pidring: None,
    };
    let verify = Command::new(NAGIOS)
        .arg("-v")
        .arg(dir.join("nagios.cfg"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "nagios rejects the generated config:\n{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let started = now();
    procs.nagios = Some(
        Command::new(NAGIOS)
            .arg(dir.join("nagios.cfg"))
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("nagios.out")).unwrap())
            .stderr(fs::File::create(dir.join("nagios.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("the core's query-handler socket", || {
        dir.join("nagios.qh")
            .exists()
            .then_some(())
            .ok_or_else(|| "not there yet".to_string())
    });
    Some((procs, started))
}

/// Start `cmd` (a pidring command) with its log in the test directory; its pid.
fn spawn_pidring(procs: &mut Procs, mut cmd: Command) -> u32 {
    let pidring = cmd
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(procs.dir.join("pidring.log")).unwrap())
        .spawn()
        .unwrap();
    let pid = pidring.id();
    procs.pidring = Some(pidring);
    pid
}

/// SIGHUP (a closed terminal, or the daemon's reload) and SIGUSR1 (a log rotation) leave pidring serving; SIGTERM makes it
/// kill, reap and answer what is in flight, and exit 0; then the core stops
/// and the directory goes.
fn stop_cleanly(mut procs: Procs) {
    let dir = procs.dir.clone();
    let mut pidring = procs.pidring.take().unwrap();
    for (sig, name) in [(libc::SIGHUP, "SIGHUP"), (libc::SIGUSR1, "SIGUSR1")] {
        Procs::signal(&pidring, sig);
        wait_for(&format!("pidring to shrug off {name}"), || {
            let log = fs::read_to_string(dir.join("pidring.log")).unwrap_or_default();
            match pidring.try_wait() {
                Ok(Some(st)) => panic!("pidring died of {name}: {st:?}\n{log}"),
                _ if log.contains(&format!("{name} ignored")) => Ok(()),
                // The daemon, started with --config, reloads it instead
                // (the same file: nothing changes, no connection drops).
                _ if name == "SIGHUP" && log.contains("configuration reloaded") => Ok(()),
                _ => Err("no log line yet".to_string()),
            }
        });
    }
    let st = Procs::stop(&mut pidring, Duration::from_secs(20));
    let plog = fs::read_to_string(dir.join("pidring.log")).unwrap_or_default();
    assert!(
        st.is_some_and(|s| s.success()),
        "pidring did not exit cleanly on SIGTERM: {st:?}\n{plog}"
    );
    assert!(!plog.contains("panicked"), "{plog}");
    assert!(plog.contains("stopped"), "{plog}");
    drop(procs);
    let _ = fs::remove_dir_all(&dir);
}

/// No zombie lingers under pidring: a child may be a zombie for the moment
/// between its exit and its reap, never across two samples.
fn no_lingering_zombies(pidring_pid: u32) {
    let mut previous = zombie_children(pidring_pid);
    wait_for(
        "two zombie samples of pidring's children with nothing in common",
        || {
            std::thread::sleep(Duration::from_millis(300));
            let now = zombie_children(pidring_pid);
            let lingering: Vec<_> = now.intersection(&previous).copied().collect();
            previous = now;
            if lingering.is_empty() {
                Ok(())
            } else {
                Err(format!("lingering zombies {lingering:?}"))
            }
        },
    );
}

fn e2e(mode: Mode) {
    let Some((mut procs, started)) = start_core(&format!("{mode:?}")) else {
        return;
    };
    let dir = procs.dir.clone();
    let (log, status) = (dir.join("nagios.log"), dir.join("status.dat"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pidring"));
    match mode {
        Mode::Worker => {
            cmd.args(["nagios-worker", "--qh-socket"])
                .arg(dir.join("nagios.qh"))
                .args(["--plugin", "check_dummy", "--plugin"])
                .arg(dir.join("probe"));
        }
        Mode::Daemon => {
            let toml = format!(
                "[nagios]\nqh_socket = {:?}\nplugins = [\"check_dummy\", {:?}]\n",
                dir.join("nagios.qh"),
                dir.join("probe")
            );
            fs::write(dir.join("daemon.toml"), toml).unwrap();
            cmd.args(["daemon", "--socket"])
                .arg(dir.join("d.sock"))
                .arg("--config")
                .arg(dir.join("daemon.toml"));
        }
    }
    let pidring_pid = spawn_pidring(&mut procs, cmd);

    // Phase 1: every service, the timeout and the CRITICAL included, is fresh from pidring.
    let since = wait_for("pidring to register both plugins", || {
        registered_after(&log, started)
    });
    wait_for("fresh pidring results for every service", || {
        all_fresh_from_pidring(&status, pidring_pid, since)
    });
    wait_for("the core to log a pidring timeout", || {
        let t = log_times(&log, "from worker pidring /", since);
        let timeouts = fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("from worker pidring /") && l.contains("timed out after"))
            .count();
        if timeouts > 0 {
            Ok(())
        } else {
            Err(format!("no pidring timeout logged ({t:?})"))
        }
    });

    // Phase 2: SIGHUP restarts the core, which closes worker connections;
    // pidring registers again and the results keep coming from it.
    let hup_at = now();
    Procs::signal(procs.nagios.as_ref().unwrap(), libc::SIGHUP);
    wait_for("the core to restart", || {
        let t = log_times(&log, "Caught SIGHUP", hup_at);
        if t.is_empty() {
            Err("no restart logged yet".into())
        } else {
            Ok(())
        }
    });
    let since = wait_for("pidring to register again after SIGHUP", || {
        registered_after(&log, hup_at)
    });
    wait_for("fresh pidring results after the restart", || {
        all_fresh_from_pidring(&status, pidring_pid, since)
    });

    no_lingering_zombies(pidring_pid);

    if mode == Mode::Daemon {
        // The core's jobs count in the daemon's own stats.
        let out = Command::new(env!("CARGO_BIN_EXE_pidring"))
            .args(["stats", "--json", "--socket"])
            .arg(dir.join("d.sock"))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("stats: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        let completed = v
            .pointer("/engine/counters/completed")
            .and_then(|c| c.as_u64());
        assert!(completed.is_some_and(|c| c >= 122), "daemon stats: {v}");
    }

    stop_cleanly(procs);
}

/// Every service has a result since `since` from one of the gearman
/// workers `pids` (the plugins print their parent's pid); returns the
/// workers seen.
fn all_fresh_from_workers(status: &Path, pids: &[u32], since: u64) -> Result<HashSet<u32>, String> {
    let svcs = services(status);
    let mut seen = HashSet::new();
    let mut stale = Vec::new();
    let worker_of = |out: &str, prefix: &str| -> Option<u32> {
        let rest = out.strip_prefix(prefix)?;
        let pid: u32 = rest
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()?;
        pids.contains(&pid).then_some(pid)
    };
    for (name, r) in latest_results(&svcs)? {
        let (last, state, out) = (r.last_check, r.state, r.output);
        let from = if last < since {
            None
        } else {
            match name {
                "crit" if state == "2" => worker_of(out, "CRITICAL via pidring "),
                "slow" => out.contains("Check Timed Out On Worker: w").then_some(0),
                n if n.starts_with("probe") && state == "0" => worker_of(out, "OK via pidring "),
                _ => out
                    .rsplit_once(" via ")
                    .and_then(|(_, pid)| pid.parse::<u32>().ok())
                    .filter(|p| pids.contains(p)),
            }
        };
        match from {
            Some(pid) => {
                seen.insert(pid);
            }
            None => stale.push(format!(
                "{name}: last_check={last} state={state} output={out:?}"
            )),
        }
    }
    seen.remove(&0);
    if stale.is_empty() {
        Ok(seen)
    } else {
        stale.sort();
        Err(format!(
            "{} services not yet fresh from the gearman workers since {since}, e.g. {:?}",
            stale.len(),
            &stale[..stale.len().min(3)]
        ))
    }
}

/// A Nagios 4 core spreads its checks through gearmand: `nagios-worker
/// --gearman` puts every job into gearmand, two `pidring gearman-worker`s
/// run them, and status.dat shows fresh results from both (a CRITICAL and
/// a timeout among them), before and after a SIGHUP of the core.
#[test]
fn nagios_core_distributes_its_checks_through_gearmand_to_two_workers() {
    let Some(gearmand) = gearmand::gearmand_binary("nagios_core_distributes_its_checks") else {
        return;
    };
    let Some((mut procs, started)) = start_core("gearman") else {
        return;
    };
    let dir = procs.dir.clone();
    let (log, status) = (dir.join("nagios.log"), dir.join("status.dat"));
    let g = gearmand::Gearmand::start(&gearmand, &[]);
    let bin = env!("CARGO_BIN_EXE_pidring");
    fs::write(
        dir.join("empty.cfg"),
        "# worker.cfg read as mod_gearman's\n",
    )
    .unwrap();
    let mut workers = Vec::new();
    for name in ["w1", "w2"] {
        // The test directory on the command line: Procs' drop kills them too.
        workers.push(
            Command::new(bin)
                .args([
                    "gearman-worker",
                    "--server",
                    &g.addr(),
                    "--encryption=no",
                    "--services=yes",
                    "--hosts=yes",
                ])
                .arg(format!("--identifier={name}"))
                .arg(format!("--config={}", dir.join("empty.cfg").display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(dir.join(format!("{name}.log"))).unwrap())
                .spawn()
                .unwrap(),
        );
    }
    let pids: Vec<u32> = workers.iter().map(|w| w.id()).collect();
    let mut cmd = Command::new(bin);
    cmd.args(["nagios-worker", "--qh-socket"])
        .arg(dir.join("nagios.qh"))
        .args(["--plugin", "check_dummy", "--plugin"])
        .arg(dir.join("probe"))
        .args(["--gearman", &g.addr()]);
    let bridge = spawn_pidring(&mut procs, cmd);

    let since = wait_for("pidring to register both plugins", || {
        registered_after(&log, started)
    });
    wait_for("fresh results from both gearman workers", || {
        let seen = all_fresh_from_workers(&status, &pids, since)?;
        if seen.len() == 2 {
            Ok(())
        } else {
            Err(format!("results only from {seen:?} of {pids:?}"))
        }
    });

    let hup_at = now();
    Procs::signal(procs.nagios.as_ref().unwrap(), libc::SIGHUP);
    let since = wait_for("the bridge to register again after SIGHUP", || {
        registered_after(&log, hup_at)
    });
    wait_for(
        "fresh results from both gearman workers after the restart",
        || {
            let seen = all_fresh_from_workers(&status, &pids, since)?;
            if seen.len() == 2 {
                Ok(())
            } else {
                Err(format!("results only from {seen:?} of {pids:?}"))
            }
        },
    );
    no_lingering_zombies(bridge);
    for mut w in workers {
        Procs::stop(&mut w, Duration::from_secs(20));
    }
    stop_cleanly(procs);
    g.stop();
}
