//! CONNECT through an HTTP listener, with the real binary: refused with 405 where the listener
//! does not enable it, 403 for a target outside its allow-list (the target never sees a
//! connection), and for an allowed target baton's own `200 Connection Established` and an L4
//! tunnel to it that moves to the successor on an upgrade.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
mod http_support;
use common::*;
use http_support::read_response;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A TCP echo server that counts the connections it accepted.
async fn counting_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let seen = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, n)
}

fn config(app: SocketAddr, connect: &str) -> String {
    format!(
        "runtime:\n  drain_timeout: 10s\nlisteners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n{connect}upstreams:\n  app:\n    servers: [\"{app}\"]\n"
    )
}

fn allow(targets: &[String]) -> String {
    let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        "    http:\n      connect:\n        allow: [{}]\n",
        list.join(", ")
    )
}

/// Sends `CONNECT target` (and `early` bytes right behind the head, in the same write).
async fn connect(addr: SocketAddr, target: &str, early: &[u8]) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes();
    req.extend_from_slice(early);
    s.write_all(&req).await.unwrap();
    BufReader::new(s)
}

/// Reads the exact tunnel answer and nothing more.
async fn established(r: &mut BufReader<TcpStream>) {
    let want = b"HTTP/1.1 200 Connection Established\r\n\r\n";
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(WAIT, r.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
}

async fn echo(r: &mut BufReader<TcpStream>, line: &str) {
    r.get_mut().write_all(line.as_bytes()).await.unwrap();
    let mut got = vec![0u8; line.len()];
    tokio::time::timeout(WAIT, r.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got), line);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_405_where_the_listener_does_not_enable_it() {
    let (app, _) = http_support::backend("app").await;
    let (target, seen) = counting_echo().await;
    let b = Baton::start(&config(app, ""));
    let mut r = connect(b.addr("web"), &target.to_string(), b"").await;
    let (status, body) = read_response(&mut r).await.unwrap();
    assert_eq!((status, body.as_str()), (405, "method not allowed\n"));
    // RFC 9110 §15.5.6: a 405 carries `Allow`, here every standard method but CONNECT.
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    let out = http_support::raw(b.addr("web"), req.as_bytes()).await;
    let (head, _) = out.split_once("\r\n\r\n").expect("a whole head");
    let allow: Vec<&str> = head
        .lines()
        .filter_map(|l| l.strip_prefix("allow: "))
        .collect();
    assert_eq!(
        allow,
        ["GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH"],
        "{out:?}"
    );
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "the target was connected to"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_target_gets_a_tunnel_and_others_get_403() {
    let (app, app_counts) = http_support::backend("app").await;
    let (ok, ok_seen) = counting_echo().await;
    let (other, other_seen) = counting_echo().await;
    let b = Baton::start(&config(
        app,
        &allow(&[ok.to_string(), format!("localhost:{}", ok.port())]),
    ));
    let addr = b.addr("web");

    // Allowed: baton answers 200 itself, bytes sent early (behind the head) arrive first.
    let mut r = connect(addr, &ok.to_string(), b"early ").await;
    established(&mut r).await;
    let mut got = [0u8; 6];
    tokio::time::timeout(WAIT, r.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"early ");
    echo(&mut r, "hello through the tunnel\n").await;
    assert_eq!(ok_seen.load(Ordering::SeqCst), 1);

    // A name is resolved by baton (each address tried in turn).
    let mut r2 = connect(addr, &format!("localhost:{}", ok.port()), b"").await;
    established(&mut r2).await;
    echo(&mut r2, "by name\n").await;

    // Not listed: 403, and the target sees nothing; so does a listed host on another port.
    for target in [other.to_string(), format!("127.0.0.1:{}", other.port())] {
        let mut r = connect(addr, &target, b"").await;
        let (status, body) = read_response(&mut r).await.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (403, "connect target not allowed\n"),
            "{target}"
        );
    }
    assert_eq!(other_seen.load(Ordering::SeqCst), 0);

    // Authority-form only with CONNECT, and CONNECT only with authority-form.
    for (req, want) in [
        (format!("GET {ok} HTTP/1.1\r\nHost: {ok}\r\n\r\n"), 400),
        (format!("CONNECT / HTTP/1.1\r\nHost: {ok}\r\n\r\n"), 400),
        (
            format!("CONNECT http://{ok}/ HTTP/1.1\r\nHost: {ok}\r\n\r\n"),
            400,
        ),
        (
            format!("CONNECT {ok} HTTP/1.1\r\nHost: {ok}\r\nContent-Length: 3\r\n\r\nabc"),
            400,
        ),
    ] {
        let out = http_support::raw(addr, req.as_bytes()).await;
        assert!(
            out.starts_with(&format!("HTTP/1.1 {want} ")),
            "{req:?} -> {out:?}"
        );
    }
    assert_eq!(ok_seen.load(Ordering::SeqCst), 2);
    assert_eq!(
        app_counts.requests.load(Ordering::SeqCst),
        0,
        "the default upstream was asked"
    );

    // The access line names the tunnel's status and target.
    let line = b
        .log
        .wait_for(&["baton::access", "method=CONNECT", "status=200"], WAIT)
        .expect("access line of the tunnel");
    assert!(line.contains(&format!("server={ok}")), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_survive_upgrades() {
    let (app, _) = http_support::backend("app").await;
    let (target, _) = counting_echo().await;
    let b = Baton::start(&config(app, &allow(&[target.to_string()])));
    let addr = b.addr("web");
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..5 {
        let mut r = connect(addr, &target.to_string(), b"").await;
        established(&mut r).await;
        echo(&mut r, &format!("client {i} hello\n")).await;
        clients.push(tokio::spawn(numbered_echo(r.into_inner(), i, stop.clone())));
    }
    for round in 0..3 {
        let old = b.serving_pid();
        let (ok, out) = upgrade_wait_async(&b.config).await;
        assert!(ok, "upgrade {round}: {out}");
        assert!(out.contains("5 tunnels"), "upgrade {round}: {out}");
        assert!(
            wait_until(WAIT, || !alive(old)).await,
            "upgrade {round}: old process {old} still alive"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        assert!(c.await.unwrap().unwrap() > 0);
    }
}
