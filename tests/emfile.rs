//! Running out of file descriptors mid-load: the checks that cannot get their
//! pipes or pidfd get a spawn-failure result that says so; the others run;
//! the executor recovers when descriptors are free again.
//! (Its own test binary: it lowers the whole process's RLIMIT_NOFILE.)

mod common;

use common::*;
use pidring::{Check, Executor, Outcome, State};
use rustix::process::{Resource, getrlimit, setrlimit};
use std::time::Duration;

#[test]
fn emfile_becomes_a_result_and_the_executor_recovers() {
    let _guard = serial();
    for backend in BACKENDS {
        let before = fd_count();
        let exec = Executor::builder()
            .backend(backend)
            .raise_nofile_limit(false)
            .build()
            .unwrap();
        let saved = getrlimit(Resource::Nofile);
        // Room for about three running checks (3 fds each, 5 while spawning).
        let mut low = saved;
        low.current = Some((fd_count() + 10) as u64);
        setrlimit(Resource::Nofile, low).unwrap();

        let pendings: Vec<_> = (0..12)
            .map(|_| exec.submit(Check::argv(["/bin/sleep", "1"])).unwrap())
            .collect();
        let results: Vec<_> = pendings
            .into_iter()
            .map(|p| p.wait_timeout(Duration::from_secs(60)).expect("a result"))
            .collect();
        setrlimit(Resource::Nofile, saved).unwrap();

        let ok = results.iter().filter(|r| r.state == State::Ok).count();
        let emfile: Vec<_> = results
            .iter()
            .filter(|r| {
                matches!(
                    r.outcome,
                    Outcome::SpawnFailed {
                        errno: Some(libc::EMFILE),
                        ..
                    }
                )
            })
            .collect();
        assert!(ok >= 1, "{backend}: some checks ran");
        assert!(!emfile.is_empty(), "{backend}: some checks hit EMFILE");
        assert_eq!(ok + emfile.len(), results.len(), "{results:#?}");
        assert!(
            emfile[0].reason.contains("file descriptors"),
            "{}",
            emfile[0].reason
        );

        // Descriptors are back: everything runs again.
        let r = exec.submit(Check::argv(["/bin/true"])).unwrap().wait();
        assert_eq!(r.state, State::Ok);
        drop(exec);
        assert_clean(before);
    }
}
