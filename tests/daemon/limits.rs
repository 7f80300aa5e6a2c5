//! Flow control and bounds: queues, bytes per client and in all, connections, descriptors.

use super::*;

on_both_backends!(
    queue_full_then_recovery,
    client_disconnecting_mid_flight,
    client_that_never_reads,
    slow_reader_holds_bounded_bytes,
    the_byte_budget_bounds_all_connections_together,
    connections_past_max_clients_are_refused_with_a_reason,
    idle_connections_cannot_take_the_descriptors_checks_need,
    a_client_hanging_up_while_its_reader_waits_for_room_is_noticed,
    answers_echoing_big_ids_count_against_the_byte_budget,
    finished_connections_leave_no_descriptor_behind,
    idle_connections_hold_no_copy_of_big_answers,
    a_long_path_costs_no_memory_per_entry,
);

fn queue_full_then_recovery(backend: &str) {
    let d = Daemon::start(backend, &["--max-running", "2", "--queue-limit", "2"], None);
    let mut c = d.client();
    for i in 0..4 {
        c.send(&json!({"op": "submit", "id": i, "argv": ["/bin/sleep", "30"]}));
    }
    let start = Instant::now();
    c.send(&json!({"op": "submit", "id": 99, "argv": ["/bin/true"]}));
    let r = c.recv();
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["code"], "queue_full");
    assert_eq!(r["id"], 99);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "queue_full must be immediate, took {:?}",
        start.elapsed()
    );
    // Load drops: cancel the sleepers, each answered once.
    for i in 0..4 {
        c.send(&json!({"op": "cancel", "id": i}));
    }
    let mut ids: Vec<u64> = (0..4)
        .map(|_| {
            let r = c.recv();
            assert_eq!(r["type"], "result", "{r}");
            assert_eq!(r["result"]["outcome"]["kind"], "cancelled");
            r["id"].as_u64().unwrap()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, [0, 1, 2, 3]);
    // Recovered.
    c.good_submit("after");
    let s = d.stats();
    assert_eq!(s["daemon"]["errors_by_code"]["queue_full"], 1);
    assert_eq!(counter(&s, "rejected"), 1);
}

