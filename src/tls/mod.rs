//! TLS: termination with rustls, and the sessions that outlive a process. A connection's
//! handshake runs in rustls; what follows the handshake is plain data ([`record`]) that moves
//! to the successor with the socket, as a TCP tunnel's buffers do.
pub mod record;
