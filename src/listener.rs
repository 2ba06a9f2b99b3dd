//! Listening sockets: bound here (socket2: backlog, SO_REUSEADDR, optional SO_REUSEPORT) or
//! adopted from an inherited file descriptor (a predecessor's handover, or systemd).

use crate::config;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use std::io;
use std::os::fd::OwnedFd;
use tokio::net::TcpListener;

/// Binds a listener as configured. Sockets are close-on-exec (socket2's default), so they
/// reach a successor only through the handover channel.
pub fn bind(cfg: &config::Listener) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(cfg.listen),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if cfg.reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&cfg.listen.into())?;
    socket.listen(cfg.backlog.min(i32::MAX as u32) as i32)?;
    socket.set_nonblocking(true)?;
    accept_options(&socket, cfg)?;
    Ok(socket.into())
}

/// Adopts an inherited listening socket for the listener `cfg`: [`adopt`], then the options
/// that can change without binding again (`defer_accept`), so an upgrade or reload that
/// changes them takes effect on the same socket.
pub fn adopt_for(fd: OwnedFd, cfg: &config::Listener) -> io::Result<std::net::TcpListener> {
    let l = adopt(fd)?;
    accept_options(&SockRef::from(&l), cfg)?;
    Ok(l)
}

/// Adopts an inherited listening socket: checks that it is a listening TCP socket, makes it
/// non-blocking and close-on-exec.
pub fn adopt(fd: OwnedFd) -> io::Result<std::net::TcpListener> {
    let sock = Socket::from(fd);
    if !sock.is_listener()? || sock.r#type()? != Type::STREAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "inherited fd is not a listening stream socket",
        ));
    }
    sock.set_nonblocking(true)?;
    sock.set_cloexec(true)?;
    Ok(sock.into())
}

/// The options a listening socket passes to the connections it accepts, set on bind and again
/// on adopt:
/// - TCP_DEFER_ACCEPT as configured ([`set_defer_accept`]);
/// - on listeners whose clients speak first and get an answer (HTTP, TLS), quick ACKs off
///   (`TCP_QUICKACK` 0, which accepted sockets inherit), so the kernel does not acknowledge the
///   request by itself: the response carries the ACK. HAProxy does the same for its HTTP
///   frontends (`option tcp-smart-accept`); it saves one packet per new connection, which on
///   loopback is processed on the client's CPU.
fn accept_options(s: &Socket, cfg: &config::Listener) -> io::Result<()> {
    set_defer_accept(s, cfg.defer_accept)?;
    let answers = cfg.protocol == config::Protocol::Http || cfg.tls.is_some();
    rustix::net::sockopt::set_tcp_quickack(s, !answers)?;
    Ok(())
}

