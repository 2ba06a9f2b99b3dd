//! The old process SIGKILLed at each step of a real upgrade, held there by the test hook
//! `BATON_TEST_FAULT=hold_upgrade:STEP`. Before the commit the successor gives up at once
//! (its handover channel closed), says why, and exits: nothing listens on the port any more,
//! and no second proxy lives on. After the commit it serves on, with what it was handed.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upgrade under way, its old process stopped before `step`.
struct Held {
    b: Baton,
    /// The TCP listener's address.
    addr: SocketAddr,
    /// A tunnel opened before the upgrade.
    tunnel: TcpStream,
    /// The successor's pid.
    successor: i32,
}

/// A line through `s` and back.
async fn round_trip(s: &mut TcpStream, line: &[u8]) -> std::io::Result<()> {
    s.write_all(line).await?;
    let mut buf = vec![0; line.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("echo timed out"))??;
    assert_eq!(buf, line);
    Ok(())
}

async fn held_at(step: &str) -> Held {
    let echo = echo_backend("").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    // A step deadline far beyond the waits below: the successor must go because its
    // predecessor is gone, not because a step timed out.
    std::fs::write(
        &config,
        format!("runtime:\n  upgrade_timeout: 120s\n  drain_timeout: 5s\nlisteners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: echo\nupstreams:\n  echo:\n    servers: [\"{echo}\"]\n"),
    )
    .unwrap();
    let fault = format!("hold_upgrade:{step}");
    let b = Baton::start_with_env(dir, config, &[("BATON_TEST_FAULT", &fault)]);
    let addr = b.addr("t");
    let mut tunnel = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut tunnel, b"before\n").await.unwrap();
    b.signal(rustix::process::Signal::USR2);
    let started = b
        .log
        .wait_for(&["successor started"], WAIT)
        .expect("no successor started");
    let successor = started
        .split("successor=")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("successor pid in the log");
    assert!(
        b.log
            .wait_for(&["test fault: upgrade held", step], WAIT)
            .is_some(),
        "the upgrade was not held before {step}"
    );
    Held {
        b,
        addr,
        tunnel,
        successor,
    }
}

/// SIGKILLs the old process and waits for it to be gone.
async fn kill_old(h: &Held) {
    h.b.signal(rustix::process::Signal::KILL);
    assert!(wait_until(WAIT, || !alive(h.b.pid())).await);
}

async fn killed_before_the_commit(step: &str) {
    let mut h = held_at(step).await;
    kill_old(&h).await;
    assert!(
        wait_until(WAIT, || !alive(h.successor)).await,
        "before {step}: the successor outlived its predecessor"
    );
    assert!(
        h.b.log
            .wait_for(
                &[
                    "taking over from the predecessor failed",
                    "predecessor gone before the commit"
                ],
                WAIT
            )
            .is_some(),
        "before {step}: no line saying why the successor exited"
    );
    // Both processes are gone, and nothing kept the listening socket.
    let refused = TcpStream::connect(h.addr).await.map_err(|e| e.kind());
    assert_eq!(
        refused.err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "before {step}: the port still listens"
    );
    // The tunnel died with the processes (it was never served by the successor).
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(WAIT, h.tunnel.read(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "before {step}: the tunnel is still open: {n:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_process_killed_before_offering_listeners() {
    killed_before_the_commit("listeners").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_process_killed_after_ready_before_any_connection_moved() {
    killed_before_the_commit("batch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_process_killed_after_handing_over_connections_before_the_commit() {
    killed_before_the_commit("commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_process_killed_after_the_commit_leaves_the_successor_serving() {
    let mut h = held_at("done").await;
    // The successor took the pid file at the commit.
    assert!(wait_until(WAIT, || h.b.serving_pid() == h.successor).await);
    kill_old(&h).await;
    assert!(
        h.b.log
            .wait_for(&["take-over ended early", "predecessor"], WAIT)
            .is_some(),
        "the successor did not notice"
    );
    assert!(alive(h.successor));
    // The tunnel moved before the commit and is served by the successor; so are new clients.
    round_trip(&mut h.tunnel, b"after\n").await.unwrap();
    let mut fresh = TcpStream::connect(h.addr).await.unwrap();
    round_trip(&mut fresh, b"fresh\n").await.unwrap();
    let (ok, status) = cli(&h.b.config, "status", &["--json"]);
    assert!(ok, "{status}");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["pid"], h.successor);
    assert_eq!(v["phase"], "ready");
}
