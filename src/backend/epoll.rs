//! The epoll backend: `EPOLLONESHOT` readiness, re-armed with `EPOLL_CTL_MOD`.

use rustix::event::epoll;
use rustix::fd::{BorrowedFd, OwnedFd};
use std::io;
use std::time::Duration;

/// Most events taken from the kernel per `epoll_wait`.
const BATCH: usize = 1024;

/// An epoll instance.
pub(crate) struct Epoll {
    epoll: OwnedFd,
    events: Vec<epoll::Event>,
}

impl Epoll {
    /// Create the epoll fd (O_CLOEXEC).
    pub fn new() -> io::Result<Epoll> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        tracing::debug!("epoll backend ready");
        Ok(Epoll {
            epoll,
            events: Vec::with_capacity(BATCH),
        })
    }

    /// Arm a oneshot readability watch (ADD the first time, MOD after).
    pub fn watch(&mut self, fd: BorrowedFd<'_>, token: u64, first: bool) -> io::Result<()> {
        let flags = epoll::EventFlags::IN | epoll::EventFlags::ONESHOT;
        let data = epoll::EventData::new_u64(token);
        if first {
            epoll::add(&self.epoll, fd, data, flags)?;
        } else {
            epoll::modify(&self.epoll, fd, data, flags)?;
        }
        Ok(())
    }

    /// Nothing to cancel: the loop holds the only reference to every watched
    /// file, so closing the fd removes it from the interest list.
    pub fn unwatch(&mut self, _fd: BorrowedFd<'_>) {}

    /// `epoll_wait` with a millisecond timeout rounded up (never early).
    pub fn wait(&mut self, fired: &mut Vec<u64>, timeout: Option<Duration>) -> io::Result<()> {
        let ts = timeout.map(|d| {
            let ms = d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i64;
            rustix::time::Timespec {
                tv_sec: ms / 1000,
                tv_nsec: (ms % 1000) * 1_000_000,
            }
        });
        self.events.clear();
        match epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(&mut self.events),
            ts.as_ref(),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        fired.extend(self.events.iter().map(|e| e.data.u64()));
        Ok(())
    }
}
