//! The loop's wake-up: an eventfd that submitters write to.

use rustix::event::{EventfdFlags, eventfd};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Wakes the event loop from any thread; coalesces bursts into one write.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
    pending: AtomicBool,
}

impl Waker {
    /// A non-blocking, close-on-exec eventfd.
    pub fn new() -> std::io::Result<Waker> {
        Ok(Waker {
            fd: eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
            pending: AtomicBool::new(false),
        })
    }

    /// Make the loop's next (or current) wait return.
    pub fn wake(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            // EAGAIN means the counter is already huge: the loop will wake anyway.
            let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
        }
    }

    /// Called by the loop when the eventfd fired, *before* it drains its
    /// channels, so that a message sent after the drain wakes it again.
    pub fn reset(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut buf);
        self.pending.store(false, Ordering::SeqCst);
    }

    /// The fd the backend watches.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
