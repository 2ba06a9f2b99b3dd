//! Tests of the record layer: RFC 8448's vectors, rustls itself as the peer, and hostile input.

mod garbage;
mod interop;
mod rfc8448;
mod stream;

use super::keys::{Aead, DirState, Secret};
use super::{Session, Version};

/// Hex (spaces and newlines allowed) to bytes.
pub fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    digits
        .chunks(2)
        .map(|p| {
            let s = std::str::from_utf8(p).expect("ascii");
            u8::from_str_radix(s, 16).expect("hex digit")
        })
        .collect()
}

/// Two ends of one session (a "client" and a "server" record layer), for tests that need no
/// handshake: each one's tx is the other's rx.
pub fn pair(version: Version, aead: Aead) -> (Session, Session) {
    let dir = |seed: u8| -> DirState {
        match version {
            Version::Tls13 => {
                DirState::from_secret(aead, Secret::new(vec![seed; aead.hash_len()]), 0)
                    .expect("derive")
            }
            Version::Tls12 => DirState {
                secret: Secret::new(Vec::new()),
                key: Secret::new(vec![seed; aead.key_len()]),
                iv: Secret::new(vec![seed ^ 0x5a; 12]),
                seq: 0,
                generation: 0,
            },
        }
    };
    let a = Session::new(version, aead, dir(1), dir(2)).expect("session a");
    let b = Session::new(version, aead, dir(2), dir(1)).expect("session b");
    (a, b)
}

/// Every version × AEAD the record layer continues.
pub const ALL: [(Version, Aead); 6] = [
    (Version::Tls13, Aead::Aes128Gcm),
    (Version::Tls13, Aead::Aes256Gcm),
    (Version::Tls13, Aead::Chacha20Poly1305),
    (Version::Tls12, Aead::Aes128Gcm),
    (Version::Tls12, Aead::Aes256Gcm),
    (Version::Tls12, Aead::Chacha20Poly1305),
];
