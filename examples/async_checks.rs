//! Await checks from async code, with no thread per waiting check:
//! `cargo run --example async_checks` (tokio is a dev-dependency only; any
//! runtime works, `Pending` is a plain `std::future::Future`).

use pidring::{Check, Executor};
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let exec = Executor::builder().max_running(64).build()?;
    let checks = [
        Check::argv(["/bin/echo", "OK - disk fine|free=42GB"]),
        Check::argv(["/bin/sh", "-c", "echo 'WARNING - load high'; exit 1"]),
        Check::argv(["/bin/sleep", "10"]).timeout(Duration::from_millis(500)),
    ];
    let pending: Vec<_> = checks
        .into_iter()
        .map(|c| exec.submit(c))
        .collect::<Result<_, _>>()?;
    for p in pending {
        let r = p.await;
        println!("{:<8} {}", r.state.as_str(), r.summary());
    }
    exec.shutdown();
    Ok(())
}
