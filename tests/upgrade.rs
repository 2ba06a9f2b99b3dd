//! The live upgrade, end to end: real binaries, real signals, real sockets. A client must never
//! notice: no byte lost, duplicated or reordered, no connection reset, no request failed.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn tcp_config(backend: std::net::SocketAddr, extra_runtime: &str) -> String {
    format!(
        "runtime:\n  drain_timeout: 10s\n  upgrade_timeout: 10s\n{extra_runtime}listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\nupstreams:\n  u:\n    servers: [\"{backend}\"]\n"
    )
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_tunnels_survive_ten_upgrades() {
    let be = echo_backend("").await;
    let b = Baton::start(&tcp_config(be, ""));
    let addr = b.addr("t");
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..50 {
        clients.push(started_numbered_echo(addr, i, stop.clone()).await);
    }
    let first = b.serving_pid();
    let mut pids = vec![first];
    for round in 0..10 {
        let (ok, out) = upgrade_async(&b.config).await;
        assert!(ok, "upgrade {round} failed: {out}");
        assert!(out.contains("50 tunnels"), "upgrade {round}: {out}");
        let pid = b.serving_pid();
        assert!(
            !pids.contains(&pid),
            "a new process serves after upgrade {round}"
        );
        pids.push(pid);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let n = c.await.unwrap().unwrap();
        assert!(n > 0);
    }
    // At most two generations: every old process is gone.
    for pid in &pids[..pids.len() - 1] {
        assert!(
            wait_until(WAIT, || !alive(*pid)).await,
            "old pid {pid} still alive"
        );
    }
    kill_serving(&b);
}

