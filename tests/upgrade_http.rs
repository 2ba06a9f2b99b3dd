//! The live upgrade with HTTP clients: keep-alive pools and one-connection-per-request clients
//! see no failed request across many upgrades; WebSocket tunnels, idle keep-alive connections
//! and half-sent requests move to the successor on the same client socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
mod http_support;
use common::*;
use http_support::read_response;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn http_config(backend: std::net::SocketAddr) -> String {
    format!(
        "runtime:\n  drain_timeout: 10s\nlisteners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\nupstreams:\n  app:\n    servers: [\"{backend}\"]\n"
    )
}

/// A client connection to the `web` listener.
async fn connect(b: &Baton) -> BufReader<TcpStream> {
    BufReader::new(TcpStream::connect(b.addr("web")).await.unwrap())
}

/// Sends `GET /` on `r` and checks that the answer is a 200.
async fn get_ok(r: &mut BufReader<TcpStream>) {
    r.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(r).await.unwrap().0, 200);
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// Sends GETs until `stop`: on one keep-alive connection, or a new connection per request.
async fn http_client(
    addr: std::net::SocketAddr,
    close: bool,
    t: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            conn = Some(BufReader::new(TcpStream::connect(addr).await.unwrap()));
        }
        let r = conn.as_mut().unwrap();
        let req: &[u8] = if close {
            b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        } else {
            b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
        };
        let res = async {
            r.get_mut().write_all(req).await?;
            read_response(r).await
        };
        match tokio::time::timeout(WAIT, res).await {
            Ok(Ok((200, body))) if body.starts_with("hello from a") => {
                t.ok.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                eprintln!("request failed: {other:?}");
                t.failed.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
        if close {
            conn = None;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_clients_see_no_failure_across_twenty_upgrades() {
    let (be, _) = http_support::backend("a").await;
    let b = Baton::start(&http_config(be));
    let addr = b.addr("web");
    let stop = Arc::new(AtomicBool::new(false));
    let (keep, close) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let mut tasks = Vec::new();
    for i in 0..12 {
        let t = if i < 8 { keep.clone() } else { close.clone() };
        tasks.push(tokio::spawn(http_client(addr, i >= 8, t, stop.clone())));
    }
    for round in 0..20 {
        let before = keep.ok.load(Ordering::Relaxed) + close.ok.load(Ordering::Relaxed);
        let (ok, out) = upgrade_async(&b.config).await;
        assert!(ok, "upgrade {round}: {out}");
        // Traffic flows between upgrades, so every upgrade happens under load.
        assert!(
            wait_until(WAIT, || keep.ok.load(Ordering::Relaxed)
                + close.ok.load(Ordering::Relaxed)
                > before + 20)
            .await,
            "no traffic after upgrade {round}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (k, c) = (
        keep.ok.load(Ordering::Relaxed),
        close.ok.load(Ordering::Relaxed),
    );
    eprintln!("keep-alive requests ok {k}, connection-close requests ok {c}");
    assert_eq!(
        keep.failed.load(Ordering::Relaxed),
        0,
        "keep-alive clients saw failures"
    );
    assert_eq!(
        close.failed.load(Ordering::Relaxed),
        0,
        "connection-close clients saw failures"
    );
    assert!(k > 0 && c > 0);
}

/// Opens a WebSocket-style tunnel through baton (raw Upgrade handshake).
async fn websocket(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.unwrap();
    let mut r = BufReader::new(s);
    r.get_mut()
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        )
        .await
        .unwrap();
    let (status, _) = read_response(&mut r).await.unwrap();
    assert_eq!(status, 101);
    assert!(r.buffer().is_empty());
    r.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_websockets_survive_ten_upgrades() {
    let (be, _) = http_support::backend("a").await;
    let b = Baton::start(&http_config(be));
    let addr = b.addr("web");
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..50 {
        let s = websocket(addr).await;
        clients.push(tokio::spawn(numbered_echo(s, i, stop.clone())));
    }
    for round in 0..10 {
        let (ok, out) = upgrade_async(&b.config).await;
        assert!(ok, "upgrade {round}: {out}");
        assert!(out.contains("50 tunnels"), "upgrade {round}: {out}");
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        assert!(c.await.unwrap().unwrap() > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connection_is_served_by_the_successor() {
    let (be, _) = http_support::backend("a").await;
    let b = Baton::start(&http_config(be));
    let mut r = connect(&b).await;
    get_ok(&mut r).await;
    let old = b.serving_pid();
    let (ok, out) = upgrade_async(&b.config).await;
    assert!(ok && out.contains("1 idle http"), "{out}");
    assert!(
        wait_until(WAIT, || !alive(old)).await,
        "old process still alive"
    );
    // The old process is gone: this answer can only come from the successor, on the same socket.
    r.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let (status, body) = read_response(&mut r).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.starts_with("hello from a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_request_is_completed_by_the_successor() {
    let (be, _) = http_support::backend("a").await;
    let b = Baton::start(&http_config(be));
    let mut r = connect(&b).await;
    get_ok(&mut r).await;
    half_head_across_an_upgrade(&b, &mut r, "half").await;
}

/// Sends half a request head on `r`, upgrades (the one idle HTTP connection moves), sends the
/// rest with `X-Test: tag`: the successor must answer it on the same socket.
async fn half_head_across_an_upgrade(b: &Baton, r: &mut BufReader<TcpStream>, tag: &str) {
    r.get_mut()
        .write_all(b"GET /headers HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let old = b.serving_pid();
    let (ok, out) = upgrade_async(&b.config).await;
    // Either the engine had read the half head (a busy connection reading its head) or the
    // kernel still held it (an idle one): one HTTP connection moves either way.
    assert!(
        ok && (out.contains("1 idle http") || out.contains("1 busy http (head 1")),
        "{out}"
    );
    assert!(wait_until(WAIT, || !alive(old)).await);
    r.get_mut()
        .write_all(format!("st: t\r\nX-Test: {tag}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, body) = read_response(r).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains(&format!("x-test: {tag}")), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_request_finishes_then_its_connection_moves() {
    let (be, _) = http_support::backend("a").await;
    let b = Baton::start(&http_config(be));
    let mut r = connect(&b).await;
    r.get_mut()
        .write_all(b"GET /slow/1500 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let old = b.serving_pid();
    let up = tokio::spawn(upgrade_async(b.config.clone().leak()));
    let (status, body) = read_response(&mut r).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.starts_with("slow hello"));
    let (ok, out) = up.await.unwrap();
    assert!(ok, "{out}");
    assert!(wait_until(WAIT, || !alive(old)).await);
    get_ok(&mut r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_connection_gets_goaway_and_finishes_in_the_old_process() {
    use http_body_util::BodyExt;
    let (be, _) = http_support::backend("a").await;
    let b = Baton::start(&http_config(be));
    let (mut send, conn_task) = http_support::h2c(b.addr("web")).await;
    let req = hyper::Request::builder()
        .uri("http://t/slow/1500")
        .body(http_support::text(""))
        .unwrap();
    let pending = send.send_request(req);
    let old = b.serving_pid();
    let up = tokio::spawn(upgrade_wait_async(b.config.clone().leak()));
    // The stream in flight completes in the old process...
    let resp = tokio::time::timeout(WAIT, pending).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"slow hello"));
    let (ok, out) = up.await.unwrap();
    assert!(ok && out.contains("1 finished in the old process"), "{out}");
    // ...and the connection ends with GOAWAY rather than a reset: the client's connection
    // task finishes cleanly.
    let ended = tokio::time::timeout(WAIT, conn_task)
        .await
        .unwrap()
        .unwrap();
    assert!(
        ended.is_ok(),
        "h2 connection ended with an error: {ended:?}"
    );
    assert!(wait_until(WAIT, || !alive(old)).await);
    // A new connection is served by the successor.
    let mut r = connect(&b).await;
    get_ok(&mut r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_released_from_hyper_still_serves_and_moves() {
    let (be, _) = http_support::backend("a").await;
    let b = Baton::start(&http_config(be));
    let mut r = connect(&b).await;
    get_ok(&mut r).await;
    // Idle for a moment, the connection gives hyper's buffers back and waits with none.
    assert!(
        b.log
            .wait_for(&["idle http connection released"], WAIT)
            .is_some(),
        "idle connection was not released"
    );
    get_ok(&mut r).await;
    // Released again, then handed over: served by the successor on the same socket.
    let old = b.serving_pid();
    assert!(wait_until(WAIT, || b.log.count("idle http connection released") >= 2).await);
    let (ok, out) = upgrade_async(&b.config).await;
    assert!(ok && out.contains("1 idle http"), "{out}");
    assert!(wait_until(WAIT, || !alive(old)).await);
    get_ok(&mut r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_request_after_a_release_is_completed_by_the_successor() {
    let (be, _) = http_support::backend("a").await;
    let b = Baton::start(&http_config(be));
    let mut r = connect(&b).await;
    get_ok(&mut r).await;
    assert!(b
        .log
        .wait_for(&["idle http connection released"], WAIT)
        .is_some());
    // Part of the next head arrives on the released connection (a fresh hyper connection
    // takes it), then the upgrade: the successor must complete it on the same socket.
    half_head_across_an_upgrade(&b, &mut r, "after-release").await;
}
