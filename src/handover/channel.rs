//! The channel: framed messages with fds (SCM_RIGHTS) over a Unix stream socket.
//!
//! A stream socket keeps no message boundaries, so the fds of a frame are attached to the
//! first `sendmsg` of that frame (which starts with the header) and the receiver never asks
//! for more bytes than the current frame holds: the fds of the next frame cannot arrive early.
//! Every read is a `recvmsg` with `MSG_CMSG_CLOEXEC` (received fds never leak into a child we
//! spawn later), and `MSG_CTRUNC` is fatal: the fds that did arrive are closed and the frame
//! is an error. The syscalls are rustix's safe wrappers, non-blocking, driven by tokio's
//! readiness (`UnixStream::async_io`).

use super::message::{self, Header, Message, HEADER_LEN, MAX_FDS};
use super::HandoverError;
use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Payload and bulk sections are read in chunks of this size, so a hostile length does not
/// allocate memory before the bytes actually arrive.
const READ_CHUNK: usize = 1 << 20;

/// One end of a handover channel.
#[derive(Debug)]
pub struct Channel {
    /// The connected Unix stream socket (one end of a socketpair).
    stream: UnixStream,
    /// Control-message space for [`MAX_FDS`] fds, reused by every `recvmsg`.
    cmsg: Vec<MaybeUninit<u8>>,
}

/// A message as it arrived, with its fds and bulk bytes.
#[derive(Debug)]
pub struct Received {
    /// The message, already checked against the header.
    pub msg: Message,
    /// The fds, in the order they were sent; close-on-exec.
    pub fds: Vec<OwnedFd>,
    /// The bulk bytes.
    pub bulk: Vec<u8>,
}

impl Channel {
    /// Wraps a connected tokio Unix stream socket.
    pub fn new(stream: UnixStream) -> Channel {
        Channel::with_fd_capacity(stream, MAX_FDS)
    }

