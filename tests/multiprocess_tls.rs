//! Multi-process mode and TLS session resumption: the supervisor makes the session-ticket
//! keys and every worker gets the same ones (over its private channel), so a session saved
//! on one worker (`openssl s_client -sess_out`) resumes on any other (`-sess_in`: `Reused`),
//! on a worker restarted after the supervisor's re-exec, and across a multi-process upgrade.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
mod http_support;
use common::supervisor::*;
use common::tls::{reused, s_client};
use common::*;
use http_support::{backend, upstream};
use std::path::PathBuf;

/// Connections each worker accepted, once the heartbeats account for `total` in all.
async fn per_worker(b: &Baton, total: u64) -> [u64; 2] {
    let s = wait_status(b, &format!("{total} connections counted"), |s| {
        accepted(s, 0) + accepted(s, 1) == total
    })
    .await;
    [accepted(&s, 0), accepted(&s, 1)]
}

/// Resumes the saved session until every worker with `since[i]` accepted connections before
/// has served at least one more (`total`: the workers' sum before): each connection must
/// resume. Returns the new sum. reuseport picks the worker by the client's port, so a worker
/// missing after 60 connections (a chance of 2^-59) fails the test.
async fn resume_on_every_worker(
    b: &Baton,
    port: u16,
    files: &(PathBuf, PathBuf),
    since: [u64; 2],
    mut total: u64,
) -> u64 {
    for round in 1..=12 {
        for _ in 0..5 {
            let (ca, sess) = files.clone();
            let out = tokio::task::spawn_blocking(move || {
                s_client(port, "-tls1_3", ("-sess_in", &sess), &ca)
            })
            .await
            .unwrap();
            assert!(out.contains("hello from app"), "{out}");
            assert!(reused(&out), "the session resumes on every worker: {out}");
            total += 1;
        }
        let now = per_worker(b, total).await;
        if now[0] > since[0] && now[1] > since[1] {
            return total;
        }
        assert!(
            round < 12,
            "one worker never served: {now:?} since {since:?}"
        );
    }
    total
}

/// Two workers (reuseport) serving HTTPS for `a.test` in front of an HTTP backend.
async fn start(env: &[(&str, &str)]) -> Baton {
    let (app, _) = backend("app").await;
    let dir = tempfile::tempdir().unwrap();
    make_cert(dir.path(), "a", &["DNS:a.test"], 30);
    let yaml = format!(
        "runtime:\n  workers: 2\n  accept: reuseport\n  drain_timeout: 5s\n  upgrade_timeout: 10s\nlisteners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n    tls:\n      certificates: [{{ cert: a.pem, key: a.key }}]\nupstreams:\n{}",
        upstream("app", &[app], "")
    );
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    Baton::start_with_env(dir, config, env)
}

/// A full handshake that saves its session in `files.1`.
async fn full_handshake(port: u16, files: &(PathBuf, PathBuf)) {
    let (ca, sess) = files.clone();
    let out =
        tokio::task::spawn_blocking(move || s_client(port, "-tls1_3", ("-sess_out", &sess), &ca))
            .await
            .unwrap();
    assert!(out.contains("hello from app"), "{out}");
    assert!(
        !reused(&out),
        "a first connection is a full handshake: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_session_resumes_on_every_worker_after_a_restart_and_across_an_upgrade() {
    let b = start(&[]).await;
    let port = b.addr("web").port();
    let files = (b.dir().join("a.pem"), b.dir().join("session.pem"));
    let s0 = two_serving(&b).await;

    // A full handshake on one worker saves the session.
    full_handshake(port, &files).await;
    let issuer = per_worker(&b, 1).await;
    // It resumes on the other worker too: all connections of the worker that did not
    // issue the ticket are resumptions.
    let before_upgrade = resume_on_every_worker(&b, port, &files, issuer, 1).await;

    // Across the upgrade: every worker replaced, then the supervisor re-executes.
    let (ok, out) = upgrade_async(&b.config).await;
    assert!(ok, "upgrade: {out}");
    let s = wait_status(&b, "supervisor re-executed", |s| {
        s["supervisor_generation"] == 2
    })
    .await;
    for i in 0..2 {
        let old = worker_pid(&s0, i).unwrap();
        assert_ne!(worker_pid(&s, i), Some(old), "worker {i} replaced");
        assert!(
            wait_until(WAIT, || !alive(old)).await,
            "old worker {old} exited"
        );
    }
    // The new workers count from zero; the old ones' counts stay in the totals.
    let since_upgrade = resume_on_every_worker(&b, port, &files, [0, 0], 0).await;

    // A worker restarted after the re-exec gets the keys the supervisor kept across it.
    let s = status(&b);
    let victim = worker_pid(&s, 1).unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(victim).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let s = wait_status(&b, "worker 1 restarted", |s| {
        worker_pid(s, 1).is_some_and(|p| p != victim) && s["workers"][1]["state"] == "serving"
    })
    .await;
    assert_eq!(
        s["totals"]["accepted"].as_u64(),
        Some(before_upgrade + since_upgrade),
        "no connection lost from the totals: {:#}",
        s["totals"]
    );
    let worker0 = accepted(&s, 0);
    resume_on_every_worker(&b, port, &files, [worker0, 0], worker0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_ticket_keys_reach_every_worker() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("rotate-now");
    let fault = format!("rotate_ticket_keys:{}", marker.display());
    let b = start(&[("BATON_TEST_FAULT", &fault)]).await;
    let port = b.addr("web").port();
    two_serving(&b).await;
    let before = (b.dir().join("a.pem"), b.dir().join("before.pem"));
    full_handshake(port, &before).await;
    per_worker(&b, 1).await;

    // The supervisor rotates (the test hook asks for it now) and sends the keys to both.
    std::fs::write(&marker, b"").unwrap();
    b.log
        .wait_for(&["session-ticket keys rotated"], WAIT)
        .expect("the supervisor rotated its keys");
    assert!(
        wait_until(WAIT, || b.log.count("session-ticket keys sent") >= 2).await,
        "the keys went to both workers"
    );
    // A session issued now is sealed with the new key by one worker and resumes on both.
    let after = (b.dir().join("a.pem"), b.dir().join("after.pem"));
    full_handshake(port, &after).await;
    let issuer = per_worker(&b, 2).await;
    let total = resume_on_every_worker(&b, port, &after, issuer, 2).await;
    // One from before the rotation still resumes (the previous key decrypts).
    let resumed = resume_on_every_worker(&b, port, &before, per_worker(&b, total).await, total);
    resumed.await;
}
