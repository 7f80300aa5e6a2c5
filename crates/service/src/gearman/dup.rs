//! `dupserver=`: a copy of every result to other gearmand servers (a second
//! core, a reporting system). Best effort, as in mod_gearman: each server
//! has a bounded backlog; what does not fit is dropped and counted, and a
//! server that is down never slows the checks.

use super::packet::{self, Decoder, Kind};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// At a stop, how long what is queued may still be sent.
const STOP_FLUSH: Duration = Duration::from_secs(2);

/// Callbacks that count what happened to a copy.
pub struct DupCounters {
    /// A copy was accepted by a dupserver.
    pub sent: Box<dyn Fn() + Send + Sync>,
    /// A copy was dropped (backlog full, or still unsent at stop).
    pub dropped: Box<dyn Fn() + Send + Sync>,
}

/// The dupserver threads: [`DupServers::sender`] takes SUBMIT_JOB_BG packets.
pub struct DupServers {
    tx: Sender<Vec<u8>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for DupServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DupServers")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl DupServers {
    /// One thread per server; every packet goes to each of them.
    pub fn start(
        addrs: &[String],
        backlog: usize,
        counters: DupCounters,
    ) -> std::io::Result<DupServers> {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(backlog.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(counters);
        // A fan-out: the shared channel feeds one bounded channel per server.
        let mut outs = Vec::new();
        let mut threads = Vec::new();
        for addr in addrs {
            let (otx, orx) = crossbeam_channel::bounded::<Vec<u8>>(backlog.max(1));
            outs.push(otx);
            let (addr, stop, counters) = (addr.clone(), stop.clone(), counters.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("pidring-gm-dup".into())
                    .spawn(move || serve(&addr, orx, &stop, &counters))?,
            );
        }
        let (stop2, counters2) = (stop.clone(), counters.clone());
        threads.push(
            std::thread::Builder::new()
                .name("pidring-gm-dupfan".into())
                .spawn(move || fan_out(rx, outs, &stop2, &counters2))?,
        );
        Ok(DupServers { tx, stop, threads })
    }

    /// Where the worker puts copies (`try_send`: never blocks a connection).
    pub fn sender(&self) -> Sender<Vec<u8>> {
        self.tx.clone()
    }

    /// Start ending: send what is queued for up to 2 s; [`DupServers::stop`] waits for that.
    pub fn begin_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Send what is queued for up to 2 s, then end the threads.
    pub fn stop(mut self) {
        self.begin_stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn fan_out(rx: Receiver<Vec<u8>>, outs: Vec<Sender<Vec<u8>>>, stop: &AtomicBool, c: &DupCounters) {
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(pkt) => {
                for o in &outs {
                    if o.try_send(pkt.clone()).is_err() {
                        (c.dropped)();
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) if !stop.load(Ordering::SeqCst) => {}
            _ => return,
        }
    }
}

fn serve(addr: &str, rx: Receiver<Vec<u8>>, stop: &AtomicBool, c: &DupCounters) {
    let mut conn: Option<TcpStream> = None;
    let mut backoff = Duration::from_millis(100);
    let mut stop_at: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            let t = *stop_at.get_or_insert_with(Instant::now);
            if rx.is_empty() || t.elapsed() > STOP_FLUSH {
                for _ in rx.try_iter() {
                    (c.dropped)();
                }
                return;
            }
        }
        let pkt = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(p) => p,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        // Two tries: a fresh connection after a broken one.
        let mut sent = false;
        for _ in 0..2 {
            if conn.is_none() {
                match connect(addr) {
                    Ok(s) => {
                        conn = Some(s);
                        backoff = Duration::from_millis(100);
                    }
                    Err(e) => {
                        tracing::debug!(dupserver = %addr, "cannot connect: {e}");
                        break;
                    }
                }
            }
            match submit(conn.as_mut().expect("connected"), &pkt) {
                Ok(()) => {
                    sent = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(dupserver = %addr, "result copy not accepted: {e}; reconnecting");
                    conn = None;
                }
            }
        }
        if sent {
            (c.sent)();
        } else {
            (c.dropped)();
            if !stop.load(Ordering::SeqCst) {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let a = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "no address"))?;
    let s = TcpStream::connect_timeout(&a, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Send one SUBMIT_JOB_BG and wait for its JOB_CREATED.
pub(crate) fn submit(s: &mut TcpStream, pkt: &[u8]) -> std::io::Result<()> {
    s.write_all(pkt)?;
    let mut d = Decoder::new();
    let mut buf = [0u8; 4096];
    loop {
        match d.next_packet() {
            Ok(Some(p)) if p.kind == Kind::JobCreated => return Ok(()),
            Ok(Some(p)) if p.kind == Kind::Error => {
                return Err(std::io::Error::other(format!("gearmand: {}", p.text(1))));
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Err(ErrorKind::UnexpectedEof.into());
                }
                d.feed(&buf[..n]);
            }
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
    }
}

/// A SUBMIT_JOB_BG packet.
pub fn submit_bg_packet(queue: &str, data: &[u8]) -> Vec<u8> {
    packet::request(Kind::SubmitJobBg, &[queue.as_bytes(), b"", data])
}
