//! Support for the HTTP integration tests: real hyper backends on 127.0.0.1 that count their
//! connections, raw-socket and hyper clients, and baton configs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const WAIT: Duration = Duration::from_secs(20);

pub type TBody = BoxBody<Bytes, hyper::Error>;

pub fn text(s: impl Into<Bytes>) -> TBody {
    Full::new(s.into()).map_err(|n| match n {}).boxed()
}

/// Counters of a test backend.
#[derive(Default, Debug)]
pub struct Counts {
    pub accepted: AtomicUsize,
    pub requests: AtomicUsize,
}

/// A deterministic byte pattern for large bodies.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) % 251) as u8)
        .collect()
}

async fn answer(
    name: &'static str,
    counts: Arc<Counts>,
    mut req: Request<Incoming>,
) -> Result<Response<TBody>, Infallible> {
    counts.requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    if req.headers().contains_key(hyper::header::UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            let mut io = TokioIo::new(up);
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut r = Response::new(text(""));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        r.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        return Ok(r);
    }
    if path == "/headers" {
        let mut out = format!("method: {}\nuri: {}\n", req.method(), req.uri());
        for (k, v) in req.headers() {
            out.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
        }
        return Ok(Response::new(text(out)));
    }
    if let Some(n) = path.strip_prefix("/download/") {
        let total: u64 = n.parse().unwrap();
        let mut r = Response::new(PatternBody { sent: 0, total }.boxed());
        r.headers_mut()
            .insert("content-length", total.to_string().parse().unwrap());
        return Ok(r);
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        return Ok(Response::new(text(format!("slow hello from {name}\n"))));
    }
    if path == "/hang" {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if matches!(*req.method(), Method::POST | Method::PUT) {
        if path == "/sum" {
            // Reads the whole body, answers its length and checksum.
            let mut body = req.into_body();
            let (mut len, mut sum) = (0u64, 0u64);
            while let Some(f) = body.frame().await {
                if let Ok(d) = f.unwrap().into_data() {
                    for b in d.iter() {
                        sum = sum.wrapping_mul(31).wrapping_add(*b as u64);
                    }
                    len += d.len() as u64;
                }
            }
            return Ok(Response::new(text(format!("{len} {sum}"))));
        }
        return Ok(Response::new(req.into_body().boxed()));
    }
    Ok(Response::new(text(format!("hello from {name}\n"))))
}

/// The checksum `/sum` computes.
pub fn checksum(data: &[u8], mut sum: u64) -> u64 {
    for b in data {
        sum = sum.wrapping_mul(31).wrapping_add(*b as u64);
    }
    sum
}

/// A body that streams `total` bytes of [`pattern`] in 64 KiB frames.
pub struct PatternBody {
    pub sent: u64,
    pub total: u64,
}

impl hyper::body::Body for PatternBody {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.sent >= self.total {
            return std::task::Poll::Ready(None);
        }
        let n = (self.total - self.sent).min(64 * 1024) as usize;
        let chunk = pattern(self.sent, n);
        self.sent += n as u64;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }
}

/// Starts a hyper backend named `name`; returns its address and counters.
pub async fn backend(name: &'static str) -> (SocketAddr, Arc<Counts>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { break };
            c.accepted.fetch_add(1, Ordering::Relaxed);
            let c = c.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| answer(name, c.clone(), req));
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc);
                let _ = conn.with_upgrades().await;
            });
        }
    });
    (addr, counts)
}

/// A backend that accepts connections and never answers (for timeouts); counts accepts.
pub async fn silent_backend() -> (SocketAddr, Arc<Counts>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((s, _)) = l.accept().await else { break };
            c.accepted.fetch_add(1, Ordering::Relaxed);
            held.push(s);
        }
    });
    (addr, counts)
}

/// A backend that answers garbage to anything (malformed response → 502).
pub async fn garbage_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                break;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"NOT HTTP AT ALL\r\n\r\n").await;
            });
        }
    });
    addr
}

