//! [`TlsStream`]: a TCP socket after its TLS handshake, with baton's record layer on it. Its
//! whole state — the socket, the [`Session`], the partial record read and any plaintext not
//! yet taken — parks into plain data ([`ParkedTls`]) whenever no record is half written, and
//! resumes in another process exactly where it stopped.
//!
//! Writes are sealed into an output buffer and sent as the socket takes them, so, as with
//! tokio's `BufWriter`, a caller that has nothing more to write must `poll_flush` before it
//! waits for anything else (the last records may still be in the buffer otherwise). A read
//! also sends what is waiting: KeyUpdate answers go out even on a connection that only reads.

use super::{AlertDescription, Opened, RecordError, Session, MAX_FRAGMENT};
use bytes::{Buf, BytesMut};
use serde::{Deserialize, Serialize};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Ciphertext read per socket read (a little over one maximal record).
const READ_CHUNK: usize = 17 * 1024;
/// Plaintext sealed per `poll_write` call: four full records.
const WRITE_CHUNK: usize = 4 * MAX_FRAGMENT;

/// A TLS session's state off its socket: what a handover moves with the fd.
#[derive(Debug, Serialize, Deserialize)]
pub struct ParkedTls {
    /// Keys, secrets, sequence numbers, flags.
    pub session: Session,
    /// Ciphertext read from the socket that does not yet make a whole record.
    pub partial: Vec<u8>,
    /// Plaintext opened and not yet taken by the reader.
    pub plain: Vec<u8>,
    /// The socket reached EOF (after or without close_notify).
    pub eof: bool,
}

/// Why [`TlsStream::park`] did not park.
#[derive(Debug)]
pub enum ParkError {
    /// Records are waiting to be written (or the session failed): the stream, unchanged.
    Busy(Box<TlsStream>),
    /// The socket could not leave the reactor (the connection is lost, as a plain one would be).
    Socket(io::Error),
}

/// A TCP socket carrying a TLS session through baton's record layer.
#[derive(Debug)]
pub struct TlsStream {
    io: TcpStream,
    session: Session,
    /// Ciphertext read, not yet a whole record.
    rbuf: BytesMut,
    /// Plaintext opened, not yet given to the reader.
    plain: BytesMut,
    /// Ciphertext sealed, not yet written to the socket.
    wbuf: BytesMut,
    /// The socket reached EOF.
    eof: bool,
    /// A fatal record error happened: the session is over (its alert is in `wbuf`).
    failed: bool,
}

