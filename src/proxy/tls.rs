//! Connections of a listener with `tls:`: the handshake (bounded by `tls.handshake_timeout`),
//! then the same data path as plain connections, over [`ClientIo::Tls`]: the HTTP/1.1 engine
//! for `http` listeners (or hyper's HTTP/2 server when ALPN chose `h2`, as for h2c), the L4
//! relay for `tcp` ones.
//!
//! After the handshake the session is baton's record layer's (`tls::record`), plain data like
//! the rest of the connection's state, so a TLS connection parks and moves at an upgrade like
//! a plain one. One still in its handshake when the upgrade asks it to park finishes the
//! handshake here (bounded by `handshake_timeout`) and then parks, moving with a later batch
//! (docs/tls.md). A TLS HTTP connection waits for its next request in its own task, not in
//! the idle watcher (which reads raw sockets).

use super::client_io::ClientIo;
use super::http::h1;
use super::tcp::{close_log, connect_and_relay};
use super::ListenerCtx;
use crate::config::Protocol;
use crate::registry::{now_ms, ConnHandle, ConnKind, SIG_KILL, SIG_PARK};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

/// Serves one accepted connection of a TLS listener.
pub async fn handle(
    ctx: Arc<ListenerCtx>,
    tcp: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let kind = match ctx.cfg.protocol {
        Protocol::Tcp => ConnKind::Tcp,
        Protocol::Http => ConnKind::Http,
    };
    let conn = ctx
        .registry
        .register(ctx.name.clone(), peer, kind, now_ms());
    let (Some(server), Some(t)) = (ctx.tls.clone(), ctx.cfg.tls.as_ref()) else {
        return close_log(&ctx, &conn, "tls not set up");
    };
    let http = ctx.cfg.protocol == Protocol::Http;
    let done = tokio::select! {
        biased;
        r = tokio::time::timeout(t.handshake_timeout, crate::tls::handshake::accept(tcp, &server, http)) => r,
        _ = conn.requested(SIG_KILL) => return close_log(&ctx, &conn, "closed at drain deadline"),
    };
    let h = match done {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let reason = e.reason();
            match e {
                crate::tls::HandshakeError::Closed => {
                    tracing::debug!(conn = conn.stats().id, client = %peer, "client closed during the tls handshake")
                }
                e => {
                    tracing::info!(conn = conn.stats().id, listener = %ctx.name, client = %peer, error = %e, side = "client", "tls handshake failed")
                }
            }
            return close_log(&ctx, &conn, reason);
        }
        Err(_) => {
            tracing::info!(conn = conn.stats().id, listener = %ctx.name, client = %peer, side = "client", "tls handshake timed out");
            return close_log(&ctx, &conn, "tls handshake timeout");
        }
    };
    tracing::debug!(conn = conn.stats().id, client = %peer, version = %h.facts.version, cipher = %h.facts.cipher, sni = ?h.facts.sni, alpn = ?h.facts.alpn, resumed = h.facts.resumed, "tls handshake done");
    conn.stats().set_tls(h.facts.clone());
    let h2 = h.facts.alpn.as_deref() == Some("h2");
    let io = match ClientIo::from_handshake(h) {
        Ok(io) => io,
        Err(e) => {
            tracing::warn!(conn = conn.stats().id, listener = %ctx.name, client = %peer, error = %e, side = "internal", "tls session not taken over from rustls; closing");
            return close_log(&ctx, &conn, "tls take-over failed");
        }
    };
    match ctx.cfg.protocol {
        Protocol::Tcp => connect_and_relay(ctx, conn, io, peer).await,
        Protocol::Http if h2 => super::http::serve_h2(ctx, conn, io, bytes::Bytes::new()).await,
        Protocol::Http => serve_http(ctx, conn, io).await,
    }
}

/// Serves HTTP/1.1 over TLS until the connection closes.
async fn serve_http(ctx: Arc<ListenerCtx>, conn: ConnHandle, mut io: ClientIo) {
    // The first request is waited for here, so a drain that comes right after the handshake
    // (an upgrade) still serves it (with `connection: close`) instead of closing a connection
    // the client has just opened.
    // An upgrade meanwhile parks it at once: the engine parks a connection with no request.
    let mut cbuf = BytesMut::new();
    let first = tokio::select! {
        biased;
        bits = conn.requested(SIG_KILL | SIG_PARK) => {
            if bits & SIG_KILL != 0 {
                return close_log(&ctx, &conn, "closed at drain deadline");
            }
            None
        }
        r = tokio::time::timeout(
            ctx.cfg.http.keepalive_timeout,
            std::future::poll_fn(|cx| io.poll_fill(&mut cbuf, cx)),
        ) => Some(r),
    };
    match first {
        // Asked to park before the first request: the engine parks it as it is.
        None => {}
        Some(Ok(Ok(n))) if n > 0 => {
            conn.stats().bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        }
        Some(Ok(_)) => return close_log(&ctx, &conn, "client closed"),
        Some(Err(_)) => return close_log(&ctx, &conn, "idle timeout"),
    }
    let head_started_ms = (!cbuf.is_empty()).then(now_ms);
    let c = h1::Conn::start(io, cbuf, head_started_ms);
    // The engine keeps a TLS connection until it closes (it never returns one as idle).
    if let h1::End::Idle(conn, _) = Box::pin(h1::run(ctx.clone(), conn, c)).await {
        close_log(&ctx, &conn, "closed");
    }
}
