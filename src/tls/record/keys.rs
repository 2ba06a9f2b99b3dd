//! The key schedule after the handshake: secrets that zeroize themselves and redact themselves in
//! Debug, HKDF-Expand-Label (RFC 8446 §7.1) for the traffic keys and for KeyUpdate's
//! "traffic upd", and one direction's protection state. The primitives (HKDF, AEAD) are ring's.

use super::RecordError;
use ring::{aead, hkdf};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// Length of every TLS AEAD nonce (and of the per-direction IV).
pub const NONCE_LEN: usize = 12;
/// Length of the authentication tag of every supported AEAD.
pub const TAG_LEN: usize = 16;

/// Key material: zeroized when dropped, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Wraps bytes (they are moved, not copied).
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(Zeroizing::new(bytes))
    }

    /// Copies bytes from a slice the caller keeps (and should zeroize itself).
    pub fn from_slice(bytes: &[u8]) -> Secret {
        Secret::new(bytes.to_vec())
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// No bytes: the secret of a direction that has none (TLS 1.2 has no traffic secret).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        // Straight into the zeroizing wrapper: no second owned copy is left behind.
        Ok(Secret::new(Vec::<u8>::deserialize(d)?))
    }
}

/// The AEAD (and, for TLS 1.3, the hash) of a cipher suite the record layer continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aead {
    /// AES-128-GCM (TLS 1.3: with SHA-256).
    Aes128Gcm,
    /// AES-256-GCM (TLS 1.3: with SHA-384).
    Aes256Gcm,
    /// ChaCha20-Poly1305 (TLS 1.3: with SHA-256).
    Chacha20Poly1305,
}

impl Aead {
    fn ring(self) -> &'static aead::Algorithm {
        match self {
            Aead::Aes128Gcm => &aead::AES_128_GCM,
            Aead::Aes256Gcm => &aead::AES_256_GCM,
            Aead::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        self.ring().key_len()
    }

    /// The TLS 1.3 suite's HKDF hash.
    fn hkdf(self) -> hkdf::Algorithm {
        match self {
            Aead::Aes256Gcm => hkdf::HKDF_SHA384,
            Aead::Aes128Gcm | Aead::Chacha20Poly1305 => hkdf::HKDF_SHA256,
        }
    }

    /// Length of the TLS 1.3 suite's hash, hence of its traffic secrets.
    pub fn hash_len(self) -> usize {
        match self {
            Aead::Aes256Gcm => 48,
            Aead::Aes128Gcm | Aead::Chacha20Poly1305 => 32,
        }
    }

    /// Records one key may protect before it must be replaced. AES-GCM: RFC 8446 §5.5 allows
    /// 2^24.5 full-size records; we re-key at 2^23, as rustls does, to leave a margin.
    /// ChaCha20-Poly1305 has no practical limit below the 64-bit sequence number.
    pub fn confidentiality_limit(self) -> u64 {
        match self {
            Aead::Aes128Gcm | Aead::Aes256Gcm => 1 << 23,
            Aead::Chacha20Poly1305 => 1 << 62,
        }
    }

    /// A ring key for `key` (whose length must be [`Aead::key_len`]).
    pub fn key(self, key: &[u8]) -> Result<aead::LessSafeKey, RecordError> {
        let unbound = aead::UnboundKey::new(self.ring(), key).map_err(|_| RecordError::BadKey)?;
        Ok(aead::LessSafeKey::new(unbound))
    }
}

/// An output length for ring's HKDF-Expand.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label(secret, label, context, len) of RFC 8446 §7.1.
pub fn expand_label(
    alg: Aead,
    secret: &[u8],
    label: &[u8],
    context: &[u8],
    len: usize,
) -> Result<Secret, RecordError> {
    const PREFIX: &[u8] = b"tls13 ";
    // The lengths are at most 48 (hash) and a short constant label: they fit their u8/u16.
    let out_len = u16::try_from(len).map_err(|_| RecordError::BadKey)?;
    let label_len = u8::try_from(PREFIX.len() + label.len()).map_err(|_| RecordError::BadKey)?;
    let ctx_len = u8::try_from(context.len()).map_err(|_| RecordError::BadKey)?;
    let out_len = out_len.to_be_bytes();
    let info: [&[u8]; 6] = [&out_len, &[label_len], PREFIX, label, &[ctx_len], context];
    let prk = hkdf::Prk::new_less_safe(alg.hkdf(), secret);
    let okm = prk
        .expand(&info, Len(len))
        .map_err(|_| RecordError::BadKey)?;
    let mut out = Secret::new(vec![0; len]);
    okm.fill(&mut out.0).map_err(|_| RecordError::BadKey)?;
    Ok(out)
}

/// The traffic key and IV a TLS 1.3 traffic secret gives (RFC 8446 §7.3).
pub fn traffic_keys(alg: Aead, secret: &[u8]) -> Result<(Secret, Secret), RecordError> {
    let key = expand_label(alg, secret, b"key", b"", alg.key_len())?;
    let iv = expand_label(alg, secret, b"iv", b"", NONCE_LEN)?;
    Ok((key, iv))
}

/// The next traffic secret after a KeyUpdate (RFC 8446 §7.2).
pub fn next_secret(alg: Aead, secret: &[u8]) -> Result<Secret, RecordError> {
    expand_label(alg, secret, b"traffic upd", b"", alg.hash_len())
}

/// One direction's protection state, as plain data: what a handover moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirState {
    /// TLS 1.3: the current application traffic secret (secret 0 advanced by each
    /// KeyUpdate). Empty for TLS 1.2, which has no KeyUpdate.
    pub secret: Secret,
    /// The AEAD key.
    pub key: Secret,
    /// The 12-byte IV (TLS 1.2 AES-GCM: the 4-byte salt, then the 8-byte explicit-nonce
    /// start, as rustls derives it).
    pub iv: Secret,
    /// Sequence number of the next record under this key.
    pub seq: u64,
    /// KeyUpdates applied to this direction since secret 0.
    pub generation: u32,
}

impl DirState {
    /// The state for a fresh TLS 1.3 traffic secret.
    pub fn from_secret(alg: Aead, secret: Secret, seq: u64) -> Result<DirState, RecordError> {
        let (key, iv) = traffic_keys(alg, secret.bytes())?;
        Ok(DirState {
            secret,
            key,
            iv,
            seq,
            generation: 0,
        })
    }

    /// Applies a KeyUpdate: the next secret, its keys, sequence number 0.
    pub fn advance(&mut self, alg: Aead) -> Result<(), RecordError> {
        let secret = next_secret(alg, self.secret.bytes())?;
        let (key, iv) = traffic_keys(alg, secret.bytes())?;
        self.secret = secret;
        self.key = key;
        self.iv = iv;
        self.seq = 0;
        self.generation = self.generation.saturating_add(1);
        Ok(())
    }

    /// The nonce for the record with sequence number `seq`: the IV xor the left-padded
    /// sequence number (RFC 8446 §5.3; also TLS 1.2 ChaCha20 and rustls's TLS 1.2 GCM).
    pub fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(self.iv.bytes());
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    /// Checks the lengths a deserialized state must have.
    pub fn check(&self, alg: Aead) -> Result<(), RecordError> {
        if self.key.bytes().len() != alg.key_len() || self.iv.bytes().len() != NONCE_LEN {
            return Err(RecordError::BadKey);
        }
        if !self.secret.is_empty() && self.secret.bytes().len() != alg.hash_len() {
            return Err(RecordError::BadKey);
        }
        Ok(())
    }
}
