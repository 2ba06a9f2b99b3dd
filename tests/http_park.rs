//! The handover hooks of HTTP connections, driven in-process through the registry exactly as the
//! lifecycle drives them: `park_all` stops an idle keep-alive connection with its read-ahead
//! bytes, `proxy::resume` serves it again, and the client never notices.
#![allow(clippy::unwrap_used)]
mod http_support;
use baton::proxy;
use baton::registry::{ConnKind, Parked};
use http_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Resumes a connection parked with at most `GET /headers HTTP/1.1\r\nHo` read ahead, sends
/// the rest of that head, and returns the body of the 200 that must come back.
async fn resume_half_sent(st: &Setup, parked: Parked, c: &mut TcpStream) -> String {
    let read_ahead = match &parked {
        Parked::IdleHttp(h) => String::from_utf8_lossy(&h.read_ahead).into_owned(),
        Parked::Http(h) => {
            assert_eq!(h.state.phase, baton::proxy::http::h1::state::Phase::Head);
            assert!(h.upstream.is_none());
            String::from_utf8_lossy(&h.state.cbuf).into_owned()
        }
        Parked::Tunnel(_) | Parked::Pooled(_) => panic!("expected an http connection"),
    };
    assert!(
        read_ahead.is_empty() || "GET /headers HTTP/1.1\r\nHo".starts_with(&read_ahead),
        "{read_ahead:?}"
    );
    proxy::resume(st.ctx.clone(), parked).await;
    c.write_all(b"st: resumed.test\r\n\r\n").await.unwrap();
    let (head, body) = read_response(c).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    String::from_utf8_lossy(&body).into_owned()
}

/// Reads one response with a Content-Length body; returns head and body.
async fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            if got.len() >= end + 4 + len {
                return (head, got[end + 4..end + 4 + len].to_vec());
            }
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_parks_with_read_ahead_and_resumes() {
    let mut st = setup("").await;
    let mut c = TcpStream::connect(st.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut c).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"hello from app\n");
    // Half of the next request is on its way when the handover starts.
    c.write_all(b"GET /headers HTTP/1.1\r\nHo").await.unwrap();
    // Either hyper has read these bytes (they travel as read-ahead) or the kernel still holds
    // them: both must reach the resumed connection, so no wait is needed for correctness.
    tokio::task::yield_now().await;
    st.registry.park_all();
    let parked = tokio::time::timeout(WAIT, st.parked.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(parked.meta().kind, ConnKind::Http);
    // The handle deregisters right after sending the parked value.
    tokio::time::timeout(WAIT, st.registry.wait_empty())
        .await
        .unwrap();
    let body = resume_half_sent(&st, parked, &mut c).await;
    assert!(
        body.contains("uri: /headers\n") && body.contains("host: resumed.test\n"),
        "{body}"
    );
}

/// A connection in the middle of a response parks as it is (client and upstream sockets, both
/// buffers, the framing) and the resumed connection finishes that same response byte for byte,
/// then serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_connection_parks_mid_response_and_resumes_it() {
    let mut st = setup("").await;
    let mut c = TcpStream::connect(st.addr).await.unwrap();
    let size = 8 * 1024 * 1024;
    c.write_all(format!("GET /download/{size} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut first = [0u8; 1];
    c.read_exact(&mut first).await.unwrap();
    st.registry.park_all();
    let parked = tokio::time::timeout(WAIT, st.parked.recv())
        .await
        .unwrap()
        .unwrap();
    let Parked::Http(h) = &parked else {
        panic!("expected an http connection in flight")
    };
    assert_eq!(
        h.state.phase,
        baton::proxy::http::h1::state::Phase::Exchange
    );
    assert!(h.upstream.is_some(), "the upstream socket moves with it");
    tokio::time::timeout(WAIT, st.registry.wait_empty())
        .await
        .unwrap();
    proxy::resume(st.ctx.clone(), parked).await;
    // The rest of the same response arrives, without `connection: close`.
    let mut buf = vec![0u8; 65536];
    let mut full = first.to_vec();
    loop {
        if let Some(end) = full.windows(4).position(|w| w == b"\r\n\r\n") {
            if full.len() >= end + 4 + size {
                let head = String::from_utf8_lossy(&full[..end]).to_ascii_lowercase();
                assert!(!head.contains("connection: close"), "{head}");
                assert_eq!(full.len(), end + 4 + size, "nothing more than the body");
                break;
            }
        }
        let n = tokio::time::timeout(WAIT, c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        full.extend_from_slice(&buf[..n]);
    }
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut c).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"hello from app\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_an_idle_connection() {
    let st = setup("").await;
    let mut c = TcpStream::connect(st.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_response(&mut c).await;
    st.registry.drain_all();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, c.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed after drain");
    tokio::time::timeout(WAIT, st.registry.wait_empty())
        .await
        .unwrap();
}

/// A keep-alive connection idle for longer than the idle release (1 s: hyper's buffers are
/// dropped and the connection waits for readability with none) still serves its next request,
/// and still parks with its read-ahead bytes for a handover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_idle_connection_serves_and_parks() {
    let mut st = setup("").await;
    let mut c = TcpStream::connect(st.addr).await.unwrap();
    for _ in 0..2 {
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_response(&mut c).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, b"hello from app\n");
        // Idle past the release; the assertions hold whether or not it happened in time.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    }
    c.write_all(b"GET /headers HTTP/1.1\r\nHo").await.unwrap();
    tokio::task::yield_now().await;
    st.registry.park_all();
    let parked = tokio::time::timeout(WAIT, st.parked.recv())
        .await
        .unwrap()
        .unwrap();
    let body = resume_half_sent(&st, parked, &mut c).await;
    assert!(body.contains("host: resumed.test\n"), "{body}");
}
