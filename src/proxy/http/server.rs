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
use super::io::PrefixedIo;
use super::service::{Svc, SvcCtx};
use crate::proxy::tcp::{close_log, relay::Relay, run_tunnel};
use crate::proxy::ListenerCtx;
use crate::registry::{
    ConnHandle, ConnKind, ConnState, ConnStats, IdleHttpState, Parked, PendingHalf,
};
use bytes::{Bytes, BytesMut};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The HTTP/2 client connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug)]
struct Timing {
    /// When the connection last became idle (no request in flight).
    idle_since: Instant,
    /// When the first byte of the next request head arrived, if one did.
    head_started: Option<Instant>,
}

/// State of one client connection shared by its loop, its service and its io.
#[derive(Debug)]
pub struct ConnShared {
    /// The registry entry's live facts.
    pub stats: Arc<ConnStats>,
    in_flight: AtomicUsize,
    /// Requests started so far.
    started: AtomicU64,
    /// Content-Length header lines seen in the raw bytes (see `io`).
    pub cl_lines: AtomicU64,
    /// `cl_lines` as of the start of the latest request.
    pub cl_accounted: AtomicU64,
    timing: Mutex<Timing>,
    /// Woken when in-flight count or head timing changes.
    changed: Notify,
    /// The upstream side of an accepted upgrade, picked up by the loop after the 101.
    upgrade: Mutex<Option<Tunnel>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts a request as in flight until dropped (when its response body ends).
#[derive(Debug)]
pub struct InFlight(Arc<ConnShared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.0.timing) = Timing {
                idle_since: Instant::now(),
                head_started: None,
            };
            self.0.stats.set_state(ConnState::Idle);
            self.0.changed.notify_one();
        }
    }
}

impl ConnShared {
    fn new(stats: Arc<ConnStats>, head_started: bool) -> Arc<ConnShared> {
        let now = Instant::now();
        Arc::new(ConnShared {
            stats,
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            cl_lines: AtomicU64::new(0),
            cl_accounted: AtomicU64::new(0),
            timing: Mutex::new(Timing {
                idle_since: now,
                head_started: head_started.then_some(now),
            }),
            changed: Notify::new(),
            upgrade: Mutex::new(None),
        })
    }

    /// A request started.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.started.fetch_add(1, Ordering::Relaxed);
        lock(&self.timing).head_started = None;
        self.stats.set_state(ConnState::Active);
        self.changed.notify_one();
        InFlight(self.clone())
    }

    /// Bytes arrived from the client.
    pub fn on_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let mut t = lock(&self.timing);
            if t.head_started.is_none() {
                t.head_started = Some(Instant::now());
                drop(t);
                self.changed.notify_one();
            }
        }
    }

    /// Stores the upstream side of an accepted upgrade.
    pub fn set_upgrade(&self, t: Tunnel) {
        *lock(&self.upgrade) = Some(t);
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// When the idle connection times out, and whether that is a header timeout.
    fn deadline(&self, ctx: &ListenerCtx) -> Option<(Instant, bool)> {
        if !self.idle() {
            return None;
        }
        let t = lock(&self.timing);
        Some(match t.head_started {
            Some(h) => (h + ctx.cfg.http.header_read_timeout, true),
            None => (t.idle_since + ctx.cfg.http.keepalive_timeout, false),
        })
    }
}

/// Serves a client connection whose first bytes (`prefix`) may already have been read.
pub async fn serve(ctx: Arc<ListenerCtx>, conn: ConnHandle, mut stream: TcpStream, prefix: Bytes) {
    let stats = conn.stats().clone();
    stats.set_state(ConnState::Idle);
    let mut buf = BytesMut::from(&prefix[..]);
    let started = Instant::now();
    // Read until the bytes tell HTTP/1.1 (anything not a prefix of the h2 preface) from h2c.
    let h2 = loop {
        let n = buf.len().min(H2_PREFACE.len());
        if n > 0 && buf[..n] != H2_PREFACE[..n] {
            break false;
        }
        if buf.len() >= H2_PREFACE.len() {
            break true;
        }
        let limit = if buf.is_empty() {
            ctx.cfg.http.keepalive_timeout
        } else {
            ctx.cfg.http.header_read_timeout
        };
        tokio::select! {
            r = stream.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => return close_log(&ctx, &conn, "client closed"),
                Ok(n) => { stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed); }
            },
            _ = tokio::time::sleep_until(started + limit) => return close_log(&ctx, &conn, "idle timeout"),
            _ = conn.park_requested() => return park(&ctx, conn, stream, buf.freeze()),
            _ = conn.drain_requested() => return close_log(&ctx, &conn, "drained"),
            _ = conn.kill_requested() => return close_log(&ctx, &conn, "killed"),
        }
    };
    let shared = ConnShared::new(stats.clone(), !buf.is_empty());
    let io = PrefixedIo::new(stream, buf.freeze(), stats.clone(), shared.clone());
    let svc = Svc(Arc::new(SvcCtx {
        ctx: ctx.clone(),
        shared: shared.clone(),
        client: stats.client,
        h2,
    }));
    if h2 {
        stats.set_kind(ConnKind::Http2);
        serve_h2(ctx, conn, io, svc).await
    } else {
        serve_h1(ctx, conn, io, svc, shared).await
    }
}

