//! The supervisor owns the listening sockets: it binds them at start, and on a reload or an
//! upgrade it binds the listeners the new config adds (it keeps `net_bind_service`, so a port
//! below 1024 works while the workers run unprivileged), hands the new set to every new
//! worker, and closes the ones the new config removes once every worker is replaced. A
//! listener that cannot be bound refuses the whole reload before any worker is touched.

use super::worker::ListenerFd;
use super::{io_err, SupervisorError};
use crate::config::{AcceptMode, Config, Listener};
use std::net::SocketAddr;

/// The listener sets after a config change, before they are in force.
#[derive(Debug)]
pub(super) struct Change {
    /// One set (`shared`) or one per worker (`reuseport`): the sockets kept (duplicates of
    /// the running ones) and the ones bound for this change.
    pub sets: Vec<Vec<ListenerFd>>,
    /// Listeners bound for this change (new, or at a new address), with their address.
    pub added: Vec<(String, SocketAddr)>,
    /// Listeners the new config no longer has (or has at another address).
    pub removed: Vec<String>,
}

impl Change {
    /// `listeners added a (addr), b (addr); removed c`, for the summary and the log.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.added.is_empty() {
            let added: Vec<String> = self
                .added
                .iter()
                .map(|(n, a)| format!("{n} ({a})"))
                .collect();
            parts.push(format!("added {}", added.join(", ")));
        }
        if !self.removed.is_empty() {
            parts.push(format!("removed {}", self.removed.join(", ")));
        }
        format!("listeners {}", parts.join("; "))
    }
}

/// How many sockets each listener has: one (`shared`), or one per worker (`reuseport`).
fn copies(cfg: &Config) -> usize {
    match cfg.runtime.accept {
        AcceptMode::Shared => 1,
        AcceptMode::Reuseport => cfg.runtime.workers,
    }
}

/// Binds `copies` sockets for listener `l`, all on the port the first one got (SO_REUSEPORT
/// when there are several, or when the listener asks for it).
fn bind_listener(l: &Listener, copies: usize) -> Result<Vec<ListenerFd>, SupervisorError> {
    let mut lc = l.clone();
    lc.reuse_port = lc.reuse_port || copies > 1;
    let mut out = Vec::with_capacity(copies);
    for _ in 0..copies {
        let s = crate::listener::bind(&lc).map_err(|source| SupervisorError::Bind {
            name: l.name.clone(),
            addr: lc.listen,
            source,
        })?;
        let addr = s
            .local_addr()
            .map_err(io_err(format!("listener {}", l.name)))?;
        // The next sockets of a reuseport group bind the port the first one was given.
        lc.listen = addr;
        out.push(ListenerFd {
            name: l.name.clone(),
            addr,
            protocol: l.protocol,
            fd: s.into(),
        });
    }
    tracing::info!(listener = %l.name, addr = %lc.listen, protocol = %l.protocol,
        sockets = copies, "listening");
    Ok(out)
}

/// Binds every listener of `cfg`: one set (`shared`) or one set per worker (`reuseport`).
pub(super) fn bind_all(cfg: &Config) -> Result<Vec<Vec<ListenerFd>>, SupervisorError> {
    let n = copies(cfg);
    let mut sets: Vec<Vec<ListenerFd>> = (0..n).map(|_| Vec::new()).collect();
    for l in cfg.listeners.values() {
        for (set, fd) in sets.iter_mut().zip(bind_listener(l, n)?) {
            set.push(fd);
        }
    }
    Ok(sets)
}

/// Whether the running socket at `bound` serves listener `l` of a new config: same address,
/// or the config asks for any port on the same IP (the successor's adoption rule).
fn same_address(bound: SocketAddr, l: &Listener) -> bool {
    bound == l.listen || (l.listen.port() == 0 && bound.ip() == l.listen.ip())
}

/// The listener sets `new` needs, given the running `sets` (as many as the running accept
/// mode and number of workers make: those change with a restart only). `None` when the listeners
/// stay as they are. `Err` (nothing bound is kept) when a listener cannot be bound.
pub(super) fn plan(sets: &[Vec<ListenerFd>], new: &Config) -> Result<Option<Change>, String> {
    let Some(first) = sets.first() else {
        return Ok(None);
    };
    let mut added = Vec::new();
    // Per set, the sockets bound for this change (set i gets the i-th socket of each).
    let mut fresh: Vec<Vec<ListenerFd>> = sets.iter().map(|_| Vec::new()).collect();
    for l in new.listeners.values() {
        let kept = first
            .iter()
            .any(|x| x.name == l.name && same_address(x.addr, l));
        if kept {
            continue;
        }
        let bound = bind_listener(l, sets.len()).map_err(|e| e.to_string())?;
        added.push((l.name.clone(), bound.first().map_or(l.listen, |b| b.addr)));
        for (set, fd) in fresh.iter_mut().zip(bound) {
            set.push(fd);
        }
    }
    let removed: Vec<String> = first
        .iter()
        .filter(|x| {
            !new.listeners
                .get(&x.name)
                .is_some_and(|l| same_address(x.addr, l))
        })
        .map(|x| x.name.clone())
        .collect();
    if added.is_empty() && removed.is_empty() {
        return Ok(None);
    }
    let mut out: Vec<Vec<ListenerFd>> = Vec::with_capacity(sets.len());
    for (set, bound) in sets.iter().zip(fresh) {
        let mut next = Vec::new();
        for x in set.iter().filter(|x| !removed.contains(&x.name)) {
            let fd =
                x.fd.try_clone()
                    .map_err(|e| format!("listener {}: dup: {e}", x.name))?;
            let protocol = new
                .listeners
                .get(&x.name)
                .map_or(x.protocol, |l| l.protocol);
            next.push(ListenerFd {
                name: x.name.clone(),
                addr: x.addr,
                protocol,
                fd,
            });
        }
        next.extend(bound);
        out.push(next);
    }
    Ok(Some(Change {
        sets: out,
        added,
        removed,
    }))
}
