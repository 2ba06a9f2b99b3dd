//! h2c upstream connections: one shared multiplexed connection per server (hyper's h2
//! client), opened with the upstream's connect timeout and TCP_NODELAY. HTTP/1.1 upstream
//! connections are the engine's raw sockets (`h1::pool::RawPool`).

use super::body::ReplayBody;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpStream;

/// A connection able to send a request now (shared by every request to its server).
pub type Sender = http2::SendRequest<ReplayBody>;

/// The h2c connections of one listener, by server.
#[derive(Default)]
pub struct Pool {
    // FxHash: the key is a server address we chose ourselves (no hash flooding to fear).
    h2: Mutex<FxHashMap<SocketAddr, Sender>>,
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
    /// The HTTP/2 handshake failed.
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
    /// The open connection to `addr`, if there is one.
    pub fn checkout(&self, addr: SocketAddr) -> Option<Sender> {
        let mut h2 = lock(&self.h2);
        match h2.get(&addr) {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                h2.remove(&addr);
                None
            }
            None => None,
        }
    }

    /// Connects to `addr` and performs the HTTP/2 handshake; the connection task runs on its
    /// own, and the connection is shared from now on.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Sender, ConnectFailure> {
        let tcp = connect_tcp(addr, timeout).await?;
        let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(server = %addr, error = %e, "upstream h2c connection ended with an error");
            }
        });
        lock(&self.h2).insert(addr, send.clone());
        Ok(send)
    }
}
