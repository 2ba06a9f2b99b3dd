//! Keep-alive connections released from hyper wait in the listener's idle watcher (no task of
//! their own): they serve their next request, close at `keepalive_timeout`, are noticed when
//! the client closes, and move to a successor on a live upgrade.
#![allow(clippy::unwrap_used)]
mod common;
mod http_support;
use baton::proxy::{self, ListenerCtx};
use baton::registry::Parked;
use common::{alive, upgrade_async, wait_until, Baton, WAIT};
use http_support::{read_response, setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How many connections the listener's idle watcher holds (0 before its first release).
fn watched(ctx: &ListenerCtx) -> usize {
    ctx.idle_watcher
        .get()
        .and_then(|w| w.as_ref())
        .map_or(0, |w| w.len())
}

/// Sends `GET path` with `host` on `r`; returns the status and body.
async fn get(r: &mut BufReader<TcpStream>, host: &str, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    r.get_mut().write_all(req.as_bytes()).await.unwrap();
    tokio::time::timeout(WAIT, read_response(r))
        .await
        .unwrap()
        .unwrap()
}

async fn connect(addr: std::net::SocketAddr) -> BufReader<TcpStream> {
    BufReader::new(TcpStream::connect(addr).await.unwrap())
}

/// Whether the peer closed `r` (EOF or reset), waiting up to WAIT.
async fn closed_by_peer(r: &mut BufReader<TcpStream>) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(WAIT, r.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Released connections wait in the watcher and serve their next request from there, any
/// number of times; the watcher gives each back when its request arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_connections_wait_in_the_watcher_and_serve_again() {
    let st = setup("").await;
    let mut conns = Vec::new();
    for _ in 0..20 {
        let mut r = connect(st.addr).await;
        assert_eq!(get(&mut r, "a", "/").await.0, 200);
        conns.push(r);
    }
    assert!(
        wait_until(WAIT, || watched(&st.ctx) == 20).await,
        "released connections are not in the watcher: {}",
        watched(&st.ctx)
    );
    assert_eq!(st.registry.len(), 20, "watched connections stay registered");
    for round in 0..2 {
        for r in conns.iter_mut() {
            let (status, body) = get(r, &format!("round{round}.test"), "/headers").await;
            assert_eq!(status, 200);
            assert!(body.contains(&format!("host: round{round}.test")), "{body}");
        }
        // All of them back in the watcher after their request.
        assert!(wait_until(WAIT, || watched(&st.ctx) == 20).await);
    }
}

/// A watched connection closes at `keepalive_timeout`, and its registry entry goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_connection_closes_at_keepalive_timeout() {
    let st = setup("      keepalive_timeout: 1500ms\n").await;
    let mut r = connect(st.addr).await;
    assert_eq!(get(&mut r, "a", "/").await.0, 200);
    assert!(wait_until(WAIT, || watched(&st.ctx) == 1).await);
    assert!(
        closed_by_peer(&mut r).await,
        "not closed at keep-alive timeout"
    );
    assert!(wait_until(WAIT, || st.registry.is_empty()).await);
    assert_eq!(watched(&st.ctx), 0);
}

/// A client closing a watched connection is noticed at once (not at the keep-alive timeout,
/// 75 s by default): the entry leaves the watcher and the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_closing_a_watched_connection_is_noticed() {
    let st = setup("").await;
    let mut keep = connect(st.addr).await;
    assert_eq!(get(&mut keep, "a", "/").await.0, 200);
    let mut gone = connect(st.addr).await;
    assert_eq!(get(&mut gone, "a", "/").await.0, 200);
    assert!(wait_until(WAIT, || watched(&st.ctx) == 2).await);
    drop(gone);
    assert!(
        wait_until(WAIT, || st.registry.len() == 1 && watched(&st.ctx) == 1).await,
        "closed connection still registered: {} registered, {} watched",
        st.registry.len(),
        watched(&st.ctx)
    );
    // The other one is untouched.
    assert_eq!(get(&mut keep, "a", "/").await.0, 200);
}

/// Park (handover) takes every watched connection out as an idle HTTP connection; resumed,
/// each serves on the same client socket. Drain closes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_connections_park_and_drain() {
    let mut st = setup("").await;
    let mut conns = Vec::new();
    for _ in 0..10 {
        let mut r = connect(st.addr).await;
        assert_eq!(get(&mut r, "a", "/").await.0, 200);
        conns.push(r);
    }
    assert!(wait_until(WAIT, || watched(&st.ctx) == 10).await);
    st.registry.park_all();
    let mut parked = Vec::new();
    for _ in 0..10 {
        let p = tokio::time::timeout(WAIT, st.parked.recv())
            .await
            .unwrap()
            .unwrap();
        let Parked::IdleHttp(h) = p else {
            panic!("expected an idle http connection")
        };
        assert!(h.read_ahead.is_empty());
        parked.push(h);
    }
    assert!(wait_until(WAIT, || st.registry.is_empty()).await);
    assert_eq!(watched(&st.ctx), 0);
    for h in parked {
        proxy::resume(st.ctx.clone(), Parked::IdleHttp(h)).await;
    }
    for r in conns.iter_mut() {
        let (status, body) = get(r, "resumed.test", "/headers").await;
        assert_eq!(status, 200);
        assert!(body.contains("host: resumed.test"), "{body}");
    }
    // Released again into the watcher, then the process stops: drained, closed.
    assert!(wait_until(WAIT, || watched(&st.ctx) == 10).await);
    st.registry.drain_all();
    for r in conns.iter_mut() {
        assert!(
            closed_by_peer(r).await,
            "watched connection not closed by drain"
        );
    }
    assert!(wait_until(WAIT, || st.registry.is_empty()).await);
}

