//! The client connection as hyper sees it (HTTP/2: h2c, or h2 over TLS): a [`PrefixedIo`]
//! yields bytes already read (by the protocol detection, or by a predecessor before a
//! handover) before reading the transport, and counts bytes in the registry.

use crate::proxy::client_io::ClientIo;
use crate::registry::ConnStats;
use bytes::Bytes;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A client transport (plain or TLS) with a read-ahead prefix served first.
#[derive(Debug)]
pub struct PrefixedIo {
    /// Bytes read from the socket earlier and not yet given to hyper.
    pub prefix: Bytes,
    /// The transport: a plain socket, or TLS after its handshake.
    pub inner: ClientIo,
    /// Registry counters (bytes in/out).
    stats: Arc<ConnStats>,
}

impl PrefixedIo {
    /// Wraps a transport; `prefix` is read before it.
    pub fn new(inner: ClientIo, prefix: Bytes, stats: Arc<ConnStats>) -> PrefixedIo {
        PrefixedIo {
            prefix,
            inner,
            stats,
        }
    }
}

impl AsyncRead for PrefixedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        }
        res
    }
}

impl AsyncWrite for PrefixedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            self.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
