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

mod flow;
pub mod pool;
pub mod state;

use super::head::{self, ReqOpts, RespOpts};
use super::route;
use crate::proxy::tcp::{close_log, relay::Relay, run_tunnel};
use crate::proxy::ListenerCtx;
use crate::registry::{
    now_ms, ConnHandle, ConnKind, ConnState, HttpState, Parked, PendingHalf, SIG_DRAIN, SIG_KILL,
    SIG_PARK,
};
use crate::upstream::ServerGuard;
use bytes::{Buf, BytesMut};
use flow::{poll_fill, poll_flow, Flow, FlowOpts};
use state::{Exchange, Phase, State};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Longest request line accepted by default (414 above).
pub const MAX_URI_BYTES: usize = 8192;

/// The upstream side of an exchange.
pub struct Upstream {
    /// The socket.
    pub stream: TcpStream,
    /// Its server.
    pub addr: SocketAddr,
    /// Keeps the server counted as active (absent after a resume).
    pub guard: Option<ServerGuard>,
}

/// A client connection in the engine.
pub struct Conn {
    /// The client socket.
    pub client: TcpStream,
    /// The upstream connection of the request in flight.
    pub up: Option<Upstream>,
    /// Everything else.
    pub st: State,
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
                    return End::Idle(conn, c.client);
                }
                stats.set_state(ConnState::Active);
                let opts = ReqOpts {
                    client_ip: stats.client.ip(),
                    max_header_bytes: http.max_header_bytes,
                    max_uri_bytes: http.max_uri_bytes,
                    upgrades: &http.upgrade_protocols,
                    max_body_bytes: http.max_body_bytes,
                };
                match head::parse_request(&c.st.cbuf, &opts) {
                    Ok(Some(req)) => {
                        c.st.cbuf.advance(req.head_len);
                        c.st.head_started_ms = None;
                        if let Err(status) = begin(&ctx, &mut c.st, req) {
                            fail(&ctx, &conn, &mut c, status, true, "request refused");
                        }
                    }
                    Ok(None) => {
                        let started = *c.st.head_started_ms.get_or_insert_with(now_ms);
                        let due = started + http.header_read_timeout.as_millis() as u64;
                        match wait_read(&conn, &mut c, due).await {
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
            Phase::Connect => {
                let connected = tokio::select! {
                    biased;
                    bits = conn.requested(SIG_PARK | SIG_KILL) => {
                        if bits & SIG_KILL != 0 {
                            close_log(&ctx, &conn, "closed at drain deadline");
                            return End::Gone;
                        }
                        return park(&ctx, conn, c);
                    }
                    r = connect(&ctx, &mut c.st, stats.client.ip()) => r,
                };
                match connected {
                    Ok(up) => {
                        let host = (!http.preserve_host
                            || c.st.ex.as_ref().is_some_and(|e| e.host.is_none()))
                        .then(|| up.addr.to_string());
                        if let Some(ex) = c.st.ex.as_mut() {
                            let req_head = head_of(ex, host.as_deref());
                            c.st.to_up = req_head;
                            ex.attempt_ms = now_ms();
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
            Phase::Exchange => match exchange(&ctx, &conn, &mut c).await {
                Step::Go => {}
                Step::Close(reason) => {
                    close_log(&ctx, &conn, reason);
                    return End::Gone;
                }
                Step::Park => return park(&ctx, conn, c),
                Step::Tunnel => return tunnel(ctx, conn, c).await,
            },
            Phase::Flush => {
                let stop = tokio::select! {
                    biased;
                    bits = conn.requested(SIG_PARK | SIG_KILL) => Some(bits),
                    r = tokio::time::timeout(Duration::from_secs(10), c.client.write_all(&c.st.to_cl)) => {
                        let _ = r;
                        None
                    }
                };
                match stop {
                    Some(bits) if bits & SIG_PARK != 0 && bits & SIG_KILL == 0 => {
                        return park(&ctx, conn, c)
                    }
                    Some(_) => {
                        close_log(&ctx, &conn, "closed at drain deadline");
                        return End::Gone;
                    }
                    None => {}
                }
                stats
                    .bytes_out
                    .fetch_add(c.st.to_cl.len() as u64, Ordering::Relaxed);
                c.st.to_cl.clear();
                if c.st.close_after {
                    let _ = c.client.shutdown().await;
                    close_log(&ctx, &conn, "closed");
                    return End::Gone;
                }
                c.st.phase = Phase::Head;
            }
        }
    }
}

/// The head of one attempt: request line, Host, the rest.
fn head_of(ex: &Exchange, host: Option<&str>) -> BytesMut {
    let host = host.or(ex.host.as_deref());
    let mut out = BytesMut::with_capacity(ex.line.len() + ex.rest.len() + 64);
    out.extend_from_slice(&ex.line);
    if let Some(h) = host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&ex.rest);
    out
}

/// Routes a parsed request and sets up its exchange; `Err(status)` refuses it.
fn begin(ctx: &ListenerCtx, st: &mut State, req: head::Request) -> Result<(), u16> {
    let now = now_ms();
    if req.is_connect() {
        // CONNECT is a forward-proxy feature: refused unless the listener allows its target.
        return Err(405);
    }
    let host = req.host.as_deref().map(route::normalize_host);
    let path = req.target.split('?').next().unwrap_or("/");
    let Some(upstream) = route::select(&ctx.cfg.routes, &ctx.cfg.upstream, host.as_deref(), path)
    else {
        st.ex = Some(exchange_of(req, String::new(), now));
        return Err(404);
    };
    let upstream = upstream.to_string();
    if !ctx.upstreams.contains_key(&upstream) {
        st.ex = Some(exchange_of(req, upstream, now));
        return Err(500);
    }
    if !req.keep_alive {
        st.close_after = true;
    }
    st.ex = Some(exchange_of(req, upstream, now));
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
        trace: req.trace.as_str().to_string(),
        upstream,
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
    }
}

/// Picks a server and gets a connection to it: pooled, or new (connect failures are retried
/// on other servers, up to `retries`).
async fn connect(
    ctx: &ListenerCtx,
    st: &mut State,
    client_ip: std::net::IpAddr,
) -> Result<Upstream, (u16, &'static str)> {
    let ex = st.ex.as_mut().ok_or((500, "no request"))?;
    let Some(upstream) = ctx.upstreams.get(&ex.upstream) else {
        return Err((500, "missing upstream"));
    };
    let cfg = upstream.config();
    loop {
        let Some(guard) = upstream.pick(client_ip, &ex.tried) else {
            return Err((
                if ex.tried.is_empty() { 503 } else { 502 },
                "no server available",
            ));
        };
        let addr = guard.addr();
        if !std::mem::take(&mut ex.fresh_only) {
            if let Some(s) = ctx.h1_pool.checkout(addr) {
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
        let limit = left.map_or(cfg.connect_timeout, |l| l.min(cfg.connect_timeout));
        let r = tokio::time::timeout(limit, TcpStream::connect(addr)).await;
        match r {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                upstream.report(addr, true);
                return Ok(Upstream {
                    stream: s,
                    addr,
                    guard: Some(guard),
                });
            }
            Ok(Err(e)) if crate::proxy::is_resource_exhaustion(&e) => {
                // Our own fd shortage is not the server's fault.
                tracing::warn!(server = %addr, error = %e, "upstream connect failed: out of resources");
                return Err((503, "out of resources"));
            }
            other => {
                if left.is_some_and(|l| l <= limit) && other.is_err() {
                    return Err((504, "request timeout"));
                }
                upstream.report(addr, false);
                let reason = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "connect timed out".to_string(),
                };
                tracing::debug!(server = %addr, error = %reason, side = "upstream", "upstream connect failed");
                ex.tried.push(addr);
                if ex.tried.len() as u32 > cfg.retries {
                    return Err((502, "upstream connect failed"));
                }
            }
        }
    }
}

/// Waits for client bytes (into `cbuf`), a signal, or `due_ms`.
async fn wait_read(conn: &ConnHandle, c: &mut Conn, due_ms: u64) -> Wake {
    let sleep = tokio::time::sleep_until(ms_to_instant(due_ms));
    let signal = conn.requested(SIG_PARK | SIG_DRAIN | SIG_KILL);
    tokio::pin!(sleep, signal);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(b) = signal.as_mut().poll(cx) {
            return Poll::Ready(Wake::Signal(b));
        }
        if let Poll::Ready(r) = poll_fill(&c.client, &mut c.st.cbuf, cx) {
            return Poll::Ready(Wake::Read(r));
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Wake::Timer);
        }
        Poll::Pending
    })
    .await
}

