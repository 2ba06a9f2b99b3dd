//! The supervisor upgrades itself by re-executing in place, after its workers were replaced:
//! same pid (systemd and the workers' parent stay the same), same listening sockets, same
//! worker channels, same control socket. In order:
//!
//! 1. wait until no worker is starting (its introduction would not survive the exec);
//! 2. validate: run `BINARY check -c CONFIG`; if it fails there is no old process to fall
//!    back to after an exec, so the supervisor refuses and keeps running (the reply says so);
//! 3. stop serving the control socket (the socket stays open: new requests queue in its
//!    backlog), send the upgrade's reply and let every pending request be answered;
//! 4. stop each worker's message task between two frames, and take its channel back;
//! 5. write the [`State`] to a memfd, clear close-on-exec on it and every fd it names, hold
//!    the handled signals pending, and `execv(BINARY, run -c CONFIG --generation G+1
//!    --resume-supervisor FD)`; the new image continues in [`super::resume`].
//!
//! If `execv` itself fails, everything is put back (close-on-exec, signals, message tasks,
//! control server) and the old image keeps supervising.

use super::resume::{ListenerState, SlotState, State, WorkerState, STATE_FORMAT};
use super::serve::ControlServer;
use super::{fds, Supervisor};
use crate::admin::control::Reply;
use crate::handover::Channel;
use crate::lifecycle::Trigger;
use serde_json::json;
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the new binary's `check` may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long pending control replies get before the exec.
const REPLY_GRACE: Duration = Duration::from_secs(3);

type ReplyTx = tokio::sync::oneshot::Sender<Reply>;

