//! The handover channel over a real socketpair: listening sockets and live TCP tunnels
//! (real connected pairs on 127.0.0.1) cross it and still work; malformed frames are typed
//! errors, never panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use baton::config::Protocol;
use baton::handover::message::{encode, Header, HEADER_LEN, MAGIC};
use baton::handover::{
    expect_ack, recv_conns, recv_listeners, send_ack, send_conns, send_listeners, Channel,
    HandoverError, ListenerEntry, Message,
};
use baton::registry::{ConnKind, ConnMeta, Parked, PendingHalf, TunnelState};
use rustix::io::{fcntl_getfd, FdFlags};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Generous bound for blocking reads on a noisy machine; a hang fails instead of stalling.
const WAIT: Duration = Duration::from_secs(20);

fn assert_cloexec(fd: impl AsFd) {
    assert!(
        fcntl_getfd(fd).unwrap().contains(FdFlags::CLOEXEC),
        "received fd must be close-on-exec"
    );
}

#[tokio::test]
async fn listeners_cross_the_channel_and_accept_connections() {
    let (mut p, mut s) = Channel::pair().unwrap();
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    let (aa, ba) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let sent = [
        ("web", aa, Protocol::Http, a.as_fd()),
        ("db", ba, Protocol::Tcp, b.as_fd()),
    ];
    send_listeners(&mut p, &sent).await.unwrap();
    let got = recv_listeners(&mut s).await.unwrap();
    // The predecessor's copies go: only the received fds serve from here on.
    drop((a, b));

    let names: Vec<&ListenerEntry> = got.iter().map(|(e, _)| e).collect();
    assert_eq!(
        names,
        [
            &ListenerEntry {
                name: "web".into(),
                addr: aa,
                protocol: Protocol::Http
            },
            &ListenerEntry {
                name: "db".into(),
                addr: ba,
                protocol: Protocol::Tcp
            },
        ]
    );
    for (entry, fd) in got {
        assert_cloexec(&fd);
        let listener = baton::listener::to_tokio(baton::listener::adopt(fd).unwrap()).unwrap();
        assert_eq!(listener.local_addr().unwrap(), entry.addr);
        let mut client = tokio::net::TcpStream::connect(entry.addr).await.unwrap();
        let (mut conn, _) = listener.accept().await.unwrap();
        conn.write_all(entry.name.as_bytes()).await.unwrap();
        let mut buf = vec![0; entry.name.len()];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, entry.name.as_bytes());
    }
}

/// One tunnel as the proxy holds it, plus the real endpoints the test plays.
struct Fixture {
    parked: Vec<Parked>,
    /// The real clients, by tunnel index.
    clients: Vec<TcpStream>,
    /// The real upstream servers' accepted sockets, by tunnel index.
    servers: Vec<TcpStream>,
}

fn pending(tag: &str, i: usize, len: usize) -> Vec<u8> {
    let prefix = format!("{tag}{i}:");
    prefix
        .bytes()
        .chain((0..len).map(|k| (k * 31 + i) as u8))
        .collect()
}

fn live(tag: &str, i: usize) -> Vec<u8> {
    format!("{tag}-live-{i}.").into_bytes()
}

fn meta(i: usize, client: SocketAddr, server: SocketAddr) -> ConnMeta {
    ConnMeta {
        listener: format!("l{}", i % 3),
        client,
        server: Some(server),
        kind: if i.is_multiple_of(2) {
            ConnKind::Tcp
        } else {
            ConnKind::Tunnel
        },
        started_ms: i as u64,
        bytes_in: 1000 + i as u64,
        bytes_out: 2000 + i as u64,
    }
}

