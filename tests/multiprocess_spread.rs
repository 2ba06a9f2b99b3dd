//! Multi-process mode, `accept: shared`: both workers accept on one socket, and new
//! connections are spread across them (a worker ahead of the least loaded one stands aside,
//! `src/spread.rs`), as status shows. Before, the kernel's wake order decided: 50 tunnels
//! split 6 vs 44.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::supervisor::*;
use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_tunnels_on_a_shared_socket_split_evenly_across_two_workers() {
    let be = echo_backend("").await;
    let b = Baton::start(&format!(
        "runtime:\n  workers: 2\n  accept: shared\n  drain_timeout: 5s\nlisteners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\nupstreams:\n  u:\n    servers: [\"{be}\"]\n"
    ));
    let addr = b.addr("t");
    two_serving(&b).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tunnels = Vec::new();
    for id in 0..50 {
        tunnels.push(started_numbered_echo(addr, id, stop.clone()).await);
    }
    let s = wait_status(&b, "50 tunnels counted", |s| {
        s["workers"][0]["active"].as_u64().unwrap_or(0)
            + s["workers"][1]["active"].as_u64().unwrap_or(0)
            == 50
    })
    .await;
    let (a, c) = (
        s["workers"][0]["active"].as_u64().unwrap(),
        s["workers"][1]["active"].as_u64().unwrap(),
    );
    eprintln!("spread: worker 0 {a}, worker 1 {c}");
    // One connection of slack, plus what a board update in flight can let through.
    assert!(a.abs_diff(c) <= 4, "uneven spread: {a} vs {c}");
    let (ok, text) = cli(&b.config, "status", &[]);
    assert!(ok);
    assert!(
        text.contains("spread (shared, workers take turns): 50 active: worker 0"),
        "{text}"
    );
    stop.store(true, Ordering::Relaxed);
    for t in tunnels {
        assert!(t.await.unwrap().expect("tunnel broke") > 0);
    }
}
