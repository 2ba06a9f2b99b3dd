//! L4 forwarding: a client connection joined to a server chosen by the listener's upstream.

pub mod relay;

use super::client_io::ClientIo;
use super::ListenerCtx;
use crate::registry::{
    now_ms, ClientTls, ConnHandle, ConnKind, ConnState, Parked, PendingHalf, TunnelState,
    UpstreamSession, SIG_KILL, SIG_PARK,
};
use relay::{Relay, RelayEnd};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// Serves one accepted client connection of a `tcp` listener.
pub async fn handle(
    ctx: Arc<ListenerCtx>,
    client: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let conn = ctx
        .registry
        .register(ctx.name.clone(), peer, ConnKind::Tcp, now_ms());
    connect_and_relay(ctx, conn, client.into(), peer).await
}

/// Connects the tunnel's upstream and relays a registered client connection until it ends.
pub async fn connect_and_relay(
    ctx: Arc<ListenerCtx>,
    conn: ConnHandle,
    client: ClientIo,
    peer: SocketAddr,
) {
    let Some(upstream) = ctx.upstreams.get(&ctx.cfg.upstream) else {
        tracing::error!(listener = %ctx.name, upstream = %ctx.cfg.upstream, "listener names a missing upstream");
        return;
    };
    // Connect failures and TLS handshake failures share the upstream's `retries`: a server
    // whose handshake failed is not tried again for this client.
    let mut tried = Vec::new();
    let (server, guard) = loop {
        let connected = tokio::select! {
            // The connect first: it is what normally finishes, and the kill waiter is then
            // polled only while the connect is pending.
            biased;
            c = upstream.connect_excluding(peer.ip(), &mut tried) => c,
            _ = conn.kill_requested() => return,
        };
        let (server, guard) = match connected {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(listener = %ctx.name, client = %peer, error = %e, side = "upstream", "closing client: no server connected");
                close_log(&ctx, &conn, "upstream connect failed");
                return;
            }
        };
        crate::listener::tune(&server);
        if !upstream.is_tls() {
            break (ClientIo::from(server), guard);
        }
        // TLS origination: the handshake is bounded by the upstream's connect_timeout too.
        // Boxed: its state (a whole TLS client session) would otherwise be part of every
        // tunnel's task, and copied with it at each spawn, plain tunnels included.
        let limit = upstream.config().connect_timeout;
        let handshake = Box::pin(tokio::time::timeout(
            limit,
            upstream.start_tls(server, guard.host()),
        ));
        let started = tokio::select! {
            biased;
            r = handshake => r,
            _ = conn.kill_requested() => return,
        };
        let e = match started {
            Ok(Ok(t)) => break (ClientIo::upstream_tls(t), guard),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("tls handshake timed out after {limit:?}"),
        };
        upstream.report(guard.addr(), false);
        tracing::warn!(listener = %ctx.name, upstream = %upstream.name(), server = %guard.addr(), client = %peer, error = %e, side = "upstream", "upstream tls handshake failed");
        if tried.len() as u32 > upstream.config().retries {
            close_log(&ctx, &conn, "upstream tls handshake failed");
            return;
        }
    };
    conn.stats().set_server(Some(guard.addr()));
    let relay = Relay::new(
        client,
        server,
        PendingHalf::default(),
        PendingHalf::default(),
        conn.stats().clone(),
    );
    run_tunnel(ctx, conn, relay, Some(guard)).await;
}

