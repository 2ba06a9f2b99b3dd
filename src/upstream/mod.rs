//! Upstream pools: their servers, how one is chosen, and whether each may be used.
//!
//! A pool ([`Upstream`]) holds its servers' live state: active connections, the health flag
//! written by active checks ([`health`]), and the passive-ejection state written by
//! [`Upstream::report`]. [`Upstream::pick`] asks the pool's [`balance::Balancer`] to choose
//! among servers that are healthy, not ejected and not already tried; when every server is
//! down it fails open and chooses among all of them (see docs/upstreams.md for why). The pick
//! path takes no lock except the round robin's short `Mutex`, and allocates nothing (round robin
//! re-sizes its state once after the set changed).
//!
//! The server set is swappable ([`Upstream::set_servers`], driven by DNS discovery in
//! [`resolve`]): a pick reads one snapshot of it (an `ArcSwap` load, no lock), a server that
//! stays across a swap keeps its state (health, ejection, active count), and a server that
//! leaves is no longer picked while the connections holding it run on until they end.

pub mod balance;
pub mod health;
pub mod resolve;

use crate::config;
use arc_swap::ArcSwap;
use balance::{Balancer, Candidates};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// This process is out of resources (file descriptors, memory).
    #[error("out of local resources: {0}")]
    Local(String),
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
    /// Where it listens.
    addr: SocketAddr,
    /// Relative weight, at least 1.
    weight: u32,
    /// The `host:port` entry it was resolved from; `None` for an `ip:port` entry.
    name: Option<Arc<str>>,
    /// Stable hash of `addr`, computed once for consistent hashing.
    key: u64,
    /// Connections holding a [`ServerGuard`] for it.
    active: AtomicUsize,
    /// Written by the active health checks; true when there are none.
    healthy: AtomicBool,
    /// Consecutive failed connects (passive health).
    failures: AtomicU32,
    /// Ejected until this time (ms on the pool's clock); 0 = not ejected.
    ejected_until: AtomicU64,
}

impl ServerState {
    /// A new server, healthy and not ejected.
    fn new(spec: &ServerSpec) -> ServerState {
        ServerState {
            addr: spec.addr,
            weight: spec.weight.max(1),
            name: spec.name.clone(),
            key: balance::hash_addr(spec.addr),
            active: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
        }
    }

    /// A server described anew (another weight or entry) that keeps the health and ejection
    /// state of `old`, the same address. Its active count starts at 0: the connections that
    /// hold `old` count against `old`.
    fn carried(spec: &ServerSpec, old: &ServerState) -> ServerState {
        let s = ServerState::new(spec);
        s.healthy
            .store(old.healthy.load(Ordering::Relaxed), Ordering::Relaxed);
        s.failures
            .store(old.failures.load(Ordering::Relaxed), Ordering::Relaxed);
        s.ejected_until
            .store(old.ejected_until.load(Ordering::Relaxed), Ordering::Relaxed);
        s
    }

    /// Whether this state describes `spec` exactly.
    fn is(&self, spec: &ServerSpec) -> bool {
        self.addr == spec.addr && self.weight == spec.weight.max(1) && self.name == spec.name
    }
}

/// A server a pool should have: what [`Upstream::set_servers`] is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Relative weight (0 counts as 1).
    pub weight: u32,
    /// The `host:port` entry it was resolved from; `None` for an `ip:port` entry.
    pub name: Option<Arc<str>>,
}

/// What a call to [`Upstream::set_servers`] changed, by address.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SetChange {
    /// Servers now in the set that were not before.
    pub added: Vec<SocketAddr>,
    /// Servers no longer in the set.
    pub removed: Vec<SocketAddr>,
}

impl SetChange {
    /// Whether nothing was added or removed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
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

    /// The host name of the server's `host:port` entry; `None` for an `ip:port` entry.
    pub fn host(&self) -> Option<&str> {
        self.server.host()
    }
}

