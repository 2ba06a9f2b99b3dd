//! What can ask the process to do something: signals and control-socket commands.
//! Every signal handler is registered at start, before the process reports ready.

use super::{io_err, LifecycleError};
use crate::admin::control::{Command, ControlRequest};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

/// One thing asked of the process.
#[derive(Debug)]
pub enum Trigger {
    /// SIGTERM, SIGINT or `baton stop`: stop gracefully (or fast).
    Stop {
        /// What asked.
        why: &'static str,
        /// Close connections at once.
        fast: bool,
        /// Reply channel of a CLI request.
        reply: Option<tokio::sync::oneshot::Sender<crate::admin::control::Reply>>,
    },
    /// SIGUSR2, SIGHUP, `baton upgrade` or `baton reload`.
    Upgrade {
        /// What asked.
        why: &'static str,
        /// Re-read and pre-validate the config (reload).
        reload: bool,
        /// Binary to start instead of the default.
        binary: Option<std::path::PathBuf>,
        /// Reply once the old process is done, not at the commit.
        wait: bool,
        /// Reply channel of a CLI request.
        reply: Option<tokio::sync::oneshot::Sender<crate::admin::control::Reply>>,
    },
    /// `baton status`.
    Status(tokio::sync::oneshot::Sender<crate::admin::control::Reply>),
}

/// The sources of triggers.
pub struct Triggers {
    term: Signal,
    int: Signal,
    usr2: Signal,
    hup: Signal,
    control: mpsc::Receiver<ControlRequest>,
}

impl Triggers {
    /// Registers the signal handlers; `control` receives the control socket's commands.
    /// SIGUSR1 reopens the log files ([`crate::logging::reopen_on_sigusr1`]), in a single
    /// process, a worker and the supervisor alike, so it never ends a process.
    pub fn new(control: mpsc::Receiver<ControlRequest>) -> Result<Triggers, LifecycleError> {
        crate::logging::reopen_on_sigusr1().map_err(io_err("SIGUSR1 handler"))?;
        let s = |k| signal(k).map_err(io_err("signal handler"));
        Ok(Triggers {
            term: s(SignalKind::terminate())?,
            int: s(SignalKind::interrupt())?,
            usr2: s(SignalKind::user_defined2())?,
            hup: s(SignalKind::hangup())?,
            control,
        })
    }

    /// The next trigger.
    pub async fn next(&mut self) -> Trigger {
        loop {
            tokio::select! {
                _ = self.term.recv() => return Trigger::Stop { why: "SIGTERM", fast: false, reply: None },
                _ = self.int.recv() => return Trigger::Stop { why: "SIGINT", fast: false, reply: None },
                _ = self.usr2.recv() => return Trigger::Upgrade { why: "SIGUSR2", reload: false, binary: None, wait: false, reply: None },
                _ = self.hup.recv() => return Trigger::Upgrade { why: "SIGHUP", reload: true, binary: None, wait: false, reply: None },
                Some(req) = self.control.recv() => {
                    let reply = Some(req.reply);
                    return match req.command {
                        Command::Status => match reply {
                            Some(r) => Trigger::Status(r),
                            None => continue,
                        },
                        Command::Stop { fast } => Trigger::Stop { why: "baton stop", fast, reply },
                        Command::Upgrade { binary, wait } => Trigger::Upgrade { why: "baton upgrade", reload: false, binary, wait, reply },
                        Command::Reload { wait } => Trigger::Upgrade { why: "baton reload", reload: true, binary: None, wait, reply },
                    };
                }
            }
        }
    }
}
