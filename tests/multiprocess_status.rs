//! Multi-process mode: what the supervisor says while it upgrades, and what it counts and
//! logs for one upgrade. `baton status` answers during an upgrade step (here one held open by
//! a new worker binary that waits for a file to go away); one upgrade counts once, however
//! many workers it replaced; workers log their real peers.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::supervisor::*;
use common::*;

fn config(backend: std::net::SocketAddr, upgrade_timeout: &str) -> String {
    format!(
        "runtime:\n  workers: 2\n  drain_timeout: 5s\n  upgrade_timeout: {upgrade_timeout}\nlisteners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\nupstreams:\n  u:\n    servers: [\"{backend}\"]\n"
    )
}

/// `baton status [--json]` from async code, bounded by [`WAIT`] (a status that blocks fails
/// the test instead of hanging it).
async fn status_now(config: &std::path::Path, json: bool) -> (bool, String) {
    let config = config.to_path_buf();
    let extra: &'static [&'static str] = if json { &["--json"] } else { &[] };
    let asked = tokio::task::spawn_blocking(move || cli(&config, "status", extra));
    tokio::time::timeout(WAIT, asked)
        .await
        .expect("baton status blocked during the upgrade")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_answers_while_an_upgrade_step_waits_for_its_new_worker() {
    let be = echo_backend("").await;
    // Waiting for upgrade_timeout would take a minute: status must not wait for it.
    let b = Baton::start(&config(be, "60s"));
    two_serving(&b).await;
    // The new binary starts only once `hold` is gone.
    let hold = b.dir().join("hold");
    std::fs::write(&hold, b"").unwrap();
    let slow = b.dir().join("slow-baton");
    std::fs::write(
        &slow,
        format!(
            "#!/bin/sh\nwhile [ -e {} ]; do sleep 0.05; done\nexec {} \"$@\"\n",
            hold.display(),
            bin()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&slow, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = b.config.clone();
    let binary = slow.display().to_string();
    let up = tokio::task::spawn_blocking(move || cli(&config, "upgrade", &["--binary", &binary]));
    assert!(
        wait_until(WAIT, || b.log.count("worker spawned") >= 3).await,
        "the new worker was spawned"
    );
    let (ok, out) = status_now(&b.config, true).await;
    assert!(ok, "{out}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["phase"], "upgrading", "{s:#}");
    assert_eq!(s["incoming"]["index"], 0, "{s:#}");
    assert_eq!(s["incoming"]["state"], "starting", "{s:#}");
    assert_eq!(
        s["workers"][0]["state"], "serving",
        "the old worker 0 serves meanwhile"
    );
    let (ok, text) = status_now(&b.config, false).await;
    assert!(ok && text.contains("upgrading for"), "{text}");
    // Another upgrade is refused at once, not queued behind this one.
    let (ok, out) = tokio::task::spawn_blocking({
        let config = b.config.clone();
        move || cli(&config, "upgrade", &[])
    })
    .await
    .unwrap();
    assert!(!ok && out.contains("already in progress"), "{out}");
    std::fs::remove_file(&hold).unwrap();
    let (ok, out) = tokio::time::timeout(WAIT, up).await.unwrap().unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("2 workers replaced"), "{out}");
    let s = status(&b);
    assert_eq!(s["phase"], "ready");
    assert!(s["incoming"].is_null(), "{s:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upgrade_counts_once_and_workers_log_their_real_peers() {
    let be = echo_backend("").await;
    let b = Baton::start(&config(be, "10s"));
    let s0 = two_serving(&b).await;
    // A first start is not an upgrade.
    assert!(
        wait_until(WAIT, || b
            .log
            .count("worker serving the supervisor's listeners")
            >= 2)
        .await,
        "both workers logged their start"
    );
    assert_eq!(
        b.log.count("upgrade complete"),
        0,
        "a first start logged an upgrade"
    );
    let (ok, out) = upgrade_async(&b.config).await;
    assert!(ok, "{out}");
    let s = wait_status(&b, "both workers replaced and heartbeating", |s| {
        (0..2).all(|i| {
            s["workers"][i]["generation"] == 2 && s["workers"][i]["heartbeats"].as_u64() >= Some(1)
        })
    })
    .await;
    assert_eq!(s["totals"]["upgrades_ok"], 1, "{s:#}");
    assert_eq!(s["totals"]["upgrades_failed"], 0, "{s:#}");
    // Heartbeats with the carried counters (each worker counted its own handover) do not
    // change that.
    let beats =
        |s: &serde_json::Value, i: usize| s["workers"][i]["heartbeats"].as_u64().unwrap_or(0);
    let later = wait_status(&b, "two more heartbeats", |x| {
        (0..2).all(|i| beats(x, i) >= beats(&s, i) + 2)
    })
    .await;
    assert_eq!(later["totals"]["upgrades_ok"], 1, "{later:#}");
    for i in 0..2 {
        let (old, new) = (worker_pid(&s0, i).unwrap(), worker_pid(&s, i).unwrap());
        assert!(
            b.log
                .wait_for(
                    &["worker started", &format!("index={i}"), "generation=2"],
                    WAIT
                )
                .is_some(),
            "worker {i}'s replacement logged its start with its index"
        );
        assert!(
            b.log
                .wait_for(
                    &["worker replaced; exiting", &format!("pid {old} -> {new}")],
                    WAIT
                )
                .is_some(),
            "old worker {old} names its successor {new}"
        );
        assert!(
            b.log
                .wait_for(&["handover committed", &format!("successor={new}")], WAIT)
                .is_some(),
            "old worker {old} logs successor={new}"
        );
    }
    assert_eq!(b.log.count("index=-1"), 0);
    assert_eq!(b.log.count("successor=0"), 0);
    assert_eq!(b.log.count(" -> 0"), 0);
}
