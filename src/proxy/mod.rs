//! The data path: accept loops and the per-connection handlers for TCP and HTTP listeners.

pub mod client_io;
pub mod http;
pub mod plain_tcp;
pub mod tcp;
pub mod tls;

use crate::config;
use crate::listener::Acceptor;
use crate::metrics::Metrics;
use crate::registry::{Parked, Registry};
use crate::upstream::Upstreams;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;

/// Everything a connection of one listener needs.
#[derive(Debug)]
pub struct ListenerCtx {
    /// The listener's name, shared by its connections' registry entries.
    pub name: Arc<str>,
    /// The listener's configuration.
    pub cfg: config::Listener,
    /// Every upstream pool.
    pub upstreams: Upstreams,
    /// The live connections.
    pub registry: Arc<Registry>,
    /// Process counters.
    pub metrics: Arc<Metrics>,
    /// This listener's counters (and, through them, the process totals).
    pub lm: crate::metrics::ListenerHandle,
    /// Caps live connections at `max_connections`; accepting waits for a permit.
    pub limit: Arc<Semaphore>,
    /// h2c upstream connections of this listener (hyper), for HTTP/1.1 and h2c clients.
    pub http_pool: Arc<http::pool::Pool>,
    /// Idle upstream HTTP/1.1 connections of this listener's engine (raw sockets).
    pub h1_pool: Arc<http::h1::pool::RawPool>,
    /// The idle watcher of released keep-alive connections (HTTP listeners), started by the
    /// first release; `None` inside if it could not be created.
    pub idle_watcher: std::sync::OnceLock<Option<Arc<http::idle::Watcher>>>,
    /// The rustls config of a listener with `tls:`; `None` also when it could not be built,
    /// and then its connections are closed (never served in plain text).
    pub tls: Option<crate::tls::TlsServer>,
}

impl ListenerCtx {
    /// Builds the context of one listener (with session-ticket keys of its own).
    pub fn new(
        cfg: config::Listener,
        upstreams: Upstreams,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Arc<ListenerCtx> {
        Self::with_tickets(cfg, upstreams, registry, metrics, Arc::default())
    }

    /// Builds the context of one listener whose TLS session tickets are encrypted with the
    /// process's keys `tickets` (shared by its listeners, handed to the successor).
    pub fn with_tickets(
        cfg: config::Listener,
        upstreams: Upstreams,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        tickets: Arc<crate::tls::tickets::Ticketer>,
    ) -> Arc<ListenerCtx> {
        let tls = cfg.tls.as_ref().and_then(|t| {
            // Probes kernel TLS and logs, once per process, which record layer serves sessions.
            crate::tls::record::ktls::record_path();
            crate::tls::server_config(t, Some(tickets))
                .map_err(|e| tracing::error!(listener = %cfg.name, error = %e, "cannot set up tls; its connections will be closed"))
                .ok()
        });
        Arc::new(ListenerCtx {
            tls,
            name: cfg.name.as_str().into(),
            limit: Arc::new(Semaphore::new(cfg.max_connections)),
            http_pool: Arc::default(),
            h1_pool: Arc::default(),
            idle_watcher: std::sync::OnceLock::new(),
            lm: metrics.listener(&cfg.name),
            cfg,
            upstreams,
            registry,
            metrics,
        })
    }
}

impl ListenerCtx {
    /// Takes this listener's idle pooled upstream connections out, for a handover (a TLS one
    /// with its session, which cannot fail to park: a pooled session is idle and whole).
    pub fn take_pooled(&self) -> Vec<Parked> {
        let now = crate::registry::now_ms();
        self.h1_pool
            .take_all()
            .into_iter()
            .filter_map(|(key, io)| {
                let (upstream, tls, _) = io.park().ok()?;
                let tls = match (tls, key.tls) {
                    (Some(parked), Some(name)) => {
                        Some(Box::new(crate::registry::UpstreamSession {
                            upstream: name.to_string(),
                            parked,
                        }))
                    }
                    (None, None) => None,
                    // A pool entry whose key and transport disagree: not moved.
                    _ => return None,
                };
                Some(Parked::Pooled(crate::registry::PooledState {
                    meta: crate::registry::ConnMeta {
                        listener: self.name.to_string(),
                        client: key.addr,
                        server: Some(key.addr),
                        kind: crate::registry::ConnKind::Http,
                        started_ms: now,
                        bytes_in: 0,
                        bytes_out: 0,
                    },
                    upstream,
                    tls,
                }))
            })
            .collect()
    }

