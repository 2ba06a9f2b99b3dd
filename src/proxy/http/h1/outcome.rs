//! How an exchange ends: the flow's outcome (complete, retry, error, tunnel), deadlines, the
//! error responses baton writes itself, the access line, and parking.

use super::flow::Flow;
use super::state::{self, Phase, State};
use super::{next_deadline, Conn, End, Step};
use crate::proxy::http::{framing::Framing, head, route};
use crate::proxy::tcp::{close_log, relay::Relay, run_tunnel};
use crate::proxy::ListenerCtx;
use crate::registry::{
    now_ms, ClientTls, ConnHandle, ConnKind, HttpState, Parked, PendingHalf, UpstreamSession,
};
use bytes::Buf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// A deadline of the exchange may have passed: answer 504/408, or cut a started response.
pub(super) fn on_deadline(ctx: &ListenerCtx, conn: &ConnHandle, c: &mut Conn) -> Step {
    let Some((at, status, why)) = c.st.ex.as_ref().and_then(|ex| next_deadline(ctx, ex)) else {
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

/// Acts on what stopped the flow.
pub(super) async fn on_flow(
    ctx: &Arc<ListenerCtx>,
    conn: &ConnHandle,
    c: &mut Conn,
    f: Flow,
) -> Step {
    match f {
        Flow::UpstreamDone => {
            let reusable =
                c.st.ex
                    .as_ref()
                    .and_then(|e| e.resp)
                    .is_some_and(|r| r.reusable);
            if let (Some(up), true) = (c.up.take(), reusable) {
                give_back(ctx, &c.st, up);
            }
            Step::Go
        }
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
                    give_back(ctx, &c.st, up);
                }
            }
            c.st.ex = None;
            c.st.phase = Phase::Head;
            c.st.to_up.clear();
            if early || close_client {
                c.st.close_after = true;
            }
            if c.st.close_after {
                c.client.finish().await;
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
            let upstream = ex.upstream_in(ctx).cloned();
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
            // Started: a byte of the response reached the client. A head parsed but still in
            // the client's buffer (its body's framing broke in the same read) is dropped for
            // a 502, never sent with a body that cannot follow.
            let started = c.st.ex.as_ref().is_some_and(|e| e.resp_bytes > 0);
            tracing::info!(
                conn = conn.stats().id,
                reason = why,
                side = "upstream",
                "upstream response broken"
            );
            if started {
                log_access(ctx, conn, &c.st, false);
                return Step::Close(why);
            }
            fail(
                ctx,
                conn,
                c,
                if status == 0 { 502 } else { status },
                true,
                why,
            );
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

/// Gives a reusable upstream connection to the pool, under its upstream's key (a TLS one
/// is reused only by the upstream whose settings made it).
fn give_back(ctx: &ListenerCtx, st: &State, up: super::Upstream) {
    let Some(u) = st.ex.as_ref().and_then(|e| e.upstream_in(ctx)) else {
        return;
    };
    let key = super::pool::PoolKey {
        addr: up.addr,
        tls: u.tls_key(),
    };
    ctx.h1_pool
        .put(key, up.stream, u.config().http.pool_idle_per_server);
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
pub(super) fn fail(
    ctx: &ListenerCtx,
    conn: &ConnHandle,
    c: &mut Conn,
    status: u16,
    close: bool,
    why: &str,
) {
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
        "connect target not allowed" => Some("connect target not allowed\n"),
        _ => None,
    };
    c.st.to_cl
        .extend_from_slice(&head::error_response_text(status, text, close));
    if let Some(ex) = c.st.ex.as_mut() {
        ex.resp = Some(state::RespState {
            status,
            framing: Framing::Done,
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
pub(super) fn log_access(ctx: &ListenerCtx, conn: &ConnHandle, st: &State, complete: bool) {
    let Some(ex) = st.ex.as_ref() else { return };
    let status = ex.resp.map_or(0, |r| r.status);
    let elapsed = Duration::from_millis(now_ms().saturating_sub(ex.started_ms));
    match ex.upstream_in(ctx).and_then(|u| u.metrics()) {
        Some(h) => h.request_to(ex.server, status, elapsed),
        None => ctx.metrics.http_request(&ex.upstream, status, elapsed),
    }
    let stats = conn.stats();
    // One macro for both lines: a TLS connection's line adds what its handshake agreed on.
    macro_rules! access {
        ($($tls:tt)*) => {
            tracing::info!(
                target: "baton::access",
                conn = stats.id,
                listener = %ctx.name,
                method = %ex.method,
                // Normalized only if the line is written (tracing evaluates fields of
                // enabled lines).
                host = %HostField(ex.host.as_deref()),
                path = ex.target.split('?').next().unwrap_or("/"),
                status,
                bytes = ex.resp_bytes,
                complete,
                duration_ms = elapsed.as_millis() as u64,
                server = %crate::proxy::tcp::OrDash(ex.server),
                client = %stats.client,
                trace_id = %ex.trace,
                $($tls)*
                "request"
            )
        };
    }
    match stats.tls() {
        None => access!(),
        Some(t) => access!(
            tls_version = %t.version,
            tls_cipher = %t.cipher,
            sni = %crate::proxy::tcp::OrDash(t.sni.as_deref()),
            alpn = %crate::proxy::tcp::OrDash(t.alpn.as_deref()),
            tls_resumed = t.resumed,
        ),
    }
}

/// The access line's host: normalized (lower case, no port), or `-`.
struct HostField<'a>(Option<&'a str>);

impl std::fmt::Display for HostField<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(h) => f.write_str(&route::normalize_host(h)),
            None => f.write_str("-"),
        }
    }
}

/// Joins client and upstream on the L4 relay after a 101 (or baton's 200 to a CONNECT).
pub(super) async fn tunnel(
    ctx: Arc<ListenerCtx>,
    conn: ConnHandle,
    mut c: Conn,
    status: u16,
) -> End {
    let Some(up) = c.up.take() else {
        close_log(&ctx, &conn, "closed");
        return End::Gone;
    };
    if let Some(ex) = c.st.ex.as_mut() {
        ex.resp = Some(state::RespState {
            status,
            framing: Framing::Done,
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
pub(super) fn park(ctx: &ListenerCtx, conn: ConnHandle, c: Conn) -> End {
    let meta = conn.stats().meta();
    let (client, client_tls, settled) = match c.client.park() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(client = %meta.client, error = %e, "cannot park http connection; closing it");
            close_log(ctx, &conn, "park failed");
            return End::Gone;
        }
    };
    // A TLS upstream session that failed cannot move: as a lost socket, the attempt starts
    // again in the successor if no response came yet.
    let upstream = c.up.and_then(|u| u.stream.park().ok());
    let mut st = c.st;
    written_to_client(&mut st, settled, conn.stats());
    let (upstream, upstream_tls) = match upstream {
        Some((sock, tls, up_settled)) => {
            written_to_upstream(&mut st, up_settled);
            let name = st
                .ex
                .as_ref()
                .map(|e| e.upstream.clone())
                .unwrap_or_default();
            let tls = tls.map(|parked| {
                Box::new(UpstreamSession {
                    upstream: name,
                    parked,
                })
            });
            (Some(sock), tls)
        }
        None => (None, None),
    };
    let client_tls = client_tls.map(|parked| {
        Box::new(ClientTls {
            parked,
            facts: conn.stats().tls().cloned(),
        })
    });
    if upstream.is_none()
        && st.phase == Phase::Exchange
        && st.ex.as_ref().is_some_and(|e| e.resp.is_none())
    {
        st.phase = Phase::Connect;
        reset_attempt(&mut st);
    }
    tracing::debug!(conn = conn.stats().id, client = %meta.client, phase = ?st.phase, "parking http connection");
    ctx.lm.parked();
    conn.park(Parked::Http(Box::new(HttpState {
        meta,
        client,
        client_tls,
        upstream,
        upstream_tls,
        state: st,
    })));
    End::Gone
}

/// Counts `n` bytes of the upstream write a TLS session took with it at parking as written:
/// they came from `to_up` if it holds any (it is written first), else from the request body
/// bytes `cbuf[..cl_ready]`, as the flow would have advanced them.
fn written_to_upstream(st: &mut State, n: usize) {
    if n == 0 {
        return;
    }
    if !st.to_up.is_empty() {
        let n = n.min(st.to_up.len());
        st.to_up.advance(n);
    } else {
        let n = n.min(st.cl_ready);
        st.cbuf.advance(n);
        st.cl_ready -= n;
        if let Some(ex) = st.ex.as_mut() {
            ex.body_written += n as u64;
        }
    }
}

/// Counts `n` bytes of the client write a TLS session took with it at parking as written:
/// they came from `to_cl` if it holds any (it is written first), else from the response body
/// bytes `ubuf[..up_ready]`, as the flow would have advanced them.
fn written_to_client(st: &mut State, n: usize, stats: &crate::registry::ConnStats) {
    if n == 0 {
        return;
    }
    let n = if !st.to_cl.is_empty() {
        let n = n.min(st.to_cl.len());
        st.to_cl.advance(n);
        n
    } else {
        let n = n.min(st.up_ready);
        st.ubuf.advance(n);
        st.up_ready -= n;
        n
    };
    stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    if let Some(ex) = st.ex.as_mut() {
        ex.resp_bytes += n as u64;
    }
}
