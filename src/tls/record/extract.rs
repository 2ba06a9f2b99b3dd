//! Taking a session over from rustls once its handshake is done: the keys and sequence
//! numbers from `dangerous_extract_secrets`, the TLS 1.3 traffic secrets from the
//! [`KeyLogCapture`], checked against each other.

use super::keylog::{ClientRandom, KeyLogCapture};
use super::keys::{Aead, DirState, Secret};
use super::{RecordError, Session, Version};
use rustls::{Connection, ConnectionTrafficSecrets};
use std::io::Read;

/// KeyUpdates rustls may have applied before the take-over that we follow to find the current
/// secret. The handshake driver hands over as soon as the handshake completes, so in practice
/// this is 0; a bound keeps a mismatch from costing more than a few HKDF calls.
const MAX_ADVANCE: u32 = 8;

impl Session {
    /// Takes over a connection whose handshake is complete and whose output is flushed
    /// (`enable_secret_extraction` must be on in its config): a server connection (a client
    /// of a TLS listener) or a client connection (baton to a TLS upstream; the session then
    /// accepts the server's NewSessionTickets, and drops them). `random` is its ClientHello's
    /// random ([`super::client_random`]); TLS 1.3 needs the traffic secrets `keylog` captured
    /// for it (they are removed from `keylog` whatever the outcome). Returns the session and
    /// any plaintext rustls had already decrypted, which comes before anything
    /// [`Session::open`] yields.
    pub fn from_rustls(
        conn: impl Into<Connection>,
        random: &ClientRandom,
        keylog: &KeyLogCapture,
    ) -> Result<(Session, Vec<u8>), RecordError> {
        let mut conn: Connection = conn.into();
        let client = matches!(conn, Connection::Client(_));
        let captured = keylog.take(random);
        if conn.is_handshaking() {
            return Err(RecordError::HandshakeIncomplete);
        }
        if conn.wants_write() {
            return Err(RecordError::NotFlushed);
        }
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => Version::Tls13,
            Some(rustls::ProtocolVersion::TLSv1_2) => Version::Tls12,
            _ => return Err(RecordError::Unsupported("protocol version")),
        };
        let plaintext = drain_plaintext(&mut conn)?;
        let secrets = conn.dangerous_extract_secrets()?;
        let (rx_seq, rx) = secrets.rx;
        let (tx_seq, tx) = secrets.tx;
        let (aead, rx_key, rx_iv) = parts(&rx)?;
        let (tx_aead, tx_key, tx_iv) = parts(&tx)?;
        if aead != tx_aead {
            return Err(RecordError::Unsupported("different suites per direction"));
        }
        let (rx, tx) = match version {
            Version::Tls13 => {
                let s = captured.ok_or(RecordError::NoSecret)?;
                // Direction-aware: what we open is the peer's secret, what we seal ours.
                let (peer, ours) = if client {
                    (s.server, s.client)
                } else {
                    (s.client, s.server)
                };
                (
                    find_secret(aead, peer, rx_key, rx_iv, rx_seq)?,
                    find_secret(aead, ours, tx_key, tx_iv, tx_seq)?,
                )
            }
            Version::Tls12 => (
                keys_only(rx_key, rx_iv, rx_seq),
                keys_only(tx_key, tx_iv, tx_seq),
            ),
        };
        let mut session = Session::new(version, aead, rx, tx)?;
        if client {
            session.set_client();
        }
        Ok((session, plaintext))
    }
}

/// Reads out what rustls decrypted but nobody read yet (the peer's data after its Finished).
fn drain_plaintext(conn: &mut Connection) -> Result<Vec<u8>, RecordError> {
    let mut plaintext = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.reader().read(&mut buf) {
            Ok(0) => return Ok(plaintext),
            Ok(n) => plaintext.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(plaintext),
            Err(e) => return Err(e.into()),
        }
    }
}

fn parts(s: &ConnectionTrafficSecrets) -> Result<(Aead, &[u8], &[u8]), RecordError> {
    Ok(match s {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            (Aead::Aes128Gcm, key.as_ref(), iv.as_ref())
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            (Aead::Aes256Gcm, key.as_ref(), iv.as_ref())
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (Aead::Chacha20Poly1305, key.as_ref(), iv.as_ref())
        }
        _ => return Err(RecordError::Unsupported("cipher suite")),
    })
}

fn keys_only(key: &[u8], iv: &[u8], seq: u64) -> DirState {
    DirState {
        secret: Secret::new(Vec::new()),
        key: Secret::from_slice(key),
        iv: Secret::from_slice(iv),
        seq,
        generation: 0,
    }
}

/// The direction whose secret — the captured one, or one of its next [`MAX_ADVANCE`] — gives
/// exactly the key and IV rustls is using.
fn find_secret(
    aead: Aead,
    secret: Secret,
    key: &[u8],
    iv: &[u8],
    seq: u64,
) -> Result<DirState, RecordError> {
    let mut dir = DirState::from_secret(aead, secret, seq)?;
    for _ in 0..=MAX_ADVANCE {
        if dir.key.bytes() == key && dir.iv.bytes() == iv {
            dir.seq = seq;
            return Ok(dir);
        }
        dir.advance(aead)?;
    }
    Err(RecordError::SecretMismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::record::keys::traffic_keys;

    #[test]
    fn find_secret_follows_key_updates_rustls_already_did() {
        let s0 = Secret::new(vec![9; 32]);
        let mut two = DirState::from_secret(Aead::Aes128Gcm, s0.clone(), 0).expect("derive");
        two.advance(Aead::Aes128Gcm).expect("advance");
        two.advance(Aead::Aes128Gcm).expect("advance");
        let found = find_secret(
            Aead::Aes128Gcm,
            s0.clone(),
            two.key.bytes(),
            two.iv.bytes(),
            5,
        )
        .expect("two updates ahead");
        assert_eq!(found.generation, 2);
        assert_eq!(found.seq, 5);
        assert_eq!(found.secret, two.secret);

        let (other_key, iv) = traffic_keys(Aead::Aes128Gcm, &[8; 32]).expect("derive");
        let err = find_secret(Aead::Aes128Gcm, s0, other_key.bytes(), iv.bytes(), 0);
        assert!(matches!(err, Err(RecordError::SecretMismatch)));
    }
}
