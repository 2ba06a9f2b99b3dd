//! Multi-process mode: `admin.listen` is served by the supervisor — `/status` (its status),
//! `/metrics` (the service's totals under the single-process names, and per worker),
//! `/healthz`, `/readyz` and the status page — and it keeps serving across an upgrade.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::admin::*;
use common::supervisor::*;
use common::*;
use std::net::SocketAddr;

fn config(backend: SocketAddr) -> String {
    format!(
        "runtime:\n  workers: 2\n  accept: reuseport\n  drain_timeout: 5s\n  upgrade_timeout: 10s\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\nupstreams:\n  u:\n    servers: [\"{backend}\"]\n"
    )
}

/// Waits until `/metrics` satisfies `cond`; returns its samples.
async fn wait_metrics(
    admin: SocketAddr,
    what: &str,
    cond: impl Fn(&std::collections::HashMap<String, f64>) -> bool,
) -> std::collections::HashMap<String, f64> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (code, ctype, body) = tokio::task::spawn_blocking(move || get(admin, "/metrics"))
            .await
            .unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(ctype.starts_with("text/plain"), "{ctype}");
        let m = parse_prometheus(&body);
        if cond(&m) {
            return m;
        }
        assert!(std::time::Instant::now() < deadline, "{what}:\n{body}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_serves_the_admin_endpoint_with_totals_and_per_worker_series() {
    let be = echo_backend("").await;
    let b = Baton::start(&config(be));
    let t = b.addr("t");
    let admin = b.addr("admin");
    two_serving(&b).await;
    connections(t, 20).await;
    let total = "baton_connections_accepted_total";
    let per = |i: usize| format!("baton_worker_connections_accepted_total{{worker=\"{i}\"}}");
    let m = wait_metrics(admin, "20 connections counted", |m| {
        m.get(total) == Some(&20.0)
    })
    .await;
    // reuseport spread them; the per-worker series add up to the total.
    let (w0, w1) = (m[&per(0)], m[&per(1)]);
    assert_eq!(w0 + w1, 20.0, "per worker {w0} + {w1}");
    assert!(w0 > 0.0 && w1 > 0.0, "both workers accepted: {w0} {w1}");
    assert_eq!(m["baton_worker_up{worker=\"0\"}"], 1.0);
    assert_eq!(m["baton_worker_up{worker=\"1\"}"], 1.0);
    assert_eq!(m["baton_upgrades_total{result=\"ok\"}"], 0.0);
    assert_eq!(
        m["baton_listener_connections_accepted_total{listener=\"t\"}"],
        20.0
    );

    let (code, _, body) = get(admin, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, _, body) = get(admin, "/readyz");
    assert_eq!(code, 200, "{body}");
    let (code, ctype, body) = get(admin, "/status");
    assert_eq!(code, 200);
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let s: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(s["mode"], "supervisor");
    assert_eq!(s["pid"], b.pid() as i64);
    assert_eq!(s["workers"].as_array().unwrap().len(), 2);
    let (code, ctype, page) = get(admin, "/");
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/html"), "{ctype}");
    assert!(
        page.contains("id=\"workers\""),
        "the page has a workers table"
    );

    // An upgrade counts once, and the endpoint serves on after the supervisor's re-exec.
    let (ok, out) = upgrade_async(&b.config).await;
    assert!(ok, "{out}");
    wait_status(&b, "supervisor re-executed", |s| {
        s["supervisor_generation"] == 2
    })
    .await;
    let m = wait_metrics(admin, "the upgrade counted once, totals carried", |m| {
        m.get("baton_upgrades_total{result=\"ok\"}") == Some(&1.0) && m.get(total) == Some(&20.0)
    })
    .await;
    assert_eq!(m["baton_generation"], 2.0);
    let (code, _, body) = get(admin, "/readyz");
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_counts_stay_in_the_totals_and_the_per_listener_series() {
    let be = echo_backend("").await;
    let b = Baton::start(&config(be));
    let t = b.addr("t");
    let admin = b.addr("admin");
    let s0 = two_serving(&b).await;
    connections(t, 20).await;
    let total = "baton_connections_accepted_total";
    let listener = "baton_listener_connections_accepted_total{listener=\"t\"}";
    let per = |i: usize| format!("baton_worker_connections_accepted_total{{worker=\"{i}\"}}");
    // Every worker's heartbeat has its share: the per-worker series add up to the total.
    let m = wait_metrics(admin, "20 connections counted per worker", |m| {
        m.get(listener) == Some(&20.0)
            && m.get(&per(0)).zip(m.get(&per(1))).map(|(a, b)| a + b) == Some(20.0)
    })
    .await;
    // The worker that accepted some of them dies (reuseport gave both a share, or one all).
    let victim = if m[&per(0)] > 0.0 { 0 } else { 1 };
    let share = m[&per(victim)];
    let pid = worker_pid(&s0, victim).unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    wait_status(&b, "the dead worker restarted", |s| {
        worker_pid(s, victim).is_some_and(|p| p != pid)
            && s["workers"][victim]["state"] == "serving"
    })
    .await;
    // Its replacement starts at zero; what the dead one counted stays in the service's totals
    // and in the listener's series: neither goes down.
    let m = wait_metrics(admin, "the restarted worker reports", |m| {
        m.get(&per(victim)) == Some(&0.0)
    })
    .await;
    assert!(share > 0.0);
    assert_eq!(m[total], 20.0, "the total lost the dead worker's {share}");
    assert_eq!(
        m[listener], 20.0,
        "the listener's series lost the dead worker's {share}"
    );
    let s = status(&b);
    assert_eq!(s["totals"]["accepted"], 20, "{:#}", s["totals"]);
    assert_eq!(
        s["totals"]["listeners"]["t"]["accepted"], 20,
        "{:#}",
        s["totals"]
    );
    // And they count on from there.
    connections(t, 5).await;
    wait_metrics(admin, "25 in all", |m| {
        m.get(total) == Some(&25.0) && m.get(listener) == Some(&25.0)
    })
    .await;
}
