//! The successor's side of a handover, over the [`Successor`] session: say hello, adopt the
//! predecessor's listeners (bind only the new ones), report ready, then receive the live
//! connections. Connections received before the predecessor's `Commit` are held untouched,
//! so if the upgrade is rolled back the predecessor resumes them with no byte read or written
//! here. Every step before the commit has a deadline (`upgrade_timeout`): a predecessor that
//! goes silent makes this process exit non-zero, never hang with its listeners unserved. One
//! that is gone before the commit (its end of the channel closed: it crashed, was killed, or
//! dropped the channel) makes it exit non-zero too, never live on as a second proxy nobody
//! started. After the commit this process serves whatever happens to the predecessor.

use super::history::UpgradeRecord;
use super::process::Process;
use super::{LifecycleError, Phase};
use crate::handover::session::{Cause, Deadline, Incoming, SessionError, Stage, Successor};
use crate::handover::{self, Channel, HandoverError, Message};
use crate::metrics::Counters;
use crate::proxy::{self, ListenerCtx};
use crate::registry::Parked;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// A successor that has its listeners and still has to receive the connections.
pub(super) struct TakeOver {
    s: Successor,
    adopted: Vec<String>,
    /// Each step before the commit.
    step: Deadline,
    /// After the commit, how long to wait for the predecessor's `Done` (it drains first).
    done_within: Deadline,
}

/// What the end of a take-over reports: the predecessor's counters, or why it ended early.
pub(super) type TakeOverDone = Result<(u32, Counters, usize, Vec<serde_json::Value>), String>;

/// Progress of a take-over, reported to the main loop.
#[derive(Debug)]
pub(super) enum TakeOverEvent {
    /// The predecessor committed: start accepting, take the control socket and pid file,
    /// then answer on the sender (the predecessor waits for that before it reports success).
    Committed(tokio::sync::oneshot::Sender<()>),
    /// The predecessor is done (or, after the commit, the take-over ended early).
    Done(TakeOverDone),
    /// Before the commit, the take-over failed: this process never served and exits non-zero.
    Failed(String),
}

fn refused(what: &str, e: impl std::fmt::Display) -> LifecycleError {
    LifecycleError::TakeOver(format!("{what}: {e}"))
}

/// Tells the predecessor why this successor cannot start (e.g. its config is invalid).
pub async fn refuse(reason: String) {
    if let Some(Ok(mut ch)) = handover::inherited_channel() {
        let _ = ch.send(&Message::Refused { reason }, &[], &[]).await;
    }
}

