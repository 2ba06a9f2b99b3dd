//! Multi-process mode, the worker's side: a worker is a successor whose first predecessor is
//! its supervisor. Its inherited channel goes to the supervisor and stays open for the
//! worker's whole life. The supervisor sends `HandOverTo` with a fresh channel (one fd): the
//! first one to take over through (the supervisor itself, or the old worker this one
//! replaces, plays the predecessor on it), a later one to hand everything over through to this
//! worker's replacement. The worker sends `Ready` once it accepts, and `Heartbeat` with its
//! counters every second. If the supervisor's channel ends, the worker stops gracefully.

use super::process::Process;
use super::triggers::Triggers;
use super::{LifecycleError, Phase};
use crate::config::WorkerLimits;
use crate::handover::{Channel, HandoverError, Message};
use crate::metrics::Metrics;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How often a worker reports to its supervisor.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// What the supervisor asks of a serving worker.
#[derive(Debug)]
pub enum WorkerEvent {
    /// Hand everything over through this channel (an upgrade of this worker).
    HandOverTo(Channel),
    /// The supervisor's channel ended.
    SupervisorGone,
}

/// The worker's link to its supervisor, held by the main loop.
pub struct WorkerLink {
    events: mpsc::Receiver<WorkerEvent>,
    reports: mpsc::UnboundedSender<Report>,
}

/// What the main loop asks the reporting task to tell the supervisor.
enum Report {
    /// The worker accepts now.
    Live,
    /// The worker is about to exit: its final counters, then the answer on the sender.
    Last(tokio::sync::oneshot::Sender<()>),
}

/// Splits a channel into two on the same socket (one fd each, by `dup`), so one task can
/// receive while another sends: [`Channel::recv`] is not cancel-safe, so a single `select!`
/// over both would risk dropping half a frame.
pub fn split_channel(ch: Channel) -> io::Result<(Channel, Channel)> {
    let a = ch.into_inner().into_std()?;
    let b = a.try_clone()?;
    Ok((Channel::from_std(a)?, Channel::from_std(b)?))
}

/// Listening sockets the supervisor sent a new worker, by name: they serve the listeners
/// its predecessor does not have (added by a reload), instead of binding them itself.
pub(super) type FromSupervisor = Vec<(crate::handover::ListenerEntry, std::os::fd::OwnedFd)>;

/// Receives a `HandOverTo` and turns its fd into a channel.
pub async fn recv_hand_over_to(ch: &mut Channel) -> Result<Channel, HandoverError> {
    hand_over_to(ch.recv().await?)
}

/// A new worker's start: the supervisor's listeners (sent first only when a reload changed
/// them), then the channel to take over through.
async fn recv_start(ch: &mut Channel) -> Result<(FromSupervisor, Channel), HandoverError> {
    let first = ch.recv().await?;
    if let Message::Listeners { .. } = first.msg {
        let listeners = crate::handover::listeners_in(first)?;
        return Ok((listeners, recv_hand_over_to(ch).await?));
    }
    Ok((Vec::new(), hand_over_to(first)?))
}

fn hand_over_to(r: crate::handover::Received) -> Result<Channel, HandoverError> {
    match r.msg {
        Message::HandOverTo => {
            let fd = r
                .fds
                .into_iter()
                .next()
                .ok_or(HandoverError::BadHeader("hand_over_to without its fd"))?;
            Ok(Channel::from_std(std::os::unix::net::UnixStream::from(fd))?)
        }
        other => Err(crate::handover::unexpected(other, "hand_over_to")),
    }
}

/// Applies `nofile` as both limits of RLIMIT_NOFILE (the soft one only, if the hard one
/// cannot be changed).
pub fn apply_rlimits(limits: &WorkerLimits) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let Some(n) = limits.nofile else { return };
    let want = Rlimit {
        current: Some(n),
        maximum: Some(n),
    };
    if let Err(e) = setrlimit(Resource::Nofile, want) {
        let mut lim = getrlimit(Resource::Nofile);
        lim.current = Some(lim.maximum.map_or(n, |m| m.min(n)));
        let soft = setrlimit(Resource::Nofile, lim);
        tracing::warn!(error = %e, nofile = n, soft_ok = soft.is_ok(),
            "cannot set the open-file limit; soft limit only");
    }
}

