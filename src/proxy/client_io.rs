//! The client side of a connection as the HTTP/1.1 engine and the L4 relay see it: a plain
//! socket, or TLS after its handshake. An enum rather than a trait object, so the plain path
//! costs one match per call and no allocation or indirection; the TLS variant is boxed
//! (rustls's state is large) so a plain connection's task does not grow.
//!
//! The TLS variant is built in one place, [`ClientIo::from_handshake`]: the point where a
//! completed handshake becomes the post-handshake stream ([`crate::tls::PostHandshake`]).

use crate::tls::{Handshaken, PostHandshake};
use bytes::BytesMut;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes reserved for each read of a plain socket.
const READ: usize = 16 * 1024;

/// A client connection's transport.
#[derive(Debug)]
pub enum ClientIo {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS, after the handshake.
    Tls(Box<PostHandshake>),
}

impl From<TcpStream> for ClientIo {
    fn from(s: TcpStream) -> Self {
        ClientIo::Plain(s)
    }
}

impl ClientIo {
    /// The post-handshake stream of a connection whose handshake completed.
    pub fn from_handshake(h: Handshaken) -> ClientIo {
        // rustls keeps serving this session: the secrets the key log captured for the
        // record layer are not needed (the record layer's switch takes them here instead).
        if let Some(r) = &h.random {
            h.keylog.forget(r);
        }
        ClientIo::Tls(Box::new(PostHandshake::new(h)))
    }

    /// Whether the client speaks TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientIo::Tls(_))
    }

    /// The socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ClientIo::Plain(s) => s,
            ClientIo::Tls(t) => t.tcp(),
        }
    }

    /// Reads once into `buf` (with room reserved); `Ok(0)` is EOF.
    pub fn poll_fill(
        &mut self,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match self {
            ClientIo::Plain(s) => poll_fill_tcp(s, buf, cx),
            ClientIo::Tls(t) => t.poll_fill(cx, buf),
        }
    }

    /// Ready when a read may make progress (the relay takes a buffer only then).
    pub fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ClientIo::Plain(s) => s.poll_read_ready(cx),
            ClientIo::Tls(t) => t.poll_read_ready(cx),
        }
    }

    /// Writes `b` if the socket takes it now, without waiting (best-effort error responses).
    pub fn try_write(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            ClientIo::Plain(s) => s.try_write(b).map(|_| ()),
            ClientIo::Tls(t) => t.try_write(b),
        }
    }

    /// The plain socket out of tokio, for a handover. A TLS connection cannot move yet: its
    /// session lives in rustls (the registry drains it instead of asking it to park).
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        match self {
            ClientIo::Plain(s) => s.into_std(),
            ClientIo::Tls(_) => Err(io::Error::other(
                "a TLS connection served by rustls cannot be handed over",
            )),
        }
    }
}

/// The engine's cap on one read buffer (`h1::flow::CAP`): a buffer is grown to near it, no
/// further.
const CAP: usize = 32 * 1024;

/// Makes room for a read in `buf`: the consumed front reclaimed if that is enough, else a new
/// allocation near `CAP` with the live bytes moved to its front. (`reserve` doubles the
/// allocation when the live bytes sit past its middle: 32 -> 64 KiB per side for a client that
/// stopped reading a download.)
fn grow(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ / 2 && !buf.try_reclaim(READ) {
        let cap = (buf.len() + READ).min(CAP).max(buf.len() + READ / 2);
        let mut fresh = BytesMut::with_capacity(cap);
        fresh.extend_from_slice(buf);
        *buf = fresh;
    }
}

/// Reads once from a plain socket into `buf` (with room reserved); `Ok(0)` is EOF.
pub fn poll_fill_tcp(
    s: &TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    loop {
        match s.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        grow(buf);
        match s.try_read_buf(buf) {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientIo::Tls(t) => {
                let n = std::task::ready!(t.poll_read(cx, buf.initialize_unfilled()))?;
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_write(cx, b),
            ClientIo::Tls(t) => t.poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientIo::Tls(t) => t.poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientIo::Tls(t) => t.poll_shutdown(cx),
        }
    }
}