fn http_config(backend: std::net::SocketAddr, http: &str) -> String {
    format!(
        "runtime:\n  drain_timeout: 10s\nlisteners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n{http}upstreams:\n  app:\n    servers: [\"{backend}\"]\n"
    )
}

/// The real binary: many released connections are handed over by an upgrade and served by the
/// successor on the same sockets; a client closing one while it waits is logged as closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_connections_move_with_an_upgrade() {
    const N: usize = 200;
    let (be, _) = http_support::backend("a").await;
    let b = Baton::start(&http_config(be, ""));
    let mut conns = Vec::new();
    for _ in 0..N {
        let mut r = connect(b.addr("web")).await;
        assert_eq!(get(&mut r, "a", "/").await.0, 200);
        conns.push(r);
    }
    assert!(wait_until(WAIT, || b.log.count("idle http connection released") >= N).await);
    // A client closes while its connection waits in the watcher.
    drop(conns.pop());
    assert!(
        b.log
            .wait_for(&["connection closed", "reason=\"client closed\""], WAIT)
            .is_some(),
        "client close not logged"
    );
    let old = b.serving_pid();
    let (ok, out) = upgrade_async(&b.config).await;
    assert!(ok && out.contains(&format!("{} idle http", N - 1)), "{out}");
    assert!(wait_until(WAIT, || !alive(old)).await);
    for r in conns.iter_mut() {
        let (status, body) = get(r, "after.test", "/headers").await;
        assert_eq!(status, 200);
        assert!(body.contains("host: after.test"), "{body}");
    }
}

/// A keep-alive connection to the real binary that served one request and waits in the
/// watcher (the first released one).
async fn released(b: &Baton) -> BufReader<TcpStream> {
    let mut r = connect(b.addr("web")).await;
    assert_eq!(get(&mut r, "a", "/").await.0, 200);
    assert!(b
        .log
        .wait_for(&["idle http connection released"], WAIT)
        .is_some());
    r
}

/// The real binary: a released connection left idle closes at `keepalive_timeout`, logged as
/// an idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_connection_closes_at_keepalive_timeout_as_logged() {
    let (be, _) = http_support::backend("a").await;
    let b = Baton::start(&http_config(
        be,
        "    http:\n      keepalive_timeout: 1500ms\n",
    ));
    let mut r = released(&b).await;
    assert!(
        closed_by_peer(&mut r).await,
        "not closed at keep-alive timeout"
    );
    assert!(b
        .log
        .wait_for(&["connection closed", "reason=\"idle timeout\""], WAIT)
        .is_some());
}

/// The real binary: a graceful stop closes a connection waiting in the watcher, and says so.
/// Its listener is gone by then (the stop closes the listeners first), which used to drop it
/// without a line: a client that saw its idle keep-alive connection end (hyper:
/// `ChannelClosed` on the next request) found no close in baton's log, only `drained
/// connections=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_closes_a_released_connection_as_logged() {
    let (be, _) = http_support::backend("a").await;
    let mut b = Baton::start(&http_config(be, ""));
    let mut r = released(&b).await;
    b.signal(rustix::process::Signal::TERM);
    assert!(closed_by_peer(&mut r).await, "not closed by the stop");
    assert_eq!(b.wait_exit(WAIT), Some(0));
    assert!(
        b.log
            .wait_for(&["connection closed", "reason=drained"], WAIT)
            .is_some(),
        "the close at stop is not logged"
    );
}

/// The frame types in `bytes`, a server's side of an HTTP/2 connection.
fn h2_frame_types(bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = usize::from(bytes[at]) << 16
            | usize::from(bytes[at + 1]) << 8
            | usize::from(bytes[at + 2]);
        types.push(bytes[at + 3]);
        at += 9 + len;
    }
    types
}

/// An HTTP/2 (h2c) connection with no open stream closes at keepalive_timeout with a GOAWAY,
/// as an HTTP/1.1 one does between requests; one with requests more often does not. Before,
/// an HTTP/2 connection never idled out: a client that sent the preface, or its last request,
/// and then nothing held its connection (and its max_connections permit) for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2c_connection_closes_at_keepalive_timeout_and_a_busy_one_does_not() {
    use http_body_util::BodyExt;
    let st = setup("      keepalive_timeout: 1500ms\n").await;
    let (mut send, task) = http_support::h2c(st.addr).await;
    for _ in 0..10 {
        send.ready().await.unwrap();
        let resp = send
            .send_request(http_support::get("a", "/"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert!(!task.is_finished(), "a busy connection was closed");
    let quiet = std::time::Instant::now();
    let ended = tokio::time::timeout(WAIT, task)
        .await
        .expect("an idle h2c connection is closed")
        .unwrap();
    assert!(ended.is_ok(), "not a clean GOAWAY: {ended:?}");
    assert!(quiet.elapsed() >= std::time::Duration::from_millis(1100));

    // The preface and SETTINGS, then nothing: a GOAWAY too, and the connection ends.
    let mut s = TcpStream::connect(st.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("a silent h2c connection is closed")
        .unwrap();
    assert_eq!(h2_frame_types(&got).last(), Some(&7), "ends with a GOAWAY");
    assert!(wait_until(WAIT, || st.registry.is_empty()).await);
}