/// Handshake and listeners. On failure the predecessor is told why and keeps serving.
pub(super) async fn take_over(
    p: &mut Process,
    ch: Result<Channel, HandoverError>,
    from_supervisor: super::worker::FromSupervisor,
) -> Result<TakeOver, LifecycleError> {
    let ch = ch.map_err(|e| refused("handover channel", e))?;
    let deadline = Deadline::new(p.cfg().runtime.upgrade_timeout, "upgrade_timeout");
    let mut s = Successor::hello(ch, deadline)
        .await
        .map_err(|e| LifecycleError::TakeOver(gave_up(&e)))?;
    if let Err(reason) = super::upgrade::check_config(p.cfg()) {
        s.refuse(&reason).await;
        return Err(LifecycleError::TakeOver(reason));
    }
    let received = s
        .listeners()
        .await
        .map_err(|e| LifecycleError::TakeOver(gave_up(&e)))?;
    p.take_ticket_keys(&s.take_ticket_keys());
    let mut inherited: BTreeMap<String, (std::net::SocketAddr, std::os::fd::OwnedFd)> = received
        .into_iter()
        .map(|(e, fd)| (e.name, (e.addr, fd)))
        .collect();
    // A worker's supervisor owns the listeners: its sockets come first (for a listener a
    // reload added they are the only ones; for the others they are the same sockets).
    let mut owned: BTreeMap<String, std::os::fd::OwnedFd> = from_supervisor
        .into_iter()
        .map(|(e, fd)| (e.name, fd))
        .collect();
    let mut adopted = Vec::new();
    let mut result = Ok(());
    for l in p.cfg().listeners.clone().values() {
        // Same name and same address (or a config asking for any port on the same IP): adopt.
        let same = inherited.get(&l.name).is_some_and(|(addr, _)| {
            *addr == l.listen || (l.listen.port() == 0 && addr.ip() == l.listen.ip())
        });
        if same {
            adopted.push(l.name.clone());
        }
        let fd = match owned.remove(&l.name) {
            Some(fd) => Some(fd),
            None if same => inherited.remove(&l.name).map(|(_, fd)| fd),
            None => None,
        };
        let sock = if let Some(fd) = fd {
            crate::listener::adopt_for(fd, l)
                .map_err(|e| refused(&format!("adopt listener {}", l.name), e))
        } else {
            crate::listener::bind(l).map_err(|source| LifecycleError::Bind {
                name: l.name.clone(),
                addr: l.listen,
                source,
            })
        };
        // Accepting starts only at the predecessor's commit: until then a rollback loses nothing.
        if let Err(e) = sock.and_then(|s| p.start_listener_paused(&l.name, s)) {
            result = Err(e);
            break;
        }
    }
    if let Err(e) = result {
        s.refuse(&e.to_string()).await;
        return Err(e);
    }
    tracing::info!(predecessor = s.predecessor.pid, adopted = ?adopted, "listeners taken over");
    // The predecessor drains for up to drain_timeout before its Done; its steps around that
    // have upgrade_timeout each.
    let done_within = Deadline::new(
        p.cfg().runtime.drain_timeout + p.cfg().runtime.upgrade_timeout * 2,
        "drain_timeout",
    );
    Ok(TakeOver {
        s,
        adopted,
        step: deadline,
        done_within,
    })
}

impl TakeOver {
    /// Reports ready and receives connections in the background, reporting progress.
    pub(super) fn finish(self, p: &mut Process) -> mpsc::Receiver<TakeOverEvent> {
        let ctxs: BTreeMap<String, Arc<ListenerCtx>> = p.listeners().contexts();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let ev = match receive(self, ctxs, &tx).await {
                Ended::Done(done) => TakeOverEvent::Done(done),
                Ended::Failed(why) => TakeOverEvent::Failed(why),
            };
            let _ = tx.send(ev).await;
        });
        rx
    }
}

/// Asks the main loop to start accepting and take the control socket and pid file; waits
/// until it has.
async fn go_live(events: &mpsc::Sender<TakeOverEvent>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if events.send(TakeOverEvent::Committed(tx)).await.is_ok() {
        let _ = rx.await;
    }
}

async fn resume_all(ctxs: &BTreeMap<String, Arc<ListenerCtx>>, conns: Vec<Parked>) {
    for c in conns {
        match ctxs.get(&c.meta().listener) {
            Some(ctx) => proxy::resume(ctx.clone(), c).await,
            None => tracing::warn!(listener = %c.meta().listener, client = %c.meta().client,
                "received a connection for a listener this config does not have; closing it"),
        }
    }
}

/// How the receiving ended.
enum Ended {
    Done(TakeOverDone),
    Failed(String),
}

