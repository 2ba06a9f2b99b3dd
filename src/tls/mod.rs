//! TLS: termination with rustls, and the sessions that outlive a process. A connection's
//! handshake runs in rustls; what follows the handshake is plain data ([`record`]) that moves
//! to the successor with the socket, as a TCP tunnel's buffers do.
//!
//! Files: `server_config` (a listener's rustls config), `sni` (certificate by server name),
//! `handshake` (the driver that feeds rustls whole records), `tickets` (session-ticket keys
//! that move to the successor), `record` (the record layer that serves every session after its
//! handshake, in this process and its successors); for upstream TLS (`upstreams.X.tls`),
//! `client_config` (an upstream's rustls config) and `client` (the client-side handshake,
//! whose session continues on the same record layer).
//! Certificates are read and checked by `config::tls`, so `check` and `run` agree.
pub mod client;
pub mod client_config;
pub mod handshake;
pub mod record;
pub mod server_config;
pub mod sni;
pub mod tickets;

pub use client::UpstreamTlsError;
pub use client_config::{client_config, ClientConfigError, TlsClient};
pub use handshake::{HandshakeError, Handshaken};
pub use server_config::{server_config, ServerConfigError, TlsServer};

/// The stream a connection runs on after its handshake: baton's record layer on the socket.
/// Built from a [`Handshaken`] in one place, `proxy::client_io::ClientIo::from_handshake`.
pub type PostHandshake = record::TlsStream;
