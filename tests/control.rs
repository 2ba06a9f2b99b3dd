//! The control socket and the CLI commands that use it, against the real binary.
#![allow(clippy::unwrap_used)]
mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;

fn tcp_config(backend: std::net::SocketAddr) -> String {
    format!("listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\nupstreams:\n  u:\n    servers: [\"{backend}\"]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_stop_and_no_running_process() {
    let be = echo_backend("S").await;
    let mut b = Baton::start(&tcp_config(be));
    let (_s, _) = greeting(b.addr("t"), 1).await;
    let sock = b.dir().join("baton.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");

    let (ok, out) = cli(&b.config, "status", &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("pid {}", b.pid())) && out.contains("generation 1"),
        "{out}"
    );
    assert!(out.contains("listener t: tcp 127.0.0.1:"), "{out}");
    let (ok, out) = cli(&b.config, "status", &["--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["pid"], b.pid());
    assert_eq!(v["connections"]["total"], 1);

    drop(_s);
    let (ok, out) = cli(&b.config, "stop", &[]);
    assert!(ok, "{out}");
    assert_eq!(b.wait_exit(WAIT), Some(0));
    assert!(!sock.exists(), "control socket left behind");
    assert!(!b.dir().join("baton.pid").exists(), "pid file left behind");

    let (ok, out) = cli(&b.config, "status", &[]);
    assert!(!ok);
    assert!(out.contains("no baton is running"), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_after_upgrade_shows_the_new_generation() {
    let be = echo_backend("S").await;
    let b = Baton::start(&tcp_config(be));
    let (ok, out) = b.cli_upgrade(&[]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&b.config, "status", &["--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["generation"], 2);
    assert_eq!(v["pid"], b.serving_pid());
    assert_eq!(v["counters"]["upgrades_ok"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_refuses_another_uid() {
    if !rustix::process::getuid().is_root() {
        eprintln!(
            "SKIP control_socket_refuses_another_uid: needs root to run a client as another user"
        );
        return;
    }
    let user = "baton-test-other";
    let exists = std::process::Command::new("id")
        .arg(user)
        .output()
        .unwrap()
        .status
        .success();
    if !exists {
        let st = std::process::Command::new("useradd")
            .args(["--no-create-home", "--shell", "/usr/sbin/nologin", user])
            .status();
        if !st.map(|s| s.success()).unwrap_or(false) {
            eprintln!("SKIP control_socket_refuses_another_uid: cannot create user {user}");
            return;
        }
    }
    let be = echo_backend("S").await;
    let b = Baton::start(&tcp_config(be));
    let sock = b.dir().join("baton.sock");
    // Mode 0600 already keeps other users out; open it up to prove the uid check itself.
    std::fs::set_permissions(b.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&b.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = std::process::Command::new("runuser")
        .args(["-u", user, "--", bin(), "status", "-c"])
        .arg(&b.config)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("refused: uid"), "{text}");
    assert!(b
        .log
        .wait_for(&["refused a client of another user"], WAIT)
        .is_some());
    // The owner still gets in.
    let (ok, out) = cli(&b.config, "status", &[]);
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_history_survives_upgrades() {
    let be = echo_backend("S").await;
    let b = Baton::start(&tcp_config(be));
    for _ in 0..3 {
        let (ok, out) = b.cli_upgrade(&[]);
        assert!(ok, "{out}");
    }
    let (ok, out) = cli(&b.config, "status", &["--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ups = v["upgrades"].as_array().unwrap();
    assert_eq!(ups.len(), 3, "{ups:?}");
    assert!(ups
        .iter()
        .all(|u| u["ok"] == true && u["summary"].as_str().unwrap().starts_with("upgrade ok")));
}
