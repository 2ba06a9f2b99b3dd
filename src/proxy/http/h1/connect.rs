//! CONNECT tunnels (`listeners.X.http.connect`): baton connects to the target the client named
//! (allowed by the listener's list, checked before), answers `200 Connection Established`
//! itself and joins both sockets on the L4 relay, so the tunnel moves across upgrades like any
//! other. No upstream is asked anything: an upstream's 2xx never turns into a raw splice.

use super::state::Exchange;
use super::Upstream;
use crate::proxy::ListenerCtx;
use crate::registry::now_ms;
use std::time::Duration;
use tokio::net::TcpStream;

/// baton's answer once the target is connected.
pub(super) const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

/// Connects to the CONNECT target of `ex`: each address its name resolves to in turn, within
/// the listener's `connect.connect_timeout` (and what is left of `request_timeout`).
pub(super) async fn open(
    ctx: &ListenerCtx,
    ex: &mut Exchange,
) -> Result<Upstream, (u16, &'static str)> {
    let Some(policy) = ctx.cfg.http.connect.as_ref() else {
        return Err((405, "connect not enabled on this listener"));
    };
    let left = ctx.cfg.http.request_timeout.map(|t| {
        Duration::from_millis((ex.started_ms + t.as_millis() as u64).saturating_sub(now_ms()))
    });
    let limit = left.map_or(policy.connect_timeout, |l| l.min(policy.connect_timeout));
    let target = ex.target.clone();
    let attempt = async {
        let addrs = tokio::net::lookup_host(target.as_str())
            .await
            .map_err(|_| (502, "connect target not resolved"))?;
        let mut last = (502, "connect target not resolved");
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(Upstream {
                        stream: s.into(),
                        addr,
                        guard: None,
                    });
                }
                Err(e) if crate::proxy::is_resource_exhaustion(&e) => {
                    tracing::warn!(target = %target, error = %e, "connect target: out of resources");
                    return Err((503, "out of resources"));
                }
                Err(e) => {
                    tracing::debug!(target = %target, server = %addr, error = %e, side = "upstream", "connect target refused");
                    last = (502, "connect target refused");
                }
            }
        }
        Err(last)
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(r) => {
            if let Ok(up) = &r {
                ex.server = Some(up.addr);
            }
            r
        }
        Err(_) => Err((504, "connect target timed out")),
    }
}
