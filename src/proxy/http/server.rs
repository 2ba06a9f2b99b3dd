//! Client connections: telling HTTP/1.1 from h2c, serving each with hyper, and stopping at a
//! safe point when the lifecycle asks.
//!
//! HTTP/1.1 runs on `http1::Builder::serve_connection`, driven by `poll_without_shutdown` so
//! the socket can always be taken back with `into_parts`:
//! - park (handover): once no request is in flight, `graceful_shutdown`, finish, take the
//!   socket and the bytes hyper read ahead, and hand them over as [`Parked::IdleHttp`]. If a
//!   request started after that point, hyper answered it with `connection: close`: close.
//! - drain (stop): `graceful_shutdown`; in-flight requests finish, then the connection closes.
//! - kill: close now.
//! - an accepted `Upgrade`/`CONNECT`: take the socket back and relay it as a registry tunnel.
//!
//! Keep-alive and header timeouts are kept here rather than in hyper (whose header timer also
//! runs between requests and closes without a response): an idle connection closes after
//! `keepalive_timeout`; a request head that started arriving but is not complete after
//! `header_read_timeout` gets a 408.
//!
//! h2c (prior knowledge, detected by its preface) runs on `http2::Builder`; it cannot be handed
//! over, so park and drain both send GOAWAY and let open streams finish.

