//! What can go wrong in the record layer: a peer's bad record, an alert, a session that cannot
//! be taken over. Every failure is a value; nothing a peer sends makes the layer panic.

use std::fmt;

/// A TLS alert description (RFC 8446 §6), printed by name where we know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertDescription(pub u8);

impl AlertDescription {
    /// close_notify.
    pub const CLOSE_NOTIFY: AlertDescription = AlertDescription(0);
    /// unexpected_message.
    pub const UNEXPECTED_MESSAGE: AlertDescription = AlertDescription(10);
    /// bad_record_mac.
    pub const BAD_RECORD_MAC: AlertDescription = AlertDescription(20);
    /// record_overflow.
    pub const RECORD_OVERFLOW: AlertDescription = AlertDescription(22);
    /// decode_error.
    pub const DECODE_ERROR: AlertDescription = AlertDescription(50);
    /// internal_error.
    pub const INTERNAL_ERROR: AlertDescription = AlertDescription(80);
    /// user_canceled.
    pub const USER_CANCELED: AlertDescription = AlertDescription(90);
    /// no_renegotiation.
    pub const NO_RENEGOTIATION: AlertDescription = AlertDescription(100);
}

impl fmt::Display for AlertDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            0 => "close_notify",
            10 => "unexpected_message",
            20 => "bad_record_mac",
            22 => "record_overflow",
            40 => "handshake_failure",
            42 => "bad_certificate",
            47 => "illegal_parameter",
            48 => "unknown_ca",
            50 => "decode_error",
            51 => "decrypt_error",
            70 => "protocol_version",
            80 => "internal_error",
            86 => "inappropriate_fallback",
            90 => "user_canceled",
            100 => "no_renegotiation",
            109 => "missing_extension",
            110 => "unsupported_extension",
            _ => return write!(f, "alert {}", self.0),
        };
        f.write_str(name)
    }
}

/// A record-layer failure. Those a peer causes map to the alert we would send
/// ([`RecordError::alert`]); all of them end the session.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A record longer than the protocol allows.
    #[error("record too long: {0} bytes")]
    Overflow(usize),
    /// A record of a content type not allowed after the handshake.
    #[error("unexpected record of content type {0}")]
    UnexpectedType(u8),
    /// A record failed authentication (wrong key, tampered, truncated, or reordered).
    #[error("record failed authentication")]
    BadRecordMac,
    /// A TLS 1.3 record whose plaintext is only padding.
    #[error("record without a content type")]
    NoContentType,
    /// A post-handshake handshake message the record layer does not take (anything but
    /// KeyUpdate in TLS 1.3; renegotiation in TLS 1.2, refused as nginx and rustls do).
    #[error("unexpected handshake message of type {0} after the handshake")]
    UnexpectedHandshake(u8),
    /// A malformed control message.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The peer sent a fatal alert.
    #[error("peer sent alert {0}")]
    Alert(AlertDescription),
    /// A 64-bit sequence number would wrap.
    #[error("record sequence number exhausted")]
    SequenceExhausted,
    /// A TLS 1.2 key reached its record limit; TLS 1.2 cannot re-key, so the session ends.
    #[error("TLS 1.2 record limit reached")]
    LimitReached,
    /// ring refused to seal (only for inputs far longer than a record: a bug if ever seen).
    #[error("the AEAD refused to seal a record")]
    SealFailed,
    /// Data to send after our close_notify.
    #[error("session already closed for writing")]
    Closed,
    /// A key or IV of the wrong length (a corrupt parked session).
    #[error("key material of the wrong length")]
    BadKey,
    /// Taking over from rustls: the handshake has not finished.
    #[error("the handshake is not complete")]
    HandshakeIncomplete,
    /// Taking over from rustls: it still has bytes to write.
    #[error("rustls still has bytes to write")]
    NotFlushed,
    /// Taking over from rustls: a version or suite the record layer does not continue.
    #[error("unsupported by the record layer: {0}")]
    Unsupported(&'static str),
    /// Taking over from rustls: the key log holds no secret for this connection.
    #[error("no traffic secret captured for this connection")]
    NoSecret,
    /// Taking over from rustls: no captured secret (nor any of its next few) gives the key
    /// rustls extracted.
    #[error("the captured traffic secret does not match the extracted key")]
    SecretMismatch,
    /// rustls refused to give up the session.
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// Reading the plaintext rustls held.
    #[error("reading rustls plaintext: {0}")]
    Io(#[from] std::io::Error),
}

impl RecordError {
    /// The alert to send the peer for this failure, if it is one the peer caused.
    pub fn alert(&self) -> Option<AlertDescription> {
        Some(match self {
            RecordError::Overflow(_) => AlertDescription::RECORD_OVERFLOW,
            RecordError::UnexpectedType(_) | RecordError::NoContentType => {
                AlertDescription::UNEXPECTED_MESSAGE
            }
            RecordError::UnexpectedHandshake(_) => AlertDescription::UNEXPECTED_MESSAGE,
            RecordError::BadRecordMac => AlertDescription::BAD_RECORD_MAC,
            RecordError::Malformed(_) => AlertDescription::DECODE_ERROR,
            _ => return None,
        })
    }
}
