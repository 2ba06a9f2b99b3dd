//! The TLS servers the upstream TLS tests talk to: a rustls server on blocking threads that
//! records each handshake's SNI and client certificate (HTTP/1.1 keep-alive answers, a
//! WebSocket-like switch to an echo, or a plain echo), and `openssl s_server -www`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use crate::common::{self, make_cert, WAIT};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// What the test server saw.
#[derive(Default)]
pub struct Seen {
    /// Completed handshakes.
    pub handshakes: usize,
    /// The SNI of each.
    pub sni: Vec<Option<String>>,
    /// Whether each presented a client certificate.
    pub client_cert: Vec<bool>,
}

/// Holds `/slow` responses half-way until opened.
#[derive(Default)]
pub struct Gate {
    /// `/slow` requests whose first half is written.
    pub arrived: AtomicUsize,
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    pub fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
    }

    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

/// A TLS server on 127.0.0.1: HTTP/1.1 keep-alive answers naming what the handshake agreed
/// (`sni=.. client_cert=..`), or an echo.
pub struct TlsServer {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
    pub gate: Arc<Gate>,
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(|c| c.unwrap())
        .collect()
}

/// Starts a server with `STEM.pem`/`STEM.key` of `dir`; with `client_ca`, it requires a
/// client certificate signed by it.
pub fn tls_server(dir: &Path, stem: &str, client_ca: Option<&Path>, echo: bool) -> TlsServer {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca) {
                roots.add(c).unwrap();
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(v)
        }
    };
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{stem}.key"))).unwrap();
    let cfg = Arc::new(
        builder
            .with_single_cert(certs(&dir.join(format!("{stem}.pem"))), key)
            .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = TlsServer {
        addr: listener.local_addr().unwrap(),
        seen: Arc::default(),
        gate: Arc::default(),
    };
    let (seen, gate) = (server.seen.clone(), server.gate.clone());
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (cfg, seen, gate) = (cfg.clone(), seen.clone(), gate.clone());
            std::thread::spawn(move || serve(cfg, tcp, &seen, &gate, echo));
        }
    });
    server
}

fn serve(
    cfg: Arc<rustls::ServerConfig>,
    mut tcp: TcpStream,
    seen: &Mutex<Seen>,
    gate: &Gate,
    echo: bool,
) {
    let mut conn = rustls::ServerConnection::new(cfg).unwrap();
    while conn.is_handshaking() {
        if conn.complete_io(&mut tcp).is_err() {
            return;
        }
    }
    let sni = conn.server_name().map(str::to_string);
    let client_cert = conn.peer_certificates().is_some_and(|c| !c.is_empty());
    {
        let mut s = seen.lock().unwrap();
        s.handshakes += 1;
        s.sni.push(sni.clone());
        s.client_cert.push(client_cert);
    }
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut buf = [0u8; 16384];
    if echo {
        return echo_all(&mut s);
    }
    let mut pending = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&pending[..end]).to_string();
        pending.drain(..end);
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        if head.to_ascii_lowercase().contains("upgrade: websocket") {
            // A switch to a raw echo (what a WebSocket server looks like to a proxy).
            let switched = s
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
                .and_then(|()| s.write_all(&pending))
                .and_then(|()| s.flush());
            if switched.is_err() {
                return;
            }
            return echo_all(&mut s);
        }
        let body = format!(
            "hello over tls sni={} client_cert={client_cert} path={path}\n",
            sni.as_deref().unwrap_or("-")
        );
        let (first, rest) = body.split_at(body.len() / 2);
        let wrote = write!(
            s,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{first}",
            body.len()
        )
        .and_then(|()| s.flush());
        if wrote.is_err() {
            return;
        }
        if path.starts_with("/slow") {
            gate.arrived.fetch_add(1, Ordering::SeqCst);
            gate.wait();
        }
        if s.write_all(rest.as_bytes())
            .and_then(|()| s.flush())
            .is_err()
        {
            return;
        }
    }
}

/// Echoes everything until the peer closes.
fn echo_all(s: &mut (impl Read + Write)) {
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).and_then(|()| s.flush()).is_err() {
                    return;
                }
            }
        }
    }
}

/// Certificates in `dir`: `srv` (upstream.test and 127.0.0.1), `other` (a CA that signed
/// nothing of ours), `client` (baton's client certificate).
pub fn make_certs(dir: &Path) {
    make_cert(dir, "srv", &["DNS:upstream.test", "IP:127.0.0.1"], 30);
    make_cert(dir, "other", &["DNS:other.test"], 30);
    make_cert(dir, "client", &["DNS:client.test"], 30);
}

/// `openssl s_server -www` on a free port with `srv.pem` of `dir`, killed when dropped.
pub struct SServer(std::process::Child);

impl SServer {
    pub fn start(dir: &Path, version: &str) -> (SServer, SocketAddr) {
        let port = common::supervisor::free_port();
        let mut child = Command::new("openssl")
            .args(["s_server", "-www", "-accept", &format!("127.0.0.1:{port}")])
            .arg("-cert")
            .arg(dir.join("srv.pem"))
            .arg("-key")
            .arg(dir.join("srv.key"))
            .arg(version)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("openssl s_server");
        let out = Arc::new(common::LogLines::default());
        common::pump(child.stdout.take().unwrap(), out.clone(), "s_server");
        common::pump(child.stderr.take().unwrap(), out.clone(), "s_server!");
        let s = SServer(child);
        assert!(
            out.wait_for(&["ACCEPT"], WAIT).is_some(),
            "s_server did not start"
        );
        (s, SocketAddr::from(([127, 0, 0, 1], port)))
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