/// Resumes a tunnel parked by a predecessor or by a rolled-back upgrade.
pub async fn resume(ctx: Arc<ListenerCtx>, t: TunnelState, _permit: OwnedSemaphorePermit) {
    let conn = ctx.registry.register(
        ctx.name.clone(),
        t.meta.client,
        t.meta.kind,
        t.meta.started_ms,
    );
    let stats = conn.stats();
    stats.set_server(t.meta.server);
    stats.bytes_in.store(t.meta.bytes_in, Ordering::Relaxed);
    stats.bytes_out.store(t.meta.bytes_out, Ordering::Relaxed);
    let tls = t.client_tls.map(|c| {
        if let Some(f) = c.facts {
            stats.set_tls(f);
        }
        c.parked
    });
    let client = ClientIo::resume(t.client, tls);
    let server = ClientIo::resume(t.upstream, t.upstream_tls.map(|u| u.parked));
    let (client, server) = match (client, server) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(client = %t.meta.client, error = %e, "cannot resume tunnel");
            return;
        }
    };
    let mut relay = Relay::new(client, server, t.to_upstream, t.to_client, stats.clone());
    // The idle clock goes on where the predecessor left it: a tunnel handed over by reloads
    // more often than its idle_timeout would otherwise never idle out.
    relay.quiet_for(Duration::from_millis(t.idle_ms));
    run_tunnel(ctx, conn, relay, None).await;
}

/// Relays until the tunnel closes, idles out, is killed, or is asked to park for a handover.
/// `guard` keeps the server counted as active (absent for resumed tunnels).
pub async fn run_tunnel(
    ctx: Arc<ListenerCtx>,
    conn: ConnHandle,
    mut relay: Relay,
    guard: Option<crate::upstream::ServerGuard>,
) {
    conn.stats().set_state(ConnState::Active);
    let idle = ctx.cfg.idle_timeout;
    let outcome = {
        // One signal future and one idle timer for the tunnel's life, polled by hand: a
        // `select!` would poll every branch (two `Notify` waiters and the timer) on each of
        // the several wake-ups per message. The signal future is polled once to register,
        // then only when the connection's signal bits say something was asked.
        let signal = conn.requested(SIG_PARK | SIG_KILL);
        let timer = idle.map(|d| tokio::time::sleep_until(relay.last_activity() + d));
        tokio::pin!(signal, timer);
        let mut poll_signal = true;
        loop {
            let event = std::future::poll_fn(|cx| {
                if let Poll::Ready(end) = relay.poll_relay(cx) {
                    return Poll::Ready(TunnelEvent::End(end));
                }
                if poll_signal || conn.signalled() {
                    poll_signal = false;
                    if let Poll::Ready(bits) = signal.as_mut().poll(cx) {
                        return Poll::Ready(TunnelEvent::Signal(bits));
                    }
                }
                if let Some(t) = timer.as_mut().as_pin_mut() {
                    if t.poll(cx).is_ready() {
                        return Poll::Ready(TunnelEvent::Timer);
                    }
                }
                Poll::Pending
            })
            .await;
            match event {
                TunnelEvent::End(RelayEnd::Closed) => break Outcome::Close("closed"),
                TunnelEvent::End(RelayEnd::Error(e)) => {
                    tracing::debug!(client = %conn.stats().client, error = %e, "tunnel socket error");
                    break Outcome::Close(error_reason(&e));
                }
                TunnelEvent::Timer => {
                    // Activity moves the deadline without touching the timer; look again.
                    let Some(d) = idle else { continue };
                    let due = relay.last_activity() + d;
                    if Instant::now() >= due {
                        break Outcome::Close("idle timeout");
                    }
                    if let Some(t) = timer.as_mut().as_pin_mut() {
                        t.reset(due);
                    }
                }
                TunnelEvent::Signal(bits) if bits & SIG_KILL != 0 => {
                    break Outcome::Close("closed at drain deadline")
                }
                TunnelEvent::Signal(_) => break Outcome::Park,
            }
        }
    };
    match outcome {
        Outcome::Close(reason) => {
            drop(guard);
            close_log(&ctx, &conn, reason);
        }
        Outcome::Park => {
            let meta = conn.stats().meta();
            let idle_ms = relay.last_activity().elapsed().as_millis() as u64;
            match relay.into_parts() {
                Ok(p) => {
                    drop(guard);
                    ctx.lm.parked();
                    let client_tls = p.client_tls.map(|parked| {
                        Box::new(ClientTls {
                            parked,
                            facts: conn.stats().tls().cloned(),
                        })
                    });
                    // The upstream's name is for the record only: a tunnel never goes to a pool.
                    let upstream_tls = p.upstream_tls.map(|parked| {
                        Box::new(UpstreamSession {
                            upstream: ctx.cfg.upstream.clone(),
                            parked,
                        })
                    });
                    conn.park(Parked::Tunnel(TunnelState {
                        meta,
                        client: p.client,
                        client_tls,
                        upstream: p.upstream,
                        upstream_tls,
                        to_upstream: p.to_upstream,
                        to_client: p.to_client,
                        idle_ms,
                    }));
                }
                Err(e) => {
                    tracing::warn!(client = %meta.client, error = %e, "cannot park tunnel; closing it")
                }
            }
        }
    }
}

