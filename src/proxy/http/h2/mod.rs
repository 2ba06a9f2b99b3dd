//! h2c client connections (prior knowledge), served by hyper. Their state lives inside hyper,
//! so they cannot be handed over: on park or drain they finish in the old process and end
//! with GOAWAY.
//!
//! How they end matters to clients. hyper's graceful shutdown sends GOAWAY, then PING, then a
//! second GOAWAY, and keeps sending the open streams' frames; python's `h2` stack (httpx)
//! treats a connection as closed at the first GOAWAY and fails on any later frame but another
//! GOAWAY ("RECV_PING in state CLOSED"). So baton sends a single GOAWAY itself (NO_ERROR, the
//! last stream the client opened), and only where nothing can follow it: glued, in the same
//! write, to the frame that ends the last open stream. That write is held until the client
//! has answered [`ROUNDS`] PINGs (at most [`hold::HOLD`]): httpcore (httpx) reads under a lock and
//! fails every request still waiting for that lock once a GOAWAY has been read, responses in
//! or not, and each PING makes its blocked reader let go of the lock, so the requests whose
//! responses are in are done before the GOAWAY arrives. The client reads the last response
//! and the GOAWAY together, so its next request goes to a new connection. (A GOAWAY sent to an
//! idle connection would wait in the client's buffer; httpx reads it only once its next
//! requests are under way, and fails those it had not sent yet.) After the GOAWAY, hyper is
//! stopped, baton closes its sending side and reads until the client closes, so no reset
//! overtakes the GOAWAY. To know when a write ends the last stream, [`Frames`] follows the
//! frame headers going each way. A connection with no request within [`IDLE_GRACE`] gets the
//! GOAWAY alone; one that is never without an open stream gets hyper's graceful shutdown; the
//! drain deadline bounds both.

mod frames;
mod hold;

use super::io::PrefixedIo;
use super::service::Svc;
use crate::proxy::tcp::close_log;
use crate::proxy::ListenerCtx;
use crate::registry::ConnHandle;
use frames::{goaway, Frames};
use hold::{Conn, Goaway, Rounds, ROUNDS};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

/// How long a stopping connection waits for a response to glue its GOAWAY to: then an idle
/// one gets the GOAWAY alone, a busy one hyper's graceful shutdown (GOAWAY, PING, GOAWAY).
pub const IDLE_GRACE: Duration = Duration::from_secs(5);
/// How long the client gets to close after our GOAWAY before the socket is closed anyway.
const LINGER: Duration = Duration::from_secs(2);

/// The connection state shared by hyper's side ([`Tap`]) and the connection loop.
struct Shared {
    inner: Mutex<Conn>,
    /// Notified once the GOAWAY has gone out (then hyper is not polled again).
    goaway_sent: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Conn> {
        // Plain data behind a short lock; a panic elsewhere leaves it usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The socket as hyper sees it: every byte passes [`Frames`] on its way.
struct Tap(Arc<Shared>);

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut g = self.0.lock();
        let c = &mut *g;
        if c.hold.is_some() && (1..=ROUNDS).contains(&c.rounds.round) {
            // The PING rounds read the socket themselves; hyper reads once they end.
            c.rounds.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut c.io).poll_read(cx, buf);
        c.frames.read(&buf.filled()[before..]);
        r
    }
}

impl Tap {
    fn tap_write(&self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        let mut g = self.0.lock();
        let was = matches!(g.goaway, Goaway::No);
        let r = g.poll_write(cx, bufs, len);
        if was && !matches!(g.goaway, Goaway::No) {
            self.0.goaway_sent.notify_one();
        }
        r
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.tap_write(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.tap_write(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.lock().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.lock().io).poll_shutdown(cx)
    }
}

/// The socket itself, for the connection loop once hyper is gone.
struct Raw(Arc<Shared>);

impl AsyncRead for Raw {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.lock().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Raw {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0.lock().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.lock().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.lock().io).poll_shutdown(cx)
    }
}

