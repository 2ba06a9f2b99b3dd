//! systemd integration against the real binary: socket activation (LISTEN_FDS) and the
//! sd_notify messages a unit of `Type=notify` relies on, received on a test-made NOTIFY_SOCKET;
//! the pid file and control socket in `$RUNTIME_DIRECTORY`; and the shipped units verified.
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

/// Kills the process named by a pid file when dropped (a successor is not our child).
struct KillByPidFile(std::path::PathBuf);

impl Drop for KillByPidFile {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(&self.0).ok();
        if let Some(pid) = pid.and_then(|p| p.trim().parse().ok()) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_directory_holds_the_pid_file_and_control_socket_across_upgrades() {
    let be = echo_backend("E").await;
    let dir = tempfile::tempdir().unwrap();
    // What `RuntimeDirectory=baton` gives the unit: a writable folder named in the environment,
    // while the config's own folder may be read-only.
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, config_yaml(be)).unwrap();
    let _guard = KillByPidFile(run.join("baton.pid"));
    let b = Baton::start_with_env(dir, config, &[("RUNTIME_DIRECTORY", run.to_str().unwrap())]);
    assert_eq!(
        std::fs::read_to_string(run.join("baton.pid"))
            .unwrap()
            .trim(),
        b.pid().to_string()
    );
    assert!(run.join("baton.sock").exists());
    assert!(!b.dir().join("baton.pid").exists() && !b.dir().join("baton.sock").exists());
    // ExecReload runs with the unit's environment: `-c` finds the socket in the same place.
    let out = Command::new(bin())
        .args(["reload", "-c"])
        .arg(&b.config)
        .env("RUNTIME_DIRECTORY", &run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The successor inherited the variable: it rewrote the pid file and took the socket there.
    let new_pid = std::fs::read_to_string(run.join("baton.pid")).unwrap();
    assert_ne!(new_pid.trim(), b.pid().to_string());
    // An operator's shell has no $RUNTIME_DIRECTORY: --socket names the socket.
    let out = Command::new(bin())
        .args(["stop", "--socket"])
        .arg(run.join("baton.sock"))
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("stopped pid {}", new_pid.trim())),
        "{text}"
    );
}

/// `systemd-analyze verify` on the shipped units, with ExecStart pointing at the binary under
/// test (verify checks that it is executable). Any warning counts as a failure: verify exits 0
/// on unknown keys or bad values and only prints them.
#[test]
fn shipped_units_pass_systemd_analyze_verify() {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!(
            "SKIP shipped_units_pass_systemd_analyze_verify: systemd-analyze not installed \
             (apt-get install systemd)"
        );
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
    let dir = tempfile::tempdir().unwrap();
    for unit in ["baton.service", "baton.socket"] {
        let text = std::fs::read_to_string(root.join(unit)).unwrap();
        std::fs::write(
            dir.path().join(unit),
            text.replace("/usr/local/bin/baton", bin()),
        )
        .unwrap();
    }
    let service = std::fs::read_to_string(root.join("baton.service")).unwrap();
    for want in ["RuntimeDirectory=baton", "Type=notify", "NotifyAccess=all"] {
        assert!(service.lines().any(|l| l == want), "unit lacks {want}");
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("baton.socket"))
        .arg(dir.path().join("baton.service"))
        .output()
        .unwrap();
    let text = printed(&out);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    assert!(
        text.trim().is_empty(),
        "systemd-analyze verify warned:\n{text}"
    );
}