/// In a worker, receives the channel to take over through (and any listeners the supervisor
/// sends first) and starts the heartbeat; in any other process returns `inherited` unchanged.
pub(super) async fn setup(
    p: &Process,
    inherited: Option<Result<Channel, HandoverError>>,
) -> Result<Setup, LifecycleError> {
    let Some(index) = p.role().worker_index() else {
        return Ok(Setup {
            channel: inherited,
            link: None,
            from_supervisor: Vec::new(),
        });
    };
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        LifecycleError::TakeOver(format!("worker {index}: {what}: {e}"))
    };
    apply_rlimits(&p.cfg().runtime.worker_limits);
    let sup = match inherited {
        Some(Ok(ch)) => ch,
        Some(Err(e)) => return Err(fail("supervisor channel", &e)),
        None => {
            return Err(fail(
                "supervisor channel",
                &"not inherited (start workers with baton run)",
            ))
        }
    };
    let (mut rx, tx) = split_channel(sup).map_err(|e| fail("supervisor channel", &e))?;
    let (from_supervisor, pred) = recv_start(&mut rx)
        .await
        .map_err(|e| fail("first message from the supervisor", &e))?;
    let (events_tx, events) = mpsc::channel(2);
    let (reports, reports_rx) = mpsc::unbounded_channel();
    tokio::spawn(report(tx, p.metrics().clone(), reports_rx, index));
    tokio::spawn(listen(rx, events_tx, p.ticketer().clone()));
    Ok(Setup {
        channel: Some(Ok(pred)),
        link: Some(WorkerLink { events, reports }),
        from_supervisor,
    })
}

/// What [`setup`] gives the main loop.
pub(super) struct Setup {
    /// The channel to take over through (a worker's comes from its supervisor).
    pub channel: Option<Result<Channel, HandoverError>>,
    /// A worker's link to its supervisor.
    pub link: Option<WorkerLink>,
    /// Listeners the supervisor sent for the take-over.
    pub from_supervisor: FromSupervisor,
}

/// Sends `Ready` once the worker accepts, a heartbeat every second, and a last one with the
/// final counters when the worker exits: the supervisor keeps the counters of a worker that
/// is gone, so what it counted after its last regular heartbeat is not lost.
async fn report(
    mut tx: Channel,
    metrics: Arc<Metrics>,
    mut reports: mpsc::UnboundedReceiver<Report>,
    index: usize,
) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    loop {
        let msg = tokio::select! {
            Some(r) = reports.recv() => match r {
                Report::Live => {
                    crate::test_hooks::grow_memory(index);
                    Message::Ready { adopted: Vec::new() }
                }
                Report::Last(sent) => {
                    let last = Message::Heartbeat { counters: metrics.snapshot() };
                    let _ = tx.send(&last, &[], &[]).await;
                    let _ = sent.send(());
                    return;
                }
            },
            _ = tick.tick() => Message::Heartbeat { counters: metrics.snapshot() },
        };
        if let Err(e) = tx.send(&msg, &[], &[]).await {
            tracing::debug!(error = %e, "supervisor channel closed");
            return;
        }
    }
}

/// Receives the supervisor's requests: a channel to hand everything over through, or (at a
/// rotation) the session-ticket keys every worker encrypts with from now on.
async fn listen(
    mut rx: Channel,
    events: mpsc::Sender<WorkerEvent>,
    tickets: Arc<crate::tls::tickets::Ticketer>,
) {
    loop {
        let got = match rx.recv().await {
            Ok(r) if matches!(r.msg, Message::Listeners { .. }) => {
                take_ticket_keys(&tickets, r);
                continue;
            }
            Ok(r) => hand_over_to(r),
            Err(e) => Err(e),
        };
        match got {
            Ok(ch) => {
                if events.send(WorkerEvent::HandOverTo(ch)).await.is_err() {
                    return;
                }
            }
            Err(e @ (HandoverError::Unexpected { .. } | HandoverError::BadHeader(_))) => {
                tracing::warn!(error = %e, "ignoring a message from the supervisor");
            }
            Err(e) => {
                tracing::debug!(error = %e, "supervisor channel ended");
                let _ = events.send(WorkerEvent::SupervisorGone).await;
                return;
            }
        }
    }
}

/// Takes the supervisor's session-ticket keys in place of this worker's own.
fn take_ticket_keys(tickets: &crate::tls::tickets::Ticketer, r: crate::handover::Received) {
    let keys = match crate::handover::listeners_with_keys_in(r) {
        Ok((_, keys)) => keys,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a message from the supervisor");
            return;
        }
    };
    match tickets.import(&keys) {
        Ok(n) => tracing::debug!(keys = n, "took the supervisor's session-ticket keys"),
        Err(e) => {
            tracing::warn!(error = %e, "the supervisor's session-ticket keys refused; this worker keeps its own")
        }
    }
}

