//! baton's own HTTP/1.1 engine: one task per client connection owns the client socket and,
//! while a request is in flight, its upstream socket. Everything else is plain data
//! ([`state::State`]): the phase, both read buffers, each body's framing and the request's
//! metadata, so the connection can stop at any byte and resume in the successor.
//!
//! Phases: `Head` (read and check a request head, route it), `Connect` (pick a server, take a
//! pooled connection or open one; retries), `Exchange` ([`flow::poll_flow`]: request body up,
//! response down), `Flush` (write what is left, then close). After a response the connection
//! goes back to `Head` (pipelined bytes are served next) or, with nothing buffered, returns to
//! its idle wait in `server`.

mod connect;
mod flow;
mod h2up;
mod outcome;
pub mod pool;
pub mod state;
mod upstream;

use super::head::{self, ReqOpts, RespOpts};
use super::route;
use crate::clock::coarse_ms;
use crate::proxy::client_io::ClientIo;
use crate::proxy::tcp::close_log;
use crate::proxy::ListenerCtx;
use crate::registry::{now_ms, ConnHandle, ConnState, SIG_DRAIN, SIG_KILL, SIG_PARK};
use bytes::{Buf, BytesMut};
use flow::{poll_flow, Flow, FlowOpts};
use outcome::{fail, on_deadline, on_flow, park, tunnel};
use state::{Exchange, Phase, State};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use upstream::connect;
pub use upstream::Upstream;

/// Longest request line accepted by default (414 above).
pub const MAX_URI_BYTES: usize = 8192;

/// A client connection in the engine.
pub struct Conn {
    /// The client's transport: plain, or TLS after its handshake.
    pub client: ClientIo,
    /// The upstream connection of the request in flight.
    pub up: Option<Upstream>,
    /// Everything else.
    pub st: State,
}

impl Conn {
    /// A client connection before its first request: `cbuf` holds what was read of it so far,
    /// `head_started_ms` when its first byte came (the header read timeout counts from there).
    pub fn start(client: ClientIo, cbuf: BytesMut, head_started_ms: Option<u64>) -> Conn {
        Conn {
            client,
            up: None,
            st: State {
                cbuf,
                head_started_ms,
                ..Default::default()
            },
        }
    }
}

/// How [`run`] ended.
pub enum End {
    /// No request in flight and nothing buffered: wait for the next one.
    Idle(ConnHandle, TcpStream),
    /// Closed, parked or turned into a tunnel (already logged).
    Gone,
}

/// What the run loop does after a phase step.
enum Step {
    /// Go on with the next phase.
    Go,
    /// Close the connection (the access line, if any, is written).
    Close(&'static str),
    /// Park it for a handover.
    Park,
    /// Turn it into a tunnel (101).
    Tunnel,
}

/// What woke the engine while it waited.
enum Wake {
    Flow(Flow),
    Read(std::io::Result<usize>),
    Signal(u8),
    Timer,
}

/// Converts the engine's deadlines (ms since the epoch, as the state carries them) to tokio
/// instants with no clock read: both clocks are read once per `run`, and a few ms of drift
/// between them over a connection's life does not matter to timeouts counted in seconds.
#[derive(Clone, Copy)]
struct Clock {
    base: Instant,
    base_ms: u64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            base: Instant::now(),
            base_ms: now_ms(),
        }
    }

    fn at(self, at_ms: u64) -> Instant {
        self.base + Duration::from_millis(at_ms.saturating_sub(self.base_ms))
    }
}

/// One timer per connection (a new `Sleep` per wait cost an allocation and a registration).
/// It is only ever moved earlier: each wait's deadline is a little later than the last one's,
/// and moving the timer on every request cost a timer-wheel removal and insertion. A timer
/// that fires before the deadline of the wait in progress is moved on by [`poll_due`], so a
/// busy connection resets it about once per linger period instead of once per request.
type Timer = std::pin::Pin<Box<tokio::time::Sleep>>;

