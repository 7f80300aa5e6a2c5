//! The daemon client: runs the load through a running `pidring daemon`.
//!
//! Protocol (kept in this one file so it is easy to follow the daemon):
//! newline-delimited JSON over a Unix stream socket. Request
//! `{"op":"submit","id":N,"argv":[...],"timeout":"1000ms","grace":"500ms","env":{...}}`;
//! responses `{"type":"result","id":N,"result":{CheckResult}}` or
//! `{"type":"error","id":N,"code":"queue_full","message":"..."}`, in completion order.

use crate::behaviour::Spec;
use crate::driver::{Driver, Event, Policy};
use crate::record::Record;
use crossbeam_channel::Sender;
use pidring::{CheckResult, MetricsSnapshot};
use serde::Deserialize;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One response line (only the fields the harness reads).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Response {
    Result {
        id: serde_json::Value,
        result: Box<CheckResult>,
    },
    Error {
        #[serde(default)]
        id: Option<serde_json::Value>,
        code: String,
        message: String,
    },
    #[serde(other)]
    Other,
}

/// A connection to a running daemon.
pub struct SocketDriver {
    writer: BufWriter<UnixStream>,
    stream: UnixStream,
    policy: Policy,
    daemon_pid: i32,
    sent: u64,
    answered: Arc<AtomicU64>,
    reader: Option<JoinHandle<()>>,
}

impl SocketDriver {
    /// Connect; results and refusals go to `tx`.
    pub fn connect(
        path: &Path,
        policy: Policy,
        tx: Sender<Event>,
        start: Instant,
    ) -> Result<SocketDriver, String> {
        let stream = UnixStream::connect(path).map_err(|e| {
            format!(
                "cannot connect to the daemon at {}: {e} (is `pidring daemon` running there?)",
                path.display()
            )
        })?;
        let daemon_pid = peer_pid(&stream)
            .map_err(|e| format!("cannot read the daemon's pid (SO_PEERCRED): {e}"))?;
        // One ping round trip before anything is measured: once the daemon
        // answers, it has accepted this connection and set up its threads
        // and descriptors for it (its fd count at the start includes them).
        {
            use std::io::{BufRead, Write};
            let mut w = stream.try_clone().map_err(|e| e.to_string())?;
            w.write_all(b"{\"op\":\"ping\"}\n")
                .map_err(|e| format!("cannot ping the daemon: {e}"))?;
            let mut line = String::new();
            BufReader::new(stream.try_clone().map_err(|e| e.to_string())?)
                .read_line(&mut line)
                .map_err(|e| format!("no answer to ping from the daemon: {e}"))?;
            if !line.contains("pong") {
                return Err(format!("unexpected answer to ping from the daemon: {line}"));
            }
        }
        wait_for_other_clients(&stream)?;
        let answered = Arc::new(AtomicU64::new(0));
        let read_half = stream.try_clone().map_err(|e| e.to_string())?;
        let counter = answered.clone();
        let reader = std::thread::Builder::new()
            .name("stress-socket-reader".into())
            .spawn(move || read_responses(read_half, tx, start, counter))
            .map_err(|e| e.to_string())?;
        Ok(SocketDriver {
            writer: BufWriter::new(stream.try_clone().map_err(|e| e.to_string())?),
            stream,
            policy,
            daemon_pid,
            sent: 0,
            answered,
            reader: Some(reader),
        })
    }
}

/// How long [`wait_for_other_clients`] waits.
const OTHER_CLIENTS_WAIT: Duration = Duration::from_secs(5);

