//! Hostile input: garbage, truncated, tampered, oversized and misplaced records give a typed
//! error (or wait for more bytes), never a panic.

use super::{pair, ALL};
use crate::tls::record::{Opened, RecordError, Session, Version, HEADER_LEN};
use bytes::BytesMut;
use proptest::prelude::*;

fn sealed(s: &mut Session, data: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    s.seal(data, &mut out).expect("seal");
    out
}

fn open(s: &mut Session, wire: &[u8]) -> (Result<Opened, RecordError>, BytesMut, BytesMut) {
    let mut cipher = BytesMut::from(wire);
    let mut plain = BytesMut::new();
    let r = s.open(&mut cipher, &mut plain);
    (r, cipher, plain)
}

#[test]
fn round_trip_every_suite_record_by_record_boundaries() {
    for (version, aead) in ALL {
        let (mut a, mut b) = pair(version, aead);
        let data: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let wire = sealed(&mut a, &data);
        // Fed one byte at a time, nothing is lost or produced early.
        let mut cipher = BytesMut::new();
        let mut plain = BytesMut::new();
        for &byte in wire.iter() {
            cipher.extend_from_slice(&[byte]);
            assert_eq!(b.open(&mut cipher, &mut plain).expect("open"), Opened::Open);
        }
        assert!(cipher.is_empty(), "{version:?} {aead:?}");
        assert_eq!(&plain[..], &data[..], "{version:?} {aead:?}");
        assert_eq!(b.seqs().0, 3, "three records of at most 16 KiB");
    }
}

#[test]
fn truncated_record_waits_for_the_rest() {
    for (version, aead) in ALL {
        let (mut a, mut b) = pair(version, aead);
        let wire = sealed(&mut a, b"hello");
        let (r, cipher, plain) = open(&mut b, &wire[..wire.len() - 1]);
        assert_eq!(r.expect("partial is fine"), Opened::Open);
        assert_eq!(cipher.len(), wire.len() - 1, "kept for later");
        assert!(plain.is_empty());
    }
}

#[test]
fn every_tampered_byte_is_a_bad_record() {
    for (version, aead) in ALL {
        let (mut a, _) = pair(version, aead);
        let wire = sealed(&mut a, b"attack at dawn");
        for i in 0..wire.len() {
            let (_, mut b) = pair(version, aead);
            let mut bad = wire.to_vec();
            bad[i] ^= 0x01;
            let (r, cipher, plain) = open(&mut b, &bad);
            // A longer length in the header only makes the record incomplete: it waits.
            let waits = r.is_ok() && (i == 3 || i == 4) && cipher.len() == bad.len();
            assert!(
                r.is_err() || waits,
                "{version:?} {aead:?}: flipped byte {i} accepted"
            );
            assert!(plain.is_empty(), "no plaintext from a bad record");
        }
    }
}

#[test]
fn replayed_and_reordered_records_fail() {
    let (mut a, mut b) = pair(Version::Tls13, crate::tls::record::Aead::Aes128Gcm);
    let first = sealed(&mut a, b"one");
    let second = sealed(&mut a, b"two");
    let (r, _, _) = open(&mut b, &second);
    assert!(matches!(r, Err(RecordError::BadRecordMac)), "reordered");
    let (_, mut b) = pair(Version::Tls13, crate::tls::record::Aead::Aes128Gcm);
    assert!(open(&mut b, &first).0.is_ok());
    assert!(
        matches!(open(&mut b, &first).0, Err(RecordError::BadRecordMac)),
        "replayed"
    );
}

#[test]
fn oversized_and_misplaced_records_are_typed_errors() {
    for (version, aead) in ALL {
        let (_, mut b) = pair(version, aead);
        // A header announcing more than the protocol allows fails before the body arrives.
        let (r, _, _) = open(&mut b, &[23, 3, 3, 0xff, 0xff]);
        assert!(
            matches!(r, Err(RecordError::Overflow(0xffff))),
            "{version:?}"
        );
        // change_cipher_spec after the handshake.
        let (r, _, _) = open(&mut b, &[20, 3, 3, 0, 1, 1]);
        assert!(
            matches!(r, Err(RecordError::UnexpectedType(20))),
            "{version:?}"
        );
        // A body too short to hold a tag.
        let (r, _, _) = open(&mut b, &[23, 3, 3, 0, 3, 1, 2, 3]);
        assert!(matches!(r, Err(RecordError::BadRecordMac)), "{version:?}");
    }
}

fn raw(a: &mut Session, typ: u8, content: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    a.seal_raw(typ, content, &mut out).expect("seal");
    out
}