fn park(ctx: &ListenerCtx, conn: ConnHandle, stream: TcpStream, read_ahead: Bytes) {
    let meta = conn.stats().meta();
    match stream.into_std() {
        Ok(client) => {
            tracing::debug!(conn = conn.stats().id, client = %meta.client, read_ahead = read_ahead.len(), "parking idle http connection");
            ctx.lm.parked();
            conn.park(Parked::IdleHttp(IdleHttpState {
                meta,
                client,
                read_ahead: read_ahead.to_vec(),
            }));
        }
        Err(e) => {
            tracing::warn!(client = %meta.client, error = %e, "cannot park http connection; closing it");
            close_log(ctx, &conn, "park failed");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Park,
    Drain,
}

async fn serve_h1(
    ctx: Arc<ListenerCtx>,
    conn: ConnHandle,
    io: PrefixedIo,
    svc: Svc,
    shared: Arc<ConnShared>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper refuses a buffer below 8 KiB; a head past max_buf_size gets 431 from hyper.
    builder
        .max_buf_size(ctx.cfg.http.max_header_bytes.max(8192))
        .timer(TokioTimer::new());
    let mut hconn = builder.serve_connection(TokioIo::new(io), svc);
    let mut stop: Option<Stop> = None;
    // Requests started when graceful_shutdown was called for a park.
    let mut shut_at: Option<u64> = None;
    let result = loop {
        if stop == Some(Stop::Park) && shut_at.is_none() && shared.idle() {
            shut_at = Some(shared.started.load(Ordering::Relaxed));
            std::pin::Pin::new(&mut hconn).graceful_shutdown();
        }
        let deadline = shared.deadline(&ctx);
        let timer = async {
            match deadline {
                Some((d, _)) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = std::future::poll_fn(|cx| hconn.poll_without_shutdown(cx)) => break r,
            _ = conn.park_requested(), if stop.is_none() => stop = Some(Stop::Park),
            _ = conn.drain_requested(), if stop.is_none() => {
                stop = Some(Stop::Drain);
                std::pin::Pin::new(&mut hconn).graceful_shutdown();
            }
            _ = conn.kill_requested() => return close_log(&ctx, &conn, "closed at drain deadline"),
            _ = shared.changed.notified() => {}
            _ = timer => {
                match shared.deadline(&ctx) {
                    Some((d, true)) if d <= Instant::now() => {
                        let mut io = hconn.into_parts().io.into_inner();
                        tracing::info!(conn = shared.stats.id, client = %shared.stats.client, status = 408, side = "client", "request head not received in time");
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                            let _ = io.inner.write_all(RAW_408).await;
                            let _ = io.inner.shutdown().await;
                        }).await;
                        return close_log(&ctx, &conn, "header read timeout");
                    }
                    Some((d, false)) if d <= Instant::now() => return close_log(&ctx, &conn, "keep-alive timeout"),
                    _ => {}
                }
            }
        }
    };
    let upgrade = lock(&shared.upgrade).take();
    if let Some(tunnel) = upgrade {
        if result.is_ok() {
            return start_tunnel(ctx, conn, hconn.into_parts(), tunnel).await;
        }
    }
    if let Err(e) = &result {
        tracing::debug!(conn = shared.stats.id, client = %shared.stats.client, error = %e, side = "client", "http connection error");
    }
    let clean_park = stop == Some(Stop::Park)
        && result.is_ok()
        && shared.idle()
        && shut_at == Some(shared.started.load(Ordering::Relaxed));
    if clean_park {
        let parts = hconn.into_parts();
        let pio = parts.io.into_inner();
        let mut ahead = BytesMut::from(&pio.prefix[..]);
        ahead.extend_from_slice(&parts.read_buf);
        return park(&ctx, conn, pio.inner, ahead.freeze());
    }
    let reason = match (stop, &result) {
        (_, Err(_)) => "error",
        (Some(Stop::Drain), _) => "drained",
        (Some(Stop::Park), _) => "closed after last request (handover)",
        (None, _) => "closed",
    };
    close_log(&ctx, &conn, reason);
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

async fn serve_h2(ctx: Arc<ListenerCtx>, conn: ConnHandle, io: PrefixedIo, svc: Svc) {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(ctx.cfg.http.max_header_bytes.min(u32::MAX as usize) as u32);
    let hconn = builder.serve_connection(TokioIo::new(io), svc);
    let mut hconn = std::pin::pin!(hconn);
    let mut stopping = false;
    let result = loop {
        tokio::select! {
            r = hconn.as_mut() => break r,
            _ = conn.park_requested(), if !stopping => {
                stopping = true;
                hconn.as_mut().graceful_shutdown();
            }
            _ = conn.drain_requested(), if !stopping => {
                stopping = true;
                hconn.as_mut().graceful_shutdown();
            }
            _ = conn.kill_requested() => return close_log(&ctx, &conn, "closed at drain deadline"),
        }
    };
    let reason = match result {
        Ok(()) if stopping => "drained (goaway)",
        Ok(()) => "closed",
        Err(e) => {
            tracing::debug!(conn = conn.stats().id, error = %e, side = "client", "h2 connection error");
            "error"
        }
    };
    close_log(&ctx, &conn, reason);
}
