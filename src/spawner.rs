//! The spawner pool: a few threads that run `posix_spawn` for the loop.
//!
//! `posix_spawn` blocks its caller until the child has exec'd (≈0.3–0.5 ms of
//! kernel work); on the loop thread that would stall every other check and cap
//! the rate at one core. Spawners only create the child and hand its fds back;
//! the loop stays the single owner of every check's state.

use crate::check::Prepared;
use crate::spawn::{self, Child, SpawnFailure};
use crate::waker::Waker;
use crossbeam_channel::{Receiver, Sender};
use rustix::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// A request to create one check's child.
pub(crate) struct SpawnJob {
    /// The check's slot in the loop's slab.
    pub slot: usize,
    /// The slot's generation, so a late answer never lands on a reused slot.
    pub generation: u32,
    /// What to run.
    pub prepared: Prepared,
}

/// The answer to a `SpawnJob`.
pub(crate) struct SpawnDone {
    /// As in the job.
    pub slot: usize,
    /// As in the job.
    pub generation: u32,
    /// The child, or why there is none.
    pub result: Result<Child, SpawnFailure>,
    /// When a spawner took the job off the queue.
    pub picked: Instant,
}

/// Lets the orphan scan see a moment when no spawn is in progress.
///
/// Spawners hold it shared from before `posix_spawn` until their answer is
/// sent; the loop's scan takes it exclusively without ever blocking
/// (`try_exclusive`), so every child of ours is then known to the loop.
/// Under saturating load the scan may keep missing; after a few misses it
/// asks spawners to pause between jobs until it got its turn.
#[derive(Default)]
pub(crate) struct SpawnGate {
    lock: RwLock<()>,
    pause: AtomicBool,
}

impl SpawnGate {
    /// Spawner side: wait out a requested pause, then hold the gate shared.
    fn enter(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        while self.pause.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_micros(200));
        }
        self.lock.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Loop side: exclusive access if no spawn is in progress right now.
    pub fn try_exclusive(&self) -> Option<RwLockWriteGuard<'_, ()>> {
        self.lock.try_write().ok()
    }

    /// Ask spawners to stop taking new jobs until `resume`.
    pub fn pause(&self) {
        self.pause.store(true, Ordering::Release);
    }

    /// Let spawners go on.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
    }
}

/// Start `threads` spawner threads; they exit when `jobs` is disconnected.
pub(crate) fn start(
    threads: usize,
    jobs: Receiver<SpawnJob>,
    done: Sender<SpawnDone>,
    waker: Arc<Waker>,
    devnull: Arc<OwnedFd>,
    gate: Arc<SpawnGate>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    (0..threads.max(1))
        .map(|i| {
            let (jobs, done, waker, devnull, gate) = (
                jobs.clone(),
                done.clone(),
                waker.clone(),
                devnull.clone(),
                gate.clone(),
            );
            std::thread::Builder::new()
                .name(format!("pidring-spawn-{i}"))
                .spawn(move || {
                    for job in jobs.iter() {
                        // Held until the answer is sent: see `SpawnGate`.
                        let _gate = gate.enter();
                        let picked = Instant::now();
                        let result = spawn::spawn(&job.prepared, devnull.as_fd());
                        // Free the argv/env strings here, not on the loop.
                        drop(job.prepared);
                        let msg = SpawnDone {
                            slot: job.slot,
                            generation: job.generation,
                            result,
                            picked,
                        };
                        if let Err(lost) = done.send(msg) {
                            // The loop is gone (it only goes after every
                            // dispatched spawn came back, so this is a bug):
                            // do not leave the child unreaped.
                            if let Ok(child) = lost.0.result {
                                tracing::error!("spawner: loop gone; killing orphaned check child");
                                spawn::kill_and_reap(child);
                            }
                            return;
                        }
                        waker.wake();
                    }
                })
        })
        .collect()
}
