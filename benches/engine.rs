//! Criterion micro-benchmarks of the engine: spawn+reap of `/bin/true` at 1,
//! 64 and 1,024 in flight, a check with 64 KiB of output, and a timed-out
//! check (SIGTERM → exit → result).
//!
//! Sample counts and measurement times are kept small so `cargo bench --bench
//! engine` finishes in a few minutes on a 2-core machine; spawning is kernel
//! work whose run-to-run noise dwarfs what more samples would resolve.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pidring::{Check, Executor, Outcome};
use std::time::Duration;

/// One executor for all benchmarks (threads and ring set up once).
fn executor() -> Executor {
    Executor::builder()
        .max_running(1024)
        .build()
        .expect("executor starts")
}

/// Submit `n` `/bin/true` checks at once and wait for all of them.
fn run_batch(exec: &Executor, n: usize) {
    let pending: Vec<_> = (0..n)
        .map(|_| exec.submit(Check::argv(["/bin/true"])).expect("submit"))
        .collect();
    for p in pending {
        let r = p.wait();
        assert!(matches!(r.outcome, Outcome::Exited { code: 0 }), "{r:?}");
    }
}

fn spawn_reap(c: &mut Criterion) {
    let exec = executor();
    let mut g = c.benchmark_group("spawn_reap_true");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for n in [1usize, 64, 1024] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("in_flight_{n}"), |b| b.iter(|| run_batch(&exec, n)));
    }
    g.finish();
}

fn output_64k(c: &mut Criterion) {
    let exec = executor();
    let mut g = c.benchmark_group("output");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Bytes(64 * 1024));
    g.bench_function("64KiB_stdout", |b| {
        b.iter(|| {
            let check =
                Check::argv(["/usr/bin/head", "-c", "65536", "/dev/zero"]).output_cap(64 * 1024);
            let r = exec.submit(check).expect("submit").wait();
            assert_eq!(r.stdout.data.len(), 64 * 1024, "{:?}", r.outcome);
        })
    });
    g.finish();
}

fn timed_out(c: &mut Criterion) {
    let exec = executor();
    let timeout = Duration::from_millis(20);
    let mut g = c.benchmark_group("timeout");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    // Measures deadline → SIGTERM → exit → result delivered (the timeout itself excluded).
    g.bench_function("term_to_result", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let check = Check::argv(["/bin/sleep", "30"])
                    .timeout(timeout)
                    .grace(Duration::from_secs(5));
                let r = exec.submit(check).expect("submit").wait();
                assert!(
                    matches!(
                        r.outcome,
                        Outcome::TimedOut {
                            escalated: false,
                            ..
                        }
                    ),
                    "{r:?}"
                );
                total += r.timings.run.saturating_sub(timeout) + r.timings.exit_to_delivered;
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, spawn_reap, output_64k, timed_out);
criterion_main!(benches);
