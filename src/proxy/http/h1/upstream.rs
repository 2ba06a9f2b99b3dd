//! The upstream side of an exchange: pick a server, take a pooled connection to it or open
//! one (TCP, then the TLS handshake for `upstreams.X.tls`, both within `connect_timeout`), and
//! retry other servers after a failed attempt, up to `retries`.

use super::pool;
use super::state::State;
use crate::proxy::client_io::ClientIo;
use crate::proxy::ListenerCtx;
use crate::registry::now_ms;
use crate::upstream::ServerGuard;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// The upstream side of an exchange.
pub struct Upstream {
    /// The socket: plain, or TLS to the server (`upstreams.X.tls`).
    pub stream: ClientIo,
    /// Its server.
    pub addr: SocketAddr,
    /// Keeps the server counted as active (absent after a resume).
    pub guard: Option<ServerGuard>,
}

/// Picks a server and gets a connection to it: pooled, or new (connect failures are retried
/// on other servers, up to `retries`).
pub(super) async fn connect(
    ctx: &ListenerCtx,
    st: &mut State,
    client_ip: std::net::IpAddr,
) -> Result<Upstream, (u16, &'static str)> {
    let ex = st.ex.as_mut().ok_or((500, "no request"))?;
    if ex.connect {
        return Box::pin(super::connect::open(ctx, ex)).await;
    }
    let Some(upstream) = ex.upstream_in(ctx).cloned() else {
        return Err((500, "missing upstream"));
    };
    let cfg = upstream.config();
    let tls_key = upstream.tls_key();
    loop {
        let Some(guard) = upstream.pick(client_ip, &ex.tried) else {
            // A 502 once servers were tried and failed (each failure is logged with its
            // cause); "no server available" is the 503 of an upstream with none to try.
            return Err(if ex.tried.is_empty() {
                (503, "no server available")
            } else {
                (502, "no server could be reached")
            });
        };
        let addr = guard.addr();
        let key = pool::PoolKey {
            addr,
            tls: tls_key.clone(),
        };
        if !std::mem::take(&mut ex.fresh_only) {
            if let Some(s) = ctx.h1_pool.checkout(&key) {
                ex.reused = true;
                return Ok(Upstream {
                    stream: s,
                    addr,
                    guard: Some(guard),
                });
            }
        }
        ex.reused = false;
        let left = ctx.cfg.http.request_timeout.map(|t| {
            Duration::from_millis((ex.started_ms + t.as_millis() as u64).saturating_sub(now_ms()))
        });
        // The TLS handshake, if any, is part of the connect and of its timeout.
        let limit = left.map_or(cfg.connect_timeout, |l| l.min(cfg.connect_timeout));
        let attempt = async {
            let s = TcpStream::connect(addr).await.map_err(Attempt::Connect)?;
            let _ = s.set_nodelay(true);
            if !upstream.is_tls() {
                return Ok(ClientIo::from(s));
            }
            upstream
                .start_tls(s, guard.host())
                .await
                .map(ClientIo::upstream_tls)
                .map_err(Attempt::Tls)
        };
        // Boxed: a new connection (and its TLS handshake) is the rare case next to a pooled
        // one, and inline it made every connection's engine state ~2 KiB larger.
        let r = tokio::time::timeout(limit, Box::pin(attempt)).await;
        let reason = match r {
            Ok(Ok(s)) => {
                upstream.report(addr, true);
                return Ok(Upstream {
                    stream: s,
                    addr,
                    guard: Some(guard),
                });
            }
            Ok(Err(Attempt::Connect(e))) if crate::proxy::is_resource_exhaustion(&e) => {
                // Our own fd shortage is not the server's fault.
                tracing::warn!(server = %addr, error = %e, "upstream connect failed: out of resources");
                return Err((503, "out of resources"));
            }
            Err(_) if left.is_some_and(|l| l <= limit) => {
                return Err((504, "request timeout"));
            }
            Ok(Err(Attempt::Connect(e))) => {
                tracing::debug!(server = %addr, error = %e, side = "upstream", "upstream connect failed");
                "upstream connect failed"
            }
            Ok(Err(Attempt::Tls(e))) => {
                tracing::warn!(upstream = %ex.upstream, server = %addr, error = %e, side = "upstream", "upstream tls handshake failed");
                "upstream tls handshake failed"
            }
            Err(_) => {
                tracing::debug!(server = %addr, error = "connect timed out", side = "upstream", "upstream connect failed");
                "upstream connect failed"
            }
        };
        upstream.report(addr, false);
        ex.tried.push(addr);
        if ex.tried.len() as u32 > cfg.retries {
            return Err((502, reason));
        }
    }
}

/// How one attempt to reach a server failed.
enum Attempt {
    /// The TCP connect.
    Connect(std::io::Error),
    /// The TLS handshake (a certificate refused, a server that is not TLS, ...).
    Tls(crate::tls::UpstreamTlsError),
}
