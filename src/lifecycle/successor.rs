//! The successor's side of a handover: say hello, adopt the predecessor's listeners (bind
//! only the new ones), report ready, then receive the live connections. Connections received
//! before the predecessor's `Commit` are held untouched, so if the upgrade is rolled back the
//! predecessor resumes them with no byte read or written here.

use super::process::{Process, UpgradeRecord};
use super::{LifecycleError, Phase};
use crate::handover::{self, Channel, HandoverError, Message};
use crate::metrics::Counters;
use crate::proxy::{self, ListenerCtx};
use crate::registry::Parked;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// A successor that has its listeners and still has to receive the connections.
pub(super) struct TakeOver {
    ch: Channel,
    adopted: Vec<String>,
    predecessor: u32,
}

/// What the end of a take-over reports: the predecessor's counters, or why it ended early.
pub(super) type TakeOverDone = Result<(u32, Counters, usize, Vec<serde_json::Value>), String>;

/// Progress of a take-over, reported to the main loop.
#[derive(Debug)]
pub(super) enum TakeOverEvent {
    /// The predecessor committed: start accepting, take the control socket and pid file,
    /// then answer on the sender (the predecessor waits for that before it reports success).
    Committed(tokio::sync::oneshot::Sender<()>),
    /// The predecessor is done (or the take-over ended early).
    Done(TakeOverDone),
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
) -> Result<TakeOver, LifecycleError> {
    let mut ch = ch.map_err(|e| refused("handover channel", e))?;
    ch.send(&handover::hello(), &[], &[])
        .await
        .map_err(|e| refused("send hello", e))?;
    let predecessor = match ch
        .recv()
        .await
        .map_err(|e| refused("receive hello", e))?
        .msg
    {
        Message::Hello {
            protocol_version,
            pid,
            ..
        } if protocol_version == handover::PROTOCOL_VERSION => pid,
        Message::Hello {
            protocol_version, ..
        } => {
            return Err(refused(
                "predecessor",
                format!("speaks protocol {protocol_version}"),
            ));
        }
        other => return Err(refused("expected hello", format!("got {}", other.name()))),
    };
    let received = handover::recv_listeners(&mut ch)
        .await
        .map_err(|e| refused("receive listeners", e))?;
    let mut inherited: BTreeMap<String, (std::net::SocketAddr, std::os::fd::OwnedFd)> = received
        .into_iter()
        .map(|(e, fd)| (e.name, (e.addr, fd)))
        .collect();
    let mut adopted = Vec::new();
    let mut result = Ok(());
    for l in p.cfg.listeners.clone().values() {
        // Same name and same address (or a config asking for any port on the same IP): adopt.
        let same = inherited.get(&l.name).is_some_and(|(addr, _)| {
            *addr == l.listen || (l.listen.port() == 0 && addr.ip() == l.listen.ip())
        });
        let sock = if same {
            let Some((_, fd)) = inherited.remove(&l.name) else {
                continue;
            };
            adopted.push(l.name.clone());
            crate::listener::adopt(fd)
                .map_err(|e| refused(&format!("adopt listener {}", l.name), e))
        } else {
            crate::listener::bind(l).map_err(|source| LifecycleError::Bind {
                name: l.name.clone(),
                addr: l.listen,
                source,
            })
        };
        // Accepting starts only at the predecessor's commit: until then a rollback loses nothing.
        match sock.and_then(|s| p.start_listener_paused(&l.name, s)) {
            Ok(()) => {}
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if let Err(e) = result {
        let _ = ch
            .send(
                &Message::Refused {
                    reason: e.to_string(),
                },
                &[],
                &[],
            )
            .await;
        return Err(e);
    }
    tracing::info!(predecessor, adopted = ?adopted, "listeners taken over");
    Ok(TakeOver {
        ch,
        adopted,
        predecessor,
    })
}

impl TakeOver {
    /// Reports ready and receives connections in the background, reporting progress.
    pub(super) fn finish(self, p: &mut Process) -> mpsc::Receiver<TakeOverEvent> {
        let ctxs: BTreeMap<String, Arc<ListenerCtx>> = p
            .slots
            .iter()
            .map(|(n, s)| (n.clone(), s.ctx.clone()))
            .collect();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let done = receive(self, ctxs, &tx).await;
            let _ = tx.send(TakeOverEvent::Done(done)).await;
        });
        rx
    }
}

