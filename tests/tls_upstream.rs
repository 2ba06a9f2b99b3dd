//! Upstream TLS (`upstreams.X.tls`) end to end: the real binary speaking TLS to a real TLS
//! server (`tls_backend`: rustls on blocking threads, which records the SNI and client
//! certificate of every handshake), plain clients in front. Verification against a CA file,
//! a wrong CA, SNI, a client certificate, pooled TLS connections reused and moved, a TLS
//! tunnel and an in-flight response across `kill -USR2` upgrades, and broken settings named
//! with file:line:col by `check`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
mod http_support;
mod tls_backend;
use common::{Baton, WAIT};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tls_backend::{make_certs, tls_server, SServer, TlsServer};

/// baton with an `http` listener `web` to upstream `app` and a `tcp` listener `t` to
/// upstream `echo`, both over TLS with `app_tls` / `echo_tls` (YAML under `tls:`).
fn start(dir: tempfile::TempDir, app: SocketAddr, app_tls: &str, echo: SocketAddr) -> Baton {
    start_env(dir, app, app_tls, echo, &[])
}

/// [`start`] with extra environment variables (test hooks).
fn start_env(
    dir: tempfile::TempDir,
    app: SocketAddr,
    app_tls: &str,
    echo: SocketAddr,
    env: &[(&str, &str)],
) -> Baton {
    let yaml = format!(
        "runtime:\n  drain_timeout: 10s\n  upgrade_timeout: 10s\nlisteners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n  t:\n    listen: 127.0.0.1:0\n    upstream: echo\nupstreams:\n  app:\n    servers: [\"{app}\"]\n    retries: 0\n    tls:\n{app_tls}  echo:\n    servers: [\"{echo}\"]\n    tls:\n      ca: srv.pem\n      server_name: upstream.test\n"
    );
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    Baton::start_with_env(dir, config, env)
}

/// Certificates, a TLS HTTP server `app` (requiring a client certificate signed by
/// `client.pem` if `client_auth`), a TLS echo server, and baton in front of both.
fn setup(app_tls: &str, client_auth: bool) -> (Baton, TlsServer, TlsServer) {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let client_ca = client_auth.then(|| dir.path().join("client.pem"));
    let app = tls_server(dir.path(), "srv", client_ca.as_deref(), false);
    let echo = tls_server(dir.path(), "srv", None, true);
    let b = start(dir, app.addr, app_tls, echo.addr);
    (b, app, echo)
}

/// [`get`] from async code.
async fn fetch(addr: SocketAddr, path: &'static str) -> String {
    tokio::task::spawn_blocking(move || get(addr, path))
        .await
        .unwrap()
}

