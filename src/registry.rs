//! The connection registry: which live connections exist, what they are, and their state.
//!
//! It is the one thing the data path ([`crate::proxy`]) and the upgrade ([`crate::handover`],
//! [`crate::lifecycle`]) share. Each connection task registers itself and holds a
//! [`ConnHandle`]; dropping the handle removes the entry. To hand connections over, the
//! lifecycle calls [`Registry::park_where`] for the listeners the successor adopted: each of
//! those tasks stops at its next safe point and sends what it holds (sockets, pending bytes,
//! metadata) as a plain [`Parked`] value to the channel returned by [`Registry::new`]. The data
//! path never sees signals or the channel.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, watch, Notify};

/// Identifies a connection within one process generation.
pub type ConnId = u64;

/// What a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnKind {
    /// An L4 tunnel from a `tcp` listener.
    Tcp,
    /// An HTTP/1.1 client connection.
    Http,
    /// An HTTP/2 client connection (cannot be handed over; drained with GOAWAY).
    Http2,
    /// A tunnel made by HTTP `Upgrade` (WebSocket) or `CONNECT`.
    Tunnel,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum ConnState {
    /// Choosing and connecting to a server.
    Connecting = 0,
    /// Relaying bytes (tunnels) or serving a request (HTTP).
    Active = 1,
    /// An HTTP connection between requests.
    Idle = 2,
    /// Finishing its work because the process is stopping or upgrading.
    Draining = 3,
}

impl ConnState {
    fn from_u8(v: u8) -> ConnState {
        match v {
            0 => ConnState::Connecting,
            1 => ConnState::Active,
            2 => ConnState::Idle,
            _ => ConnState::Draining,
        }
    }
}

/// Facts about a connection that travel with it across an upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnMeta {
    /// Listener that accepted it.
    pub listener: String,
    /// Client's address.
    pub client: SocketAddr,
    /// Upstream server, once chosen.
    pub server: Option<SocketAddr>,
    /// What it carries.
    pub kind: ConnKind,
    /// When it was accepted, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// Bytes received from the client so far.
    pub bytes_in: u64,
    /// Bytes sent to the client so far.
    pub bytes_out: u64,
}

pub use crate::clock::now_ms;

/// One direction of a tunnel, stopped: bytes read but not yet written, and its end state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingHalf {
    /// Bytes read from the source and not yet written to the destination, in order.
    pub bytes: Vec<u8>,
    /// The source has sent FIN.
    pub read_eof: bool,
    /// The FIN was passed on (`shutdown(write)` done on the destination).
    pub shut: bool,
}

/// The TLS side of a parked client connection: its session as plain data (secrets
/// included: it travels only over the private handover channel) and its handshake's facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTls {
    /// The record layer's state.
    pub parked: crate::tls::record::ParkedTls,
    /// What the handshake agreed on, for the access log.
    pub facts: Option<TlsFacts>,
}

/// The TLS side of a parked upstream connection (`upstreams.X.tls`): its session on baton's
/// record layer as plain data (secrets included: it travels only over the private handover
/// channel), and the upstream whose settings made it (a pooled connection goes back to that
/// upstream's pool entries only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamSession {
    /// The upstream's name.
    pub upstream: String,
    /// The record layer's state.
    pub parked: crate::tls::record::ParkedTls,
}

/// A stopped tunnel: both sockets and everything in flight between them.
#[derive(Debug)]
pub struct TunnelState {
    /// Metadata and counters.
    pub meta: ConnMeta,
    /// The client side.
    pub client: std::net::TcpStream,
    /// The client's TLS session, if it arrived over TLS (boxed: it is large).
    pub client_tls: Option<Box<ClientTls>>,
    /// The upstream side.
    pub upstream: std::net::TcpStream,
    /// The upstream's TLS session, if the tunnel speaks TLS to its server.
    pub upstream_tls: Option<Box<UpstreamSession>>,
    /// Client → upstream direction.
    pub to_upstream: PendingHalf,
    /// Upstream → client direction.
    pub to_client: PendingHalf,
    /// How long no byte had moved either way when it parked, in milliseconds: the successor's
    /// `idle_timeout` counts on from there rather than from zero.
    pub idle_ms: u64,
}

