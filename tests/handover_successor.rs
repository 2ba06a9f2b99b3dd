//! A real `baton run` as successor, with this test playing its predecessor. One that goes
//! silent at a step of the protocol makes the successor give up at that step's deadline
//! (`upgrade_timeout`); one that is gone before the commit (its end of the channel closed:
//! crashed, killed, or dropped the channel without a word) makes it give up at once. Either
//! way the successor exits non-zero and closes its listeners: it never lives on as a second,
//! half-started proxy. Each successor is killed and reaped when its test ends ([`Reaped`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use baton::handover::session::{Deadline, Peer, Predecessor};
use baton::handover::{handshake, spawn_successor, Spawned};
use baton::registry::{ConnKind, ConnMeta, Parked, TunnelState};
use common::{listening_addrs, Reaped, WAIT};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::Instant;

/// Where the predecessor stops talking (it keeps its end of the channel open).
#[derive(Debug, Clone, Copy)]
enum Silent {
    /// Says nothing at all.
    FromTheStart,
    /// Sends five bytes of a frame header, then nothing.
    MidHeader,
    /// Answers the Hello, then nothing.
    AfterHello,
    /// Offers a listener and receives Ready, then nothing (no batch, no commit).
    AfterReady,
}

/// Where the predecessor goes away: its end of the channel closes, before any `Commit`.
#[derive(Debug, Clone, Copy)]
enum Gone {
    /// Before saying anything.
    AtOnce,
    /// After five bytes of a frame header.
    MidHeader,
    /// After the Hello exchange.
    AfterHello,
    /// After the successor took the listeners and said Ready.
    AfterReady,
    /// After the successor said Ready, in the middle of the next frame (killed as it wrote).
    MidBatch,
    /// After the successor acknowledged a batch with a live tunnel (which it holds).
    AfterBatch,
}

/// A successor on a config with listener `t` (offered by the test, so adopted) and `own`
/// (bound by the successor itself), each step waiting at most `upgrade_timeout`.
fn start(dir: &tempfile::TempDir, upgrade_timeout: &str) -> (Reaped, baton::handover::Channel) {
    let config = dir.path().join("config.yaml");
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(
        &config,
        format!(
            "runtime:\n  upgrade_timeout: {upgrade_timeout}\nlisteners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\n  own:\n    listen: 127.0.0.1:0\n    upstream: u\nupstreams:\n  u:\n    servers: [\"{dead}\"]\n"
        ),
    )
    .unwrap();
    let args: Vec<std::ffi::OsString> = vec![
        "run".into(),
        "-c".into(),
        config.into_os_string(),
        "--generation".into(),
        "2".into(),
    ];
    let Spawned { child, channel } =
        spawn_successor(std::path::Path::new(env!("CARGO_BIN_EXE_baton")), &args).unwrap();
    (Reaped(child), channel)
}

/// Waits (bounded) for the successor to exit by itself; asserts it failed.
async fn exits_by_itself(child: &mut Reaped, what: &str) {
    let started = Instant::now();
    let st = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap_or_else(|_| panic!("{what}: the successor lives on"))
        .unwrap();
    eprintln!(
        "{what}: successor gave up after {:?}: {st}",
        started.elapsed()
    );
    assert!(!st.success(), "{what}: exited {st}");
}

async fn silent_predecessor(at: Silent) {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, channel) = start(&dir, "1s");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Kept until the end: a closed channel would read as "predecessor gone", not silence.
    let mut keep = (None, None);
    match at {
        Silent::FromTheStart => keep.0 = Some(channel),
        Silent::MidHeader => {
            let mut ch = channel;
            ch.send_raw(&[b"BTNH\0"], &[]).await.unwrap();
            keep.0 = Some(ch);
        }
        Silent::AfterHello | Silent::AfterReady => {
            let mut p = Predecessor::new(channel, Peer::Remote, Deadline::new(WAIT, "test"));
            p.hello().await.unwrap();
            if let Silent::AfterReady = at {
                let offer = ("t", addr, baton::config::Protocol::Tcp, listener.as_fd());
                p.offer_listeners(&[offer]).await.unwrap();
                assert_eq!(p.await_ready().await.unwrap(), ["t"]);
            }
            keep.1 = Some(p);
        }
    }
    exits_by_itself(&mut child, &format!("{at:?}")).await;
    drop(keep);
}

/// A live tunnel as the old process would park it: (client, server, the parked value).
fn tunnel(listener: &str) -> (TcpStream, TcpStream, Parked) {
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let back = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(front.local_addr().unwrap()).unwrap();
    let (proxy_client, caddr) = front.accept().unwrap();
    let proxy_upstream = TcpStream::connect(back.local_addr().unwrap()).unwrap();
    let (server, _) = back.accept().unwrap();
    let parked = Parked::Tunnel(TunnelState {
        client_tls: None,
        idle_ms: 0,
        meta: ConnMeta {
            listener: listener.into(),
            client: caddr,
            server: Some(back.local_addr().unwrap()),
            kind: ConnKind::Tcp,
            started_ms: 1,
            bytes_in: 0,
            bytes_out: 0,
        },
        client: proxy_client,
        upstream: proxy_upstream,
        upstream_tls: None,
        to_upstream: Default::default(),
        to_client: Default::default(),
    });
    (client, server, parked)
}

