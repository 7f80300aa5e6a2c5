//! The one token format: what a backend watch carries, and what the loop
//! learns back from `wait`. Every token is made and read here.
//!
//! A check's token is `generation << 32 | slot << 8 | source`: the slot
//! finds its state, the generation tells a stale completion (the slot was
//! reused since) from a live one, the source names the fd. Bit 7 of the
//! low byte is `WATCH_FAILED`, set by a backend; two values at the top are
//! reserved, one for the loop's waker and one for each backend's own use.

/// Set in a token `wait` hands back when that watch could not be armed
/// (io_uring completes a failed poll with an error): the caller must not
/// take it for readiness. Tokens are made with this bit clear.
pub(crate) const WATCH_FAILED: u64 = 0x80;

/// Token of the waker's eventfd (its low byte names no `Source`).
pub(crate) const WAKER: u64 = u64::MAX - 1;

/// A backend's private token: io_uring's requests whose completions are of
/// no interest (poll removals), epoll's own timerfd. Never handed back.
pub(crate) const BACKEND_OWN: u64 = u64::MAX;

/// What a token's fd is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The leader's pidfd.
    Pidfd = 0,
    /// The stdout pipe.
    Stdout = 1,
    /// The stderr pipe.
    Stderr = 2,
    /// The check's cgroup leaf's `cgroup.events` (POLLPRI).
    Cgroup = 3,
}

/// Pack (slot, generation, source) into a backend token.
pub(crate) fn token(slot: usize, generation: u32, source: Source) -> u64 {
    debug_assert!(slot < (1 << 24));
    ((generation as u64) << 32) | ((slot as u64) << 8) | source as u64
}

/// Unpack a backend token.
pub(crate) fn untoken(token: u64) -> (usize, u32, Option<Source>) {
    let source = match token & !WATCH_FAILED & 0xff {
        0 => Some(Source::Pidfd),
        1 => Some(Source::Stdout),
        2 => Some(Source::Stderr),
        3 => Some(Source::Cgroup),
        _ => None,
    };
    (
        ((token >> 8) & 0xff_ffff) as usize,
        (token >> 32) as u32,
        source,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let t = token(123_456, 0xdead_beef, Source::Stderr);
        assert_eq!(untoken(t), (123_456, 0xdead_beef, Some(Source::Stderr)));
        assert_eq!(untoken(WAKER).2, None);
        assert_eq!(untoken(t | WATCH_FAILED).2, Some(Source::Stderr));
    }
}
