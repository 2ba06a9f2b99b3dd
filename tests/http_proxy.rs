//! The HTTP reverse proxy end to end: the real binary between hyper clients (or raw sockets)
//! and real backends on 127.0.0.1.
#![allow(clippy::unwrap_used)]
mod common;
mod http_support;
use common::{dead_addr, Baton};
use http_support::*;
use hyper::{Request, StatusCode};
use std::sync::atomic::Ordering;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_then_longest_prefix() {
    let (app, _) = backend("app").await;
    let (api, _) = backend("api").await;
    let (admin, _) = backend("admin").await;
    let (st, _) = backend("static").await;
    let routes = "    routes:\n      - { host: \"api.example.com\", path_prefix: \"/v1\", upstream: api }\n      - { host: \"api.example.com\", path_prefix: \"/v1/admin\", upstream: admin }\n      - { host: \"*.static.example.com\", upstream: static }\n";
    let ups = [
        upstream("app", &[app], ""),
        upstream("api", &[api], ""),
        upstream("admin", &[admin], ""),
        upstream("static", &[st], ""),
    ]
    .concat();
    let b = Baton::start(&config(routes, &ups));
    let mut c = h1(b.addr("web")).await;
    for (host, path, want) in [
        ("api.example.com", "/v1/users", "api"),
        ("API.example.com:8080", "/v1/admin/x", "admin"),
        ("api.example.com", "/v2", "app"),
        ("img.static.example.com", "/a.png", "static"),
        ("static.example.com", "/", "app"),
        ("other.test", "/v1", "app"),
    ] {
        let (status, _, body) = exchange(&mut c, get(host, path)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("hello from {want}\n"), "{host}{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_headers_and_creates_traceparent() {
    let (app, _) = backend("app").await;
    let b = Baton::start(&config("", &upstream("app", &[app], "")));
    let mut c = h1(b.addr("web")).await;
    let req = Request::builder()
        .uri("/headers")
        .header("host", "site.test")
        .header("x-forwarded-for", "10.1.2.3")
        .header("connection", "x-hop")
        .header("x-hop", "secret")
        .header("proxy-authorization", "Basic x")
        .header("upgrade", "websocket-not-really")
        .header("te", "trailers")
        .header("x-keep", "yes")
        .body(text(""))
        .unwrap();
    let (status, headers, seen) = exchange(&mut c, req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        seen.contains("\nx-forwarded-for: 10.1.2.3, 127.0.0.1\n"),
        "{seen}"
    );
    assert!(seen.contains("\nx-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("\nx-forwarded-host: site.test\n"), "{seen}");
    assert!(seen.contains("\nvia: 1.1 baton\n"), "{seen}");
    assert!(
        seen.contains("\nhost: site.test\n"),
        "preserve_host: {seen}"
    );
    assert!(seen.contains("\nx-keep: yes\n"), "{seen}");
    for gone in ["x-hop", "proxy-authorization", "upgrade", "te:"] {
        assert!(
            !seen.contains(&format!("\n{gone}")),
            "{gone} forwarded: {seen}"
        );
    }
    let tp = seen
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .expect("traceparent created");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(
        (parts.len(), parts[0], parts[1].len(), parts[2].len()),
        (4, "00", 32, 16),
        "{tp}"
    );
    assert_eq!(headers["via"], "1.1 baton");
    // The access log names the same trace id.
    assert!(b
        .log
        .wait_for(
            &["request", &format!("trace_id={}", parts[1]), "status=200"],
            WAIT
        )
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_a_valid_traceparent_and_host_when_asked() {
    let (app, _) = backend("app").await;
    let b = Baton::start(&config(
        "    http:\n      preserve_host: false\n",
        &upstream("app", &[app], ""),
    ));
    let mut c = h1(b.addr("web")).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let req = Request::builder()
        .uri("/headers")
        .header("host", "site.test")
        .header("traceparent", tp)
        .body(text(""))
        .unwrap();
    let (_, _, seen) = exchange(&mut c, req).await;
    assert!(seen.contains(&format!("\ntraceparent: {tp}\n")), "{seen}");
    assert!(seen.contains(&format!("\nhost: {app}\n")), "{seen}");
    assert!(seen.contains("\nx-forwarded-host: site.test\n"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_is_reused_on_both_sides() {
    let (app, counts) = backend("app").await;
    let b = Baton::start(&config("", &upstream("app", &[app], "")));
    let addr = b.addr("web");
    let client = TcpStream::connect(addr).await.unwrap();
    let (mut c, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client))
        .await
        .unwrap();
    let conn_task = tokio::spawn(conn);
    for _ in 0..3 {
        let (status, _, body) = exchange(&mut c, get("x", "/")).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "hello from app\n")
        );
    }
    assert!(!conn_task.is_finished(), "client connection must stay open");
    // A second client connection reuses the pooled upstream connection.
    let mut c2 = h1(addr).await;
    exchange(&mut c2, get("x", "/")).await;
    assert_eq!(counts.requests.load(Ordering::Relaxed), 4);
    assert_eq!(
        counts.accepted.load(Ordering::Relaxed),
        1,
        "upstream connection reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_are_502_and_504() {
    let garbage = garbage_backend().await;
    let (silent, _) = silent_backend().await;
    let dead = dead_addr();
    let ups = [
        upstream("app", &[dead], "    retries: 0\n"),
        upstream("garbage", &[garbage], ""),
        upstream(
            "silent",
            &[silent],
            "    http:\n      response_timeout: 1s\n",
        ),
    ]
    .concat();
    let routes = "    routes:\n      - { path_prefix: \"/garbage\", upstream: garbage }\n      - { path_prefix: \"/silent\", upstream: silent }\n";
    let b = Baton::start(&config(routes, &ups));
    let mut c = h1(b.addr("web")).await;
    let (status, headers, body) = exchange(&mut c, get("x", "/")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::BAD_GATEWAY, "bad gateway\n")
    );
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let mut c = h1(b.addr("web")).await;
    let (status, _, _) = exchange(&mut c, get("x", "/garbage")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let mut c = h1(b.addr("web")).await;
    let (status, _, body) = exchange(&mut c, get("x", "/silent")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "upstream timeout\n")
    );
    assert!(b
        .log
        .wait_for(&["request failed", "status=502", "side=upstream"], WAIT)
        .is_some());
    assert!(b
        .log
        .wait_for(&["request failed", "status=504", "side=upstream"], WAIT)
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_400_408_413_431() {
    let (app, counts) = backend("app").await;
    let listener = "    http:\n      header_read_timeout: 1s\n      max_body_bytes: 100\n      max_header_bytes: 8192\n";
    let b = Baton::start(&config(listener, &upstream("app", &[app], "")));
    let addr = b.addr("web");
    let r = raw(addr, b"GARBAGE\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // 408: a head that never completes.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let r = read_to_close(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    assert!(r.ends_with("request header timeout\r\n"), "{r}");
    // 413 by Content-Length, up front.
    let r = raw(
        addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    assert!(r.ends_with("request body too large\n"), "{r}");
    assert_eq!(
        counts.requests.load(Ordering::Relaxed),
        0,
        "nothing reached the backend"
    );
    // 413 while streaming (the head was already forwarded; the body is cut at the limit) a chunked body.
    let chunk = "a".repeat(150);
    // `/sum` reads the whole body before answering, so the limit is hit before any response
    // byte (an echoing backend could start its 200 first, and then the body is only cut).
    let req = format!("POST /sum HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n96\r\n{chunk}\r\n0\r\n\r\n");
    let r = raw(addr, req.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    // 431: headers past max_header_bytes.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(20_000)
    );
    let r = raw(addr, big.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    assert!(counts.requests.load(Ordering::Relaxed) <= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_are_rejected_and_never_forwarded() {
    let (app, counts) = backend("app").await;
    let b = Baton::start(&config("", &upstream("app", &[app], "")));
    let addr = b.addr("web");
    let attempts: [&[u8]; 4] = [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length: 4\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ];
    for a in attempts {
        let r = raw(addr, a).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        assert!(!r.contains("hello from"), "{r}");
    }
    assert_eq!(
        counts.requests.load(Ordering::Relaxed),
        0,
        "a smuggling attempt reached the backend"
    );
    // A plain chunked request still works.
    let r = raw(addr, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\nabcd\r\n0\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200") && r.contains("abcd"), "{r}");
}

/// A backend that reads a request and closes without answering; counts its connections.
async fn closing_backend() -> (std::net::SocketAddr, std::sync::Arc<Counts>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let counts = std::sync::Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                break;
            };
            c.accepted.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    // Whole request seen (head and the 10-byte body): close without answering.
                    if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"0123456789")
                        || got.starts_with(b"GET")
                    {
                        break;
                    }
                }
            });
        }
    });
    (addr, counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_get_on_a_dead_server_but_not_a_sent_post() {
    let (good, good_counts) = backend("good").await;
    let dead = dead_addr();
    let (closer, closer_counts) = closing_backend().await;
    let ups = [
        upstream("app", &[dead, good], "    retries: 1\n"),
        upstream("post", &[closer, good], "    retries: 1\n"),
    ]
    .concat();
    let routes = "    routes:\n      - { path_prefix: \"/post\", upstream: post }\n";
    let b = Baton::start(&config(routes, &ups));
    let addr = b.addr("web");
    for _ in 0..4 {
        let mut c = h1(addr).await;
        let (status, _, body) = exchange(&mut c, get("x", "/")).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "hello from good\n")
        );
    }
    let before = good_counts.requests.load(Ordering::Relaxed);
    let (mut ok, mut bad) = (0, 0);
    for _ in 0..4 {
        let mut c = h1(addr).await;
        let req = Request::builder()
            .method("POST")
            .uri("/post")
            .header("host", "x")
            .body(text("0123456789"))
            .unwrap();
        let (status, _, _) = exchange(&mut c, req).await;
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::BAD_GATEWAY => bad += 1,
            s => panic!("unexpected {s}"),
        }
    }
    assert!(bad >= 1, "the closing server was never chosen");
    assert_eq!(
        bad,
        closer_counts.accepted.load(Ordering::Relaxed),
        "every POST that reached the closer failed"
    );
    assert_eq!(
        good_counts.requests.load(Ordering::Relaxed) - before,
        ok,
        "a sent POST was retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_a_registry_tunnel() {
    let (app, _) = backend("app").await;
    let b = Baton::start(&config("", &upstream("app", &[app], "")));
    let mut s = TcpStream::connect(b.addr("web")).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nearly").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !(got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"early")) {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 101"), "{text}");
    assert!(text.contains("upgrade: websocket"), "{text}");
    for msg in [&b"ping"[..], &b"second frame"[..]] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
    drop(s);
    assert!(b
        .log
        .wait_for(&["connection closed", "kind=Tunnel"], WAIT)
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_client_reaches_an_http1_upstream() {
    let (app, _) = backend("app").await;
    let b = Baton::start(&config("", &upstream("app", &[app], "")));
    let s = TcpStream::connect(b.addr("web")).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for path in ["/", "/headers"] {
        let req = Request::builder()
            .uri(format!("http://site.test{path}"))
            .body(text(""))
            .unwrap();
        let resp = tokio::time::timeout(WAIT, send.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        use http_body_util::BodyExt;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        if path == "/" {
            assert_eq!(body, "hello from app\n");
        } else {
            assert!(
                body.contains("\nhost: site.test\n") && body.contains("\nvia: 2.0 baton\n"),
                "{body}"
            );
        }
    }
    let (mut s2, _) = (h1(b.addr("web")).await, ());
    let (status, _, _) = exchange(&mut s2, get("x", "/")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_matching_route_and_no_default_is_404() {
    let (api, counts) = backend("api").await;
    let yaml = format!(
        "listeners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    routes:\n      - {{ host: \"api.example.com\", upstream: api }}\nupstreams:\n{}",
        upstream("api", &[api], "")
    );
    let b = Baton::start(&yaml);
    let mut c = h1(b.addr("web")).await;
    let (status, _, body) = exchange(&mut c, get("api.example.com", "/")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "hello from api\n")
    );
    let (status, _, body) = exchange(&mut c, get("other.example.com", "/")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!body.is_empty() && body.len() < 100, "short body: {body:?}");
    assert_eq!(counts.requests.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server_available_is_503() {
    // The only server is a name that does not resolve (an empty hosts file is the resolver).
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "").unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "listeners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\nupstreams:\n  app:\n    servers: [\"nowhere.test:80\"]\n",
    )
    .unwrap();
    let b = Baton::start_with_env(
        dir,
        config,
        &[("BATON_HOSTS_FILE", hosts.to_str().unwrap())],
    );
    let r = raw(
        b.addr("web"),
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    let body = r.split("\r\n\r\n").nth(1).unwrap_or("");
    assert!(!body.is_empty() && body.len() < 100, "short body: {body:?}");
}

/// A backend that answers every request with a head promising 100 bytes, sends 10, then stalls.
async fn stalling_backend() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                break;
            };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                .await;
            held.push(s);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_bounds_the_response_wait_and_the_streamed_body() {
    let (silent, _) = silent_backend().await;
    let stalling = stalling_backend().await;
    // The upstream's own response timeout is far longer than the test's patience: only the
    // listener's request_timeout can end these requests.
    let ups = [
        upstream("app", &[silent], "    http:\n      response_timeout: 1h\n"),
        upstream(
            "stall",
            &[stalling],
            "    http:\n      response_timeout: 1h\n",
        ),
    ]
    .concat();
    let listener = "    routes:\n      - { path_prefix: \"/stall\", upstream: stall }\n    http:\n      request_timeout: 300ms\n";
    let b = Baton::start(&config(listener, &ups));
    let mut c = h1(b.addr("web")).await;
    let (status, _, body) = exchange(&mut c, get("x", "/")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "request timeout\n")
    );
    assert!(b
        .log
        .wait_for(
            &[
                "request failed",
                "status=504",
                "longer than request_timeout"
            ],
            common::WAIT
        )
        .is_some());
    // The head arrived in time, the body stalls: the response is cut at the deadline (the
    // client sees the connection end before the promised length), never left hanging.
    let mut s = TcpStream::connect(b.addr("web")).await.unwrap();
    s.write_all(b"GET /stall HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(common::WAIT, s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the stalled response was never ended");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("0123456789"), "{text}");
}