/// The successor `pid` listens on `adopted` (ours) and on one address of its own: returns it.
fn own_listener(pid: u32, adopted: SocketAddr, what: &str) -> SocketAddr {
    let held = listening_addrs(pid);
    assert!(held.contains(&adopted), "{what}: t not adopted: {held:?}");
    held.into_iter()
        .find(|a| *a != adopted)
        .unwrap_or_else(|| panic!("{what}: `own` not bound"))
}

async fn gone_predecessor(at: Gone) {
    let what = format!("{at:?}");
    // A deadline far beyond the wait below: the successor must go because the channel
    // closed, not because a step timed out.
    let dir = tempfile::tempdir().unwrap();
    let (mut child, channel) = start(&dir, "120s");
    let pid = child.id().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // The listener the successor bound itself, and the client of a tunnel it holds.
    let mut own: Option<SocketAddr> = None;
    let mut client: Option<TcpStream> = None;
    match at {
        Gone::AtOnce => drop(channel),
        Gone::MidHeader => {
            let mut ch = channel;
            ch.send_raw(&[b"BTNH\0"], &[]).await.unwrap();
        }
        Gone::MidBatch => {
            let mut ch = channel;
            let offer = ("t", addr, baton::config::Protocol::Tcp, listener.as_fd());
            let ready = async {
                handshake::predecessor_hello(&mut ch).await?;
                handshake::send_listeners(&mut ch, &[offer]).await?;
                handshake::recv_ready(&mut ch).await
            };
            let adopted = tokio::time::timeout(WAIT, ready).await.unwrap().unwrap();
            assert_eq!(adopted, ["t"]);
            own = Some(own_listener(pid, addr, &what));
            ch.send_raw(&[b"BTNH\0"], &[]).await.unwrap();
        }
        Gone::AfterHello | Gone::AfterReady | Gone::AfterBatch => {
            let mut p = Predecessor::new(channel, Peer::Remote, Deadline::new(WAIT, "test"));
            p.hello().await.unwrap();
            if !matches!(at, Gone::AfterHello) {
                let offer = ("t", addr, baton::config::Protocol::Tcp, listener.as_fd());
                p.offer_listeners(&[offer]).await.unwrap();
                assert_eq!(p.await_ready().await.unwrap(), ["t"]);
                own = Some(own_listener(pid, addr, &what));
            }
            if let Gone::AfterBatch = at {
                let (c, _server, parked) = tunnel("t");
                p.send_batch(std::slice::from_ref(&parked)).await.unwrap();
                // The successor owns it now: ours closes, as the old process's would.
                drop(parked);
                client = Some(c);
            }
        }
    }
    exits_by_itself(&mut child, &what).await;
    if let Some(own) = own {
        let refused = TcpStream::connect(own).map_err(|e| e.kind());
        assert_eq!(
            refused.err(),
            Some(std::io::ErrorKind::ConnectionRefused),
            "{what}: `own` ({own}) still listens"
        );
    }
    // The tunnel it held (never served, since no commit came) is closed, not left open.
    if let Some(mut c) = client {
        c.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 1];
        let n = c.read(&mut buf);
        assert!(
            matches!(n, Ok(0)) || n.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{what}: the held tunnel is still open"
        );
    }
}

#[tokio::test]
async fn a_silent_predecessor_from_the_start() {
    silent_predecessor(Silent::FromTheStart).await;
}

#[tokio::test]
async fn a_predecessor_silent_mid_header() {
    silent_predecessor(Silent::MidHeader).await;
}

#[tokio::test]
async fn a_predecessor_silent_after_hello() {
    silent_predecessor(Silent::AfterHello).await;
}

#[tokio::test]
async fn a_predecessor_silent_after_ready() {
    silent_predecessor(Silent::AfterReady).await;
}

#[tokio::test]
async fn a_predecessor_gone_at_once() {
    gone_predecessor(Gone::AtOnce).await;
}

#[tokio::test]
async fn a_predecessor_gone_mid_header() {
    gone_predecessor(Gone::MidHeader).await;
}

#[tokio::test]
async fn a_predecessor_gone_after_hello() {
    gone_predecessor(Gone::AfterHello).await;
}

#[tokio::test]
async fn a_predecessor_gone_after_ready_closes_the_listeners() {
    gone_predecessor(Gone::AfterReady).await;
}

#[tokio::test]
async fn a_predecessor_gone_mid_batch() {
    gone_predecessor(Gone::MidBatch).await;
}

#[tokio::test]
async fn a_predecessor_gone_after_a_batch_closes_what_it_handed_over() {
    gone_predecessor(Gone::AfterBatch).await;
}