/// The earliest deadline of an exchange, and the status it earns when it passes.
fn next_deadline(ctx: &ListenerCtx, ex: &Exchange) -> Option<(u64, u16, &'static str)> {
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
        let rt = ctx
            .upstreams
            .get(&ex.upstream)
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

/// Runs the exchange phase; `Some` when the connection is gone, `None` to go on.
async fn exchange(ctx: &Arc<ListenerCtx>, conn: &ConnHandle, c: &mut Conn) -> Step {
    let stats = conn.stats().clone();
    let Some(up) = c.up.as_mut() else {
        c.st.phase = Phase::Connect;
        return Step::Go;
    };
    let (draining, resp_opts) = {
        let Some(ex) = c.st.ex.as_ref() else {
            c.st.phase = Phase::Head;
            return Step::Go;
        };
        let draining = conn.signalled();
        (
            draining,
            RespOpts {
                head_request: ex.method == "HEAD",
                client_http10: ex.http10,
                keep_alive: ex.keep_alive && !c.st.close_after && !draining,
                upgrade: ex.upgrade,
            },
        )
    };
    let _ = draining;
    let opts = FlowOpts {
        max_head: ctx.cfg.http.max_header_bytes.max(8192),
        max_body: ctx.cfg.http.max_body_bytes,
        resp: resp_opts,
    };
    let deadline = c.st.ex.as_ref().and_then(|ex| next_deadline(ctx, ex));
    let sleep = tokio::time::sleep_until(deadline.map_or_else(
        || Instant::now() + Duration::from_secs(3600),
        |(at, _, _)| ms_to_instant(at),
    ));
    let signal = conn.requested(SIG_PARK | SIG_DRAIN | SIG_KILL);
    tokio::pin!(sleep, signal);
    let wake = std::future::poll_fn(|cx| {
        if let Poll::Ready(b) = signal.as_mut().poll(cx) {
            return Poll::Ready(Wake::Signal(b));
        }
        if let Poll::Ready(f) = poll_flow(
            &mut c.st,
            &mut c.client,
            &mut up.stream,
            &opts,
            &stats,
            now_ms(),
            cx,
        ) {
            return Poll::Ready(Wake::Flow(f));
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Wake::Timer);
        }
        Poll::Pending
    })
    .await;
    match wake {
        Wake::Signal(bits) => {
            if bits & SIG_KILL != 0 {
                return Step::Close("closed at drain deadline");
            }
            if bits & SIG_PARK != 0 {
                return Step::Park;
            }
            // Drain: finish this exchange, then close.
            c.st.close_after = true;
            // Wait again without the drain bit (it stays set).
            return exchange_drain(ctx, conn, c).await;
        }
        Wake::Timer => {
            let Some((at, status, why)) = c.st.ex.as_ref().and_then(|ex| next_deadline(ctx, ex))
            else {
                return Step::Go;
            };
            if at > now_ms() {
                return Step::Go;
            }
            let answered =
                c.st.ex
                    .as_ref()
                    .is_some_and(|e| e.resp.is_some() || e.resp_bytes > 0);
            if answered {
                log_access(ctx, conn, &c.st, false);
                return Step::Close(why);
            }
            c.up = None;
            fail(ctx, conn, c, status, true, why);
            Step::Go
        }
        Wake::Flow(f) => on_flow(ctx, conn, c, f).await,
        Wake::Read(_) => Step::Go,
    }
}

