//! DNS discovery through the real binary: servers given as `host:port`, resolved from a hosts
//! file the test writes (`BATON_HOSTS_FILE`), followed as the file changes, observed from what
//! clients receive (each backend greets with its name) and from baton's log.
//!
//! Two backends behind one name must differ by IP address, not port (the port comes from the
//! config entry): they listen on 127.0.0.1 and 127.0.0.2, both loopback.
//!
//! The runtime is multi-threaded because `LogLines::wait_for` blocks the test's thread: the
//! backends, which run on the test's runtime, must keep serving meanwhile.
#![allow(clippy::unwrap_used)]
mod common;
use common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP listener `t` in front of upstream `u`, whose servers and extra keys are given.
fn config(servers: &str, extra: &str) -> String {
    format!(
        "listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\nupstreams:\n  u:\n    servers:\n      - {servers}\n{extra}"
    )
}

/// Starts baton on `yaml` with its name resolution pointed at `hosts` (written first).
fn start(yaml: &str, hosts: &str) -> (Baton, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let hosts_file = dir.path().join("hosts");
    std::fs::write(&hosts_file, hosts).unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    let h = hosts_file.to_str().unwrap().to_string();
    let b = Baton::start_with_env(dir, config, &[("BATON_HOSTS_FILE", &h)]);
    (b, hosts_file)
}

