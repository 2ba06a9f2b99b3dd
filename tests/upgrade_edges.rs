//! The sharp edges of the live upgrade, each end to end with the real binary: an
//! idle HTTP/2 client, `baton upgrade` returning at the commit (`--wait` at the end), a
//! successor that dies after the commit, a refusal reason under repetition, a wrapper-script
//! successor that leaves a child behind, and a config with no listeners.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
mod http_support;
use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A config with an HTTP listener `web` (to `app`) and a TCP listener `t` (to `echo`).
fn config(app: SocketAddr, echo: SocketAddr, runtime: &str) -> String {
    let runtime = if runtime.is_empty() {
        String::new()
    } else {
        format!("runtime:\n{runtime}")
    };
    format!(
        "{runtime}listeners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n  t:\n    listen: 127.0.0.1:0\n    upstream: echo\nupstreams:\n  app:\n    servers: [\"{app}\"]\n  echo:\n    servers: [\"{echo}\"]\n"
    )
}

/// An HTTP/1.1 backend that answers each request only once `release` is notified: a request
/// held in flight for as long as the test wants.
/// Also returns how many requests have arrived so far.
async fn held_backend(release: Arc<tokio::sync::Notify>) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let arrived = Arc::new(AtomicUsize::new(0));
    let counter = arrived.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let release = release.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let released = release.notified();
                counter.fetch_add(1, Ordering::SeqCst);
                released.await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nheld")
                    .await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    (addr, arrived)
}

/// Sends a GET over a new h2c connection to `addr`; returns the response (status and body
/// as text). An HTTP/2 connection cannot move, so while this request is held, the old process
/// of an upgrade has work to finish.
async fn start_get(addr: SocketAddr) -> tokio::task::JoinHandle<String> {
    use http_body_util::BodyExt;
    let (mut send, _conn) = http_support::h2c(addr).await;
    tokio::spawn(async move {
        let req = hyper::Request::builder()
            .uri("http://t/held")
            .body(http_support::text(""))
            .unwrap();
        let resp = match tokio::time::timeout(WAIT, send.send_request(req)).await {
            Ok(Ok(r)) => r,
            other => return format!("no response: {other:?}"),
        };
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        format!(
            "{status} {}",
            String::from_utf8_lossy(&body.unwrap_or_default())
        )
    })
}

/// A fresh connection through `t` echoes a line.
async fn echo_ok(addr: SocketAddr) -> bool {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
    else {
        return false;
    };
    if s.write_all(b"ping\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 5];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await,
        Ok(Ok(_))
    ) && &buf == b"ping\n"
}

