//! `log.file` is reopened on SIGUSR1: after logrotate-style renaming, new lines go to a new
//! file at the configured path and none to the renamed one.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

async fn wait_file(p: &Path, needle: &str) -> bool {
    wait_until(WAIT, || read(p).contains(needle)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_log_file() {
    let be = echo_backend("E").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("baton.log");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "log:\n  file: {}\n  level: debug\nlisteners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\n\
             upstreams:\n  u:\n    servers: [\"{be}\"]\n",
            log.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin())
        .args(["run", "-c"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    assert!(
        wait_file(&log, "to=Ready").await,
        "no ready line in {}",
        read(&log)
    );
    let addr: std::net::SocketAddr = read(&log)
        .lines()
        .find(|l| l.contains("listening") && l.contains("listener=t "))
        .and_then(|l| l.split("addr=").nth(1))
        .and_then(|a| a.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();

    let rotated = dir.path().join("baton.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::USR1).unwrap();
    assert!(
        wait_file(&log, "log file reopened").await,
        "no new log file"
    );
    // A connection's close line goes to the new file only.
    drop(greeting(addr, 1).await.0);
    assert!(wait_file(&log, "connection closed").await, "{}", read(&log));
    let old = read(&rotated);
    assert!(old.contains("to=Ready"));
    assert!(
        !old.contains("log file reopened") && !old.contains("connection closed"),
        "{old}"
    );
    // The process is still alive and serving after the signal.
    assert!(child.try_wait().unwrap().is_none());
    let _ = child.kill();
    let _ = child.wait();
}
