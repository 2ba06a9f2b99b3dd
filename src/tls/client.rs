//! The client side of a handshake: baton to an upstream server (`upstreams.X.tls`). Driven
//! like the server side (`handshake`): rustls is fed whole records only, so when the
//! handshake ends any record the server sent after its Finished (its NewSessionTickets, early
//! application data) is still in baton's buffer, and the session continues on baton's record
//! layer ([`TlsStream`]) at a record boundary. From there an upstream TLS connection is plain
//! data like a client one, and moves across an upgrade the same way.

use super::client_config::TlsClient;
use super::handshake::{whole_record, HandshakeError};
use super::record::{client_random, RecordError, Session, TlsStream};
use bytes::{Buf, BytesMut};
use rustls::pki_types::ServerName;
use rustls::ClientConnection;
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Content types a server's first record may have: handshake, or an alert.
const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;

/// Why a handshake with an upstream server failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    /// rustls refused the server (its certificate, its versions or suites); the alert is sent.
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    /// The server does not answer with TLS (a plain server on a port configured with tls).
    #[error("the server does not speak tls (first byte {0:#04x})")]
    NotTls(u8),
    /// A record longer than TLS allows.
    #[error("record of {0} bytes is longer than tls allows")]
    Oversized(usize),
    /// The server closed before the handshake ended.
    #[error("server closed during the tls handshake")]
    Closed,
    /// A socket error.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// The upstream's TLS settings could not be turned into a rustls config.
    #[error("tls to this upstream is not set up: {0}")]
    NotSetUp(String),
    /// The session could not leave rustls for the record layer.
    #[error("tls session not taken over: {0}")]
    TakeOver(#[from] RecordError),
}

impl From<HandshakeError> for UpstreamTlsError {
    fn from(e: HandshakeError) -> Self {
        // `whole_record` only ever says Oversized; the rest cannot come from it.
        match e {
            HandshakeError::Oversized(n) => UpstreamTlsError::Oversized(n),
            e => UpstreamTlsError::Io(io::Error::other(e.to_string())),
        }
    }
}

/// Shakes hands with the server on `tcp` as `name` and returns the session on baton's record
/// layer (no timeout here: the caller bounds it).
pub async fn connect(
    tcp: TcpStream,
    tls: &TlsClient,
    name: ServerName<'static>,
) -> Result<TlsStream, UpstreamTlsError> {
    let mut random = None;
    let (tcp, conn, rx) = match drive(tcp, tls, name, &mut random).await {
        Ok(done) => done,
        Err(e) => {
            if let Some(r) = &random {
                tls.keylog.forget(r);
            }
            return Err(e);
        }
    };
    let random = random.ok_or(RecordError::NoSecret)?;
    let (session, plain) = Session::from_rustls(conn, &random, &tls.keylog)?;
    Ok(TlsStream::new(tcp, session, plain, rx.to_vec()))
}

/// The handshake itself; `random` is set from the ClientHello as it is written.
async fn drive(
    mut tcp: TcpStream,
    tls: &TlsClient,
    name: ServerName<'static>,
    random: &mut Option<super::record::ClientRandom>,
) -> Result<(TcpStream, ClientConnection, BytesMut), UpstreamTlsError> {
    let mut conn = ClientConnection::new(tls.config.clone(), name)?;
    let mut rx = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(1024);
    let mut first = true;
    loop {
        if conn.wants_write() {
            write_out(&mut conn, &mut tcp, &mut out).await?;
            if random.is_none() {
                // The first flight is the ClientHello: the key log's key for this connection.
                *random = client_random(&out);
            }
        }
        if !conn.is_handshaking() {
            break;
        }
        if first && !rx.is_empty() && rx[0] != HANDSHAKE && rx[0] != ALERT {
            return Err(UpstreamTlsError::NotTls(rx[0]));
        }
        if let Some(len) = whole_record(&rx)? {
            first = false;
            let mut rec = &rx[..len];
            while !rec.is_empty() {
                conn.read_tls(&mut rec)?;
            }
            rx.advance(len);
            if let Err(e) = conn.process_new_packets() {
                // rustls queued an alert: tell the server why, then give up.
                let _ = write_out(&mut conn, &mut tcp, &mut out).await;
                return Err(e.into());
            }
            continue;
        }
        rx.reserve(4096);
        if tcp.read_buf(&mut rx).await? == 0 {
            return Err(UpstreamTlsError::Closed);
        }
    }
    Ok((tcp, conn, rx))
}

/// Writes what rustls has to send (collected in `out` first, so the ClientHello's bytes can
/// be read for its random).
async fn write_out(
    conn: &mut ClientConnection,
    tcp: &mut TcpStream,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    out.clear();
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    tcp.write_all(out).await
}
