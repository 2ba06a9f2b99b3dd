//! systemd integration against the real binary: socket activation (LISTEN_FDS) and the
//! sd_notify messages a unit of `Type=notify` relies on, received on a test-made NOTIFY_SOCKET.
//!
//! How the listening socket reaches baton as fd 3 without `unsafe` `pre_exec`: the test clears
//! close-on-exec on its socket and starts `/bin/bash` (dash takes only one-digit fds), which moves it to fd 3 (`exec 3<&N`) and
//! then `exec`s baton, so `LISTEN_PID=$$` is baton's pid too.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};

fn config(backend: std::net::SocketAddr) -> String {
    format!(
        "runtime:\n  drain_timeout: 10s\n  upgrade_timeout: 10s\n\
         listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\n  other:\n    listen: 127.0.0.1:0\n    upstream: u\n\
         upstreams:\n  u:\n    servers: [\"{backend}\"]\n"
    )
}

/// Starts baton through `/bin/bash` with `fd` as fd 3 and the LISTEN_* variables set;
/// `pid_expr` is what LISTEN_PID is set to (`$$` is baton's own pid after `exec`).
fn start_activated(yaml: &str, fd: &std::net::TcpListener, name: &str, pid_expr: &str) -> Baton {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty()).unwrap();
    let n = fd.as_raw_fd();
    let script = format!(
        "if [ {n} != 3 ]; then exec 3<&{n} {n}<&-; fi; \
         LISTEN_PID={pid_expr} LISTEN_FDS=1 LISTEN_FDNAMES={name} exec \"$0\" run -c \"$1\""
    );
    let child = Command::new("/bin/bash")
        .arg("-c")
        .arg(script)
        .arg(bin())
        .arg(&config)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Only the child should hold it now.
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC).unwrap();
    Baton::adopt(child, dir, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_adopts_the_named_socket() {
    let be = echo_backend("E").await;
    let prepared = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = prepared.local_addr().unwrap();
    let b = start_activated(&config(be), &prepared, "t", "$$");
    drop(prepared);
    assert!(b
        .log
        .wait_for(&["socket passed by systemd", "name=t"], WAIT)
        .is_some());
    // Listener t serves on the prepared socket; "other" (no fd of that name) binds its own.
    assert_eq!(b.addr("t"), addr);
    assert_ne!(b.addr("other"), addr);
    let (_s, g) = greeting(addr, 1).await;
    assert_eq!(g, "E");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_ignores_fds_meant_for_another_pid() {
    let be = echo_backend("E").await;
    let prepared = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = prepared.local_addr().unwrap();
    // LISTEN_PID names the shell's parent (this test), not baton.
    let b = start_activated(&config(be), &prepared, "t", "$PPID");
    assert_ne!(b.addr("t"), addr);
    assert_eq!(b.log.count("socket passed by systemd"), 0);
}

/// Receives notify datagrams until one contains every needle.
fn wait_notify(sock: &UnixDatagram, seen: &mut Vec<String>, needles: &[&str]) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(m) = seen.iter().find(|m| needles.iter().all(|n| m.contains(n))) {
            return m.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no notify message with {needles:?}; got {seen:?}"
        );
        let mut buf = [0u8; 4096];
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_reloading_and_mainpid_of_the_successor() {
    let be = echo_backend("E").await;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, config_yaml(be)).unwrap();
    let b = Baton::start_with_env(
        dir,
        config,
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let mut seen = Vec::new();
    wait_notify(&sock, &mut seen, &["READY=1"]);

    let out = Command::new(bin())
        .args(["upgrade", "-c"])
        .arg(&b.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let reloading = wait_notify(&sock, &mut seen, &["RELOADING=1"]);
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let new_pid: u32 = std::fs::read_to_string(b.dir().join("baton.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(new_pid, b.pid() as u32);
    let main = wait_notify(
        &sock,
        &mut seen,
        &[&format!("MAINPID={new_pid}\n"), "READY=1"],
    );
    // Order: READY (old), RELOADING (old), then MAINPID+READY (new).
    let at = |needle: &str| seen.iter().position(|m| m.contains(needle)).unwrap();
    assert!(
        at("READY=1") < at("RELOADING=1") && at("RELOADING=1") < at(&main),
        "{seen:?}"
    );

    // The successor stops gracefully: STOPPING=1.
    let out = Command::new(bin())
        .args(["stop", "-c"])
        .arg(&b.config)
        .output()
        .unwrap();
    assert!(out.status.success());
    wait_notify(&sock, &mut seen, &["STOPPING=1"]);
}

fn config_yaml(backend: std::net::SocketAddr) -> String {
    format!(
        "runtime:\n  drain_timeout: 10s\n  upgrade_timeout: 10s\n\
         listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\n\
         upstreams:\n  u:\n    servers: [\"{backend}\"]\n"
    )
}