use super::errors::RAW_408;
use super::forward::Tunnel;
use super::h1;
use super::idle;
use super::io::PrefixedIo;
use super::service::{Svc, SvcCtx};
use super::shared::{lock, ConnShared, Due, IDLE_RELEASE};
use crate::proxy::tcp::{close_log, relay::Relay, run_tunnel};
use crate::proxy::ListenerCtx;
use crate::registry::{
    ConnHandle, ConnKind, ConnState, IdleHttpState, Parked, PendingHalf, SIG_DRAIN, SIG_KILL,
    SIG_PARK,
};
use bytes::{Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// The HTTP/2 client connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves a client connection whose first bytes (`buf`) may already have been read; the
/// permit (the listener's connection limit) is held until it closes or parks.
pub async fn serve(
    ctx: Arc<ListenerCtx>,
    mut conn: ConnHandle,
    mut stream: TcpStream,
    mut buf: BytesMut,
    mut permit: OwnedSemaphorePermit,
) {
    let stats = conn.stats().clone();
    stats.set_state(ConnState::Idle);
    let mut idle_since = Instant::now();
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
            let signal = conn.requested(SIG_PARK | SIG_DRAIN | SIG_KILL);
            tokio::pin!(sleep, signal);
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
                    if let Poll::Ready(bits) = signal.as_mut().poll(cx) {
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
            // baton's own engine; boxed, so an idle connection's task stays small.
            let c = h1::Conn {
                client: stream,
                up: None,
                st: h1::state::State {
                    cbuf: std::mem::take(&mut buf),
                    head_started_ms: Some(crate::registry::now_ms()),
                    ..Default::default()
                },
            };
            match Box::pin(h1::run(ctx.clone(), conn, c)).await {
                h1::End::Gone => return,
                h1::End::Idle(c, s) => {
                    // It lingered in the engine for IDLE_RELEASE already: release it now.
                    conn = c;
                    stream = s;
                    idle_since = Instant::now()
                        .checked_sub(IDLE_RELEASE)
                        .unwrap_or_else(Instant::now);
                    released = false;
                    continue;
                }
            }
        }
        let shared = ConnShared::new(
            stats.clone(),
            idle_since,
            head_started,
            ctx.cfg.http.header_read_timeout,
        );
        let io = PrefixedIo::new(stream, buf.split().freeze(), stats.clone(), shared.clone());
        let svc = Svc(Arc::new(SvcCtx {
            ctx: ctx.clone(),
            shared: shared.clone(),
            client: stats.client,
            h2,
        }));
        if h2 {
            stats.set_kind(ConnKind::Http2);
            // Boxed: an h2 connection is large, and only h2 clients should pay for it.
            return Box::pin(super::h2::serve_h2(ctx, conn, io, svc)).await;
        }
        // Boxed: the hyper connection lives on the heap only while it serves, so the task of
        // an idle (released) connection stays small.
        match Box::pin(serve_h1(ctx.clone(), conn, io, svc, shared)).await {
            None => return,
            Some(idle) => {
                idle_since = idle.idle_since;
                buf = BytesMut::from(&idle.read_ahead[..]);
                if !buf.is_empty() {
                    // Part of a head (rare): wait here, under the header deadline.
                    conn = idle.conn;
                    stream = idle.stream;
                    continue;
                }
                // The usual case: nothing read ahead. The connection waits in the listener's
                // idle watcher, and this task ends.
                match idle::to_watcher(&ctx, idle.conn, idle.stream, permit, idle_since) {
                    idle::ToWatcher::Watched | idle::ToWatcher::Closed => return,
                    idle::ToWatcher::Back(c, s, p) => {
                        conn = c;
                        stream = s;
                        permit = p;
                    }
                }
            }
        }
    }
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

/// A keep-alive connection taken back from hyper after [`IDLE_RELEASE`] without a request.
struct Released {
    conn: ConnHandle,
    stream: TcpStream,
    read_ahead: Bytes,
    idle_since: Instant,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Handover: hand the idle connection over.
    Park,
    /// Process stopping.
    Drain,
    /// Idle for a while: take the socket back from hyper and wait without buffers.
    Release,
}

/// What woke the connection loop.
enum Wake {
    Conn(Result<(), hyper::Error>),
    Park,
    Drain,
    Kill,
    Changed,
    Timer,
}

/// Serves HTTP/1.1 until the connection closes (`None`), or until it has been idle for
/// [`IDLE_RELEASE`] (`Some`: the socket and read-ahead bytes, to wait with no hyper state).
async fn serve_h1(
    ctx: Arc<ListenerCtx>,
    conn: ConnHandle,
    io: PrefixedIo,
    svc: Svc,
    shared: Arc<ConnShared>,
) -> Option<Released> {
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper refuses a buffer below 8 KiB; a head past max_buf_size gets 431 from hyper.
    // No hyper header timer: this loop enforces `header_read_timeout` (with a 408) and the
    // keep-alive timeout. hyper's own (30 s by default once a timer is set) would cut a
    // longer configured timeout short, and it allocated and armed a timer for every request.
    builder
        .max_buf_size(ctx.cfg.http.max_header_bytes.max(8192))
        .header_read_timeout(None);
    let mut hconn = builder.serve_connection(TokioIo::new(io), svc);
    let mut stop: Option<Stop> = None;
    // Requests started when graceful_shutdown was called for a park or a release.
    let mut shut_at: Option<u64> = None;
    let result = {
        // Made once and kept: a loop over `select!` would make (and drop) a timer, a Notified
        // and a signal future on every wake-up, several times per request.
        // After park or drain only kill is still to act on (the future is replaced then).
        let signal = conn.requested(SIG_PARK | SIG_DRAIN | SIG_KILL);
        let changed = shared.changed.notified();
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(signal, changed, timer);
        let mut armed = false;
        // The signal future is polled once to register the waker, then only once the
        // connection's signal bits say it may have fired.
        let mut poll_signals = true;
        loop {
            if stop == Some(Stop::Park)
                && shut_at.is_none()
                && shared.idle()
                && shared.started.load(Ordering::Relaxed) == 0
            {
                // No request has started on this hyper connection (a fresh one, after a
                // release, holding at most part of a head): nothing was written and every
                // byte read is still in hyper's read buffer, so it is taken back as it is.
                // graceful_shutdown would not do here: hyper counts a fresh connection as
                // busy and would wait for the rest of the request, then close.
                shut_at = Some(0);
                break Ok(());
            }
            if matches!(stop, Some(Stop::Park | Stop::Release))
                && shut_at.is_none()
                && shared.idle()
            {
                shut_at = Some(shared.started.load(Ordering::Relaxed));
                std::pin::Pin::new(&mut hconn).graceful_shutdown();
            }
            if !armed {
                // While a request is in flight nothing is due, but the loop is not woken when
                // it ends: look again after a while (once per IDLE_RELEASE at most).
                // Never later than IDLE_RELEASE from now either: the end of a request does
                // not re-arm the timer, so a header deadline armed for the first request would
                // otherwise hold hyper's buffers until it fires.
                let check = Instant::now() + IDLE_RELEASE;
                let d = shared.deadline(&ctx).map_or(check, |(d, _)| d.min(check));
                timer.as_mut().reset(d);
                shared.set_armed(Some(d));
                armed = true;
            }
            let wake = std::future::poll_fn(|cx| {
                use std::future::Future;
                use std::task::Poll;
                if let Poll::Ready(r) = hconn.poll_without_shutdown(cx) {
                    return Poll::Ready(Wake::Conn(r));
                }
                if poll_signals || conn.signalled() {
                    poll_signals = false;
                    if let Poll::Ready(bits) = signal.as_mut().poll(cx) {
                        if bits & SIG_KILL != 0 {
                            return Poll::Ready(Wake::Kill);
                        }
                        if bits & SIG_PARK != 0 {
                            return Poll::Ready(Wake::Park);
                        }
                        return Poll::Ready(Wake::Drain);
                    }
                }
                if changed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Changed);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Timer);
                }
                Poll::Pending
            })
            .await;
            match wake {
                Wake::Conn(r) => break r,
                Wake::Kill => {
                    close_log(&ctx, &conn, "closed at drain deadline");
                    return None;
                }
                Wake::Park => {
                    signal.set(conn.requested(SIG_KILL));
                    stop = Some(Stop::Park);
                    shared.wake_on_idle.store(true, Ordering::Release);
                    if shut_at.is_some() {
                        // Already shutting down for a release: that ends the same way.
                        continue;
                    }
                }
                Wake::Drain => {
                    signal.set(conn.requested(SIG_KILL));
                    if stop == Some(Stop::Release) {
                        // graceful_shutdown already called: the connection ends idle, then
                        // closes below as drained.
                    } else {
                        std::pin::Pin::new(&mut hconn).graceful_shutdown();
                    }
                    stop = Some(Stop::Drain);
                }
                Wake::Changed => {
                    changed.set(shared.changed.notified());
                    // A head started: make sure the timer fires by its header timeout.
                    armed = false;
                }
                Wake::Timer => {
                    armed = false;
                    shared.set_armed(None);
                    match shared.deadline(&ctx) {
                        Some((d, Due::Header)) if d <= Instant::now() => {
                            let mut io = hconn.into_parts().io.into_inner();
                            tracing::info!(conn = shared.stats.id, client = %shared.stats.client, status = 408, side = "client", "request head not received in time");
                            let _ =
                                tokio::time::timeout(std::time::Duration::from_secs(1), async {
                                    let _ = io.inner.write_all(RAW_408).await;
                                    let _ = io.inner.shutdown().await;
                                })
                                .await;
                            close_log(&ctx, &conn, "header read timeout");
                            return None;
                        }
                        Some((d, Due::KeepAlive)) if d <= Instant::now() => {
                            close_log(&ctx, &conn, "keep-alive timeout");
                            return None;
                        }
                        Some((d, Due::Release)) if d <= Instant::now() && stop.is_none() => {
                            stop = Some(Stop::Release);
                        }
                        _ => {}
                    }
                }
            }
        }
    };
    let upgrade = lock(&shared.upgrade).take();
    if let Some(tunnel) = upgrade {
        if result.is_ok() {
            start_tunnel(ctx, conn, hconn.into_parts(), tunnel).await;
            return None;
        }
    }
    if let Err(e) = &result {
        tracing::debug!(conn = shared.stats.id, client = %shared.stats.client, error = %e, side = "client", "http connection error");
    }
    let clean = matches!(stop, Some(Stop::Park | Stop::Release))
        && result.is_ok()
        && shared.idle()
        && shut_at == Some(shared.started.load(Ordering::Relaxed));
    if clean {
        let idle_since = lock(&shared.timing).idle_since;
        let parts = hconn.into_parts();
        let pio = parts.io.into_inner();
        let mut ahead = BytesMut::from(&pio.prefix[..]);
        ahead.extend_from_slice(&parts.read_buf);
        if stop == Some(Stop::Park) {
            park(&ctx, conn, pio.inner, ahead.freeze());
            return None;
        }
        tracing::debug!(
            conn = conn.stats().id,
            read_ahead = ahead.len(),
            "idle http connection released from hyper"
        );
        return Some(Released {
            conn,
            stream: pio.inner,
            read_ahead: ahead.freeze(),
            idle_since,
        });
    }
    let reason = match (stop, &result) {
        (_, Err(_)) => "error",
        (Some(Stop::Drain), _) => "drained",
        (Some(Stop::Park), _) => "closed after last request (handover)",
        (Some(Stop::Release), _) => "closed after last request (idle release)",
        (None, _) => "closed",
    };
    close(&ctx, conn, reason)
}

fn close(ctx: &ListenerCtx, conn: ConnHandle, reason: &str) -> Option<Released> {
    close_log(ctx, &conn, reason);
    None
}

async fn start_tunnel(
    ctx: Arc<ListenerCtx>,
    conn: ConnHandle,
    parts: hyper::server::conn::http1::Parts<TokioIo<PrefixedIo>, Svc>,
    tunnel: Tunnel,
) {
    let pio = parts.io.into_inner();
    let mut to_up = pio.prefix.to_vec();
    to_up.extend_from_slice(&parts.read_buf);
    let stats = conn.stats().clone();
    stats.set_kind(ConnKind::Tunnel);
    stats.set_server(Some(tunnel.guard.addr()));
    let _ = tunnel.stream.set_nodelay(true);
    let relay = Relay::new(
        pio.inner,
        tunnel.stream,
        PendingHalf {
            bytes: to_up,
            ..PendingHalf::default()
        },
        PendingHalf {
            bytes: tunnel.read_buf.to_vec(),
            ..PendingHalf::default()
        },
        stats,
    );
    run_tunnel(ctx, conn, relay, Some(tunnel.guard)).await
}
