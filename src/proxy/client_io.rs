//! The client side of a connection as the HTTP/1.1 engine and the L4 relay see it: a plain
//! socket, or TLS after its handshake. An enum rather than a trait object, so the plain path
//! costs one match per call and no allocation or indirection; the TLS variant is boxed
//! (a session and its buffers) so a plain connection's task does not grow.
//!
//! The TLS variant is built in one place, [`ClientIo::from_handshake`]: the point where a
//! completed handshake becomes the post-handshake stream ([`crate::tls::PostHandshake`],
//! baton's record layer). Both variants park into a std socket plus, for TLS, the session as
//! plain data ([`ClientIo::park`]) and come back with [`ClientIo::resume`].
//!
//! The upstream side of a connection uses the same type: plain, or TLS to the server
//! (`upstreams.X.tls`, [`ClientIo::upstream_tls`]), so an upstream TLS session parks and
//! moves exactly like a client's.

use crate::tls::record::{ParkError, ParkedTls, RecordError, Session};
use crate::tls::{Handshaken, PostHandshake};
use bytes::BytesMut;
use std::io;
use std::pin::Pin;
use std::task::ready;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub use super::plain_tcp::Tcp;

/// Bytes reserved for each read of a plain socket.
const READ: usize = 16 * 1024;

/// A client connection's transport.
#[derive(Debug)]
pub enum ClientIo {
    /// Plain TCP.
    Plain(Tcp),
    /// TLS, after the handshake.
    Tls(Box<PostHandshake>),
}

/// A socket whose TCP_NODELAY the caller already set (an upstream connection, a connection
/// resumed from a predecessor).
impl From<TcpStream> for ClientIo {
    fn from(s: TcpStream) -> Self {
        ClientIo::Plain(Tcp::registered(s))
    }
}

impl ClientIo {
    /// A plain client socket without TCP_NODELAY yet: it is set before the socket's second
    /// write (`super::plain_tcp`).
    pub fn plain_lazy(s: TcpStream) -> ClientIo {
        ClientIo::Plain(Tcp::registered_lazy(s))
    }

    /// A new client socket from the listener, not registered with the reactor and without
    /// TCP_NODELAY: both happen only if the connection needs them (`super::plain_tcp`).
    pub fn fresh(s: std::net::TcpStream) -> ClientIo {
        ClientIo::Plain(Tcp::fresh(s))
    }

    /// Sets TCP_NODELAY now, for a caller that writes to the socket past this type
    /// ([`ClientIo::tcp`]).
    pub fn nodelay_now(&mut self) {
        if let ClientIo::Plain(t) = self {
            t.nodelay_now();
        }
    }

    /// The post-handshake stream of a connection whose handshake completed: rustls gives the
    /// session up to the record layer (its keys and sequence numbers, and the traffic secrets
    /// the listener's key log captured for it).
    pub fn from_handshake(h: Handshaken) -> Result<ClientIo, RecordError> {
        let random = h.random.ok_or(RecordError::NoSecret)?;
        let (session, plain) = Session::from_rustls(h.conn, &random, &h.keylog)?;
        Ok(ClientIo::Tls(Box::new(PostHandshake::new(
            h.tcp,
            session,
            plain,
            h.rx.to_vec(),
        ))))
    }

    /// The transport of an upstream connection whose TLS handshake baton drove as the client
    /// (`crate::tls::client::connect`).
    pub fn upstream_tls(t: PostHandshake) -> ClientIo {
        ClientIo::Tls(Box::new(t))
    }