/// Wait (bounded) until this is the daemon's only open connection, so that
/// the fd count at the start holds no other client's. The daemon's socket
/// of a client that has just gone (CI's `pidring ping` that saw the daemon
/// up, a moment before this harness connected) stays open until that
/// connection's threads end (the daemon counts it open until then) and the
/// daemon's accept loop next wakes (the start sample lasts longer than
/// that: `invariants::DAEMON_SETTLE`). A client still connected after the
/// wait holds its fds through the run: go on.
fn wait_for_other_clients(stream: &UnixStream) -> Result<(), String> {
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let end = Instant::now() + OTHER_CLIENTS_WAIT;
    loop {
        w.write_all(b"{\"op\":\"stats\",\"id\":\"settle\"}\n")
            .map_err(|e| format!("cannot ask the daemon for its stats: {e}"))?;
        let mut line = String::new();
        r.read_line(&mut line)
            .map_err(|e| format!("no answer to stats from the daemon: {e}"))?;
        let stats: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| format!("unreadable stats from the daemon: {e}: {line}"))?;
        let open = stats["daemon"]["connections_open"]
            .as_u64()
            .ok_or_else(|| format!("no daemon.connections_open in the daemon's stats: {line}"))?;
        if open <= 1 {
            return Ok(());
        }
        if Instant::now() >= end {
            eprintln!(
                "pidring-stress: the daemon serves {} other connection(s) after {OTHER_CLIENTS_WAIT:?}; their fds count at the start and the end",
                open - 1
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_responses(stream: UnixStream, tx: Sender<Event>, start: Instant, answered: Arc<AtomicU64>) {
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let parsed: Response = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("unreadable response from the daemon: {e}: {line}");
                continue;
            }
        };
        let now = start.elapsed().as_micros() as u64;
        match parsed {
            Response::Result { id, result } => {
                let Some(seq) = id.as_u64() else { continue };
                answered.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(Event::Result(Record::from_result(seq, &result, now)));
            }
            Response::Error { id, code, message } => {
                let Some(seq) = id.and_then(|v| v.as_u64()) else {
                    tracing::warn!("daemon error without an id: {code}: {message}");
                    continue;
                };
                answered.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(Event::Rejected {
                    seq,
                    reason: format!("{code}: {message}"),
                });
            }
            Response::Other => {}
        }
    }
}

/// The pid of the process at the other end of a Unix socket.
fn peer_pid(stream: &UnixStream) -> std::io::Result<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.pid)
}

/// A submit request line.
pub fn request_line(spec: &Spec, policy: &Policy) -> String {
    serde_json::json!({
        "op": "submit",
        "id": spec.seq,
        "argv": spec.argv,
        "timeout": format!("{}ms", policy.timeout.as_millis()),
        "grace": format!("{}ms", policy.grace.as_millis()),
        "env": {
            policy.marker.0.clone(): policy.marker.1.clone(),
            crate::strict::SEQ_VAR: spec.seq.to_string(),
        },
    })
    .to_string()
}

impl Driver for SocketDriver {
    fn submit(&mut self, spec: &Spec) -> Result<(), String> {
        let line = request_line(spec, &self.policy);
        self.writer
            .write_all(line.as_bytes())
            .and_then(|_| self.writer.write_all(b"\n"))
            .and_then(|_| self.writer.flush())
            .map_err(|e| format!("daemon connection: {e}"))?;
        self.sent += 1;
        Ok(())
    }

    fn load(&self) -> Option<(usize, usize)> {
        let in_flight = self
            .sent
            .saturating_sub(self.answered.load(Ordering::Relaxed));
        Some((in_flight as usize, 0))
    }

    fn executor_pid(&self) -> i32 {
        self.daemon_pid
    }

    fn metrics(&self) -> Option<MetricsSnapshot> {
        None
    }