    /// Puts a pooled connection parked by a predecessor (or by a rolled-back upgrade) back in
    /// the pool. A TLS one goes back only to the upstream that made it, if it still exists and
    /// still speaks TLS (a reload may have changed that: then it is closed, and the next
    /// request opens a connection with the new settings).
    fn resume_pooled(&self, p: crate::registry::PooledState) {
        let Some(server) = p.meta.server else { return };
        let (key, max) = match &p.tls {
            None => {
                let max = self
                    .upstreams
                    .values()
                    .map(|u| u.config().http.pool_idle_per_server)
                    .max()
                    .unwrap_or(0);
                (http::h1::pool::PoolKey::plain(server), max)
            }
            Some(t) => match self.upstreams.get(&t.upstream) {
                Some(u) if u.is_tls() => (
                    http::h1::pool::PoolKey {
                        addr: server,
                        tls: u.tls_key(),
                    },
                    u.config().http.pool_idle_per_server,
                ),
                _ => return,
            },
        };
        if let Ok(io) = client_io::ClientIo::resume(p.upstream, p.tls.map(|t| t.parked)) {
            self.h1_pool.put(key, io, max);
        }
    }
}

pub use crate::listener::is_resource_exhaustion;

/// Accepts connections until `stop` is cancelled, then returns the listener (still open, so
/// it can be handed over or resumed).
pub async fn serve(listener: Acceptor, ctx: Arc<ListenerCtx>, stop: CancellationToken) -> Acceptor {
    serve_in_turn(listener, ctx, stop, None).await
}

/// [`serve`], taking turns with the other workers that share the accept queue
/// ([`crate::spread`]): before each accept, `turn` may make this worker stand aside.
pub async fn serve_in_turn(
    listener: Acceptor,
    ctx: Arc<ListenerCtx>,
    stop: CancellationToken,
    turn: Option<Arc<crate::spread::Turn>>,
) -> Acceptor {
    let mut backoff = crate::listener::AcceptBackoff::new(&*ctx.name);
    loop {
        if let Some(t) = &turn {
            let registry = ctx.registry.clone();
            tokio::select! {
                biased;
                _ = stop.cancelled() => return listener,
                _ = t.wait(|| registry.len()) => {}
            }
        }
        // Waiting for a permit pauses accepting at max_connections without spinning. The
        // waits go through `select!` (with the stop token) only when they would block: a
        // permit at hand and a connection in the queue cost no futures of their own, which
        // was 2.9k instructions per new connection.
        let permit = match ctx.limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return listener,
            Err(tokio::sync::TryAcquireError::NoPermits) => tokio::select! {
                biased;
                _ = stop.cancelled() => return listener,
                p = ctx.limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return listener,
                },
            },
        };
        if stop.is_cancelled() {
            return listener;
        }
        let ready = std::future::poll_fn(|cx| std::task::Poll::Ready(listener.poll_accept(cx)));
        let accepted = match ready.await {
            std::task::Poll::Ready(a) => a,
            std::task::Poll::Pending => tokio::select! {
                biased;
                _ = stop.cancelled() => return listener,
                a = listener.accept() => a,
            },
        };
        match accepted {
            Ok((stream, peer)) => {
                ctx.lm.accepted();
                spawn_connection(ctx.clone(), stream, peer, permit);
            }
            Err(e) => {
                if !backoff.failed(&e, &stop).await {
                    return listener;
                }
            }
        }
    }
}

fn spawn_connection(
    ctx: Arc<ListenerCtx>,
    stream: std::net::TcpStream,
    peer: std::net::SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    // Plain HTTP takes the socket as it comes from the listener: the engine registers it with
    // the reactor and sets TCP_NODELAY only when the connection needs them
    // (`proxy::plain_tcp`). The others are registered now and get TCP_NODELAY at once.
    // Each task's future is boxed: tokio moves a spawned future by value several times (into
    // the task, and its stage when it ends), and these are 0.7–1.2 KB; a box is one copy.
    if ctx.cfg.tls.is_none() && ctx.cfg.protocol == config::Protocol::Http {
        tokio::spawn(Box::pin(http::handle(ctx, stream, peer, permit)));
        return;
    }
    let stream = match tokio::net::TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(listener = %ctx.name, client = %peer, error = %e, "cannot register accepted connection");
            return;
        }
    };
    crate::listener::tune(&stream);
    if ctx.cfg.tls.is_some() {
        tokio::spawn(Box::pin(tls::handle(ctx, stream, peer, permit)));
    } else {
        tokio::spawn(Box::pin(tcp::handle(ctx, stream, peer, permit)));
    }
}

/// Resumes a connection parked by a predecessor (or by this process, after a rolled-back
/// upgrade) on the listener it belongs to. It takes a connection permit without waiting: it
/// was admitted already, so it is served at once even when the listener is full (see
/// [`admitted`]).
pub async fn resume(ctx: Arc<ListenerCtx>, parked: Parked) {
    if let Parked::Pooled(p) = parked {
        // Not a client connection: no permit; it goes back to the pool, checked at checkout.
        ctx.resume_pooled(p);
        return;
    }
    let Some(permit) = admitted(&ctx.limit) else {
        return;
    };
    ctx.lm.resumed();
    match parked {
        Parked::Tunnel(t) => {
            tokio::spawn(tcp::resume(ctx, t, permit));
        }
        Parked::IdleHttp(h) => {
            tokio::spawn(http::resume(ctx, h, permit));
        }
        Parked::Http(h) => {
            tokio::spawn(http::resume_http(ctx, h, permit));
        }
        Parked::Pooled(_) => {}
    }
}

/// A permit for a connection the predecessor had admitted. Waiting for one, as an accept does,
/// would leave a handed-over tunnel unserved (and every connection resumed after it, and the
/// rest of the handover) for as long as the listener is full: the accept loop starts at the
/// commit and may take the free permits for queued clients first, and a reload may lower
/// `max_connections` below what is handed over. So a full listener lends one: the connection
/// runs on a permit of its own, and a task waits for the next permit the listener frees and
/// holds it until that connection ends. The listener goes over `max_connections` by at most
/// the connections handed over beyond it, and new clients wait until it is back under.
/// `None` only when the listener is closed (it is going away).
pub(crate) fn admitted(limit: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    match limit.clone().try_acquire_owned() {
        Ok(p) => return Some(p),
        Err(TryAcquireError::Closed) => return None,
        Err(TryAcquireError::NoPermits) => {}
    }
    let lent = Arc::new(Semaphore::new(1));
    let permit = lent.clone().try_acquire_owned().ok()?;
    let limit = limit.clone();
    tokio::spawn(async move {
        // Whichever comes first: a permit of the listener (held until the connection ends
        // and gives the lent one back), or the end of the connection (nothing to repay).
        tokio::select! {
            biased;
            _ = lent.acquire() => {}
            real = limit.acquire_owned() => {
                if let Ok(real) = real {
                    let _ = lent.acquire().await;
                    drop(real);
                }
            }
        }
    });
    Some(permit)
}