/// `n` tunnels: for each, a client connected to the proxy's listener and the proxy connected
/// to an upstream server; pending bytes in both directions (some empty), and after parking
/// more bytes already in the kernel from each real endpoint.
fn tunnels(n: usize) -> Fixture {
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let back = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut f = Fixture {
        parked: Vec::new(),
        clients: Vec::new(),
        servers: Vec::new(),
    };
    for i in 0..n {
        let client = TcpStream::connect(front.local_addr().unwrap()).unwrap();
        let (proxy_client, caddr) = front.accept().unwrap();
        let proxy_upstream = TcpStream::connect(back.local_addr().unwrap()).unwrap();
        let (server, _) = back.accept().unwrap();
        let up_len = if i % 7 == 0 { 0 } else { (i * 13) % 3000 };
        let down_len = if i % 5 == 0 { 0 } else { (i * 17) % 3000 };
        f.parked.push(Parked::Tunnel(TunnelState {
            client_tls: None,
            idle_ms: 0,
            meta: meta(i, caddr, back.local_addr().unwrap()),
            client: proxy_client,
            upstream: proxy_upstream,
            upstream_tls: None,
            to_upstream: PendingHalf {
                bytes: pending("up", i, up_len),
                read_eof: false,
                shut: i % 3 == 0,
            },
            to_client: PendingHalf {
                bytes: pending("down", i, down_len),
                read_eof: false,
                shut: false,
            },
        }));
        for s in [&client, &server] {
            s.set_read_timeout(Some(WAIT)).unwrap();
        }
        f.clients.push(client);
        f.servers.push(server);
    }
    // Bytes the endpoints send while the tunnel is parked: they wait in the kernel and must
    // come out of the received sockets after the pending bytes.
    for (i, (c, s)) in f.clients.iter_mut().zip(&mut f.servers).enumerate() {
        c.write_all(&live("up", i)).unwrap();
        s.write_all(&live("down", i)).unwrap();
    }
    f
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[tokio::test]
async fn three_hundred_tunnels_cross_with_every_pending_byte_in_order() {
    const N: usize = 300;
    let mut f = tunnels(N);
    let (mut p, mut s) = Channel::pair().unwrap();

    let sender = async {
        send_conns(&mut p, 1, &f.parked).await.unwrap();
        expect_ack(&mut p, 1, N).await.unwrap();
    };
    let receiver = async {
        let (mut got, mut messages) = (Vec::new(), 0);
        while got.len() < N {
            let r = s.recv().await.unwrap();
            assert!(r.fds.len() <= 253);
            for fd in &r.fds {
                assert_cloexec(fd);
            }
            let batch = recv_conns(r).unwrap();
            send_ack(&mut s, 1, batch.len()).await.unwrap();
            got.extend(batch);
            messages += 1;
        }
        (got, messages)
    };
    let ((), (got, messages)) = tokio::join!(sender, receiver);
    // 600 fds need at least three messages of at most 253.
    assert_eq!(messages, 3);
    assert_eq!(got.len(), N);
    // The predecessor closes its copies after the ack: the received sockets carry on alone.
    let sent = std::mem::take(&mut f.parked);

    for (i, (was, mut now)) in sent.into_iter().zip(got).enumerate() {
        let (Parked::Tunnel(was), Parked::Tunnel(now)) = (was, &mut now) else {
            panic!("tunnel {i} changed kind")
        };
        assert_eq!(now.meta, was.meta);
        assert_eq!(now.to_upstream, was.to_upstream);
        assert_eq!(now.to_client, was.to_client);
        assert_eq!(
            now.client.peer_addr().unwrap(),
            f.clients[i].local_addr().unwrap()
        );
        drop(was);
        for s in [&now.client, &now.upstream] {
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
        }

        // Resume as the successor would: pending bytes first, then what the kernel holds.
        let up_live = read_n(&mut now.client, live("up", i).len());
        now.upstream.write_all(&now.to_upstream.bytes).unwrap();
        now.upstream.write_all(&up_live).unwrap();
        let down_live = read_n(&mut now.upstream, live("down", i).len());
        now.client.write_all(&now.to_client.bytes).unwrap();
        now.client.write_all(&down_live).unwrap();

        let want_up = [now.to_upstream.bytes.clone(), live("up", i)].concat();
        assert_eq!(
            read_n(&mut f.servers[i], want_up.len()),
            want_up,
            "tunnel {i} client→upstream"
        );
        let want_down = [now.to_client.bytes.clone(), live("down", i)].concat();
        assert_eq!(
            read_n(&mut f.clients[i], want_down.len()),
            want_down,
            "tunnel {i} upstream→client"
        );
    }
}

/// Sends raw bytes (and fds) on a fresh channel, closes the sender, and returns what the
/// receiver makes of it.
async fn receive_raw(
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<Message, HandoverError> {
    let (mut a, mut b) = Channel::pair().unwrap();
    if !bytes.is_empty() {
        a.send_raw(&[bytes], fds).await.unwrap();
    }
    drop(a);
    b.recv().await.map(|r| r.msg)
}

fn listeners_frame(fd_count: usize) -> Vec<u8> {
    let msg = Message::Listeners {
        listeners: vec![ListenerEntry {
            name: "x".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            protocol: Protocol::Tcp,
        }],
        ticket_keys: 0,
    };
    encode(&msg, 1, 0)
        .map(|mut f| {
            f[12..16].copy_from_slice(&(fd_count as u32).to_be_bytes());
            f.to_vec()
        })
        .unwrap()
}

#[tokio::test]
async fn wrong_fd_counts_are_errors() {
    let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap();
    // Header and entries say 1 fd, none sent.
    let r = receive_raw(&listeners_frame(1), &[]).await;
    assert!(
        matches!(
            r,
            Err(HandoverError::FdCountMismatch {
                header: 1,
                received: 0
            })
        ),
        "{r:?}"
    );
    // Header says 0 fds, one arrives.
    let ack = encode(&Message::Ack { seq: 1, count: 1 }, 0, 0).unwrap();
    let r = receive_raw(&ack, &[x.as_fd()]).await;
    assert!(
        matches!(
            r,
            Err(HandoverError::FdCountMismatch {
                header: 0,
                received: 1
            })
        ),
        "{r:?}"
    );
    // Header says 2 fds and 2 arrive, but the one entry needs 1.
    let r = receive_raw(&listeners_frame(2), &[x.as_fd(), x.as_fd()]).await;
    assert!(
        matches!(
            r,
            Err(HandoverError::FdsForEntries {
                needed: 1,
                header: 2
            })
        ),
        "{r:?}"
    );
}

#[tokio::test]
async fn more_fds_than_the_receiver_has_room_for_is_fatal() {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let (mut a, mut b) = (Channel::new(a), Channel::with_fd_capacity(b, 1));
    let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap();
    // Control space for 1 fd holds a few more after alignment padding; 16 cannot fit.
    let l = [(
        "a",
        "127.0.0.1:1".parse().unwrap(),
        Protocol::Tcp,
        x.as_fd(),
    ); 16];
    send_listeners(&mut a, &l).await.unwrap();
    let r = b.recv().await;
    assert!(matches!(r, Err(HandoverError::ControlTruncated)), "{r:?}");
}

#[tokio::test]
async fn truncated_frames_are_errors() {
    let frame = encode(
        &Message::Ready {
            adopted: vec!["web".into(), "db".into()],
        },
        0,
        0,
    )
    .unwrap();
    for cut in [
        1,
        HEADER_LEN - 1,
        HEADER_LEN,
        HEADER_LEN + 3,
        frame.len() - 1,
    ] {
        let r = receive_raw(&frame[..cut], &[]).await;
        assert!(
            matches!(r, Err(HandoverError::Truncated { .. })),
            "cut {cut}: {r:?}"
        );
    }
    assert!(matches!(
        receive_raw(&[], &[]).await,
        Err(HandoverError::Closed)
    ));
    assert_eq!(
        receive_raw(&frame, &[]).await.unwrap(),
        Message::Ready {
            adopted: vec!["web".into(), "db".into()]
        }
    );
}

#[tokio::test]
async fn bad_magic_future_version_and_garbage_are_errors() {
    let frame = encode(&Message::Abort { reason: "r".into() }, 0, 0).unwrap();
    let mut bad = frame.clone();
    bad[..4].copy_from_slice(b"HTTP");
    assert!(matches!(
        receive_raw(&bad, &[]).await,
        Err(HandoverError::BadMagic(_))
    ));

    let mut future = frame.clone();
    future[4..6].copy_from_slice(&7u16.to_be_bytes());
    let r = receive_raw(&future, &[]).await;
    assert!(
        matches!(
            r,
            Err(HandoverError::UnsupportedVersion { got: 7, ours: 1 })
        ),
        "{r:?}"
    );

    let r = receive_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &[]).await;
    assert!(matches!(r, Err(HandoverError::BadMagic(_))), "{r:?}");

    // A valid header followed by garbage of the announced length.
    let mut g = Header {
        payload_len: 40,
        fd_count: 0,
        bulk_len: 0,
    }
    .encode()
    .to_vec();
    g.extend((0..40u8).map(|i| i.wrapping_mul(97)));
    assert!(matches!(
        receive_raw(&g, &[]).await,
        Err(HandoverError::Json(_))
    ));

    // Pseudo-random garbage, some of it behind the real magic: an error every time.
    let mut state = 0x9e3779b97f4a7c15u64;
    for round in 0..200 {
        let mut bytes: Vec<u8> = (0..64 + round)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        if round % 2 == 0 {
            bytes[..4].copy_from_slice(&MAGIC);
            bytes[4..8].copy_from_slice(&[0, 1, 0, 0]);
        }
        assert!(receive_raw(&bytes, &[]).await.is_err(), "round {round}");
    }
}

#[tokio::test]
async fn a_listening_socket_is_refused_as_a_tunnel_end() {
    {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut a, mut b) = Channel::pair().unwrap();
        let entry = baton::handover::ConnEntry::Tunnel {
            meta: meta(0, c.local_addr().unwrap(), l.local_addr().unwrap()),
            tls: None,
            up_tls: None,
            idle_ms: 0,
            to_upstream: Default::default(),
            to_client: Default::default(),
        };
        a.send(
            &Message::Conns {
                seq: 1,
                conns: vec![entry],
            },
            &[c.as_fd(), l.as_fd()],
            &[],
        )
        .await
        .unwrap();
        let err = recv_conns(b.recv().await.unwrap()).unwrap_err();
        assert!(
            matches!(err, HandoverError::BadFd { index: 1, .. }),
            "{err}"
        );
    }
}

