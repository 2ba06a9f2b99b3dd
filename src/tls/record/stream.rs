//! [`TlsStream`]: a TCP socket after its TLS handshake, with baton's record layer on it. Its
//! whole state — the socket, the [`Session`], the partial record read, any plaintext not yet
//! taken and whole records not yet written — parks into plain data ([`ParkedTls`]) at any
//! moment (records are sealed whole, so it is always at a record boundary), and resumes in
//! another process exactly where it stopped.
//!
//! Writes are acknowledged only once their ciphertext is on the socket: `poll_write` seals the
//! bytes on its first call and answers `Ready(n)` when the records are written, `Pending` until
//! then, so a caller that retries a `Pending` write with the same bytes (the HTTP engine and the
//! relay do) never leaves records stranded in our buffer while it waits on something else. A
//! caller that stops retrying settles: [`TlsStream::poll_settle`] finishes the write and says
//! how many of its bytes went out; [`TlsStream::park`] does the same without waiting, moving
//! the unwritten records with the session. A read also sends what is waiting: KeyUpdate
//! answers go out even on a connection that only reads.

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedTls {
    /// Keys, secrets, sequence numbers, flags.
    pub session: Session,
    /// Ciphertext read from the socket that does not yet make a whole record.
    pub partial: Vec<u8>,
    /// Plaintext opened and not yet taken by the reader.
    pub plain: Vec<u8>,
    /// Whole records sealed but not yet taken by the socket: written first on resume.
    pub unsent: Vec<u8>,
    /// The socket reached EOF (after or without close_notify).
    pub eof: bool,
}

/// Why [`TlsStream::park`] did not park.
#[derive(Debug)]
pub enum ParkError {
    /// The session failed (a fatal record error): the stream, unchanged.
    Busy(Box<TlsStream>),
    /// The KeyUpdate owed could not be sealed (sequence numbers exhausted).
    Session(RecordError),
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
    /// Bytes of the current `poll_write` sealed but not yet acknowledged.
    unacked: usize,
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
            unacked: 0,
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

    /// Frees the allocations of the buffers that hold nothing: an idle session keeps its keys
    /// and socket only (the read buffer alone is 17 KiB), and a new one is made when bytes
    /// arrive.
    pub fn release_buffers(&mut self) {
        for b in [&mut self.rbuf, &mut self.plain, &mut self.wbuf] {
            if b.is_empty() {
                *b = BytesMut::new();
            }
        }
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
            // poll_read, not try_read: a short read clears the readiness, so the next read
            // waits for epoll instead of costing a recvfrom that returns EAGAIN.
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                &mut self.rbuf
            )) {
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
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Seals up to 64 KiB of `data` and answers how much once its records are on the socket
    /// (retry a `Pending` with the same bytes: they are already sealed).
    pub fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.failed {
            return Poll::Ready(Err(io::Error::other("tls session failed")));
        }
        if self.unacked == 0 {
            // Earlier records first, so the buffer holds at most one write's records.
            ready!(self.poll_send(cx))?;
            if data.is_empty() {
                return Poll::Ready(Ok(0));
            }
            let n = data.len().min(WRITE_CHUNK);
            self.session
                .seal(&data[..n], &mut self.wbuf)
                .map_err(invalid)?;
            self.unacked = n;
        }
        ready!(self.poll_send(cx))?;
        Poll::Ready(Ok(std::mem::take(&mut self.unacked)))
    }

    /// [`TlsStream::poll_write`] for several buffers: what fits in one write (64 KiB) is joined
    /// and sealed together, so a response head and the start of its body travel in one record
    /// and one `write`.
    pub fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut live = bufs.iter().filter(|b| !b.is_empty());
        let first: &[u8] = live.next().map(|b| &b[..]).unwrap_or(&[]);
        if self.unacked > 0 || live.next().is_none() {
            return self.poll_write(cx, first);
        }
        let total = bufs.iter().map(|b| b.len()).sum::<usize>().min(WRITE_CHUNK);
        let mut joined = Vec::with_capacity(total);
        for b in bufs {
            let take = (total - joined.len()).min(b.len());
            joined.extend_from_slice(&b[..take]);
        }
        self.poll_write(cx, &joined)
    }

    /// Finishes the current write without being given its bytes again: Ready with how many
    /// bytes of it are now on the socket (0 if none was pending). A caller about to park calls
    /// this and counts those bytes as written.
    pub fn poll_settle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        ready!(self.poll_send(cx))?;
        Poll::Ready(Ok(std::mem::take(&mut self.unacked)))
    }

    /// Seals `b` and writes what the socket takes now, without waiting (a best-effort error
    /// response); the rest goes out with the next write, flush or read.
    pub fn try_write(&mut self, b: &[u8]) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other("tls session failed"));
        }
        self.session.seal(b, &mut self.wbuf).map_err(invalid)?;
        while !self.wbuf.is_empty() {
            match self.io.try_write(&self.wbuf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wbuf.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Ready when a read may make progress without waiting on the socket (plaintext or a
    /// whole record buffered, the end reached), else when the socket is readable.
    pub fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let whole = matches!(
            super::protect::complete(self.session.version(), &self.rbuf),
            Ok(Some(_)) | Err(_)
        );
        if !self.plain.is_empty()
            || whole
            || self.eof
            || self.failed
            || self.session.received_close()
        {
            return Poll::Ready(Ok(()));
        }
        self.io.poll_read_ready(cx)
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

    /// Whether [`TlsStream::park`] would succeed now (it does unless the session failed).
    pub fn can_park(&self) -> bool {
        !self.failed
    }

    /// Stops the stream as plain data and the socket. Any KeyUpdate owed is sealed first, and
    /// whole records the socket has not taken yet travel as ciphertext (`unsent`), so a
    /// session always parks at a record boundary, even with a client that stopped reading.
    /// Returns too how many bytes of an unfinished `poll_write` those records carry: the
    /// caller counts them as written (and drops them from its own buffer). Nothing is written
    /// on the socket by parking, not even close_notify: whoever resumes it owns the session.
    pub fn park(mut self) -> Result<(std::net::TcpStream, ParkedTls, usize), ParkError> {
        if self.failed {
            return Err(ParkError::Busy(Box::new(self)));
        }
        if let Err(e) = self.session.take_pending(&mut self.wbuf) {
            return Err(ParkError::Session(e));
        }
        let TlsStream {
            io,
            session,
            rbuf,
            plain,
            wbuf,
            unacked,
            eof,
            ..
        } = self;
        let std = io.into_std().map_err(ParkError::Socket)?;
        let parked = ParkedTls {
            session,
            partial: rbuf.to_vec(),
            plain: plain.to_vec(),
            unsent: wbuf.to_vec(),
            eof,
        };
        Ok((std, parked, unacked))
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
            wbuf: BytesMut::from(&p.unsent[..]),
            unacked: 0,
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

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        TlsStream::poll_write_vectored(self.get_mut(), cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TlsStream::poll_flush(self.get_mut(), cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TlsStream::poll_shutdown(self.get_mut(), cx)
    }
}
