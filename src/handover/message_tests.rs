//! Unit and property tests of the frame codec: every message round-trips, and no input
//! (arbitrary, truncated or mutated) makes the decoder panic.

use super::*;
use crate::registry::ConnKind;
use proptest::prelude::*;

fn meta() -> ConnMeta {
    ConnMeta {
        listener: "l".into(),
        client: "127.0.0.1:1000".parse().unwrap(),
        server: Some("127.0.0.1:2000".parse().unwrap()),
        kind: ConnKind::Tcp,
        started_ms: 5,
        bytes_in: 6,
        bytes_out: 7,
    }
}

fn conns_msg() -> (Message, Vec<u8>) {
    let msg = Message::Conns {
        seq: 3,
        conns: vec![
            ConnEntry::Tunnel {
                meta: meta(),
                idle_ms: 0,
                tls: None,
                up_tls: None,
                to_upstream: HalfEntry {
                    pending: 3,
                    read_eof: true,
                    shut: false,
                },
                to_client: HalfEntry {
                    pending: 2,
                    read_eof: false,
                    shut: false,
                },
            },
            ConnEntry::IdleHttp {
                meta: meta(),
                read_ahead: 4,
            },
        ],
    };
    (msg, b"abcdeGET ".to_vec())
}

fn frame(msg: &Message, fds: usize, bulk: &[u8]) -> Vec<u8> {
    let mut f = encode(msg, fds, bulk.len()).unwrap();
    f.extend_from_slice(bulk);
    f.to_vec()
}

#[test]
fn round_trip_every_message() {
    let msgs = [
        Message::Hello {
            protocol_version: 1,
            version: "0.1.0".into(),
            pid: 42,
        },
        Message::Refused {
            reason: "config: bad".into(),
        },
        Message::Listeners {
            listeners: vec![ListenerEntry {
                name: "web".into(),
                addr: "127.0.0.1:80".parse().unwrap(),
                protocol: Protocol::Http,
            }],
            ticket_keys: 0,
        },
        Message::Ready {
            adopted: vec!["web".into()],
        },
        Message::Ack { seq: 1, count: 2 },
        Message::Done {
            counters: Counters {
                accepted: 9,
                ..Default::default()
            },
            history: vec![serde_json::json!({"ok": true})],
        },
        Message::Abort { reason: "x".into() },
    ];
    for m in msgs {
        let f = frame(&m, m.fds_needed(), &[]);
        let d = decode_frame(&f).unwrap();
        assert_eq!(d.msg, m);
        assert_eq!(d.consumed, f.len());
        assert_eq!(d.header.fd_count as usize, m.fds_needed());
    }
    let (m, bulk) = conns_msg();
    let f = frame(&m, 3, &bulk);
    let d = decode_frame(&f).unwrap();
    assert_eq!(d.msg, m);
    assert_eq!(d.bulk, &bulk[..]);
}

#[test]
fn encode_checks_counts() {
    let (m, bulk) = conns_msg();
    assert!(matches!(
        encode(&m, 2, bulk.len()),
        Err(HandoverError::FdsForEntries {
            needed: 3,
            header: 2
        })
    ));
    assert!(matches!(
        encode(&m, 3, 1),
        Err(HandoverError::BulkMismatch { .. })
    ));
    let hello = Message::Ack { seq: 0, count: 0 };
    assert!(matches!(
        encode(&hello, 1, 0),
        Err(HandoverError::FdsForEntries { .. })
    ));
}

