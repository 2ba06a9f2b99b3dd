//! An h2c client (hyper's HTTP/2 client, and curl with prior knowledge) whose route reaches an
//! HTTP/1.1 upstream, with the real binary and a raw-socket upstream that sees the exact bytes:
//! split `cookie` fields reach the upstream as one line joined with "; " (RFC 9113 §8.2.3);
//! `http.body_timeout` cuts an upload that pauses, with a 408 before the response and a reset
//! stream after it, and the upstream connection is closed; 1xx interim responses of the
//! upstream do not reach the h2c client (hyper's server has no way to send them) and the final
//! response still does.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
mod http_support;
use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A request body fed by the test: each `Bytes` sent is a data frame; the body ends when the
/// sender is dropped, and until then it may pause as long as the test likes.
struct Fed(mpsc::Receiver<Bytes>);

impl Body for Fed {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|d| d.map(|d| Ok(Frame::data(d))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

fn fed() -> (mpsc::Sender<Bytes>, http_support::TBody) {
    let (tx, rx) = mpsc::channel(4);
    (tx, Fed(rx).map_err(|n| match n {}).boxed())
}

/// POSTs `n` bytes of `x` to `path` (declared with a Content-Length), one every 250 ms, and
/// returns the response's status once the whole body went out.
async fn trickled_post(
    send: &mut hyper::client::conn::http2::SendRequest<http_support::TBody>,
    path: &str,
    n: usize,
) -> http::StatusCode {
    let (tx, body) = fed();
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://site.test{path}"))
        .header("content-length", n.to_string())
        .body(body)
        .unwrap();
    let feeder = tokio::spawn(async move {
        for _ in 0..n {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            tx.send(Bytes::from_static(b"x")).await.unwrap();
        }
    });
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    feeder.await.unwrap();
    resp.status()
}

/// What the upstream saw on one connection: the request head, the body bytes that arrived,
/// and whether the connection was closed by baton (EOF).
#[derive(Debug, Clone, Default)]
struct Seen {
    head: String,
    body: Vec<u8>,
    closed: bool,
}

/// A raw HTTP/1.1 upstream; answers by path:
/// - `/hints`: `103 Early Hints` with a `Link`, then `200` with body `ok`;
/// - `/early`: a `200` chunked head and a first chunk at once, then reads the body;
/// - anything else: reads the request body (by `Content-Length`) and answers `200`, empty.
///
/// A body that stops coming is read until baton closes the connection.
async fn upstream() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s, log.clone()));
        }
    });
    (addr, seen)
}

async fn serve(mut s: TcpStream, log: Arc<Mutex<Vec<Seen>>>) {
    let i = {
        let mut l = log.lock().unwrap();
        l.push(Seen::default());
        l.len() - 1
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // One request head at a time (keep-alive: several per connection).
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    log.lock().unwrap()[i].closed = true;
                    return;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        log.lock().unwrap()[i].head = head.clone();
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        if path == "/hints" {
            let _ = s
                .write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
            continue;
        }
        if path == "/early" {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                .await;
        }
        // The body: as much as comes, until its length or the connection's end.
        while buf.len() < len {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    let mut l = log.lock().unwrap();
                    l[i].body = buf.clone();
                    l[i].closed = true;
                    return;
                }
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    log.lock().unwrap()[i].body = buf[..buf.len().min(len)].to_vec();
                }
            }
        }
        buf.drain(..len);
        let answer: &[u8] = if path == "/early" {
            b"0\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        };
        if s.write_all(answer).await.is_err() {
            return;
        }
    }
}

