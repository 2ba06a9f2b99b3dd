//! The supervisor's main loop (worker events, the 250 ms tick, signals and control requests)
//! and its control socket server, which can be stopped and restarted around a re-exec while
//! the listening socket itself stays open (a copy is kept here), so `baton status` and
//! friends queue in its backlog during the exec instead of being refused.

use super::{remove_pid_file, Supervisor, SupervisorError};
use crate::admin::control::{self, Reply};
use crate::lifecycle::Trigger;
use serde_json::json;
use std::os::fd::OwnedFd;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The control socket's server: the listening socket (kept) and the task serving it.
#[derive(Debug)]
pub(super) struct ControlServer {
    /// The listening socket; the serving task holds a duplicate.
    pub fd: OwnedFd,
    /// Stops the serving task.
    pub stop: CancellationToken,
    /// The tasks answering requests (a reply is written before the process execs or exits).
    pub tasks: TaskTracker,
}

impl Supervisor {
    /// Serves the control socket `fd` (a bound, listening Unix socket).
    pub(super) fn start_control(&mut self, fd: OwnedFd) -> Result<(), String> {
        let copy = fd
            .try_clone()
            .map_err(|e| format!("control socket: dup: {e}"))?;
        let std_listener = std::os::unix::net::UnixListener::from(copy);
        std_listener
            .set_nonblocking(true)
            .map_err(|e| format!("control socket: {e}"))?;
        let listener = tokio::net::UnixListener::from_std(std_listener)
            .map_err(|e| format!("control socket: {e}"))?;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tokio::spawn(control::serve(
            listener,
            self.control_tx.clone(),
            stop.child_token(),
            tasks.clone(),
        ));
        self.control = Some(ControlServer { fd, stop, tasks });
        Ok(())
    }
}

/// Runs the supervisor's loop until it is stopped.
pub(super) async fn serve(mut s: Supervisor) -> Result<(), SupervisorError> {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    // A trigger that arrived while a re-exec was being prepared (and cancelled it).
    let mut pending: Option<Trigger> = None;
    loop {
        let trigger = match pending.take().or_else(|| s.deferred.take()) {
            Some(t) => t,
            None => tokio::select! {
                Some(ev) = s.events.recv() => { s.on_event(ev); continue; }
                _ = tick.tick() => { s.tick().await; continue; }
                t = s.triggers.next() => t,
            },
        };
        match trigger {
            Trigger::Status(reply) => {
                let _ = reply.send(Reply::ok("status", s.status()));
            }
            Trigger::Stop { why, fast, reply } => {
                tracing::info!(trigger = why, fast, "stopping every worker gracefully");
                let n = s.stop().await;
                if let Some(r) = reply {
                    let _ = r.send(Reply::ok(
                        format!(
                            "stopped supervisor {} and its {n} workers",
                            std::process::id()
                        ),
                        json!({ "workers": n }),
                    ));
                }
                break;
            }
            Trigger::Upgrade {
                why,
                reload,
                binary,
                reply,
                ..
            } => {
                tracing::info!(
                    trigger = why,
                    reload,
                    "upgrade requested: replacing workers one by one"
                );
                s.upgrading = Some(std::time::Instant::now());
                let result = s.upgrade(reload, binary).await;
                s.upgrading = None;
                if result.is_ok() {
                    s.upgrades.ok += 1;
                } else {
                    s.upgrades.failed += 1;
                }
                s.publish();
                match result {
                    Ok((summary, binary)) => {
                        tracing::info!(%summary, "workers upgraded");
                        pending = s.reexec(&binary, summary, reply).await;
                    }
                    Err(msg) => {
                        tracing::error!(reason = %msg, "upgrade failed");
                        s.history.push(
                            json!({ "at_ms": crate::registry::now_ms(), "ok": false, "summary": msg }),
                        );
                        if let Some(r) = reply {
                            let _ = r.send(Reply::err(msg));
                        }
                    }
                }
            }
        }
    }
    if let Some(c) = s.control.take() {
        c.stop.cancel();
        c.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), c.tasks.wait()).await;
    }
    remove_pid_file(&s.cfg.runtime.pid_file);
    tracing::info!(from = "Ready", to = "Stopped", "phase");
    Ok(())
}
