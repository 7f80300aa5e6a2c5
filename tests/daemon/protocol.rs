//! Requests and answers: pipelining, bad input, ids, the client commands.

use super::*;

on_both_backends!(
    concurrent_clients_pipelining,
    bad_input_keeps_connection_usable,
    numeric_ids_are_echoed_as_written,
    client_commands_and_json_logs,
    half_closed_client_gets_every_answer,
);

fn concurrent_clients_pipelining(backend: &str) {
    const CLIENTS: usize = 3;
    const PER_CLIENT: usize = 300;
    let d = Daemon::start(backend, &["--max-running", "64"], None);
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let mut client = d.client();
            std::thread::spawn(move || {
                let mut w = client.w.try_clone().unwrap();
                // Send everything from another thread while this one reads: pipelined.
                let writer = std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    for i in 0..PER_CLIENT {
                        // Alternate string and numeric ids.
                        let id = if i.is_multiple_of(2) {
                            json!(format!("c{c}-{i}"))
                        } else {
                            json!(c * 100_000 + i)
                        };
                        let req = json!({"op": "submit", "id": id,
                            "argv": ["/bin/echo", format!("OK {c}-{i}")],
                            "tags": {"client": c, "n": i}});
                        serde_json::to_writer(&mut buf, &req).unwrap();
                        buf.push(b'\n');
                        if buf.len() > 16 * 1024 {
                            w.write_all(&buf).unwrap();
                            buf.clear();
                        }
                    }
                    w.write_all(&buf).unwrap();
                });
                let mut seen: HashMap<String, usize> = HashMap::new();
                for _ in 0..PER_CLIENT {
                    let r = client.recv();
                    assert_eq!(r["type"], "result", "{r}");
                    let i = r["tags"]["n"].as_u64().unwrap() as usize;
                    assert_eq!(r["tags"]["client"], c);
                    let want_id = if i.is_multiple_of(2) {
                        json!(format!("c{c}-{i}"))
                    } else {
                        json!(c * 100_000 + i)
                    };
                    assert_eq!(r["id"], want_id, "wrong id for {r}");
                    assert_eq!(r["result"]["state"], "OK");
                    assert_eq!(r["result"]["stdout"]["data"], format!("OK {c}-{i}\n"));
                    *seen.entry(r["id"].to_string()).or_default() += 1;
                }
                writer.join().unwrap();
                assert_eq!(seen.len(), PER_CLIENT, "every submit answered");
                assert!(seen.values().all(|n| *n == 1), "answered exactly once");
                // Nothing more comes: a ping is the next line.
                client.send(&json!({"op": "ping", "id": "end"}));
                assert_eq!(client.recv()["type"], "pong");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = d.wait_stats("all results sent", |s| {
        dcounter(s, "results_sent") == (CLIENTS * PER_CLIENT) as u64
    });
    assert_eq!(counter(&s, "completed"), (CLIENTS * PER_CLIENT) as u64);
    assert_eq!(dcounter(&s, "results_dropped"), 0);
}

