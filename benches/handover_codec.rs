//! Micro-benchmarks of the handover frame codec: encoding and decoding a `Conns` batch of the
//! largest size one message carries (253 fds: 126 tunnels, or 253 idle HTTP connections), and
//! the small control messages. 10,000 connections cross the channel in about 40 such frames, so
//! the codec's share of the handover time is these figures × 40.
#![allow(clippy::unwrap_used)]

use baton::handover::message::{decode_frame, encode};
use baton::handover::{ConnEntry, HalfEntry, Message};
use baton::registry::{ConnKind, ConnMeta};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

fn meta(i: u16, kind: ConnKind) -> ConnMeta {
    ConnMeta {
        listener: "web".to_string(),
        client: format!("127.0.0.1:{}", 20000 + i).parse().unwrap(),
        server: Some("127.0.0.1:9001".parse().unwrap()),
        kind,
        started_ms: 1_800_000_000_000 + u64::from(i),
        bytes_in: 1234 * u64::from(i),
        bytes_out: 98765 * u64::from(i),
    }
}

/// 126 tunnels with 100 pending bytes each way (252 fds, 25,200 bulk bytes).
fn tunnels() -> (Message, usize, Vec<u8>) {
    let conns: Vec<ConnEntry> = (0..126)
        .map(|i| ConnEntry::Tunnel {
            meta: meta(i, ConnKind::Tcp),
            tls: None,
            up_tls: None,
            idle_ms: 0,
            to_upstream: HalfEntry {
                pending: 100,
                read_eof: false,
                shut: false,
            },
            to_client: HalfEntry {
                pending: 100,
                read_eof: false,
                shut: false,
            },
        })
        .collect();
    (Message::Conns { seq: 7, conns }, 252, vec![0x5a; 126 * 200])
}

/// 253 idle HTTP connections without read-ahead (253 fds).
fn idle_http() -> (Message, usize, Vec<u8>) {
    let conns: Vec<ConnEntry> = (0..253)
        .map(|i| ConnEntry::IdleHttp {
            meta: meta(i, ConnKind::Http),
            read_ahead: 0,
        })
        .collect();
    (Message::Conns { seq: 8, conns }, 253, Vec::new())
}

fn frame(msg: &Message, fds: usize, bulk: &[u8]) -> Vec<u8> {
    let mut f = encode(msg, fds, bulk.len()).unwrap();
    f.extend_from_slice(bulk);
    f.to_vec()
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("handover_codec");
    for (name, (msg, fds, bulk)) in [("tunnels_126", tunnels()), ("idle_http_253", idle_http())] {
        let bytes = frame(&msg, fds, &bulk);
        g.throughput(Throughput::Elements(fds as u64));
        g.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| encode(black_box(&msg), fds, bulk.len()).unwrap())
        });
        g.bench_function(format!("decode_frame/{name}"), |b| {
            b.iter(|| decode_frame(black_box(&bytes)).unwrap().consumed)
        });
    }
    let ack = frame(&Message::Ack { seq: 3, count: 253 }, 0, &[]);
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode/ack", |b| {
        b.iter(|| encode(black_box(&Message::Ack { seq: 3, count: 253 }), 0, 0).unwrap())
    });
    g.bench_function("decode_frame/ack", |b| {
        b.iter(|| decode_frame(black_box(&ack)).unwrap().consumed)
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
