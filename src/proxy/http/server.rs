//! Client connections between requests: waiting for the first bytes of the next one (with no
//! buffer and, after [`IDLE_RELEASE`], in the listener's idle watcher), telling HTTP/1.1 from
//! h2c by them, and stopping at a safe point when the lifecycle asks.
//!
//! HTTP/1.1 runs on baton's own engine (`h1`), whatever the upstream speaks; h2c (prior
//! knowledge, detected by its preface) runs on hyper's `http2::Builder` (`h2`). An idle
//! connection closes after `keepalive_timeout`; a head that started arriving is the engine's
//! (`header_read_timeout`, 408). Asked to park, an idle connection is handed over as
//! [`Parked::IdleHttp`]; an h2c one gets GOAWAY and finishes its streams here.

use super::h1;
use super::idle;
use super::io::PrefixedIo;
use super::service::{Svc, SvcCtx};
use super::shared::{ConnShared, IDLE_RELEASE};
use crate::proxy::client_io::ClientIo;
use crate::proxy::tcp::close_log;
use crate::proxy::ListenerCtx;
use crate::registry::{
    ConnHandle, ConnKind, ConnState, IdleHttpState, Parked, SIG_DRAIN, SIG_KILL, SIG_PARK,
};
use bytes::{Bytes, BytesMut};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::AsyncRead;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// The HTTP/2 client connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes tried at once from a new connection's socket before it is registered with the
/// reactor: a request head up to this size is served without the socket ever waiting.
const FIRST_READ: usize = 4096;

thread_local! {
    /// Where a new connection's first read lands; what came is copied into a buffer of its
    /// size. (A zeroed 4 KiB buffer per connection cost a memset of 4.1k instructions and 64
    /// cache lines written, more than the registration the direct read saves.)
    static FIRST: std::cell::RefCell<[u8; FIRST_READ]> =
        const { std::cell::RefCell::new([0; FIRST_READ]) };
}

/// Serves a new connection straight from the listener, not registered with the reactor
/// (`crate::listener::Acceptor`). With TCP_DEFER_ACCEPT its request has usually arrived with
/// it: the first bytes are read at once and, if they are HTTP/1.1, the engine starts on the
/// socket as it is (`proxy::plain_tcp`: registered only if it has to wait). No bytes yet, or
/// the h2c preface: it is registered and served as any connection ([`serve`]).
pub async fn serve_fresh(
    ctx: Arc<ListenerCtx>,
    conn: ConnHandle,
    client: std::net::TcpStream,
    permit: OwnedSemaphorePermit,
) {
    use std::io::Read;
    let stats = conn.stats().clone();
    stats.set_state(ConnState::Idle);
    let first = FIRST.with_borrow_mut(|b| (&client).read(b).map(|n| BytesMut::from(&b[..n])));
    let buf = match first {
        Ok(b) if b.is_empty() => return close_log(&ctx, &conn, "client closed"),
        Ok(b) => b,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) =>
        {
            BytesMut::new()
        }
        Err(_) => return close_log(&ctx, &conn, "client closed"),
    };
    let n = buf.len();
    stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    let k = n.min(H2_PREFACE.len());
    if n == 0 || buf[..k] == H2_PREFACE[..k] {
        match TcpStream::from_std(client) {
            Ok(s) => return serve(ctx, conn, s, buf, permit, false).await,
            Err(e) => {
                tracing::warn!(client = %stats.client, error = %e, "cannot register http connection");
                return close_log(&ctx, &conn, "register failed");
            }
        }
    }
    let c = h1::Conn::start(
        ClientIo::fresh(client),
        buf,
        Some(crate::clock::coarse_ms()),
    );
    if let h1::End::Idle(conn, s) = Box::pin(h1::run(ctx.clone(), conn, c)).await {
        serve(ctx, conn, s, BytesMut::new(), permit, true).await;
    }
}

