//! Upstream pools: their servers, how one is chosen, and whether each is healthy.
//!
//! (Placeholder round robin; balancers and health checks land in balance.rs and health.rs.)

use crate::config;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The pool has no server that may be tried.
    #[error("no server available in upstream {0}")]
    NoServer(String),
    /// Every attempt failed; the last error is kept.
    #[error("upstream {upstream}: {attempts} connect attempts failed, last to {server}: {reason}")]
    Failed {
        /// Upstream name.
        upstream: String,
        /// How many servers were tried.
        attempts: u32,
        /// The last server tried.
        server: SocketAddr,
        /// The last error.
        reason: String,
    },
}

/// One server and its live state.
#[derive(Debug)]
pub struct ServerState {
    addr: SocketAddr,
    weight: u32,
    active: AtomicUsize,
}

/// A server chosen for one connection; counts as active while held.
#[derive(Debug)]
pub struct ServerGuard {
    server: Arc<ServerState>,
}

impl ServerGuard {
    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.server.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A server as shown by status.
#[derive(Debug, Clone, Serialize)]
pub struct ServerStatus {
    /// Address.
    pub addr: SocketAddr,
    /// Weight.
    pub weight: u32,
    /// Passes health checks (true without checks).
    pub healthy: bool,
    /// Passively ejected right now.
    pub ejected: bool,
    /// Connections using it now.
    pub active: usize,
}

/// An upstream pool.
#[derive(Debug)]
pub struct Upstream {
    cfg: config::Upstream,
    servers: Vec<Arc<ServerState>>,
    next: AtomicUsize,
}

impl Upstream {
    /// Builds a pool from its configuration.
    pub fn new(cfg: &config::Upstream) -> Arc<Upstream> {
        let servers = cfg
            .servers
            .iter()
            .map(|s| {
                Arc::new(ServerState {
                    addr: s.addr,
                    weight: s.weight,
                    active: AtomicUsize::new(0),
                })
            })
            .collect();
        Arc::new(Upstream {
            cfg: cfg.clone(),
            servers,
            next: AtomicUsize::new(0),
        })
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The pool's configuration.
    pub fn config(&self) -> &config::Upstream {
        &self.cfg
    }

    /// Chooses a server for a client, skipping `exclude` (servers already tried).
    pub fn pick(&self, _client: IpAddr, exclude: &[SocketAddr]) -> Option<ServerGuard> {
        let n = self.servers.len();
        for _ in 0..n {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
            let s = &self.servers[i];
            if !exclude.contains(&s.addr) {
                s.active.fetch_add(1, Ordering::Relaxed);
                return Some(ServerGuard { server: s.clone() });
            }
        }
        None
    }

    /// Records the result of a connection attempt (passive health).
    pub fn report(&self, _addr: SocketAddr, _ok: bool) {}

    /// Connects to a server chosen for `client`, trying up to `retries` others on failure.
    pub async fn connect(&self, client: IpAddr) -> Result<(TcpStream, ServerGuard), ConnectError> {
        let mut tried = Vec::new();
        let mut last = None;
        while tried.len() as u32 <= self.cfg.retries {
            let Some(guard) = self.pick(client, &tried) else {
                break;
            };
            let addr = guard.addr();
            tried.push(addr);
            match tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    self.report(addr, true);
                    return Ok((s, guard));
                }
                Ok(Err(e)) => last = Some((addr, e.to_string())),
                Err(_) => last = Some((addr, "connect timed out".to_string())),
            }
            self.report(addr, false);
        }
        match last {
            None => Err(ConnectError::NoServer(self.cfg.name.clone())),
            Some((server, reason)) => Err(ConnectError::Failed {
                upstream: self.cfg.name.clone(),
                attempts: tried.len() as u32,
                server,
                reason,
            }),
        }
    }

    /// Starts the active health checks, stopped by `shutdown`.
    pub fn spawn_health_checks(self: &Arc<Self>, _shutdown: CancellationToken) {}

    /// The servers and their state.
    pub fn status(&self) -> Vec<ServerStatus> {
        self.servers
            .iter()
            .map(|s| ServerStatus {
                addr: s.addr,
                weight: s.weight,
                healthy: true,
                ejected: false,
                active: s.active.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// Every pool of a configuration, by name.
pub type Upstreams = BTreeMap<String, Arc<Upstream>>;

/// Builds every pool of `cfg`.
pub fn build(cfg: &config::Config) -> Upstreams {
    cfg.upstreams
        .iter()
        .map(|(n, u)| (n.clone(), Upstream::new(u)))
        .collect()
}
