//! [`TlsStream`] on real 127.0.0.1 sockets with a real rustls client (blocking, in a thread):
//! echo with KeyUpdates both ways, park → JSON → resume mid-conversation (also with half a
//! record read), park refused while records wait, close_notify both ways.

use super::interop::{configs, Configs};
use crate::tls::record::protect::complete;
use crate::tls::record::{client_random, ParkError, ParkedTls, Session, TlsStream, Version};
use bytes::BytesMut;
use rustls::crypto::ring::cipher_suite as suites;
use rustls::{ClientConnection, ServerConnection, StreamOwned};
use std::future::poll_fn;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream as StdTcp;
use std::sync::mpsc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// baton's side of a handshake, as the termination's driver does it: rustls is fed whole
/// records only, so when the handshake ends any further ciphertext is still ours.
pub async fn accept(mut tcp: TcpStream, c: &Configs) -> TlsStream {
    let mut conn = ServerConnection::new(c.server.clone()).expect("server");
    let mut first = Vec::new();
    let mut random = None;
    let mut buf = BytesMut::new();
    loop {
        while conn.wants_write() {
            let mut out = Vec::new();
            conn.write_tls(&mut out).expect("write_tls");
            tcp.write_all(&out).await.expect("send handshake");
        }
        if !conn.is_handshaking() {
            break;
        }
        let len = loop {
            if let Some(len) = complete(Version::Tls13, &buf).expect("record length") {
                break len;
            }
            assert!(
                tcp.read_buf(&mut buf).await.expect("read") > 0,
                "eof in handshake"
            );
        };
        let rec = buf.split_to(len);
        if random.is_none() {
            first.extend_from_slice(&rec);
            random = client_random(&first);
        }
        conn.read_tls(&mut &rec[..]).expect("read_tls");
        conn.process_new_packets().expect("handshake");
    }
    let random = random.expect("client random");
    let (session, plain) = Session::from_rustls(conn, &random, &c.keylog).expect("take over");
    TlsStream::new(tcp, session, plain, buf.to_vec())
}

/// Configs for `suite` and a listener on an OS-chosen port.
async fn setup(
    suite: rustls::SupportedCipherSuite,
) -> (Configs, TcpListener, std::net::SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (configs(suite), listener, addr)
}

type Client = StreamOwned<ClientConnection, StdTcp>;

fn connect(c: &Configs, addr: std::net::SocketAddr) -> Client {
    let sock = StdTcp::connect(addr).expect("connect");
    let conn = ClientConnection::new(c.client.clone(), "localhost".try_into().expect("name"))
        .expect("client");
    StreamOwned::new(conn, sock)
}

/// Echoes lines until the client's close_notify, then closes with ours.
async fn echo(mut s: TlsStream) -> TlsStream {
    let mut buf = BytesMut::new();
    loop {
        let n = poll_fn(|cx| s.poll_read_buf(cx, &mut buf))
            .await
            .expect("read");
        if n == 0 {
            return s;
        }
        s.write_all(&buf).await.expect("write");
        s.flush().await.expect("flush");
        buf.clear();
    }
}

fn line(client: &mut BufReader<Client>, text: &str) {
    client
        .get_mut()
        .write_all(format!("{text}\n").as_bytes())
        .expect("client write");
    client.get_mut().flush().expect("client flush");
    let mut got = String::new();
    client.read_line(&mut got).expect("client read");
    assert_eq!(got, format!("{text}\n"));
}

async fn echo_with_key_updates(suite: rustls::SupportedCipherSuite) {
    let (c, listener, addr) = setup(suite).await;
    let cc = c.clone();
    let (to_server, from_client) = mpsc::channel::<()>();
    let client = std::thread::spawn(move || {
        let mut cl = BufReader::new(connect(&cc, addr));
        line(&mut cl, "one");
        cl.get_mut()
            .conn
            .refresh_traffic_keys()
            .expect("key update");
        line(&mut cl, "two, after the client's KeyUpdate");
        to_server.send(()).expect("signal");
        for i in 0..50 {
            line(&mut cl, &format!("line {i}"));
        }
        let big = "x".repeat(100_000);
        line(&mut cl, &big);
        cl.get_mut().conn.send_close_notify();
        cl.get_mut().flush().expect("flush close");
        let mut rest = Vec::new();
        cl.read_to_end(&mut rest).expect("clean close from baton");
        assert!(rest.is_empty());
    });
    let (tcp, _) = listener.accept().await.expect("accept");
    let mut s = accept(tcp, &c).await;
    // Serve the first two lines, then start a KeyUpdate of our own (asking the client).
    let mut buf = BytesMut::new();
    for _ in 0..2 {
        while !buf.ends_with(b"\n") {
            poll_fn(|cx| s.poll_read_buf(cx, &mut buf))
                .await
                .expect("read");
        }
        s.write_all(&buf).await.expect("write");
        s.flush().await.expect("flush");
        buf.clear();
    }
    tokio::task::spawn_blocking(move || from_client.recv())
        .await
        .expect("join")
        .expect("signal");
    s.request_key_update(true);
    let mut s = echo(s).await;
    s.shutdown().await.expect("close_notify");
    client.join().expect("client thread");
    let (rx_gen, tx_gen) = s.session().generations();
    assert!(
        rx_gen >= 2 && tx_gen >= 2,
        "updates both ways: {rx_gen} {tx_gen}"
    );
}

#[tokio::test]
async fn echo_aes128gcm() {
    echo_with_key_updates(suites::TLS13_AES_128_GCM_SHA256).await;
}

#[tokio::test]
async fn echo_aes256gcm() {
    echo_with_key_updates(suites::TLS13_AES_256_GCM_SHA384).await;
}