/// How long the kernel holds a connection whose client has sent nothing (TCP_DEFER_ACCEPT,
/// in seconds; the kernel rounds it to SYN-ACK retransmissions), as nginx's `deferred` and
/// HAProxy's `defer-accept` do. After it the connection is accepted without data, and the
/// listener's own timeouts apply.
const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// Sets or clears TCP_DEFER_ACCEPT on a listening socket. With it, a new connection wakes
/// baton once, with its first bytes, instead of once for the accept and again for the
/// request; the handshake's last ACK alone does not reach the accept queue.
fn set_defer_accept(s: &Socket, on: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = if on { DEFER_ACCEPT_SECS } else { 0 };
    // No safe wrapper exists for this option (socket2, rustix and nix lack it). The pointer
    // and length describe `v`, which outlives the call; the fd is borrowed from `s`.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Registers a std listener with the current tokio runtime.
pub fn to_tokio(l: std::net::TcpListener) -> io::Result<TcpListener> {
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// A listening socket registered with the runtime for readability, whose accepted
/// connections come out as non-blocking std sockets, not registered with the reactor: the
/// HTTP engine registers one only if it has to wait (`proxy::plain_tcp`), so a connection
/// served and closed at once costs no epoll_ctl ADD and DEL. (tokio's `TcpListener::accept`
/// registers every connection it returns.)
#[derive(Debug)]
pub struct Acceptor(tokio::io::unix::AsyncFd<std::net::TcpListener>);

impl Acceptor {
    /// Registers `l` with the current runtime.
    pub fn new(l: std::net::TcpListener) -> io::Result<Acceptor> {
        l.set_nonblocking(true)?;
        // `with_interest` is deprecated for types whose fd may change or close while
        // registered (tokio#8587); a std listener owned by the `AsyncFd` cannot (as the idle
        // watcher's `OwnedFd`, `proxy::http::idle`).
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::with_interest(l, tokio::io::Interest::READABLE)?;
        Ok(Acceptor(fd))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.0.get_ref().local_addr()
    }

    /// Accepts one connection: non-blocking, close-on-exec, not registered.
    pub fn poll_accept(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<(std::net::TcpStream, std::net::SocketAddr)>> {
        loop {
            let mut ready = std::task::ready!(self.0.poll_read_ready(cx))?;
            // `try_io` clears the readiness when accept says WouldBlock, so the next poll
            // waits for epoll.
            if let Ok(r) = ready.try_io(|l| {
                let (s, addr) =
                    SockRef::from(l.get_ref()).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
                let peer = addr
                    .as_socket()
                    .ok_or_else(|| io::Error::other("accepted a connection with no IP address"))?;
                Ok((std::net::TcpStream::from(s), peer))
            }) {
                return std::task::Poll::Ready(r);
            }
        }
    }

    /// Accepts one connection ([`Acceptor::poll_accept`]).
    pub async fn accept(&self) -> io::Result<(std::net::TcpStream, std::net::SocketAddr)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }
}

/// Sets TCP_NODELAY on an accepted or connected socket; latency matters more than packet count
/// for a proxy that already batches in 64 KiB buffers.
pub fn tune(s: &tokio::net::TcpStream) {
    let _ = SockRef::from(s).set_tcp_nodelay(true);
}

/// Whether an I/O error means "out of file descriptors or memory": back off, don't spin, and
/// don't blame the peer (an upstream connect failing so is not the server's fault).
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let Some(code) = e.raw_os_error() else {
        return false;
    };
    [Errno::MFILE, Errno::NFILE, Errno::NOMEM, Errno::NOBUFS]
        .iter()
        .any(|x| x.raw_os_error() == code)
}

/// How long an accept loop pauses after running out of file descriptors or memory: the
/// pending connection stays in the backlog, and accepting again at once would fail again.
pub const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// The error handling every accept loop of baton shares (proxy listeners, the control socket,
/// the admin endpoint): out of resources, it warns at most once a second and pauses for
/// [`ACCEPT_BACKOFF`]; another error concerns one connection only and is logged at debug.
#[derive(Debug)]
pub struct AcceptBackoff {
    /// The listener's name, for the log.
    name: String,
    /// When the last "out of resources" warning was logged.
    last_warn: Option<tokio::time::Instant>,
}

impl AcceptBackoff {
    /// The back-off of the listener `name`.
    pub fn new(name: impl Into<String>) -> AcceptBackoff {
        AcceptBackoff {
            name: name.into(),
            last_warn: None,
        }
    }

    /// Handles a failed accept; returns `false` if `stop` was cancelled during the pause.
    pub async fn failed(
        &mut self,
        e: &io::Error,
        stop: &tokio_util::sync::CancellationToken,
    ) -> bool {
        if !is_resource_exhaustion(e) {
            tracing::debug!(listener = %self.name, error = %e, "accept failed");
            return true;
        }
        let now = tokio::time::Instant::now();
        if self
            .last_warn
            .is_none_or(|t| now - t >= std::time::Duration::from_secs(1))
        {
            tracing::warn!(listener = %self.name, error = %e, "accept failed: out of resources, backing off");
            self.last_warn = Some(now);
        }
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(ACCEPT_BACKOFF) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listener named `web` of a config with one `protocol` listener (TLS-less).
    fn listener(protocol: &str, extra: &str) -> config::Listener {
        let text = format!(
            "listeners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: {protocol}\n    upstream: b\n{extra}upstreams:\n  b:\n    servers: [127.0.0.1:9]\n"
        );
        let cfg = config::Config::parse(std::path::Path::new("t.yaml"), &text).unwrap();
        cfg.listeners["web"].clone()
    }

    /// TCP_DEFER_ACCEPT as the kernel reports it (0 = off).
    fn defer_accept(l: &std::net::TcpListener) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // `v` and `len` outlive the call and describe an int, as the option is.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::getsockopt(
                l.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        v
    }

    #[test]
    fn defer_accept_is_on_for_http_and_off_for_tcp_unless_configured() {
        let http = bind(&listener("http", "")).unwrap();
        assert!(defer_accept(&http) > 0);
        let tcp = bind(&listener("tcp", "")).unwrap();
        assert_eq!(defer_accept(&tcp), 0);
        let off = bind(&listener("http", "    defer_accept: false\n")).unwrap();
        assert_eq!(defer_accept(&off), 0);
        let on = bind(&listener("tcp", "    defer_accept: true\n")).unwrap();
        assert!(defer_accept(&on) > 0);
    }

    #[test]
    fn quick_acks_are_off_where_clients_get_answers() {
        let quick = |l: &std::net::TcpListener| rustix::net::sockopt::tcp_quickack(l).unwrap();
        assert!(!quick(&bind(&listener("http", "")).unwrap()));
        assert!(quick(&bind(&listener("tcp", "")).unwrap()));
    }

    #[test]
    fn adopting_a_socket_applies_the_new_config() {
        let l = bind(&listener("http", "")).unwrap();
        let fd = OwnedFd::from(l);
        let l = adopt_for(fd, &listener("http", "    defer_accept: false\n")).unwrap();
        assert_eq!(defer_accept(&l), 0);
    }
}
