//! The L4 proxy as a client sees it: the real binary, real sockets on 127.0.0.1, real signals.
//! Half-close both ways, large transfers with checksums, many concurrent connections, idle
//! timeout, max_connections, graceful stop and drain deadline, dead upstreams, and the logs.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use rustix::process::Signal;
use std::hash::Hasher;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::timeout;

/// A config with one TCP listener `t` (extra listener keys in `extra`, indented 4 spaces) in
/// front of `servers`, plus optional `runtime`/`log` sections in `top`.
fn config(top: &str, extra: &str, servers: &[SocketAddr]) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "{top}listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\n{extra}upstreams:\n  u:\n    servers: [{}]\n",
        list.join(", ")
    )
}

/// Reads until EOF, bounded by WAIT.
async fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("EOF in time")
        .unwrap();
    out
}

/// Accepts one connection on a fresh listener and hands it to `f`.
async fn one_shot_backend<F, Fut>(f: F) -> SocketAddr
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        f(s).await;
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fin_reaches_upstream_and_the_reply_still_flows() {
    // The backend reads to EOF (which it sees only if baton passed the client's FIN on), then
    // answers: the upstream → client direction must keep flowing after the half-close.
    let be = one_shot_backend(|mut s| async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let reply = format!("got {} bytes: {}", got.len(), String::from_utf8_lossy(&got));
        s.write_all(reply.as_bytes()).await.unwrap();
        s.write_all(b" and more after EOF").await.unwrap();
        s.shutdown().await.unwrap();
    })
    .await;
    let b = Baton::start(&config("", "", &[be]));
    let mut c = TcpStream::connect(b.addr("t")).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    c.shutdown().await.unwrap();
    let reply = read_to_eof(&mut c).await;
    assert_eq!(
        String::from_utf8(reply).unwrap(),
        "got 5 bytes: hello and more after EOF"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_fin_reaches_client_and_the_client_can_still_send() {
    let (tx, rx) = oneshot::channel::<Vec<u8>>();
    let be = one_shot_backend(|mut s| async move {
        s.write_all(b"bye").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let _ = tx.send(got);
    })
    .await;
    let b = Baton::start(&config("", "", &[be]));
    let mut c = TcpStream::connect(b.addr("t")).await.unwrap();
    // The client sees the server's FIN...
    assert_eq!(read_to_eof(&mut c).await, b"bye");
    // ...and its own direction still reaches the server.
    c.write_all(b"still flowing").await.unwrap();
    c.shutdown().await.unwrap();
    let got = timeout(WAIT, rx).await.expect("backend finished").unwrap();
    assert_eq!(got, b"still flowing");
    assert!(b
        .log
        .wait_for(
            &[
                "connection closed",
                "reason=closed",
                "bytes_in=13",
                "bytes_out=3"
            ],
            WAIT
        )
        .is_some());
}

// ---------------------------------------------------------------------------------------------
// Large transfers

const TOTAL: u64 = 200 * 1024 * 1024;
const BLOCK: usize = 1024 * 1024;

/// A 1 MiB pseudo-random block (xorshift); each sent copy is stamped with its index, so a lost,
/// repeated or reordered block changes the checksum.
fn pattern() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(BLOCK);
    while v.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// Writes TOTAL bytes of stamped blocks; returns their checksum.
async fn send_stream(w: &mut (impl AsyncWriteExt + Unpin)) -> u64 {
    let mut block = pattern();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for i in 0..TOTAL / BLOCK as u64 {
        block[..8].copy_from_slice(&i.to_le_bytes());
        h.write(&block);
        w.write_all(&block).await.unwrap();
    }
    h.finish()
}

/// Reads to EOF; returns (bytes, checksum).
async fn hash_stream(r: &mut (impl AsyncReadExt + Unpin)) -> (u64, u64) {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).await.unwrap();
        if k == 0 {
            return (n, h.finish());
        }
        h.write(&buf[..k]);
        n += k as u64;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_megabytes_each_way_with_checksums() {
    // Upload: the sink backend hashes everything to EOF and answers "len hash".
    let sink = one_shot_backend(|mut s| async move {
        let (n, h) = hash_stream(&mut s).await;
        s.write_all(format!("{n} {h}").as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    })
    .await;
    // Download: the source backend sends TOTAL bytes and closes.
    let (src_tx, src_rx) = oneshot::channel::<u64>();
    let source = one_shot_backend(|mut s| async move {
        let h = send_stream(&mut s).await;
        s.shutdown().await.unwrap();
        let _ = src_tx.send(h);
    })
    .await;
    let b = Baton::start(&format!(
        "listeners:\n  up:\n    listen: 127.0.0.1:0\n    upstream: sink\n  down:\n    listen: 127.0.0.1:0\n    upstream: source\n\
         upstreams:\n  sink:\n    servers: [\"{sink}\"]\n  source:\n    servers: [\"{source}\"]\n"
    ));
    let (up, down) = (b.addr("up"), b.addr("down"));
    let bound = Duration::from_secs(240);

    let upload = tokio::spawn(async move {
        let mut c = TcpStream::connect(up).await.unwrap();
        let sent = send_stream(&mut c).await;
        c.shutdown().await.unwrap();
        let reply = String::from_utf8(read_to_eof(&mut c).await).unwrap();
        (sent, reply)
    });
    let download = tokio::spawn(async move {
        let mut c = TcpStream::connect(down).await.unwrap();
        hash_stream(&mut c).await
    });
    let (sent, reply) = timeout(bound, upload)
        .await
        .expect("upload in time")
        .unwrap();
    assert_eq!(
        reply,
        format!("{TOTAL} {sent}"),
        "upstream received different bytes"
    );
    let (n, h) = timeout(bound, download)
        .await
        .expect("download in time")
        .unwrap();
    let expected = timeout(WAIT, src_rx).await.unwrap().unwrap();
    assert_eq!((n, h), (TOTAL, expected), "client received different bytes");
    assert!(b
        .log
        .wait_for(
            &[
                "connection closed",
                "listener=up",
                &format!("bytes_in={TOTAL}")
            ],
            WAIT
        )
        .is_some());
    assert!(b
        .log
        .wait_for(
            &[
                "connection closed",
                "listener=down",
                &format!("bytes_out={TOTAL}")
            ],
            WAIT
        )
        .is_some());
}

// ---------------------------------------------------------------------------------------------
// Many connections

/// Raises this test process's open-file soft limit to the hard limit.
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    lim.current = lim.maximum;
    setrlimit(Resource::Nofile, lim).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_each_echo() {
    const N: usize = 1000;
    raise_nofile();
    let be = echo_backend("E").await;
    let b = Baton::start(&config("", "    backlog: 2048\n", &[be]));
    let addr = b.addr("t");
    // Every connection stays open until all have done their round trip: they are concurrent.
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let ok = Arc::new(AtomicUsize::new(0));
    // At most 100 handshakes in progress at once: a burst of 1000 SYNs would overflow the test
    // backend's accept queue (1024) and leave connects waiting on SYN retransmits.
    let opening = Arc::new(tokio::sync::Semaphore::new(100));
    let mut tasks = Vec::new();
    for i in 0..N {
        let (barrier, ok, opening) = (barrier.clone(), ok.clone(), opening.clone());
        tasks.push(tokio::spawn(async move {
            let permit = opening.acquire_owned().await.unwrap();
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut g = [0u8; 1];
            s.read_exact(&mut g).await.unwrap();
            drop(permit);
            let msg = format!("conn {i:06} ping");
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await.unwrap();
            if &g == b"E" && back == msg.as_bytes() {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            barrier.wait().await;
        }));
    }
    for t in tasks {
        timeout(Duration::from_secs(120), t)
            .await
            .expect("connections finish in time")
            .unwrap();
    }
    assert_eq!(ok.load(Ordering::Relaxed), N);
    // Baton logs a close line for each of them once the clients are gone.
    let all_closed = wait_until(WAIT, || b.log.count("connection closed") >= N).await;
    assert!(
        all_closed,
        "only {} close lines",
        b.log.count("connection closed")
    );
}

// ---------------------------------------------------------------------------------------------
// Timeouts and limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_a_quiet_tunnel_but_not_an_active_one() {
    let be = echo_backend("I").await;
    // Two listeners: `quiet` with a short timeout, `busy` with a longer one so that a stall of
    // the noisy test machine between two pings cannot look like idleness.
    let b = Baton::start(&format!(
        "listeners:\n  quiet:\n    listen: 127.0.0.1:0\n    upstream: u\n    idle_timeout: 300ms\n\
         \x20 busy:\n    listen: 127.0.0.1:0\n    upstream: u\n    idle_timeout: 1500ms\n\
         upstreams:\n  u:\n    servers: [\"{be}\"]\n"
    ));
    let (quiet_addr, busy_addr) = (b.addr("quiet"), b.addr("busy"));

    // The active tunnel sends every 100 ms for three times its timeout and keeps getting echoes.
    let active = tokio::spawn(async move {
        let (mut s, _) = greeting(busy_addr, 1).await;
        for i in 0..45u32 {
            let msg = i.to_le_bytes();
            s.write_all(&msg).await.unwrap();
            let mut back = [0u8; 4];
            timeout(WAIT, s.read_exact(&mut back))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(back, msg);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // The quiet tunnel is closed by baton: the client reads EOF.
    let (mut quiet, _) = greeting(quiet_addr, 1).await;
    assert_eq!(read_to_eof(&mut quiet).await, b"");
    assert!(b
        .log
        .wait_for(
            &[
                "connection closed",
                "listener=quiet",
                "reason=\"idle timeout\""
            ],
            WAIT
        )
        .is_some());

    timeout(Duration::from_secs(60), active)
        .await
        .expect("active tunnel finished")
        .unwrap();
    assert_eq!(
        b.log.count("idle timeout"),
        1,
        "the active tunnel was closed too"
    );
}

/// An echo backend that counts the connections it accepted.
async fn counting_backend(greeting: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                break;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if s.write_all(greeting).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_the_sixth_until_one_closes() {
    let (be, accepted) = counting_backend(b"M").await;
    let b = Baton::start(&config("", "    max_connections: 5\n", &[be]));
    let addr = b.addr("t");
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(greeting(addr, 1).await.0);
    }
    // The kernel completes the sixth handshake (backlog), but baton does not accept it.
    let mut sixth = TcpStream::connect(addr).await.unwrap();
    let mut g = [0u8; 1];
    let early = timeout(Duration::from_millis(700), sixth.read_exact(&mut g)).await;
    assert!(
        early.is_err(),
        "the sixth connection was served while five were open"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        5,
        "baton connected upstream for the sixth"
    );

    // One closes: the sixth gets its greeting.
    drop(open.remove(0));
    timeout(WAIT, sixth.read_exact(&mut g))
        .await
        .expect("sixth served after a close")
        .unwrap();
    assert_eq!(&g, b"M");
    assert_eq!(accepted.load(Ordering::SeqCst), 6);
}

// ---------------------------------------------------------------------------------------------
// Graceful stop

/// Connects until the listener refuses (it closes some time after the signal).
async fn wait_refused(addr: SocketAddr) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    false
}

async fn echo_round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    timeout(WAIT, s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(back, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_connections_and_lets_open_tunnels_finish() {
    let be = echo_backend("G").await;
    let mut b = Baton::start(&config("runtime:\n  drain_timeout: 60s\n", "", &[be]));
    let addr = b.addr("t");
    let (mut s1, _) = greeting(addr, 1).await;
    let (mut s2, _) = greeting(addr, 1).await;
    echo_round_trip(&mut s1, b"before").await;

    b.signal(Signal::TERM);
    assert!(b
        .log
        .wait_for(&["stopping gracefully", "trigger=SIGTERM"], WAIT)
        .is_some());
    assert!(
        wait_refused(addr).await,
        "new connections still accepted after SIGTERM"
    );

    // Open tunnels keep working while the process drains.
    echo_round_trip(&mut s1, b"during drain").await;
    echo_round_trip(&mut s2, b"also during drain").await;
    assert_eq!(
        b.child.try_wait().unwrap(),
        None,
        "exited with tunnels open"
    );
    drop(s1);
    echo_round_trip(&mut s2, b"last one").await;
    s2.shutdown().await.unwrap();
    assert_eq!(read_to_eof(&mut s2).await, b"");

    assert_eq!(b.wait_exit(WAIT), Some(0));
    assert!(b.log.wait_for(&["drained"], WAIT).is_some());
    assert!(!b.dir().join("baton.pid").exists(), "pid file left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_closes_what_is_left_and_exits_zero() {
    let be = echo_backend("D").await;
    let mut b = Baton::start(&config("runtime:\n  drain_timeout: 500ms\n", "", &[be]));
    let (mut s, _) = greeting(b.addr("t"), 1).await;
    b.signal(Signal::TERM);
    // The client never closes; baton closes it at the deadline.
    assert_eq!(read_to_eof(&mut s).await, b"");
    assert_eq!(b.wait_exit(WAIT), Some(0));
    assert!(b
        .log
        .wait_for(&["drain deadline reached", "connections=1"], WAIT)
        .is_some());
    assert!(b
        .log
        .wait_for(
            &["connection closed", "reason=\"closed at drain deadline\""],
            WAIT
        )
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_gracefully_too() {
    let be = echo_backend("").await;
    let mut b = Baton::start(&config("", "", &[be]));
    b.signal(Signal::INT);
    assert_eq!(b.wait_exit(WAIT), Some(0));
    assert!(b
        .log
        .wait_for(&["stopping gracefully", "trigger=SIGINT"], WAIT)
        .is_some());
}

// ---------------------------------------------------------------------------------------------
// Dead upstreams

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_dead_closes_the_client_and_logs_why() {
    let (d1, d2) = (dead_addr(), dead_addr());
    let b = Baton::start(&config("", "", &[d1, d2]));
    let mut c = TcpStream::connect(b.addr("t")).await.unwrap();
    // The client is closed (FIN or reset) without a byte.
    let mut buf = Vec::new();
    let res = timeout(WAIT, c.read_to_end(&mut buf))
        .await
        .expect("client closed in time");
    assert!(
        res.is_err() || buf.is_empty(),
        "got bytes from nowhere: {buf:?}"
    );
    let why = b
        .log
        .wait_for(&["no server connected", "listener=t"], WAIT)
        .expect("a line says why");
    assert!(
        why.contains("connection refused") || why.contains("Connection refused"),
        "{why}"
    );
    assert!(why.contains("side=upstream"), "{why}");
    assert!(b
        .log
        .wait_for(
            &["connection closed", "reason=\"upstream connect failed\""],
            WAIT
        )
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_is_skipped_for_a_live_one() {
    let live = echo_backend("L").await;
    let b = Baton::start(&config("", "", &[dead_addr(), live]));
    // Round robin meets the dead server on every other pick; retries reach the live one.
    for _ in 0..4 {
        let (_, g) = greeting(b.addr("t"), 1).await;
        assert_eq!(g, "L");
    }
}

// ---------------------------------------------------------------------------------------------
// Logs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_lines_carry_the_connection_facts_and_every_line_has_pid() {
    let be = echo_backend("P").await;
    let b = Baton::start(&config("", "", &[be]));
    let (mut s, _) = greeting(b.addr("t"), 1).await;
    echo_round_trip(&mut s, b"12345").await;
    let client = s.local_addr().unwrap();
    drop(s);
    let line = b
        .log
        .wait_for(&["connection closed", &format!("client={client}")], WAIT)
        .unwrap();
    for field in [
        "listener=t",
        &format!("server={be}"),
        "bytes_in=5",
        "bytes_out=6",
        "duration_ms=",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    let pid = format!("pid={}", b.pid());
    for l in b.log.all() {
        assert!(l.contains(&pid), "line without {pid}: {l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_parseable_lines_with_pid() {
    let be = echo_backend("J").await;
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, config("log:\n  format: json\n", "", &[be])).unwrap();
    // Baton::start reads text lines; start it here and read JSON.
    let mut child = Command::new(bin())
        .args(["run", "-c"])
        .arg(&config_path)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(LogLines::default());
    pump(child.stderr.take().unwrap(), log.clone(), "baton-json");
    let mut b = Baton {
        child,
        dir,
        config: config_path,
        log,
    };
    let listening = b
        .log
        .wait_for(&["\"msg\":\"listening\""], WAIT)
        .expect("listening line");
    let v: serde_json::Value = serde_json::from_str(&listening).unwrap();
    let addr: SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();

    let (mut s, _) = greeting(addr, 1).await;
    echo_round_trip(&mut s, b"json").await;
    drop(s);
    let closed = b
        .log
        .wait_for(&["\"msg\":\"connection closed\""], WAIT)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&closed).unwrap();
    assert_eq!(v["listener"], "t");
    assert_eq!(v["bytes_in"], 4);
    assert_eq!(v["bytes_out"], 5);
    assert_eq!(v["server"], be.to_string());

    b.signal(Signal::TERM);
    assert_eq!(b.wait_exit(WAIT), Some(0));
    let lines = b.log.all();
    assert!(lines.len() >= 4);
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert_eq!(v["pid"], u64::from(b.child.id()), "{l}");
        assert!(v["level"].is_string() && v["msg"].is_string(), "{l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_backs_off_and_recovers() {
    let be = echo_backend("F").await;
    let b = Baton::start(&config("", "", &[be]));
    let addr = b.addr("t");
    // Clamp the running process to a few spare fds: accepting soon hits EMFILE.
    let open = std::fs::read_dir(format!("/proc/{}/fd", b.pid()))
        .unwrap()
        .count();
    let limit = open + 6;
    let st = Command::new("prlimit")
        .args([
            "--pid",
            &b.pid().to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    // Each served connection costs two fds (client + upstream); hold connections until
    // accepting fails, then a few more that wait in the backlog.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(greeting(addr, 1).await.0);
    }
    let mut waiting = Vec::new();
    for _ in 0..5 {
        waiting.push(TcpStream::connect(addr).await.unwrap());
    }
    assert!(
        b.log
            .wait_for(&["accept failed: out of resources, backing off"], WAIT)
            .is_some(),
        "no EMFILE back-off logged"
    );
    // Freeing fds, the process serves again: clients that waited in the backlog are served
    // (or, if one was accepted while its upstream connect hit EMFILE, closed cleanly), none
    // is left hanging, and the local failures ejected no server.
    drop(held);
    for mut s in waiting {
        let mut g = [0u8; 1];
        let n = timeout(WAIT, s.read(&mut g))
            .await
            .expect("a waiting client hung")
            .unwrap_or(0);
        assert!(n == 0 || g == *b"F", "unexpected greeting {g:?}");
    }
    // Closing connections release their fds asynchronously; once they have, a new client is
    // served (until then it may be closed cleanly, as above).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut g = [0u8; 1];
        if let Ok(Ok(1)) = timeout(WAIT, s.read(&mut g)).await {
            assert_eq!(g, *b"F");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.log.count("server ejected"), 0);
    // At most one warning per second: far fewer lines than accept attempts.
    let warns = b.log.count("accept failed: out of resources");
    assert!(warns <= 30, "back-off warnings not rate limited: {warns}");
    assert_eq!(b.log.count("panicked"), 0);
}