fn kill(pid: i32) {
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_client_does_not_hold_the_upgrade() {
    let (app, _) = http_support::backend("a").await;
    let echo = echo_backend("").await;
    // Long deadlines: an upgrade that waited for the h2 connection to park would take 60 s.
    let b = Baton::start(&config(
        app,
        echo,
        "  upgrade_timeout: 60s\n  drain_timeout: 60s\n",
    ));
    let (mut send, conn_task) = http_support::h2c(b.addr("web")).await;
    let req = hyper::Request::builder()
        .uri("http://t/x")
        .body(http_support::text(""))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // The h2 client is idle now, and a tunnel is open through the TCP listener.
    let (mut tunnel, _) = greeting(b.addr("t"), 0).await;
    let up = tokio::time::timeout(WAIT, upgrade_async(&b.config)).await;
    let (ok, out) = up.expect("the upgrade waited for the idle h2 connection");
    assert!(ok, "{out}");
    assert!(out.contains("1 tunnels"), "{out}");
    // The tunnel moved and works; new connections are accepted by the successor.
    tunnel.write_all(b"after\n").await.unwrap();
    let mut buf = [0u8; 6];
    tokio::time::timeout(WAIT, tunnel.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"after\n");
    assert!(echo_ok(b.addr("t")).await);
    // The h2 connection got GOAWAY and ended cleanly, so the old process is free to exit.
    let ended = tokio::time::timeout(WAIT, conn_task)
        .await
        .unwrap()
        .unwrap();
    assert!(ended.is_ok(), "{ended:?}");
    assert!(wait_until(WAIT, || !alive(b.pid())).await);
    kill(b.serving_pid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_returns_at_the_commit_and_wait_waits_for_the_old_process() {
    let release = Arc::new(tokio::sync::Notify::new());
    let (app, arrived) = held_backend(release.clone()).await;
    let echo = echo_backend("").await;
    let b = Baton::start(&config(app, echo, "  drain_timeout: 60s\n"));
    let web = b.addr("web");
    let held = start_get(web).await;
    // The request is in flight: the backend has it.
    assert!(wait_until(WAIT, || arrived.load(Ordering::SeqCst) == 1).await);
    let old = b.pid();
    let (ok, out) = tokio::time::timeout(WAIT, upgrade_async(&b.config))
        .await
        .expect("baton upgrade waited for the drain");
    assert!(ok, "{out}");
    assert!(out.contains("committed and serving"), "{out}");
    assert!(out.contains("1 connections still finishing"), "{out}");
    // The old process is still finishing the request; the successor serves new clients.
    assert!(alive(old));
    assert!(echo_ok(b.addr("t")).await);
    let new = b.serving_pid();
    assert_ne!(new, old);

    release.notify_waiters();
    let resp = held.await.unwrap();
    assert!(resp.starts_with("200") && resp.ends_with("held"), "{resp}");
    assert!(wait_until(WAIT, || !alive(old)).await);

    // `--wait` returns only once the old process is done: here, once its request is answered.
    let held2 = start_get(web).await;
    assert!(wait_until(WAIT, || arrived.load(Ordering::SeqCst) == 2).await);
    let wait = tokio::spawn(upgrade_wait_async(b.config.clone().leak()));
    assert!(
        b.log.wait_for(&["handover committed"], WAIT).is_some()
            && wait_until(WAIT, || b.log.count("handover committed") >= 2).await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!wait.is_finished(), "--wait returned before the drain");
    release.notify_waiters();
    let resp = held2.await.unwrap();
    assert!(resp.ends_with("held"), "{resp}");
    let (ok, out) = tokio::time::timeout(WAIT, wait).await.unwrap().unwrap();
    assert!(ok, "{out}");
    // The drained summary: the h2 connection finished its request in the old process.
    assert!(out.contains("1 finished in the old process"), "{out}");
    assert!(wait_until(WAIT, || !alive(new)).await);
    kill(b.serving_pid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_process_takes_over_again_when_the_successor_dies_after_the_commit() {
    let release = Arc::new(tokio::sync::Notify::new());
    let (app, arrived) = held_backend(release.clone()).await;
    let echo = echo_backend("").await;
    let b = Baton::start(&config(app, echo, "  drain_timeout: 60s\n"));
    let t = b.addr("t");
    // A request in flight keeps the old process draining after the commit.
    let held = start_get(b.addr("web")).await;
    assert!(wait_until(WAIT, || arrived.load(Ordering::SeqCst) == 1).await);
    let (ok, out) = upgrade_async(&b.config).await;
    assert!(ok, "{out}");
    let new = b.serving_pid();
    assert_ne!(new, b.pid());
    kill(new);
    assert!(
        b.log
            .wait_for(&["SUCCESSOR DIED AFTER THE COMMIT"], WAIT)
            .is_some(),
        "the old process did not notice"
    );
    // It accepts again, and says so.
    assert!(wait_until(WAIT, || b.serving_pid() == b.pid()).await);
    assert!(
        echo_ok(t).await,
        "the port does not serve after the successor died"
    );
    let (ok, status) = cli(&b.config, "status", &["--json"]);
    assert!(ok, "{status}");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["pid"], b.pid());
    assert_eq!(v["phase"], "ready");
    let last = v["upgrades"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["ok"], false);
    assert!(
        last["summary"]
            .as_str()
            .unwrap()
            .contains("took over again"),
        "{last}"
    );
    // The request in flight completes here, and the process is still serving afterwards.
    release.notify_waiters();
    let resp = held.await.unwrap();
    assert!(resp.ends_with("held"), "{resp}");
    assert!(alive(b.pid()));
    // And it can upgrade again.
    let (ok, out) = upgrade_async(&b.config).await;
    assert!(ok, "{out}");
    kill(b.serving_pid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refusal_reason_always_reaches_the_cli() {
    let echo = echo_backend("").await;
    let good = config(echo, echo, "");
    let b = Baton::start(&good);
    let bad = good.replace("upstream: echo", "upstream: nowhere");
    std::fs::write(&b.config, &bad).unwrap();
    for round in 0..10 {
        let (ok, out) = b.cli_upgrade(&[]);
        assert!(!ok, "round {round}: {out}");
        assert!(
            out.contains("successor refused to start") && out.contains("nowhere"),
            "round {round}: the reason is lost: {out}"
        );
    }
    assert!(b.log.count("nowhere") >= 10);
    std::fs::write(&b.config, &good).unwrap();
    assert!(echo_ok(b.addr("t")).await);
    assert_eq!(b.serving_pid(), b.pid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapper_successor_is_ended_with_its_children() {
    let echo = echo_backend("").await;
    let b = Baton::start(&config(echo, echo, "  upgrade_timeout: 1s\n"));
    // A wrapper that starts a child holding the handover channel, then never speaks.
    let pidfile = b.dir().join("grandchild.pid");
    let wrapper = b.dir().join("wrapper.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nsleep 600 &\necho $! > {}\nexec sleep 600\n",
            pidfile.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (ok, out) = b.cli_upgrade(&["--binary", wrapper.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains("no answer within upgrade_timeout"), "{out}");
    let grandchild: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let gone = wait_until(WAIT, || !alive(grandchild)).await;
    if !gone {
        kill(grandchild);
    }
    assert!(gone, "the wrapper's child outlived the failed upgrade");
    assert!(echo_ok(b.addr("t")).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_with_no_listeners_is_warned_by_check_and_refused_by_reload_and_upgrade() {
    let echo = echo_backend("").await;
    let b = Baton::start(&config(echo, echo, ""));
    let empty = format!("listeners: {{}}\nupstreams:\n  echo:\n    servers: [\"{echo}\"]\n");
    std::fs::write(&b.config, &empty).unwrap();
    let (ok, out) = cli(&b.config, "check", &[]);
    assert!(ok, "{out}");
    assert!(out.contains("warning: no listeners"), "{out}");
    let (ok, out) = cli(&b.config, "reload", &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("no listeners"), "{out}");
    let (ok, out) = b.cli_upgrade(&[]);
    assert!(!ok, "{out}");
    assert!(out.contains("no listeners"), "{out}");
    // Nothing changed: the old process serves its listeners.
    assert_eq!(b.serving_pid(), b.pid());
    assert!(echo_ok(b.addr("t")).await);
}
