//! Multi-process mode: a reload that changes the listeners. The supervisor owns them: it
//! binds the ones the new config adds (or refuses the reload at once when it cannot), hands
//! them to every new worker and closes the removed ones, so every worker serves the same
//! listeners once the reload is over — also after a worker is restarted and after the
//! supervisor's re-exec.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::supervisor::*;
use common::*;
use std::net::SocketAddr;
use tokio::net::TcpStream;

fn config(backend: SocketAddr, accept: &str, listeners: &str) -> String {
    format!(
        "runtime:\n  workers: 2\n  accept: {accept}\n  drain_timeout: 5s\n  upgrade_timeout: 10s\nlisteners:\n{listeners}upstreams:\n  u:\n    servers: [\"{backend}\"]\n"
    )
}

fn listener(name: &str, addr: &str) -> String {
    format!("  {name}:\n    listen: {addr}\n    upstream: u\n")
}

/// Waits until both workers of the status counted connections on `listener`, and `total`
/// in all; returns that status.
async fn both_served(b: &Baton, listener: &str, total: u64) -> serde_json::Value {
    wait_status(b, &format!("both workers served {listener}"), |s| {
        let (a, c) = (accepted_on(s, 0, listener), accepted_on(s, 1, listener));
        a > 0 && c > 0 && a + c >= total
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_adds_and_removes_listeners_changes_every_worker() {
    let be = echo_backend("").await;
    // reuseport: the kernel spreads connections over both workers' sockets, so the
    // per-worker counters show that each worker serves the listener.
    let first = format!(
        "{}{}",
        listener("t", "127.0.0.1:0"),
        listener("old", "127.0.0.1:0")
    );
    let b = Baton::start(&config(be, "reuseport", &first));
    let t = b.addr("t");
    let old = b.addr("old");
    let s0 = two_serving(&b).await;
    let workers: Vec<i32> = (0..2).map(|i| worker_pid(&s0, i).unwrap()).collect();

    let port = free_port();
    let added: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let next = format!(
        "{}{}",
        listener("t", "127.0.0.1:0"),
        listener("added", &added.to_string())
    );
    std::fs::write(&b.config, config(be, "reuseport", &next)).unwrap();
    let (ok, out) = cli(&b.config, "reload", &[]);
    assert!(ok, "{out}");
    assert!(out.contains("2 workers replaced"), "{out}");
    assert!(
        out.contains(&format!("listeners added added ({added}); removed old")),
        "{out}"
    );

    // Both new workers serve the added listener.
    connections(added, 20).await;
    let s = both_served(&b, "added", 20).await;
    for i in 0..2 {
        assert!(
            !workers.contains(&worker_pid(&s, i).unwrap()),
            "worker {i} replaced"
        );
        assert_eq!(s["workers"][i]["generation"], 2);
    }
    assert!(s["listeners"]["added"].is_object(), "{s:#}");
    assert!(s["listeners"]["old"].is_null(), "{s:#}");
    // The kept listener still serves; the removed one is closed once the old workers are gone.
    connections(t, 3).await;
    for w in &workers {
        assert!(
            wait_until(WAIT, || !alive(*w)).await,
            "old worker {w} exited"
        );
    }
    let refused = TcpStream::connect(old).await;
    assert!(refused.is_err(), "the removed listener {old} still accepts");

    // A restarted worker (after the supervisor's re-exec) gets the added listener too.
    let s = wait_status(&b, "supervisor re-executed", |s| {
        s["supervisor_generation"] == 2
    })
    .await;
    let victim = worker_pid(&s, 1).unwrap();
    let before = accepted_on(&s, 1, "added");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(victim).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    wait_status(&b, "worker 1 restarted", |s| {
        worker_pid(s, 1).is_some_and(|p| p != victim) && s["workers"][1]["state"] == "serving"
    })
    .await;
    connections(added, 20).await;
    wait_status(&b, "the restarted worker serves the added listener", |s| {
        worker_pid(s, 1) != Some(victim) && accepted_on(s, 1, "added") > 0
    })
    .await;
    let _ = before;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_new_listener_cannot_be_bound_is_refused_before_any_worker_changes() {
    let be = echo_backend("").await;
    let b = Baton::start(&config(be, "shared", &listener("t", "127.0.0.1:0")));
    let s0 = two_serving(&b).await;
    // Someone else holds the port the new listener wants.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let next = format!(
        "{}{}",
        listener("t", "127.0.0.1:0"),
        listener("extra", &busy.to_string())
    );
    std::fs::write(&b.config, config(be, "shared", &next)).unwrap();
    let started = std::time::Instant::now();
    let (ok, out) = cli(&b.config, "reload", &[]);
    eprintln!("refused after {:?}", started.elapsed());
    assert!(!ok, "{out}");
    assert!(out.contains("config refused, nothing changed"), "{out}");
    assert!(
        out.contains(&format!("listener extra: cannot bind {busy}")),
        "{out}"
    );
    // No worker was spawned or replaced.
    assert_eq!(b.log.count("worker spawned"), 2, "a worker was spawned");
    let s = status(&b);
    for i in 0..2 {
        assert_eq!(worker_pid(&s, i), worker_pid(&s0, i));
        assert_eq!(s["workers"][i]["generation"], 1);
    }
    assert!(s["listeners"]["extra"].is_null(), "{s:#}");
    drop(taken);
}
