//! pidring: an executor for monitoring checks (Nagios/Icinga-style plugins)
//! that can never leave a zombie and never signal the wrong process.
//!
//! One event-loop thread owns every running check. It watches each check's
//! pidfd and output pipes through io_uring (or epoll where io_uring is
//! blocked), signals only through `pidfd_send_signal` (plus the check's process
//! group while its leader is still unreaped), and reaps every exit with
//! `waitid(P_PIDFD)`. The loop creates each child itself, without waiting
//! for it to exec (`clone` sharing memory and descriptor table, see
//! `process/`), so spawning never blocks it.
//!
//! ```no_run
//! use pidring::{Check, Executor};
//! use std::time::Duration;
//!
//! let exec = Executor::builder().max_running(64).build()?;
//! let check = Check::argv(["/bin/echo", "OK - all good|load=0.5;1;2"])
//!     .timeout(Duration::from_secs(10));
//! let result = exec.submit(check)?.wait();
//! println!("{} {}", result.state, result.plugin.text);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod backend;
pub mod cgroup;
pub mod check;
pub mod cmdline;
mod engine;
pub mod error;
pub mod executor;
mod lifecycle;
pub mod metrics;
pub mod nagios_state;
mod oneshot;
pub mod plugin_output;
pub mod policy;
mod priority;
mod process;
mod rawsys;
pub mod result;
pub mod run_as;
mod search_path;
mod shared;
pub mod signal;
mod token;
pub mod units;
pub mod waker;

pub use backend::BackendKind;
pub use check::{Check, EnvPolicy};
pub use error::{CheckError, ExecutorError, PolicyError, SubmitError};
pub use executor::{CheckId, Executor, ExecutorBuilder, Pending};
pub use metrics::{MetricsSnapshot, Stage, StageSnapshot};
pub use nagios_state::State;
pub use plugin_output::{PerfData, PluginOutput};
pub use result::{CheckResult, ExitStatus, Outcome, Output, Rusage, Timings};
