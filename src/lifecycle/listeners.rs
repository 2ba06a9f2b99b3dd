//! The listeners a process serves: per listener its accept task, and a duplicate of its socket
//! that a handover offers to the successor while the accept task keeps serving. Accepting
//! pauses for a handover and resumes on rollback without closing anything.

use super::{io_err, LifecycleError};
use crate::handover::session::Offer;
use crate::listener::Acceptor;
use crate::proxy::{self, ListenerCtx};
use crate::registry::Parked;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One listener being served.
struct Slot {
    ctx: Arc<ListenerCtx>,
    /// A duplicate of the listening socket, sent to a successor while the accept task keeps
    /// serving from the original.
    fd: OwnedFd,
    stop: CancellationToken,
    task: Option<JoinHandle<Acceptor>>,
    /// The socket while accepting is paused (during a handover), kept to resume on rollback.
    paused: Option<Acceptor>,
}

impl Slot {
    /// The address the socket is bound to (the configured one if the kernel will not say).
    fn local_addr(&self) -> SocketAddr {
        rustix::net::getsockname(&self.fd)
            .ok()
            .and_then(|a| SocketAddr::try_from(a).ok())
            .unwrap_or(self.ctx.cfg.listen)
    }
}

/// Every listener of the process, by name.
#[derive(Default)]
pub(super) struct Listeners {
    slots: BTreeMap<String, Slot>,
    /// A worker sharing its accept queue with the others: when it takes its turn
    /// ([`crate::spread`]).
    turn: Option<Arc<crate::spread::Turn>>,
}

impl Listeners {
    /// No listener yet; accepting takes turns with the other workers when `turn` is given.
    pub fn taking_turns(turn: Option<Arc<crate::spread::Turn>>) -> Listeners {
        Listeners {
            slots: BTreeMap::new(),
            turn,
        }
    }

    /// Marks this process as accepting (or not) for the other workers.
    fn accepting(&self, on: bool) {
        if let Some(t) = &self.turn {
            t.set_accepting(on);
        }
    }

    /// Serves `l` as listener `name`, accepting at once or (`accept: false`) only from
    /// [`Self::resume`] on.
    pub fn add(
        &mut self,
        name: &str,
        ctx: Arc<ListenerCtx>,
        l: std::net::TcpListener,
        accept: bool,
    ) -> Result<(), LifecycleError> {
        let fd = OwnedFd::from(l.try_clone().map_err(io_err(format!("listener {name}")))?);
        let listener =
            crate::listener::Acceptor::new(l).map_err(io_err(format!("listener {name}")))?;
        let addr = listener
            .local_addr()
            .map_err(io_err(format!("listener {name}")))?;
        let stop = CancellationToken::new();
        let (task, paused) = if accept {
            self.accepting(true);
            let serve =
                proxy::serve_in_turn(listener, ctx.clone(), stop.clone(), self.turn.clone());
            (Some(tokio::spawn(serve)), None)
        } else {
            (None, Some(listener))
        };
        tracing::info!(listener = name, addr = %addr, protocol = %ctx.cfg.protocol, "listening");
        let slot = Slot {
            ctx,
            fd,
            stop,
            task,
            paused,
        };
        self.slots.insert(name.to_string(), slot);
        Ok(())
    }

    /// Stops accepting on every listener but keeps the sockets open (they may be needed again
    /// if a successor fails).
    pub async fn pause(&mut self) {
        self.accepting(false);
        for slot in self.slots.values_mut() {
            slot.stop.cancel();
            if let Some(task) = slot.task.take() {
                slot.paused = task.await.ok();
            }
        }
    }

    /// Resumes accepting on paused listeners (rollback, or a successor's commit).
    pub fn resume(&mut self) {
        self.accepting(true);
        for (name, slot) in self.slots.iter_mut() {
            if let Some(l) = slot.paused.take() {
                slot.stop = CancellationToken::new();
                let serve =
                    proxy::serve_in_turn(l, slot.ctx.clone(), slot.stop.clone(), self.turn.clone());
                slot.task = Some(tokio::spawn(serve));
                tracing::info!(listener = %name, "accepting again");
            }
        }
    }

    /// Stops accepting and closes every listener (the duplicate fds kept for a handover too).
    pub async fn close(&mut self) {
        self.pause().await;
        self.slots.clear();
    }

    /// How many listeners are served.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// The context of listener `name`: where its connections are served.
    pub fn ctx(&self, name: &str) -> Option<&Arc<ListenerCtx>> {
        self.slots.get(name).map(|s| &s.ctx)
    }

    /// Every listener's context, by name (for connections received from a predecessor).
    pub fn contexts(&self) -> BTreeMap<String, Arc<ListenerCtx>> {
        self.slots
            .iter()
            .map(|(n, s)| (n.clone(), s.ctx.clone()))
            .collect()
    }

    /// The address listener `name` is bound to, if it is served.
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.slots.get(name).map(Slot::local_addr)
    }

    /// What a handover offers a successor: name, address, protocol and socket of each.
    pub fn offers(&self) -> Vec<Offer<'_>> {
        self.slots
            .iter()
            .map(|(name, slot)| {
                let fd = slot.fd.as_fd();
                (name.as_str(), slot.local_addr(), slot.ctx.cfg.protocol, fd)
            })
            .collect()
    }

    /// The idle pooled upstream connections of the listeners named in `adopted`, parked.
    pub fn take_pooled(&self, adopted: &HashSet<String>) -> Vec<Parked> {
        self.slots
            .iter()
            .filter(|(name, _)| adopted.contains(*name))
            .flat_map(|(_, slot)| slot.ctx.take_pooled())
            .collect()
    }
}