#[tokio::test]
async fn idle_http_connections_fill_messages_of_exactly_253_fds() {
    const N: usize = 300;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut parked, mut clients) = (Vec::new(), Vec::new());
    for i in 0..N {
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, addr) = l.accept().unwrap();
        let mut m = meta(i, addr, l.local_addr().unwrap());
        m.kind = ConnKind::Http;
        let read_ahead = format!("GET /{i} HTTP/1.1\r\n").into_bytes();
        parked.push(Parked::IdleHttp(baton::registry::IdleHttpState {
            meta: m,
            client: s,
            read_ahead,
        }));
        clients.push(c);
    }
    let (mut p, mut s) = Channel::pair().unwrap();
    let sender = async {
        send_conns(&mut p, 9, &parked).await.unwrap();
        expect_ack(&mut p, 9, N).await.unwrap();
    };
    let receiver = async {
        let (mut got, mut fds_per_message) = (Vec::new(), Vec::new());
        while got.len() < N {
            let r = s.recv().await.unwrap();
            fds_per_message.push(r.fds.len());
            let batch = recv_conns(r).unwrap();
            send_ack(&mut s, 9, batch.len()).await.unwrap();
            got.extend(batch);
        }
        (got, fds_per_message)
    };
    let ((), (got, fds_per_message)) = tokio::join!(sender, receiver);
    assert_eq!(fds_per_message, [253, 47]);
    drop(parked);
    for (i, p) in got.into_iter().enumerate() {
        let Parked::IdleHttp(mut h) = p else {
            panic!("connection {i} changed kind")
        };
        assert_eq!(h.read_ahead, format!("GET /{i} HTTP/1.1\r\n").into_bytes());
        h.client.set_nonblocking(false).unwrap();
        h.client.write_all(format!("{i}.").as_bytes()).unwrap();
        clients[i].set_read_timeout(Some(WAIT)).unwrap();
        let want = format!("{i}.").into_bytes();
        assert_eq!(read_n(&mut clients[i], want.len()), want);
    }
}
