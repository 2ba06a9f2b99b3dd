//! A plain TCP socket as [`super::client_io::ClientIo`] carries it, set up only as far as
//! it is used:
//!
//! - **TCP_NODELAY before the second write, not at accept.** Nagle's algorithm (as Linux
//!   runs it, Minshall's variant) holds back a small segment only while an earlier small one
//!   is unacknowledged, so a connection's first write never waits for it. Setting it there,
//!   as nginx does, saves the `setsockopt` of every connection that writes once — a
//!   `Connection: close` exchange whose response fits one write.
//! - **Registered with tokio's reactor only once it has to wait.** A new client connection
//!   comes from the listener as a plain std socket ([`crate::listener::Acceptor`]); with
//!   TCP_DEFER_ACCEPT its request is already there. A read or write that would block
//!   registers it (epoll_ctl ADD) and waits as usual; a connection served and closed without
//!   ever waiting never costs the ADD, nor the DEL that tokio makes when a registered socket
//!   is dropped. HAProxy reads and writes a new connection speculatively the same way.

use bytes::BytesMut;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A plain socket, how far it is registered, and whether TCP_NODELAY is on yet.
#[derive(Debug)]
pub struct Tcp {
    /// The socket.
    sock: Sock,
    /// Where the socket stands with TCP_NODELAY.
    nagle: Nagle,
}

/// A plain socket, registered with the reactor or not yet.
#[derive(Debug)]
enum Sock {
    /// Non-blocking, not registered: reads and writes are tried directly.
    Fresh(std::net::TcpStream),
    /// Registered with tokio's reactor.
    Registered(TcpStream),
    /// Registering failed and closed the socket.
    Lost,
}

/// A plain socket's TCP_NODELAY, set lazily (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nagle {
    /// TCP_NODELAY is set (or was set before the socket reached us).
    Off,
    /// Not set, and nothing written yet.
    Unwritten,
    /// Not set, and one write done: set it before the next.
    WroteOnce,
}

/// The error of a socket whose registration failed.
fn lost() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "socket lost: registering it failed",
    )
}