fn client_disconnecting_mid_flight(backend: &str) {
    let d = Daemon::start(backend, &[], None);
    {
        let mut c = d.client();
        for i in 0..5 {
            c.send(&json!({"op": "submit", "id": i, "argv": ["/bin/sleep", "30"]}));
        }
        d.wait_stats("5 running", |s| s["engine"]["running"] == 5);
        // The connection drops here with 5 checks in flight.
    }
    let s = d.wait_stats("results dropped", |s| {
        dcounter(s, "results_dropped") == 5 && s["engine"]["running"] == 0
    });
    assert_eq!(dcounter(&s, "clients_gone_in_flight"), 1);
    assert_eq!(counter(&s, "cancelled"), 5);
    assert_eq!(counter(&s, "completed"), 5);
    // Killed and reaped: the daemon has no children left, and no zombie.
    let end = Instant::now() + PATIENCE;
    while !children_of(d.pid()).is_empty() {
        assert!(
            Instant::now() < end,
            "children left: {:?}",
            children_of(d.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Others are unaffected.
    d.client().good_submit("still-fine");
}

/// From a thread, submit 200 checks over `conn` that print ~60 KB each (a
/// socket buffer fills after a few results), never reading an answer;
/// the thread ends with how many were written before the daemon hung up.
fn submit_big_outputs(conn: &UnixStream) -> std::thread::JoinHandle<usize> {
    let mut w = conn.try_clone().unwrap();
    std::thread::spawn(move || {
        for i in 0..200 {
            let req = json!({"op": "submit", "id": i,
                "argv": ["/bin/sh", "-c", "head -c 60000 /dev/zero | tr '\\0' a"]});
            let mut line = serde_json::to_vec(&req).unwrap();
            line.push(b'\n');
            if w.write_all(&line).is_err() {
                return i; // the daemon dropped us
            }
        }
        200
    })
}

fn client_that_never_reads(backend: &str) {
    let d = Daemon::start(
        backend,
        &[],
        Some("max_client_queue = 8\nclient_write_timeout = \"1s\"\n"),
    );
    let stuck = UnixStream::connect(&d.socket).unwrap();
    let writer = submit_big_outputs(&stuck);
    let s = d.wait_stats("stuck client dropped", |s| {
        dcounter(s, "clients_dropped_stuck") == 1
    });
    // Backpressure: the daemon stopped reading long before all 200 submits.
    let accepted = dcounter(&s, "submits_accepted");
    assert!(accepted < 100, "daemon kept reading a stuck client: {s:#}");
    let log = d.log();
    assert!(log.contains("dropping client"), "{log}");
    // Everything accepted is accounted for: sent (into the socket buffer) or dropped.
    let s = d.wait_stats("accounted", |s| {
        s["engine"]["running"] == 0
            && s["engine"]["queued"] == 0
            && dcounter(s, "results_sent") + dcounter(s, "results_dropped")
                == dcounter(s, "submits_accepted")
    });
    assert!(dcounter(&s, "results_dropped") > 0);
    drop(stuck);
    let _ = writer.join();
    // The daemon is fine for everyone else.
    d.client().good_submit("other");
}

/// A daemon whose connections may hold `max_client_bytes` (requests of at
/// most 64 KiB, output caps of at most `max_output_cap`), plus `extra` config.
fn with_byte_budget(
    backend: &str,
    max_client_bytes: &str,
    max_output_cap: &str,
    extra: &str,
) -> Daemon {
    let config = format!(
        "max_client_bytes = {max_client_bytes:?}\nmax_output_cap = {max_output_cap:?}\n\
         max_line_bytes = \"64KiB\"\n{extra}"
    );
    Daemon::start(backend, &[], Some(&config))
}

fn slow_reader_holds_bounded_bytes(backend: &str) {
    // Slots alone (4096 by default) would let a client that does not read
    // hold 4096 results of two 64 KiB streams each: 512 MiB.
    let d = with_byte_budget(
        backend,
        "1MiB",
        "256KiB",
        "client_write_timeout = \"60s\"\n",
    );
    // Asking for more than max_output_cap is refused, and says why.
    let mut c = d.client();
    c.send(&json!({"op": "submit", "id": "big", "argv": ["/bin/true"], "output_cap": "100GiB"}));
    let r = c.recv();
    assert_eq!(r["code"], "bad_request", "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("max_output_cap"),
        "{r}"
    );

    let slow = UnixStream::connect(&d.socket).unwrap();
    let writer = submit_big_outputs(&slow);
    // Everything accepted has run; what is not written stays held.
    // At least what the budget holds is accepted (5 × ~195 KiB in 1 MiB).
    let s = d.wait_stats("the slow client's checks done", |s| {
        dcounter(s, "submits_accepted") >= 5
            && s["engine"]["running"] == 0
            && s["engine"]["queued"] == 0
    });
    // A few more than 5 got in while earlier results went into the
    // socket's buffer; without the budget all 200 would be.
    let accepted = dcounter(&s, "submits_accepted");
    assert!(
        (5..40).contains(&accepted),
        "{accepted} accepted from a client that reads nothing: {s:#}"
    );
    // The limit is per connection: another client is served meanwhile.
    d.client().good_submit("other");
    drop(slow);
    let _ = writer.join();
    d.wait_stats("everything accounted", |s| {
        s["engine"]["running"] == 0
            && dcounter(s, "results_sent") + dcounter(s, "results_dropped")
                == dcounter(s, "submits_accepted")
    });
}

fn the_byte_budget_bounds_all_connections_together(backend: &str) {
    // Three clients that read nothing, 4 MiB each but 1 MiB for all: 5
    // checks (~195 KiB each) in the budget, plus at most ~3 results each
    // socket's buffer takes: 6 measured, where 4 MiB each let 63 in.
    let d = with_byte_budget(
        backend,
        "4MiB",
        "256KiB",
        "max_total_bytes = \"1MiB\"\nclient_write_timeout = \"60s\"\n",
    );
    let clients: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    let writers: Vec<_> = clients.iter().map(submit_big_outputs).collect();
    d.wait_stats("the first checks accepted", |s| {
        dcounter(s, "submits_accepted") >= 5
    });
    // Watch a while: the readers wait for room instead of reading on.
    let end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        let s = d.stats();
        let accepted = dcounter(&s, "submits_accepted");
        assert!(
            accepted < 30,
            "{accepted} accepted from three clients that read nothing: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for c in &clients {
        c.shutdown(std::net::Shutdown::Both).unwrap();
    }
    for w in writers {
        let _ = w.join();
    }
    // Room comes back once they are gone.
    d.wait_stats("the budget given back", |s| s["engine"]["running"] == 0);
    d.client().good_submit("after");
}

fn a_client_hanging_up_while_its_reader_waits_for_room_is_noticed(backend: &str) {
    // Three sleeps fit in 600 KiB (~195 KiB each); the reader waits for
    // room for the fourth, so it never reads the EOF. The hangup must be
    // seen anyway, and the three cancelled, not left to their 600 s.
    let d = with_byte_budget(backend, "600KiB", "64KiB", "");
    let mut c = d.client();
    for i in 0..6 {
        c.send(&json!({"op": "submit", "id": i, "argv": ["sleep", "600"], "timeout": "600s"}));
    }
    d.wait_stats("three running, the reader waiting", |s| {
        s["engine"]["running"] == 3 && dcounter(s, "submits_accepted") == 3
    });
    drop(c);
    // Noticed by the waiting reader, or by the writer failing to answer:
    // either way the three are cancelled.
    let s = d.wait_stats("the hangup noticed and the checks cancelled", |s| {
        s["engine"]["running"] == 0 && counter(s, "cancelled") == 3
    });
    assert_eq!(dcounter(&s, "submits_accepted"), 3, "{s:#}");
    assert!(zombie_children(d.pid()).is_empty());
}

fn answers_echoing_big_ids_count_against_the_byte_budget(backend: &str) {
    // A pong echoes its 60 KB id: ~180 KiB budgeted each, so 1 MiB holds
    // five unwritten; a client that reads none must not get all 40 answered
    // into the daemon's memory.
    let d = with_byte_budget(backend, "1MiB", "64KiB", "client_write_timeout = \"60s\"\n");
    let quiet = UnixStream::connect(&d.socket).unwrap();
    let mut w = quiet.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..40 {
            let id = format!("{i}-{}", "x".repeat(60_000));
            let mut line = serde_json::to_vec(&json!({"op": "ping", "id": id})).unwrap();
            line.push(b'\n');
            if w.write_all(&line).is_err() {
                return;
            }
        }
    });
    // `requests` counts these stats requests too: subtract them.
    let mut c = d.client();
    let mut asked = 0;
    let mut pings_read = || {
        c.send(&json!({"op": "stats", "id": "s"}));
        asked += 1;
        let s = c.recv();
        dcounter(&s, "requests") - asked
    };
    let end = Instant::now() + PATIENCE;
    while pings_read() < 5 {
        assert!(Instant::now() < end, "the pings were never read");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Watch a while: the reader waits for room instead of reading on.
    let end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        let n = pings_read();
        assert!(n < 20, "{n} pings answered into memory unbudgeted");
        std::thread::sleep(Duration::from_millis(50));
    }
    quiet.shutdown(std::net::Shutdown::Both).unwrap(); // ends the blocked sender too
    drop(quiet);
    let _ = sender.join();
}

fn connections_past_max_clients_are_refused_with_a_reason(backend: &str) {
    let d = Daemon::start(backend, &[], Some("max_clients = 2\n"));
    let ping = |c: &mut Client| {
        c.send(&json!({"op": "ping", "id": "p"}));
        let r = c.recv();
        assert_eq!(r["type"], "pong", "{r}");
    };
    // Until the daemon has seen a closed connection end, it still counts.
    let only_one_open = |a: &mut Client| {
        let end = Instant::now() + PATIENCE;
        loop {
            a.send(&json!({"op": "stats", "id": "s"}));
            let s = a.recv();
            if dcounter(&s, "connections_open") == 1 {
                return;
            }
            assert!(Instant::now() < end, "connections never counted out: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut a = d.client();
    only_one_open(&mut a); // the readiness probe's is gone
    let mut b = d.client();
    ping(&mut b);
    // The third is told why, then closed.
    let mut c = d.client();
    let r = c.recv();
    assert_eq!(r["code"], "too_many_clients", "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("max_clients"),
        "{r}"
    );
    assert!(c.recv_all().is_empty());
    // Once one goes, a new one is served.
    drop(b);
    only_one_open(&mut a);
    ping(&mut d.client());
    a.send(&json!({"op": "stats", "id": "s"}));
    let s = a.recv();
    assert_eq!(s["daemon"]["errors_by_code"]["too_many_clients"], 1, "{s}");
}

fn idle_connections_cannot_take_the_descriptors_checks_need(backend: &str) {
    // RLIMIT_NOFILE 512 cannot hold max_running = 1024 checks and
    // max_clients = 1024 connections: the daemon lowers max_clients (and
    // says so), so idle connections get `too_many_clients` rather than the
    // descriptors checks need, and `accept` never fails for want of them
    // (a client left unanswered in the backlog).
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=512:512", "--", BIN]);
    let d = Daemon::start_via(cmd, backend, &[], None);
    assert!(d.log().contains("max_clients lowered"), "{}", d.log());
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..110 {
        match try_connection(&d) {
            Ok(c) => held.push(c),
            Err(r) => {
                assert_eq!(r["code"], "too_many_clients", "{r}");
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0 && !held.is_empty(),
        "{} held, {refused} refused",
        held.len()
    );
    // One connection ends; a new client gets its place.
    drop(held.pop());
    let end = Instant::now() + PATIENCE;
    let mut c = loop {
        match try_connection(&d) {
            Ok(c) => break c,
            Err(r) => assert!(Instant::now() < end, "never served again: {r}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // With every other connection still open, checks get their descriptors.
    for i in 0..20 {
        c.send(&json!({"op": "submit", "id": i, "argv": ["/bin/sh", "-c", "sleep 0.2; echo ok"]}));
    }
    for _ in 0..20 {
        let r = c.recv();
        assert_eq!(r["type"], "result", "{r}");
        assert_eq!(r["result"]["outcome"]["kind"], "exited", "{r}");
        assert_eq!(r["result"]["stdout"]["data"], "ok\n", "{r}");
    }
}

fn finished_connections_leave_no_descriptor_behind(backend: &str) {
    // Started without the usual readiness probe (a connection of its own):
    // ready is the log line written once the executor exists, before the
    // first accept, so the count below holds no client connection at all.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("pidring.sock");
    let d = Daemon::spawn_on(Command::new(BIN), dir, socket, backend, &[], None);
    let end = Instant::now() + PATIENCE;
    while !d.log().contains("pidring daemon ready") {
        assert!(Instant::now() < end, "daemon not ready:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .map(|e| e.count())
            .unwrap_or(0)
    };
    let before = fds();
    for i in 0..30 {
        let mut c = d.client();
        c.send(&json!({"op": "submit", "id": i, "argv": ["/bin/true"]}));
        assert_eq!(c.recv()["type"], "result");
    }
    // Each connection's socket closes once its threads are done (within the
    // daemon's prune interval), not at the next accept or never.
    let end = Instant::now() + PATIENCE;
    while fds() != before && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        fds(),
        before,
        "the daemon kept descriptors of finished connections"
    );
}

fn idle_connections_hold_no_copy_of_big_answers(backend: &str) {
    // A result with 1 MiB of control bytes on each stream (output_cap at the
    // default max_output_cap) is ~18 MiB of JSON: `\u0001` is 6 bytes, and
    // stdout, stderr and the plugin text are each escaped. Serialised whole
    // into the connection's write buffer, which kept its capacity while the
    // connection lived, 10 idle clients held ~180 MiB (and peaked higher),
    // counted by no budget.
    const CLIENTS: usize = 10;
    const MIB: u64 = 1024;
    let d = Daemon::start(backend, &[], None);
    let (rss0, hwm0) = (vm_kib(d.pid(), "VmRSS"), vm_kib(d.pid(), "VmHWM"));
    let script = "head -c 1048576 /dev/zero | tr '\\0' '\\1'; \
                  head -c 1048576 /dev/zero | tr '\\0' '\\1' >&2";
    let mut clients: Vec<Client> = (0..CLIENTS)
        .map(|i| {
            let mut c = d.client();
            c.send(
                &json!({"op": "submit", "id": i, "argv": ["/bin/sh", "-c", script],
                "output_cap": "1MiB"}),
            );
            c
        })
        .collect();
    // Every result arrives whole.
    for c in &mut clients {
        let line = c.recv_line();
        assert!(line.len() > 18 << 20, "{} bytes", line.len());
        let r: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(r["type"], "result");
        for stream in ["stdout", "stderr"] {
            let data = r["result"][stream]["data"].as_str().unwrap();
            assert_eq!(data.len(), 1 << 20, "{stream}");
            assert!(data.bytes().all(|b| b == 1), "{stream}");
        }
    }
    d.wait_stats("every result written", |s| {
        dcounter(s, "results_sent") == CLIENTS as u64
    });
    // The clients are idle, their connections open: nothing of their
    // answers is left, and no connection ever held a whole line (the
    // results themselves, ~3 MiB each, are what the budget counts).
    let (rss, hwm) = (vm_kib(d.pid(), "VmRSS"), vm_kib(d.pid(), "VmHWM"));
    assert!(
        rss < rss0 + 40 * MIB,
        "{CLIENTS} idle connections hold {} MiB (from {} MiB)",
        rss / MIB,
        rss0 / MIB
    );
    assert!(
        hwm < hwm0 + CLIENTS as u64 * 8 * MIB,
        "peak {} MiB (from {} MiB) for {CLIENTS} results",
        hwm / MIB,
        hwm0 / MIB
    );
    drop(clients);
}

fn a_long_path_costs_no_memory_per_entry(backend: &str) {
    // A 1 MiB request: a PATH of a million `:` and a 250-byte bare name.
    // One candidate string per PATH entry came to ~300 MB of daemon memory
    // per check (and ~4 s of failed execve calls in its child), where the
    // byte budget counted the ~1 MiB line.
    const CHECKS: usize = 4;
    const MIB: u64 = 1024;
    let d = Daemon::start(backend, &[], None);
    let hwm0 = vm_kib(d.pid(), "VmHWM");
    let mut c = d.client();
    let path = ":".repeat(1_000_000);
    for i in 0..CHECKS {
        c.send(&json!({"op": "submit", "id": i, "argv": ["n".repeat(250)],
            "env": {"PATH": path}, "timeout": "60s"}));
    }
    for _ in 0..CHECKS {
        let r = c.recv();
        assert_eq!(r["result"]["outcome"]["kind"], "spawn_failed", "{r}");
        let message = r["result"]["outcome"]["message"].as_str().unwrap();
        assert!(message.starts_with("cannot find nnn"), "{message}");
    }
    let hwm = vm_kib(d.pid(), "VmHWM");
    assert!(
        hwm < hwm0 + 64 * MIB,
        "peak {} MiB (from {} MiB) for {CHECKS} requests of 1 MiB",
        hwm / MIB,
        hwm0 / MIB
    );
}
