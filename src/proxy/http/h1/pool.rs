//! Idle upstream HTTP/1.1 connections of one listener, by server: raw sockets, so a pooled
//! connection is plain data too and moves to the successor on a handover.

use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Idle connections older than this are not reused (servers commonly close at 60 s+).
const MAX_IDLE_AGE: Duration = Duration::from_secs(50);

/// Idle upstream connections of one listener.
#[derive(Debug, Default)]
pub struct RawPool {
    idle: Mutex<FxHashMap<SocketAddr, Vec<(TcpStream, Instant)>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether an idle connection is still usable: nothing to read (a server that closed it, or
/// sent bytes nobody asked for, makes it unusable).
fn alive(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

impl RawPool {
    /// A usable idle connection to `addr`, if there is one.
    pub fn checkout(&self, addr: SocketAddr) -> Option<TcpStream> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(&addr)?;
        while let Some((s, since)) = list.pop() {
            if since.elapsed() < MAX_IDLE_AGE && alive(&s) {
                return Some(s);
            }
        }
        None
    }

    /// Gives a connection back after a clean response (at most `max_idle` kept per server).
    pub fn put(&self, addr: SocketAddr, s: TcpStream, max_idle: usize) {
        if max_idle == 0 {
            return;
        }
        let mut idle = lock(&self.idle);
        let list = idle.entry(addr).or_default();
        if list.len() < max_idle {
            list.push((s, Instant::now()));
        }
    }

    /// Takes every idle connection out (for a handover), as `(server, socket)`.
    pub fn take_all(&self) -> Vec<(SocketAddr, std::net::TcpStream)> {
        let mut out = Vec::new();
        for (addr, list) in lock(&self.idle).drain() {
            for (s, since) in list {
                if since.elapsed() >= MAX_IDLE_AGE || !alive(&s) {
                    continue;
                }
                if let Ok(std) = s.into_std() {
                    out.push((addr, std));
                }
            }
        }
        out
    }

    /// Number of idle connections.
    pub fn len(&self) -> usize {
        lock(&self.idle).values().map(Vec::len).sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