fn invalid(e: RecordError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// Wraps a socket whose handshake just completed: `session` from
    /// [`Session::from_rustls`], `plain` the plaintext rustls had already decrypted, and
    /// `cipher` any ciphertext the handshake driver read past the handshake.
    pub fn new(io: TcpStream, session: Session, plain: Vec<u8>, cipher: Vec<u8>) -> TlsStream {
        super::ktls::record_path();
        TlsStream {
            io,
            session,
            rbuf: BytesMut::from(&cipher[..]),
            plain: BytesMut::from(&plain[..]),
            wbuf: BytesMut::new(),
            eof: false,
            failed: false,
        }
    }

    /// The socket.
    pub fn get_ref(&self) -> &TcpStream {
        &self.io
    }

    /// The session (version, suite, sequence numbers).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Records are waiting to be written (or a control record to be sealed).
    pub fn wants_write(&self) -> bool {
        !self.wbuf.is_empty() || self.session.has_pending()
    }

    /// Starts a KeyUpdate of ours (TLS 1.3), asking the peer to update too when `ask_peer`;
    /// it goes out with the next write, flush or read.
    pub fn request_key_update(&mut self, ask_peer: bool) {
        self.session.request_key_update(ask_peer);
    }

    /// Ciphertext read that does not make a whole record yet.
    pub fn buffered_cipher(&self) -> usize {
        self.rbuf.len()
    }

    /// Plaintext already opened and waiting for the reader.
    pub fn buffered_plain(&self) -> usize {
        self.plain.len()
    }

    /// Writes as much of `wbuf` as the socket takes now; Ready once it is empty.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.session.has_pending() {
            self.session.take_pending(&mut self.wbuf).map_err(invalid)?;
        }
        while !self.wbuf.is_empty() {
            ready!(self.io.poll_write_ready(cx))?;
            match self.io.try_write(&self.wbuf) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.wbuf.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Sends what can be sent without waiting; an error is kept for the caller's next write.
    fn send_now(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.poll_send(cx) {
            Poll::Ready(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// A fatal record error: queue the alert it calls for, try to send it, end the session.
    fn fail(&mut self, cx: &mut Context<'_>, e: RecordError) -> io::Error {
        self.failed = true;
        let alert = e.alert().unwrap_or(AlertDescription::INTERNAL_ERROR);
        if self.session.send_alert(alert, &mut self.wbuf).is_ok() {
            let _ = self.send_now(cx);
        }
        invalid(e)
    }

    /// Appends plaintext to `out`: what is buffered, else what the next records carry. Ready
    /// with 0 at the end of the stream (close_notify, or EOF without it — which a proxy passes
    /// on as the end, as HTTP framing or the tunnel's FIN decides what it means).
    pub fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        if !self.plain.is_empty() {
            let n = self.plain.len();
            out.extend_from_slice(&self.plain);
            self.plain.clear();
            return Poll::Ready(Ok(n));
        }
        if self.failed {
            return Poll::Ready(Err(io::Error::other("tls session failed")));
        }
        // KeyUpdate answers and our own leftovers go out even if this side only reads.
        self.send_now(cx)?;
        loop {
            if self.session.received_close() || self.eof {
                return Poll::Ready(Ok(0));
            }
            let before = out.len();
            match self.session.open(&mut self.rbuf, out) {
                Ok(Opened::Closed) => {
                    self.rbuf.clear();
                }
                Ok(Opened::Open) => {}
                Err(e) => return Poll::Ready(Err(self.fail(cx, e))),
            }
            self.send_now(cx)?;
            if out.len() > before {
                return Poll::Ready(Ok(out.len() - before));
            }
            if self.session.received_close() {
                return Poll::Ready(Ok(0));
            }
            ready!(self.io.poll_read_ready(cx))?;
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 2 {
                self.rbuf.reserve(READ_CHUNK);
            }
            match self.io.try_read_buf(&mut self.rbuf) {
                Ok(0) => {
                    if !self.rbuf.is_empty() {
                        self.failed = true;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed inside a tls record",
                        )));
                    }
                    self.eof = true;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Seals up to 64 KiB of `data` (after any waiting records are sent) and returns how much
    /// it took. The records go out as the socket takes them: see [`TlsStream::poll_flush`].
    pub fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.failed {
            return Poll::Ready(Err(io::Error::other("tls session failed")));
        }
        ready!(self.poll_send(cx))?;
        let n = data.len().min(WRITE_CHUNK);
        self.session
            .seal(&data[..n], &mut self.wbuf)
            .map_err(invalid)?;
        self.send_now(cx)?;
        Poll::Ready(Ok(n))
    }

    /// Writes every sealed record to the socket.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send(cx)
    }

    /// Sends close_notify (once) and everything before it, then shuts the socket's write side.
    pub fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.session.sent_close() && !self.failed {
            self.session.close_notify(&mut self.wbuf).map_err(invalid)?;
        }
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    /// Whether [`TlsStream::park`] would succeed now: no record half written or waiting.
    pub fn can_park(&self) -> bool {
        !self.wants_write() && !self.failed
    }

    /// Stops the stream as plain data and the socket, if no record is half written or
    /// waiting (`poll_flush` first); otherwise gives the stream back. Nothing is written on
    /// the socket by parking, not even close_notify: whoever resumes it owns the session.
    pub fn park(self) -> Result<(std::net::TcpStream, ParkedTls), ParkError> {
        if !self.can_park() {
            return Err(ParkError::Busy(Box::new(self)));
        }
        let TlsStream {
            io,
            session,
            rbuf,
            plain,
            eof,
            ..
        } = self;
        let std = io.into_std().map_err(ParkError::Socket)?;
        let parked = ParkedTls {
            session,
            partial: rbuf.to_vec(),
            plain: plain.to_vec(),
            eof,
        };
        Ok((std, parked))
    }

    /// Continues a parked stream on `io` (an fd received from the predecessor, or our own
    /// after a rollback).
    pub fn resume(io: std::net::TcpStream, p: ParkedTls) -> io::Result<TlsStream> {
        io.set_nonblocking(true)?;
        let io = TcpStream::from_std(io)?;
        super::ktls::record_path();
        Ok(TlsStream {
            io,
            session: p.session,
            rbuf: BytesMut::from(&p.partial[..]),
            plain: BytesMut::from(&p.plain[..]),
            wbuf: BytesMut::new(),
            eof: p.eof,
            failed: false,
        })
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.plain.is_empty() {
            let mut plain = std::mem::take(&mut this.plain);
            let r = this.poll_read_buf(cx, &mut plain);
            this.plain = plain;
            ready!(r)?;
        }
        let n = this.plain.len().min(buf.remaining());
        buf.put_slice(&this.plain[..n]);
        this.plain.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        TlsStream::poll_write(self.get_mut(), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TlsStream::poll_flush(self.get_mut(), cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TlsStream::poll_shutdown(self.get_mut(), cx)
    }
}