/// Serves a client connection whose first bytes (`buf`) may already have been read; the
/// permit (the listener's connection limit) is held until it closes or parks. `lingered`:
/// it comes from the engine, idle for [`IDLE_RELEASE`] already, so it is released at once.
pub async fn serve(
    ctx: Arc<ListenerCtx>,
    mut conn: ConnHandle,
    mut stream: TcpStream,
    mut buf: BytesMut,
    mut permit: OwnedSemaphorePermit,
    lingered: bool,
) {
    let stats = conn.stats().clone();
    stats.set_state(ConnState::Idle);
    let mut idle_since = if lingered {
        lingered_since()
    } else {
        Instant::now()
    };
    // Set once the idle watcher would not take the connection: wait here from then on.
    let mut released = false;
    loop {
        let mut head_started = (!buf.is_empty()).then_some(idle_since);
        // Read until the bytes tell HTTP/1.1 (anything not a prefix of the h2 preface) from
        // h2c. With nothing buffered this holds no buffer: it waits for readability first, so
        // an idle keep-alive connection costs a socket and this small task. The keep-alive
        // deadline applies until the first byte, then the header deadline.
        let waited = {
            // Pinned once per wait and polled by hand: `select!` over `readable()`, a new
            // `sleep_until` and the signal future would keep a readiness waiter node and
            // its own bookkeeping in every idle connection's task as well.
            let keepalive_due = idle_since + ctx.cfg.http.keepalive_timeout;
            let release_due = idle_since + IDLE_RELEASE;
            let first_due = if released || head_started.is_some() {
                keepalive_due
            } else {
                keepalive_due.min(release_due)
            };
            let sleep = tokio::time::sleep_until(first_due);
            tokio::pin!(sleep);
            loop {
                let n = buf.len().min(H2_PREFACE.len());
                if n > 0 && buf[..n] != H2_PREFACE[..n] {
                    break Waited::Request { h2: false };
                }
                if buf.len() >= H2_PREFACE.len() {
                    break Waited::Request { h2: true };
                }
                if let Some(h) = head_started {
                    let due = h + ctx.cfg.http.header_read_timeout;
                    if sleep.deadline() != due {
                        sleep.as_mut().reset(due);
                    }
                }
                let event = std::future::poll_fn(|cx| {
                    use std::future::Future;
                    use std::task::Poll;
                    // The task's waker slot (this task runs the engine too), not a
                    // `Notified` future: no waiter-list lock per wait.
                    if let Poll::Ready(bits) =
                        conn.poll_requested(SIG_PARK | SIG_DRAIN | SIG_KILL, cx)
                    {
                        return Poll::Ready(IdleEvent::Signal(bits));
                    }
                    // The socket's own reader slot: no waiter node is kept in this task.
                    // Polled before the timer: a new client has usually sent its request by
                    // the time it is accepted, and then no timer is registered at all
                    // (registering one can cost the runtime an eventfd write to wake itself).
                    if let Poll::Ready(r) = stream.poll_read_ready(cx) {
                        return Poll::Ready(IdleEvent::Readable(r));
                    }
                    if sleep.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(IdleEvent::Timeout);
                    }
                    Poll::Pending
                })
                .await;
                match event {
                    IdleEvent::Signal(bits) if bits & SIG_KILL != 0 => {
                        break Waited::Close("killed")
                    }
                    IdleEvent::Signal(bits) if bits & SIG_PARK != 0 => break Waited::Park,
                    IdleEvent::Signal(_) => break Waited::Close("drained"),
                    IdleEvent::Timeout
                        if head_started.is_none() && Instant::now() < keepalive_due =>
                    {
                        break Waited::Release
                    }
                    IdleEvent::Timeout => break Waited::Close("idle timeout"),
                    IdleEvent::Readable(Err(_)) => break Waited::Close("client closed"),
                    IdleEvent::Readable(Ok(())) => {
                        // poll_read rather than try_read: a short read clears the readiness
                        // too (as WouldBlock does), so hyper's first read waits for epoll
                        // instead of costing a recvfrom that returns EAGAIN. The noop waker is
                        // replaced by the real one at the next poll_read_ready.
                        let mut tmp = [0u8; 512];
                        let mut rb = tokio::io::ReadBuf::new(&mut tmp);
                        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                        match std::pin::Pin::new(&mut stream).poll_read(&mut cx, &mut rb) {
                            std::task::Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                                break Waited::Close("client closed")
                            }
                            std::task::Poll::Ready(Ok(())) => {
                                buf.extend_from_slice(rb.filled());
                                let n = rb.filled().len() as u64;
                                stats.bytes_in.fetch_add(n, Ordering::Relaxed);
                                head_started.get_or_insert_with(Instant::now);
                            }
                            std::task::Poll::Pending => {}
                            std::task::Poll::Ready(Err(_)) => break Waited::Close("client closed"),
                        }
                    }
                }
            }
        };
        let h2 = match waited {
            Waited::Request { h2 } => h2,
            Waited::Park => return park(&ctx, conn, stream, buf.freeze()),
            Waited::Close(reason) => return close_log(&ctx, &conn, reason),
            Waited::Release => {
                tracing::debug!(conn = stats.id, "idle http connection released");
                match idle::to_watcher(&ctx, conn, stream, permit, idle_since) {
                    idle::ToWatcher::Watched | idle::ToWatcher::Closed => return,
                    idle::ToWatcher::Back(c, s, p) => {
                        conn = c;
                        stream = s;
                        permit = p;
                        released = true;
                        continue;
                    }
                }
            }
        };
        if !h2 {
            // baton's own engine, for every HTTP/1.1 client; boxed, so an idle connection's
            // task stays small.
            let c = h1::Conn::start(
                ClientIo::plain_lazy(stream),
                std::mem::take(&mut buf),
                Some(crate::clock::coarse_ms()),
            );
            match Box::pin(h1::run(ctx.clone(), conn, c)).await {
                h1::End::Gone => return,
                h1::End::Idle(c, s) => {
                    // It lingered in the engine for IDLE_RELEASE already: release it now.
                    conn = c;
                    stream = s;
                    idle_since = lingered_since();
                    released = false;
                    continue;
                }
            }
        }
        // h2c (prior knowledge), on hyper, which writes the socket itself: TCP_NODELAY now
        // (the engine sets it lazily, before a connection's second write).
        let _ = stream.set_nodelay(true);
        let prefix = buf.split().freeze();
        return serve_h2(ctx, conn, ClientIo::from(stream), prefix).await;
    }
}

