//! TLS termination end to end: the real binary with `tls:` on `http` and `tcp` listeners,
//! real clients (curl, openssl s_client, python's http.client, a rustls client) and real
//! backends on 127.0.0.1. Certificates are made per test with the openssl CLI.
#![allow(clippy::unwrap_used)]
mod common;
mod http_support;
use common::{make_cert, Baton, WAIT};
use http_support::{backend, upstream};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// Two certificates in `dir`: `a` (a.test, *.w.test, 127.0.0.1; the default) and `b` (b.test).
fn two_certs(dir: &Path) {
    make_cert(
        dir,
        "a",
        &["DNS:a.test", "DNS:*.w.test", "IP:127.0.0.1"],
        30,
    );
    make_cert(dir, "b", &["DNS:b.test"], 30);
}

const TLS_AB: &str = "    tls:\n      certificates:\n        - { cert: a.pem, key: a.key }\n        - { cert: b.pem, key: b.key }\n";

/// Starts baton in a folder holding the certificates, with one `http` listener `web` (TLS,
/// upstream `app`) and one `tcp` listener `tun` (TLS, upstream `echo`).
fn start(app: std::net::SocketAddr, echo: std::net::SocketAddr) -> Baton {
    let dir = tempfile::tempdir().unwrap();
    two_certs(dir.path());
    let yaml = format!(
        "listeners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n{TLS_AB}  tun:\n    listen: 127.0.0.1:0\n    upstream: echo\n    tls:\n      certificates: [{{ cert: a.pem, key: a.key }}]\n  plain:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\nupstreams:\n{}{}",
        upstream("app", &[app], ""),
        upstream("echo", &[echo], ""),
    );
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    Baton::start_in(dir, config)
}

/// `curl --cacert CA https://NAME:PORT/PATH` with NAME resolved to 127.0.0.1: (ok, output).
fn curl(dir: &Path, ca: &str, name: &str, port: u16, path: &str) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(dir.join(ca))
        .arg("--resolve")
        .arg(format!("{name}:{port}:127.0.0.1"))
        .arg(format!("https://{name}:{port}{path}"))
        .output()
        .unwrap();
    (out.status.success(), common::printed(&out))
}

