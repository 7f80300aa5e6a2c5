//! The epoll backend: `EPOLLONESHOT` readiness, re-armed with `EPOLL_CTL_MOD`;
//! a timerfd times the waits to the nanosecond.

use rustix::event::epoll;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
use std::io;
use std::time::Duration;

/// Most events taken from the kernel per `epoll_wait`.
const BATCH: usize = 1024;
use super::Batch;
use crate::token::BACKEND_OWN as TIMER;
/// A zero `Timespec`: "just look" as a timeout, "disarm" for a timer.
const ZERO: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 0,
};

/// An epoll instance.
pub(crate) struct Epoll {
    epoll: OwnedFd,
    events: Vec<epoll::Event>,
    /// Times a wait to the nanosecond: `epoll_wait` counts whole
    /// milliseconds (a deadline would fire up to 1 ms late), and
    /// `epoll_pwait2` is newer (5.11) than some container seccomp profiles.
    /// `None` if the kernel refused one: waits round up to milliseconds.
    timer: Option<OwnedFd>,
    /// `timer` is set (so a wait without a timeout must disarm it).
    timer_armed: bool,
}

impl Epoll {
    /// Create the epoll fd (O_CLOEXEC) and its timerfd.
    pub fn new() -> io::Result<Epoll> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let timer = rustix::time::timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK,
        )
        .and_then(|timer| {
            let data = epoll::EventData::new_u64(TIMER);
            epoll::add(&epoll, &timer, data, epoll::EventFlags::IN).map(|()| timer)
        });
        let timer = match timer {
            Ok(timer) => Some(timer),
            Err(e) => {
                tracing::warn!("no timerfd ({e}): epoll timeouts are rounded up to milliseconds");
                None
            }
        };
        tracing::debug!("epoll backend ready");
        Ok(Epoll {
            epoll,
            events: Vec::with_capacity(BATCH),
            timer,
            timer_armed: false,
        })
    }

    /// Arm a oneshot readability watch (ADD the first time, MOD after).
    pub fn watch(&mut self, fd: BorrowedFd<'_>, token: u64, first: bool) -> io::Result<()> {
        self.arm(fd, token, first, epoll::EventFlags::IN)
    }

    /// Arm a oneshot `PRI` watch (a cgroup file changed; ADD the first time, MOD after).
    pub fn watch_pri(&mut self, fd: BorrowedFd<'_>, token: u64, first: bool) -> io::Result<()> {
        self.arm(fd, token, first, epoll::EventFlags::PRI)
    }

    /// ADD or MOD a oneshot registration for `events`.
    fn arm(
        &mut self,
        fd: BorrowedFd<'_>,
        token: u64,
        first: bool,
        events: epoll::EventFlags,
    ) -> io::Result<()> {
        let flags = events | epoll::EventFlags::ONESHOT;
        let data = epoll::EventData::new_u64(token);
        if first {
            match epoll::add(&self.epoll, fd, data, flags) {
                // Still registered from an earlier watch (a pooled cgroup
                // file outlives the check that watched it): re-arm it.
                Err(rustix::io::Errno::EXIST) => epoll::modify(&self.epoll, fd, data, flags)?,
                other => other?,
            }
        } else {
            match epoll::modify(&self.epoll, fd, data, flags) {
                // Never added (its first add failed, ENOSPC or ENOMEM): add it now.
                Err(rustix::io::Errno::NOENT) => epoll::add(&self.epoll, fd, data, flags)?,
                other => other?,
            }
        }
        Ok(())
    }

    /// Nothing to cancel: the loop holds the only reference to every watched
    /// file, so closing the fd removes it from the interest list.
    pub fn unwatch(&mut self, _fd: BorrowedFd<'_>, _token: u64) {}

    /// `epoll_wait` until a watch fires or `timeout` passes (never early;
    /// `Some(ZERO)`: just look). epoll cannot linger for a batch: it
    /// returns at the first event whatever `_batch` says.
    pub fn wait(
        &mut self,
        fired: &mut Vec<u64>,
        timeout: Option<Duration>,
        _batch: Batch,
    ) -> io::Result<()> {
        let wait_for = match timeout {
            Some(d) if d.is_zero() => {
                self.set_timer(ZERO)?;
                Some(ZERO)
            }
            Some(d) if self.timer.is_some() => {
                self.set_timer(Timespec {
                    tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
                    tv_nsec: i64::from(d.subsec_nanos()),
                })?;
                None
            }
            Some(d) => {
                let ms = d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i64;
                Some(Timespec {
                    tv_sec: ms / 1000,
                    tv_nsec: (ms % 1000) * 1_000_000,
                })
            }
            None => {
                self.set_timer(ZERO)?;
                None
            }
        };
        self.events.clear();
        match epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(&mut self.events),
            wait_for.as_ref(),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        fired.extend(
            self.events
                .iter()
                .map(|e| e.data.u64())
                .filter(|&t| t != TIMER),
        );
        Ok(())
    }

    /// Arm the timerfd to expire once, `after` from now; `ZERO` disarms it
    /// (a no-op if it is not armed). Setting it also clears an expiry that
    /// was never read, so an old one cannot end a later wait.
    fn set_timer(&mut self, after: Timespec) -> io::Result<()> {
        let Some(timer) = &self.timer else {
            return Ok(());
        };
        if after == ZERO && !self.timer_armed {
            return Ok(());
        }
        let spec = Itimerspec {
            it_interval: ZERO,
            it_value: after,
        };
        rustix::time::timerfd_settime(timer.as_fd(), TimerfdTimerFlags::empty(), &spec)?;
        self.timer_armed = after != ZERO;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn timeouts_end_no_earlier_than_due_and_the_timer_is_never_reported() {
        for with_timerfd in [true, false] {
            let mut e = Epoll::new().unwrap();
            if !with_timerfd {
                e.timer = None; // as when the kernel refuses one
            }
            let mut fired = Vec::new();
            for us in [1, 300, 1_500] {
                let start = Instant::now();
                e.wait(&mut fired, Some(Duration::from_micros(us)), Batch::NONE)
                    .unwrap();
                assert!(start.elapsed() >= Duration::from_micros(us));
                assert!(fired.is_empty(), "{fired:?}");
            }
            e.wait(&mut fired, Some(Duration::ZERO), Batch::NONE)
                .unwrap();
            assert!(fired.is_empty(), "{fired:?}");
        }
    }

    #[test]
    fn a_wait_without_timeout_is_not_ended_by_an_earlier_timer() {
        let mut e = Epoll::new().unwrap();
        let mut fired = Vec::new();
        // Arm, let it expire unread, then wait with no timeout: only the
        // watched pipe, written later, may end that wait.
        e.wait(&mut fired, Some(Duration::from_micros(50)), Batch::NONE)
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let (r, w) = rustix::pipe::pipe().unwrap();
        e.watch(r.as_fd(), 7, true).unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            rustix::io::write(&w, b"x").unwrap();
        });
        e.wait(&mut fired, None, Batch::NONE).unwrap();
        assert_eq!(fired, [7], "the wait ended before the pipe was written");
        writer.join().unwrap();
    }
}
