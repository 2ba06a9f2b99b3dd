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
    // `upgrade` returns at the commit; the counters (upgrades_ok among them) come over with the
    // old process's last message, once it has finished: wait for that, not for a guess.
    let mut last = serde_json::Value::Null;
    let carried = wait_until(WAIT, || {
        let (ok, out) = cli(&b.config, "status", &["--json"]);
        last = serde_json::from_str(&out).unwrap_or_default();
        ok && last["counters"]["upgrades_ok"] == 1
    })
    .await;
    assert!(carried, "upgrades_ok never became 1: {last}");
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
    // `--wait`: each old process has finished, so its history (sent with its last message,
    // after its drain) reached the successor before the next upgrade starts.
    for _ in 0..3 {
        let (ok, out) = b.cli_upgrade(&["--wait"]);
        assert!(ok, "{out}");
    }
    let mut v = serde_json::Value::Null;
    let all = wait_until(WAIT, || {
        let (ok, out) = cli(&b.config, "status", &["--json"]);
        v = serde_json::from_str(&out).unwrap_or_default();
        ok && v["upgrades"].as_array().is_some_and(|u| u.len() == 3)
    })
    .await;
    assert!(all, "not 3 upgrades in the history: {v}");
    let ups = v["upgrades"].as_array().unwrap();
    assert!(ups
        .iter()
        .all(|u| u["ok"] == true && u["summary"].as_str().unwrap().starts_with("upgrade ok")));
    // In text, each entry with its time.
    let (ok, out) = cli(&b.config, "status", &[]);
    assert!(ok, "{out}");
    let history: Vec<&str> = out
        .lines()
        .skip_while(|l| *l != "upgrades (oldest first):")
        .skip(1)
        .collect();
    assert_eq!(history.len(), 3, "{out}");
    for l in history {
        // "  2026-12-01T08:09:03.561Z upgrade ok: pid ..."
        let (at, summary) = l.trim_start().split_once(' ').unwrap();
        assert!(
            at.len() == 24 && at.ends_with('Z') && at.contains('T'),
            "{l}"
        );
        assert!(summary.starts_with("upgrade ok: pid "), "{l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_text_shows_routes_and_connections_and_works_by_socket() {
    let be = echo_backend("S").await;
    let b = Baton::start(&format!(
        "listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\n\
         \x20 web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: u\n\
         \x20   routes:\n      - {{ host: api.example.com, path_prefix: /v1, upstream: u }}\n\
         \x20     - {{ path_prefix: /b, upstream: u }}\n\
         upstreams:\n  u:\n    servers: [\"{be}\"]\n"
    ));
    let (_s, _) = greeting(b.addr("t"), 1).await;
    // --socket: from another folder, with no config file at hand.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .args(["status", "--socket"])
        .arg(b.dir().join("baton.sock"))
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        !text.contains(['{', '}']),
        "JSON in the text status:\n{text}"
    );
    assert!(
        text.starts_with(&format!(
            "baton {}: pid {}, generation 1, ready, up ",
            env!("CARGO_PKG_VERSION"),
            b.pid()
        )),
        "{text}"
    );
    assert!(
        text.contains("\n  route host api.example.com, path /v1 -> u\n  route path /b -> u\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("\nupstream u: {be} up, weight 1, 1 active\n")),
        "{text}"
    );
    assert!(text.contains("\nconnections: 1 (tcp 1)\n"), "{text}");
    // --socket and -c together are a usage error.
    let (ok, out) = cli(&b.config, "status", &["--socket", "x.sock"]);
    assert!(!ok && out.contains("cannot be used with"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_counts_each_connection_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let be = echo_backend("S").await;
    let (app, _) = http_backend().await;
    let mut b = Baton::start(&format!(
        "runtime:\n  drain_timeout: 1s\nlisteners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\n\
         \x20 web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n\
         upstreams:\n  u:\n    servers: [\"{be}\"]\n  app:\n    servers: [\"{app}\"]\n"
    ));
    // A tunnel that stays open until the deadline, and an idle keep-alive connection that
    // finishes as soon as the drain starts.
    let (tunnel, _) = greeting(b.addr("t"), 1).await;
    let mut idle = tokio::net::TcpStream::connect(b.addr("web")).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let (ok, out) = tokio::task::spawn_blocking({
        let c = b.config.clone();
        move || cli(&c, "stop", &[])
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert!(
        out.contains("1 connections finished, 1 closed at the deadline"),
        "{out}"
    );
    assert_eq!(b.wait_exit(WAIT), Some(0));
    drop(tunnel);
}

/// A minimal HTTP/1.1 backend: answers every request with 200 and keeps the connection.
async fn http_backend() -> (std::net::SocketAddr, ()) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0
                        || s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await
                            .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    (addr, ())
}

/// A reload's summary says what changed, in the CLI's line, the old process's log and the
/// status history of the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_summary_lists_what_changed() {
    let be = echo_backend("S").await;
    let be2 = echo_backend("T").await;
    let b = Baton::start(&tcp_config(be));
    let new = format!(
        "listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\n  t2:\n    listen: 127.0.0.1:0\n    upstream: u\nupstreams:\n  u:\n    servers: [\"{be2}\"]\n"
    );
    std::fs::write(&b.config, new).unwrap();
    let (ok, out) = cli(&b.config, "reload", &[]);
    assert!(ok, "{out}");
    let want =
        format!("listeners added t2 (127.0.0.1:0); servers added u {be2}; servers removed u {be}");
    assert!(out.contains(&want), "CLI line lacks {want:?}: {out}");
    assert!(
        b.log.wait_for(&["upgrade complete", &want], WAIT).is_some(),
        "log lacks the changes"
    );
    let (ok, out) = cli(&b.config, "status", &["--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let last = v["upgrades"].as_array().unwrap().last().unwrap().clone();
    assert!(
        last["summary"].as_str().unwrap().contains(&want),
        "status history lacks the changes: {last}"
    );
    // Nothing changed: said so.
    let (ok, out) = cli(&b.config, "reload", &[]);
    assert!(ok, "{out}");
    assert!(out.contains("config unchanged"), "{out}");
}