fn bad_input_keeps_connection_usable(backend: &str) {
    let d = Daemon::start(backend, &[], Some("max_line_bytes = \"4k\"\n"));
    let mut c = d.client();
    let mut other = d.client();
    let expect_error = |c: &mut Client, code: &str| -> Value {
        let r = c.recv();
        assert_eq!(r["type"], "error", "{r}");
        assert_eq!(r["code"], code, "{r}");
        assert!(!r["message"].as_str().unwrap().is_empty());
        r
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("malformed", b"{nope\n".to_vec(), "bad_request"),
        ("not an object", b"[1,2,3]\n".to_vec(), "bad_request"),
        ("missing op", b"{\"id\":1}\n".to_vec(), "bad_request"),
        ("op not a string", b"{\"op\":5}\n".to_vec(), "bad_request"),
        (
            "unknown op",
            b"{\"op\":\"frobnicate\",\"id\":\"u\"}\n".to_vec(),
            "unknown_op",
        ),
        (
            "unknown field",
            b"{\"op\":\"submit\",\"id\":\"f\",\"argv\":[\"/bin/true\"],\"colour\":\"red\"}\n"
                .to_vec(),
            "bad_request",
        ),
        (
            "wrong type",
            b"{\"op\":\"submit\",\"id\":\"t\",\"argv\":\"/bin/true\"}\n".to_vec(),
            "bad_request",
        ),
        (
            "argv and command_line",
            b"{\"op\":\"submit\",\"id\":\"b\",\"argv\":[\"/bin/true\"],\"command_line\":\"/bin/true\"}\n".to_vec(),
            "bad_request",
        ),
        (
            "nothing to run",
            b"{\"op\":\"submit\",\"id\":\"n\"}\n".to_vec(),
            "bad_request",
        ),
        (
            "empty argv",
            b"{\"op\":\"submit\",\"id\":\"e\",\"argv\":[]}\n".to_vec(),
            "bad_request",
        ),
        (
            "zero timeout",
            b"{\"op\":\"submit\",\"id\":\"z\",\"argv\":[\"/bin/true\"],\"timeout\":0}\n".to_vec(),
            "bad_request",
        ),
        (
            "sub-millisecond timeout",
            b"{\"op\":\"submit\",\"id\":\"z\",\"argv\":[\"/bin/true\"],\"timeout\":1e-9}\n".to_vec(),
            "bad_request",
        ),
        (
            "bad duration",
            b"{\"op\":\"submit\",\"id\":\"z\",\"argv\":[\"/bin/true\"],\"timeout\":\"soon\"}\n"
                .to_vec(),
            "bad_request",
        ),
        (
            "submit without id",
            b"{\"op\":\"submit\",\"argv\":[\"/bin/true\"]}\n".to_vec(),
            "bad_request",
        ),
        (
            "invalid utf-8",
            b"{\"op\":\"ping\",\"id\":\"\xff\xfe\"}\n".to_vec(),
            "invalid_utf8",
        ),
        (
            "cancel of nothing",
            b"{\"op\":\"cancel\",\"id\":\"nobody\"}\n".to_vec(),
            "not_found",
        ),
    ];
    let mut by_code: HashMap<&str, u64> = HashMap::new();
    for (i, (what, line, code)) in cases.iter().enumerate() {
        c.send_raw(line);
        let r = expect_error(&mut c, code);
        if *what == "unknown op" {
            assert_eq!(r["id"], "u", "the id is echoed when readable");
        }
        if *what == "sub-millisecond timeout" {
            // Not accepted and then reported as "timed out after 0ms".
            let m = r["message"].as_str().unwrap();
            assert!(m.contains("timeout must be at least 1ms"), "{r}");
        }
        if *what == "unknown field" {
            assert!(r["message"].as_str().unwrap().contains("colour"), "{r}");
            assert_eq!(r["id"], "f");
        }
        *by_code.entry(code).or_default() += 1;
        c.good_submit(&format!("good-{i}"));
    }

    // An oversize line (arriving in pieces), then a good request on the same connection.
    let mut long = b"{\"op\":\"submit\",\"id\":\"long\",\"argv\":[\"/bin/echo\",\"".to_vec();
    long.extend(std::iter::repeat_n(b'x', 100_000));
    long.extend_from_slice(b"\"]}\n");
    for piece in long.chunks(7_000) {
        c.send_raw(piece);
    }
    expect_error(&mut c, "line_too_long");
    *by_code.entry("line_too_long").or_default() += 1;
    c.good_submit("after-long");

    // A duplicate id while the first is in flight, then cancel it.
    c.send(&json!({"op": "submit", "id": "dup", "argv": ["/bin/sleep", "30"]}));
    c.send(&json!({"op": "submit", "id": "dup", "argv": ["/bin/true"]}));
    let r = expect_error(&mut c, "duplicate_id");
    assert_eq!(r["id"], "dup");
    *by_code.entry("duplicate_id").or_default() += 1;
    c.send(&json!({"op": "cancel", "id": "dup"}));
    let r = c.recv();
    assert_eq!(r["type"], "result", "{r}");
    assert_eq!(r["id"], "dup");
    assert_eq!(r["result"]["outcome"]["kind"], "cancelled");
    // The id is free again.
    c.good_submit("dup");

    // A program that cannot start is a result (spawn_failed), not an error.
    c.send(&json!({"op": "submit", "id": "nx", "argv": ["/nonexistent/check_x"]}));
    let r = c.recv();
    assert_eq!(r["type"], "result", "{r}");
    assert_eq!(r["result"]["outcome"]["kind"], "spawn_failed");
    assert_eq!(r["result"]["state"], "UNKNOWN");
    c.good_submit("after-spawn-failure");

    // Another client never noticed any of it.
    other.send(&json!({"op": "ping", "id": 1}));
    let r = other.recv();
    assert_eq!(r["type"], "pong");
    assert_eq!(r["id"], 1);

    let s = d.stats();
    for (code, n) in by_code {
        assert_eq!(
            s["daemon"]["errors_by_code"][code].as_u64(),
            Some(n),
            "{code}: {s:#}"
        );
    }
}

