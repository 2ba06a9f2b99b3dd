//! TLS session resumption across an upgrade: the session-ticket keys move to the successor
//! over the handover channel, so a client that saved its session before the upgrade
//! (`openssl s_client -sess_out`) resumes after it (`-sess_in`: `Reused`).
#![allow(clippy::unwrap_used)]
mod common;
mod http_support;
use common::tls::{reused, s_client};
use common::{make_cert, Baton, WAIT};
use http_support::{backend, upstream};

async fn resumes_across_an_upgrade(version: &'static str) {
    let (app, _) = backend("app").await;
    let dir = tempfile::tempdir().unwrap();
    make_cert(dir.path(), "a", &["DNS:a.test"], 30);
    let yaml = format!(
        "listeners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n    tls:\n      certificates: [{{ cert: a.pem, key: a.key }}]\nupstreams:\n{}",
        upstream("app", &[app], "")
    );
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    let b = Baton::start_in(dir, config);
    let port = b.addr("web").port();
    let ca = b.dir().join("a.pem");
    let sess = b.dir().join("session.pem");
    let old_pid = b.pid();
    let (ca2, sess2) = (ca.clone(), sess.clone());
    let first =
        tokio::task::spawn_blocking(move || s_client(port, version, ("-sess_out", &sess2), &ca2))
            .await
            .unwrap();
    assert!(first.contains("hello from app"), "{first}");
    assert!(
        !reused(&first),
        "a first connection is a full handshake: {first}"
    );
    let (ok, out) = common::upgrade_async(&b.config).await;
    assert!(ok, "upgrade: {out}");
    assert!(common::wait_until(WAIT, || b.serving_pid() != old_pid).await);
    assert!(
        common::wait_until(WAIT, || !common::alive(old_pid)).await,
        "the old process is gone: only the successor can answer"
    );
    let second =
        tokio::task::spawn_blocking(move || s_client(port, version, ("-sess_in", &sess), &ca))
            .await
            .unwrap();
    assert!(second.contains("hello from app"), "{second}");
    assert!(
        reused(&second),
        "the session resumes in the successor: {second}"
    );
    b.log
        .wait_for(&["baton::access", "tls_resumed=true"], WAIT)
        .expect("the access line says resumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls13_session_resumes_after_an_upgrade() {
    resumes_across_an_upgrade("-tls1_3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls12_session_resumes_after_an_upgrade() {
    resumes_across_an_upgrade("-tls1_2").await;
}
