//! gRPC through baton, with gRPC's own client and server (grpcio, on gRPC's C core): an h2c
//! listener and a TLS listener (ALPN h2), each in front of an h2c upstream, through upgrades.
//! Unary calls run in a loop beside a thread that keeps a server stream open, and the
//! checks before and after cover each call kind: a 3 MB message, a server stream, a client
//! stream, and an error status carried in trailers.
//!
//! gRPC's server refuses (RST_STREAM) a request without `te: trailers`; baton used to strip
//! `TE` as hop-by-hop, so every call failed with 502.
//!
//! Needs `python3` with `grpcio` (.ci/run installs it); without it the test fails and says so,
//! it never skips.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/grpc_check.py");

/// The gRPC server: its process (ended when its stdin closes) and its address.
struct GrpcServer {
    child: Child,
    stdin: Option<ChildStdin>,
    addr: SocketAddr,
}

impl GrpcServer {
    fn start() -> GrpcServer {
        let probe = Command::new("python3").args(["-c", "import grpc"]).status();
        assert!(
            probe.is_ok_and(|s| s.success()),
            "this test needs python3 with grpcio: pip install grpcio"
        );
        let mut child = Command::new("python3")
            .args([SCRIPT, "server"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let port: u16 = first
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("grpc server said {first:?}"));
        GrpcServer {
            stdin: child.stdin.take(),
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

fn config(app: SocketAddr, tls: &str) -> String {
    format!(
        "runtime:\n  drain_timeout: 20s\nlisteners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n{tls}upstreams:\n  app:\n    servers: [\"{app}\"]\n    http:\n      protocol: h2c\n"
    )
}

/// Runs the client against `target` through `rounds` upgrades, each after 100 more unary
/// calls went through, and asserts that it saw no error.
async fn client_across_upgrades(
    b: &Baton,
    target: &str,
    ca: Option<&std::path::Path>,
    rounds: usize,
) {
    let stop = b.dir().join("stop");
    let progress = b.dir().join("progress");
    let mut cmd = Command::new("python3");
    cmd.args([SCRIPT, "client", target])
        .arg(&stop)
        .arg(&progress);
    if let Some(ca) = ca {
        cmd.arg(ca);
    }
    let mut py = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    let ready = tokio::task::spawn_blocking(move || {
        let l = lines.next();
        (l, lines)
    });
    let (first, mut lines) = ready.await.unwrap();
    assert_eq!(first.unwrap().unwrap(), "ready");
    let calls = || {
        std::fs::read_to_string(&progress)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    for round in 0..rounds {
        let before = calls();
        assert!(
            wait_until(WAIT, || calls() >= before + 100).await,
            "round {round}: no calls went through"
        );
        let (ok, out) = upgrade_async(&b.config).await;
        assert!(ok, "round {round}: {out}");
    }
    let before = calls();
    assert!(
        wait_until(WAIT, || calls() >= before + 100).await,
        "no calls after the last upgrade"
    );
    std::fs::File::create(&stop).unwrap().flush().unwrap();
    let report = tokio::task::spawn_blocking(move || lines.next().unwrap().unwrap())
        .await
        .unwrap();
    assert!(py.wait().unwrap().success());
    eprintln!("grpc client: {report}");
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(
        v["calls"].as_u64().unwrap() >= 100 * (rounds as u64 + 1),
        "{report}"
    );
    assert!(v["streams"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(v["error_count"].as_u64().unwrap(), 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_h2c_reaches_an_h2c_upstream_across_upgrades() {
    let app = GrpcServer::start();
    let b = Baton::start(&config(app.addr, ""));
    let target = b.addr("web").to_string();
    client_across_upgrades(&b, &target, None, 3).await;
    assert!(b
        .log
        .wait_for(&["baton::access", "path=/t.S/Echo", "status=200"], WAIT)
        .is_some());
}

/// The usual gRPC deployment: TLS ends at baton, the service speaks cleartext HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_reaches_an_h2c_upstream_across_upgrades() {
    let app = GrpcServer::start();
    let dir = tempfile::tempdir().unwrap();
    make_cert(dir.path(), "a", &["DNS:localhost", "IP:127.0.0.1"], 30);
    let config_path = dir.path().join("config.yaml");
    let tls =
        "    tls:\n      certificates: [{ cert: a.pem, key: a.key }]\n      alpn: [h2, http/1.1]\n";
    std::fs::write(&config_path, config(app.addr, tls)).unwrap();
    let b = Baton::start_in(dir, config_path);
    let target = b.addr("web").to_string();
    let ca = b.dir().join("a.pem");
    client_across_upgrades(&b, &target, Some(&ca), 3).await;
    assert!(b
        .log
        .wait_for(&["baton::access", "alpn=h2", "status=200"], WAIT)
        .is_some());
}
