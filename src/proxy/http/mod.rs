//! L7 reverse proxying on hyper (placeholder until the HTTP issue lands).

use super::ListenerCtx;
use crate::registry::IdleHttpState;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

/// Serves one accepted client connection of an `http` listener.
pub async fn handle(
    _ctx: Arc<ListenerCtx>,
    _client: TcpStream,
    _peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
}

/// Resumes an idle keep-alive connection parked by a predecessor.
pub async fn resume(_ctx: Arc<ListenerCtx>, _h: IdleHttpState, _permit: OwnedSemaphorePermit) {}