/// Serves an HTTP/2 client until it closes, on hyper: h2c with prior knowledge, or h2 that
/// ALPN chose over TLS. `prefix` is what was read of it already. At an upgrade it gets a
/// GOAWAY and finishes in this process (docs/http.md).
pub async fn serve_h2(ctx: Arc<ListenerCtx>, conn: ConnHandle, io: ClientIo, prefix: Bytes) {
    let stats = conn.stats().clone();
    let shared = ConnShared::new(stats.clone());
    let io = PrefixedIo::new(io, prefix, stats.clone());
    let svc = Svc(Arc::new(SvcCtx {
        ctx: ctx.clone(),
        shared,
        client: stats.client,
    }));
    stats.set_kind(ConnKind::Http2);
    // Boxed: an h2 connection is large, and only h2 clients should pay for it.
    Box::pin(super::h2::serve_h2(ctx, conn, io, svc)).await
}

/// The idle start of a connection that lingered in the engine for [`IDLE_RELEASE`] already.
fn lingered_since() -> Instant {
    Instant::now()
        .checked_sub(IDLE_RELEASE)
        .unwrap_or_else(Instant::now)
}

/// What woke a connection waiting for its next request.
enum IdleEvent {
    Signal(u8),
    Timeout,
    Readable(std::io::Result<()>),
}

/// How a wait for the next request ended.
enum Waited {
    /// Request bytes arrived; whether they are the h2c preface.
    Request { h2: bool },
    /// Asked to park (handover).
    Park,
    /// Idle for a while with nothing read: wait in the idle watcher instead.
    Release,
    /// Closed, for this reason.
    Close(&'static str),
}

/// Hands an idle connection over as [`Parked::IdleHttp`].
fn park(ctx: &ListenerCtx, conn: ConnHandle, stream: TcpStream, read_ahead: Bytes) {
    match stream.into_std() {
        Ok(client) => park_std(ctx, conn, client, read_ahead),
        Err(e) => {
            tracing::warn!(client = %conn.stats().client, error = %e, "cannot park http connection; closing it");
            close_log(ctx, &conn, "park failed");
        }
    }
}

/// [`park`] for a socket already out of tokio (the idle watcher's).
pub(super) fn park_std(
    ctx: &ListenerCtx,
    conn: ConnHandle,
    client: std::net::TcpStream,
    read_ahead: Bytes,
) {
    let meta = conn.stats().meta();
    tracing::debug!(conn = conn.stats().id, client = %meta.client, read_ahead = read_ahead.len(), "parking idle http connection");
    ctx.lm.parked();
    conn.park(Parked::IdleHttp(IdleHttpState {
        meta,
        client,
        read_ahead: read_ahead.to_vec(),
    }));
}
