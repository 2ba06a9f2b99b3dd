//! The server handshake, driven by baton rather than by a rustls stream type, so that rustls
//! is fed **whole records only**: each record's 5-byte header is read, then the whole record
//! is waited for and given to `read_tls`. When the handshake ends, any ciphertext the client
//! sent after its Finished is still in [`Handshaken::rx`] (baton's buffer), not inside rustls:
//! the record layer that continues the session starts at a record boundary (docs/tls.md).
//!
//! A client that does not start with a TLS handshake record is refused here: plain HTTP on
//! an HTTPS listener gets nginx's `400 The plain HTTP request was sent to HTTPS port`.

use super::record::{client_random, ClientRandom, KeyLogCapture};
use super::TlsServer;
use crate::registry::TlsFacts;
use bytes::{Buf, BytesMut};
use rustls::{ServerConfig, ServerConnection};
use std::io;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Record header: content type, version (2), length (2).
pub const HEADER_LEN: usize = 5;
/// Largest record ciphertext a peer may send (RFC 8446 §5.2: 2^14 + 256; RFC 5246 allows
/// 2^14 + 2048 for TLS 1.2).
pub const MAX_CIPHERTEXT: usize = 16384 + 2048;
/// Content type of handshake records.
const HANDSHAKE: u8 = 22;

/// A connection whose handshake is complete and whose handshake output is written (session
/// tickets included): the hand-over point to the post-handshake stream
/// ([`crate::tls::post_handshake`]).
pub struct Handshaken {
    /// The client socket.
    pub tcp: TcpStream,
    /// rustls's state, holding no unread ciphertext and no unwritten output.
    pub conn: ServerConnection,
    /// Ciphertext read after the handshake's last record, not yet given to rustls.
    pub rx: BytesMut,
    /// What the handshake agreed on.
    pub facts: TlsFacts,
    /// The ClientHello's random: the key of this connection's secrets in `keylog`.
    pub random: Option<ClientRandom>,
    /// The listener's key log, holding this connection's traffic secrets.
    pub keylog: Arc<KeyLogCapture>,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The first bytes were not a TLS handshake but look like a plain HTTP request.
    #[error("plain HTTP request on a TLS port")]
    PlainHttp,
    /// The first bytes were not a TLS handshake record.
    #[error("not a TLS client (first byte {0:#04x})")]
    NotTls(u8),
    /// A record longer than TLS allows.
    #[error("record of {0} bytes is longer than TLS allows")]
    Oversized(usize),
    /// rustls refused the client's handshake (the alert was sent).
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    /// The client closed before the handshake ended.
    #[error("client closed during the handshake")]
    Closed,
    /// A socket error.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

impl HandshakeError {
    /// The log's `reason` word for it.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::PlainHttp => "plain http on tls port",
            HandshakeError::NotTls(_) => "not tls",
            HandshakeError::Oversized(_) | HandshakeError::Tls(_) => "tls handshake failed",
            HandshakeError::Closed => "client closed",
            HandshakeError::Io(_) => "socket error",
        }
    }
}

/// nginx's answer to plain HTTP on an HTTPS port (its wording, so operators recognise it).
pub const PLAIN_HTTP_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 47\r\nconnection: close\r\n\r\nThe plain HTTP request was sent to HTTPS port\r\n";

/// Runs the server side of a handshake on `tcp` (no timeout here: the caller bounds it).
/// `http` says the listener speaks HTTP, so a plain HTTP request gets [`PLAIN_HTTP_400`].
pub async fn accept(
    tcp: TcpStream,
    tls: &TlsServer,
    http: bool,
) -> Result<Handshaken, HandshakeError> {
    let mut random = None;
    let r = drive(tcp, &tls.config, http, &mut random).await;
    match r {
        Ok((tcp, conn, rx)) => Ok(Handshaken {
            facts: facts_of(&conn),
            tcp,
            conn,
            rx,
            random,
            keylog: tls.keylog.clone(),
        }),
        Err(e) => {
            if let Some(r) = &random {
                tls.keylog.forget(r);
            }
            Err(e)
        }
    }
}

