//! The main loop of a running process: signals and control requests, connections parked for
//! an upgrade that was abandoned, the take-over from a predecessor and (a worker) the
//! supervisor's requests, each handled by one method.

use super::Process;
use crate::admin::control::Reply;
use crate::lifecycle::successor::{self, TakeOverEvent};
use crate::lifecycle::triggers::{Trigger, Triggers};
use crate::lifecycle::{upgrade, worker};
use crate::lifecycle::{LifecycleError, Phase};
use serde_json::json;

/// What the main loop does after one event.
enum Step {
    /// Serves on.
    Serving,
    /// This process is done: stopped, replaced, or its take-over failed.
    Done(Result<(), LifecycleError>),
}

/// What the main loop reads about a take-over in progress (never ready without one).
async fn next_take_over(
    takeover: &mut Option<tokio::sync::mpsc::Receiver<TakeOverEvent>>,
) -> Option<TakeOverEvent> {
    match takeover.as_mut() {
        Some(t) => t.recv().await,
        None => std::future::pending().await,
    }
}

impl Process {
    /// The main loop: triggers, connections parked for an abandoned upgrade, the take-over
    /// from a predecessor, and (a worker) the supervisor's requests. Returns when this process
    /// is done: stopped, or replaced.
    pub(super) async fn serve(
        &mut self,
        triggers: &mut Triggers,
        takeover: &mut Option<tokio::sync::mpsc::Receiver<TakeOverEvent>>,
    ) -> Result<(), LifecycleError> {
        // Asked for until this process serves (`Ready`): an upgrade while this successor still
        // takes over, a stop signal during an upgrade that was rolled back.
        let mut deferred: Option<Trigger> = None;
        loop {
            let step = tokio::select! {
                t = async { deferred.take().expect("checked by the guard") }, if deferred.is_some() && self.phase == Phase::Ready => {
                    self.on_trigger(t, triggers, &mut deferred).await
                }
                t = triggers.next() => self.on_trigger(t, triggers, &mut deferred).await,
                Some(parked) = self.parked_rx.recv() => {
                    // A connection parked for an upgrade that was abandoned: serve it here again.
                    self.resume_parked(parked).await;
                    Step::Serving
                }
                ev = next_take_over(takeover) => self.on_take_over(ev, takeover).await,
                ev = worker::next(&mut self.link) => self.on_supervisor(ev, triggers, &mut deferred).await,
            };
            if let Step::Done(result) = step {
                return result;
            }
        }
    }

    /// Progress of the take-over from the predecessor.
    async fn on_take_over(
        &mut self,
        ev: Option<TakeOverEvent>,
        takeover: &mut Option<tokio::sync::mpsc::Receiver<TakeOverEvent>>,
    ) -> Step {
        match ev {
            Some(TakeOverEvent::Committed(live)) => {
                self.listeners.resume();
                worker::live(&self.link);
                if let Err(e) = self.go_live() {
                    tracing::error!(error = %e, "cannot take the control socket or pid file");
                }
                crate::admin::notify::took_over(); // systemd: MAINPID=, READY=1
                let _ = live.send(());
            }
            Some(TakeOverEvent::Done(done)) => {
                *takeover = None;
                successor::taken_over(self, done);
            }
            Some(TakeOverEvent::Failed(why)) => {
                tracing::error!(reason = %why, "take-over failed; exiting");
                self.listeners.close().await;
                return Step::Done(Err(LifecycleError::TakeOver(why)));
            }
            None => *takeover = None,
        }
        Step::Serving
    }

    /// A request of the supervisor (a worker only).
    async fn on_supervisor(
        &mut self,
        ev: worker::WorkerEvent,
        triggers: &mut Triggers,
        deferred: &mut Option<Trigger>,
    ) -> Step {
        match ev {
            worker::WorkerEvent::HandOverTo(ch) => {
                if worker::hand_over(self, triggers, ch, deferred).await {
                    return Step::Done(Ok(()));
                }
            }
            worker::WorkerEvent::SupervisorGone => {
                tracing::warn!("supervisor gone; stopping gracefully");
                self.drain_and_stop(false).await;
                return Step::Done(Ok(()));
            }
        }
        Step::Serving
    }

    /// A signal or a control-socket request.
    async fn on_trigger(
        &mut self,
        trigger: Trigger,
        triggers: &mut Triggers,
        deferred: &mut Option<Trigger>,
    ) -> Step {
        let (why, reload, binary, wait, reply) = match trigger {
            Trigger::Status(reply) => {
                let _ = reply.send(Reply::ok("status", self.status()));
                return Step::Serving;
            }
            Trigger::Stop { why, fast, reply } => {
                tracing::info!(trigger = why, fast, "stopping gracefully");
                crate::admin::notify::stopping(); // systemd
                let (finished, closed) = self.drain_and_stop(fast).await;
                if let Some(r) = reply {
                    let _ = r.send(Reply::ok(
                        format!("stopped pid {}: {finished} connections finished, {closed} closed at the deadline", std::process::id()),
                        json!({ "finished": finished, "closed": closed }),
                    ));
                }
                return Step::Done(Ok(()));
            }
            Trigger::Upgrade {
                why,
                reload,
                binary,
                wait,
                reply,
            } => (why, reload, binary, wait, reply),
        };
        let refused = match self.role().upgrade_refusal() {
            Some(msg) => Some(msg.to_string()),
            None if self.phase == Phase::TakingOver && deferred.is_none() => {
                tracing::info!(
                    trigger = why,
                    "upgrade queued until the predecessor is gone"
                );
                *deferred = Some(Trigger::Upgrade {
                    why,
                    reload,
                    binary,
                    wait,
                    reply,
                });
                return Step::Serving;
            }
            None if self.phase != Phase::Ready => Some(format!(
                "upgrade refused: process is {:?}, not ready",
                self.phase
            )),
            None => None,
        };
        if let Some(msg) = refused {
            tracing::warn!(trigger = why, "{msg}");
            if let Some(r) = reply {
                let _ = r.send(Reply::err(msg));
            }
            return Step::Serving;
        }
        tracing::info!(trigger = why, reload, "upgrade requested");
        let asker = upgrade::Asker::new(reply, wait);
        match upgrade::upgrade(self, triggers, reload, binary, asker, deferred).await {
            upgrade::Ended::Replaced(_) => return Step::Done(Ok(())),
            upgrade::Ended::Failed(msg) => tracing::error!(trigger = why, "{msg}"),
        }
        Step::Serving
    }
}