/// The exchange loop after a drain was asked: only park and kill still interrupt it.
async fn exchange_drain(ctx: &Arc<ListenerCtx>, conn: &ConnHandle, c: &mut Conn) -> Step {
    let stats = conn.stats().clone();
    {
        let (Some(up), Some(ex)) = (c.up.as_mut(), c.st.ex.as_ref()) else {
            return Step::Go;
        };
        let opts = FlowOpts {
            max_head: ctx.cfg.http.max_header_bytes.max(8192),
            max_body: ctx.cfg.http.max_body_bytes,
            resp: RespOpts {
                head_request: ex.method == "HEAD",
                client_http10: ex.http10,
                keep_alive: false,
                upgrade: ex.upgrade,
            },
        };
        let deadline = next_deadline(ctx, ex);
        let sleep = tokio::time::sleep_until(deadline.map_or_else(
            || Instant::now() + Duration::from_secs(3600),
            |(at, _, _)| ms_to_instant(at),
        ));
        let signal = conn.requested(SIG_PARK | SIG_KILL);
        tokio::pin!(sleep, signal);
        let wake = std::future::poll_fn(|cx| {
            if let Poll::Ready(b) = signal.as_mut().poll(cx) {
                return Poll::Ready(Wake::Signal(b));
            }
            if let Poll::Ready(f) = poll_flow(
                &mut c.st,
                &mut c.client,
                &mut up.stream,
                &opts,
                &stats,
                now_ms(),
                cx,
            ) {
                return Poll::Ready(Wake::Flow(f));
            }
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Timer);
            }
            Poll::Pending
        })
        .await;
        match wake {
            Wake::Signal(bits) if bits & SIG_KILL != 0 => Step::Close("closed at drain deadline"),
            Wake::Signal(_) => Step::Park,
            Wake::Flow(f) => on_flow(ctx, conn, c, f).await,
            Wake::Timer | Wake::Read(_) => Step::Go,
        }
    }
}

