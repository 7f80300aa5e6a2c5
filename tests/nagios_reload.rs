//! `pidring nagios-worker --config FILE`: the policy applied to jobs, and
//! SIGHUP re-reading the file, against a stand-in for a Nagios 4 core's
//! query-handler socket (the real core is in tests/nagios.rs).

use pidring_service::nagios::codec::{self, Decoder, Message};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pidring");
const PATIENCE: Duration = Duration::from_secs(60);

/// One registered worker connection, seen from the core.
struct Core {
    stream: UnixStream,
    decoder: Decoder,
    /// The `@wproc register` request.
    request: String,
}

impl Core {
    fn accept(listener: &UnixListener) -> Core {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut req = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != 0 || req.is_empty() {
            assert_eq!(stream.read(&mut b).unwrap(), 1, "worker hung up");
            req.push(b[0]);
        }
        stream.write_all(b"OK\0").unwrap();
        Core {
            stream,
            decoder: Decoder::new(),
            request: String::from_utf8_lossy(&req).into_owned(),
        }
    }

    fn job(&mut self, id: &str, command: &str) -> Message {
        let job = codec::encode([
            ("job_id", id),
            ("type", "0"),
            ("command", command),
            ("timeout", "10"),
        ]);
        self.stream.write_all(&job).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            while let Some(m) = self.decoder.next_message().unwrap() {
                if m.get("log").is_none() {
                    return m;
                }
            }
            let n = self.stream.read(&mut buf).expect("an answer");
            assert!(n > 0, "worker closed the connection");
            self.decoder.feed(&buf[..n]);
        }
    }
}

fn wait_log(log: &Path, needle: &str, n: usize) -> String {
    let end = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(needle).count() >= n {
            return text;
        }
        assert!(Instant::now() < end, "no {needle:?} in:\n{text}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn hup(child: &Child) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
}

#[test]
fn nagios_worker_applies_its_config_file_and_reloads_it_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let qh = dir.path().join("nagios.qh");
    let listener = UnixListener::bind(&qh).unwrap();
    let (config, log) = (
        dir.path().join("worker.toml"),
        dir.path().join("worker.log"),
    );
    let marker = dir.path().join("ran");
    let section = format!("[nagios]\nqh_socket = \"{}\"\nname = \"w\"\n", qh.display());
    let allow = "allowed_commands = [\"/bin/*\", \"/usr/bin/*\"]\n";
    std::fs::write(&config, format!("{allow}{section}")).unwrap();
    let mut child = Command::new(BIN)
        .arg("nagios-worker")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut general = Core::accept(&listener);
    assert!(!general.request.contains("plugin="), "{}", general.request);
    let a = general.job("1", "/bin/echo hello");
    assert_eq!(a.get("outstd"), Some("hello\n"));
    // Outside the allowlist: an UNKNOWN check saying why, nothing run.
    let script = dir.path().join("touch-it");
    std::fs::write(&script, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let a = general.job("2", &script.display().to_string());
    assert_eq!(a.get("wait_status"), Some("768"), "{:?}", a.get("outstd"));
    let out = a.get("outstd").unwrap();
    assert!(
        out.contains("forbidden") && out.contains("allowed_commands"),
        "{out}"
    );
    assert!(!marker.exists());

    // Reload: the script's directory allowed, a plugin connection added.
    let more = format!(
        "allowed_commands = [\"/bin/*\", \"/usr/bin/*\", \"{}/*\"]\nmax_running = 7\n{section}plugins = [\"/bin/true\"]\nconnections = 1\n",
        dir.path().display()
    );
    std::fs::write(&config, more).unwrap();
    hup(&child);
    let mut plugin = Core::accept(&listener);
    assert!(
        plugin.request.contains("plugin=/bin/true"),
        "{}",
        plugin.request
    );
    let text = wait_log(&log, "configuration reloaded", 1);
    assert!(text.contains("max_running 1024 -> 7"), "{text}");
    assert!(
        text.contains("added [\"plugin /bin/true\"], removed []"),
        "{text}"
    );
    // The first connection was kept, and now runs the script.
    let a = general.job("3", &script.display().to_string());
    assert_eq!(a.get("wait_status"), Some("0"), "{a:?}");
    assert!(marker.exists());
    assert_eq!(plugin.job("4", "/bin/true").get("wait_status"), Some("0"));

    // A broken file: logged, the running settings kept.
    std::fs::write(&config, "max_running = \"many\"\n").unwrap();
    hup(&child);
    let text = wait_log(&log, "reload failed", 1);
    assert!(text.contains("line 1"), "{text}");
    assert_eq!(
        general.job("5", "/bin/echo still").get("outstd"),
        Some("still\n")
    );

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let end = Instant::now() + PATIENCE;
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "worker did not stop");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(st.success(), "{st:?}");
}
