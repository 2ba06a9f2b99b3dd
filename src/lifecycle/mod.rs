//! The life of one process: get listeners (bind them, or receive them from a predecessor),
//! serve, and end either by a graceful stop or by handing everything to a successor.
//! The phases are an explicit enum, logged at each transition.

mod history;
mod listeners;
mod process;
mod role;
mod successor;
mod triggers;
mod upgrade;
// Multi-process mode: the worker's side of its link to the supervisor.
pub mod worker;

pub use process::{run, run_prebound};
pub use role::Role;
pub use successor::refuse;
pub use triggers::{Trigger, Triggers};
pub use upgrade::{check_config, UpgradeReport};

use serde::Serialize;
use std::io;
use std::path::{Path, PathBuf};

/// Where the process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Loading config and getting listeners.
    Starting,
    /// Receiving connections from a predecessor (successor only).
    TakingOver,
    /// Serving.
    Ready,
    /// Passing listeners and connections to a successor.
    HandingOver,
    /// Finishing what could not be handed over.
    Draining,
    /// About to exit.
    Stopped,
}

/// Why the process could not run.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// A listener could not be bound.
    #[error("listener {name}: cannot bind {addr}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Its address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// Another OS-level failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// Taking over from a predecessor failed.
    #[error("taking over from the predecessor failed: {0}")]
    TakeOver(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LifecycleError {
    let what = what.into();
    move |source| LifecycleError::Io { what, source }
}

/// How this process was started.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The config file, re-read by the successor.
    pub config_path: PathBuf,
    /// The binary a successor is started from by default: the path this process was started
    /// from (absolute), re-read from disk at each upgrade.
    pub binary: PathBuf,
    /// 1 for a first start, +1 per upgrade.
    pub generation: u64,
    /// A process of its own, or a worker of a supervisor (see [`Role`]).
    pub role: Role,
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit: a proxy holds two fds per connection,
/// and fds in flight on the handover channel count too.
pub fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
    }
}

fn write_pid_file(path: &Path) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, path)
}

/// Removes the pid file if it still names this process (a successor may have rewritten it).
fn remove_pid_file(path: &Path) {
    let ours = std::fs::read_to_string(path)
        .map(|s| s.trim() == std::process::id().to_string())
        .unwrap_or(false);
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

/// Resolves the path this process was started from (argv[0]) to an absolute path, without
/// following symlinks: `/proc/self/exe` would name the old, deleted file after a replace.
pub fn own_binary_path() -> PathBuf {
    let argv0 = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .unwrap_or_default();
    if argv0.components().count() > 1 {
        return std::path::absolute(&argv0).unwrap_or(argv0);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(&argv0);
            if candidate.is_file() {
                return std::path::absolute(&candidate).unwrap_or(candidate);
            }
        }
    }
    std::env::current_exe().unwrap_or(argv0)
}