/// Makes `timer` fire no later than `at`.
fn arm(timer: &mut Timer, at: Instant) {
    if timer.deadline() > at {
        timer.as_mut().reset(at);
    }
}

/// Whether the wait whose deadline is `due` has timed out. A timer that fired early (armed
/// for an earlier wait) is moved to `due` and polled again, which registers it.
fn poll_due(timer: &mut Timer, due: Instant, cx: &mut std::task::Context<'_>) -> bool {
    if timer.as_mut().poll(cx).is_pending() {
        return false;
    }
    if timer.deadline() >= due {
        return true;
    }
    timer.as_mut().reset(due);
    timer.as_mut().poll(cx).is_ready()
}

fn ms_to_instant(at_ms: u64) -> Instant {
    let now = now_ms();
    let now_i = Instant::now();
    if at_ms <= now {
        now_i
    } else {
        now_i + Duration::from_millis(at_ms - now)
    }
}

/// Serves the connection until it is idle, closes, parks or becomes a tunnel.
pub async fn run(ctx: Arc<ListenerCtx>, conn: ConnHandle, mut c: Conn) -> End {
    let stats = conn.stats().clone();
    let http = &ctx.cfg.http;
    // Formatted once for every request's X-Forwarded-For.
    let client_ip = super::head::ip_text(stats.client.ip());
    // How long a connection between requests waits here (state, buffers and this boxed task
    // kept) before it goes back to the idle wait in `server`, which holds none of them.
    // A TLS connection has no idle wait outside the engine (the idle watcher reads raw
    // sockets): after the same time it frees its empty buffers and waits here for the rest
    // of the keep-alive time.
    let linger = super::shared::IDLE_RELEASE.min(http.keepalive_timeout);
    // When the current wait between requests began, and whether its buffers were freed.
    let mut idle_from_ms: Option<u64> = None;
    let mut released = false;
    let https = c.client.is_tls();
    let clock = Clock::new();
    // Made far in the future, so the first wait moves it earlier (`arm`) to a deadline ahead
    // of now: polled with a deadline already past, tokio would register it as due and wake
    // its own driver through the eventfd (one `write` per new connection).
    let mut timer: Timer = Box::pin(tokio::time::sleep_until(
        clock.base + Duration::from_secs(86400 * 365),
    ));
    loop {
        // A signal decided between phases.
        let bits = if conn.signalled() {
            conn.requested(SIG_PARK | SIG_DRAIN | SIG_KILL).await
        } else {
            0
        };
        if bits & SIG_KILL != 0 {
            close_log(&ctx, &conn, "closed at drain deadline");
            return End::Gone;
        }
        if bits & SIG_PARK != 0 {
            return park(&ctx, conn, c);
        }
        if bits & SIG_DRAIN != 0 && c.st.ex.is_none() && c.st.phase == Phase::Head {
            if c.st.cbuf.is_empty() {
                close_log(&ctx, &conn, "drained");
                return End::Gone;
            }
            c.st.close_after = true;
        }
        match c.st.phase {
            Phase::Head => {
                if c.st.cbuf.is_empty() && c.st.ex.is_none() {
                    if c.st.close_after {
                        close_log(&ctx, &conn, "closed");
                        return End::Gone;
                    }
                    stats.set_state(ConnState::Idle);
                    let from = *idle_from_ms.get_or_insert_with(coarse_ms);
                    // A keep-alive client usually sends its next request soon.
                    let wait = if released {
                        http.keepalive_timeout
                    } else {
                        linger
                    };
                    let due = clock.at(from + wait.as_millis() as u64);
                    match wait_read(&conn, &mut c, &mut timer, due).await {
                        Wake::Read(Ok(0)) | Wake::Read(Err(_)) => {
                            close_log(&ctx, &conn, "client closed");
                            return End::Gone;
                        }
                        Wake::Read(Ok(n)) => {
                            // `head_started_ms` is set only if the head is not complete in
                            // this read (below): a clock read per request saved.
                            stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                            idle_from_ms = None;
                            released = false;
                        }
                        Wake::Timer => match c.client {
                            ClientIo::Plain(t) => match t.into_stream() {
                                Ok(s) => return End::Idle(conn, s),
                                Err(_) => {
                                    close_log(&ctx, &conn, "register failed");
                                    return End::Gone;
                                }
                            },
                            ClientIo::Tls(_) if !released && linger < http.keepalive_timeout => {
                                c.st.release_buffers();
                                c.client.release_buffers();
                                released = true;
                            }
                            ClientIo::Tls(_) => {
                                close_log(&ctx, &conn, "idle timeout");
                                return End::Gone;
                            }
                        },
                        Wake::Signal(_) | Wake::Flow(_) => {}
                    }
                    continue;
                }
                stats.set_state(ConnState::Active);
                let opts = ReqOpts {
                    client_ip: &client_ip,
                    max_header_bytes: http.max_header_bytes,
                    max_uri_bytes: http.max_uri_bytes,
                    upgrades: &http.upgrade_protocols,
                    max_body_bytes: http.max_body_bytes,
                    via: "1.1 baton",
                    https,
                };
                match head::parse_request(&c.st.cbuf, &opts) {
                    Ok(Some(req)) => {
                        c.st.cbuf.advance(req.head_len);
                        c.st.head_started_ms = None;
                        if let Err(status) = begin(&ctx, &mut c.st, req) {
                            let why = match status {
                                403 => "connect target not allowed",
                                405 => "connect not enabled on this listener",
                                _ => "request refused",
                            };
                            fail(&ctx, &conn, &mut c, status, true, why);
                        }
                    }
                    Ok(None) => {
                        let started = *c.st.head_started_ms.get_or_insert_with(coarse_ms);
                        let due = clock.at(started + http.header_read_timeout.as_millis() as u64);
                        match wait_read(&conn, &mut c, &mut timer, due).await {
                            Wake::Read(Ok(0)) | Wake::Read(Err(_)) => {
                                close_log(&ctx, &conn, "client closed");
                                return End::Gone;
                            }
                            Wake::Read(Ok(n)) => {
                                stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            Wake::Timer => {
                                // Best effort: the client is slow, so do not wait on it.
                                let _ = c.client.try_write(super::errors::RAW_408);
                                close_log(&ctx, &conn, "header timeout");
                                return End::Gone;
                            }
                            Wake::Signal(_) | Wake::Flow(_) => {}
                        }
                    }
                    Err(e) => {
                        tracing::info!(conn = stats.id, client = %stats.client, status = e.status, reason = e.reason, side = "client", "request refused");
                        c.st.to_cl
                            .extend_from_slice(&head::error_response(e.status, true));
                        c.st.cbuf.clear();
                        c.st.close_after = true;
                        c.st.phase = Phase::Flush;
                    }
                }
            }
            Phase::Connect if h2c_upstream(&ctx, &c.st) => {
                // Boxed, as the other rare paths below: an inline sub-future would make every
                // connection's boxed state as large as the largest of them.
                match Box::pin(h2up::exchange(&ctx, &conn, &mut c)).await {
                    Step::Close(reason) => {
                        close_log(&ctx, &conn, reason);
                        return End::Gone;
                    }
                    _ => continue,
                }
            }
            Phase::Connect => {
                // The connect first: a pooled connection is ready at once, and then no
                // signal waiter is registered at all.
                let connected = {
                    let attempt = connect(&ctx, &mut c.st, stats.client.ip());
                    tokio::pin!(attempt);
                    let mut first = true;
                    std::future::poll_fn(|cx| {
                        if let Poll::Ready(r) = attempt.as_mut().poll(cx) {
                            return Poll::Ready(Ok(r));
                        }
                        if let Poll::Ready(b) =
                            poll_signal(&conn, SIG_PARK | SIG_KILL, &mut first, cx)
                        {
                            return Poll::Ready(Err(b));
                        }
                        Poll::Pending
                    })
                    .await
                };
                let connected = match connected {
                    Ok(r) => r,
                    Err(bits) if bits & SIG_KILL != 0 => {
                        close_log(&ctx, &conn, "closed at drain deadline");
                        return End::Gone;
                    }
                    Err(_) => return park(&ctx, conn, c),
                };
                match connected {
                    Ok(up) if c.st.ex.as_ref().is_some_and(|e| e.connect) => {
                        c.up = Some(up);
                        c.st.to_cl.extend_from_slice(connect::ESTABLISHED);
                        return Box::pin(tunnel(ctx, conn, c, 200)).await;
                    }
                    Ok(up) => {
                        let host = (!http.preserve_host
                            || c.st.ex.as_ref().is_some_and(|e| e.host.is_none()))
                        .then(|| up.addr.to_string());
                        if let Some(ex) = c.st.ex.as_mut() {
                            let req_head = head_of(ex, host.as_deref());
                            c.st.to_up = req_head;
                            ex.attempt_ms = coarse_ms();
                            ex.server = Some(up.addr);
                        }
                        stats.set_server(Some(up.addr));
                        c.up = Some(up);
                        c.st.phase = Phase::Exchange;
                    }
                    Err((status, why)) => {
                        let close = !c.st.ex.as_ref().is_some_and(|e| e.body.is_done());
                        fail(&ctx, &conn, &mut c, status, close, why);
                    }
                }
            }
            Phase::Exchange => match exchange(&ctx, &conn, &mut c, &mut timer, clock).await {
                Step::Go => {}
                Step::Close(reason) => {
                    close_log(&ctx, &conn, reason);
                    return End::Gone;
                }
                Step::Park => return park(&ctx, conn, c),
                Step::Tunnel => return Box::pin(tunnel(ctx, conn, c, 101)).await,
            },
            Phase::Flush => {
                // One write at a time, its bytes dropped from `to_cl` as it completes: a park
                // between two writes moves exactly what is left. (`write_all` keeps its progress
                // to itself, so a park in the middle of it had the successor send the written
                // part again.) A TLS write cut short by a park is counted by `park` itself.
                let deadline = Instant::now() + Duration::from_secs(10);
                while !c.st.to_cl.is_empty() {
                    let step = tokio::select! {
                        biased;
                        bits = conn.requested(SIG_PARK | SIG_KILL) => Err(bits),
                        r = tokio::time::timeout_at(deadline, c.client.write(&c.st.to_cl)) => Ok(r),
                    };
                    match step {
                        Err(bits) if bits & SIG_PARK != 0 && bits & SIG_KILL == 0 => {
                            return park(&ctx, conn, c)
                        }
                        Err(_) => {
                            close_log(&ctx, &conn, "closed at drain deadline");
                            return End::Gone;
                        }
                        Ok(Ok(Ok(n))) if n > 0 => {
                            stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                            c.st.to_cl.advance(n);
                        }
                        Ok(_) => {
                            close_log(&ctx, &conn, "client gone");
                            return End::Gone;
                        }
                    }
                }
                if c.st.close_after {
                    c.client.finish().await;
                    close_log(&ctx, &conn, "closed");
                    return End::Gone;
                }
                c.st.phase = Phase::Head;
            }
        }
    }
}

/// Whether the request in flight goes to an h2c upstream (see `h2up`).
fn h2c_upstream(ctx: &ListenerCtx, st: &State) -> bool {
    st.ex.as_ref().is_some_and(|ex| {
        !ex.connect
            && ex
                .upstream_in(ctx)
                .is_some_and(|u| u.config().http.protocol == crate::config::UpstreamProtocol::H2c)
    })
}

/// The head of one attempt: request line, Host, the rest.
fn head_of(ex: &Exchange, host: Option<&str>) -> BytesMut {
    head::assemble(&ex.line, host.or(ex.host.as_deref()), &ex.rest)
}

/// Routes a parsed request and sets up its exchange; `Err(status)` refuses it.
fn begin(ctx: &ListenerCtx, st: &mut State, req: head::Request) -> Result<(), u16> {
    let now = now_ms();
    if req.is_connect() {
        // CONNECT is a forward-proxy feature: refused unless the listener allows its target.
        let status = match ctx.cfg.http.connect.as_ref() {
            None => Some(405),
            // Bytes after the head are the tunnel's: a body would be read two ways.
            Some(_) if !req.framing.is_done() => Some(400),
            Some(p) if !p.allows(&req.target) => Some(403),
            Some(_) => None,
        };
        let mut ex = exchange_of(req, String::new(), now);
        ex.connect = true;
        st.ex = Some(ex);
        if let Some(s) = status {
            return Err(s);
        }
        st.close_after = true;
        st.phase = Phase::Connect;
        return Ok(());
    }
    // With no routes every request goes to the default upstream: no host to normalize.
    let host = req
        .host
        .as_deref()
        .filter(|_| !ctx.cfg.routes.is_empty())
        .map(route::normalize_host);
    let path = req.target.split('?').next().unwrap_or("/");
    let Some(upstream) = route::select(&ctx.cfg.routes, &ctx.cfg.upstream, host.as_deref(), path)
    else {
        st.ex = Some(exchange_of(req, String::new(), now));
        return Err(404);
    };
    let Some(handle) = ctx.upstreams.get(upstream).cloned() else {
        st.ex = Some(exchange_of(req, upstream.to_string(), now));
        return Err(500);
    };
    if !req.keep_alive {
        st.close_after = true;
    }
    let mut ex = exchange_of(req, upstream.to_string(), now);
    ex.up = state::UpstreamRef(Some(handle));
    st.ex = Some(ex);
    st.phase = Phase::Connect;
    Ok(())
}

fn exchange_of(req: head::Request, upstream: String, now: u64) -> Exchange {
    Exchange {
        method: req.method,
        target: req.target,
        host: req.host,
        http10: req.http10,
        keep_alive: req.keep_alive,
        upgrade: req.upgrade,
        line: req.line,
        rest: req.rest,
        trace: req.trace,
        upstream,
        up: state::UpstreamRef::default(),
        body_initial: req.framing,
        body: req.framing,
        body_written: 0,
        body_taken: 0,
        body_seen_ms: now,
        server: None,
        tried: Vec::new(),
        reused: false,
        resp_seen: false,
        resp: None,
        started_ms: now,
        attempt_ms: now,
        resp_bytes: 0,
        body_discard: false,
        fresh_only: false,
        connect: false,
        te_trailers: req.te_trailers,
    }
}

/// `conn.poll_requested(mask)`, polled the first time (`*first`, which registers the task's
/// waker) and after that only when the signal bits say it may be ready: one atomic load per
/// wake-up in the common case.
fn poll_signal(
    conn: &ConnHandle,
    mask: u8,
    first: &mut bool,
    cx: &mut std::task::Context<'_>,
) -> Poll<u8> {
    if std::mem::take(first) || conn.signalled() {
        conn.poll_requested(mask, cx)
    } else {
        Poll::Pending
    }
}

/// Waits for client bytes (into `cbuf`), a signal, or `due`.
async fn wait_read(conn: &ConnHandle, c: &mut Conn, timer: &mut Timer, due: Instant) -> Wake {
    arm(timer, due);
    let mut first = true;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(b) = poll_signal(conn, SIG_PARK | SIG_DRAIN | SIG_KILL, &mut first, cx) {
            return Poll::Ready(Wake::Signal(b));
        }
        if let Poll::Ready(r) = c.client.poll_fill(&mut c.st.cbuf, cx) {
            return Poll::Ready(Wake::Read(r));
        }
        if poll_due(timer, due, cx) {
            return Poll::Ready(Wake::Timer);
        }
        Poll::Pending
    })
    .await
}