impl ServerState {
    /// The host name of its `host:port` entry.
    fn host(&self) -> Option<&str> {
        self.name
            .as_deref()
            .map(|n| n.rsplit_once(':').map_or(n, |(h, _)| h))
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
    /// Consecutive failed connects counted towards ejection.
    pub failures: u32,
    /// The `host:port` entry it was resolved from (absent for an `ip:port` entry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Event counts of a pool, for metrics.
#[derive(Debug, Default)]
pub struct UpstreamCounters {
    /// Healthy → unhealthy transitions made by active checks.
    pub marked_down: AtomicU64,
    /// Unhealthy → healthy transitions made by active checks.
    pub marked_up: AtomicU64,
    /// Passive ejections.
    pub ejections: AtomicU64,
    /// Returns from passive ejection.
    pub returns: AtomicU64,
    /// Picks made while every server was down (fail-open).
    pub fail_open_picks: AtomicU64,
}

/// An upstream pool.
#[derive(Debug)]
pub struct Upstream {
    /// Its configuration.
    cfg: config::Upstream,
    /// Its servers, in configuration order (a hostname's addresses sorted, in its place);
    /// swapped whole when DNS discovery changes it.
    servers: ArcSwap<Vec<Arc<ServerState>>>,
    /// The active health-check tasks; its lock also serialises swaps of `servers`, so the
    /// tasks follow the set.
    checks: Mutex<health::Checks>,
    /// The balancing algorithm and its state.
    balancer: Balancer,
    /// Origin of the pool's millisecond clock (ejection deadlines, log rate limits), on the
    /// coarse monotonic clock: `pick` reads it once per request.
    epoch_ms: u64,
    /// When the fail-open warning was last logged (ms on the pool's clock, +1; 0 = never).
    last_fail_open_warn: AtomicU64,
    /// Health and ejection event counts.
    pub counters: UpstreamCounters,
    /// The process metrics' handle for this pool, set once by the lifecycle.
    metrics: std::sync::OnceLock<crate::metrics::UpstreamHandle>,
    /// TLS to the servers (`tls:`): the rustls client, or why it could not be set up (then
    /// connections fail; none is ever made in plain text instead).
    tls: Option<Result<Arc<crate::tls::TlsClient>, String>>,
    /// The pool key of its TLS connections (its name), shared by their pool entries.
    tls_key: Arc<str>,
}

/// Which servers a pick may choose.
struct View<'a> {
    up: &'a Upstream,
    /// The snapshot of the set this pick works on.
    servers: &'a [Arc<ServerState>],
    exclude: &'a [SocketAddr],
    /// Now, on the pool's clock.
    now: u64,
    /// Ignore health and ejection (fail-open).
    all: bool,
}

impl Candidates for View<'_> {
    fn len(&self) -> usize {
        self.servers.len()
    }
    fn eligible(&self, i: usize) -> bool {
        let s = &self.servers[i];
        !self.exclude.contains(&s.addr) && (self.all || self.up.usable(s, self.now))
    }
    fn weight(&self, i: usize) -> u32 {
        self.servers[i].weight
    }
    fn active(&self, i: usize) -> usize {
        self.servers[i].active.load(Ordering::Relaxed)
    }
    fn key(&self, i: usize) -> u64 {
        self.servers[i].key
    }
}

/// At most one fail-open warning per pool per this many ms.
const FAIL_OPEN_WARN_EVERY_MS: u64 = 1000;

