//! The process layer: create a check's child (own session and process group,
//! stdin from /dev/null, stdout/stderr into pipes, nothing else inherited)
//! with its pidfd, signal it, and reap it with `waitid(P_PIDFD)`. One file
//! per job: `launch` (creating the child), `child` (its code until exec),
//! `kill`, `descendants` (the /proc walk), `reap`, `setup` (process-wide).
//!
//! Every function here returns errors as values; none of them panics on a
//! kernel refusal, because a refusal for one check must not hurt the others.

mod child;
mod descendants;
mod kill;
mod launch;
mod reap;
mod setup;

pub(crate) use child::*;
pub(crate) use descendants::*;
pub(crate) use kill::*;
pub(crate) use launch::*;
pub(crate) use reap::*;
pub(crate) use setup::*;

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::io::Errno;

    #[test]
    fn e2big_says_too_long_once() {
        let f = SpawnFailure::new("/bin/true", "cannot execute", Errno::TOOBIG);
        assert_eq!(
            f.message.to_lowercase().matches("too long").count(),
            1,
            "{}",
            f.message
        );
    }
}