/// The earliest deadline of an exchange, and the status it earns when it passes.
pub(super) fn next_deadline(ctx: &ListenerCtx, ex: &Exchange) -> Option<(u64, u16, &'static str)> {
    let http = &ctx.cfg.http;
    let mut best: Option<(u64, u16, &'static str)> = None;
    let mut consider = |at: u64, status: u16, why: &'static str| {
        if best.is_none_or(|(b, _, _)| at < b) {
            best = Some((at, status, why));
        }
    };
    if let Some(t) = http.request_timeout {
        consider(
            ex.started_ms + t.as_millis() as u64,
            504,
            "request took longer than request_timeout",
        );
    }
    if ex.resp.is_none() {
        let rt = ex
            .upstream_in(ctx)
            .and_then(|u| u.config().http.response_timeout);
        if let Some(t) = rt {
            consider(
                ex.attempt_ms + t.as_millis() as u64,
                504,
                "upstream timeout",
            );
        }
    }
    if !ex.body.is_done() {
        if let Some(t) = http.body_timeout {
            consider(ex.body_seen_ms + t.as_millis() as u64, 408, "body timeout");
        }
    }
    best
}

/// Runs the exchange phase until the flow, a signal or a deadline needs a decision.
async fn exchange(
    ctx: &Arc<ListenerCtx>,
    conn: &ConnHandle,
    c: &mut Conn,
    timer: &mut Timer,
    clock: Clock,
) -> Step {
    let stats = conn.stats().clone();
    // After a drain was asked, only park and kill still interrupt the exchange.
    let mut draining = false;
    loop {
        let Some(ex) = c.st.ex.as_ref() else {
            c.st.phase = Phase::Head;
            return Step::Go;
        };
        if c.up.is_none() && ex.resp.is_none() {
            c.st.phase = Phase::Connect;
            return Step::Go;
        }
        let mut up = c.up.as_mut().map(|u| &mut u.stream);
        let opts = FlowOpts {
            max_head: ctx.cfg.http.max_header_bytes.max(8192),
            max_body: ctx.cfg.http.max_body_bytes,
            resp: RespOpts {
                head_request: ex.method == "HEAD",
                client_http10: ex.http10,
                keep_alive: ex.keep_alive && !c.st.close_after && !draining,
                upgrade: ex.upgrade,
                via: "1.1 baton",
            },
        };
        let due = next_deadline(ctx, ex).map(|(at, _, _)| clock.at(at));
        if let Some(at) = due {
            arm(timer, at);
        }
        let mask = if draining {
            SIG_PARK | SIG_KILL
        } else {
            SIG_PARK | SIG_DRAIN | SIG_KILL
        };
        // After a drain, only a bit other than drain makes the signal ready.
        let mut first = true;
        let wake = std::future::poll_fn(|cx| {
            if let Poll::Ready(b) = poll_signal(conn, mask, &mut first, cx) {
                return Poll::Ready(Wake::Signal(b));
            }
            let flow = poll_flow(
                &mut c.st,
                &mut c.client,
                up.as_deref_mut(),
                &opts,
                &stats,
                cx,
            );
            if let Poll::Ready(f) = flow {
                return Poll::Ready(Wake::Flow(f));
            }
            if due.is_some_and(|at| poll_due(timer, at, cx)) {
                return Poll::Ready(Wake::Timer);
            }
            Poll::Pending
        })
        .await;
        match wake {
            Wake::Signal(bits) if bits & SIG_KILL != 0 => {
                return Step::Close("closed at drain deadline")
            }
            Wake::Signal(bits) if bits & SIG_PARK != 0 => return Step::Park,
            Wake::Signal(_) => {
                // Drain: finish this exchange, then close.
                draining = true;
                c.st.close_after = true;
            }
            Wake::Timer => return on_deadline(ctx, conn, c),
            Wake::Flow(f) => return on_flow(ctx, conn, c, f).await,
            Wake::Read(_) => return Step::Go,
        }
    }
}