/// Tells the predecessor why this successor gives up; returns the reason.
async fn abort(ch: &mut Channel, reason: String) -> String {
    let _ = handover::send_abort(ch, &reason).await;
    reason
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

async fn receive(
    mut t: TakeOver,
    ctxs: BTreeMap<String, Arc<ListenerCtx>>,
    events: &mpsc::Sender<TakeOverEvent>,
) -> TakeOverDone {
    if crate::test_hooks::fault("slow_ready") {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    t.ch.send(
        &Message::Ready {
            adopted: t.adopted.clone(),
        },
        &[],
        &[],
    )
    .await
    .map_err(|e| format!("send ready: {e}"))?;
    let mut held: Vec<Parked> = Vec::new();
    let mut committed = false;
    let mut total = 0usize;
    loop {
        let received = match t.ch.recv().await {
            Ok(r) => r,
            Err(e) => {
                // The predecessor is gone: whatever it gave us is ours to serve.
                if !committed {
                    go_live(events).await;
                }
                resume_all(&ctxs, std::mem::take(&mut held)).await;
                return Err(format!("predecessor channel ended: {e}"));
            }
        };
        match received.msg {
            Message::Conns { seq, .. } => {
                if crate::test_hooks::fault("kill_after_first_batch") {
                    tracing::warn!("test fault: killing myself mid-handover");
                    let _ = rustix::process::kill_process(
                        rustix::process::getpid(),
                        rustix::process::Signal::KILL,
                    );
                }
                let conns = match handover::recv_conns(received) {
                    Ok(c) => c,
                    Err(e) => {
                        return Err(
                            abort(&mut t.ch, format!("bad connection batch {seq}: {e}")).await
                        );
                    }
                };
                let count = conns.len();
                total += count;
                if committed {
                    resume_all(&ctxs, conns).await;
                } else {
                    held.extend(conns);
                }
                t.ch.send(
                    &Message::Ack {
                        seq,
                        count: count as u32,
                    },
                    &[],
                    &[],
                )
                .await
                .map_err(|e| format!("send ack: {e}"))?;
            }
            Message::Commit => {
                committed = true;
                go_live(events).await;
                // Seq 0 is never a batch: it acknowledges the commit.
                t.ch.send(&Message::Ack { seq: 0, count: 0 }, &[], &[])
                    .await
                    .map_err(|e| format!("send commit ack: {e}"))?;
                tracing::info!(
                    connections = held.len(),
                    "handover committed; serving received connections"
                );
                resume_all(&ctxs, std::mem::take(&mut held)).await;
            }
            Message::Done { counters, history } => {
                if !committed {
                    go_live(events).await;
                }
                resume_all(&ctxs, std::mem::take(&mut held)).await;
                return Ok((t.predecessor, counters, total, history));
            }
            Message::Abort { reason } => {
                // The predecessor keeps everything; drop our copies without touching them.
                drop(held);
                return Err(format!("predecessor aborted: {reason}"));
            }
            other => {
                return Err(abort(
                    &mut t.ch,
                    format!("unexpected {} from predecessor", other.name()),
                )
                .await);
            }
        }
    }
}

/// Records the end of the take-over.
pub(super) fn taken_over(p: &mut Process, done: TakeOverDone) {
    match done {
        Ok((pred, counters, total, history)) => {
            // The predecessor counted this upgrade in `upgrades_ok` before its snapshot.
            p.metrics.absorb(&counters);
            tracing::info!(predecessor = pred, connections = total, "upgrade complete");
            // The predecessor's history ends with this upgrade's own record.
            let mut carried: Vec<UpgradeRecord> = history
                .into_iter()
                .filter_map(|v| serde_json::from_value(v).ok())
                .collect();
            if carried.is_empty() {
                carried.push(UpgradeRecord {
                    at_ms: crate::registry::now_ms(),
                    ok: true,
                    summary: format!("took over from pid {pred}: {total} connections received"),
                });
            }
            carried.append(&mut p.history);
            let keep = carried.len().saturating_sub(super::process::HISTORY_LEN);
            p.history = carried.split_off(keep);
        }
        Err(e) => tracing::warn!(reason = %e, "take-over ended early"),
    }
    p.set_phase(Phase::Ready);
}