/// The subject of the certificate served for `sni` (openssl s_client).
fn served_subject(port: u16, sni: &str) -> String {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            sni,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = common::printed(&out);
    text.lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_else(|| panic!("no subject in {text}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_each_certificate_and_the_first_is_the_default() {
    let (app, _) = backend("app").await;
    let echo = common::echo_backend("").await;
    let b = start(app, echo);
    let port = b.addr("web").port();
    let dir = b.dir().to_path_buf();
    let r = tokio::task::spawn_blocking(move || {
        (
            curl(&dir, "a.pem", "a.test", port, "/"),
            curl(&dir, "b.pem", "b.test", port, "/"),
            curl(&dir, "a.pem", "x.w.test", port, "/"),
            // b.test verified against a's certificate fails: b.test got b's.
            curl(&dir, "a.pem", "b.test", port, "/"),
            served_subject(port, "unknown.test"),
            served_subject(port, "b.test"),
        )
    })
    .await
    .unwrap();
    assert_eq!(r.0, (true, "hello from app\n".into()));
    assert_eq!(r.1, (true, "hello from app\n".into()));
    assert_eq!(r.2, (true, "hello from app\n".into()), "wildcard name");
    assert!(
        !r.3 .0,
        "b.test must not be served a's certificate: {}",
        r.3 .1
    );
    assert!(r.4.contains("CN = a"), "default certificate: {}", r.4);
    assert!(r.5.contains("CN = b"), "{}", r.5);
    let line = b
        .log
        .wait_for(&["baton::access", "host=b.test", "sni=b.test"], WAIT)
        .expect("access line with the tls facts");
    assert!(line.contains("tls_version=TLSv1.3"), "{line}");
    assert!(line.contains("tls_cipher=TLS13_"), "{line}");
    assert!(line.contains("alpn=http/1.1"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_keeps_one_tls_connection_alive_and_upstreams_see_https() {
    let (app, counts) = backend("app").await;
    let echo = common::echo_backend("").await;
    let b = start(app, echo);
    let port = b.addr("web").port();
    let ca = b.dir().join("a.pem");
    let script = format!(
        r#"
import http.client, ssl, time
ctx = ssl.create_default_context(cafile={ca:?})
c = http.client.HTTPSConnection("127.0.0.1", {port}, context=ctx, timeout=20)
ports = set()
for i in range(20):
    if i in (5, 6):
        # Idle past the engine's 250 ms linger: the session's buffers are freed, it serves on.
        time.sleep(0.6)
    c.request("GET", "/headers" if i == 0 else "/x")
    r = c.getresponse()
    body = r.read().decode()
    assert r.status == 200, r.status
    if i == 0:
        assert "x-forwarded-proto: https" in body, body
    ports.add(c.sock.getsockname()[1])
print("ok", len(ports))
"#,
        ca = ca.to_str().unwrap()
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = common::printed(&out);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.trim(), "ok 1", "20 requests on one connection");
    assert_eq!(
        counts.requests.load(std::sync::atomic::Ordering::Relaxed),
        20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_through_a_tls_tcp_listener_reaches_the_echo_backend() {
    let (app, _) = backend("app").await;
    let echo = common::echo_backend("").await;
    let b = start(app, echo);
    let port = b.addr("tun").port();
    let ca = b.dir().join("a.pem");
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                "-tls1_3",
                "-connect",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("-CAfile")
            .arg(&ca)
            .args(["-servername", "a.test"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut got = Vec::new();
        for i in 0..5 {
            let line = format!("line {i}\n");
            stdin.write_all(line.as_bytes()).unwrap();
            let mut buf = vec![0u8; line.len()];
            stdout.read_exact(&mut buf).unwrap();
            got.push(String::from_utf8(buf).unwrap());
        }
        // `-quiet` implies `-ign_eof`: s_client would not end at the end of its input.
        let _ = child.kill();
        let _ = child.wait();
        got
    })
    .await
    .unwrap();
    let want: Vec<String> = (0..5).map(|i| format!("line {i}\n")).collect();
    assert_eq!(out, want);
    // A TLS tunnel's close line carries what its handshake agreed on.
    b.log
        .wait_for(
            &[
                "connection closed",
                "listener=tun",
                "tls_version=TLSv1.3",
                "sni=a.test",
            ],
            WAIT,
        )
        .expect("close line with the tls facts");
}

/// A TLS client that half-closes its tunnel with close_notify gets the rest of the backend's
/// bytes, and then baton's close_notify before the FIN: a TLS peer reads an EOF without one as
/// a truncation (rustls: UnexpectedEof; before the fix the relay, with the other direction
/// done, closed the socket without it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_tunnel_ends_with_close_notify_after_the_client_half_closes() {
    let (app, _) = backend("app").await;
    // Answers only once the client has half-closed, then closes: the reply crosses baton
    // after the client's close_notify, and the relay's last direction ends with the backend.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let late = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut all = Vec::new();
                let _ = s.read_to_end(&mut all).await;
                let _ = s
                    .write_all(format!("got {} bytes\n", all.len()).as_bytes())
                    .await;
            });
        }
    });
    let b = start(app, late);
    let port = b.addr("tun").port();
    let ca = b.dir().join("a.pem");
    let got = tokio::task::spawn_blocking(move || {
        let mut s = tls_client(&ca, "a.test", port);
        s.write_all(b"hello").unwrap();
        s.flush().unwrap();
        s.conn.send_close_notify();
        s.flush().unwrap();
        let mut back = Vec::new();
        let end = s.read_to_end(&mut back);
        (
            String::from_utf8_lossy(&back).into_owned(),
            end.map_err(|e| e.kind()),
        )
    })
    .await
    .unwrap();
    assert_eq!(got, ("got 5 bytes\n".to_string(), Ok(12)));
}

/// A blocking rustls client that trusts `ca` and names `sni`.
fn tls_client(
    ca: &Path,
    sni: &str,
    port: u16,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), sni.to_string().try_into().unwrap()).unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Reads a response head (up to the blank line).