/// A record to forge (type, content) and the error it must give.
type Case = (u8, &'static [u8], fn(&RecordError) -> bool);

#[test]
fn tls13_padding_content_types_and_control_messages() {
    use crate::tls::record::{Aead, AlertDescription};
    let (mut a, mut b) = pair(Version::Tls13, Aead::Chacha20Poly1305);
    // A zero-length data record is allowed; padding after the type is stripped.
    for (typ, content) in [(23u8, &b""[..]), (23, b"x")] {
        let wire = raw(&mut a, typ, content);
        let (r, _, plain) = open(&mut b, &wire);
        assert_eq!(r.expect("data"), Opened::Open);
        assert_eq!(&plain[..], content);
    }
    let cases: [Case; 6] = [
        // Only padding: no content type.
        (0, b"", |e| matches!(e, RecordError::NoContentType)),
        // A ClientHello after the handshake.
        (22, &[1, 0, 0, 0], |e| {
            matches!(e, RecordError::UnexpectedHandshake(1))
        }),
        // A KeyUpdate with trailing bytes (it must end its record) or a bad value.
        (22, &[24, 0, 0, 1, 0, 0], |e| {
            matches!(e, RecordError::Malformed(_))
        }),
        (22, &[24, 0, 0, 1, 2], |e| {
            matches!(e, RecordError::Malformed(_))
        }),
        // An alert of the wrong length.
        (21, &[1], |e| matches!(e, RecordError::Malformed(_))),
        // A fatal alert, named.
        (21, &[2, 40], |e| {
            matches!(e, RecordError::Alert(AlertDescription(40)))
        }),
    ];
    for (typ, content, want) in cases {
        let (mut a, mut b) = pair(Version::Tls13, Aead::Chacha20Poly1305);
        let wire = raw(&mut a, typ, content);
        let (r, _, _) = open(&mut b, &wire);
        let err = r.expect_err("refused");
        assert!(want(&err), "type {typ} {content:?}: {err}");
        assert!(err.alert().is_some() || matches!(err, RecordError::Alert(_)));
    }
    // user_canceled is a warning that precedes close_notify: not an error.
    let (mut a, mut b) = pair(Version::Tls13, Aead::Chacha20Poly1305);
    let wire = raw(&mut a, 21, &[1, 90]);
    assert_eq!(open(&mut b, &wire).0.expect("user_canceled"), Opened::Open);
}

#[test]
fn tls12_refuses_renegotiation_and_ignores_warnings() {
    use crate::tls::record::Aead;
    for aead in [Aead::Aes128Gcm, Aead::Chacha20Poly1305] {
        let (mut a, mut b) = pair(Version::Tls12, aead);
        let wire = raw(&mut a, 21, &[1, 100]);
        assert_eq!(open(&mut b, &wire).0.expect("warning"), Opened::Open);
        let wire = raw(&mut a, 22, &[1, 0, 0, 0]);
        let r = open(&mut b, &wire).0;
        assert!(
            matches!(r, Err(RecordError::UnexpectedHandshake(1))),
            "{aead:?}"
        );
        let (mut a, mut b) = pair(Version::Tls12, aead);
        let wire = raw(&mut a, 21, &[2, 40]);
        assert!(matches!(open(&mut b, &wire).0, Err(RecordError::Alert(_))));
    }
}

#[test]
fn tls12_stops_at_its_record_limit() {
    use crate::tls::record::{Aead, Limits};
    let (mut a, mut b) = pair(Version::Tls12, Aead::Aes256Gcm);
    a.set_limits(Limits {
        tx_records: 2,
        rx_records: 2,
    });
    let wire = sealed(&mut a, b"one");
    let mut more = BytesMut::new();
    a.seal(b"two", &mut more).expect("second record");
    assert!(matches!(
        a.seal(b"three", &mut more),
        Err(RecordError::LimitReached)
    ));
    assert!(open(&mut b, &wire).0.is_ok());
}

#[test]
fn tls13_rekeys_itself_at_its_record_limit() {
    use crate::tls::record::{Aead, Limits};
    let (mut a, mut b) = pair(Version::Tls13, Aead::Aes128Gcm);
    a.set_limits(Limits {
        tx_records: 2,
        rx_records: u64::MAX,
    });
    let mut wire = BytesMut::new();
    for i in 0..7u8 {
        a.seal(&[i], &mut wire).expect("seal");
    }
    let (r, _, plain) = open(&mut b, &wire);
    assert_eq!(r.expect("open"), Opened::Open);
    assert_eq!(&plain[..], &[0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(a.generations().1, 3, "a KeyUpdate every two records");
    assert_eq!(b.generations().0, 3);
    assert!(!b.has_pending(), "update_not_requested: nothing to answer");
}

#[test]
fn data_after_close_notify_is_ignored() {
    for (version, aead) in ALL {
        let (mut a, mut b) = pair(version, aead);
        let mut wire = sealed(&mut a, b"last words");
        a.close_notify(&mut wire).expect("close");
        // Whatever a peer sends after its close_notify is never read.
        let (r, cipher, plain) = open(&mut b, &wire);
        assert_eq!(r.expect("close"), Opened::Closed);
        assert_eq!(&plain[..], b"last words");
        assert!(cipher.is_empty());
        assert!(b.received_close());
        let (r, _, plain) = open(
            &mut b,
            b"\x17\x03\x03\x00\x20garbage that is never opened!!!!",
        );
        assert_eq!(r.expect("still closed"), Opened::Closed);
        assert!(plain.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(wire in proptest::collection::vec(any::<u8>(), 0..600), which in 0usize..6) {
        let (version, aead) = ALL[which];
        let (_, mut b) = pair(version, aead);
        let mut cipher = BytesMut::from(&wire[..]);
        let mut plain = BytesMut::new();
        let _ = b.open(&mut cipher, &mut plain);
        prop_assert!(plain.is_empty(), "garbage never authenticates");
    }

    #[test]
    fn valid_records_with_garbage_after_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..3000),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
        which in 0usize..6,
    ) {
        let (version, aead) = ALL[which];
        let (mut a, mut b) = pair(version, aead);
        let mut wire = sealed(&mut a, &data).to_vec();
        wire.extend_from_slice(&tail);
        let mut cipher = BytesMut::from(&wire[..]);
        let mut plain = BytesMut::new();
        let r = b.open(&mut cipher, &mut plain);
        prop_assert_eq!(&plain[..], &data[..]);
        if tail.len() < HEADER_LEN {
            prop_assert!(r.is_ok());
        }
    }
}

#[test]
fn a_client_session_drops_the_servers_session_tickets_and_a_server_session_refuses_them() {
    use crate::tls::record::Aead;
    // Two whole NewSessionTickets in one record (lifetime, age_add, nonce, ticket, no
    // extensions), then data.
    let nst = [4u8, 0, 0, 15, 0, 0, 0, 60, 1, 2, 3, 4, 1, 9, 0, 1, 7, 0, 0];
    let two: Vec<u8> = nst.iter().chain(nst.iter()).copied().collect();
    let (mut server, mut client) = pair(Version::Tls13, Aead::Aes128Gcm);
    client.set_client();
    assert!(client.is_client());
    let mut wire = raw(&mut server, 22, &two);
    wire.extend_from_slice(&sealed(&mut server, b"after the tickets"));
    let (r, rest, plain) = open(&mut client, &wire);
    assert_eq!(r.expect("tickets dropped"), Opened::Open);
    assert!(rest.is_empty());
    assert_eq!(&plain[..], b"after the tickets");
    // A ticket cut short (split across records) is refused, never half-read.
    let (mut server, mut client) = pair(Version::Tls13, Aead::Aes128Gcm);
    client.set_client();
    let wire = raw(&mut server, 22, &nst[..10]);
    let err = open(&mut client, &wire).0.expect_err("split ticket");
    assert!(matches!(err, RecordError::Malformed(_)), "{err}");
    // A ticket followed by another handshake message in the same record is refused.
    let (mut server, mut client) = pair(Version::Tls13, Aead::Aes128Gcm);
    client.set_client();
    let mut mixed = nst.to_vec();
    mixed.extend_from_slice(&[1, 0, 0, 0]);
    let wire = raw(&mut server, 22, &mixed);
    let err = open(&mut client, &wire).0.expect_err("mixed");
    assert!(matches!(err, RecordError::UnexpectedHandshake(1)), "{err}");
    // A server session (a TLS listener's) never accepts one: a client sends no tickets.
    let (mut a, mut b) = pair(Version::Tls13, Aead::Aes128Gcm);
    let wire = raw(&mut a, 22, &nst);
    let err = open(&mut b, &wire).0.expect_err("server session");
    assert!(matches!(err, RecordError::UnexpectedHandshake(4)), "{err}");
    // The role survives a park (serde), and a session without it is a server's.
    let (_, mut c) = pair(Version::Tls13, Aead::Aes128Gcm);
    c.set_client();
    let json = serde_json::to_string(&c).expect("ser");
    let back: Session = serde_json::from_str(&json).expect("de");
    assert!(back.is_client());
    let old = json.replace(",\"client\":true", "");
    assert_ne!(old, json, "the flag is in the JSON: {json}");
    let back: Session = serde_json::from_str(&old).expect("de without the flag");
    assert!(!back.is_client());
}