fn config(app: SocketAddr, http: &str) -> String {
    http_support::config(http, &http_support::upstream("app", &[app], ""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_cookie_fields_reach_an_http1_upstream_as_one_line() {
    let (app, seen) = upstream().await;
    let b = Baton::start(&config(app, ""));
    let (mut send, _conn) = http_support::h2c(b.addr("web")).await;
    // hyper's HTTP/2 client sends each value as its own `cookie` field, as browsers do.
    let req = Request::builder()
        .uri("http://site.test/c")
        .header("cookie", "a=1")
        .header("x-other", "o")
        .header("cookie", "b=2")
        .header("cookie", "c=3; d=4")
        .body(http_support::text(""))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let head = seen.lock().unwrap()[0].head.to_ascii_lowercase();
    let cookies: Vec<&str> = head
        .split("\r\n")
        .filter(|l| l.starts_with("cookie:"))
        .collect();
    assert_eq!(cookies, ["cookie: a=1; b=2; c=3; d=4"], "{head}");
    assert!(head.contains("\r\nx-other: o\r\n"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_timeout_cuts_a_paused_h2c_upload_and_closes_the_upstream_connection() {
    let (app, seen) = upstream().await;
    let b = Baton::start(&config(app, "    http:\n      body_timeout: 2s\n"));
    let (mut send, _conn) = http_support::h2c(b.addr("web")).await;

    // Before any response: 408, and the upstream connection (half a body sent) is closed.
    let (tx, body) = fed();
    let req = Request::builder()
        .method("POST")
        .uri("http://site.test/up")
        .header("content-length", "10")
        .body(body)
        .unwrap();
    tx.send(Bytes::from_static(b"hello")).await.unwrap();
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 408);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(text, "request body timeout\n");
    assert!(
        wait_until(WAIT, || seen
            .lock()
            .unwrap()
            .first()
            .is_some_and(|s| s.closed))
        .await,
        "the upstream connection was kept: {:?}",
        seen.lock().unwrap()
    );
    assert_eq!(seen.lock().unwrap()[0].body, b"hello");
    drop(tx);
    assert!(b
        .log
        .wait_for(&["request failed", "status=408", "side=client"], WAIT)
        .is_some());

    // After the response head: the response is cut (its stream reset), the upstream
    // connection closed.
    let (tx, body) = fed();
    let req = Request::builder()
        .method("POST")
        .uri("http://site.test/early")
        .header("content-length", "10")
        .body(body)
        .unwrap();
    tx.send(Bytes::from_static(b"12345")).await.unwrap();
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .unwrap();
    assert!(got.is_err(), "the response was not cut: {got:?}");
    assert!(
        wait_until(WAIT, || seen
            .lock()
            .unwrap()
            .get(1)
            .is_some_and(|s| s.closed))
        .await,
        "the upstream connection was kept: {:?}",
        seen.lock().unwrap()
    );
    drop(tx);

    // A steady upload with pauses shorter than body_timeout passes: the limit is the pause
    // between two frames, not the whole upload.
    assert_eq!(trickled_post(&mut send, "/steady", 4).await, 200);
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert!(last.head.starts_with("POST /steady "), "{last:?}");
    assert_eq!(last.body, b"xxxx");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informational_responses_do_not_reach_an_h2c_client_but_the_final_one_does() {
    let (app, seen) = upstream().await;
    let b = Baton::start(&config(app, ""));
    let url = format!("http://{}/hints", b.addr("web"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args([
                "-sS",
                "-v",
                "--http2-prior-knowledge",
                "--max-time",
                "20",
                &url,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (body, verbose) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{verbose}");
    assert_eq!(body, "ok");
    assert!(verbose.contains("< HTTP/2 200"), "{verbose}");
    // The upstream did send its 103 (it reached baton)...
    assert!(seen.lock().unwrap()[0].head.starts_with("GET /hints "));
    // ...and the h2c client saw none: hyper's HTTP/2 server gives the service no way to send
    // an interim HEADERS frame (docs/http.md, "Bridges"). If this starts failing, 1xx are
    // forwarded now: update the docs.
    assert!(!verbose.contains("< HTTP/2 103"), "{verbose}");
    assert!(
        !verbose.to_ascii_lowercase().contains("< link:"),
        "{verbose}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_timeout_counts_from_the_end_of_an_h2c_upload() {
    let (app, seen) = upstream().await;
    // The upstream answers once the body is whole; the upload takes 2.5 s, the upstream has
    // 1 s to answer. It used to count from the start of the request: 504 in the middle of it.
    let ups = http_support::upstream("app", &[app], "    http:\n      response_timeout: 1s\n");
    let b = Baton::start(&http_support::config("", &ups));
    let (mut send, _conn) = http_support::h2c(b.addr("web")).await;
    assert_eq!(trickled_post(&mut send, "/slow-upload", 10).await, 200);
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert!(last.head.starts_with("POST /slow-upload "), "{last:?}");
    assert_eq!(last.body, b"xxxxxxxxxx");
}
