//! Live TLS connections across upgrades, end to end: the real binary, real signals, real
//! clients — `openssl s_client` (each TLS 1.3 suite, with a client KeyUpdate after an upgrade),
//! python's `http.client.HTTPSConnection`, a WebSocket over TLS, a TLS 1.2 client — and a
//! rollback before the commit. A client must never notice: no byte lost or repeated, the same
//! local port throughout, no error.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
mod http_support;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;

/// A certificate for `localhost` / 127.0.0.1 in `dir`: (cert, key) as `localhost.{pem,key}`.
fn cert(dir: &Path) -> PathBuf {
    make_cert(dir, "localhost", &["DNS:localhost", "IP:127.0.0.1"], 30);
    dir.join("localhost.pem")
}

const TLS: &str = "    tls:\n      certificates: [{ cert: localhost.pem, key: localhost.key }]\n";

/// baton with a `tcp` listener `t` (TLS in front of `echo`) and an `http` listener `web`
/// (TLS in front of `app`), in a folder holding the certificate.
fn start(echo: std::net::SocketAddr, app: std::net::SocketAddr, env: &[(&str, &str)]) -> Baton {
    let dir = tempfile::tempdir().unwrap();
    cert(dir.path());
    let yaml = format!(
        "runtime:\n  drain_timeout: 10s\n  upgrade_timeout: 10s\nlisteners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: echo\n{TLS}  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n{TLS}upstreams:\n{}{}",
        http_support::upstream("echo", &[echo], ""),
        http_support::upstream("app", &[app], ""),
    );
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    Baton::start_with_env(dir, config, env)
}

/// `openssl s_client` in interactive mode: lines written to it go out as application data
/// (`K` alone asks for a KeyUpdate), what it prints is collected.
struct SClient {
    child: Child,
    stdin: ChildStdin,
    out: Arc<LogLines>,
}

