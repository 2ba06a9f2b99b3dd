//! RFC 9110 / 9112 conformance of the HTTP/1.1 engine, response side, end to end: responses
//! of every framing from a scripted raw backend (see `capture::scripted`), 1xx, trailers,
//! HTTP/1.0 upstreams and upgrades, as a raw client sees them.
#![allow(clippy::unwrap_used)]
mod capture;
mod common;
use capture::*;
use common::Baton;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_framing() {
    let (app, cap) = backend(scripted).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let addr = b.addr("web");
    // The pool reuses a healthy connection (so "not reused" below means something).
    let mut c = Client::connect(addr).await;
    for _ in 0..2 {
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(c.response(false).await.unwrap().status, 200);
    }
    let got = cap.reqs();
    assert_eq!(
        (got[0].conn, got[1].conn),
        (0, 0),
        "pooled connection not reused"
    );

    // CL with TE from the upstream: chunked wins and CL is removed.
    c.send(b"GET /cl-te HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let r = c.response(false).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers("content-length"),
        Vec::<&str>::new(),
        "{:?}",
        r.head
    );
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(dechunk(&r.body), b"hello");
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(c.response(false).await.unwrap().status, 200, "client kept");

    // Invalid framing in the head: 502, and the upstream connection is dropped.
    for path in ["/bad-cl", "/two-cl"] {
        cap.clear();
        let closed = cap.closed();
        let r = send_one(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 502, "{path}: {:?}", r.head);
        let bad_conn = cap.one().conn;
        assert!(
            common::wait_until(WAIT, || cap.closed() > closed).await,
            "{path}: upstream connection kept open"
        );
        cap.clear();
        send_one(addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_ne!(cap.one().conn, bad_conn, "{path}: broken connection reused");
    }
    // Invalid chunked framing in the body: the response cannot complete, and the upstream
    // connection is dropped.
    cap.clear();
    let closed = cap.closed();
    let mut c = Client::connect(addr).await;
    c.send(b"GET /bad-chunk HTTP/1.1\r\nHost: a\r\n\r\n").await;
    // Head and broken body came in one segment: nothing was sent yet, so a 502 (it was an
    // empty close, the parsed head dropped).
    let r = c
        .response(false)
        .await
        .expect("no response to a broken body");
    assert_eq!(r.status, 502, "{:?} {:?}", r.head, r.body_text());
    c.until_closed().await;
    let bad_conn = cap.one().conn;
    assert!(common::wait_until(WAIT, || cap.closed() > closed).await);
    cap.clear();
    send_one(addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_ne!(cap.one().conn, bad_conn, "broken chunked connection reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_heads_and_bad_trailers_from_the_upstream() {
    let (app, _cap) = backend(scripted).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let addr = b.addr("web");
    // (path, status): a head larger than one 32 KiB buffer but within max_header_bytes
    // (64 KiB) passes (it used to wait for response_timeout: 504 after 30 s); past it, 502.
    // A trailer section that is not field lines, or names a framing field: 502 (nothing of
    // the response was sent yet).
    for (path, status) in [
        ("/big-head/40000", 200),
        ("/big-head/65000", 200),
        ("/big-head/70000", 502),
        ("/bad-trailer", 502),
        ("/cl-trailer", 502),
        ("/", 200),
    ] {
        let t = std::time::Instant::now();
        let r = send_one(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(r.status, status, "{path}: {:?}", r.head.first());
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{path}: {:?}",
            t.elapsed()
        );
        if status == 200 && path.starts_with("/big-head/") {
            let n: usize = path["/big-head/".len()..].parse().unwrap();
            assert_eq!(r.header("x-big").map(str::len), Some(n), "{path}");
            assert_eq!(r.body_text(), "ok");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_timeout_counts_from_the_end_of_the_upload() {
    let (app, cap) = backend(scripted).await;
    // The backend answers once the body is whole; the upload takes 2.5 s, the upstream has 1 s
    // to answer. It used to count from the start of the request: 504 in the middle of it.
    let yaml = conf("", &[("app", app)]) + "    http:\n      response_timeout: 1s\n";
    let b = Baton::start(&yaml);
    let mut c = Client::connect(b.addr("web")).await;
    c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
        .await;
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        c.send(b"x").await;
    }
    let r = c.response(false).await.unwrap();
    assert_eq!(
        (r.status, r.body_text().as_str()),
        (200, "ok"),
        "{:?}",
        r.head
    );
    assert_eq!(cap.one().body, b"xxxxxxxxxx");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodyless_responses() {
    let (app, cap) = backend(scripted).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let addr = b.addr("web");
    let mut c = Client::connect(addr).await;
    // (request, is HEAD, status, content-length the client sees)
    for (req, head, status, cl) in [
        (
            &b"HEAD /head HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            true,
            200,
            Some("5"),
        ),
        (b"GET /204 HTTP/1.1\r\nHost: a\r\n\r\n", false, 204, None),
        (
            b"GET /204-body HTTP/1.1\r\nHost: a\r\n\r\n",
            false,
            204,
            None,
        ),
        (
            b"GET /304 HTTP/1.1\r\nHost: a\r\n\r\n",
            false,
            304,
            Some("5"),
        ),
    ] {
        c.send(req).await;
        let r = c.response(head).await.unwrap();
        assert_eq!(r.status, status, "{}", show(req));
        assert_eq!(
            r.header("content-length"),
            cl,
            "{}: {:?}",
            show(req),
            r.head
        );
        assert_eq!(r.header("transfer-encoding"), None, "{}", show(req));
        // Nothing of a body follows: the next response comes next.
        c.send(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n").await;
        let n = c.response(false).await.unwrap();
        assert_eq!(
            (n.status, n.body_text().as_str()),
            (200, "ok"),
            "after {}",
            show(req)
        );
    }
    // 1xx: the interim response passes, then the final one.
    c.send(b"GET /103 HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let r = c.response(false).await.unwrap();
    assert_eq!(r.status, 103);
    assert_eq!(r.header("link"), Some("</s.css>; rel=preload"));
    let r = c.response(false).await.unwrap();
    assert_eq!((r.status, r.body_text().as_str()), (200, "ok"));
    assert!(cap.reqs().len() >= 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_pass_both_ways() {
    let (app, cap) = backend(scripted).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let addr = b.addr("web");
    let mut c = Client::connect(addr).await;
    c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 42\r\n\r\n").await;
    assert_eq!(c.response(false).await.unwrap().status, 200);
    let got = cap.one();
    assert_eq!(got.header("trailer"), Some("X-Sum"));
    assert_eq!(show(&got.body), "5\r\nhello\r\n0\r\nX-Sum: 42\r\n\r\n");
    c.send(b"GET /trailers HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let r = c.response(false).await.unwrap();
    assert_eq!(r.header("trailer"), Some("X-Sum"), "{:?}", r.head);
    assert_eq!(r.body_text(), "5\r\nhello\r\n0\r\nX-Sum: 42\r\n\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_upstream_keeps_the_client_on_http11() {
    let (app, cap) = backend(scripted).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let mut c = Client::connect(b.addr("web")).await;
    for _ in 0..2 {
        c.send(b"GET /http10-keep HTTP/1.1\r\nHost: a\r\n\r\n")
            .await;
        let r = c.response(false).await.unwrap();
        assert!(r.head[0].starts_with("HTTP/1.1 200"), "{:?}", r.head);
        assert_eq!(r.header("content-length"), Some("2"));
        assert_eq!(r.header("connection"), None, "{:?}", r.head);
        assert_eq!(r.body_text(), "ok");
    }
    // The 1.0 upstream's keep-alive connection is reused too.
    let got = cap.reqs();
    assert_eq!((got[0].conn, got[1].conn), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_closes_after_its_response_keeps_the_client() {
    let (app, _cap) = backend(scripted).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let mut c = Client::connect(b.addr("web")).await;
    // HTTP/1.0, close-delimited: the 1.1 client gets it chunked and keeps its connection.
    c.send(b"GET /http10-close HTTP/1.1\r\nHost: a\r\n\r\n")
        .await;
    let r = c.response(false).await.unwrap();
    assert!(r.head[0].starts_with("HTTP/1.1 200"), "{:?}", r.head);
    assert_eq!(
        r.header("transfer-encoding"),
        Some("chunked"),
        "{:?}",
        r.head
    );
    assert_eq!(r.header("connection"), None, "{:?}", r.head);
    assert_eq!(dechunk(&r.body), b"old server", "{:?}", r.body_text());
    // HTTP/1.0 (and 1.1 with Connection: close) with a length, then close.
    for path in ["/http10-cl", "/close-cl"] {
        c.send(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await;
        let r = c.response(false).await.unwrap();
        assert!(
            r.head[0].starts_with("HTTP/1.1 200"),
            "{path}: {:?}",
            r.head
        );
        assert_eq!(r.header("content-length"), Some("2"), "{path}");
        assert_eq!(r.header("connection"), None, "{path}: {:?}", r.head);
        assert_eq!(r.body_text(), "ok", "{path}");
    }
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(
        c.response(false).await.unwrap().status,
        200,
        "client connection kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_passes_through() {
    let (app, cap) = backend(scripted).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let mut c = Client::connect(b.addr("web")).await;
    // The body is sent only after the upstream's 100 reached the client.
    c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let r = c.response(false).await.unwrap();
    assert_eq!(r.status, 100, "{:?}", r.head);
    c.send(b"hello").await;
    let r = c.response(false).await.unwrap();
    assert_eq!((r.status, r.body_text().as_str()), (200, "ok"));
    let got = cap.one();
    assert_eq!(got.header("expect"), Some("100-continue"));
    assert_eq!(got.body, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_only_for_allowed_tokens_and_only_on_101() {
    let (app, cap) = backend(scripted).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let addr = b.addr("web");
    // websocket is allowed: Connection/Upgrade reach the upstream, and after its 101 the
    // connection is a raw tunnel (the next bytes arrive untouched: no Via added).
    let mut c = Client::connect(addr).await;
    c.send(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await;
    let r = c.response(false).await.unwrap();
    assert_eq!(r.status, 101);
    assert_eq!(r.header("upgrade"), Some("websocket"));
    let got = cap.one();
    assert_eq!(got.header("connection"), Some("upgrade"));
    assert_eq!(got.header("upgrade"), Some("websocket"));
    cap.clear();
    c.send(b"GET /tunneled HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let r = c.response(false).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("via"), None, "tunnel bytes were parsed as HTTP");
    assert_eq!(
        cap.one().head,
        lines(&["GET /tunneled HTTP/1.1", "Host: t"])
    );

    // A token that is not allowed: no Upgrade reaches the upstream; plain HTTP goes on.
    cap.clear();
    let mut c = Client::connect(addr).await;
    c.send(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
        .await;
    assert_eq!(c.response(false).await.unwrap().status, 200);
    let got = cap.one();
    assert_eq!(
        (got.header("upgrade"), got.header("connection")),
        (None, None)
    );
    // An allowed upgrade answered 200: the connection stays HTTP.
    cap.clear();
    c.send(b"GET /no-101 HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await;
    assert_eq!(c.response(false).await.unwrap().status, 200);
    c.send(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let r = c.response(false).await.unwrap();
    assert_eq!(r.header("via"), Some("1.1 baton"), "{:?}", r.head);
    assert_eq!(cap.reqs()[1].header("via"), Some("1.1 baton"));
    // A 101 to a request that asked no upgrade is a broken upstream.
    let r = send_one(addr, b"GET /unasked-101 HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(r.status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_protocols_is_the_allow_list() {
    let (app, cap) = backend(scripted).await;
    let listener = "    http:\n      upgrade_protocols: [Foo]\n";
    let b = Baton::start(&conf(listener, &[("app", app)]));
    let addr = b.addr("web");
    // (Upgrade sent, forwarded as an upgrade)
    for (token, allowed) in [
        ("websocket", false),
        ("foo", true),
        ("FOO/2", true),
        ("foo, websocket", false),
    ] {
        cap.clear();
        let req = format!(
            "GET /plain HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: {token}\r\n\r\n"
        );
        assert_eq!(send_one(addr, req.as_bytes()).await.status, 200, "{token}");
        let got = cap.one();
        if allowed {
            assert_eq!(got.header("upgrade"), Some(token), "{token}");
            assert_eq!(got.header("connection"), Some("upgrade"), "{token}");
        } else {
            assert_eq!(
                (got.header("upgrade"), got.header("connection")),
                (None, None),
                "{token}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_codings_and_hop_by_hop_headers() {
    let (app, _cap) = backend(scripted).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let addr = b.addr("web");
    // A close-delimited body with a coding: re-chunked for the 1.1 client, the coding kept
    // (the head is written before the body, so this holds whatever happens to the body).
    let mut c = Client::connect(addr).await;
    c.send(b"GET /te-gzip HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let r = c.response(false).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers("transfer-encoding"),
        vec!["gzip, chunked"],
        "{:?}",
        r.head
    );
    // `identity` names no coding: it still frames the body (until close, its Content-Length
    // ignored) but is not passed on (it reached the client as `identity, chunked`).
    let mut c = Client::connect(addr).await;
    c.send(b"GET /te-identity HTTP/1.1\r\nHost: a\r\n\r\n")
        .await;
    let r = c.response(false).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers("transfer-encoding"),
        vec!["chunked"],
        "{:?}",
        r.head
    );
    assert_eq!(
        r.headers("content-length"),
        Vec::<&str>::new(),
        "{:?}",
        r.head
    );
    assert_eq!(dechunk(&r.body), b"until close");
    // A status outside 100..=599 is invalid (RFC 9110 §15): 502, not passed on.
    for path in ["/status-999", "/status-099"] {
        let r = send_one(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 502, "{path}: {:?}", r.head);
    }
    // `chunked` applied before another coding is not a framing a client can read.
    let r = send_one(addr, b"GET /te-chunked-gzip HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(r.status, 502, "{:?}", r.head);
    // Hop-by-hop response headers stay with the hop; `close` from the upstream does not
    // close the client.
    let mut c = Client::connect(addr).await;
    c.send(b"GET /hop HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let r = c.response(false).await.unwrap();
    assert_eq!(r.status, 200);
    for gone in ["x-secret", "keep-alive", "connection"] {
        assert_eq!(r.header(gone), None, "{gone}: {:?}", r.head);
    }
    assert_eq!(r.header("x-kept"), Some("1"));
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(c.response(false).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients() {
    let (app, _cap) = backend(scripted).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let addr = b.addr("web");
    // A chunked response to a 1.0 client is decoded and delimited by close.
    let mut c = Client::connect(addr).await;
    c.send(b"GET /trailers HTTP/1.0\r\n\r\n").await;
    let all = c.until_closed().await;
    let text = String::from_utf8_lossy(&all).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nconnection: close"),
        "{head}"
    );
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(body, "hello");
    // With keep-alive and a length, a 1.0 client keeps its connection.
    let mut c = Client::connect(addr).await;
    for _ in 0..2 {
        c.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await;
        let r = c.response(false).await.unwrap();
        assert_eq!((r.status, r.body_text().as_str()), (200, "ok"));
        assert_eq!(r.header("connection"), Some("keep-alive"), "{:?}", r.head);
    }
    // No 1xx reaches a 1.0 client (RFC 9110 §15.2): it would read the 103 as the final
    // response and the real one as its body. The 103 is dropped, the 200 comes as usual.
    c.send(b"GET /103 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let r = c.response(false).await.unwrap();
    assert_eq!(
        (r.status, r.body_text().as_str()),
        (200, "ok"),
        "{:?}",
        r.head
    );
    assert_eq!(r.header("connection"), Some("keep-alive"), "{:?}", r.head);
    c.send(b"GET / HTTP/1.0\r\n\r\n").await;
    let r = c.response(false).await.unwrap();
    assert_eq!((r.status, r.body_text().as_str()), (200, "ok"));
}

/// An upstream that answers before it has read the request body (an early 413 to an upload):
/// the client gets the response with `connection: close` (RFC 9112 §9.6: a close is announced),
/// then the connection closes, as the rest of the body is not forwarded anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_response_to_an_upload_announces_the_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big\n",
                    )
                    .await;
                // Reads on (and drops) whatever else comes, as a real server would.
                while let Ok(n) = s.read(&mut b).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    let b = Baton::start(&conf("", &[("app", app)]));
    let mut c = Client::connect(b.addr("web")).await;
    c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\nfirst bytes")
        .await;
    let r = c.response(false).await.unwrap();
    assert_eq!((r.status, r.body_text().as_str()), (413, "too big\n"));
    assert!(
        r.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close")),
        "the close is announced: {:?}",
        r.head
    );
    assert!(
        c.until_closed().await.is_empty(),
        "then the connection closes"
    );
}
