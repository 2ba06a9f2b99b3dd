//! A real `baton run` as successor, with this test playing a predecessor that goes silent at
//! each step of the protocol: the successor must give up at its step's deadline
//! (`upgrade_timeout`) and exit non-zero, never sit forever on listeners nobody serves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use baton::handover::session::{Deadline, Peer, Predecessor};
use baton::handover::{spawn_successor, Spawned};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// Generous bound on a noisy 2-core machine (the successor's own deadline is 1 s).
const WAIT: Duration = Duration::from_secs(20);

/// Where the predecessor stops talking.
#[derive(Debug, Clone, Copy)]
enum Silent {
    /// Says nothing at all.
    FromTheStart,
    /// Sends five bytes of a frame header, then nothing.
    MidHeader,
    /// Answers the Hello, then nothing.
    AfterHello,
    /// Offers a listener and receives Ready, then nothing (no batch, no commit).
    AfterReady,
}

fn start(dir: &tempfile::TempDir) -> Spawned {
    let config = dir.path().join("config.yaml");
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(
        &config,
        format!(
            "runtime:\n  upgrade_timeout: 1s\nlisteners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\nupstreams:\n  u:\n    servers: [\"{dead}\"]\n"
        ),
    )
    .unwrap();
    let args: Vec<std::ffi::OsString> = vec![
        "run".into(),
        "-c".into(),
        config.into_os_string(),
        "--generation".into(),
        "2".into(),
    ];
    spawn_successor(std::path::Path::new(env!("CARGO_BIN_EXE_baton")), &args).unwrap()
}

async fn silent_predecessor(at: Silent) {
    let dir = tempfile::tempdir().unwrap();
    let Spawned { mut child, channel } = start(&dir);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Kept until the end: a closed channel would read as "predecessor gone", not silence.
    let mut keep = (None, None);
    match at {
        Silent::FromTheStart => keep.0 = Some(channel),
        Silent::MidHeader => {
            let mut ch = channel;
            ch.send_raw(&[b"BTNH\0"], &[]).await.unwrap();
            keep.0 = Some(ch);
        }
        Silent::AfterHello | Silent::AfterReady => {
            let mut p = Predecessor::new(channel, Peer::Remote, Deadline::new(WAIT, "test"));
            p.hello().await.unwrap();
            if let Silent::AfterReady = at {
                let offer = ("t", addr, baton::config::Protocol::Tcp, listener.as_fd());
                p.offer_listeners(&[offer]).await.unwrap();
                assert_eq!(p.await_ready().await.unwrap(), vec!["t".to_string()]);
            }
            keep.1 = Some(p);
        }
    }
    let started = Instant::now();
    let st = match tokio::time::timeout(WAIT, child.wait()).await {
        Ok(st) => st.unwrap(),
        Err(_) => {
            let _ = child.start_kill();
            panic!("{at:?}: the successor hangs");
        }
    };
    eprintln!(
        "{at:?}: successor gave up after {:?}: {st}",
        started.elapsed()
    );
    assert!(!st.success(), "{at:?}: exited {st}");
    drop(keep);
}

#[tokio::test]
async fn a_silent_predecessor_from_the_start() {
    silent_predecessor(Silent::FromTheStart).await;
}

#[tokio::test]
async fn a_predecessor_silent_mid_header() {
    silent_predecessor(Silent::MidHeader).await;
}

#[tokio::test]
async fn a_predecessor_silent_after_hello() {
    silent_predecessor(Silent::AfterHello).await;
}

#[tokio::test]
async fn a_predecessor_silent_after_ready() {
    silent_predecessor(Silent::AfterReady).await;
}