/// Whether a direct (unregistered) read or write would have to wait.
fn would_wait(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl Tcp {
    /// A registered socket whose TCP_NODELAY the caller already set (an upstream
    /// connection, a connection resumed from a predecessor).
    pub fn registered(s: TcpStream) -> Tcp {
        Tcp {
            sock: Sock::Registered(s),
            nagle: Nagle::Off,
        }
    }

    /// A registered client socket without TCP_NODELAY yet.
    pub fn registered_lazy(s: TcpStream) -> Tcp {
        Tcp {
            sock: Sock::Registered(s),
            nagle: Nagle::Unwritten,
        }
    }

    /// A new client socket straight from the listener: non-blocking, neither registered nor
    /// with TCP_NODELAY.
    pub fn fresh(s: std::net::TcpStream) -> Tcp {
        Tcp {
            sock: Sock::Fresh(s),
            nagle: Nagle::Unwritten,
        }
    }

    /// The registered socket, registering it first if it is not yet.
    pub fn stream(&mut self) -> io::Result<&mut TcpStream> {
        if matches!(self.sock, Sock::Fresh(_)) {
            if let Sock::Fresh(s) = std::mem::replace(&mut self.sock, Sock::Lost) {
                self.sock = Sock::Registered(TcpStream::from_std(s)?);
            }
        }
        match &mut self.sock {
            Sock::Registered(s) => Ok(s),
            _ => Err(lost()),
        }
    }

    /// The registered socket, if it is registered.
    pub fn get(&self) -> Option<&TcpStream> {
        match &self.sock {
            Sock::Registered(s) => Some(s),
            _ => None,
        }
    }

    /// The socket, registered, for whoever goes on without the engine (the idle wait, h2c).
    pub fn into_stream(mut self) -> io::Result<TcpStream> {
        self.stream()?;
        match self.sock {
            Sock::Registered(s) => Ok(s),
            _ => Err(lost()),
        }
    }

    /// The socket out of the reactor (a handover): an unregistered one as it is.
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        match self.sock {
            Sock::Fresh(s) => Ok(s),
            Sock::Registered(s) => s.into_std(),
            Sock::Lost => Err(lost()),
        }
    }

    /// Sets TCP_NODELAY now (a caller that writes to the socket past this type).
    pub fn nodelay_now(&mut self) {
        if self.nagle != Nagle::Off {
            self.set_nodelay();
        }
    }

    fn set_nodelay(&mut self) {
        let _ = match &self.sock {
            Sock::Fresh(s) => s.set_nodelay(true),
            Sock::Registered(s) => s.set_nodelay(true),
            Sock::Lost => Ok(()),
        };
        self.nagle = Nagle::Off;
    }

    /// Sets TCP_NODELAY if the coming write is not the socket's first.
    fn before_write(&mut self) {
        if self.nagle == Nagle::WroteOnce {
            self.set_nodelay();
        }
    }

    /// Counts a write that went through (`ok`).
    fn wrote(&mut self, ok: bool) {
        if ok && self.nagle == Nagle::Unwritten {
            self.nagle = Nagle::WroteOnce;
        }
    }

    /// Whether an idle socket has nothing to read without waiting (see
    /// `ClientIo::idle_usable`).
    pub fn idle_usable(&mut self) -> bool {
        let mut b = [0u8; 1];
        let r = match &self.sock {
            Sock::Fresh(s) => (&*s).read(&mut b),
            Sock::Registered(s) => s.try_read(&mut b),
            Sock::Lost => return false,
        };
        matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Reads once into `buf` (`super::client_io::poll_fill_tcp`); registers first.
    pub fn poll_fill(
        &mut self,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match self.stream() {
            Ok(s) => super::client_io::poll_fill_tcp(s, buf, cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Ready when a read may make progress; registers first.
    pub fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(s) => s.poll_read_ready(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Reads into `buf`; registers first.
    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(s) => Pin::new(s).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Writes `b` if the socket takes it now, without waiting.
    pub fn try_write(&mut self, b: &[u8]) -> io::Result<()> {
        self.before_write();
        let r = match &self.sock {
            Sock::Fresh(s) => (&*s).write(b).map(|_| ()),
            Sock::Registered(s) => s.try_write(b).map(|_| ()),
            Sock::Lost => Err(lost()),
        };
        self.wrote(r.is_ok());
        r
    }

    /// One write: directly while unregistered, through the reactor once it has had to wait.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        direct: impl FnOnce(&std::net::TcpStream) -> io::Result<usize>,
        registered: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        self.before_write();
        let r = match &self.sock {
            Sock::Fresh(s) => match direct(s) {
                Err(e) if would_wait(&e) => None,
                r => Some(Poll::Ready(r)),
            },
            _ => None,
        };
        let r = match r {
            Some(r) => r,
            None => match self.stream() {
                Ok(s) => registered(Pin::new(s), cx),
                Err(e) => Poll::Ready(Err(e)),
            },
        };
        self.wrote(matches!(r, Poll::Ready(Ok(_))));
        r
    }

    /// Writes `b`.
    pub fn poll_write(&mut self, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |mut s| s.write(b), |s, cx| s.poll_write(cx, b))
    }

    /// Writes `bufs` in one call.
    pub fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(
            cx,
            |mut s| s.write_vectored(bufs),
            |s, cx| s.poll_write_vectored(cx, bufs),
        )
    }

    /// Nothing is buffered here: ready at once.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.sock {
            Sock::Registered(s) => Pin::new(s).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    /// Sends the FIN.
    pub fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.sock {
            Sock::Fresh(s) => Poll::Ready(s.shutdown(std::net::Shutdown::Write)),
            Sock::Registered(s) => Pin::new(s).poll_shutdown(cx),
            Sock::Lost => Poll::Ready(Err(lost())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::client_io::ClientIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair on 127.0.0.1: (the accepted side, unregistered and non-blocking; its
    /// peer).
    async fn pair() -> (std::net::TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (s, c)
    }

    fn plain(io: &ClientIo) -> &Tcp {
        match io {
            ClientIo::Plain(t) => t,
            ClientIo::Tls(_) => panic!("not plain"),
        }
    }

    #[tokio::test]
    async fn nodelay_is_set_before_the_second_write_not_the_first() {
        let (s, mut peer) = pair().await;
        assert!(!s.nodelay().unwrap(), "a new socket starts with Nagle on");
        let mut io = ClientIo::plain_lazy(TcpStream::from_std(s).unwrap());
        io.write_all(b"first").await.unwrap();
        let nodelay = |io: &ClientIo| plain(io).get().unwrap().nodelay().unwrap();
        assert!(!nodelay(&io), "one write needs no TCP_NODELAY");
        let n = io
            .write_vectored(&[io::IoSlice::new(b"second")])
            .await
            .unwrap();
        assert_eq!(n, 6, "a short vectored write to an empty socket buffer");
        assert!(nodelay(&io), "set before the second write");
        let mut got = [0u8; 11];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"firstsecond");
    }

    #[tokio::test]
    async fn try_write_counts_as_a_write_and_nodelay_now_sets_it_at_once() {
        let (s, _peer) = pair().await;
        let probe = s.try_clone().unwrap();
        let mut io = ClientIo::fresh(s);
        io.try_write(b"x").unwrap();
        assert!(!probe.nodelay().unwrap());
        io.try_write(b"y").unwrap();
        assert!(probe.nodelay().unwrap());
        assert!(
            plain(&io).get().is_none(),
            "writes that went through register nothing"
        );

        let (s, _peer) = pair().await;
        let mut io = ClientIo::fresh(s);
        io.nodelay_now();
        assert!(io.tcp().unwrap().nodelay().unwrap());
    }

    #[tokio::test]
    async fn a_fresh_socket_writes_without_registering_and_registers_to_read() {
        let (s, mut peer) = pair().await;
        let mut io = ClientIo::fresh(s);
        io.write_all(b"response").await.unwrap();
        assert!(
            plain(&io).get().is_none(),
            "a write that went through registers nothing"
        );
        let mut got = [0u8; 8];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"response");

        peer.write_all(b"next").await.unwrap();
        let mut buf = BytesMut::new();
        let n = std::future::poll_fn(|cx| io.poll_fill(&mut buf, cx))
            .await
            .unwrap();
        assert_eq!(&buf[..n], b"next");
        assert!(plain(&io).get().is_some(), "reading registered it");
    }

    #[tokio::test]
    async fn a_fresh_socket_that_must_wait_to_write_registers_and_finishes_the_write() {
        let (s, mut peer) = pair().await;
        s.set_nodelay(true).unwrap();
        socket2::SockRef::from(&s)
            .set_send_buffer_size(4096)
            .unwrap();
        let mut io = ClientIo::fresh(s);
        // More than the socket and the peer's receive buffer take: the writer has to wait.
        let big = vec![7u8; 1 << 20];
        let writer = async {
            io.write_all(&big).await.unwrap();
            io
        };
        let reader = async {
            let mut got = vec![0u8; big.len()];
            peer.read_exact(&mut got).await.unwrap();
            got
        };
        let (io, got) = tokio::join!(writer, reader);
        assert!(got == big, "every byte arrives, in order");
        assert!(plain(&io).get().is_some(), "waiting registered it");
    }

    #[tokio::test]
    async fn a_fresh_socket_parks_as_it_is() {
        let (s, mut peer) = pair().await;
        let io = ClientIo::fresh(s);
        let (std, tls, settled) = io.park().unwrap();
        assert!(tls.is_none());
        assert_eq!(settled, 0);
        (&std).write_all(b"still here").unwrap();
        let mut got = [0u8; 10];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"still here");
    }
}
