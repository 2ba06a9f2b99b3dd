//! Upstream connections: connecting (TCP_NODELAY, connect timeout), HTTP/1.1 keep-alive pooling
//! (at most `pool_idle_per_server` idle connections per server), and one shared multiplexed
//! connection per server for h2c upstreams.
//!
//! An HTTP/1.1 connection is leased for one request and returned by [`Lease::release`] when
//! its response body ended cleanly; a connection whose response was abandoned is dropped
//! (closed). Pool connections are not handed over on upgrade: the successor reconnects.

use super::body::ReplayBody;
use crate::config::UpstreamProtocol;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Idle HTTP/1.1 connections older than this are not reused (servers commonly close at 60 s+).
const MAX_IDLE_AGE: Duration = Duration::from_secs(50);

/// A connection able to send one request now.
pub enum Sender {
    /// HTTP/1.1, leased exclusively.
    H1(http1::SendRequest<ReplayBody>),
    /// h2c, shared.
    H2(http2::SendRequest<ReplayBody>),
}

/// Idle HTTP/1.1 connections of one server, with the time each went idle.
type IdleList = Vec<(http1::SendRequest<ReplayBody>, Instant)>;

/// Idle upstream connections of one listener, by server.
#[derive(Default)]
pub struct Pool {
    // FxHash: the key is a server address we chose ourselves (no hash flooding to fear), and
    // SipHash cost ~230 instructions per lookup, twice per request.
    h1: Mutex<FxHashMap<SocketAddr, IdleList>>,
    h2: Mutex<FxHashMap<SocketAddr, http2::SendRequest<ReplayBody>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    /// TCP connect failed.
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    /// TCP connect took longer than `connect_timeout`.
    #[error("connect timed out")]
    Timeout,
    /// The HTTP handshake failed.
    #[error("handshake: {0}")]
    Handshake(#[from] hyper::Error),
}

/// Opens a TCP connection with the upstream's connect timeout and TCP_NODELAY.
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectFailure> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectFailure::Timeout)??;
    // Latency matters more than packet count for request/response traffic.
    let _ = s.set_nodelay(true);
    Ok(s)
}

impl Pool {
    /// An idle connection to `addr`, if one is usable (HTTP/1.1: await `ready()` before use).
    pub fn checkout(&self, addr: SocketAddr, proto: UpstreamProtocol) -> Option<Sender> {
        match proto {
            UpstreamProtocol::H2c => {
                let mut h2 = lock(&self.h2);
                match h2.get(&addr) {
                    Some(s) if !s.is_closed() => Some(Sender::H2(s.clone())),
                    Some(_) => {
                        h2.remove(&addr);
                        None
                    }
                    None => None,
                }
            }
            UpstreamProtocol::Http1 => {
                let mut h1 = lock(&self.h1);
                let list = h1.get_mut(&addr)?;
                while let Some((s, since)) = list.pop() {
                    if !s.is_closed() && since.elapsed() < MAX_IDLE_AGE {
                        return Some(Sender::H1(s));
                    }
                }
                None
            }
        }
    }

    /// Connects to `addr` and performs the HTTP handshake; the connection task runs on its own.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        proto: UpstreamProtocol,
        timeout: Duration,
    ) -> Result<Sender, ConnectFailure> {
        let tcp = connect_tcp(addr, timeout).await?;
        match proto {
            UpstreamProtocol::Http1 => {
                let (send, conn) = http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(server = %addr, error = %e, "upstream connection ended with an error");
                    }
                });
                Ok(Sender::H1(send))
            }
            UpstreamProtocol::H2c => {
                let (send, conn) =
                    http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(server = %addr, error = %e, "upstream h2c connection ended with an error");
                    }
                });
                lock(&self.h2).insert(addr, send.clone());
                Ok(Sender::H2(send))
            }
        }
    }

    fn put_back(&self, addr: SocketAddr, s: http1::SendRequest<ReplayBody>, max_idle: usize) {
        if s.is_closed() || max_idle == 0 {
            return;
        }
        let mut h1 = lock(&self.h1);
        let list = h1.entry(addr).or_default();
        // Closed connections are skipped at checkout; sweep them only when the list is full,
        // not on every request (a scan of up to `pool_idle_per_server` entries).
        if list.len() >= max_idle {
            list.retain(|(s, _)| !s.is_closed());
        }
        if list.len() < max_idle {
            list.push((s, Instant::now()));
        }
    }
}

/// An HTTP/1.1 connection lent to one request.
#[derive(Debug)]
pub struct Lease {
    /// Where it goes back to.
    pub pool: Arc<Pool>,
    /// Its server.
    pub addr: SocketAddr,
    /// The connection.
    pub sender: http1::SendRequest<ReplayBody>,
    /// `pool_idle_per_server` of its upstream.
    pub max_idle: usize,
}

impl Lease {
    /// Returns the connection to the pool (its response ended cleanly).
    pub fn release(self) {
        self.pool.put_back(self.addr, self.sender, self.max_idle);
    }
}