/// The handshake itself; `random` is set as soon as the ClientHello's is known.
async fn drive(
    mut tcp: TcpStream,
    cfg: &Arc<ServerConfig>,
    http: bool,
    random: &mut Option<ClientRandom>,
) -> Result<(TcpStream, ServerConnection, BytesMut), HandshakeError> {
    let mut conn = ServerConnection::new(cfg.clone())?;
    let mut rx = BytesMut::with_capacity(2048);
    let mut first = true;
    // The first handshake records, until the ClientHello's random can be read from them.
    let mut hello = Vec::new();
    loop {
        while conn.wants_write() {
            write_out(&mut conn, &tcp).await?;
        }
        if !conn.is_handshaking() {
            break;
        }
        if first && !rx.is_empty() && rx[0] != HANDSHAKE {
            let looks_http = rx[0].is_ascii_uppercase();
            if looks_http && http {
                // Best effort and bounded by the caller's timeout: the client is not ours.
                let _ = tcp.write_all(PLAIN_HTTP_400).await;
                let _ = tcp.shutdown().await;
            }
            return Err(if looks_http {
                HandshakeError::PlainHttp
            } else {
                HandshakeError::NotTls(rx[0])
            });
        }
        if let Some(len) = whole_record(&rx)? {
            first = false;
            if random.is_none() {
                hello.extend_from_slice(&rx[..len]);
                *random = client_random(&hello);
            }
            let mut rec = &rx[..len];
            while !rec.is_empty() {
                conn.read_tls(&mut rec)?;
            }
            rx.advance(len);
            if let Err(e) = conn.process_new_packets() {
                // rustls queued an alert: tell the client why, then give up.
                let _ = write_out(&mut conn, &tcp).await;
                return Err(e.into());
            }
            continue;
        }
        tcp.readable().await?;
        rx.reserve(4096);
        match tcp.try_read_buf(&mut rx) {
            Ok(0) => return Err(HandshakeError::Closed),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((tcp, conn, rx))
}

/// The length (header included) of the record at the front of `rx`, once all of it is there.
pub(crate) fn whole_record(rx: &[u8]) -> Result<Option<usize>, HandshakeError> {
    if rx.len() < HEADER_LEN {
        return Ok(None);
    }
    let body = usize::from(u16::from_be_bytes([rx[3], rx[4]]));
    if body > MAX_CIPHERTEXT {
        return Err(HandshakeError::Oversized(body));
    }
    let len = HEADER_LEN + body;
    Ok((rx.len() >= len).then_some(len))
}

/// Writes what rustls has to send, waiting for the socket as needed.
async fn write_out(conn: &mut ServerConnection, tcp: &TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        tcp.writable().await?;
        match conn.write_tls(&mut TcpWriter(tcp)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A tokio socket as a non-blocking `std::io::Write` for `write_tls` (WouldBlock clears the
/// socket's readiness, so the next wait really waits).
pub struct TcpWriter<'a>(pub &'a TcpStream);

impl io::Write for TcpWriter<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.try_write(b)
    }
    fn write_vectored(&mut self, b: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The agreed version, suite, SNI and ALPN.
pub fn facts_of(conn: &ServerConnection) -> TlsFacts {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => "-".to_string(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| {
            let s = s.suite();
            s.as_str().map_or_else(|| format!("{s:?}"), str::to_string)
        })
        .unwrap_or_else(|| "-".to_string());
    TlsFacts {
        version,
        cipher,
        sni: conn.server_name().map(str::to_string),
        alpn: conn
            .alpn_protocol()
            .map(|a| String::from_utf8_lossy(a).into_owned()),
        resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_are_taken_whole() {
        assert_eq!(whole_record(&[22, 3, 1]).unwrap(), None);
        assert_eq!(whole_record(&[22, 3, 1, 0, 2, 9]).unwrap(), None);
        assert_eq!(whole_record(&[22, 3, 1, 0, 2, 9, 9, 1]).unwrap(), Some(7));
        assert!(whole_record(&[22, 3, 1, 0xff, 0xff]).is_err());
    }
}