fn numeric_ids_are_echoed_as_written(backend: &str) {
    let d = Daemon::start(backend, &[], None);
    let mut c = d.client();
    // u64::MAX + 1 and + 2: distinct ids, both in flight at once.
    let ids = ["18446744073709551616", "18446744073709551617"];
    for (id, secs) in ids.iter().zip(["0.5", "0"]) {
        c.send_raw(
            format!("{{\"op\":\"submit\",\"id\":{id},\"argv\":[\"/bin/sleep\",\"{secs}\"]}}\n")
                .as_bytes(),
        );
    }
    let mut echoed = Vec::new();
    for _ in ids {
        let line = c.recv_line();
        assert!(line.starts_with("{\"type\":\"result\",\"id\":"), "{line}");
        let id = &line["{\"type\":\"result\",\"id\":".len()..];
        echoed.push(id[..id.find(',').unwrap()].to_string());
    }
    echoed.sort();
    assert_eq!(echoed, ids);
    // Tags too are echoed as written.
    let tags = r#"{"host":"a","big":18446744073709551617,"ratio":1.50,"list":[1e2,-0]}"#;
    c.send_raw(
        format!("{{\"op\":\"submit\",\"id\":\"t\",\"argv\":[\"/bin/true\"],\"tags\":{tags}}}\n")
            .as_bytes(),
    );
    let line = c.recv_line();
    assert!(
        line.starts_with(&format!(
            "{{\"type\":\"result\",\"id\":\"t\",\"tags\":{tags},"
        )),
        "{line}"
    );
    for id in ["1e2", "-0", "1.50", "123456789012345678901234567890"] {
        c.send_raw(format!("{{\"op\":\"ping\",\"id\":{id}}}\n").as_bytes());
        let line = c.recv_line();
        assert!(
            line.starts_with(&format!("{{\"type\":\"pong\",\"id\":{id},")),
            "{line}"
        );
    }
}

fn client_commands_and_json_logs(backend: &str) {
    let d = Daemon::start(backend, &["--log-format", "json"], None);
    let run = |args: &[&str]| {
        // `--socket` right after the subcommand: after `--` it would be argv.
        let out = Command::new(BIN)
            .arg(args[0])
            .arg("--socket")
            .arg(&d.socket)
            .args(&args[1..])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["ping"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("pong"), "{out}");

    // `submit` prints the plugin output and exits with the check's state.
    let (code, out, _) = run(&["submit", "--", "/bin/echo", "OK - fine|t=1"]);
    assert_eq!((code, out.as_str()), (Some(0), "OK - fine|t=1\n"));
    let (code, out, _) = run(&["submit", "--command-line", "/bin/sh -c 'echo WARN; exit 1'"]);
    assert_eq!((code, out.as_str()), (Some(1), "WARN\n"));
    let (code, out, _) = run(&[
        "submit",
        "--timeout",
        "200ms",
        "--grace",
        "100ms",
        "--",
        "/bin/sleep",
        "30",
    ]);
    assert_eq!(code, Some(3));
    assert!(out.contains("timed out"), "{out}");
    let (code, out, _) = run(&["submit", "--json", "--", "/bin/echo", "x"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["type"], "result");

    // `stats`: a table, or JSON.
    let (code, out, _) = run(&["stats"]);
    assert_eq!(code, Some(0));
    for word in ["stage", "p99.9", "total", "submitted", "results sent"] {
        assert!(out.contains(word), "{word} missing in\n{out}");
    }
    let (code, out, _) = run(&["stats", "--json"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["engine"]["counters"]["completed"], 4);

    // A missing daemon: a human message, exit UNKNOWN.
    let out = Command::new(BIN)
        .args(["ping", "--socket"])
        .arg(d.dir.path().join("nothing.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no such file (is `pidring daemon` running?)"),
        "{err}"
    );

    // --log-format json: every log line is a JSON object.
    let log = d.log();
    assert!(log.contains("pidring daemon ready"), "{log}");
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(v["level"].is_string());
    }
}

fn half_closed_client_gets_every_answer(backend: &str) {
    let d = Daemon::start(backend, &[], None);
    let mut c = d.client();
    for i in 0..20 {
        c.send(&json!({"op": "submit", "id": i, "argv": ["/bin/sh", "-c", "sleep 0.2; echo OK"]}));
    }
    // Done sending; keep reading.
    c.w.shutdown(std::net::Shutdown::Write).unwrap();
    let answers = c.recv_all();
    let mut ids: Vec<u64> = answers
        .iter()
        .map(|r| {
            assert_eq!(r["type"], "result", "{r}");
            assert_eq!(r["result"]["state"], "OK");
            r["id"].as_u64().unwrap()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, (0..20).collect::<Vec<_>>());
    let s = d.wait_stats("closed", |s| dcounter(s, "connections_open") == 1);
    assert_eq!(dcounter(&s, "results_dropped"), 0);
}
