//! Idle upstream HTTP/1.1 connections of one listener, by server and TLS identity: plain
//! sockets, or TLS sessions on baton's record layer, so a pooled connection is plain data too
//! and moves to the successor on a handover.
//!
//! A connection is keyed by its server's address and, for TLS, the name of the upstream whose
//! TLS settings made it (its CA, server name and client certificate are that upstream's): a
//! TLS connection is never handed to another upstream, nor a plain one to a TLS upstream.

use crate::clock::coarse_mono_ms;
use crate::proxy::client_io::ClientIo;
use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Idle connections older than this are not reused (servers commonly close at 60 s+).
const MAX_IDLE_AGE: Duration = Duration::from_secs(50);

/// What a pooled connection may be reused for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The server.
    pub addr: SocketAddr,
    /// `None`: plain TCP; `Some(upstream)`: TLS made with that upstream's settings.
    pub tls: Option<Arc<str>>,
}

impl PoolKey {
    /// The key of a plain connection to `addr`.
    pub fn plain(addr: SocketAddr) -> PoolKey {
        PoolKey { addr, tls: None }
    }
}

/// Idle upstream connections of one listener.
#[derive(Debug, Default)]
pub struct RawPool {
    idle: Mutex<FxHashMap<PoolKey, Vec<(ClientIo, u64)>>>,
}

/// Whether a connection idle since `since` (coarse monotonic ms) may still be used at `now`.
fn fresh(since: u64, now: u64) -> bool {
    now.saturating_sub(since) < MAX_IDLE_AGE.as_millis() as u64
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RawPool {
    /// A usable idle connection for `key`, if there is one.
    pub fn checkout(&self, key: &PoolKey) -> Option<ClientIo> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(key)?;
        let now = coarse_mono_ms();
        while let Some((mut s, since)) = list.pop() {
            if fresh(since, now) && s.idle_usable() {
                return Some(s);
            }
        }
        None
    }

    /// Gives a connection back after a clean response (at most `max_idle` kept per key).
    pub fn put(&self, key: PoolKey, s: ClientIo, max_idle: usize) {
        if max_idle == 0 {
            return;
        }
        let mut idle = lock(&self.idle);
        let list = idle.entry(key).or_default();
        if list.len() < max_idle {
            list.push((s, coarse_mono_ms()));
        }
    }

    /// Takes every usable idle connection out (for a handover).
    pub fn take_all(&self) -> Vec<(PoolKey, ClientIo)> {
        let mut out = Vec::new();
        let now = coarse_mono_ms();
        for (key, list) in lock(&self.idle).drain() {
            for (mut s, since) in list {
                if fresh(since, now) && s.idle_usable() {
                    out.push((key.clone(), s));
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