    fn shutdown(mut self: Box<Self>) {
        let _ = self.writer.flush();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::behaviour::Behaviour;
    use std::time::Duration;

    #[test]
    fn request_and_response_shapes() {
        let spec = Spec {
            seq: 7,
            behaviour: Behaviour::Exit,
            argv: vec!["/p".into(), "exit".into(), "0".into()],
        };
        let policy = Policy {
            timeout: Duration::from_millis(1000),
            grace: Duration::from_millis(500),
            max_running: 1,
            queue_limit: 1,
            realtime_kills: false,
            marker: ("M".into(), "x".into()),
        };
        let v: serde_json::Value = serde_json::from_str(&request_line(&spec, &policy)).unwrap();
        assert_eq!(v["op"], "submit");
        assert_eq!(v["id"], 7);
        assert_eq!(v["timeout"], "1000ms");
        assert_eq!(v["env"]["M"], "x");
        let e: Response =
            serde_json::from_str(r#"{"type":"error","id":3,"code":"queue_full","message":"full"}"#)
                .unwrap();
        assert!(matches!(e, Response::Error { ref code, .. } if code == "queue_full"));
        let s: Response = serde_json::from_str(r#"{"type":"stats","x":1}"#).unwrap();
        assert!(matches!(s, Response::Other));
    }

    /// The client against a stand-in daemon speaking the protocol: odd ids run
    /// for real through the engine, even ids get `queue_full`.
    #[test]
    fn client_round_trip_against_a_stand_in_daemon() {
        let _serial = crate::invariants::serial();
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("pidring-stress-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let exec = pidring::Executor::builder().max_running(4).build().unwrap();
            let (conn, _) = listener.accept().unwrap();
            let mut out = conn.try_clone().unwrap();
            let mut stats_asks = 0;
            for line in BufReader::new(conn).lines() {
                let Ok(line) = line else { break };
                let req: serde_json::Value = serde_json::from_str(&line).unwrap();
                if req["op"] == "ping" {
                    // The client's first request: proof the connection is up.
                    writeln!(out, "{}", serde_json::json!({"type": "pong"})).unwrap();
                    continue;
                }
                if req["op"] == "stats" {
                    // Then: is it the only client? Not at the first ask.
                    let open = if stats_asks == 0 { 2 } else { 1 };
                    stats_asks += 1;
                    let stats = serde_json::json!({"type": "stats", "id": req["id"],
                        "daemon": {"connections_open": open}});
                    writeln!(out, "{stats}").unwrap();
                    continue;
                }
                assert_eq!(req["env"]["M"], "x");
                let id = req["id"].as_u64().unwrap();
                let reply = if id % 2 == 1 {
                    let argv: Vec<String> = serde_json::from_value(req["argv"].clone()).unwrap();
                    let r = exec.submit(pidring::Check::argv(argv)).unwrap().wait();
                    serde_json::json!({"type": "result", "id": id, "result": r})
                } else {
                    serde_json::json!({"type": "error", "id": id, "code": "queue_full", "message": "full"})
                };
                if writeln!(out, "{reply}").is_err() {
                    break;
                }
            }
            stats_asks
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let policy = Policy {
            timeout: Duration::from_secs(10),
            grace: Duration::from_secs(1),
            max_running: 4,
            queue_limit: 4,
            realtime_kills: false,
            marker: ("M".into(), "x".into()),
        };
        let mut d = SocketDriver::connect(&path, policy, tx, Instant::now()).unwrap();
        assert_eq!(d.executor_pid(), std::process::id() as i32);
        for seq in [1u64, 2] {
            let spec = Spec {
                seq,
                behaviour: Behaviour::Exit,
                argv: vec!["/bin/sh".into(), "-c".into(), "exit 2".into()],
            };
            d.submit(&spec).unwrap();
        }
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(rx.recv_timeout(Duration::from_secs(30)).expect("an answer"));
        }
        Box::new(d).shutdown();
        // It waited until it was the only client: asked again when told of another.
        assert_eq!(server.join().unwrap(), 2);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(got.iter().any(|e| matches!(e,
            Event::Result(r) if r.seq == 1 && r.ending == crate::record::Ending::Exited(2))));
        assert!(got.iter().any(|e| matches!(e,
            Event::Rejected { seq: 2, reason } if reason.starts_with("queue_full"))));
    }
}
