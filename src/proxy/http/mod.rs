//! L7 reverse proxying: HTTP/1.1 clients on baton's own engine (`h1`), h2c clients on hyper;
//! routing by host and path, header rewriting, limits and timeouts, upstream pooling, retries,
//! `Upgrade` and `CONNECT` tunnels on the L4 relay. Built for the live upgrade: an HTTP/1.1
//! connection stops in any phase as plain data ([`HttpState`], or [`IdleHttpState`] between
//! requests), and [`resume_http`] / [`resume`] serve it again.
//!
//! Files: `server` (the wait between requests, HTTP/1.1 or h2c), `idle` (released keep-alive
//! connections waiting with no task), `h1` (the engine), `head`, `syntax`, `framing`, `path` (its
//! parser, byte-level checks, rewriter and body framing), `bridge` (HTTP/1.1 bytes and hyper's messages, for the two
//! bridges: `h1::h2up` and `to_h1`), `h2` (h2c clients), `service` (one h2c request),
//! `forward` and `pool` (h2c upstreams), `body` (hyper body wrappers), `route`, `headers`,
//! `errors` (status codes), `shared` (state of an h2c connection's loop and its requests),
//! `io` (a socket with a read-ahead prefix, for hyper).

mod body;
mod bridge;
mod errors;
mod forward;
mod framing;
pub mod h1;
mod h2;
/// The HTTP/1.1 head parser and rewriter, public only for `benches/head.rs` (not an API).
#[doc(hidden)]
pub mod head;
mod headers;
pub mod idle;
mod io;
mod path;
pub mod pool;
mod route;
mod server;
pub use server::serve_h2;
mod service;
mod shared;
mod syntax;
mod to_h1;

use super::ListenerCtx;
use crate::registry::{now_ms, ConnKind, HttpState, IdleHttpState};
use bytes::BytesMut;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::either::Either;

/// Serves one accepted client connection of an `http` listener.
///
/// Not an `async fn`: the registration happens here, and the task is `serve`'s future itself.
/// An `async fn` wrapper would keep its own copies of the arguments next to it for the whole
/// life of the connection, in every idle connection's task.
pub fn handle(
    ctx: Arc<ListenerCtx>,
    client: std::net::TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send + 'static {
    let conn = ctx
        .registry
        .register(ctx.name.clone(), peer, ConnKind::Http, now_ms());
    // TCP_NODELAY is set by the engine before the connection's second write
    // (`ClientIo::plain_lazy`), or before h2c starts.
    server::serve_fresh(ctx, conn, client, permit)
}

/// Resumes an idle keep-alive connection parked by a predecessor (or by a rolled-back upgrade):
/// its read-ahead bytes are served before the socket. Not an `async fn`, as [`handle`].
pub fn resume(
    ctx: Arc<ListenerCtx>,
    h: IdleHttpState,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send + 'static {
    let conn = ctx.registry.register(
        ctx.name.clone(),
        h.meta.client,
        ConnKind::Http,
        h.meta.started_ms,
    );
    let stats = conn.stats();
    stats.bytes_in.store(h.meta.bytes_in, Ordering::Relaxed);
    stats.bytes_out.store(h.meta.bytes_out, Ordering::Relaxed);
    let stream = match h
        .client
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(h.client))
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(client = %h.meta.client, error = %e, "cannot resume http connection");
            return Either::Left(std::future::ready(()));
        }
    };
    // TCP_NODELAY came with the socket, or the engine sets it (`ClientIo::plain_lazy`).
    let read_ahead = BytesMut::from(&h.read_ahead[..]);
    Either::Right(server::serve(ctx, conn, stream, read_ahead, permit, false))
}

/// Resumes an HTTP/1.1 connection parked in any phase, from exactly where it stopped.
pub fn resume_http(
    ctx: Arc<ListenerCtx>,
    h: Box<HttpState>,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send + 'static {
    let h = *h;
    let conn = ctx.registry.register(
        ctx.name.clone(),
        h.meta.client,
        ConnKind::Http,
        h.meta.started_ms,
    );
    let stats = conn.stats();
    stats.bytes_in.store(h.meta.bytes_in, Ordering::Relaxed);
    stats.bytes_out.store(h.meta.bytes_out, Ordering::Relaxed);
    stats.set_server(h.meta.server);
    let to_tokio = |s: std::net::TcpStream| {
        s.set_nonblocking(true)?;
        let s = TcpStream::from_std(s)?;
        let _ = s.set_nodelay(true);
        Ok::<_, std::io::Error>(s)
    };
    let tls = h.client_tls.map(|c| {
        if let Some(f) = c.facts {
            stats.set_tls(f);
        }
        c.parked
    });
    let client = match tls {
        // The socket keeps TCP_NODELAY: it is a socket option, not tokio's.
        Some(tls) => crate::proxy::client_io::ClientIo::resume(h.client, Some(tls)),
        None => to_tokio(h.client).map(crate::proxy::client_io::ClientIo::from),
    };
    let client = match client {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(client = %h.meta.client, error = %e, "cannot resume http connection");
            return Either::Left(std::future::ready(()));
        }
    };
    let mut st = h.state;
    let up_tls = h.upstream_tls.map(|t| t.parked);
    let upstream = h.upstream.map(|s| match up_tls {
        Some(t) => crate::proxy::client_io::ClientIo::resume(s, Some(t)),
        None => to_tokio(s).map(crate::proxy::client_io::ClientIo::from),
    });
    let up = match (upstream, h.meta.server) {
        (Some(Ok(s)), Some(addr)) => Some(h1::Upstream {
            stream: s,
            addr,
            guard: None,
        }),
        (None, _) => None,
        _ => {
            // The upstream socket cannot be used here: start the attempt again if it may be.
            if st.phase == h1::state::Phase::Exchange {
                st.phase = h1::state::Phase::Connect;
            }
            None
        }
    };
    let c = h1::Conn { client, up, st };
    Either::Right(async move {
        if let h1::End::Idle(conn, stream) = Box::pin(h1::run(ctx.clone(), conn, c)).await {
            server::serve(ctx, conn, stream, BytesMut::new(), permit, true).await;
        }
    })
}