#[test]
fn bad_frames_are_typed_errors() {
    let (m, bulk) = conns_msg();
    let good = frame(&m, 3, &bulk);

    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(matches!(
        decode_frame(&bad),
        Err(HandoverError::BadMagic(_))
    ));

    let mut future = good.clone();
    future[4..6].copy_from_slice(&2u16.to_be_bytes());
    assert!(matches!(
        decode_frame(&future),
        Err(HandoverError::UnsupportedVersion { got: 2, ours: 1 })
    ));

    let mut reserved = good.clone();
    reserved[7] = 1;
    assert!(matches!(
        decode_frame(&reserved),
        Err(HandoverError::BadHeader(_))
    ));

    let mut fds = good.clone();
    fds[12..16].copy_from_slice(&2u32.to_be_bytes());
    assert!(matches!(
        decode_frame(&fds),
        Err(HandoverError::FdsForEntries { .. })
    ));

    let mut many = good.clone();
    many[12..16].copy_from_slice(&254u32.to_be_bytes());
    assert!(matches!(
        decode_frame(&many),
        Err(HandoverError::TooManyFds(254))
    ));

    let mut huge = good.clone();
    huge[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
    assert!(matches!(
        decode_frame(&huge),
        Err(HandoverError::TooLarge {
            what: "payload",
            ..
        })
    ));

    let mut huge_bulk = good.clone();
    huge_bulk[16..24].copy_from_slice(&(MAX_BULK + 1).to_be_bytes());
    assert!(matches!(
        decode_frame(&huge_bulk),
        Err(HandoverError::TooLarge { what: "bulk", .. })
    ));

    let mut short_bulk = good.clone();
    short_bulk[16..24].copy_from_slice(&8u64.to_be_bytes());
    assert!(matches!(
        decode_frame(&short_bulk),
        Err(HandoverError::BulkMismatch { .. })
    ));

    for cut in 0..good.len() {
        assert!(
            matches!(
                decode_frame(&good[..cut]),
                Err(HandoverError::Truncated { .. })
            ),
            "cut at {cut}"
        );
    }

    let garbage = b"{not json";
    let h = Header {
        payload_len: garbage.len() as u32,
        fd_count: 0,
        bulk_len: 0,
    };
    let mut g = h.encode().to_vec();
    g.extend_from_slice(garbage);
    assert!(matches!(decode_frame(&g), Err(HandoverError::Json(_))));

    let unknown = br#"{"type":"explode"}"#;
    let h = Header {
        payload_len: unknown.len() as u32,
        fd_count: 0,
        bulk_len: 0,
    };
    let mut u = h.encode().to_vec();
    u.extend_from_slice(unknown);
    assert!(matches!(decode_frame(&u), Err(HandoverError::Json(_))));
}

#[test]
fn overflowing_lengths_are_rejected() {
    let payload = serde_json::to_vec(&Message::Conns {
        seq: 0,
        conns: vec![ConnEntry::Tunnel {
            meta: meta(),
            idle_ms: 0,
            tls: None,
            up_tls: None,
            to_upstream: HalfEntry {
                pending: u64::MAX,
                read_eof: false,
                shut: false,
            },
            to_client: HalfEntry {
                pending: 2,
                read_eof: false,
                shut: false,
            },
        }],
    })
    .unwrap();
    let h = Header {
        payload_len: payload.len() as u32,
        fd_count: 2,
        bulk_len: 1,
    };
    let mut f = h.encode().to_vec();
    f.extend_from_slice(&payload);
    f.push(0);
    assert!(matches!(
        decode_frame(&f),
        Err(HandoverError::BulkMismatch { needed: None, .. })
    ));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame(&bytes);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(
        payload_len in 0u32..300,
        fd_count in 0u32..300,
        bulk_len in 0u64..300,
        rest in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut f = Header { payload_len, fd_count, bulk_len }.encode().to_vec();
        f.extend_from_slice(&rest);
        let _ = decode_frame(&f);
    }

    #[test]
    fn any_conns_message_round_trips(
        entries in proptest::collection::vec((any::<bool>(), 0u64..5000, 0u64..5000, any::<bool>()), 0..130),
        seq in any::<u64>(),
    ) {
        let conns: Vec<ConnEntry> = entries
            .iter()
            .map(|&(tunnel, a, b, flag)| if tunnel {
                ConnEntry::Tunnel {
                    meta: meta(),
                    idle_ms: a,
                    tls: None,
                    up_tls: None,
                    to_upstream: HalfEntry { pending: a, read_eof: flag, shut: !flag },
                    to_client: HalfEntry { pending: b, read_eof: !flag, shut: flag },
                }
            } else {
                ConnEntry::IdleHttp { meta: meta(), read_ahead: a }
            })
            .collect();
        let msg = Message::Conns { seq, conns };
        let (fds, bulk) = (msg.fds_needed(), msg.bulk_needed().unwrap() as usize);
        if fds > MAX_FDS {
            prop_assert!(matches!(encode(&msg, fds, bulk), Err(HandoverError::TooManyFds(_))));
        } else {
            let f = frame(&msg, fds, &vec![7u8; bulk]);
            let d = decode_frame(&f).unwrap();
            prop_assert_eq!(d.msg, msg);
            prop_assert_eq!(d.bulk.len(), bulk);
            prop_assert_eq!(d.consumed, f.len());
        }
    }

    #[test]
    fn truncated_or_mutated_frames_never_panic(cut in 0usize..400, flip in 0usize..400, bit in 0u8..8) {
        let (m, bulk) = conns_msg();
        let good = frame(&m, 3, &bulk);
        let cut = cut.min(good.len());
        let r = decode_frame(&good[..cut]);
        if cut < good.len() {
            prop_assert!(matches!(r, Err(HandoverError::Truncated { .. })), "{:?}", r);
        } else {
            prop_assert!(r.is_ok());
        }
        let mut mutated = good.clone();
        let i = flip % mutated.len();
        mutated[i] ^= 1 << bit;
        let _ = decode_frame(&mutated);
    }
}