/// Acts on what stopped the flow.
async fn on_flow(ctx: &Arc<ListenerCtx>, conn: &ConnHandle, c: &mut Conn, f: Flow) -> Step {
    match f {
        Flow::Complete | Flow::CompleteEarly => {
            let early = matches!(f, Flow::CompleteEarly);
            let (reusable, close_client) =
                c.st.ex
                    .as_ref()
                    .and_then(|e| e.resp)
                    .map_or((false, true), |r| (r.reusable, r.close_client));
            log_access(ctx, conn, &c.st, true);
            if let Some(up) = c.up.take() {
                if reusable && !early {
                    let max = ctx
                        .upstreams
                        .get(
                            &c.st
                                .ex
                                .as_ref()
                                .map(|e| e.upstream.clone())
                                .unwrap_or_default(),
                        )
                        .map_or(0, |u| u.config().http.pool_idle_per_server);
                    ctx.h1_pool.put(up.addr, up.stream, max);
                }
            }
            c.st.ex = None;
            c.st.phase = Phase::Head;
            c.st.to_up.clear();
            if early || close_client {
                c.st.close_after = true;
            }
            if c.st.close_after {
                let _ = c.client.shutdown().await;
                return Step::Close("closed");
            }
            Step::Go
        }
        Flow::UpstreamFailed(reason) => {
            let up = c.up.take();
            let Some(ex) = c.st.ex.as_mut() else {
                return Step::Go;
            };
            let addr = up.as_ref().map(|u| u.addr);
            tracing::debug!(server = ?addr, error = %reason, side = "upstream", "upstream request failed");
            let nothing_sent = ex.body_written == 0;
            let upstream = ctx.upstreams.get(&ex.upstream).cloned();
            let retries = upstream.as_ref().map_or(0, |u| u.config().retries);
            let again = nothing_sent && !ex.resp_seen;
            if again && ex.reused {
                // A pooled connection the server had closed: a new one, not a retry.
                ex.reused = false;
                ex.fresh_only = true;
                reset_attempt(&mut c.st);
                c.st.phase = Phase::Connect;
                return Step::Go;
            }
            if let (Some(a), Some(u)) = (addr, upstream.as_ref()) {
                u.report(a, false);
                ex.tried.push(a);
            }
            let Some(ex) = c.st.ex.as_mut() else {
                return Step::Go;
            };
            let idempotent = matches!(
                ex.method.as_str(),
                "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE"
            );
            if again && idempotent && ex.tried.len() as u32 <= retries {
                if let Some(m) = upstream.as_ref().and_then(|u| u.metrics()) {
                    m.retry();
                }
                reset_attempt(&mut c.st);
                c.st.phase = Phase::Connect;
                return Step::Go;
            }
            let close = !ex.body.is_done();
            fail(ctx, conn, c, 502, close, "upstream request failed");
            Step::Go
        }
        Flow::UpstreamBroke(why, status) => {
            c.up = None;
            let started =
                c.st.ex
                    .as_ref()
                    .is_some_and(|e| e.resp.is_some() || e.resp_bytes > 0);
            tracing::info!(
                conn = conn.stats().id,
                reason = why,
                side = "upstream",
                "upstream response broken"
            );
            if started || status == 0 {
                log_access(ctx, conn, &c.st, false);
                return Step::Close(why);
            }
            fail(ctx, conn, c, status, true, why);
            Step::Go
        }
        Flow::ClientFailed(why, status) => {
            let answered =
                c.st.ex
                    .as_ref()
                    .is_some_and(|e| e.resp.is_some() || e.resp_bytes > 0);
            c.up = None;
            match status {
                Some(s) if !answered => {
                    fail(ctx, conn, c, s, true, why);
                    Step::Go
                }
                _ => {
                    log_access(ctx, conn, &c.st, false);
                    Step::Close(why)
                }
            }
        }
        Flow::TooLarge => {
            let answered =
                c.st.ex
                    .as_ref()
                    .is_some_and(|e| e.resp.is_some() || e.resp_bytes > 0);
            c.up = None;
            if answered {
                log_access(ctx, conn, &c.st, false);
                return Step::Close("request body too large");
            }
            fail(ctx, conn, c, 413, true, "request body too large");
            Step::Go
        }
        Flow::Switched => Step::Tunnel,
    }
}

