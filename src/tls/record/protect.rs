//! One record's protection, for TLS 1.3 (RFC 8446 §5.2) and TLS 1.2's AEAD suites (RFC 5246
//! §6.2.3.3, RFC 5288 for GCM's explicit nonce, RFC 7905 for ChaCha20-Poly1305): the header,
//! the nonce, the additional data, the inner content type and padding. Only framing: the AEAD
//! itself is ring's.

use super::keys::{DirState, NONCE_LEN, TAG_LEN};
use super::{RecordError, Version};
use bytes::{BufMut, BytesMut};
use ring::aead::{Aad, LessSafeKey, Nonce};

/// Length of a record header.
pub const HEADER_LEN: usize = 5;
/// Largest plaintext fragment (2^14).
pub const MAX_FRAGMENT: usize = 1 << 14;
/// Largest protected record body TLS 1.3 allows (2^14 + 256); TLS 1.2 allows 2^14 + 2048,
/// which we also accept from a TLS 1.2 peer.
pub const MAX_CIPHERTEXT_13: usize = MAX_FRAGMENT + 256;
/// Largest protected record body TLS 1.2 allows.
pub const MAX_CIPHERTEXT_12: usize = MAX_FRAGMENT + 2048;
/// The explicit nonce part TLS 1.2 AES-GCM carries in each record.
const GCM_EXPLICIT: usize = 8;

/// Record content types.
pub mod content {
    /// alert.
    pub const ALERT: u8 = 21;
    /// handshake.
    pub const HANDSHAKE: u8 = 22;
    /// application_data.
    pub const DATA: u8 = 23;
}

/// The legacy record version every record carries (TLS 1.2's, also used by TLS 1.3).
const RECORD_VERSION: [u8; 2] = [3, 3];

/// One direction with its ring key: what protects or opens records.
pub struct Direction {
    /// The plain-data state (moves with a handover).
    pub state: DirState,
    /// ring's key for `state.key`, rebuilt whenever the key changes.
    pub aead: LessSafeKey,
}

/// An opened record: its content type and where its content lies in the record buffer.
pub struct Plain {
    /// The (inner, for TLS 1.3) content type.
    pub typ: u8,
    /// Content range within the record buffer passed to [`open`].
    pub range: std::ops::Range<usize>,
}

/// Length of the record at the front of `buf`, header included, once all of it is there;
/// `None` while it is incomplete. An over-long length is an error at once, so a peer cannot
/// make us buffer more than one maximal record.
pub fn complete(version: Version, buf: &[u8]) -> Result<Option<usize>, RecordError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    let max = match version {
        Version::Tls13 => MAX_CIPHERTEXT_13,
        Version::Tls12 => MAX_CIPHERTEXT_12,
    };
    if len > max {
        return Err(RecordError::Overflow(len));
    }
    Ok((buf.len() >= HEADER_LEN + len).then_some(HEADER_LEN + len))
}

fn next_seq(dir: &mut Direction) -> Result<u64, RecordError> {
    let seq = dir.state.seq;
    dir.state.seq = seq.checked_add(1).ok_or(RecordError::SequenceExhausted)?;
    Ok(seq)
}

/// TLS 1.2's additional data: seq ‖ type ‖ version ‖ plaintext length.
fn aad12(seq: u64, typ: u8, version: [u8; 2], len: usize) -> Result<[u8; 13], RecordError> {
    let len = u16::try_from(len).map_err(|_| RecordError::Overflow(len))?;
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9..11].copy_from_slice(&version);
    aad[11..].copy_from_slice(&len.to_be_bytes());
    Ok(aad)
}

/// Decrypts the whole record in `rec` (header included) in place.
pub fn open(
    version: Version,
    gcm12: bool,
    dir: &mut Direction,
    rec: &mut [u8],
) -> Result<Plain, RecordError> {
    if rec.len() < HEADER_LEN {
        return Err(RecordError::Malformed("record header"));
    }
    let (hdr, body) = rec.split_at_mut(HEADER_LEN);
    let hdr: [u8; HEADER_LEN] = [hdr[0], hdr[1], hdr[2], hdr[3], hdr[4]];
    match version {
        Version::Tls13 => open13(dir, hdr, body),
        Version::Tls12 => open12(gcm12, dir, hdr, body),
    }
}