impl SClient {
    fn connect(port: u16, suite: &str, ca: &Path) -> SClient {
        let mut child = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args([
                "-tls1_3",
                "-ciphersuites",
                suite,
                "-servername",
                "localhost",
            ])
            .arg("-CAfile")
            .arg(ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl s_client");
        let out = Arc::new(LogLines::default());
        pump(child.stdout.take().unwrap(), out.clone(), "s_client");
        pump(child.stderr.take().unwrap(), out.clone(), "s_client!");
        let stdin = child.stdin.take().unwrap();
        let c = SClient { child, stdin, out };
        assert!(
            c.out.wait_for(&["Verify return code: 0"], WAIT).is_some(),
            "s_client handshake"
        );
        c
    }

    /// Sends `line` and waits for its echo.
    fn round_trip(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        assert!(
            self.out.wait_for(&[line], WAIT).is_some(),
            "no echo of {line:?}"
        );
    }

    /// Asks for a KeyUpdate (update_requested): s_client's `K` command.
    fn key_update(&mut self) {
        writeln!(self.stdin, "K").unwrap();
        self.stdin.flush().unwrap();
        assert!(
            self.out.wait_for(&["KEYUPDATE"], WAIT).is_some(),
            "s_client sent no KeyUpdate"
        );
    }
}

impl Drop for SClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn s_client_survives_ten_upgrades(suite: &str) {
    let echo = echo_backend("").await;
    let (app, _) = http_support::backend("app").await;
    let b = start(echo, app, &[]);
    let port = b.addr("t").port();
    let ca = b.dir().join("localhost.pem");
    let mut c = tokio::task::block_in_place(|| SClient::connect(port, suite, &ca));
    let first = b.serving_pid();
    let mut sent = Vec::new();
    for round in 0..10 {
        let before = format!("{suite} round {round} before");
        tokio::task::block_in_place(|| c.round_trip(&before));
        sent.push(before);
        let (ok, out) = upgrade_async(&b.config).await;
        assert!(ok, "upgrade {round}: {out}");
        assert!(out.contains("1 tunnels"), "upgrade {round}: {out}");
        assert!(out.contains("1 over tls"), "upgrade {round}: {out}");
        if round == 0 {
            // The client re-keys with the successor: it must answer, and go on.
            tokio::task::block_in_place(|| c.key_update());
        }
        let after = format!("{suite} round {round} after");
        tokio::task::block_in_place(|| c.round_trip(&after));
        sent.push(after);
    }
    assert_ne!(b.serving_pid(), first);
    // Every line came back exactly once.
    let lines = c.out.all();
    for l in &sent {
        assert_eq!(lines.iter().filter(|x| *x == l).count(), 1, "{l:?}");
    }
    // The successor's record layer took the client's KeyUpdate and answered it.
    assert!(
        b.log.count("tls key update from the peer") >= 1,
        "no KeyUpdate seen by baton"
    );
    drop(c);
    kill_serving(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_client_aes128gcm_lines_across_ten_upgrades() {
    s_client_survives_ten_upgrades("TLS_AES_128_GCM_SHA256").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_client_aes256gcm_lines_across_ten_upgrades() {
    s_client_survives_ten_upgrades("TLS_AES_256_GCM_SHA384").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_client_chacha20_lines_across_ten_upgrades() {
    s_client_survives_ten_upgrades("TLS_CHACHA20_POLY1305_SHA256").await;
}

fn kill_serving(b: &Baton) {
    let pid = b.serving_pid();
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    );
}

/// python's http.client on one HTTPS keep-alive connection, a request every 50 ms until the
/// stop file appears; prints `ok N PORT` per response and `done N ERRORS PORTS` at the end.
const PY_HTTPS: &str = r#"
import http.client, os, ssl, sys, time
port, ca, stop = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
c = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=20)
c.connect()
ports, n, errors = set(), 0, 0
while not os.path.exists(stop):
    try:
        c.request("GET", "/x")
        r = c.getresponse()
        body = r.read()
        if r.status != 200 or not body.startswith(b"hello from app"):
            errors += 1
            print("bad", r.status, body, flush=True)
        ports.add(c.sock.getsockname()[1])
        n += 1
        print("ok", n, c.sock.getsockname()[1], flush=True)
    except Exception as e:
        errors += 1
        print("error", repr(e), flush=True)
        c.close()
    time.sleep(0.05)
print("done", n, errors, len(ports), flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_keep_alive_one_socket_across_ten_upgrades() {
    let echo = echo_backend("").await;
    let (app, _) = http_support::backend("app").await;
    let b = start(echo, app, &[]);
    let port = b.addr("web").port();
    let stop = b.dir().join("stop");
    let mut py = Command::new("python3")
        .args(["-c", PY_HTTPS, &port.to_string()])
        .arg(b.dir().join("localhost.pem"))
        .arg(&stop)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let out = Arc::new(LogLines::default());
    pump(py.stdout.take().unwrap(), out.clone(), "py");
    let ok_count = |out: &LogLines| out.count("ok ");
    assert!(
        wait_until(WAIT, || ok_count(&out) >= 3).await,
        "python got no answer"
    );
    for round in 0..10 {
        let (ok, text) = upgrade_async(&b.config).await;
        assert!(ok, "upgrade {round}: {text}");
        assert!(text.contains("over tls"), "upgrade {round}: {text}");
        // A few requests on the successor before the next upgrade.
        let have = ok_count(&out);
        assert!(
            wait_until(WAIT, || ok_count(&out) >= have + 3).await,
            "no answers after upgrade {round}"
        );
    }
    std::fs::write(&stop, "").unwrap();
    let done = out.wait_for(&["done "], WAIT).expect("python finished");
    let f: Vec<&str> = done.split_whitespace().collect();
    assert_eq!(f[2], "0", "errors: {:?}", out.all());
    assert_eq!(f[3], "1", "one local port throughout: {done}");
    assert!(f[1].parse::<usize>().unwrap() >= 30, "{done}");
    let _ = py.wait();
    kill_serving(&b);
}

/// A rustls client over a blocking socket, trusting the test certificate.
fn rustls_client(
    port: u16,
    ca: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let pem = std::fs::read(ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    rustls::StreamOwned::new(conn, sock)
}

fn echo_line(s: &mut (impl Read + Write), line: &str) -> String {
    s.write_all(line.as_bytes()).unwrap();
    s.flush().unwrap();
    let mut got = vec![0u8; line.len()];
    s.read_exact(&mut got).unwrap();
    String::from_utf8(got).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_and_tls12_tunnels_across_upgrades() {
    let echo = echo_backend("").await;
    let (app, _) = http_support::backend("app").await;
    let b = start(echo, app, &[]);
    let ca = b.dir().join("localhost.pem");
    let (web, t) = (b.addr("web").port(), b.addr("t").port());
    // A WebSocket over TLS (TLS 1.3), and a TLS 1.2 tunnel.
    let mut ws = tokio::task::block_in_place(|| {
        let mut ws = rustls_client(web, &ca, &[&rustls::version::TLS13]);
        ws.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").unwrap();
        let mut head = Vec::new();
        let mut r = BufReader::new(&mut ws);
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            head.push(l.clone());
            if l == "\r\n" {
                break;
            }
        }
        assert!(head[0].starts_with("HTTP/1.1 101"), "{head:?}");
        ws
    });
    let mut t12 = tokio::task::block_in_place(|| rustls_client(t, &ca, &[&rustls::version::TLS12]));
    for round in 0..5 {
        tokio::task::block_in_place(|| {
            let l = format!("ws {round} before\n");
            assert_eq!(echo_line(&mut ws, &l), l);
            let l = format!("tls12 {round} before\n");
            assert_eq!(echo_line(&mut t12, &l), l);
        });
        let (ok, out) = upgrade_async(&b.config).await;
        assert!(ok, "upgrade {round}: {out}");
        assert!(out.contains("2 over tls"), "upgrade {round}: {out}");
        tokio::task::block_in_place(|| {
            if round == 1 {
                // A rustls client re-keys with the successor, mid-stream.
                ws.conn.refresh_traffic_keys().unwrap();
            }
            let l = format!("ws {round} after\n");
            assert_eq!(echo_line(&mut ws, &l), l);
            let l = format!("tls12 {round} after\n");
            assert_eq!(echo_line(&mut t12, &l), l);
        });
    }
    kill_serving(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_before_commit_resumes_tls_connections_in_the_old_process() {
    let echo = echo_backend("").await;
    let (app, _) = http_support::backend("app").await;
    let b = start(echo, app, &[("BATON_TEST_FAULT", "kill_after_first_batch")]);
    let ca = b.dir().join("localhost.pem");
    let port = b.addr("t").port();
    let mut c =
        tokio::task::block_in_place(|| SClient::connect(port, "TLS_AES_128_GCM_SHA256", &ca));
    tokio::task::block_in_place(|| c.round_trip("before the failed upgrade"));
    let (ok, out) = upgrade_async(&b.config).await;
    assert!(!ok, "the successor died: {out}");
    assert_eq!(b.serving_pid(), b.pid(), "the old process still serves");
    tokio::task::block_in_place(|| {
        c.round_trip("after the rollback");
        c.key_update();
        c.round_trip("after a KeyUpdate in the old process");
    });
    kill_serving(&b);
}
