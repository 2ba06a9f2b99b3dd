//! Application data after the handshake, served by rustls's `ServerConnection` itself: the
//! interim post-handshake stream until the record layer (`record`) takes over. Its state is
//! inside rustls, so such a connection cannot be handed over: it is pinned in the registry
//! and finishes in the process that accepted it (drained at an upgrade).
//!
//! Writes are acknowledged only once their ciphertext is on the socket: `poll_write` takes
//! the bytes into rustls on its first call and answers `Ready(n)` when they are written,
//! `Pending` until then. Callers that retry a `Pending` write with the same bytes (the HTTP
//! engine and the relay do) therefore never leave ciphertext stranded in rustls while they
//! wait on something else, which a plain `TcpStream` user would not expect to flush.

use super::handshake::{Handshaken, TcpWriter};
use bytes::{Buf, BytesMut};
use rustls::ServerConnection;
use std::io::{self, Read, Write};
use std::task::{ready, Context, Poll};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

/// Bytes reserved for each socket read of ciphertext.
const READ: usize = 16 * 1024 + 512;

/// A TLS client connection after its handshake, on rustls.
pub struct RustlsStream {
    tcp: TcpStream,
    conn: ServerConnection,
    /// Ciphertext read from the socket and not yet given to rustls.
    rx: BytesMut,
    /// Bytes of the current `poll_write` taken into rustls but not yet acknowledged.
    unacked: usize,
    /// The socket sent EOF (and rustls was told).
    eof: bool,
    /// rustls may hold plaintext (a read would not need the socket).
    maybe_plain: bool,
    /// close_notify was queued.
    closing: bool,
}

impl RustlsStream {
    /// Continues a connection whose handshake [`super::handshake::accept`] completed.
    pub fn new(h: Handshaken) -> RustlsStream {
        RustlsStream {
            tcp: h.tcp,
            conn: h.conn,
            maybe_plain: !h.rx.is_empty(),
            rx: h.rx,
            unacked: 0,
            eof: false,
            closing: false,
        }
    }

    /// The socket.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Ready when a read may make progress without waiting (for the relay, which takes a
    /// buffer only then).
    pub fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.maybe_plain || !self.rx.is_empty() || self.eof {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }

    /// Reads plaintext into `dst`; `Ok(0)` is the end (close_notify, or the socket's EOF:
    /// a proxy passes a FIN on either way).
    pub fn poll_read(&mut self, cx: &mut Context<'_>, dst: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            match self.conn.reader().read(dst) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.maybe_plain = false,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Poll::Ready(Ok(0)),
                Err(e) => return Poll::Ready(Err(e)),
            }
            if !self.rx.is_empty() {
                let mut input = &self.rx[..];
                let n = self.conn.read_tls(&mut input)?;
                self.rx.advance(n);
                self.process()?;
                continue;
            }
            if self.eof {
                return Poll::Ready(Ok(0));
            }
            // Answers rustls owes the peer (alerts, KeyUpdate) go out while we wait to read.
            self.flush_now()?;
            ready!(self.tcp.poll_read_ready(cx))?;
            if self.rx.capacity() - self.rx.len() < READ / 2 {
                self.rx.reserve(READ);
            }
            match self.tcp.try_read_buf(&mut self.rx) {
                Ok(0) => {
                    self.eof = true;
                    // An empty read tells rustls the transport ended.
                    self.conn.read_tls(&mut io::empty())?;
                    self.process()?;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Reads plaintext once into `buf` (with room reserved); `Ok(0)` is the end.
    pub fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        let start = buf.len();
        buf.resize(start + 16 * 1024, 0);
        let r = self.poll_read(cx, &mut buf[start..]);
        let n = match &r {
            Poll::Ready(Ok(n)) => *n,
            _ => 0,
        };
        buf.truncate(start + n);
        r
    }

    fn process(&mut self) -> io::Result<()> {
        match self.conn.process_new_packets() {
            Ok(st) => {
                self.maybe_plain = st.plaintext_bytes_to_read() > 0 || st.peer_has_closed();
                Ok(())
            }
            Err(e) => {
                // rustls queued an alert saying why: send it if the socket takes it now.
                let _ = self.flush_now();
                Err(io::Error::new(io::ErrorKind::InvalidData, e))
            }
        }
    }

    /// Writes what rustls holds as far as the socket takes it now, without waiting.
    fn flush_now(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut TcpWriter(&self.tcp)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes everything rustls holds.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            ready!(self.tcp.poll_write_ready(cx))?;
            match self.conn.write_tls(&mut TcpWriter(&self.tcp)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Encrypts and writes `buf`; see the module comment for when it answers.
    pub fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.unacked == 0 {
            // Earlier ciphertext first, so rustls's buffer has room for these bytes.
            ready!(self.poll_flush(cx))?;
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            let n = self.conn.writer().write(buf)?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.unacked = n;
        }
        ready!(self.poll_flush(cx))?;
        Poll::Ready(Ok(std::mem::take(&mut self.unacked)))
    }

    /// Sends close_notify, writes what is left, then shuts the socket down for writing.
    pub fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.closing {
            self.closing = true;
            self.conn.send_close_notify();
        }
        ready!(self.poll_flush(cx))?;
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    /// Writes `b` if the socket takes it now (a best-effort error response to a slow client).
    pub fn try_write(&mut self, b: &[u8]) -> io::Result<()> {
        self.conn.writer().write_all(b)?;
        self.flush_now()
    }
}

impl std::fmt::Debug for RustlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RustlsStream")
            .field("tcp", &self.tcp)
            .field("rx", &self.rx.len())
            .finish_non_exhaustive()
    }
}
