//! h2c client connections (prior knowledge), served by hyper. Their state lives inside hyper,
//! so they cannot be handed over: park and drain both send GOAWAY and let open streams finish
//! in the old process.

use super::io::PrefixedIo;
use super::service::Svc;
use crate::proxy::tcp::close_log;
use crate::proxy::ListenerCtx;
use crate::registry::ConnHandle;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::sync::Arc;

/// Serves one h2c connection until it closes, or until a park, drain or kill ends it.
pub(super) async fn serve_h2(ctx: Arc<ListenerCtx>, conn: ConnHandle, io: PrefixedIo, svc: Svc) {
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