/// Replaces the hosts file at once (write then rename), so baton never reads half of it.
fn write_hosts(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// An echo backend on `ip:port` that greets with `greeting` (see `common::echo_backend`).
async fn echo_at(addr: SocketAddr, greeting: &'static str) -> std::io::Result<()> {
    let l = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if s.write_all(greeting.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(())
}

/// Backend "a" on 127.0.0.1:P and backend "b" on 127.0.0.2:P, the same port P.
async fn backend_pair() -> u16 {
    for _ in 0..50 {
        let a = echo_backend("a").await;
        let b = SocketAddr::from(([127, 0, 0, 2], a.port()));
        if echo_at(b, "b").await.is_ok() {
            return a.port();
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

/// One client through baton: the name of the backend that greeted it.
async fn who(addr: SocketAddr) -> String {
    greeting(addr, 1).await.1
}

/// A client through baton that gets no backend: baton closes it without a byte.
async fn refused(addr: SocketAddr) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(WAIT, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Whether an open tunnel still echoes.
async fn echoes(s: &mut TcpStream, text: &str) -> bool {
    if s.write_all(text.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; text.len()];
    matches!(
        tokio::time::timeout(WAIT, s.read_exact(&mut buf)).await,
        Ok(Ok(_))
    ) && buf == text.as_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostname_server_reaches_its_backend_and_survives_a_failed_lookup() {
    let a = echo_backend("a").await;
    let (b, hosts) = start(
        &config(&format!("app.test:{}", a.port()), "    resolve: 100ms\n"),
        "127.0.0.1 app.test\n",
    );
    let changed = b
        .log
        .wait_for(&["upstream servers changed", "upstream=u"], WAIT)
        .expect("name never resolved");
    assert!(
        changed.contains(&format!("name=app.test:{}", a.port()))
            && changed.contains(&format!("added=[{a}]"))
            && changed.contains("removed=[]"),
        "{changed}"
    );
    let addr = b.addr("t");
    for _ in 0..3 {
        assert_eq!(who(addr).await, "a");
    }
    // The file disappears: the lookup fails, the name keeps its servers.
    std::fs::remove_file(&hosts).unwrap();
    let kept = b
        .log
        .wait_for(
            &["cannot resolve server name", "keeping its last addresses"],
            WAIT,
        )
        .expect("failed lookup not logged");
    assert!(kept.contains("WARN") && kept.contains("kept=1"), "{kept}");
    for _ in 0..3 {
        assert_eq!(who(addr).await, "a");
    }
    assert_eq!(b.log.count("upstream servers changed"), 1);
    write_hosts(&hosts, "127.0.0.1 app.test\n");
    assert!(b
        .log
        .wait_for(&["server name resolves again"], WAIT)
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_added_and_removed_follow_the_hosts_file() {
    let port = backend_pair().await;
    let (a, b2) = (
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from(([127, 0, 0, 2], port)),
    );
    let (b, hosts) = start(
        &config(
            &format!("{{ addr: \"app.test:{port}\", weight: 1 }}"),
            "    resolve: 100ms\n",
        ),
        "127.0.0.1 app.test\n",
    );
    assert!(b
        .log
        .wait_for(&["upstream servers changed", &format!("added=[{a}]")], WAIT)
        .is_some());
    let addr = b.addr("t");
    assert_eq!(who(addr).await, "a");

    // A second record: the new backend gets traffic (round robin alternates over the two).
    write_hosts(&hosts, "127.0.0.1 app.test\n127.0.0.2 app.test\n");
    let added = b
        .log
        .wait_for(
            &["upstream servers changed", &format!("added=[{b2}]")],
            WAIT,
        )
        .expect("second record not picked up");
    assert!(
        added.contains("removed=[]") && added.contains("servers=2"),
        "{added}"
    );
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(who(addr).await);
    }
    let t = tally(seen.iter().map(String::as_str));
    assert_eq!((t.get("a"), t.get("b")), (Some(&3), Some(&3)), "{seen:?}");

    // Hold a tunnel to "a", then remove its record.
    let mut held = loop {
        let (s, g) = greeting(addr, 1).await;
        if g == "a" {
            break s;
        }
    };
    assert!(echoes(&mut held, "before").await);
    write_hosts(&hosts, "127.0.0.2 app.test\n");
    let removed = b
        .log
        .wait_for(
            &["upstream servers changed", &format!("removed=[{a}]")],
            WAIT,
        )
        .expect("removed record not picked up");
    assert!(
        removed.contains("added=[]") && removed.contains("servers=1"),
        "{removed}"
    );
    // New connections go to "b" only; the open tunnel to "a" keeps working.
    for _ in 0..6 {
        assert_eq!(who(addr).await, "b");
    }
    assert!(echoes(&mut held, "after the record went away").await);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_unresolved_at_start_is_retried_and_used_once_it_resolves() {
    let a = echo_backend("a").await;
    let name = format!("late.test:{}", a.port());
    // No `resolve`: the name is resolved once, retried until it does.
    let (b, hosts) = start(&config(&name, ""), "127.0.0.1 other.test\n");
    let warn = b
        .log
        .wait_for(
            &["cannot resolve server name", &format!("name={name}")],
            WAIT,
        )
        .expect("no warning for the unresolved name");
    assert!(warn.contains("WARN") && warn.contains("retrying"), "{warn}");
    let addr = b.addr("t");
    assert!(refused(addr).await, "a client was served with no server");

    write_hosts(&hosts, "127.0.0.1 other.test late.test\n");
    let added = b
        .log
        .wait_for(&["upstream servers changed", &format!("added=[{a}]")], WAIT)
        .expect("name never picked up after it resolved");
    assert!(added.contains(&format!("name={name}")), "{added}");
    for _ in 0..3 {
        assert_eq!(who(addr).await, "a");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_name_of_resolved_servers() {
    let a = echo_backend("a").await;
    let (b, _hosts) = start(
        &config(&format!("app.test:{}", a.port()), ""),
        "127.0.0.1 app.test\n",
    );
    assert!(b
        .log
        .wait_for(&["upstream servers changed"], WAIT)
        .is_some());
    let (ok, out) = tokio::task::spawn_blocking({
        let c = b.config.clone();
        move || cli(&c, "status", &["--json"])
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let servers = v["upstreams"]["u"].as_array().unwrap();
    assert_eq!(servers.len(), 1, "{v}");
    assert_eq!(servers[0]["addr"], a.to_string());
    assert_eq!(servers[0]["name"], format!("app.test:{}", a.port()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_successor_of_an_upgrade_resolves_names_and_keeps_tunnels() {
    let a = echo_backend("a").await;
    let (b, _hosts) = start(
        &config(&format!("app.test:{}", a.port()), "    resolve: 100ms\n"),
        "127.0.0.1 app.test\n",
    );
    assert!(b
        .log
        .wait_for(
            &["upstream servers changed", &format!("pid={} ", b.pid())],
            WAIT
        )
        .is_some());
    let addr = b.addr("t");
    let (mut held, g) = greeting(addr, 1).await;
    assert_eq!(g, "a");
    assert!(echoes(&mut held, "before").await);
    let (ok, out) = upgrade_async(&b.config).await;
    assert!(ok, "{out}");
    let pid = b.serving_pid();
    assert_ne!(pid, b.pid());
    // The successor (which inherited BATON_HOSTS_FILE) resolved the name itself.
    let line = b
        .log
        .wait_for(&["upstream servers changed", &format!("pid={pid} ")], WAIT)
        .expect("the successor did not resolve the name");
    assert!(line.contains(&format!("added=[{a}]")), "{line}");
    for _ in 0..3 {
        assert_eq!(who(addr).await, "a");
    }
    assert!(echoes(&mut held, "after the upgrade").await);
}

/// `baton check` on `yaml`: (exit code, stderr).
fn check(yaml: &str) -> (Option<i32>, String, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = std::process::Command::new(bin())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path,
        dir,
    )
}

#[test]
fn check_accepts_names_that_do_not_resolve_and_rejects_bad_ones() {
    let (code, err, ..) = check(&config("nothing-here.invalid:8080", "    resolve: 10s\n"));
    assert_eq!(code, Some(0), "{err}");

    let bad = [
        (
            "app.internal",
            "servers[0]: bad address \"app.internal\": missing port",
        ),
        (":8080", "servers[0]: bad address \":8080\": empty hostname"),
        (
            "app..internal:80",
            "servers[0]: bad address \"app..internal:80\": bad hostname",
        ),
        (
            "app.internal:99999",
            "servers[0]: bad address \"app.internal:99999\": bad port",
        ),
    ];
    for (server, want) in bad {
        let (code, err, path, _dir) = check(&config(&format!("\"{server}\""), ""));
        assert_eq!(code, Some(2), "{server}: {err}");
        let want = format!("{}:8:9: upstreams.u.{want}", path.display());
        assert!(err.contains(&want), "{server}: want {want:?}, got {err}");
    }

    let (code, err, path, _dir) = check(&config("app.internal:80", "    resolve: 0\n"));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{}:9:14: upstreams.u.resolve: must be at least 100ms",
            path.display()
        )),
        "{err}"
    );
    let (code, err, path, _dir) = check(&config("10.0.0.1:80", "    resolve: 5s\n"));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{}:9:14: upstreams.u.resolve: no server is a hostname",
            path.display()
        )),
        "{err}"
    );
}
