//! The HTTP admin endpoint against the real binary: /metrics is valid Prometheus text and its
//! counters continue across an upgrade; /status and the page reflect live connections;
//! /healthz and /readyz answer as a probe expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::admin::*;
use common::*;
use std::net::SocketAddr;
use std::process::Command;

fn config(backend: SocketAddr, upstream_extra: &str) -> String {
    config_admin(backend, upstream_extra, "127.0.0.1:0")
}

fn config_admin(backend: SocketAddr, upstream_extra: &str, admin: &str) -> String {
    format!(
        "runtime:\n  drain_timeout: 10s\n  upgrade_timeout: 10s\nadmin:\n  listen: {admin}\n\
         listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\n\
         upstreams:\n  u:\n    servers: [\"{backend}\"]\n{upstream_extra}"
    )
}

fn serving_pid(b: &Baton) -> u32 {
    std::fs::read_to_string(b.dir().join("baton.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The admin address the process `pid` logged.
fn admin_addr(b: &Baton, pid: u32) -> SocketAddr {
    let line = b
        .log
        .wait_for(
            &["listening", "listener=admin ", &format!("pid={pid} ")],
            WAIT,
        )
        .expect("admin listening line");
    line.split("addr=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn kill_serving(b: &Baton) {
    if let Some(pid) = rustix::process::Pid::from_raw(serving_pid(b) as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

async fn wait_metric(addr: SocketAddr, series: &str, at_least: f64) -> f64 {
    let mut last = -1.0;
    let ok = wait_until(WAIT, || {
        let (_, _, body) = get(addr, "/metrics");
        last = parse_prometheus(&body).get(series).copied().unwrap_or(-1.0);
        last >= at_least
    })
    .await;
    assert!(
        ok,
        "{series} stayed at {last}, expected at least {at_least}"
    );
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_and_continue_across_an_upgrade() {
    let be = echo_backend("E").await;
    // A fixed admin port, as in production: the successor must wait for the predecessor to
    // release it, then serve on the same address.
    let fixed = free_addr().to_string();
    let b = Baton::start(&config_admin(be, "", &fixed));
    let admin = admin_addr(&b, b.pid() as u32);
    assert_eq!(admin.to_string(), fixed);
    let (status, ctype, body) = get(admin, "/metrics");
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let m = parse_prometheus(&body);
    assert_eq!(m["baton_generation"], 1.0);
    assert!(m["process_start_time_seconds"] > 1.0e9);
    assert_eq!(m["baton_connections_accepted_total"], 0.0);

    // Three tunnels stay open across the upgrade (handed over); two more close before it.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(greeting(b.addr("t"), 1).await.0);
    }
    for _ in 0..2 {
        drop(greeting(b.addr("t"), 1).await.0);
    }
    wait_metric(admin, "baton_connections_accepted_total", 5.0).await;
    wait_metric(admin, "baton_connections_closed_total", 2.0).await;

    let out = Command::new(bin())
        .args(["upgrade", "-c"])
        .arg(&b.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_pid = serving_pid(&b);
    assert_ne!(new_pid, b.pid() as u32);
    let admin2 = admin_addr(&b, new_pid);
    assert_eq!(admin2, admin);
    // The successor answers once its predecessor released the address; its counters start
    // from the predecessor's totals, not zero.
    let accepted = wait_metric(admin2, "baton_connections_accepted_total", 5.0).await;
    assert_eq!(accepted, 5.0);
    let m = parse_prometheus(&get(admin2, "/metrics").2);
    assert_eq!(m["baton_generation"], 2.0);
    assert_eq!(m["baton_upgrades_total{result=\"ok\"}"], 1.0);
    assert_eq!(m["baton_connections_handed_over_total"], 3.0);
    assert_eq!(m["baton_connections_closed_total"], 2.0);
    // New traffic adds to the carried total; handed-over tunnels still work.
    drop(greeting(b.addr("t"), 1).await.0);
    wait_metric(admin2, "baton_connections_accepted_total", 6.0).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = &mut held[0];
    s.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"x");
    kill_serving(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_page_reflect_live_connections() {
    let be = echo_backend("E").await;
    let b = Baton::start(&config(be, ""));
    let admin = admin_addr(&b, b.pid() as u32);
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(greeting(b.addr("t"), 1).await.0);
    }
    let mut last = serde_json::Value::Null;
    let seen = wait_until(WAIT, || {
        let (status, ctype, body) = get(admin, "/status");
        assert_eq!(status, 200);
        assert!(ctype.starts_with("application/json"));
        last = serde_json::from_str(&body).unwrap();
        last["connections"]["total"] == 2 && last["connections"]["by_kind"]["tcp"] == 2
    })
    .await;
    assert!(seen, "status did not show 2 tcp connections: {last}");
    assert_eq!(last["pid"], b.pid());
    assert_eq!(last["phase"], "ready");
    assert_eq!(last["upstreams"]["u"][0]["addr"], be.to_string());
    assert_eq!(last["listeners"]["t"]["protocol"], "tcp");
    drop(held);
    assert!(
        wait_until(WAIT, || {
            let v: serde_json::Value = serde_json::from_str(&get(admin, "/status").2).unwrap();
            v["connections"]["total"] == 0
        })
        .await,
        "closed connections still shown"
    );

    let (status, ctype, page) = get(admin, "/");
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/html"));
    assert!(page.contains("<html") && page.contains("fetch(\"/status\""));
    assert!(page.contains("setInterval(tick, 2000)"));
    // Self-contained: no external scripts, styles or images.
    for needle in ["src=\"http", "href=\"http", "@import", "<link"] {
        assert!(
            !page.contains(needle),
            "page loads an external asset: {needle}"
        );
    }
    assert_eq!(get(admin, "/nope").0, 404);
    // Other methods: 405 with the `Allow` RFC 9110 §15.5.6 requires.
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    use std::io::{Read, Write};
    s.write_all(
        b"POST /status HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 405 "), "{raw:?}");
    assert!(raw.contains("\r\nallow: GET, HEAD\r\n"), "{raw:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_when_servers_are_up() {
    let be = echo_backend("E").await;
    let b = Baton::start(&config(be, ""));
    let admin = admin_addr(&b, b.pid() as u32);
    assert_eq!(get(admin, "/healthz").0, 200);
    let (status, _, body) = get(admin, "/readyz");
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_when_the_only_server_is_down() {
    let dead = dead_addr();
    let b = Baton::start(&config(
        dead,
        "    health_check:\n      kind: tcp\n      interval: 100ms\n      timeout: 100ms\n      rise: 1\n      fall: 1\n",
    ));
    let admin = admin_addr(&b, b.pid() as u32);
    assert_eq!(get(admin, "/healthz").0, 200);
    let mut body = String::new();
    let down = wait_until(WAIT, || {
        let (status, _, b) = get(admin, "/readyz");
        body = b;
        status == 503
    })
    .await;
    assert!(down, "readyz stayed ready: {body}");
    assert!(body.contains("upstream u: no healthy server"), "{body}");
}