impl Upstream {
    /// Builds a pool from its configuration. Only `ip:port` entries are servers at first;
    /// hostname entries join when [`resolve`] has resolved them.
    pub fn new(cfg: &config::Upstream) -> Arc<Upstream> {
        let servers: Vec<_> = cfg
            .servers
            .iter()
            .filter_map(|s| match s.addr {
                config::ServerAddr::Ip(addr) => Some(Arc::new(ServerState::new(&ServerSpec {
                    addr,
                    weight: s.weight,
                    name: None,
                }))),
                config::ServerAddr::Name { .. } => None,
            })
            .collect();
        let tls = cfg.tls.as_ref().map(|t| {
            crate::tls::client_config(t).map(Arc::new).map_err(|e| {
                tracing::error!(upstream = %cfg.name, error = %e, "cannot set up tls to the upstream; its connections will fail");
                e.to_string()
            })
        });
        Arc::new(Upstream {
            tls,
            tls_key: cfg.name.as_str().into(),
            balancer: Balancer::new(cfg.balance),
            cfg: cfg.clone(),
            servers: ArcSwap::from_pointee(servers),
            checks: Mutex::new(health::Checks::default()),
            epoch_ms: crate::clock::coarse_mono_ms(),
            last_fail_open_warn: AtomicU64::new(0),
            counters: UpstreamCounters::default(),
            metrics: std::sync::OnceLock::new(),
        })
    }

    /// Replaces the server set with `specs`, in their order (an address listed twice keeps
    /// its first entry). A server whose address, weight and entry stay keeps its state and
    /// identity; a removed server is no longer picked, while connections holding it run on.
    /// Health checks follow: started for added servers, stopped for removed ones.
    pub fn set_servers(&self, specs: &[ServerSpec]) -> SetChange {
        let mut checks = self.lock_checks();
        let old = self.servers.load_full();
        let mut new: Vec<Arc<ServerState>> = Vec::with_capacity(specs.len());
        for spec in specs {
            if new.iter().any(|s| s.addr == spec.addr) {
                continue;
            }
            new.push(match old.iter().find(|s| s.addr == spec.addr) {
                Some(s) if s.is(spec) => s.clone(),
                Some(s) => Arc::new(ServerState::carried(spec, s)),
                None => Arc::new(ServerState::new(spec)),
            });
        }
        let change = SetChange {
            added: new
                .iter()
                .filter(|s| !old.iter().any(|o| o.addr == s.addr))
                .map(|s| s.addr)
                .collect(),
            removed: old
                .iter()
                .filter(|o| !new.iter().any(|s| s.addr == o.addr))
                .map(|o| o.addr)
                .collect(),
        };
        checks.follow(&new);
        self.servers.store(Arc::new(new));
        change
    }

    /// The health-check state; a poisoned lock is taken over (it holds only task handles).
    fn lock_checks(&self) -> MutexGuard<'_, health::Checks> {
        self.checks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state of the server at `addr`, if it is in the set.
    fn find(&self, addr: SocketAddr) -> Option<Arc<ServerState>> {
        self.servers.load().iter().find(|s| s.addr == addr).cloned()
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The pool's configuration.
    pub fn config(&self) -> &config::Upstream {
        &self.cfg
    }

    /// Whether its servers are spoken to over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// What its pooled TLS connections are keyed by (its name; `None` for a plain upstream,
    /// whose connections any plain upstream with the same server may reuse).
    pub fn tls_key(&self) -> Option<Arc<str>> {
        self.tls.is_some().then(|| self.tls_key.clone())
    }

    /// Shakes hands, as this upstream's TLS client, with a server just connected on `tcp`;
    /// `host` is the host name of the server's entry, if it is a name (the default SNI).
    pub async fn start_tls(
        &self,
        tcp: TcpStream,
        host: Option<&str>,
    ) -> Result<crate::tls::record::TlsStream, crate::tls::UpstreamTlsError> {
        let client = match &self.tls {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(crate::tls::UpstreamTlsError::NotSetUp(e.clone())),
            None => {
                return Err(crate::tls::UpstreamTlsError::NotSetUp(
                    "no tls configured".into(),
                ))
            }
        };
        let name = client.name_for(host, tcp.peer_addr()?.ip());
        crate::tls::client::connect(tcp, client, name).await
    }

    /// The host name of the server at `addr`, if its entry is a name.
    pub fn host_of(&self, addr: SocketAddr) -> Option<String> {
        self.find(addr).and_then(|s| s.host().map(str::to_string))
    }

    /// Milliseconds since the pool was built, plus one, so 0 can mean "never".
    fn now_ms(&self) -> u64 {
        crate::clock::coarse_mono_ms().saturating_sub(self.epoch_ms) + 1
    }

    /// Healthy and not ejected at `now`. An ejection found expired is ended here (once, by
    /// whoever swaps it out) and logged, so returns need no timer task.
    fn usable(&self, s: &ServerState, now: u64) -> bool {
        if !s.healthy.load(Ordering::Relaxed) {
            return false;
        }
        let until = s.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if now < until {
            return false;
        }
        if s.ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.counters.returns.fetch_add(1, Ordering::Relaxed);
            tracing::info!(upstream = %self.cfg.name, server = %s.addr, reason = "ejection time over", "server returned from ejection");
        }
        true
    }