fn read_head(s: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_tls_becomes_a_tunnel() {
    let (app, _) = backend("app").await;
    let echo = common::echo_backend("").await;
    let b = start(app, echo);
    let port = b.addr("web").port();
    let ca = b.dir().join("a.pem");
    let echoed = tokio::task::spawn_blocking(move || {
        let mut s = tls_client(&ca, "a.test", port);
        s.write_all(b"GET /ws HTTP/1.1\r\nhost: a.test\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").unwrap();
        let head = read_head(&mut s);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let mut got = Vec::new();
        for i in 0..50 {
            let msg = format!("frame {i} {}", "x".repeat(i * 100));
            s.write_all(msg.as_bytes()).unwrap();
            let mut buf = vec![0u8; msg.len()];
            s.read_exact(&mut buf).unwrap();
            got.push(buf == msg.as_bytes());
        }
        got
    })
    .await
    .unwrap();
    assert!(
        echoed.iter().all(|ok| *ok),
        "every frame echoed: {echoed:?}"
    );
    b.log
        .wait_for(
            &["baton::access", "path=/ws", "status=101", "sni=a.test"],
            WAIT,
        )
        .expect("access line of the upgrade");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_a_tls_port_gets_400_and_tls_on_a_plain_port_is_refused() {
    let (app, _) = backend("app").await;
    let echo = common::echo_backend("").await;
    let b = start(app, echo);
    let web = b.addr("web");
    let plain = b.addr("plain");
    let reply = http_support::raw(web, b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(
        reply.contains("The plain HTTP request was sent to HTTPS port"),
        "{reply}"
    );
    b.log
        .wait_for(
            &["tls handshake failed", "plain HTTP request on a TLS port"],
            WAIT,
        )
        .expect("log line");
    // Garbage that is neither TLS nor HTTP is closed without an answer.
    let reply = http_support::raw(web, b"\x00\x01\x02garbage").await;
    assert_eq!(reply, "");
    // A TLS client on the plain port gets the engine's 400 in plain text, and a log line.
    let dir = b.dir().to_path_buf();
    let port = plain.port();
    let (ok, out) = tokio::task::spawn_blocking(move || curl(&dir, "a.pem", "a.test", port, "/"))
        .await
        .unwrap();
    assert!(!ok, "{out}");
    b.log
        .wait_for(&["request refused", "status=400"], WAIT)
        .expect("refused line");
    // Nothing else was disturbed.
    let dir = b.dir().to_path_buf();
    let port = web.port();
    let after = tokio::task::spawn_blocking(move || curl(&dir, "a.pem", "a.test", port, "/"))
        .await
        .unwrap();
    assert_eq!(after, (true, "hello from app\n".into()));
    let reply = http_support::raw(
        plain,
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_request_in_flight_moves_with_an_upgrade_and_the_successor_serves_tls() {
    let (app, _) = backend("app").await;
    let echo = common::echo_backend("").await;
    let b = start(app, echo);
    let port = b.addr("web").port();
    let ca = b.dir().join("a.pem");
    let old_pid = b.pid();
    // A request in flight over TLS when the upgrade starts.
    let ca2 = ca.clone();
    let slow = tokio::task::spawn_blocking(move || {
        let mut s = tls_client(&ca2, "a.test", port);
        s.write_all(b"GET /slow/1500 HTTP/1.1\r\nhost: a.test\r\n\r\n")
            .unwrap();
        let head = read_head(&mut s);
        let mut body = vec![0u8; "slow hello from app\n".len()];
        s.read_exact(&mut body).unwrap();
        (head, String::from_utf8(body).unwrap())
    });
    b.log
        .wait_for(&["tls handshake done"], WAIT)
        .expect("the slow request's handshake");
    let (ok, out) = common::upgrade_async(&b.config).await;
    assert!(ok, "upgrade: {out}");
    let (head, body) = slow.await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The request moved with its connection (TLS session included): no close is forced.
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "moved, not drained: {head}"
    );
    assert_eq!(body, "slow hello from app\n");
    // The successor terminates TLS with the same certificates.
    assert!(common::wait_until(WAIT, || b.serving_pid() != old_pid).await);
    let dir = b.dir().to_path_buf();
    let after = tokio::task::spawn_blocking(move || curl(&dir, "b.pem", "b.test", port, "/"))
        .await
        .unwrap();
    assert_eq!(after, (true, "hello from app\n".into()));
    assert!(
        common::wait_until(WAIT, || !common::alive(old_pid)).await,
        "the old process exits once its connections moved"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_the_new_certificate_to_new_connections() {
    let (app, _) = backend("app").await;
    let echo = common::echo_backend("").await;
    let b = start(app, echo);
    let port = b.addr("web").port();
    let old_pid = b.pid();
    let first = tokio::task::spawn_blocking(move || served_subject(port, "b.test"))
        .await
        .unwrap();
    assert!(first.contains("CN = b"), "{first}");
    // A new certificate and key for b.test at the same paths, then a reload.
    let tmp = tempfile::tempdir().unwrap();
    make_cert(tmp.path(), "b-renewed", &["DNS:b.test"], 60);
    for ext in ["pem", "key"] {
        std::fs::copy(
            tmp.path().join(format!("b-renewed.{ext}")),
            b.dir().join(format!("b.{ext}")),
        )
        .unwrap();
    }
    let config = b.config.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || common::cli(&config, "reload", &[]))
        .await
        .unwrap();
    assert!(ok, "reload: {out}");
    assert!(common::wait_until(WAIT, || b.serving_pid() != old_pid).await);
    let after = tokio::task::spawn_blocking(move || served_subject(port, "b.test"))
        .await
        .unwrap();
    assert!(after.contains("CN = b-renewed"), "{after}");
}

/// `alpn: [h2, http/1.1]` serves HTTP/2 to clients that offer it (hyper's server, as for h2c)
/// and HTTP/1.1 to the others; a listener with the default ALPN list does not offer h2. The
/// upstream hears HTTP/1.1 with `x-forwarded-proto: https` either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_h2_serves_http2_over_tls_and_http11_to_the_rest() {
    let (app, counts) = backend("app").await;
    let dir = tempfile::tempdir().unwrap();
    two_certs(dir.path());
    let yaml = format!(
        "listeners:\n  h2web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n    tls:\n      certificates: [{{ cert: a.pem, key: a.key }}]\n      alpn: [h2, http/1.1]\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n    tls:\n      certificates: [{{ cert: a.pem, key: a.key }}]\nupstreams:\n{}",
        upstream("app", &[app], ""),
    );
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    let b = Baton::start_in(dir, config);
    let version_and_body = |listener: &str, flag: &str| {
        let port = b.addr(listener).port();
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                flag,
                "-w",
                "\nversion=%{http_version}",
                "--cacert",
            ])
            .arg(b.dir().join("a.pem"))
            .arg("--resolve")
            .arg(format!("a.test:{port}:127.0.0.1"))
            .arg(format!("https://a.test:{port}/headers"))
            .output()
            .unwrap();
        let text = common::printed(&out);
        assert!(out.status.success(), "curl {flag} to {listener}: {text}");
        text
    };
    let h2 = version_and_body("h2web", "--http2");
    assert!(h2.ends_with("version=2"), "h2 chosen by ALPN: {h2}");
    assert!(h2.contains("x-forwarded-proto: https"), "{h2}");
    let h1 = version_and_body("h2web", "--http1.1");
    assert!(h1.ends_with("version=1.1"), "{h1}");
    assert!(h1.contains("x-forwarded-proto: https"), "{h1}");
    let default = version_and_body("web", "--http2");
    assert!(
        default.ends_with("version=1.1"),
        "h2 is not offered by default: {default}"
    );
    assert_eq!(
        counts.requests.load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    let line = b
        .log
        .wait_for(&["baton::access", "listener=h2web", "alpn=h2"], WAIT)
        .expect("the h2 request's access line carries the tls facts");
    assert!(line.contains("tls_version=TLSv1.3"), "{line}");
}

/// A TLS tunnel whose client sends a record that fails its integrity check (garbage after the
/// handshake) is closed, and its close line says why: `reason=tls error`, not a bare socket
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_closed_by_a_bad_record_says_tls_error() {
    let (app, _) = backend("app").await;
    let echo = common::echo_backend("").await;
    let b = start(app, echo);
    let port = b.addr("tun").port();
    let ca = b.dir().join("a.pem");
    tokio::task::spawn_blocking(move || {
        let mut s = tls_client(&ca, "a.test", port);
        s.write_all(b"ping\n").unwrap();
        s.flush().unwrap();
        let mut back = [0u8; 5];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ping\n");
        // An application-data record of 32 bytes that no key produced.
        let mut rec = vec![0x17, 0x03, 0x03, 0x00, 0x20];
        rec.extend_from_slice(&[0x5a; 32]);
        s.sock.write_all(&rec).unwrap();
        // baton answers with its alert and closes.
        let mut rest = Vec::new();
        let _ = s.sock.read_to_end(&mut rest);
    })
    .await
    .unwrap();
    b.log
        .wait_for(
            &["connection closed", "listener=tun", "reason=\"tls error\""],
            WAIT,
        )
        .expect("the close line names the tls error");
}
