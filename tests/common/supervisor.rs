//! Helpers for the multi-process tests: the supervisor's status (`baton status --json`),
//! waiting for a condition on it, and what it says per worker.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use super::{bin, Baton, WAIT};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `baton status --json`.
pub fn status(b: &Baton) -> serde_json::Value {
    let out = std::process::Command::new(bin())
        .args(["status", "--json", "-c"])
        .arg(&b.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "status failed: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Worker `index`'s pid in a status.
pub fn worker_pid(s: &serde_json::Value, index: usize) -> Option<i32> {
    s["workers"][index]["pid"].as_i64().map(|p| p as i32)
}

/// Connections worker `index` accepted (all listeners), as of its last heartbeat.
pub fn accepted(s: &serde_json::Value, index: usize) -> u64 {
    s["workers"][index]["counters"]["accepted"]
        .as_u64()
        .unwrap_or(0)
}

/// Connections worker `index` accepted on `listener`, as of its last heartbeat.
pub fn accepted_on(s: &serde_json::Value, index: usize, listener: &str) -> u64 {
    s["workers"][index]["counters"]["listeners"][listener]["accepted"]
        .as_u64()
        .unwrap_or(0)
}

/// Waits for the status to satisfy `cond` (status comes from heartbeats, once a second).
pub async fn wait_status(
    b: &Baton,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s = status(b);
        if cond(&s) {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: last status {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until both workers serve; returns that status.
pub async fn two_serving(b: &Baton) -> serde_json::Value {
    wait_status(b, "two workers serving", |s| {
        (0..2).all(|i| s["workers"][i]["state"] == "serving")
    })
    .await
}

/// An address on 127.0.0.1 that was free a moment ago (bound, then released), for a config
/// that needs a fixed port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One echo round trip through `addr`.
pub async fn echo_once(addr: SocketAddr, line: &str) -> Result<(), String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.write_all(line.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; line.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .map_err(|_| format!("{addr}: echo timed out"))?
        .map_err(|e| e.to_string())?;
    if buf != line.as_bytes() {
        return Err(format!("{addr}: got {:?}", String::from_utf8_lossy(&buf)));
    }
    Ok(())
}

/// Makes `n` connections through `addr`, each with one echo; all must work.
pub async fn connections(addr: SocketAddr, n: usize) {
    for i in 0..n {
        echo_once(addr, &format!("conn {i}\n")).await.unwrap();
    }
}