    /// Chooses a server for a client, skipping `exclude` (servers already tried).
    ///
    /// Only healthy, non-ejected servers are chosen. When no server of the pool is usable at
    /// all, the pick fails open among every server not in `exclude`, with a warning at most
    /// once a second. When usable servers exist but all are in `exclude`, it returns `None`:
    /// they were tried, and the rest are known down.
    pub fn pick(&self, client: IpAddr, exclude: &[SocketAddr]) -> Option<ServerGuard> {
        let now = self.now_ms();
        let servers = self.servers.load();
        let mut view = View {
            up: self,
            servers: &servers,
            exclude,
            now,
            all: false,
        };
        let i = match self.balancer.pick(&view, client) {
            Some(i) => i,
            None => {
                if servers.iter().any(|s| self.usable(s, now)) {
                    return None;
                }
                view.all = true;
                let i = self.balancer.pick(&view, client)?;
                self.counters
                    .fail_open_picks
                    .fetch_add(1, Ordering::Relaxed);
                self.warn_fail_open(now, servers.len());
                i
            }
        };
        let s = &servers[i];
        s.active.fetch_add(1, Ordering::Relaxed);
        Some(ServerGuard { server: s.clone() })
    }

    fn warn_fail_open(&self, now: u64, servers: usize) {
        let last = self.last_fail_open_warn.load(Ordering::Relaxed);
        if last != 0 && now < last + FAIL_OPEN_WARN_EVERY_MS {
            return;
        }
        if self
            .last_fail_open_warn
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let picks = self.counters.fail_open_picks.load(Ordering::Relaxed);
            tracing::warn!(upstream = %self.cfg.name, servers, fail_open_picks = picks, "every server is unhealthy or ejected; failing open and trying them anyway");
        }
    }

    /// Attaches the process metrics (once; later calls are ignored).
    pub fn set_metrics(&self, h: crate::metrics::UpstreamHandle) {
        let _ = self.metrics.set(h);
    }

    /// The process metrics' handle, once attached.
    pub fn metrics(&self) -> Option<&crate::metrics::UpstreamHandle> {
        self.metrics.get()
    }

    /// Records the result of a connection attempt (passive health). A success resets the
    /// server's failure count; `eject_after` failures in a row eject it for `eject_for`. A
    /// server back from ejection is on probation: its next failure ejects it again.
    pub fn report(&self, addr: SocketAddr, ok: bool) {
        let Some(s) = self.find(addr) else {
            // Removed from the set since it was picked: nothing left to judge.
            return;
        };
        if ok {
            s.failures.store(0, Ordering::Relaxed);
            return;
        }
        if let Some(m) = self.metrics() {
            m.connect_failure(addr);
        }
        let limit = self.cfg.eject_after;
        if limit == 0 {
            return;
        }
        let failures = s.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if failures < limit {
            return;
        }
        let now = self.now_ms();
        let until = now + self.cfg.eject_for.as_millis() as u64;
        let prev = s.ejected_until.swap(until, Ordering::Relaxed);
        s.failures.store(limit - 1, Ordering::Relaxed);
        if prev == 0 || prev <= now {
            self.counters.ejections.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = self.metrics() {
                m.ejection(addr);
            }
            tracing::warn!(upstream = %self.cfg.name, server = %addr, failures, eject_for = ?self.cfg.eject_for, reason = "consecutive connect failures", "server ejected");
        }
    }

    /// Records a connect to `addr` that failed with `e`. An error that says this process is
    /// out of file descriptors or memory (EMFILE, ENFILE, ENOMEM, ENOBUFS) is not the server's
    /// fault: it is not counted against it (no failure, no ejection, no metric) and `false` is
    /// returned; any other error counts as [`Upstream::report`]`(addr, false)` and gives `true`.
    /// The one call for every connect path (L4 here, HTTP in the proxy).
    pub fn report_connect_error(&self, addr: SocketAddr, e: &std::io::Error) -> bool {
        if crate::listener::is_resource_exhaustion(e) {
            tracing::debug!(upstream = %self.cfg.name, server = %addr, error = %e, "connect failed for lack of local resources; not held against the server");
            return false;
        }
        self.report(addr, false);
        true
    }

    /// Connects to a server chosen for `client`, trying up to `retries` others on failure.
    pub async fn connect(&self, client: IpAddr) -> Result<(TcpStream, ServerGuard), ConnectError> {
        self.connect_excluding(client, &mut Vec::new()).await
    }

    /// [`Upstream::connect`], skipping the servers in `tried` and adding each one it tries:
    /// a caller whose next step failed on the connected server (a TLS handshake) calls it
    /// again with the same list, so `retries` bounds all the attempts together.
    pub async fn connect_excluding(
        &self,
        client: IpAddr,
        tried: &mut Vec<SocketAddr>,
    ) -> Result<(TcpStream, ServerGuard), ConnectError> {
        let mut last = None;
        while tried.len() as u32 <= self.cfg.retries {
            let Some(guard) = self.pick(client, tried) else {
                break;
            };
            let addr = guard.addr();
            tried.push(addr);
            let reason = match tokio::time::timeout(
                self.cfg.connect_timeout,
                TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(s)) => {
                    self.report(addr, true);
                    return Ok((s, guard));
                }
                // Out of fds or memory here: not the server's fault, and no other server
                // would do better. Fail without counting it against the server.
                Ok(Err(e)) if crate::listener::is_resource_exhaustion(&e) => {
                    return Err(ConnectError::Local(e.to_string()));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("connect timed out after {:?}", self.cfg.connect_timeout),
            };
            tracing::debug!(upstream = %self.cfg.name, server = %addr, client = %client, error = %reason, "connect attempt failed");
            self.report(addr, false);
            last = Some((addr, reason));
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

    /// Starts the active health checks (if configured), stopped by `shutdown`. From then on
    /// they follow the server set: a server added later gets its own checks, a removed one
    /// loses them.
    pub fn spawn_health_checks(self: &Arc<Self>, shutdown: CancellationToken) {
        if let Some(hc) = &self.cfg.health_check {
            let mut checks = self.lock_checks();
            checks.start(self, hc, shutdown);
            checks.follow(&self.servers.load());
        }
    }

    /// The servers and their state.
    pub fn status(&self) -> Vec<ServerStatus> {
        let now = self.now_ms();
        self.servers
            .load()
            .iter()
            .map(|s| {
                let until = s.ejected_until.load(Ordering::Relaxed);
                ServerStatus {
                    addr: s.addr,
                    weight: s.weight,
                    healthy: s.healthy.load(Ordering::Relaxed),
                    ejected: until != 0 && now < until,
                    active: s.active.load(Ordering::Relaxed),
                    failures: s.failures.load(Ordering::Relaxed),
                    name: s.name.as_deref().map(str::to_string),
                }
            })
            .collect()
    }

    /// Marks a server healthy or not, as an active check would (for tests and admin tools).
    pub fn set_healthy(&self, addr: SocketAddr, healthy: bool) {
        if let Some(s) = self.find(addr) {
            s.healthy.store(healthy, Ordering::Relaxed);
        }
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

#[cfg(test)]
mod tests;