/// An HTTP/1.1 client connection stopped between requests.
#[derive(Debug)]
pub struct IdleHttpState {
    /// Metadata and counters.
    pub meta: ConnMeta,
    /// The client socket.
    pub client: std::net::TcpStream,
    /// Bytes already read from the client but not yet parsed (the start of the next request).
    pub read_ahead: Vec<u8>,
}

/// An HTTP/1.1 client connection stopped in any phase: its sockets and the engine's state
/// (phase, buffers, framing, request metadata), which the successor resumes from.
#[derive(Debug)]
pub struct HttpState {
    /// Metadata and counters.
    pub meta: ConnMeta,
    /// The client socket.
    pub client: std::net::TcpStream,
    /// The client's TLS session, if it arrived over TLS (boxed: it is large).
    pub client_tls: Option<Box<ClientTls>>,
    /// The upstream socket of the request in flight, if one is attached.
    pub upstream: Option<std::net::TcpStream>,
    /// Its TLS session, if the upstream is spoken to over TLS.
    pub upstream_tls: Option<Box<UpstreamSession>>,
    /// Everything else, as plain data.
    pub state: crate::proxy::http::h1::state::State,
}

/// An idle pooled upstream HTTP/1.1 connection: the successor starts with a warm pool.
/// `meta.server` is its server; it has no client, so `meta.client` holds the server too.
#[derive(Debug)]
pub struct PooledState {
    /// The listener whose pool held it, and its server.
    pub meta: ConnMeta,
    /// The upstream socket.
    pub upstream: std::net::TcpStream,
    /// Its TLS session, for a connection to a TLS upstream.
    pub tls: Option<Box<UpstreamSession>>,
}

/// What a connection holds when stopped for a handover.
#[derive(Debug)]
pub enum Parked {
    /// A TCP or Upgrade/CONNECT tunnel.
    Tunnel(TunnelState),
    /// An idle HTTP/1.1 keep-alive connection.
    IdleHttp(IdleHttpState),
    /// An HTTP/1.1 connection in any phase (boxed: it is larger than the others).
    Http(Box<HttpState>),
    /// An idle pooled upstream connection.
    Pooled(PooledState),
}

impl Parked {
    /// The client's TLS session, for a connection that arrived over TLS.
    pub fn client_tls(&self) -> Option<&ClientTls> {
        match self {
            Parked::Tunnel(t) => t.client_tls.as_deref(),
            Parked::Http(h) => h.client_tls.as_deref(),
            Parked::IdleHttp(_) | Parked::Pooled(_) => None,
        }
    }

    /// The upstream side's TLS session, for a connection to a TLS upstream.
    pub fn upstream_tls(&self) -> Option<&UpstreamSession> {
        match self {
            Parked::Tunnel(t) => t.upstream_tls.as_deref(),
            Parked::Http(h) => h.upstream_tls.as_deref(),
            Parked::Pooled(p) => p.tls.as_deref(),
            Parked::IdleHttp(_) => None,
        }
    }

    /// The connection's metadata.
    pub fn meta(&self) -> &ConnMeta {
        match self {
            Parked::Tunnel(t) => &t.meta,
            Parked::IdleHttp(h) => &h.meta,
            Parked::Http(h) => &h.meta,
            Parked::Pooled(p) => &p.meta,
        }
    }
}