/// Writes `req` on a new connection and reads everything until the server closes (bounded).
pub async fn raw(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    read_to_close(&mut s).await
}

/// Reads until EOF (or error), bounded by WAIT.
pub async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// An h2c (prior knowledge) client connection to `addr`, and the task driving it (it ends
/// `Ok` when the server closes with GOAWAY).
pub async fn h2c(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<TBody>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(s),
    )
    .await
    .unwrap();
    (send, tokio::spawn(conn))
}

/// An HTTP/1.1 client connection (hyper) to `addr`. Its connection task says how it ended
/// (in the test's output, shown when the test fails): a later `ready()` or `send_request`
/// that fails with `ChannelClosed` only says that the task is gone, not why.
pub async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<TBody> {
    let s = TcpStream::connect(addr).await.unwrap();
    let local = s.local_addr().unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(async move {
        let ended = conn.await;
        eprintln!("client connection {local} -> {addr} ended: {ended:?}");
    });
    send
}

/// Sends a request and returns status, headers and the whole body as text.
pub async fn exchange(
    send: &mut hyper::client::conn::http1::SendRequest<TBody>,
    req: Request<TBody>,
) -> (StatusCode, hyper::HeaderMap, String) {
    send.ready().await.unwrap();
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = tokio::time::timeout(WAIT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// A GET request with a Host header.
pub fn get(host: &str, path: &str) -> Request<TBody> {
    Request::builder()
        .uri(path)
        .header("host", host)
        .body(text(""))
        .unwrap()
}

/// A baton config with one HTTP listener `web` (default upstream `app`), extra listener lines
/// (indented for `listeners.web`), and upstream blocks.
pub fn config(listener_extra: &str, upstreams: &str) -> String {
    format!(
        "listeners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n{listener_extra}upstreams:\n{upstreams}"
    )
}

/// An upstream block.
pub fn upstream(name: &str, servers: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!("  {name}:\n    servers: [{}]\n{extra}", list.join(", "))
}

/// Reads one HTTP/1.1 response (status line, headers, Content-Length body); returns
/// (status, body).
pub async fn read_response(
    r: &mut tokio::io::BufReader<tokio::net::TcpStream>,
) -> std::io::Result<(u16, String)> {
    let mut line = String::new();
    if tokio::io::AsyncBufReadExt::read_line(r, &mut line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut len = 0usize;
    loop {
        line.clear();
        if tokio::io::AsyncBufReadExt::read_line(r, &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len];
    tokio::io::AsyncReadExt::read_exact(r, &mut body).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// An in-process listener: the proxy's accept loop running in the test's own runtime, so a
/// test can drive the registry as the lifecycle does.
pub struct Setup {
    pub ctx: Arc<baton::proxy::ListenerCtx>,
    pub registry: Arc<baton::registry::Registry>,
    pub parked: baton::registry::ParkedRx,
    pub addr: std::net::SocketAddr,
}

/// An in-process `web` listener with `http` settings `http_extra` (indented for `http:`).
pub async fn setup(http_extra: &str) -> Setup {
    let (app, _) = backend("app").await;
    let listener_extra = if http_extra.is_empty() {
        String::new()
    } else {
        format!("    http:\n{http_extra}")
    };
    let yaml = config(&listener_extra, &upstream("app", &[app], ""));
    let cfg =
        baton::config::Config::parse(std::path::Path::new("/tmp/config.yaml"), &yaml).unwrap();
    let (registry, parked) = baton::registry::Registry::new();
    let ctx = baton::proxy::ListenerCtx::new(
        cfg.listeners["web"].clone(),
        baton::upstream::build(&cfg),
        registry.clone(),
        Arc::new(baton::metrics::Metrics::default()),
    );
    let l = baton::listener::Acceptor::new(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(baton::proxy::serve(
        l,
        ctx.clone(),
        tokio_util::sync::CancellationToken::new(),
    ));
    Setup {
        ctx,
        registry,
        parked,
        addr,
    }
}
