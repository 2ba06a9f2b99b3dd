//! RFC 8448 §3 ("Simple 1-RTT Handshake", TLS_AES_128_GCM_SHA256): the application traffic
//! keys and IVs derived from the traffic secrets, and the application data records of both
//! sides, opened and re-sealed byte for byte.

use super::hex;
use crate::tls::record::keys::{next_secret, traffic_keys, Aead, DirState, Secret};
use crate::tls::record::{Opened, Session, Version};
use bytes::BytesMut;

const CLIENT_ATS: &str = "9e 40 64 6c e7 9a 7f 9d c0 5a f8 88 9b ce 65 52
                          87 5a fa 0b 06 df 00 87 f7 92 eb b7 c1 75 04 a5";
const SERVER_ATS: &str = "a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32
                          82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43";

/// The 50-byte payload both sides send: 00 01 .. 31.
fn payload() -> Vec<u8> {
    (0u8..50).collect()
}

const CLIENT_RECORD: &str = "17 03 03 00 43 a2 3f 70 54 b6 2c 94 d0 af fa fe 82 28 ba 55 cb
    ef ac ea 42 f9 14 aa 66 bc ab 3f 2b 98 19 a8 a5 b4 6b 39 5b d5 4a 9a 20 44 1e 2b 62 97 4e
    1f 5a 62 92 a2 97 70 14 bd 1e 3d ea e6 3a ee bb 21 69 49 15 e4";
const SERVER_RECORD: &str = "17 03 03 00 43 2e 93 7e 11 ef 4a c7 40 e5 38 ad 36 00 5f c4 a4
    69 32 fc 32 25 d0 5f 82 aa 1b 36 e3 0e fa f9 7d 90 e6 df fc 60 2d cb 50 1a 59 a8 fc c4 9c
    4b f2 e5 f0 a2 1c 00 47 c2 ab f3 32 54 0d d0 32 e1 67 c2 95 5d";

#[test]
fn application_traffic_keys_and_ivs() {
    let (key, iv) = traffic_keys(Aead::Aes128Gcm, &hex(SERVER_ATS)).expect("derive");
    assert_eq!(
        key.bytes(),
        hex("9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56")
    );
    assert_eq!(iv.bytes(), hex("cf 78 2b 88 dd 83 54 9a ad f1 e9 84"));
    let (key, iv) = traffic_keys(Aead::Aes128Gcm, &hex(CLIENT_ATS)).expect("derive");
    assert_eq!(
        key.bytes(),
        hex("17 42 2d da 59 6e d5 d9 ac d8 90 e3 c6 3f 50 51")
    );
    assert_eq!(iv.bytes(), hex("5b 78 92 3d ee 08 57 90 33 e5 23 d9"));
}

#[test]
fn traffic_upd_matches_an_independent_implementation() {
    // RFC 8448 stops before any KeyUpdate; these next secrets are Botan's test values for the
    // same handshake ("application traffic secret (1)"), an independent implementation.
    let next = next_secret(Aead::Aes128Gcm, &hex(CLIENT_ATS)).expect("derive");
    assert_eq!(
        next.bytes(),
        hex("fc df cc 72 72 5a ae e4 8b f6 4e 4f d8 b7 49 cd
             bd ba b3 9d 90 da 0b 26 e2 24 5c a6 ea 16 72 07")
    );
    let next = next_secret(Aead::Aes128Gcm, &hex(SERVER_ATS)).expect("derive");
    assert_eq!(
        next.bytes(),
        hex("51 92 1b 8a a3 00 19 76 eb 40 1d 0a 43 19 a8 51
             64 16 a6 c5 60 01 a3 57 e5 d1 62 03 1e 84 f9 16")
    );
}

/// The server's session right after the handshake: the client's first record is its
/// sequence 0; the server already sent its NewSessionTicket (sequence 0).
fn server_session() -> Session {
    let secret = |h: &str| Secret::new(hex(h));
    let rx = DirState::from_secret(Aead::Aes128Gcm, secret(CLIENT_ATS), 0).expect("rx");
    let tx = DirState::from_secret(Aead::Aes128Gcm, secret(SERVER_ATS), 1).expect("tx");
    Session::new(Version::Tls13, Aead::Aes128Gcm, rx, tx).expect("session")
}

#[test]
fn opens_the_clients_record_and_seals_the_servers_exactly() {
    let mut s = server_session();
    let mut cipher = BytesMut::from(&hex(CLIENT_RECORD)[..]);
    let mut plain = BytesMut::new();
    assert_eq!(s.open(&mut cipher, &mut plain).expect("open"), Opened::Open);
    assert_eq!(&plain[..], &payload()[..]);
    assert!(cipher.is_empty());
    assert_eq!(s.seqs(), (1, 1));

    let mut out = BytesMut::new();
    s.seal(&payload(), &mut out).expect("seal");
    assert_eq!(&out[..], &hex(SERVER_RECORD)[..]);
    assert_eq!(s.seqs(), (1, 2));
}

#[test]
fn the_clients_record_fails_under_the_wrong_sequence_number() {
    let rx = DirState::from_secret(Aead::Aes128Gcm, Secret::new(hex(CLIENT_ATS)), 1).expect("rx");
    let tx = DirState::from_secret(Aead::Aes128Gcm, Secret::new(hex(SERVER_ATS)), 1).expect("tx");
    let mut s = Session::new(Version::Tls13, Aead::Aes128Gcm, rx, tx).expect("session");
    let mut cipher = BytesMut::from(&hex(CLIENT_RECORD)[..]);
    let err = s.open(&mut cipher, &mut BytesMut::new());
    assert!(matches!(
        err,
        Err(crate::tls::record::RecordError::BadRecordMac)
    ));
}