/// Live, shared facts about one registered connection.
#[derive(Debug)]
pub struct ConnStats {
    /// Its id.
    pub id: ConnId,
    /// Listener name.
    pub listener: Arc<str>,
    /// Client address.
    pub client: SocketAddr,
    /// Kind, which may change (HTTP connection upgraded into a tunnel).
    kind: Mutex<ConnKind>,
    /// Upstream server, once chosen.
    server: Mutex<Option<SocketAddr>>,
    /// Accept time, ms since the epoch.
    pub started_ms: u64,
    state: AtomicU8,
    /// Bytes from the client.
    pub bytes_in: AtomicU64,
    /// Bytes to the client.
    pub bytes_out: AtomicU64,
    /// What the connection was asked to do: [`SIG_PARK`] (stop and park for a handover),
    /// [`SIG_DRAIN`] (the process stops: finish the current work, take no more), [`SIG_KILL`]
    /// (close now). Set under the registry lock, then [`ConnStats::wake`] is notified.
    signals: AtomicU8,
    /// Wakes the connection's waiters after a bit of `signals` was set. One `Notify` instead
    /// of three cancellation tokens (child nodes of the registry's parent tokens, 112 bytes
    /// each plus a slot in the parent's child list, and three waiter futures in every
    /// connection task): an idle connection is mostly this bookkeeping.
    wake: Notify,
    /// The one task that polls [`ConnHandle::poll_requested`] (the HTTP/1.1 engine's): a
    /// waker slot costs it a compare per wait, where a `Notified` future costs a lock, a
    /// waiter-list insertion and a removal — three times per keep-alive request.
    task: atomic_waker::AtomicWaker,
    /// Set when the connection cannot be handed over (a TLS connection served by rustls):
    /// asked to park, it is asked to drain instead and finishes in this process.
    pinned: AtomicBool,
    /// The TLS facts of a connection that arrived over TLS (set once, after its handshake).
    tls: std::sync::OnceLock<Box<TlsFacts>>,
}

/// What a TLS handshake agreed on, for the access log and the status page. Travels with a
/// connection that moves, like the rest of its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFacts {
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: String,
    /// The IANA name of the cipher suite, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher: String,
    /// The server name the client asked for.
    pub sni: Option<String>,
    /// The protocol agreed by ALPN.
    pub alpn: Option<String>,
    /// The session was resumed (ticket or session id).
    pub resumed: bool,
}