async fn receive(
    t: TakeOver,
    ctxs: BTreeMap<String, Arc<ListenerCtx>>,
    events: &mpsc::Sender<TakeOverEvent>,
) -> Ended {
    let TakeOver {
        mut s,
        adopted,
        step,
        done_within,
    } = t;
    if crate::test_hooks::fault("slow_ready") {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    if let Err(e) = s.ready(adopted).await {
        return Ended::Failed(gave_up(&e));
    }
    let mut held: Vec<Parked> = Vec::new();
    let mut committed = false;
    let mut total = 0usize;
    let predecessor = s.predecessor.pid;
    loop {
        let next = if committed {
            s.next(Stage::Done, done_within).await
        } else {
            s.next(Stage::Commit, step).await
        };
        match next {
            Ok(Incoming::Batch { seq, conns }) => {
                if crate::test_hooks::fault("kill_after_first_batch") {
                    tracing::warn!("test fault: killing myself mid-handover");
                    let _ = rustix::process::kill_process(
                        rustix::process::getpid(),
                        rustix::process::Signal::KILL,
                    );
                }
                let count = conns.len();
                total += count;
                if committed {
                    resume_all(&ctxs, conns).await;
                } else {
                    held.extend(conns);
                }
                if let Err(e) = s.ack(seq, count).await {
                    return lost(e, committed, &ctxs, held).await;
                }
            }
            Ok(Incoming::Commit) => {
                committed = true;
                tracing::info!(
                    connections = held.len(),
                    "handover committed; serving received connections"
                );
                // The received connections take their listeners' permits before accepting
                // starts, so clients queued meanwhile wait for room under max_connections
                // rather than the listener going over it by everything handed over.
                resume_all(&ctxs, std::mem::take(&mut held)).await;
                go_live(events).await;
                if let Err(e) = s.ack_commit().await {
                    tracing::warn!(error = %e, "cannot acknowledge the commit");
                }
            }
            Ok(Incoming::Done { counters, history }) => {
                resume_all(&ctxs, std::mem::take(&mut held)).await;
                if !committed {
                    go_live(events).await;
                }
                return Ended::Done(Ok((predecessor, counters, total, history)));
            }
            Err(e) => return lost(e, committed, &ctxs, held).await,
        }
    }
}

/// The session with the predecessor ended early. After the commit this process serves
/// whatever happens: it accepts, and the predecessor only finishes its own requests. Before
/// the commit every end is a failure and this process exits non-zero: a predecessor that
/// aborted or went silent keeps everything, and one that is gone (killed, crashed, its channel
/// closed without a word) is the process its operator or service manager knows: a successor
/// that went live in its place would be a second, unannounced proxy holding the listeners.
/// What it gave us before the commit is dropped here untouched (docs/operations.md, "When the
/// predecessor dies before the commit").
async fn lost(
    e: SessionError,
    committed: bool,
    ctxs: &BTreeMap<String, Arc<ListenerCtx>>,
    held: Vec<Parked>,
) -> Ended {
    if committed {
        resume_all(ctxs, held).await;
        return Ended::Done(Err(format!("predecessor: {e}")));
    }
    let connections = held.len();
    drop(held);
    Ended::Failed(match e.cause {
        Cause::PeerExited(_) if connections > 0 => {
            format!(
                "{}; the {connections} connections it handed over are closed",
                gave_up(&e)
            )
        }
        _ => gave_up(&e),
    })
}

/// Why a take-over failed before the commit, for the log line and the exit.
fn gave_up(e: &SessionError) -> String {
    match e.cause {
        Cause::PeerExited(_) => format!("predecessor gone before the commit: {e}"),
        _ => format!("predecessor: {e}"),
    }
}

/// Records the end of the take-over.
pub(super) fn taken_over(p: &mut Process, done: TakeOverDone) {
    match done {
        // A worker introduced by its supervisor: no upgrade happened.
        Ok((pred, _, _, history))
            if p.role().first_start_without_history() && history.is_empty() =>
        {
            tracing::info!(
                supervisor = pred,
                "worker serving the supervisor's listeners"
            );
        }
        Ok((pred, counters, total, history)) => {
            // The predecessor counted this upgrade in `upgrades_ok` before its snapshot.
            if p.role().carries_counters() {
                p.metrics().absorb(&counters);
            }
            tracing::info!(predecessor = pred, connections = total, "upgrade complete");
            // The predecessor's history ends with this upgrade's own record.
            let carried: Vec<UpgradeRecord> = history
                .into_iter()
                .filter_map(|v| serde_json::from_value(v).ok())
                .collect();
            if carried.is_empty() {
                p.record_upgrade(
                    true,
                    format!("took over from pid {pred}: {total} connections received"),
                );
            } else {
                p.carry_history(carried);
            }
        }
        Err(e) => tracing::warn!(reason = %e, "take-over ended early"),
    }
    p.set_phase(Phase::Ready);
}
