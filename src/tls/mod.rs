//! TLS: termination with rustls, and the sessions that outlive a process. A connection's
//! handshake runs in rustls; what follows the handshake is plain data ([`record`]) that moves
//! to the successor with the socket, as a TCP tunnel's buffers do.
//!
//! Files: `server_config` (a listener's rustls config), `sni` (certificate by server name),
//! `handshake` (the driver that feeds rustls whole records), `rustls_stream` (application
//! data on rustls until the record layer serves it), `tickets` (session-ticket keys that
//! move to the successor), `record` (the record layer).
//! Certificates are read and checked by `config::tls`, so `check` and `run` agree.
pub mod handshake;
pub mod record;
pub mod rustls_stream;
pub mod server_config;
pub mod sni;
pub mod tickets;

pub use handshake::{HandshakeError, Handshaken};
pub use server_config::{server_config, ServerConfigError, TlsServer};

/// The stream a connection runs on after its handshake. Built from a [`Handshaken`] in one
/// place, `proxy::client_io::ClientIo::from_handshake`; the record layer's stream replaces
/// this one there.
pub type PostHandshake = rustls_stream::RustlsStream;
