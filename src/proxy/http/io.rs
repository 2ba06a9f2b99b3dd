//! The client socket as hyper sees it: a [`PrefixedIo`] yields bytes already read (by the h2c
//! detection, or by a predecessor before a handover) before reading the socket, counts bytes in
//! the registry, and tells the connection loop when a new request head starts arriving.

use super::shared::ConnShared;
use crate::registry::ConnStats;
use bytes::Bytes;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A client socket with a read-ahead prefix served first.
#[derive(Debug)]
pub struct PrefixedIo {
    /// Bytes read from the socket earlier and not yet given to hyper.
    pub prefix: Bytes,
    /// The socket.
    pub inner: TcpStream,
    /// Registry counters (bytes in/out).
    stats: Arc<ConnStats>,
    /// Per-connection state shared with the service and the connection loop.
    shared: Arc<ConnShared>,
    /// How much of [`CL_LINE`] the bytes read so far end with (the match spans reads).
    cl_match: usize,
}

/// A Content-Length header at the start of a line, lower case. hyper silently drops a
/// Content-Length that comes with Transfer-Encoding, so the raw bytes are watched for it: the
/// service rejects a chunked request whose bytes carried one (request smuggling).
const CL_LINE: &[u8] = b"\ncontent-length:";

impl PrefixedIo {
    /// Feeds bytes read to the Content-Length line matcher.
    fn scan(&mut self, bytes: &[u8]) {
        let mut found = 0u64;
        for &b in bytes {
            let b = b.to_ascii_lowercase();
            if b == CL_LINE[self.cl_match] {
                self.cl_match += 1;
                if self.cl_match == CL_LINE.len() {
                    found += 1;
                    self.cl_match = 0;
                }
            } else {
                self.cl_match = usize::from(b == CL_LINE[0]);
            }
        }
        if found > 0 {
            self.shared.cl_lines.fetch_add(found, Ordering::Relaxed);
        }
    }
}

impl PrefixedIo {
    /// Wraps a socket; `prefix` is read before the socket.
    pub fn new(
        inner: TcpStream,
        prefix: Bytes,
        stats: Arc<ConnStats>,
        shared: Arc<ConnShared>,
    ) -> PrefixedIo {
        PrefixedIo {
            prefix,
            inner,
            stats,
            shared,
            cl_match: 0,
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
            self.scan(&head);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            let this = &mut *self;
            let filled = &buf.filled()[before..];
            // Split borrow: scan needs &mut self while `filled` borrows `buf`, not self.
            this.scan(filled);
            self.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
            self.shared.on_read();
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