fn open13(
    dir: &mut Direction,
    hdr: [u8; HEADER_LEN],
    body: &mut [u8],
) -> Result<Plain, RecordError> {
    // Everything after the handshake is application_data on the outside (a
    // change_cipher_spec is only tolerated before the peer's Finished: rustls's part).
    if hdr[0] != content::DATA {
        return Err(RecordError::UnexpectedType(hdr[0]));
    }
    if body.len() < TAG_LEN + 1 {
        return Err(RecordError::BadRecordMac);
    }
    let nonce = Nonce::assume_unique_for_key(dir.state.nonce());
    let plain = dir
        .aead
        .open_in_place(nonce, Aad::from(hdr), body)
        .map_err(|_| RecordError::BadRecordMac)?;
    // Only a record that authenticated consumes a sequence number.
    next_seq(dir)?;
    // The inner plaintext is content ‖ type ‖ zero padding: the type is the last non-zero byte.
    let Some(typ_at) = plain.iter().rposition(|&b| b != 0) else {
        return Err(RecordError::NoContentType);
    };
    if typ_at > MAX_FRAGMENT {
        return Err(RecordError::Overflow(typ_at));
    }
    Ok(Plain {
        typ: plain[typ_at],
        range: HEADER_LEN..HEADER_LEN + typ_at,
    })
}

fn open12(
    gcm: bool,
    dir: &mut Direction,
    hdr: [u8; HEADER_LEN],
    body: &mut [u8],
) -> Result<Plain, RecordError> {
    let typ = hdr[0];
    if !matches!(typ, content::DATA | content::ALERT | content::HANDSHAKE) {
        return Err(RecordError::UnexpectedType(typ));
    }
    let explicit = if gcm { GCM_EXPLICIT } else { 0 };
    if body.len() < explicit + TAG_LEN {
        return Err(RecordError::BadRecordMac);
    }
    let plain_len = body.len() - explicit - TAG_LEN;
    if plain_len > MAX_FRAGMENT {
        return Err(RecordError::Overflow(plain_len));
    }
    let nonce = if gcm {
        // The salt from the key block, then the nonce the sender chose for this record.
        let mut n = [0u8; NONCE_LEN];
        n[..4].copy_from_slice(&dir.state.iv.bytes()[..4]);
        n[4..].copy_from_slice(&body[..GCM_EXPLICIT]);
        n
    } else {
        dir.state.nonce()
    };
    let aad = aad12(dir.state.seq, typ, [hdr[1], hdr[2]], plain_len)?;
    dir.aead
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut body[explicit..],
        )
        .map_err(|_| RecordError::BadRecordMac)?;
    next_seq(dir)?;
    let start = HEADER_LEN + explicit;
    Ok(Plain {
        typ,
        range: start..start + plain_len,
    })
}

/// Appends one protected record of `typ` carrying `content` (at most [`MAX_FRAGMENT`] bytes).
pub fn seal(
    version: Version,
    gcm12: bool,
    dir: &mut Direction,
    typ: u8,
    content: &[u8],
    out: &mut BytesMut,
) -> Result<(), RecordError> {
    debug_assert!(content.len() <= MAX_FRAGMENT);
    let seq = dir.state.seq;
    if seq == u64::MAX {
        return Err(RecordError::SequenceExhausted);
    }
    let nonce = dir.state.nonce();
    match version {
        Version::Tls13 => {
            let body_len = content.len() + 1 + TAG_LEN;
            let hdr = header(content::DATA, body_len)?;
            out.reserve(HEADER_LEN + body_len);
            out.put_slice(&hdr);
            let start = out.len();
            out.put_slice(content);
            out.put_u8(typ);
            let tag = dir
                .aead
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(hdr),
                    &mut out[start..],
                )
                .map_err(|_| RecordError::SealFailed)?;
            out.put_slice(tag.as_ref());
        }
        Version::Tls12 => {
            let explicit = if gcm12 { GCM_EXPLICIT } else { 0 };
            let body_len = explicit + content.len() + TAG_LEN;
            let hdr = header(typ, body_len)?;
            let aad = aad12(seq, typ, RECORD_VERSION, content.len())?;
            out.reserve(HEADER_LEN + body_len);
            out.put_slice(&hdr);
            if gcm12 {
                // rustls's construction: the explicit nonce is the low 8 bytes of IV ⊕ seq,
                // unique per record because the sequence number is.
                out.put_slice(&nonce[4..]);
            }
            let start = out.len();
            out.put_slice(content);
            let tag = dir
                .aead
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    &mut out[start..],
                )
                .map_err(|_| RecordError::SealFailed)?;
            out.put_slice(tag.as_ref());
        }
    }
    dir.state.seq = seq + 1;
    Ok(())
}

fn header(typ: u8, body_len: usize) -> Result<[u8; HEADER_LEN], RecordError> {
    let len = u16::try_from(body_len).map_err(|_| RecordError::Overflow(body_len))?;
    let [hi, lo] = len.to_be_bytes();
    Ok([typ, RECORD_VERSION[0], RECORD_VERSION[1], hi, lo])
}