    /// Whether an idle connection (pooled, waiting for its next request) is still usable:
    /// nothing to read without waiting. A server that closed it, or sent bytes nobody asked
    /// for, makes it unusable. For TLS, records that carry no data (a NewSessionTicket, a
    /// KeyUpdate) are taken in passing; close_notify or data make it unusable.
    pub fn idle_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self {
            ClientIo::Plain(t) => t.idle_usable(),
            ClientIo::Tls(t) => {
                let mut b = BytesMut::new();
                t.poll_read_buf(&mut cx, &mut b).is_pending()
            }
        }
    }

    /// Stops the transport for a handover: the socket out of tokio and, for TLS, the
    /// session as plain data, with how many bytes of an unfinished write it already carries
    /// (the caller counts them as written). Writes nothing.
    pub fn park(self) -> io::Result<(std::net::TcpStream, Option<ParkedTls>, usize)> {
        match self {
            ClientIo::Plain(t) => Ok((t.into_std()?, None, 0)),
            ClientIo::Tls(t) => match t.park() {
                Ok((s, parked, settled)) => Ok((s, Some(parked), settled)),
                Err(ParkError::Socket(e)) => Err(e),
                Err(ParkError::Session(e)) => Err(io::Error::other(e)),
                Err(ParkError::Busy(_)) => Err(io::Error::other("tls session failed")),
            },
        }
    }

    /// Continues a parked transport (from a predecessor, or after a rolled-back upgrade).
    pub fn resume(s: std::net::TcpStream, tls: Option<ParkedTls>) -> io::Result<ClientIo> {
        match tls {
            Some(p) => Ok(ClientIo::Tls(Box::new(PostHandshake::resume(s, p)?))),
            None => {
                s.set_nonblocking(true)?;
                // TCP_NODELAY is a socket option: it came with the socket (tunnels and
                // upstream connections set it when they start).
                Ok(ClientIo::from(TcpStream::from_std(s)?))
            }
        }
    }

    /// Ends the connection from this side before it is dropped: TLS sends its close_notify;
    /// a plain socket needs nothing, since closing it sends the FIN (a `shutdown` first cost
    /// one syscall per connection, and the same FIN).
    pub async fn finish(&mut self) {
        if let ClientIo::Tls(t) = self {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut **t).await;
        }
    }

    /// Whether the client speaks TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientIo::Tls(_))
    }

    /// Frees the session's empty buffers (TLS; a plain socket holds none).
    pub fn release_buffers(&mut self) {
        if let ClientIo::Tls(t) = self {
            t.release_buffers();
        }
    }

    /// The socket underneath if it is registered with the reactor (see [`ClientIo::tcp`]).
    pub fn registered(&self) -> Option<&TcpStream> {
        match self {
            ClientIo::Plain(t) => t.get(),
            ClientIo::Tls(t) => Some(t.get_ref()),
        }
    }

    /// The socket underneath, registered with the reactor (registering a plain one first).
    pub fn tcp(&mut self) -> io::Result<&TcpStream> {
        match self {
            ClientIo::Plain(t) => t.stream().map(|s| &*s),
            ClientIo::Tls(t) => Ok(t.get_ref()),
        }
    }

    /// Reads once into `buf` (with room reserved); `Ok(0)` is EOF.
    pub fn poll_fill(
        &mut self,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match self {
            ClientIo::Plain(t) => t.poll_fill(buf, cx),
            ClientIo::Tls(t) => t.poll_read_buf(cx, buf),
        }
    }

    /// Ready when a read may make progress (the relay takes a buffer only then).
    pub fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ClientIo::Plain(t) => t.poll_read_ready(cx),
            ClientIo::Tls(t) => t.poll_read_ready(cx),
        }
    }

    /// Whether the peer sent bytes nobody has read yet, without taking them: plaintext or
    /// ciphertext the TLS session holds, or bytes in the socket. Not ready (nothing yet)
    /// registers `cx` for the socket's readability, next to any reader's registration.
    pub fn poll_has_input(&mut self, cx: &mut Context<'_>) -> bool {
        let s = match self {
            ClientIo::Plain(t) => match t.get() {
                Some(s) => s,
                None => return false,
            },
            ClientIo::Tls(t) => {
                if t.buffered_plain() > 0 || t.buffered_cipher() > 0 {
                    return true;
                }
                t.get_ref()
            }
        };
        let mut one = [0u8; 1];
        let mut buf = ReadBuf::new(&mut one);
        matches!(s.poll_peek(cx, &mut buf), Poll::Ready(Ok(n)) if n > 0)
    }

    /// Writes `b` if the socket takes it now, without waiting (best-effort error responses).
    pub fn try_write(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            ClientIo::Plain(t) => t.try_write(b),
            ClientIo::Tls(t) => t.try_write(b),
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
///
/// Through `poll_read`, not `try_read_buf`: a read shorter than the room given clears the
/// socket's readiness (the kernel had no more), so the next read waits for epoll instead of
/// costing a `recvfrom` that returns EAGAIN — one syscall per request on each side of a
/// keep-alive exchange.
pub fn poll_fill_tcp(
    s: &mut TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    // Room is made only once the socket is readable: a connection waiting for bytes holds
    // no buffer. With room already there, `poll_read` waits for readiness itself (a second
    // readiness check per read cost ~0.2k instructions).
    if buf.capacity() - buf.len() < READ / 2 {
        ready!(s.poll_read_ready(cx))?;
        grow(buf);
    }
    tokio_util::io::poll_read_buf(Pin::new(s), cx, buf)
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(t) => t.poll_read(cx, buf),
            ClientIo::Tls(t) => Pin::new(&mut **t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(t) => t.poll_write(cx, b),
            ClientIo::Tls(t) => Pin::new(&mut **t).poll_write(cx, b),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(t) => t.poll_write_vectored(cx, bufs),
            ClientIo::Tls(t) => t.poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(t) => t.poll_flush(cx),
            ClientIo::Tls(t) => Pin::new(&mut **t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(t) => t.poll_shutdown(cx),
            ClientIo::Tls(t) => Pin::new(&mut **t).poll_shutdown(cx),
        }
    }
}
