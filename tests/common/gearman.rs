//! A real gearmand for the tests: started on a free loopback port, stopped
//! by pid; and a minimal client (background submits, a result collector)
//! built on pidring's own packet codec.
#![allow(dead_code)]

use pidring_service::gearman::packet::{self, Decoder, Kind};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A gearmand of our own.
pub struct Gearmand {
    pub port: u16,
    child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// gearmand's path, or `None` with a loud SKIP (a failure under
/// `PIDRING_REQUIRE_GEARMAN=1`, as CI sets it).
pub fn gearmand_binary(test: &str) -> Option<PathBuf> {
    for p in ["/usr/sbin/gearmand", "/usr/bin/gearmand"] {
        if Path::new(p).exists() {
            return Some(PathBuf::from(p));
        }
    }
    if std::env::var_os("PIDRING_REQUIRE_GEARMAN").is_some_and(|v| v == "1") {
        panic!(
            "{test}: gearmand is not installed (apt-get install gearman-job-server) and PIDRING_REQUIRE_GEARMAN=1"
        );
    }
    eprintln!("SKIP {test}: gearmand is not installed (apt-get install gearman-job-server)");
    None
}

/// A free loopback port (bound, then released for gearmand to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Gearmand {
    /// Start gearmand on a free port and wait until it accepts connections.
    pub fn start(bin: &Path, extra: &[&str]) -> Gearmand {
        Gearmand::start_on(bin, free_port(), extra)
    }

    /// Start gearmand on `port` (a restart reuses its predecessor's).
    pub fn start_on(bin: &Path, port: u16, extra: &[&str]) -> Gearmand {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("gearmand.log");
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .arg("--listen=127.0.0.1")
            .arg(format!("--log-file={}", log.display()))
            .arg("--verbose=WARNING")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gearmand");
        let g = Gearmand {
            port,
            child,
            log,
            _dir: dir,
        };
        let end = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < end,
                "gearmand did not listen on {port} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        g
    }

    /// `host:port` for `--server`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The admin `status` lines: function → (queued, running, workers).
    pub fn status(&self) -> std::collections::HashMap<String, (u64, u64, u64)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"status\n").unwrap();
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while !text.ends_with(".\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "gearmand closed the admin connection");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f.len() == 4).then(|| {
                    (
                        f[0].to_string(),
                        (
                            f[1].parse().unwrap_or(0),
                            f[2].parse().unwrap_or(0),
                            f[3].parse().unwrap_or(0),
                        ),
                    )
                })
            })
            .collect()
    }

    /// Stop it (SIGTERM, then SIGKILL after 10 s) and wait.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gearmand {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Queue a background job.
pub fn submit_bg(port: u16, queue: &str, data: &[u8]) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&packet::request(
        Kind::SubmitJobBg,
        &[queue.as_bytes(), b"", data],
    ))
    .unwrap();
    let p = read_packet(&mut s, &mut Decoder::new());
    assert_eq!(p.kind, Kind::JobCreated, "submit to {queue}: {p:?}");
}

/// Queue many background jobs on one connection.
pub fn submit_many(port: u16, queue: &str, jobs: &[Vec<u8>]) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut out = Vec::new();
    for j in jobs {
        packet::encode_into(
            packet::REQ,
            Kind::SubmitJobBg,
            &[queue.as_bytes(), b"", j],
            &mut out,
        );
    }
    s.write_all(&out).unwrap();
    let mut d = Decoder::new();
    for _ in jobs {
        let p = read_packet(&mut s, &mut d);
        assert_eq!(p.kind, Kind::JobCreated, "submit to {queue}: {p:?}");
    }
}

fn read_packet(s: &mut TcpStream, d: &mut Decoder) -> packet::Packet {
    let mut buf = [0u8; 65536];
    loop {
        if let Some(p) = d.next_packet().unwrap() {
            return p;
        }
        let n = s.read(&mut buf).expect("read from gearmand");
        assert!(n > 0, "gearmand closed the connection");
        d.feed(&buf[..n]);
    }
}

/// Take jobs from `queue` (as a worker) until `n` came or `limit` passed;
/// returns their data, in the order taken.
pub fn collect(port: u16, queue: &str, n: usize, limit: Duration) -> Vec<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.write_all(&packet::request(Kind::CanDo, &[queue.as_bytes()]))
        .unwrap();
    let mut got = Vec::new();
    let mut d = Decoder::new();
    let end = Instant::now() + limit;
    let mut buf = [0u8; 65536];
    let mut asked = false;
    while got.len() < n && Instant::now() < end {
        if !asked {
            s.write_all(&packet::request(Kind::GrabJob, &[])).unwrap();
            asked = true;
        }
        match d.next_packet().unwrap() {
            Some(p) if p.kind == Kind::JobAssign => {
                s.write_all(&packet::request(Kind::WorkComplete, &[&p.args[0], b""]))
                    .unwrap();
                got.push(p.args[2].clone());
                asked = false;
            }
            Some(p) if p.kind == Kind::NoJob => {
                std::thread::sleep(Duration::from_millis(20));
                asked = false;
            }
            Some(_) => {}
            None => match s.read(&mut buf) {
                Ok(0) => panic!("gearmand closed the collector"),
                Ok(k) => d.feed(&buf[..k]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("collector read: {e}"),
            },
        }
    }
    got
}