/// Signal bit: stop at the next safe point and park (handover).
pub const SIG_PARK: u8 = 1;
/// Signal bit: the process is stopping; finish the current work and close.
pub const SIG_DRAIN: u8 = 2;
/// Signal bit: close now.
pub const SIG_KILL: u8 = 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConnStats {
    /// Current state.
    pub fn state(&self) -> ConnState {
        ConnState::from_u8(self.state.load(Ordering::Relaxed))
    }
    /// Sets the state.
    pub fn set_state(&self, s: ConnState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }
    /// Current kind.
    pub fn kind(&self) -> ConnKind {
        *lock(&self.kind)
    }
    /// Changes the kind (an HTTP connection that became a tunnel).
    pub fn set_kind(&self, k: ConnKind) {
        *lock(&self.kind) = k;
    }
    /// The chosen server.
    pub fn server(&self) -> Option<SocketAddr> {
        *lock(&self.server)
    }
    /// Records the chosen server.
    pub fn set_server(&self, s: Option<SocketAddr>) {
        *lock(&self.server) = s;
    }
    /// The signal bits set so far ([`SIG_PARK`], [`SIG_DRAIN`], [`SIG_KILL`]).
    pub fn signals(&self) -> u8 {
        self.signals.load(Ordering::Acquire)
    }
    /// Sets signal bits and wakes the connection's waiters. Callers hold the registry lock.
    fn signal(&self, bits: u8) {
        self.signals.fetch_or(bits, Ordering::Release);
        self.wake.notify_waiters();
        self.task.wake();
    }
    /// Whether, asked to park, this connection parks at once (so a handover waits for it
    /// before the commit): tunnels and HTTP/1.1 connections park wherever they are. An
    /// HTTP/2 one never parks (its state lives in hyper: it gets GOAWAY and finishes here),
    /// so waiting for it would only hold every listener paused until the deadline.
    pub fn parks_promptly(&self) -> bool {
        self.kind() != ConnKind::Http2 && !self.is_pinned()
    }
    /// Marks the connection as one that cannot be handed over (see `pinned`).
    pub fn set_pinned(&self) {
        self.pinned.store(true, Ordering::Relaxed);
    }
    /// Whether it cannot be handed over.
    pub fn is_pinned(&self) -> bool {
        self.pinned.load(Ordering::Relaxed)
    }
    /// Records what the connection's TLS handshake agreed on.
    pub fn set_tls(&self, facts: TlsFacts) {
        let _ = self.tls.set(Box::new(facts));
    }
    /// The TLS facts, for a connection that arrived over TLS.
    pub fn tls(&self) -> Option<&TlsFacts> {
        self.tls.get().map(|b| &**b)
    }
    /// The signal that asks this connection to leave for a handover: park, or drain for a
    /// connection that cannot move.
    fn handover_signal(&self) -> u8 {
        if self.is_pinned() {
            SIG_DRAIN
        } else {
            SIG_PARK
        }
    }

    /// A snapshot of the metadata, with current counters.
    pub fn meta(&self) -> ConnMeta {
        ConnMeta {
            listener: self.listener.to_string(),
            client: self.client,
            server: self.server(),
            kind: self.kind(),
            started_ms: self.started_ms,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }
}

/// A registered connection; dropping it removes the entry.
#[derive(Debug)]
pub struct ConnHandle {
    stats: Arc<ConnStats>,
    registry: Arc<Registry>,
}

impl ConnHandle {
    /// The shared facts.
    pub fn stats(&self) -> &Arc<ConnStats> {
        &self.stats
    }
    /// Resolves with the signal bits ([`SIG_PARK`], [`SIG_DRAIN`], [`SIG_KILL`]) once any bit
    /// of `mask` is set. One future for all three: it is what an idle connection waits on.
    pub async fn requested(&self, mask: u8) -> u8 {
        loop {
            // Made before the check: `notify_waiters` reaches a `Notified` from its creation.
            let woken = self.stats.wake.notified();
            let bits = self.stats.signals.load(Ordering::Acquire);
            if bits & mask != 0 {
                return bits;
            }
            woken.await;
        }
    }
    /// [`ConnHandle::requested`] for a task that polls by hand: `Ready(bits)` once any bit of
    /// `mask` is set, else `Pending` with `cx`'s waker kept until a signal wakes it. Only one
    /// task per connection may use this (the slot holds one waker); others use `requested`.
    pub fn poll_requested(&self, mask: u8, cx: &mut std::task::Context<'_>) -> std::task::Poll<u8> {
        // Registered before the check, so a signal set in between still wakes the task.
        self.stats.task.register(cx.waker());
        let bits = self.stats.signals.load(Ordering::Acquire);
        if bits & mask != 0 {
            std::task::Poll::Ready(bits)
        } else {
            std::task::Poll::Pending
        }
    }
    /// Resolves when the connection is asked to stop at its next safe point and park.
    pub async fn park_requested(&self) {
        self.requested(SIG_PARK).await;
    }
    /// Whether park, drain or kill may have been asked for: one atomic load. A loop that
    /// polled the `*_requested` futures once (to register its waker) needs to poll them
    /// again only once this is true.
    pub fn signalled(&self) -> bool {
        self.stats.signals.load(Ordering::Acquire) != 0
    }
    /// Resolves when the process is stopping: serve no new requests (HTTP keep-alive ends).
    pub async fn drain_requested(&self) {
        self.requested(SIG_DRAIN).await;
    }
    /// Resolves when the connection must close now.
    pub async fn kill_requested(&self) {
        self.requested(SIG_KILL).await;
    }
    /// Hands a stopped connection to the lifecycle, and deregisters it.
    pub fn park(self, parked: Parked) {
        if let Err(mpsc::error::SendError(p)) = self.registry.parked_tx.send(parked) {
            // No lifecycle listens (process exiting): dropping closes the sockets.
            tracing::debug!(client = %p.meta().client, "parked connection dropped: no receiver");
        }
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        let mut conns = lock(&self.registry.conns);
        conns.remove(&self.stats.id);
        if conns.is_empty() {
            self.registry.emptied.notify_waiters();
        }
    }
}

/// Every live connection of this process.
#[derive(Debug)]
pub struct Registry {
    next_id: AtomicU64,
    // FxHash: ids are our own sequence numbers; SipHash cost ~80 instructions per insert and
    // remove, once each per connection.
    conns: Mutex<FxHashMap<ConnId, Arc<ConnStats>>>,
    /// The process is stopping: connections registered from now on start drained.
    draining: AtomicBool,
    parked_tx: mpsc::UnboundedSender<Parked>,
    /// Woken each time the last connection goes.
    emptied: Notify,
    /// Bumped after connections' signal bits were set (park, drain, kill): wakes whoever
    /// watches connections that have no task of their own (the HTTP idle watcher).
    signal_gen: watch::Sender<u64>,
}

/// Receives the connections that stopped for a handover.
pub type ParkedRx = mpsc::UnboundedReceiver<Parked>;

impl Registry {
    /// A new, empty registry, and the receiver of parked connections.
    pub fn new() -> (Arc<Registry>, ParkedRx) {
        let (parked_tx, rx) = mpsc::unbounded_channel();
        let r = Registry {
            next_id: AtomicU64::new(1),
            conns: Mutex::new(FxHashMap::default()),
            draining: AtomicBool::new(false),
            parked_tx,
            emptied: Notify::new(),
            signal_gen: watch::Sender::new(0),
        };
        (Arc::new(r), rx)
    }

    /// Changes each time park, drain or kill signals were sent to connections. A holder of
    /// connections without a task looks at their bits ([`ConnHandle::signalled`]) when it
    /// changes, instead of one waiter per connection.
    pub fn signal_changes(&self) -> watch::Receiver<u64> {
        self.signal_gen.subscribe()
    }

    fn signals_sent(&self) {
        self.signal_gen.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Registers a new connection.
    pub fn register(
        self: &Arc<Self>,
        listener: Arc<str>,
        client: SocketAddr,
        kind: ConnKind,
        started_ms: u64,
    ) -> ConnHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Held while `draining` is read and the entry inserted, so drain_all (which sets it
        // under this lock) either sees the entry or the entry sees the flag.
        let mut conns = lock(&self.conns);
        let signals = if self.draining.load(Ordering::Relaxed) {
            SIG_DRAIN
        } else {
            0
        };
        let stats = Arc::new(ConnStats {
            id,
            listener,
            client,
            kind: Mutex::new(kind),
            server: Mutex::new(None),
            started_ms,
            state: AtomicU8::new(ConnState::Connecting as u8),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            signals: AtomicU8::new(signals),
            wake: Notify::new(),
            task: atomic_waker::AtomicWaker::new(),
            pinned: AtomicBool::new(false),
            tls: std::sync::OnceLock::new(),
        });
        conns.insert(id, stats.clone());
        drop(conns);
        ConnHandle {
            stats,
            registry: self.clone(),
        }
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Whether no connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves once no connection is live.
    pub async fn wait_empty(&self) {
        loop {
            let notified = self.emptied.notified();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }

    /// A snapshot of every live connection.
    pub fn snapshot(&self) -> Vec<Arc<ConnStats>> {
        lock(&self.conns).values().cloned().collect()
    }

    /// How many live connections match `filter`, counted under the lock without copying.
    pub fn count(&self, filter: impl Fn(&ConnStats) -> bool) -> usize {
        lock(&self.conns).values().filter(|c| filter(c)).count()
    }

    /// Asks the live connections that match `filter` to stop at their next safe point and
    /// park; returns their ids.
    pub fn park_where(
        &self,
        filter: impl Fn(&ConnStats) -> bool,
    ) -> std::collections::HashSet<ConnId> {
        let conns = lock(&self.conns);
        let ids = conns
            .values()
            .filter(|c| filter(c))
            .map(|c| {
                c.signal(c.handover_signal());
                c.id
            })
            .collect();
        self.signals_sent();
        ids
    }

    /// Asks every live connection to stop at its next safe point and park. Connections
    /// registered afterwards are not affected. For in-process tests that drive the data path
    /// directly; an upgrade parks only the adopted listeners' connections ([`Self::park_where`]).
    pub fn park_all(&self) {
        let conns = lock(&self.conns);
        for c in conns.values() {
            c.signal(c.handover_signal());
        }
        self.signals_sent();
    }

    /// Asks every connection, now and later, to finish its current work and close (stop).
    pub fn drain_all(&self) {
        let conns = lock(&self.conns);
        self.draining.store(true, Ordering::Relaxed);
        for c in conns.values() {
            c.signal(SIG_DRAIN);
        }
        self.signals_sent();
    }

    /// Asks every live connection to close now.
    pub fn kill_all(&self) {
        let conns = lock(&self.conns);
        for c in conns.values() {
            c.signal(SIG_KILL);
        }
        self.signals_sent();
    }
}
