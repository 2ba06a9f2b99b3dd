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

/// Makes 20 connections to the listener `added` (at `addr`) and waits until both workers
/// served some of them; both must be new processes (not in `old`) of generation 2, and the
/// supervisor must list the listener. Returns that status.
async fn new_workers_serve(b: &Baton, addr: SocketAddr, old: &[i32]) -> serde_json::Value {
    connections(addr, 20).await;
    let s = both_served(b, "added", 20).await;
    for i in 0..2 {
        assert!(
            !old.contains(&worker_pid(&s, i).unwrap()),
            "worker {i} is a new process: {s:#}"
        );
        assert_eq!(s["workers"][i]["generation"], 2, "{s:#}");
    }
    assert!(s["listeners"]["added"].is_object(), "{s:#}");
    s
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
    let s = new_workers_serve(&b, added, &workers).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_second_worker_cannot_take_over_restarts_it_with_the_new_config() {
    let be = echo_backend("").await;
    let b = Baton::start(&config(be, "reuseport", &listener("t", "127.0.0.1:0")));
    let t = b.addr("t");
    let s0 = two_serving(&b).await;
    let workers: Vec<i32> = (0..2).map(|i| worker_pid(&s0, i).unwrap()).collect();
    // The new binary, except that worker 1's replacement dies at once the first time: worker
    // 0 takes the new config by handover, worker 1 cannot.
    let broke = b.dir().join("broke-once");
    let wrapper = b.dir().join("baton-new");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \" $* \" in *\" --index 1 \"*) if [ ! -e {m} ]; then : > {m}; echo 'test: this worker dies at its start' >&2; exit 3; fi;; esac\nexec {bin} \"$@\"\n",
            m = broke.display(),
            bin = bin()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let added: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let next = format!(
        "{}{}",
        listener("t", "127.0.0.1:0"),
        listener("added", &added.to_string())
    );
    std::fs::write(&b.config, config(be, "reuseport", &next)).unwrap();
    let binary = wrapper.display().to_string();
    let config = b.config.clone();
    let (ok, out) =
        tokio::task::spawn_blocking(move || cli(&config, "upgrade", &["--binary", &binary]))
            .await
            .unwrap();
    assert!(broke.exists(), "worker 1's replacement was started");
    // Workers must not run different configs: worker 1 is restarted afresh with the new one.
    assert!(ok, "{out}");
    assert!(out.contains("1 workers replaced: worker 0: pid"), "{out}");
    assert!(
        out.contains("worker 1 could not take over by handover")
            && out.contains("workers 1..1 restarted with the new config"),
        "{out}"
    );
    assert!(
        out.contains(&format!("listeners added added ({added})")),
        "{out}"
    );
    // Both serve the added listener: worker 0 took it over, worker 1 got it at its start.
    new_workers_serve(&b, added, &workers).await;
    // The old workers drain and exit; the kept listener serves on.
    for w in &workers {
        assert!(
            wait_until(WAIT, || !alive(*w)).await,
            "old worker {w} exited"
        );
    }
    connections(t, 3).await;
    wait_status(&b, "supervisor re-executed", |s| {
        s["supervisor_generation"] == 2
    })
    .await;
}