/// Rewinds the request to its start for a new attempt (nothing of its body was written).
fn reset_attempt(st: &mut State) {
    if let Some(ex) = st.ex.as_mut() {
        // Body bytes marked for the failed attempt are still at the front of `cbuf`.
        ex.body_taken -= st.cl_ready as u64;
        st.cl_ready = 0;
        ex.body = if ex.body_taken == 0 {
            ex.body_initial
        } else {
            ex.body
        };
        ex.resp_seen = false;
        ex.resp = None;
        ex.server = None;
    }
    st.to_up.clear();
    st.ubuf.clear();
    st.up_ready = 0;
    st.to_cl.clear();
}

/// Answers the request with an error `status` (nothing of a response was written yet) and
/// goes to `Flush`; `close` ends the connection after it.
fn fail(ctx: &ListenerCtx, conn: &ConnHandle, c: &mut Conn, status: u16, close: bool, why: &str) {
    let stats = conn.stats();
    let side = if (400..500).contains(&status) {
        "client"
    } else {
        "upstream"
    };
    tracing::info!(conn = stats.id, client = %stats.client, status, reason = why, side, "request failed");
    c.up = None;
    let close = close || c.st.close_after;
    c.st.to_up.clear();
    c.st.ubuf.clear();
    c.st.up_ready = 0;
    c.st.to_cl.clear();
    let text = match why {
        "request took longer than request_timeout" | "request timeout" => Some("request timeout\n"),
        "body timeout" => Some("request body timeout\n"),
        _ => None,
    };
    c.st.to_cl
        .extend_from_slice(&head::error_response_text(status, text, close));
    if let Some(ex) = c.st.ex.as_mut() {
        ex.resp = Some(state::RespState {
            status,
            framing: super::framing::Framing::Done,
            body: head::ClientBody::Pass,
            close_client: close,
            reusable: false,
        });
    }
    log_access(ctx, conn, &c.st, true);
    c.st.ex = None;
    if close {
        c.st.close_after = true;
        c.st.cbuf.clear();
        c.st.cl_ready = 0;
    }
    c.st.phase = Phase::Flush;
}