/// What woke a tunnel.
enum TunnelEvent {
    End(RelayEnd),
    Signal(u8),
    Timer,
}

/// How a tunnel's loop ended.
enum Outcome {
    Close(&'static str),
    Park,
}

/// An optional value displayed as `-` when absent (formatted only when a line is written).
pub(crate) struct OrDash<T>(pub(crate) Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Logs one line for a closed connection and counts it.
pub fn close_log(ctx: &ListenerCtx, conn: &ConnHandle, reason: &str) {
    let s = conn.stats();
    let bytes_in = s.bytes_in.load(Ordering::Relaxed);
    let bytes_out = s.bytes_out.load(Ordering::Relaxed);
    ctx.lm.bytes(bytes_in, bytes_out);
    ctx.metrics
        .bytes_out
        .fetch_add(bytes_out, Ordering::Relaxed);
    ctx.lm.closed();
    close_line(s, bytes_in, bytes_out, reason);
}

/// The log line of [`close_log`] alone, for a connection whose listener is gone already (its
/// counters went with it): closed as the process stops, or after a reload removed it.
pub fn log_close(conn: &ConnHandle, reason: &str) {
    let s = conn.stats();
    let bytes_in = s.bytes_in.load(Ordering::Relaxed);
    close_line(s, bytes_in, s.bytes_out.load(Ordering::Relaxed), reason);
}

#[inline]
fn close_line(s: &crate::registry::ConnStats, bytes_in: u64, bytes_out: u64, reason: &str) {
    let duration = Duration::from_millis(now_ms().saturating_sub(s.started_ms)).as_millis() as u64;
    // Formatted only if the line is written: a connection's close is on the hot path.
    let server = OrDash(s.server());
    // An HTTP connection's requests each have an access line already: its close is a detail.
    // A tunnel's close line is its only record.
    macro_rules! closed {
        ($level:ident $($tls:tt)*) => {
            tracing::$level!(
                conn = s.id,
                listener = %s.listener,
                client = %s.client,
                server = %server,
                kind = ?s.kind(),
                bytes_in,
                bytes_out,
                duration_ms = duration,
                reason,
                $($tls)*
                "connection closed"
            )
        };
    }
    match (s.kind(), s.tls()) {
        (ConnKind::Http | ConnKind::Http2, _) => closed!(debug),
        (ConnKind::Tcp | ConnKind::Tunnel, None) => closed!(info),
        // A TLS tunnel's only record: what its handshake agreed on goes with it.
        (ConnKind::Tcp | ConnKind::Tunnel, Some(t)) => closed!(
            info
            tls_version = %t.version,
            tls_cipher = %t.cipher,
            sni = %OrDash(t.sni.as_deref()),
            alpn = %OrDash(t.alpn.as_deref()),
            tls_resumed = t.resumed,
        ),
    }
}

/// The close reason of a tunnel that ended on an error, for its close line: what an operator
/// can act on (the error itself is logged at debug level).
fn error_reason(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionReset => "connection reset",
        // The record layer's verdicts: a bad MAC, an alert, a malformed record.
        ErrorKind::InvalidData => "tls error",
        ErrorKind::UnexpectedEof => "closed inside a tls record",
        ErrorKind::BrokenPipe => "broken pipe",
        _ => "socket error",
    }
}
