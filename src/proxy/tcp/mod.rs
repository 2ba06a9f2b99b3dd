//! L4 forwarding: a client connection joined to a server chosen by the listener's upstream.

pub mod relay;

use super::ListenerCtx;
use crate::registry::{now_ms, ConnHandle, ConnKind, ConnState, Parked, PendingHalf, TunnelState};
use relay::{Relay, RelayEnd};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

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
    let Some(upstream) = ctx.upstreams.get(&ctx.cfg.upstream) else {
        tracing::error!(listener = %ctx.name, upstream = %ctx.cfg.upstream, "listener names a missing upstream");
        return;
    };
    let connected = tokio::select! {
        c = upstream.connect(peer.ip()) => c,
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
    let (client, server) = match (to_tokio(t.client), to_tokio(t.upstream)) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(client = %t.meta.client, error = %e, "cannot resume tunnel");
            return;
        }
    };
    let relay = Relay::new(client, server, t.to_upstream, t.to_client, stats.clone());
    run_tunnel(ctx, conn, relay, None).await;
}

fn to_tokio(s: std::net::TcpStream) -> std::io::Result<TcpStream> {
    s.set_nonblocking(true)?;
    TcpStream::from_std(s)
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
    let reason = loop {
        let deadline = idle.map(|d| relay.last_activity() + d);
        let idle_sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            end = relay.run() => break match end {
                RelayEnd::Closed => "closed",
                RelayEnd::Error(e) => {
                    tracing::debug!(client = %conn.stats().client, error = %e, "tunnel socket error");
                    "socket error"
                }
            },
            _ = idle_sleep => {
                if idle.is_some_and(|d| relay.last_activity().elapsed() >= d) {
                    break "idle timeout";
                }
            }
            _ = conn.park_requested() => {
                let meta = conn.stats().meta();
                match relay.into_parts() {
                    Ok((client, upstream, to_upstream, to_client)) => {
                        drop(guard);
                        ctx.lm.parked();
                        conn.park(Parked::Tunnel(TunnelState { meta, client, upstream, to_upstream, to_client }));
                    }
                    Err(e) => tracing::warn!(client = %meta.client, error = %e, "cannot park tunnel; closing it"),
                }
                return;
            }
            _ = conn.kill_requested() => break "closed at drain deadline",
        }
    };
    drop(guard);
    close_log(&ctx, &conn, reason);
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
    let duration = Duration::from_millis(now_ms().saturating_sub(s.started_ms));
    tracing::info!(
        conn = s.id,
        listener = %s.listener,
        client = %s.client,
        server = %s.server().map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
        kind = ?s.kind(),
        bytes_in,
        bytes_out,
        duration_ms = duration.as_millis() as u64,
        reason,
        "connection closed"
    );
}
