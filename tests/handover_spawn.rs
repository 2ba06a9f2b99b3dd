//! Spawning a real successor process: this test binary re-executes itself with the inherited
//! channel, and the `peer_*` tests below play the successor when `BATON_HANDOVER_FD` is set
//! (run normally, without it, they return at once). Listeners and a live tunnel cross a
//! process boundary and the child serves them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use baton::config::Protocol;
use baton::handover::{
    expect_ack, inherited_channel, predecessor_hello, recv_conns, recv_listeners, recv_ready,
    send_ack, send_conns, send_done, send_listeners, send_ready, send_refused, spawn_successor,
    successor_hello, HandoverError, Message, HANDOVER_FD_ENV,
};
use baton::metrics::Counters;
use baton::registry::{ConnKind, ConnMeta, Parked, PendingHalf, TunnelState};
use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Generous bound for every step on a noisy 2-core machine.
const WAIT: Duration = Duration::from_secs(20);

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {WAIT:?}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The test binary, running only the named test, as a successor (killed and reaped when the
/// test ends, also when it fails).
fn spawn_peer(test: &str) -> Peer {
    let exe = std::env::current_exe().unwrap();
    let sp = spawn_successor(&exe, [test, "--exact", "--nocapture", "--test-threads=1"]).unwrap();
    Peer {
        child: common::Reaped(sp.child),
        channel: sp.channel,
    }
}

/// A spawned peer and our end of its channel.
struct Peer {
    child: common::Reaped,
    channel: baton::handover::Channel,
}

/// The successor: hello, adopt the listeners, ready, take the tunnels over and write their
/// pending bytes, greet one client per listener, then wait for done.
#[test]
fn peer_takes_over() {
    if std::env::var_os(HANDOVER_FD_ENV).is_none() {
        return;
    }
    runtime().block_on(async {
        let mut ch = inherited_channel().expect("variable is set").unwrap();
        assert!(
            std::env::var_os(HANDOVER_FD_ENV).is_none(),
            "the variable is removed"
        );
        let fd_flags = rustix::io::fcntl_getfd(&ch).unwrap();
        assert!(fd_flags.contains(rustix::io::FdFlags::CLOEXEC));

        let p = successor_hello(&mut ch).await.unwrap();
        assert_eq!(
            p.pid as i32,
            rustix::process::getppid().unwrap().as_raw_nonzero().get()
        );

        let mut listeners = Vec::new();
        for (entry, fd) in recv_listeners(&mut ch).await.unwrap() {
            let l = baton::listener::to_tokio(baton::listener::adopt(fd).unwrap()).unwrap();
            listeners.push((entry.name, l));
        }
        send_ready(&mut ch, listeners.iter().map(|(n, _)| n.clone()).collect())
            .await
            .unwrap();

        let r = ch.recv().await.unwrap();
        let Message::Conns { seq, .. } = r.msg else {
            panic!("expected conns, got {:?}", r.msg)
        };
        let conns = recv_conns(r).unwrap();
        send_ack(&mut ch, seq, conns.len()).await.unwrap();
        for p in conns {
            let Parked::Tunnel(mut t) = p else {
                panic!("expected a tunnel")
            };
            t.client.set_nonblocking(false).unwrap();
            t.upstream.set_nonblocking(false).unwrap();
            t.client.write_all(&t.to_client.bytes).unwrap();
            t.upstream.write_all(&t.to_upstream.bytes).unwrap();
            // Then relay one live message each way, proving both sockets still carry data.
            let mut buf = [0u8; 4];
            t.client.read_exact(&mut buf).unwrap();
            t.upstream.write_all(&buf).unwrap();
        }

        for (name, l) in &listeners {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(format!("peer:{name}\n").as_bytes())
                .await
                .unwrap();
        }

        match ch.recv().await.unwrap().msg {
            Message::Done { counters, .. } => assert_eq!(counters.accepted, 42),
            other => panic!("expected done, got {other:?}"),
        }
    });
}

/// A successor whose configuration is invalid: it says why and exits 2.
#[test]
fn peer_refuses() {
    if std::env::var_os(HANDOVER_FD_ENV).is_none() {
        return;
    }
    runtime().block_on(async {
        let mut ch = inherited_channel().expect("variable is set").unwrap();
        send_refused(
            &mut ch,
            "config.yaml:3:5: listeners.web.listen: invalid address",
        )
        .await
        .unwrap();
    });
    std::process::exit(2);
}

#[tokio::test]
async fn spawned_successor_adopts_listeners_and_a_live_tunnel() {
    assert!(
        inherited_channel().is_none(),
        "a first generation has no channel"
    );
    let mut sp = spawn_peer("peer_takes_over");
    let ch = &mut sp.channel;

    let peer = bounded("hello", predecessor_hello(ch)).await.unwrap();
    assert_eq!(Some(peer.pid), sp.child.id());

    let web = TcpListener::bind("127.0.0.1:0").unwrap();
    let db = TcpListener::bind("127.0.0.1:0").unwrap();
    let (web_addr, db_addr) = (web.local_addr().unwrap(), db.local_addr().unwrap());
    let ls = [
        ("web", web_addr, Protocol::Http, web.as_fd()),
        ("db", db_addr, Protocol::Tcp, db.as_fd()),
    ];
    bounded("listeners", send_listeners(ch, &ls)).await.unwrap();
    assert_eq!(
        bounded("ready", recv_ready(ch)).await.unwrap(),
        ["web", "db"]
    );

    // One live tunnel: client ⇄ (parked proxy sockets) ⇄ upstream server.
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let back = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(front.local_addr().unwrap()).unwrap();
    let (proxy_client, caddr) = front.accept().unwrap();
    let proxy_upstream = TcpStream::connect(back.local_addr().unwrap()).unwrap();
    let (mut server, _) = back.accept().unwrap();
    for s in [&client, &server] {
        s.set_read_timeout(Some(WAIT)).unwrap();
    }
    let parked = vec![Parked::Tunnel(TunnelState {
        client_tls: None,
        idle_ms: 0,
        meta: ConnMeta {
            listener: "db".into(),
            client: caddr,
            server: Some(back.local_addr().unwrap()),
            kind: ConnKind::Tcp,
            started_ms: 1,
            bytes_in: 2,
            bytes_out: 3,
        },
        client: proxy_client,
        upstream: proxy_upstream,
        upstream_tls: None,
        to_upstream: PendingHalf {
            bytes: b"pending to upstream|".to_vec(),
            ..Default::default()
        },
        to_client: PendingHalf {
            bytes: b"pending to client|".to_vec(),
            ..Default::default()
        },
    })];
    bounded("conns", send_conns(ch, 1, &parked)).await.unwrap();
    bounded("ack", expect_ack(ch, 1, 1)).await.unwrap();
    drop(parked);

    let mut buf = vec![0; b"pending to client|".len()];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(buf, b"pending to client|");
    client.write_all(b"live").unwrap();
    let mut buf = vec![0; b"pending to upstream|live".len()];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(buf, b"pending to upstream|live");

    // Our listener copies stay open (we never accept on them): the child serves both.
    for (name, addr) in [("web", web_addr), ("db", db_addr)] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut line = vec![0; format!("peer:{name}\n").len()];
        bounded("greeting", s.read_exact(&mut line)).await.unwrap();
        assert_eq!(String::from_utf8(line).unwrap(), format!("peer:{name}\n"));
    }

    let counters = Counters {
        accepted: 42,
        ..Default::default()
    };
    bounded("done", send_done(ch, counters)).await.unwrap();
    let status = bounded("exit", sp.child.wait()).await.unwrap();
    assert!(status.success(), "successor failed: {status}");
}

#[tokio::test]
async fn a_refusing_successor_is_reported_with_its_reason() {
    let mut sp = spawn_peer("peer_refuses");
    match bounded("hello", predecessor_hello(&mut sp.channel)).await {
        Err(HandoverError::Refused(reason)) => {
            assert!(reason.contains("invalid address"), "{reason}")
        }
        other => panic!("expected refused, got {other:?}"),
    }
    let status = bounded("exit", sp.child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(2));
    // The child is gone and its end closed: the channel reads as closed.
    assert!(matches!(
        bounded("eof", sp.channel.recv()).await,
        Err(HandoverError::Closed)
    ));
}

#[tokio::test]
async fn a_missing_binary_is_a_spawn_error() {
    let err = spawn_successor(std::path::Path::new("/nonexistent/baton"), ["x"]).unwrap_err();
    assert!(matches!(err, HandoverError::Spawn { .. }), "{err}");
}