/// Writes the access line of the exchange in `st` (target `baton::access`) and counts it.
fn log_access(ctx: &ListenerCtx, conn: &ConnHandle, st: &State, complete: bool) {
    let Some(ex) = st.ex.as_ref() else { return };
    let status = ex.resp.map_or(0, |r| r.status);
    let elapsed = Duration::from_millis(now_ms().saturating_sub(ex.started_ms));
    let upstream = ctx.upstreams.get(&ex.upstream);
    match upstream.and_then(|u| u.metrics()) {
        Some(h) => h.request(status, elapsed),
        None => ctx.metrics.http_request(&ex.upstream, status, elapsed),
    }
    let stats = conn.stats();
    let host = ex.host.as_deref().map(route::normalize_host);
    tracing::info!(
        target: "baton::access",
        conn = stats.id,
        listener = %ctx.name,
        method = %ex.method,
        host = host.as_deref().unwrap_or("-"),
        path = ex.target.split('?').next().unwrap_or("/"),
        status,
        bytes = ex.resp_bytes,
        complete,
        duration_ms = elapsed.as_millis() as u64,
        server = %ex.server.map_or_else(|| "-".to_string(), |s| s.to_string()),
        client = %stats.client,
        trace_id = %ex.trace,
        "request"
    );
}

/// Joins client and upstream on the L4 relay after a 101.
async fn tunnel(ctx: Arc<ListenerCtx>, conn: ConnHandle, mut c: Conn) -> End {
    let Some(up) = c.up.take() else {
        close_log(&ctx, &conn, "closed");
        return End::Gone;
    };
    if let Some(ex) = c.st.ex.as_mut() {
        ex.resp = Some(state::RespState {
            status: 101,
            framing: super::framing::Framing::Done,
            body: head::ClientBody::Pass,
            close_client: false,
            reusable: false,
        });
    }
    log_access(&ctx, &conn, &c.st, true);
    let st = c.st;
    let mut to_upstream = st.to_up.to_vec();
    to_upstream.extend_from_slice(&st.cbuf);
    let mut to_client = st.to_cl.to_vec();
    to_client.extend_from_slice(&st.ubuf);
    let stats = conn.stats().clone();
    stats.set_kind(ConnKind::Tunnel);
    stats.set_server(Some(up.addr));
    let relay = Relay::new(
        c.client,
        up.stream,
        PendingHalf {
            bytes: to_upstream,
            ..PendingHalf::default()
        },
        PendingHalf {
            bytes: to_client,
            ..PendingHalf::default()
        },
        stats,
    );
    run_tunnel(ctx, conn, relay, up.guard).await;
    End::Gone
}

/// Parks the connection with everything it holds.
fn park(ctx: &ListenerCtx, conn: ConnHandle, c: Conn) -> End {
    let meta = conn.stats().meta();
    let client = match c.client.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(client = %meta.client, error = %e, "cannot park http connection; closing it");
            close_log(ctx, &conn, "park failed");
            return End::Gone;
        }
    };
    let upstream =
        c.up.and_then(|u| u.stream.into_std().ok().map(|s| (u.addr, s)));
    let mut st = c.st;
    if upstream.is_none() && st.phase == Phase::Exchange {
        st.phase = Phase::Connect;
        reset_attempt(&mut st);
    }
    tracing::debug!(conn = conn.stats().id, client = %meta.client, phase = ?st.phase, "parking http connection");
    ctx.lm.parked();
    conn.park(Parked::Http(Box::new(HttpState {
        meta,
        client,
        upstream: upstream.map(|(_, s)| s),
        state: st,
    })));
    End::Gone
}