/// Ends a connection once its GOAWAY is written (or, idle, writes it now): the rest of a
/// partly sent GOAWAY goes out, our side is closed, then the client's bytes are read and
/// dropped until it closes (a reset would overtake the GOAWAY), at most [`LINGER`].
async fn close_with_goaway(shared: Arc<Shared>, conn: &ConnHandle) {
    {
        let mut g = shared.lock();
        if matches!(g.goaway, Goaway::No) {
            g.goaway = Goaway::Partly(goaway(g.frames.last_stream).to_vec());
        }
    }
    let flushed = std::future::poll_fn(|cx| shared.lock().poll_goaway(cx)).await;
    let mut raw = Raw(shared);
    if flushed.is_err() || raw.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let linger = async {
        while let Ok(n) = raw.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        _ = linger => {}
        _ = tokio::time::sleep(LINGER) => {}
        _ = conn.kill_requested() => {}
    }
}

/// Serves one h2c connection until it closes, or until a park, drain or kill ends it.
pub(super) async fn serve_h2(ctx: Arc<ListenerCtx>, conn: ConnHandle, io: PrefixedIo, svc: Svc) {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(ctx.cfg.http.max_header_bytes.min(u32::MAX as usize) as u32);
    let shared = Arc::new(Shared {
        inner: Mutex::new(Conn {
            io,
            frames: Frames::new(),
            stopping: false,
            goaway: Goaway::No,
            hold: None,
            rounds: Rounds::default(),
        }),
        goaway_sent: Notify::new(),
    });
    let hconn = builder.serve_connection(TokioIo::new(Tap(shared.clone())), svc);
    let mut hconn = std::pin::pin!(hconn);
    // Stopping: waiting for a response to glue the GOAWAY to, until the grace ends.
    let mut stopping = false;
    let mut fallback = false;
    let grace = tokio::time::sleep(Duration::MAX);
    tokio::pin!(grace);
    // keepalive_timeout without an open stream closes the connection, as between two
    // requests of HTTP/1.1: a client that sent the preface (or its last request) and then
    // nothing would otherwise hold its connection, and its max_connections permit, for ever.
    let keepalive = ctx.cfg.http.keepalive_timeout;
    let idle = tokio::time::sleep(keepalive);
    tokio::pin!(idle);
    let result = loop {
        tokio::select! {
            r = hconn.as_mut() => break r,
            _ = conn.requested(crate::registry::SIG_PARK | crate::registry::SIG_DRAIN), if !stopping => {
                stopping = true;
                shared.lock().stopping = true;
                grace.as_mut().reset(tokio::time::Instant::now() + IDLE_GRACE);
            }
            _ = shared.goaway_sent.notified() => {
                // hyper is not polled again (it is dropped at return): the GOAWAY is the
                // last frame the client sees.
                close_with_goaway(shared, &conn).await;
                return close_log(&ctx, &conn, "drained (goaway)");
            }
            _ = &mut grace, if stopping && !fallback => {
                if shared.lock().frames.quiet() {
                    close_with_goaway(shared, &conn).await;
                    return close_log(&ctx, &conn, "drained (goaway, idle)");
                }
                tracing::debug!(conn = conn.stats().id, "h2 connection never quiet; graceful shutdown");
                fallback = true;
                shared.lock().stopping = false;
                hconn.as_mut().graceful_shutdown();
            }
            _ = &mut idle, if !stopping => {
                let due = {
                    let g = shared.lock();
                    g.frames.quiet_since.filter(|_| g.frames.quiet()).map(|t| t + keepalive)
                };
                match due {
                    Some(due) if due <= tokio::time::Instant::now() => {
                        close_with_goaway(shared, &conn).await;
                        return close_log(&ctx, &conn, "idle timeout");
                    }
                    Some(due) => idle.as_mut().reset(due),
                    // A stream is open: look again a keepalive_timeout from now.
                    None => idle.as_mut().reset(tokio::time::Instant::now() + keepalive),
                }
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
