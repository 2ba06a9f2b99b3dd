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
    Ok(socket.into())
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

/// Registers a std listener with the current tokio runtime.
pub fn to_tokio(l: std::net::TcpListener) -> io::Result<TcpListener> {
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
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