    /// Wraps a socket whose messages never carry more than `max_fds` fds (capped at
    /// [`MAX_FDS`]): a frame with more fails with [`HandoverError::ControlTruncated`].
    pub fn with_fd_capacity(stream: UnixStream, max_fds: usize) -> Channel {
        let cmsg =
            vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(max_fds.min(MAX_FDS)))];
        Channel { stream, cmsg }
    }

    /// Wraps a connected std Unix stream socket (made non-blocking here). Needs a tokio runtime.
    pub fn from_std(stream: std::os::unix::net::UnixStream) -> io::Result<Channel> {
        stream.set_nonblocking(true)?;
        Ok(Channel::new(UnixStream::from_std(stream)?))
    }

    /// Two connected channels in this process (both ends close-on-exec); for tests and tools.
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Channel::new(a), Channel::new(b)))
    }

    /// The underlying socket.
    pub fn into_inner(self) -> UnixStream {
        self.stream
    }

    /// Sends one message with its fds and bulk bytes. The fds stay owned by the caller: the
    /// kernel gives the peer its own copies. Not cancel-safe: if the future is dropped (e.g. a
    /// timeout), part of a frame may have gone out; abandon the channel (abort the upgrade).
    pub async fn send(
        &mut self,
        msg: &Message,
        fds: &[BorrowedFd<'_>],
        bulk: &[u8],
    ) -> Result<(), HandoverError> {
        let head = message::encode(msg, fds.len(), bulk.len())?;
        tracing::trace!(
            message = msg.name(),
            fds = fds.len(),
            bulk = bulk.len(),
            "handover send"
        );
        self.send_raw(&[&head, bulk], fds).await
    }

    /// Sends already-encoded bytes, with `fds` attached to the first byte. [`Channel::send`]
    /// uses it; tests use it to send malformed frames.
    pub async fn send_raw(
        &mut self,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), HandoverError> {
        if fds.len() > MAX_FDS {
            return Err(HandoverError::TooManyFds(fds.len()));
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total == 0 && !fds.is_empty() {
            return Err(HandoverError::BadHeader(
                "fds need at least one byte to travel with",
            ));
        }
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut sent = 0;
        while sent < total {
            // The fds go with the first successful sendmsg only; after that, plain bytes.
            let with_fds = if sent == 0 { fds } else { &[] };
            let n = self
                .stream
                .async_io(Interest::WRITABLE, || {
                    send_once(self.stream.as_fd(), parts, sent, with_fds, &mut space)
                })
                .await?;
            if n == 0 {
                return Err(HandoverError::Io(io::ErrorKind::WriteZero.into()));
            }
            sent += n;
        }
        Ok(())
    }

    /// Receives one whole frame. A peer that closes between frames gives
    /// [`HandoverError::Closed`]; anything malformed is a typed error and every fd that did
    /// arrive is closed. Not cancel-safe: after a timeout the channel may be mid-frame;
    /// abandon it (abort the upgrade).
    pub async fn recv(&mut self) -> Result<Received, HandoverError> {
        let mut fds = Vec::new();
        let mut head = [0u8; HEADER_LEN];
        self.read_exact(&mut head, &mut fds, "header", true).await?;
        let header = Header::decode(&head)?;
        check_fds(&header, fds.len())?;
        // Wiped when dropped: a Conns message may carry TLS sessions' secrets.
        let payload = zeroize::Zeroizing::new(
            self.read_vec(header.payload_len as usize, &mut fds, "payload")
                .await?,
        );
        let msg = message::decode_payload(&header, &payload)?;
        let bulk_len = usize::try_from(header.bulk_len).map_err(|_| HandoverError::TooLarge {
            what: "bulk",
            len: header.bulk_len,
            cap: message::MAX_BULK,
        })?;
        let bulk = self.read_vec(bulk_len, &mut fds, "bulk").await?;
        check_fds(&header, fds.len())?;
        tracing::trace!(
            message = msg.name(),
            fds = fds.len(),
            bulk = bulk.len(),
            "handover recv"
        );
        Ok(Received { msg, fds, bulk })
    }

    async fn read_vec(
        &mut self,
        len: usize,
        fds: &mut Vec<OwnedFd>,
        what: &'static str,
    ) -> Result<Vec<u8>, HandoverError> {
        let mut out = Vec::new();
        while out.len() < len {
            let start = out.len();
            out.resize(start + (len - start).min(READ_CHUNK), 0);
            self.read_exact(&mut out[start..], fds, what, false).await?;
        }
        Ok(out)
    }

    /// Fills `buf` with `recvmsg`, collecting any fds into `fds`.
    async fn read_exact(
        &mut self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        what: &'static str,
        frame_start: bool,
    ) -> Result<(), HandoverError> {
        let mut filled = 0;
        while filled < buf.len() {
            let Channel { stream, cmsg } = self;
            let n = stream
                .async_io(Interest::READABLE, || {
                    recv_once(stream.as_fd(), &mut buf[filled..], cmsg, fds)
                })
                .await??;
            if n == 0 {
                return Err(if frame_start && filled == 0 {
                    HandoverError::Closed
                } else {
                    HandoverError::Truncated { what }
                });
            }
            filled += n;
            if fds.len() > MAX_FDS {
                return Err(HandoverError::TooManyFds(fds.len()));
            }
        }
        Ok(())
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

fn check_fds(header: &Header, received: usize) -> Result<(), HandoverError> {
    let announced = header.fd_count as usize;
    if received != announced {
        return Err(HandoverError::FdCountMismatch {
            header: announced,
            received,
        });
    }
    Ok(())
}

/// One non-blocking `sendmsg` of `parts[skip..]`, with `fds` attached if any.
fn send_once(
    sock: BorrowedFd<'_>,
    parts: &[&[u8]],
    mut skip: usize,
    fds: &[BorrowedFd<'_>],
    space: &mut [MaybeUninit<u8>],
) -> io::Result<usize> {
    let mut iov = Vec::with_capacity(parts.len());
    for p in parts {
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        iov.push(IoSlice::new(&p[skip..]));
        skip = 0;
    }
    let mut control = SendAncillaryBuffer::new(space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("control buffer too small for the fds"));
    }
    loop {
        match sendmsg(
            sock,
            &iov,
            &mut control,
            SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
        ) {
            Err(Errno::INTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// One non-blocking `recvmsg` into `buf`. The fds that arrive are appended to `fds`; on
/// `MSG_CTRUNC` every fd of the frame so far is closed and the frame fails.
fn recv_once(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    space: &mut [MaybeUninit<u8>],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<Result<usize, HandoverError>> {
    let mut control = RecvAncillaryBuffer::new(space);
    let mut iov = [IoSliceMut::new(buf)];
    let r = loop {
        match recvmsg(
            sock,
            &mut iov,
            &mut control,
            RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
        ) {
            Err(Errno::INTR) => continue,
            r => break r.map_err(io::Error::from)?,
        }
    };
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if r.flags.contains(ReturnFlags::CTRUNC) {
        fds.clear();
        return Ok(Err(HandoverError::ControlTruncated));
    }
    Ok(Ok(r.bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::io::{fcntl_getfd, FdFlags};

    #[tokio::test]
    async fn message_with_fds_and_bulk_round_trips() {
        let (mut a, mut b) = Channel::pair().unwrap();
        let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap();
        let msg = Message::Listeners {
            listeners: vec![super::super::ListenerEntry {
                name: "a".into(),
                addr: "127.0.0.1:1".parse().unwrap(),
                protocol: crate::config::Protocol::Tcp,
            }],
            ticket_keys: 0,
        };
        a.send(&msg, &[x.as_fd()], &[]).await.unwrap();
        a.send(&Message::Ack { seq: 1, count: 0 }, &[], &[])
            .await
            .unwrap();
        let r = b.recv().await.unwrap();
        assert_eq!(r.msg, msg);
        assert_eq!(r.fds.len(), 1);
        assert!(fcntl_getfd(&r.fds[0]).unwrap().contains(FdFlags::CLOEXEC));
        let r = b.recv().await.unwrap();
        assert_eq!(r.msg, Message::Ack { seq: 1, count: 0 });
        assert!(r.fds.is_empty());
        drop(a);
        assert!(matches!(b.recv().await, Err(HandoverError::Closed)));
    }

    #[tokio::test]
    async fn fds_without_bytes_and_too_many_fds_are_refused() {
        let (mut a, _b) = Channel::pair().unwrap();
        let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            a.send_raw(&[], &[x.as_fd()]).await,
            Err(HandoverError::BadHeader(_))
        ));
        let many = vec![x.as_fd(); MAX_FDS + 1];
        assert!(matches!(
            a.send_raw(&[b"x"], &many).await,
            Err(HandoverError::TooManyFds(254))
        ));
    }
}
