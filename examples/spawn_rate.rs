//! Spawn+reap rate of `/bin/true`: pidring vs a plain `std::process::Command`
//! spawn+wait loop, measured in the same run.
//!
//!     cargo run --release --example spawn_rate -- [COUNT] [IN_FLIGHT]

use pidring::{BackendKind, Check, Executor};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5000);
    let in_flight: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(256);

    let t = Instant::now();
    for _ in 0..n {
        std::process::Command::new("/bin/true").status().unwrap();
    }
    let std_rate = n as f64 / t.elapsed().as_secs_f64();
    println!("std::process::Command spawn+wait loop: {std_rate:.0}/s");

    for backend in [BackendKind::IoUring, BackendKind::Epoll] {
        let exec = Executor::builder()
            .backend(backend)
            .max_running(in_flight)
            .build()
            .unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let t = Instant::now();
        for _ in 0..n {
            let tx = tx.clone();
            exec.submit_with(Check::argv(["/bin/true"]), move |r| {
                let _ = tx.send(r.state);
            })
            .unwrap();
        }
        drop(tx);
        let ok = rx.iter().filter(|s| *s == pidring::State::Ok).count();
        assert_eq!(ok, n);
        let rate = n as f64 / t.elapsed().as_secs_f64();
        println!(
            "pidring/{backend} ({in_flight} in flight): {rate:.0}/s = {:.2}x std",
            rate / std_rate
        );
    }
}