/// Runs `binary check -c config`; `Err` says why the binary or the config is not fit.
async fn check(binary: &Path, config: &Path) -> Result<(), String> {
    let cmd = format!("{} check -c {}", binary.display(), config.display());
    let out = tokio::time::timeout(
        CHECK_TIMEOUT,
        tokio::process::Command::new(binary)
            .arg("check")
            .arg("-c")
            .arg(config)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("`{cmd}` did not finish within {CHECK_TIMEOUT:?}"))?
    .map_err(|e| format!("`{cmd}` could not run: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(format!("`{cmd}` failed ({}): {}", out.status, err.trim()))
}

fn ms(i: Instant) -> u64 {
    i.elapsed().as_millis() as u64
}

impl Supervisor {
    fn record(&mut self, ok: bool, summary: &str) {
        self.history
            .push(json!({ "at_ms": crate::registry::now_ms(), "ok": ok, "summary": summary }));
    }

    /// Re-executes the supervisor with `binary` after a successful worker upgrade summarised
    /// by `summary`. Returns only if the re-exec did not happen: with a stop request that
    /// arrived meanwhile (for the loop to handle), or `None`.
    pub(super) async fn reexec(
        &mut self,
        binary: &Path,
        summary: String,
        reply: Option<ReplyTx>,
    ) -> Option<Trigger> {
        let generation = self.opts.generation + 1;
        let ready = self
            .pump_until(self.cfg.runtime.upgrade_timeout, |s| {
                s.incoming.is_none()
                    && s.slots
                        .iter()
                        .filter_map(|s| s.worker.as_ref())
                        .all(|w| w.live_since.is_some())
            })
            .await;
        let refused = if !ready {
            Err("a worker is still starting".to_string())
        } else if self.deferred.is_some() {
            Err("a stop was requested".to_string())
        } else {
            let config = self.opts.config_path.clone();
            self.busy(check(binary, &config)).await
        };
        if let Err(why) = refused {
            let msg = format!(
                "{summary}; the supervisor was NOT re-executed and keeps running generation {} of its binary: {why}",
                self.opts.generation
            );
            tracing::error!(reason = %why, "supervisor re-exec refused");
            self.record(false, &msg);
            if let Some(r) = reply {
                let _ = r.send(Reply::err(msg));
            }
            return None;
        }
        let msg = format!(
            "{summary}; supervisor re-executing {} as generation {generation}",
            binary.display()
        );
        self.record(true, &msg);
        tracing::info!(binary = %binary.display(), generation, "supervisor re-executing in place");
        let Some(control) = self.control.take() else {
            if let Some(r) = reply {
                let _ = r.send(Reply::err(format!("{msg}: no control socket")));
            }
            return None;
        };
        control.stop.cancel();
        if let Some(r) = reply {
            let _ = r.send(Reply::ok(msg, self.status()));
        }
        if let Some(stop) = self.answer_pending(&control).await {
            self.resume_control(control);
            return Some(stop);
        }
        let channels = self.stop_listening().await;
        // Exits seen by the old image's watchers must not be lost with it.
        while let Ok(ev) = self.events.try_recv() {
            self.on_event(ev);
        }
        let err = self.exec(binary, generation, &control, &channels);
        tracing::error!(error = %err, binary = %binary.display(), "supervisor re-exec failed; the old image keeps supervising");
        self.record(false, &format!("supervisor re-exec failed: {err}"));
        let _ = fds::release_signals();
        self.restart_listening(channels);
        self.resume_control(control);
        None
    }

    /// Answers requests already accepted from the control socket until their replies are
    /// written: status as usual, another upgrade refused. A stop request is returned.
    async fn answer_pending(&mut self, control: &ControlServer) -> Option<Trigger> {
        let tasks = control.tasks.clone();
        tasks.close();
        let done = tasks.wait();
        tokio::pin!(done);
        let deadline = tokio::time::Instant::now() + REPLY_GRACE;
        loop {
            let t = tokio::select! {
                _ = &mut done => return None,
                _ = tokio::time::sleep_until(deadline) => return None,
                t = self.triggers.next() => t,
            };
            match t {
                Trigger::Status(r) => {
                    let _ = r.send(Reply::ok("status", self.status()));
                }
                Trigger::Upgrade { reply, .. } => {
                    if let Some(r) = reply {
                        let _ = r.send(Reply::err(
                            "the supervisor is re-executing; try again in a moment",
                        ));
                    }
                }
                stop @ Trigger::Stop { .. } => {
                    tracing::warn!("stop requested: supervisor re-exec cancelled");
                    return Some(stop);
                }
            }
        }
    }

    /// Serves the control socket again (the re-exec did not happen).
    fn resume_control(&mut self, control: ControlServer) {
        if let Err(e) = self.start_control(control.fd) {
            tracing::error!(error = %e, "cannot serve the control socket again");
        }
    }

    /// Stops every worker's message task between frames; returns (pid, channel) of each.
    async fn stop_listening(&mut self) -> Vec<(u32, Channel)> {
        let mut out = Vec::new();
        let workers = self
            .slots
            .iter_mut()
            .filter_map(|s| s.worker.as_mut())
            .chain(self.retiring.iter_mut());
        for w in workers {
            if let Some(l) = w.listening.take() {
                if let Some(ch) = l.stop().await {
                    out.push((w.pid, ch));
                }
            }
        }
        out
    }

    /// The state for the next image; `channels` are the workers' channels by pid, `keys`
    /// the memfd with the session-ticket keys.
    fn state(
        &self,
        control: &ControlServer,
        channels: &[(u32, Channel)],
        keys: Option<&OwnedFd>,
    ) -> State {
        let fd_of = |pid: u32| {
            channels
                .iter()
                .find(|(p, _)| *p == pid)
                .map(|(_, c)| c.as_fd().as_raw_fd())
        };
        let worker = |w: &super::Worker| WorkerState {
            index: w.index,
            pid: w.pid,
            generation: w.generation,
            fd: fd_of(w.pid),
            uptime_ms: ms(w.spawned),
            live_ms: w.live_since.map(ms),
            counters: w.counters.clone(),
            cgroup: w.cgroup.as_ref().map(|c| c.dirs()).unwrap_or_default(),
            placement: w.placement.clone(),
        };
        State {
            format: STATE_FORMAT,
            control_fd: control.fd.as_raw_fd(),
            sets: self
                .sets
                .iter()
                .map(|set| {
                    set.iter()
                        .map(|l| ListenerState {
                            name: l.name.clone(),
                            addr: l.addr,
                            protocol: l.protocol,
                            fd: l.fd.as_raw_fd(),
                        })
                        .collect()
                })
                .collect(),
            slots: self
                .slots
                .iter()
                .map(|s| SlotState {
                    index: s.index,
                    binary: s.binary.clone(),
                    generation: s.generation,
                    restarts: s.restarts,
                    oom_kills: s.oom_kills,
                    missed_heartbeat_kills: s.missed_heartbeat_kills,
                    backoff_ms: s.backoff.as_millis() as u64,
                    restart_in_ms: s
                        .restart_at
                        .map(|t| t.saturating_duration_since(Instant::now()).as_millis() as u64),
                    crash_streak: s.crash_streak,
                    last_exit: s.last_exit.clone(),
                    worker: s.worker.as_ref().map(worker),
                })
                .collect(),
            retiring: self.retiring.iter().map(worker).collect(),
            retired: self.retired.clone(),
            uptime_ms: ms(self.started),
            history: self.history.clone(),
            upgrades: self.upgrades,
            admin_fd: self.admin_fd.as_ref().map(|f| f.as_raw_fd()),
            board_fd: self.board.as_ref().map(|b| b.raw_fd()),
            ticket_keys_fd: keys.map(|f| f.as_raw_fd()),
            ticket_keys_age_ms: self.tickets.ticketer.age().as_millis() as u64,
        }
    }

    /// Writes the state, marks the fds to keep and execs. Returns only on failure, with
    /// close-on-exec set again on every fd.
    fn exec(
        &self,
        binary: &Path,
        generation: u64,
        control: &ControlServer,
        channels: &[(u32, Channel)],
    ) -> std::io::Error {
        let keys = match super::tickets::write_for_exec(&self.tickets) {
            Ok(fd) => fd,
            Err(e) => return e,
        };
        let state = self.state(control, channels, Some(&keys));
        let memfd = match write_state(&state) {
            Ok(fd) => fd,
            Err(e) => return e,
        };
        let mut kept: Vec<std::os::fd::BorrowedFd<'_>> =
            vec![memfd.as_fd(), keys.as_fd(), control.fd.as_fd()];
        kept.extend(self.sets.iter().flatten().map(|l| l.fd.as_fd()));
        kept.extend(self.admin_fd.as_ref().map(|f| f.as_fd()));
        kept.extend(channels.iter().map(|(_, c)| c.as_fd()));
        let mut result = kept.iter().try_for_each(|fd| fds::keep_across_exec(*fd));
        if result.is_ok() {
            result = fds::hold_signals();
        }
        let err = match result {
            Ok(()) => {
                let mut args: Vec<OsString> = vec!["run".into(), "-c".into()];
                args.push(self.opts.config_path.clone().into_os_string());
                args.push("--generation".into());
                args.push(generation.to_string().into());
                args.push("--resume-supervisor".into());
                args.push(memfd.as_raw_fd().to_string().into());
                fds::execv(binary, &args)
            }
            Err(e) => e,
        };
        for fd in kept {
            let _ = fds::close_on_exec(fd);
        }
        err
    }
}

/// The state as JSON in a new memfd (close-on-exec until [`Supervisor::exec`] keeps it).
fn write_state(state: &State) -> std::io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create("baton-supervisor-state", rustix::fs::MemfdFlags::CLOEXEC)?;
    let mut f = std::fs::File::from(fd);
    f.write_all(&serde_json::to_vec(state).map_err(std::io::Error::other)?)?;
    Ok(OwnedFd::from(f))
}