fn kill_serving(b: &Baton) {
    let pid = b.serving_pid();
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_bytes_in_flight_move_with_the_connection() {
    // A backend that reads everything and answers only when the client half-closes: bytes sit
    // in baton's buffers and in the kernel across the upgrade.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let be = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                s.read_to_end(&mut all).await.unwrap();
                s.write_all(&all).await.unwrap();
            });
        }
    });
    let b = Baton::start(&tcp_config(be, ""));
    let mut s = TcpStream::connect(b.addr("t")).await.unwrap();
    let payload: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&payload[..2_000_000]).await.unwrap();
    let (ok, out) = upgrade_async(&b.config).await;
    assert!(ok, "{out}");
    s.write_all(&payload[2_000_000..]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "bytes differ after the upgrade");
    kill_serving(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_when_successor_exits_at_once() {
    let be = echo_backend("E").await;
    let b = Baton::start(&tcp_config(be, ""));
    let (mut s, g) = greeting(b.addr("t"), 1).await;
    assert_eq!(g, "E");
    let (ok, out) = b.cli_upgrade(&["--binary", "/bin/false"]);
    assert!(!ok);
    assert!(out.contains("still serving"), "{out}");
    // The same process keeps serving the old connection and new ones.
    assert_eq!(b.serving_pid(), b.pid());
    s.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"x");
    let (_s2, g2) = greeting(b.addr("t"), 1).await;
    assert_eq!(g2, "E");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_when_successor_config_is_invalid() {
    let be = echo_backend("E").await;
    let b = Baton::start(&tcp_config(be, ""));
    let (mut s, _) = greeting(b.addr("t"), 1).await;
    let good = std::fs::read_to_string(&b.config).unwrap();
    std::fs::write(&b.config, good.replace("upstream: u", "upstream: nope")).unwrap();
    // reload validates before spawning anything, and says why it refused.
    let out = Command::new(bin())
        .args(["reload", "-c"])
        .arg(&b.config)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("config refused") && text.contains("unknown upstream"),
        "{text}"
    );
    assert!(
        b.log.count("successor started") == 0,
        "a successor was spawned for an invalid config"
    );
    // SIGUSR2: the successor finds the config invalid and refuses; the old process says why.
    b.signal(rustix::process::Signal::USR2);
    assert!(
        b.log
            .wait_for(&["upgrade failed", "unknown upstream"], WAIT)
            .is_some(),
        "old process did not report the successor's refusal"
    );
    std::fs::write(&b.config, good).unwrap();
    s.write_all(b"y").await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"y");
    assert_eq!(b.serving_pid(), b.pid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_when_successor_never_ready() {
    let be = echo_backend("E").await;
    let b = Baton::start(
        &tcp_config(be, "  upgrade_timeout: 1s\n").replace("  upgrade_timeout: 10s\n", ""),
    );
    let hang = b.dir().join("hang.sh");
    std::fs::write(&hang, "#!/bin/sh\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&hang, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (mut s, _) = greeting(b.addr("t"), 1).await;
    let (ok, out) = b.cli_upgrade(&["--binary", hang.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("no answer within upgrade_timeout"), "{out}");
    s.write_all(b"z").await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_when_successor_is_killed_mid_handover() {
    let be = echo_backend("").await;
    // The fault hook makes a successor SIGKILL itself after receiving its first connection batch.
    let yaml = tcp_config(be, "");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    let b = Baton::start_with_env(
        dir,
        config,
        &[("BATON_TEST_FAULT", "kill_after_first_batch")],
    );
    let addr = b.addr("t");
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(started_numbered_echo(addr, i, stop.clone()).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (ok, out) = b.cli_upgrade(&[]);
    assert!(!ok, "{out}");
    assert!(out.contains("still serving"), "{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap().unwrap();
    }
    assert_eq!(b.serving_pid(), b.pid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_upgrade_during_an_upgrade_is_refused() {
    let be = echo_backend("").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, tcp_config(be, "")).unwrap();
    let b = Baton::start_with_env(dir, config, &[("BATON_TEST_FAULT", "slow_ready")]);
    b.signal(rustix::process::Signal::USR2);
    assert!(b.log.wait_for(&["successor started"], WAIT).is_some());
    b.signal(rustix::process::Signal::USR2);
    assert!(b
        .log
        .wait_for(&["upgrade refused", "already in progress"], WAIT)
        .is_some());
    assert!(b
        .log
        .wait_for(&["upgrade complete; exiting"], WAIT)
        .is_some());
    let pid = b.pid();
    assert!(wait_until(WAIT, || b.serving_pid() != pid).await);
    kill_serving(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fd_leak_across_twenty_upgrades() {
    let be = echo_backend("").await;
    let b = Baton::start(&tcp_config(be, ""));
    let addr = b.addr("t");
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(started_numbered_echo(addr, i, stop.clone()).await);
    }
    let mut counts = Vec::new();
    for _ in 0..20 {
        let (ok, out) = upgrade_async(&b.config).await;
        assert!(ok, "{out}");
        counts.push(fd_count(b.serving_pid()));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap().unwrap();
    }
    eprintln!("fd counts after each upgrade: {counts:?}");
    // One fd of slack: the CLI's control connection may not be closed yet when we count.
    // A leak of even one fd per upgrade would show as +19 here.
    assert!(
        counts[19] <= counts[0] + 1,
        "fd count grew across upgrades: {counts:?}"
    );
    kill_serving(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_on_disk_is_started_not_the_running_one() {
    // Run a copy of baton from a temp folder, then replace that file (as `mv` of a new build
    // would): the upgrade must start the new file, not /proc/self/exe (the old, deleted one).
    let be = echo_backend("").await;
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("baton");
    std::fs::copy(bin(), &exe).unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, tcp_config(be, "")).unwrap();
    let child = Command::new(&exe)
        .args(["run", "-c"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Ended on drop with its successor, also when an assertion fails.
    let mut b = Baton::adopt(child, dir, config);
    // The "new build": a wrapper that leaves a mark, then runs the real binary.
    let marker = b.dir().join("new-binary-ran");
    let staged = b.dir().join("baton.new");
    std::fs::write(
        &staged,
        format!(
            "#!/bin/sh\ntouch {}\nexec {} \"$@\"\n",
            marker.display(),
            bin()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&staged, &exe).unwrap();
    let (ok, out) = b.cli_upgrade(&[]);
    assert!(ok, "{out}");
    assert!(
        marker.exists(),
        "the replaced binary was not the one started"
    );
    assert_eq!(b.wait_exit(WAIT), Some(0));
    assert_ne!(b.serving_pid(), b.pid());
}

/// One echo round trip of `msg` within `within`; false if no echo came.
async fn echoes(s: &mut TcpStream, msg: &[u8], within: Duration) -> bool {
    if s.write_all(msg).await.is_err() {
        return false;
    }
    let mut back = vec![0u8; msg.len()];
    matches!(
        tokio::time::timeout(within, s.read_exact(&mut back)).await,
        Ok(Ok(_))
    ) && back == msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_serves_every_tunnel_it_is_handed_and_queued_clients_wait() {
    // A listener at max_connections with a client queued in its backlog: at the commit the
    // successor used to start accepting first, give the queued client a permit, and leave a
    // handed-over tunnel waiting for one (unserved, and the rest of the take-over with it).
    let be = echo_backend("").await;
    let b = Baton::start(&format!(
        "runtime:\n  drain_timeout: 10s\nlisteners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\n    max_connections: 3\nupstreams:\n  u:\n    servers: [\"{be}\"]\n"
    ));
    let addr = b.addr("t");
    let mut open = Vec::new();
    for i in 0..3u8 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert!(echoes(&mut s, &[b'a' + i], WAIT).await);
        open.push(s);
    }
    let mut queued = TcpStream::connect(addr).await.unwrap();
    assert!(!echoes(&mut queued, b"q", Duration::from_millis(500)).await);
    for round in 0..2 {
        let (ok, out) = upgrade_async(&b.config).await;
        assert!(ok, "upgrade {round}: {out}");
        assert!(out.contains("3 tunnels"), "upgrade {round}: {out}");
        for (i, s) in open.iter_mut().enumerate() {
            assert!(
                echoes(s, format!("{round}{i}").as_bytes(), WAIT).await,
                "handed-over tunnel {i} not served after upgrade {round}"
            );
        }
    }
    // The queued client still waits for room: the handed-over tunnels took the permits.
    let mut q = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), queued.read_exact(&mut q))
            .await
            .is_err(),
        "a fourth connection was served while three were open"
    );
    drop(open.remove(0));
    tokio::time::timeout(WAIT, queued.read_exact(&mut q))
        .await
        .expect("the queued client is served once one closes")
        .unwrap();
    assert_eq!(&q, b"q");
    kill_serving(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_keeps_counting_across_an_upgrade() {
    // The successor used to start a handed-over tunnel's idle clock again, so a tunnel moved
    // by reloads more often than its idle_timeout never idled out.
    let be = echo_backend("").await;
    let b = Baton::start(&format!(
        "runtime:\n  drain_timeout: 10s\nlisteners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\n    idle_timeout: 2s\nupstreams:\n  u:\n    servers: [\"{be}\"]\n"
    ));
    let mut s = TcpStream::connect(b.addr("t")).await.unwrap();
    assert!(echoes(&mut s, b"x", WAIT).await);
    let quiet_since = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ok, out) = upgrade_async(&b.config).await;
    assert!(ok, "{out}");
    assert!(out.contains("1 tunnels"), "{out}");
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("closed for idleness")
        .unwrap();
    // Closed about 2 s after the last byte; a clock started again at the park would close
    // it 3.5 s after it or later.
    let quiet = quiet_since.elapsed();
    assert!(
        quiet < Duration::from_millis(3200),
        "closed after {quiet:?} of quiet"
    );
    assert!(b
        .log
        .wait_for(&["connection closed", "reason=\"idle timeout\""], WAIT)
        .is_some());
    kill_serving(&b);
}
