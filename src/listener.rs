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