/// A worker of `accept: shared`: its side of the supervisor's accept board, with a task
/// that publishes its load every [`crate::spread::BEAT`] until `shutdown` (see
/// [`crate::spread`]). `None` elsewhere, or if the board cannot be taken (one warning: the
/// worker accepts without taking turns).
pub(super) fn accept_turn(
    cfg: &crate::config::Config,
    role: super::Role,
    registry: &Arc<crate::registry::Registry>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<Arc<crate::spread::Turn>> {
    let super::Role::Worker {
        index,
        accept_board: Some(fd),
    } = role
    else {
        return None;
    };
    if cfg.runtime.accept != crate::config::AcceptMode::Shared {
        return None;
    }
    let fd = match crate::supervisor::fds::adopt(fd, "accept board") {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take the accept board; accepting without turns");
            return None;
        }
    };
    let board = crate::spread::Board::adopt(fd, cfg.runtime.workers);
    let turn = Arc::new(crate::spread::Turn::new(board, index));
    let (t, registry, stop) = (turn.clone(), registry.clone(), shutdown.clone());
    tokio::spawn(async move {
        let mut beat = tokio::time::interval(crate::spread::BEAT);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = beat.tick() => t.publish(registry.len()),
            }
        }
    });
    Some(turn)
}

/// Tells the supervisor this worker accepts now.
pub(super) fn live(link: &Option<WorkerLink>) {
    if let Some(l) = link {
        let _ = l.reports.send(Report::Live);
    }
}

/// Sends the supervisor this worker's final counters, at its exit (bounded: a supervisor
/// that is gone does not hold the exit up).
pub(super) async fn last_report(link: &Option<WorkerLink>) {
    let Some(l) = link else { return };
    let (sent, done) = tokio::sync::oneshot::channel();
    if l.reports.send(Report::Last(sent)).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), done).await;
    }
}

/// The next request of the supervisor; never returns outside multi-process mode.
pub(super) async fn next(link: &mut Option<WorkerLink>) -> WorkerEvent {
    match link {
        Some(l) => l.events.recv().await.unwrap_or(WorkerEvent::SupervisorGone),
        None => std::future::pending().await,
    }
}

/// Hands everything over to this worker's replacement; true when this process should exit.
/// A stop signal that arrives meanwhile is kept in `later` (see [`super::upgrade`]).
pub(super) async fn hand_over(
    p: &mut Process,
    triggers: &mut Triggers,
    mut ch: Channel,
    later: &mut Option<super::triggers::Trigger>,
) -> bool {
    if p.phase() != Phase::Ready {
        let reason = format!("worker is {:?}, not ready", p.phase());
        tracing::warn!(%reason, "hand-over refused");
        let _ = crate::handover::send_abort(&mut ch, &reason).await;
        return false;
    }
    tracing::info!("handing over to the replacement worker");
    match super::upgrade::upgrade_to_peer(p, triggers, ch, later).await {
        super::upgrade::Ended::Replaced(report) => {
            tracing::info!(summary = %report.summary(), "worker replaced; exiting");
            true
        }
        super::upgrade::Ended::Failed(e) => {
            tracing::error!("hand-over failed, this worker keeps serving: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::tls::tickets::Ticketer;
    use rustls::server::ProducesTickets;

    #[tokio::test]
    async fn a_worker_takes_the_keys_its_supervisor_sends_and_still_hands_over() {
        let (mut sup, rx) = Channel::pair().unwrap();
        let ours = Arc::new(Ticketer::follower());
        let (events_tx, mut events) = mpsc::channel(2);
        tokio::spawn(listen(rx, events_tx, ours.clone()));
        let leader = Ticketer::default();
        let ticket = leader.encrypt(b"state").unwrap();
        assert_eq!(ours.decrypt(&ticket), None, "a worker's own keys");
        let none: [(
            &str,
            std::net::SocketAddr,
            crate::config::Protocol,
            std::os::fd::BorrowedFd<'_>,
        ); 0] = [];
        crate::handover::send_listeners_with_keys(&mut sup, &none, &leader.export())
            .await
            .unwrap();
        // The keys are taken before the next message is read.
        let (end, _keep) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = std::os::fd::OwnedFd::from(end);
        sup.send(&Message::HandOverTo, &[std::os::fd::AsFd::as_fd(&fd)], &[])
            .await
            .unwrap();
        match events.recv().await {
            Some(WorkerEvent::HandOverTo(_)) => {}
            other => panic!("expected hand_over_to, got {other:?}"),
        }
        assert_eq!(
            ours.decrypt(&ticket).unwrap(),
            b"state",
            "the supervisor's keys"
        );
    }
}