#[tokio::test]
async fn echo_chacha20poly1305() {
    echo_with_key_updates(suites::TLS13_CHACHA20_POLY1305_SHA256).await;
}

/// Parks in one runtime, goes through JSON, resumes in another (as a successor would).
fn park_and_resume(s: TlsStream) -> TlsStream {
    let (sock, parked, settled) = match s.park() {
        Ok(p) => p,
        Err(ParkError::Busy(_)) => panic!("a failed session"),
        Err(ParkError::Session(e)) => panic!("session: {e}"),
        Err(ParkError::Socket(e)) => panic!("socket: {e}"),
    };
    assert_eq!(settled, 0, "no write was unfinished");
    let json = serde_json::to_vec(&parked).expect("serialize");
    drop(parked);
    let parked: ParkedTls = serde_json::from_slice(&json).expect("deserialize");
    let fd = sock.try_clone().expect("dup, as SCM_RIGHTS would");
    drop(sock);
    TlsStream::resume(fd, parked).expect("resume")
}

#[tokio::test]
async fn parks_mid_conversation_with_half_a_record_read() {
    let (c, listener, addr) = setup(suites::TLS13_AES_128_GCM_SHA256).await;
    let cc = c.clone();
    let (half_sent, half_seen) = mpsc::channel::<()>();
    let (go_on, wait_go) = mpsc::channel::<()>();
    let client = std::thread::spawn(move || {
        let mut cl = BufReader::new(connect(&cc, addr));
        line(&mut cl, "before the park");
        // One record, written in two halves with the park in between.
        cl.get_mut()
            .conn
            .writer()
            .write_all(b"split record\n")
            .expect("write");
        let mut wire = Vec::new();
        cl.get_mut().conn.write_tls(&mut wire).expect("write_tls");
        let (a, b) = wire.split_at(wire.len() / 2);
        cl.get_mut().sock.write_all(a).expect("first half");
        half_sent.send(()).expect("signal");
        wait_go.recv().expect("go on");
        cl.get_mut().sock.write_all(b).expect("second half");
        let mut got = String::new();
        cl.read_line(&mut got).expect("echo of the split record");
        assert_eq!(got, "split record\n");
        line(&mut cl, "after the park");
        cl.get_mut().conn.send_close_notify();
        cl.get_mut().flush().expect("flush");
    });
    let (tcp, _) = listener.accept().await.expect("accept");
    let mut s = accept(tcp, &c).await;
    let mut buf = BytesMut::new();
    while !buf.ends_with(b"\n") {
        poll_fn(|cx| s.poll_read_buf(cx, &mut buf))
            .await
            .expect("read");
    }
    s.write_all(&buf).await.expect("write");
    s.flush().await.expect("flush");
    tokio::task::spawn_blocking(move || half_seen.recv())
        .await
        .expect("join")
        .expect("signal");
    // Read until the half record is in our buffer (a read yields nothing until it is whole).
    buf.clear();
    while s.buffered_cipher() == 0 {
        let r = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            poll_fn(|cx| s.poll_read_buf(cx, &mut buf)),
        )
        .await;
        assert!(r.is_err(), "half a record yields no plaintext");
    }
    let s = park_and_resume(s);
    assert!(
        s.buffered_cipher() > 0,
        "the half record moved with the session"
    );
    go_on.send(()).expect("go on");
    let s = echo(s).await;
    assert!(s.session().received_close());
    client.join().expect("client thread");
}

#[tokio::test]
async fn parks_with_records_the_socket_did_not_take_and_they_arrive_once() {
    let (c, listener, addr) = setup(suites::TLS13_CHACHA20_POLY1305_SHA256).await;
    let cc = c.clone();
    let (parked, wait_parked) = mpsc::channel::<()>();
    let client = std::thread::spawn(move || {
        let mut cl = connect(&cc, addr);
        cl.write_all(b"hi").expect("handshake and hello");
        wait_parked.recv().expect("server parked");
        // Everything the server sealed arrives, then exactly its close_notify.
        let mut all = Vec::new();
        cl.read_to_end(&mut all).expect("read all");
        all.len()
    });
    let (tcp, _) = listener.accept().await.expect("accept");
    let mut s = accept(tcp, &c).await;
    let mut buf = BytesMut::new();
    poll_fn(|cx| s.poll_read_buf(cx, &mut buf))
        .await
        .expect("read hi");
    // Write until the socket pushes back (the client does not read): a write is left
    // unfinished, its records waiting in our buffer.
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0usize;
    loop {
        let pushed_back = std::sync::atomic::AtomicBool::new(false);
        let n = poll_fn(|cx| match s.poll_write(cx, &chunk) {
            std::task::Poll::Pending => {
                pushed_back.store(true, std::sync::atomic::Ordering::Relaxed);
                std::task::Poll::Ready(0)
            }
            std::task::Poll::Ready(r) => std::task::Poll::Ready(r.expect("write")),
        })
        .await;
        if pushed_back.into_inner() {
            break;
        }
        written += n;
    }
    assert!(s.wants_write());
    // Park now: the unwritten records move; the unfinished write counts as done.
    let (sock, parked_tls, settled) = match s.park() {
        Ok(p) => p,
        Err(_) => panic!("park"),
    };
    assert!(settled > 0 && !parked_tls.unsent.is_empty());
    written += settled;
    let json = serde_json::to_vec(&parked_tls).expect("serialize");
    let mut s = TlsStream::resume(sock, serde_json::from_slice(&json).expect("deserialize"))
        .expect("resume");
    parked.send(()).expect("signal");
    s.shutdown().await.expect("flush and close");
    let got = tokio::task::spawn_blocking(move || client.join().expect("client"))
        .await
        .expect("join");
    assert_eq!(got, written, "every byte once, nothing more");
}
