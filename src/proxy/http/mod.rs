//! L7 reverse proxying on hyper: HTTP/1.1 and h2c clients, routing by host and path, header
//! rewriting, limits and timeouts, upstream keep-alive pooling, retries, and `Upgrade`/`CONNECT`
//! tunnels on the L4 relay. Built for the live upgrade: an idle HTTP/1.1 connection stops with
//! its socket and read-ahead bytes as [`IdleHttpState`], and [`resume`] serves it again.
//!
//! Files: `server` (connection loops, handover hooks), `shared` (state a connection's loop,
//! service and io share), `idle` (released keep-alive connections waiting with no task),
//! `service` (one request), `forward`
//! (upstream attempts and retries), `pool` (upstream connections), `route`, `headers`, `body`
//! (streaming wrappers), `errors` (status codes), `io` (socket with a read-ahead prefix).

mod body;
mod errors;
mod forward;
mod h2;
mod headers;
pub mod idle;
mod io;
pub mod pool;
mod route;
mod server;
mod service;
mod shared;

use super::ListenerCtx;
use crate::registry::{now_ms, ConnKind, IdleHttpState};
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
    client: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send + 'static {
    let conn = ctx
        .registry
        .register(ctx.name.clone(), peer, ConnKind::Http, now_ms());
    // TCP_NODELAY was set at accept (`listener::tune`).
    server::serve(ctx, conn, client, BytesMut::new(), permit)
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
    let _ = stream.set_nodelay(true);
    let read_ahead = BytesMut::from(&h.read_ahead[..]);
    Either::Right(server::serve(ctx, conn, stream, read_ahead, permit))
}