/// `GET path` on a new connection with `Connection: close`: the whole answer.
fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Sends SIGUSR2 to the serving process and waits until its successor serves and it is gone.
async fn usr2_upgrade(b: &Baton) {
    let old = b.serving_pid();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(old).unwrap(),
        rustix::process::Signal::USR2,
    )
    .unwrap();
    let dir = b.dir().to_path_buf();
    let read_pid = move || {
        std::fs::read_to_string(dir.join("baton.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
    };
    assert!(
        common::wait_until(WAIT, || read_pid().is_some_and(|p| p != old)
            && !common::alive(old))
        .await,
        "upgrade from {old} did not complete"
    );
}

const CA_SNI: &str = "      ca: srv.pem\n      server_name: upstream.test\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_to_a_tls_upstream_verified_by_its_ca_sends_the_configured_sni() {
    let (b, app, _echo) = setup(CA_SNI, false);
    let web = b.addr("web");
    let out = fetch(web, "/one").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains("hello over tls sni=upstream.test client_cert=false path=/one"),
        "{out}"
    );
    // The pooled TLS connection serves the next request: no second handshake.
    let out = fetch(web, "/two").await;
    assert!(out.contains("path=/two"), "{out}");
    assert_eq!(
        app.seen.lock().unwrap().handshakes,
        1,
        "pooled connection reused"
    );
    // It moves at an upgrade too: the successor reuses it, still no second handshake.
    usr2_upgrade(&b).await;
    assert!(
        b.log
            .wait_for(&["handover committed", "upstream_tls=1"], WAIT)
            .is_some(),
        "the pooled connection moved with its session"
    );
    let out = fetch(web, "/three").await;
    assert!(out.contains("path=/three"), "{out}");
    assert_eq!(
        app.seen.lock().unwrap().handshakes,
        1,
        "the pooled tls connection moved to the successor"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_server_without_server_name_is_verified_by_its_ip_and_gets_no_sni() {
    let (b, _app, _echo) = setup("      ca: srv.pem\n", false);
    let web = b.addr("web");
    let out = fetch(web, "/ip").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("sni=- client_cert=false path=/ip"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_gets_502_and_a_clear_log_line() {
    let (b, app, _echo) = setup(
        "      ca: other.pem\n      server_name: upstream.test\n",
        false,
    );
    let web = b.addr("web");
    let out = fetch(web, "/").await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    let line = b
        .log
        .wait_for(&["upstream tls handshake failed", "upstream=app"], WAIT)
        .expect("log line");
    assert!(line.contains("UnknownIssuer"), "{line}");
    assert_eq!(app.seen.lock().unwrap().handshakes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_certificate_is_presented_to_a_server_that_requires_one() {
    let (b, app, _echo) = setup(
        &format!("{CA_SNI}      client_certificate: {{ cert: client.pem, key: client.key }}\n"),
        true,
    );
    let web = b.addr("web");
    let out = fetch(web, "/mtls").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("client_cert=true path=/mtls"), "{out}");
    assert_eq!(app.seen.lock().unwrap().client_cert, vec![true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_client_certificate_a_server_that_requires_one_gives_502() {
    let (b, _app, _echo) = setup(CA_SNI, true);
    let web = b.addr("web");
    let out = fetch(web, "/").await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_tunnel_to_a_tls_upstream_echoes_every_line_once_across_upgrades() {
    let (b, _app, echo) = setup(CA_SNI, false);
    let t = b.addr("t");
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 0..3 {
        clients.push(common::started_numbered_echo(t, id, stop.clone()).await);
    }
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        usr2_upgrade(&b).await;
    }
    // Each upgrade waited for the old process to exit, so no tunnel stayed behind to finish
    // there; the commit lines say they moved with their upstream sessions.
    assert!(
        b.log.count("upstream_tls=3") >= 1,
        "the tunnels moved with their upstream sessions"
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let n = c.await.unwrap().unwrap();
        assert!(n > 0, "round trips");
    }
    {
        let seen = echo.seen.lock().unwrap();
        assert_eq!(seen.handshakes, 3, "each tunnel kept its one tls session");
        assert!(seen
            .sni
            .iter()
            .all(|s| s.as_deref() == Some("upstream.test")));
    }
    // A new tunnel after the upgrades shakes hands in the successor.
    let last = common::started_numbered_echo(t, 9, Arc::new(AtomicBool::new(true))).await;
    last.await.unwrap().unwrap();
    assert_eq!(echo.seen.lock().unwrap().handshakes, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_in_flight_from_a_tls_upstream_survives_an_upgrade() {
    let (b, app, _echo) = setup(CA_SNI, false);
    let web = b.addr("web");
    let mut s = TcpStream::connect(web).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET /slow HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let gate = app.gate.clone();
    assert!(common::wait_until(WAIT, || gate.arrived.load(Ordering::SeqCst) == 1).await);
    // The head and half the body reached the client before the upgrade.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("sni=") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let old = b.serving_pid();
    usr2_upgrade(&b).await;
    assert!(!common::alive(old));
    assert!(
        b.log
            .wait_for(&["handover committed", "upstream_tls=1"], WAIT)
            .is_some(),
        "the request moved with its upstream tls session"
    );
    app.gate.open();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    got.extend_from_slice(&rest);
    let out = String::from_utf8_lossy(&got);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.ends_with("hello over tls sni=upstream.test client_cert=false path=/slow\n"),
        "{out}"
    );
    assert_eq!(app.seen.lock().unwrap().handshakes, 1);
}

/// `baton CMD -c config` (extra args before `-c`): (exit code, output).
fn baton(cmd: &[&str], config: &Path) -> (Option<i32>, String) {
    let out = Command::new(common::bin())
        .args(cmd)
        .arg("-c")
        .arg(config)
        .output()
        .unwrap();
    (out.status.code(), common::printed(&out))
}

/// A config whose upstream `app` has `tls:` with `tls` (YAML at 6 spaces): its first key is
/// at line 10, column 7.
fn config(dir: &Path, tls: &str, http: &str) -> PathBuf {
    let yaml = format!(
        "runtime: {{ pid_file: baton.pid, control_socket: baton.sock }}\nlisteners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\nupstreams:\n  app:\n    tls:\n{tls}    servers: [127.0.0.1:9]\n{http}"
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn broken_upstream_tls_settings_are_named_with_their_position() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    std::fs::write(dir.path().join("junk.pem"), "not a certificate\n").unwrap();
    for (tls, http, want) in [
        (
            "      ca: gone.pem\n",
            "",
            "config.yaml:10:11: upstreams.app.tls.ca: cannot read",
        ),
        (
            "      ca: junk.pem\n",
            "",
            "config.yaml:10:11: upstreams.app.tls.ca:",
        ),
        (
            "      server_name: \"not a name!\"\n",
            "",
            "config.yaml:10:20: upstreams.app.tls.server_name: \"not a name!\" is not a DNS name or an IP address",
        ),
        (
            "      client_certificate: { cert: srv.pem, key: client.key }\n",
            "",
            "upstreams.app.tls.client_certificate.key:",
        ),
        (
            "      ca: srv.pem\n      verify: false\n",
            "",
            "config.yaml:10:11: upstreams.app.tls.ca: has no use with verify: false",
        ),
        (
            "      ca: srv.pem\n",
            "    http: { protocol: h2c }\n",
            "upstreams.app.tls: an h2c upstream cannot use tls",
        ),
        (
            "      ca: srv.pem\n      alpn: [h2]\n",
            "",
            "upstreams.app.tls.alpn[0]: \"h2\" cannot be spoken to this upstream by http listener \"web\"",
        ),
        (
            "      ca: srv.pem\n      sni: x\n",
            "",
            "config.yaml:11:7: upstreams.app.tls.sni: unknown key",
        ),
    ] {
        let cfg = config(dir.path(), tls, http);
        let (code, out) = baton(&["check"], &cfg);
        assert_eq!(code, Some(2), "{tls}: {out}");
        assert!(out.contains(want), "{tls}: want {want:?} in {out}");
    }
    let cfg = config(
        dir.path(),
        "      client_certificate: { cert: srv.pem, key: client.key }\n",
        "",
    );
    let (_, out) = baton(&["check"], &cfg);
    assert!(
        out.contains("client.key does not match the certificate in"),
        "{out}"
    );
}

#[test]
fn verify_false_loads_with_a_loud_warning_and_dump_shows_the_settings() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let cfg = config(dir.path(), "      verify: false\n", "");
    let (code, out) = baton(&["check"], &cfg);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("upstreams.app.tls.verify: warning: server certificates are NOT verified"),
        "{out}"
    );
    let cfg = config(
        dir.path(),
        "      ca: srv.pem\n      server_name: upstream.test\n      client_certificate: { cert: client.pem, key: client.key }\n",
        "",
    );
    let out = Command::new(common::bin())
        .args(["check", "--dump", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::printed(&out));
    let dump = String::from_utf8_lossy(&out.stdout);
    let ca = dir.path().join("srv.pem");
    for key in [
        "tls:".to_string(),
        format!("ca: {}", ca.display()),
        "server_name: upstream.test".into(),
        "client_certificate:".into(),
        "verify: true".into(),
    ] {
        assert!(dump.contains(&key), "dump lacks {key}: {dump}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_to_a_tls_upstream_shake_hands_and_a_bad_certificate_marks_it_down() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let app = tls_server(dir.path(), "srv", None, false);
    let check =
        "    health_check: { kind: http, path: /healthz, interval: 200ms, timeout: 5s, fall: 1 }\n";
    let yaml = format!(
        "listeners:\n  good:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: good\n  bad:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: bad\nupstreams:\n  good:\n    servers: [\"{a}\"]\n{check}    tls:\n{CA_SNI}  bad:\n    servers: [\"{a}\"]\n{check}    tls:\n      ca: other.pem\n      server_name: upstream.test\n",
        a = app.addr
    );
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    let b = Baton::start_in(dir, config);
    let seen = app.seen.clone();
    assert!(
        common::wait_until(WAIT, || seen.lock().unwrap().handshakes >= 3).await,
        "the good upstream's checks shake hands"
    );
    let line = b
        .log
        .wait_for(&["server marked unhealthy", "upstream=bad"], WAIT)
        .expect("the bad upstream's server marked down");
    assert!(line.contains("tls handshake"), "{line}");
    assert!(line.contains("UnknownIssuer"), "{line}");
    assert_eq!(b.log.count("server marked unhealthy upstream=good"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_server_is_an_upstream_over_tls_1_2_and_1_3() {
    for (flag, want) in [("-tls1_2", "New, TLSv1.2"), ("-tls1_3", "New, TLSv1.3")] {
        let dir = tempfile::tempdir().unwrap();
        make_certs(dir.path());
        let (_server, addr) = SServer::start(dir.path(), flag);
        let b = start(dir, addr, CA_SNI, addr);
        let web = b.addr("web");
        // s_server -www answers HTTP/1.0 and closes: no pooling, every request a handshake.
        for _ in 0..2 {
            let out = fetch(web, "/").await;
            assert!(out.starts_with("HTTP/1.1 200"), "{flag}: {out}");
            assert!(out.contains(want), "{flag}: {out}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_to_a_tls_upstream_survives_upgrades() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (b, app, _echo) = setup(CA_SNI, false);
    let mut s = tokio::net::TcpStream::connect(b.addr("web")).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "closed in the head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for round in 0..3 {
        let line = format!("frame {round} before\n");
        s.write_all(line.as_bytes()).await.unwrap();
        let mut back = vec![0u8; line.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, line.as_bytes());
        usr2_upgrade(&b).await;
    }
    assert!(
        b.log.count("upstream_tls=1") >= 1,
        "the tunnel moved with its session"
    );
    let line = b"after the upgrades\n";
    s.write_all(line).await.unwrap();
    let mut back = vec![0u8; line.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, line);
    assert_eq!(app.seen.lock().unwrap().handshakes, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_resumes_tls_upstream_connections_in_the_old_process() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let app = tls_server(dir.path(), "srv", None, false);
    let echo = tls_server(dir.path(), "srv", None, true);
    let b = start_env(
        dir,
        app.addr,
        CA_SNI,
        echo.addr,
        &[("BATON_TEST_FAULT", "kill_after_first_batch")],
    );
    let web = b.addr("web");
    // A pooled TLS connection, and a tunnel over TLS.
    assert!(fetch(web, "/before").await.contains("path=/before"));
    let stop = Arc::new(AtomicBool::new(false));
    let tunnel = common::started_numbered_echo(b.addr("t"), 1, stop.clone()).await;
    let (ok, out) = common::upgrade_async(&b.config).await;
    assert!(!ok, "the successor died: {out}");
    assert_eq!(b.serving_pid(), b.pid(), "the old process still serves");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(tunnel.await.unwrap().unwrap() > 0);
    assert!(fetch(web, "/after").await.contains("path=/after"));
    assert_eq!(
        app.seen.lock().unwrap().handshakes,
        1,
        "the pooled session resumed"
    );
    assert_eq!(echo.seen.lock().unwrap().handshakes, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_client_reaches_a_tls_upstream_through_the_bridge() {
    use http_body_util::BodyExt;
    let (b, app, _echo) = setup(CA_SNI, false);
    let (mut send, _conn) = http_support::h2c(b.addr("web")).await;
    for path in ["/h2c-one", "/h2c-two"] {
        let resp =
            tokio::time::timeout(WAIT, send.send_request(http_support::get("app.test", path)))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(resp.status(), 200);
        let body = tokio::time::timeout(WAIT, resp.into_body().collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains(&format!("sni=upstream.test client_cert=false path={path}")),
            "{body}"
        );
    }
    assert_eq!(
        app.seen.lock().unwrap().handshakes,
        1,
        "the bridge pooled the tls connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_tunnel_tries_another_server_when_a_tls_handshake_fails() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    // `other` presents a certificate the configured CA did not sign.
    let bad = tls_server(dir.path(), "other", None, true);
    let good = tls_server(dir.path(), "srv", None, true);
    let yaml = format!(
        "listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: echo\nupstreams:\n  echo:\n    servers: [\"{}\", \"{}\"]\n    eject_after: 0\n    tls:\n{CA_SNI}",
        bad.addr, good.addr
    );
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    let b = Baton::start_in(dir, config);
    let t = b.addr("t");
    for id in 0..4 {
        // Round robin sends every other tunnel to the bad server first: it retries the good one.
        let c = common::started_numbered_echo(t, id, Arc::new(AtomicBool::new(true))).await;
        c.await.unwrap().unwrap();
    }
    assert!(b
        .log
        .wait_for(&["upstream tls handshake failed", "UnknownIssuer"], WAIT)
        .is_some());
    assert_eq!(good.seen.lock().unwrap().handshakes, 4);
    assert_eq!(bad.seen.lock().unwrap().handshakes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ca_the_system_roots_verify_and_a_machine_without_any_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let app = tls_server(dir.path(), "srv", None, false);
    let echo = tls_server(dir.path(), "srv", None, true);
    // SSL_CERT_FILE is where rustls-native-certs reads "the system's roots" from when set.
    let roots = dir.path().join("srv.pem").display().to_string();
    let missing = dir.path().join("none.pem").display().to_string();
    let cfg = config(dir.path(), "      server_name: upstream.test\n", "");
    let out = Command::new(common::bin())
        .args(["check", "-c"])
        .arg(&cfg)
        .env("SSL_CERT_FILE", &missing)
        .env("SSL_CERT_DIR", &missing)
        .output()
        .unwrap();
    let printed = common::printed(&out);
    assert_eq!(out.status.code(), Some(2), "{printed}");
    assert!(
        printed.contains("config.yaml:10:7: upstreams.app.tls: no system root certificates found"),
        "{printed}"
    );
    let b = start_env(
        dir,
        app.addr,
        "      server_name: upstream.test\n",
        echo.addr,
        &[("SSL_CERT_FILE", &roots), ("SSL_CERT_DIR", &missing)],
    );
    let out = fetch(b.addr("web"), "/system").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains("sni=upstream.test client_cert=false path=/system"),
        "{out}"
    );
}
