//! The two bridges between HTTP/1.1 and h2c, with the real binary: an HTTP/1.1 client whose
//! route reaches an h2c upstream (bodies and trailers both ways; the keep-alive connection
//! parks idle and the successor serves its next request on the same socket), and an h2c client
//! whose route reaches an HTTP/1.1 upstream (chunked and Content-Length bodies, trailers both
//! ways, the upstream connection reused from the engine's pool).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
mod http_support;
use bytes::Bytes;
use common::*;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Upgrades `b` and waits until the old process is gone (its connections moved).
async fn upgrade_until_old_gone(b: &Baton, round: usize) {
    let old = b.serving_pid();
    let (ok, out) = upgrade_wait_async(&b.config).await;
    assert!(ok, "upgrade {round}: {out}");
    assert!(
        wait_until(WAIT, || !alive(old)).await,
        "upgrade {round}: old process {old} still alive"
    );
}

/// A body of the given data frames, then trailers if any.
struct Frames(VecDeque<Frame<Bytes>>);

impl Frames {
    /// Boxed as the test client's body type.
    fn boxed(self) -> http_support::TBody {
        BodyExt::map_err(self, |n: Infallible| match n {}).boxed()
    }

    fn new(data: &[&'static str], trailers: &[(&'static str, &'static str)]) -> Frames {
        let mut q: VecDeque<Frame<Bytes>> =
            data.iter().map(|d| Frame::data(Bytes::from(*d))).collect();
        if !trailers.is_empty() {
            let mut t = HeaderMap::new();
            for (k, v) in trailers {
                t.insert(*k, HeaderValue::from_static(v));
            }
            q.push_back(Frame::trailers(t));
        }
        Frames(q)
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// What an upstream saw of one request.
#[derive(Debug, Clone, Default)]
struct Seen {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An h2c upstream (hyper) that echoes each request's body and answers its trailers with
/// `x-got-<name>` trailers and `x-len` (the body's length).
async fn h2c_echo() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let headers = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                            .chain(std::iter::once((
                                ":authority".to_string(),
                                req.uri()
                                    .authority()
                                    .map(|a| a.to_string())
                                    .unwrap_or_default(),
                            )))
                            .collect();
                        let c = req.into_body().collect().await.unwrap();
                        let trailers: Vec<(String, String)> = c
                            .trailers()
                            .map(|t| {
                                t.iter()
                                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let body = c.to_bytes();
                        let mut out = HeaderMap::new();
                        for (k, v) in &trailers {
                            out.insert(
                                http::HeaderName::from_bytes(format!("x-got-{k}").as_bytes())
                                    .unwrap(),
                                HeaderValue::from_str(v).unwrap(),
                            );
                        }
                        out.insert("x-len", HeaderValue::from(body.len()));
                        log.lock().unwrap().push(Seen {
                            headers,
                            body: body.to_vec(),
                            trailers,
                        });
                        let mut frames = VecDeque::new();
                        frames.push_back(Frame::data(body));
                        frames.push_back(Frame::trailers(out));
                        Ok::<_, Infallible>(Response::new(Frames(frames)))
                    }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
            });
        }
    });
    (addr, seen)
}

/// Reads one HTTP/1.1 response with a chunked or Content-Length body: (status, headers,
/// body, trailer lines).
async fn read_h1(
    r: &mut BufReader<TcpStream>,
) -> (u16, Vec<(String, String)>, Vec<u8>, Vec<String>) {
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).await.unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
    }
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    let mut trailers = Vec::new();
    if get("transfer-encoding").as_deref() == Some("chunked") {
        loop {
            line.clear();
            r.read_line(&mut line).await.unwrap();
            let size = usize::from_str_radix(line.trim_end(), 16).unwrap();
            if size == 0 {
                loop {
                    line.clear();
                    r.read_line(&mut line).await.unwrap();
                    if line.trim_end().is_empty() {
                        break;
                    }
                    trailers.push(line.trim_end().to_ascii_lowercase());
                }
                break;
            }
            let mut chunk = vec![0u8; size + 2];
            r.read_exact(&mut chunk).await.unwrap();
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(n) = get("content-length") {
        body.resize(n.parse().unwrap(), 0);
        r.read_exact(&mut body).await.unwrap();
    }
    (status, headers, body, trailers)
}

fn h2c_config(app: SocketAddr) -> String {
    format!(
        "runtime:\n  drain_timeout: 10s\nlisteners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\nupstreams:\n  app:\n    servers: [\"{app}\"]\n    http:\n      protocol: h2c\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_client_to_h2c_upstream_with_trailers_parks_idle_across_upgrades() {
    let (app, seen) = h2c_echo().await;
    let b = Baton::start(&h2c_config(app));
    let mut r = BufReader::new(TcpStream::connect(b.addr("web")).await.unwrap());

    // A chunked upload with a trailer: the upstream gets the data and the trailer as HTTP/2,
    // the client gets the echo chunked, with the upstream's trailers.
    r.get_mut()
        .write_all(
            b"POST /up?q=1 HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\nTrailer: x-client\r\nTE: trailers\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-client: 7\r\n\r\n",
        )
        .await
        .unwrap();
    let (status, headers, body, trailers) = read_h1(&mut r).await;
    assert_eq!(status, 200);
    assert_eq!(body, b"hello world");
    assert!(
        trailers.contains(&"x-got-x-client: 7".to_string()),
        "{trailers:?}"
    );
    assert!(trailers.contains(&"x-len: 11".to_string()), "{trailers:?}");
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "via" && v.contains("1.1 baton")),
        "{headers:?}"
    );
    {
        let s = seen.lock().unwrap();
        let s = s.last().unwrap();
        assert_eq!(s.body, b"hello world");
        assert_eq!(s.trailers, vec![("x-client".to_string(), "7".to_string())]);
        assert_eq!(s.header(":authority"), Some("site.test"));
        assert_eq!(s.header("via"), Some("1.1 baton"));
        assert_eq!(s.header("x-forwarded-host"), Some("site.test"));
        assert!(s.header("transfer-encoding").is_none() && s.header("connection").is_none());
        // The client's `TE: trailers` reaches the HTTP/2 upstream (gRPC servers need it).
        assert_eq!(s.header("te"), Some("trailers"));
    }

    // A Content-Length upload on the same keep-alive connection.
    r.get_mut()
        .write_all(b"PUT /x HTTP/1.1\r\nHost: site.test\r\nContent-Length: 3\r\n\r\nabc")
        .await
        .unwrap();
    let (status, _, body, _) = read_h1(&mut r).await;
    assert_eq!((status, body.as_slice()), (200, &b"abc"[..]));

    // The connection is idle now: each upgrade hands it over, and the successor serves it.
    for round in 0..3 {
        upgrade_until_old_gone(&b, round).await;
        r.get_mut()
            .write_all(b"GET /after HTTP/1.1\r\nHost: site.test\r\n\r\n")
            .await
            .unwrap();
        let (status, _, body, trailers) = read_h1(&mut r).await;
        assert_eq!((status, body.len()), (200, 0), "upgrade {round}");
        assert!(trailers.contains(&"x-len: 0".to_string()), "{trailers:?}");
    }
    assert_eq!(seen.lock().unwrap().len(), 5);

    // An HTTP/1.0 client gets the body without chunked framing, then the connection closes.
    let out = http_support::raw(
        b.addr("web"),
        b"POST /old HTTP/1.0\r\nHost: site.test\r\nContent-Length: 2\r\n\r\nhi",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    assert!(out.ends_with("\r\n\r\nhi"), "{out}");
}

/// An HTTP/1.1 upstream on raw sockets: records every request's bytes and answers each with
/// a chunked echo of its body and a trailer; counts the connections it accepted.
async fn h1_raw_echo() -> (SocketAddr, Arc<Mutex<Vec<String>>>, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let conns = Arc::new(AtomicUsize::new(0));
    let (log, n) = (seen.clone(), conns.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            let log = log.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                loop {
                    // Head.
                    let mut raw = String::new();
                    let mut len = None;
                    let mut chunked = false;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        raw.push_str(&line);
                        let l = line.trim_end().to_ascii_lowercase();
                        if l.is_empty() {
                            break;
                        }
                        if let Some(v) = l.strip_prefix("content-length:") {
                            len = Some(v.trim().parse::<usize>().unwrap());
                        }
                        chunked |= l == "transfer-encoding: chunked";
                    }
                    // Body, kept as it came.
                    let mut data = Vec::new();
                    if chunked {
                        loop {
                            let mut line = String::new();
                            r.read_line(&mut line).await.unwrap();
                            raw.push_str(&line);
                            let size = usize::from_str_radix(line.trim_end(), 16).unwrap();
                            if size == 0 {
                                loop {
                                    let mut t = String::new();
                                    r.read_line(&mut t).await.unwrap();
                                    raw.push_str(&t);
                                    if t.trim_end().is_empty() {
                                        break;
                                    }
                                }
                                break;
                            }
                            let mut chunk = vec![0u8; size + 2];
                            r.read_exact(&mut chunk).await.unwrap();
                            raw.push_str(&String::from_utf8_lossy(&chunk));
                            data.extend_from_slice(&chunk[..size]);
                        }
                    } else if let Some(n) = len {
                        let mut body = vec![0u8; n];
                        r.read_exact(&mut body).await.unwrap();
                        raw.push_str(&String::from_utf8_lossy(&body));
                        data = body;
                    }
                    log.lock().unwrap().push(raw);
                    let mut resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\nConnection: keep-alive\r\n\r\n".to_vec();
                    if !data.is_empty() {
                        resp.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                        resp.extend_from_slice(&data);
                        resp.extend_from_slice(b"\r\n");
                    }
                    resp.extend_from_slice(
                        format!("0\r\nx-sum: {}\r\n\r\n", data.len()).as_bytes(),
                    );
                    if r.get_mut().write_all(&resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen, conns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_client_to_http1_upstream_with_bodies_and_trailers() {
    let (app, seen, conns) = h1_raw_echo().await;
    let b = Baton::start(&http_support::config(
        "",
        &http_support::upstream("app", &[app], ""),
    ));
    let (mut send, _conn) = http_support::h2c(b.addr("web")).await;

    // A streamed body with trailers: chunked upstream, trailers both ways.
    let req = Request::builder()
        .method("POST")
        .uri("http://site.test/up")
        .body(Frames::new(&["hello", " world"], &[("x-client", "7")]).boxed())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("connection").is_none());
    assert!(resp.headers().get("transfer-encoding").is_none());
    assert_eq!(resp.headers()["via"], "2.0 baton");
    let c = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    let trailers = c.trailers().cloned().expect("response trailers");
    assert_eq!(c.to_bytes(), "hello world");
    assert_eq!(trailers["x-sum"], "11");
    let raw = seen.lock().unwrap().last().unwrap().clone();
    assert!(raw.starts_with("POST /up HTTP/1.1\r\n"), "{raw}");
    let lower = raw.to_ascii_lowercase();
    for want in [
        "\r\nhost: site.test\r\n",
        "\r\ntransfer-encoding: chunked\r\n",
        "\r\nvia: 2.0 baton\r\n",
        "\r\nx-forwarded-for: 127.0.0.1\r\n",
        "\r\n0\r\nx-client: 7\r\n\r\n",
    ] {
        assert!(lower.contains(want), "upstream lacks {want:?}:\n{raw}");
    }
    assert!(lower.contains("hello") && lower.contains(" world"), "{raw}");

    // A body with a length goes with that length, on the pooled connection.
    let req = Request::builder()
        .method("PUT")
        .uri("http://site.test/len")
        .header("content-length", "3")
        .body(Frames::new(&["abc"], &[]).boxed())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let c = resp.into_body().collect().await.unwrap();
    assert_eq!(c.trailers().cloned().expect("trailers")["x-sum"], "3");
    assert_eq!(c.to_bytes(), "abc");
    let raw = seen.lock().unwrap().last().unwrap().to_ascii_lowercase();
    assert!(
        raw.contains("\r\ncontent-length: 3\r\n") && raw.ends_with("\r\n\r\nabc"),
        "{raw}"
    );
    assert!(!raw.contains("transfer-encoding"), "{raw}");

    // No body at all.
    let req = Request::builder()
        .uri("http://site.test/get")
        .body(Frames::new(&[], &[]).boxed())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let c = resp.into_body().collect().await.unwrap();
    assert_eq!(c.trailers().cloned().expect("trailers")["x-sum"], "0");
    let raw = seen.lock().unwrap().last().unwrap().to_ascii_lowercase();
    assert!(
        raw.starts_with("get /get http/1.1\r\n") && raw.ends_with("\r\n\r\n"),
        "{raw}"
    );
    assert!(
        !raw.contains("transfer-encoding") && !raw.contains("content-length"),
        "{raw}"
    );

    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "the upstream connection was not reused from the pool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_timeout_of_an_h2c_upstream_counts_from_the_end_of_the_upload() {
    let (app, seen) = h2c_echo().await;
    // The upstream answers once the body is whole; the upload takes 2.5 s, the upstream has
    // 1 s to answer. It used to count from the start of the request: 504 in the middle of it.
    let b = Baton::start(&(h2c_config(app) + "      response_timeout: 1s\n"));
    let mut r = BufReader::new(TcpStream::connect(b.addr("web")).await.unwrap());
    r.get_mut()
        .write_all(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        r.get_mut().write_all(b"x").await.unwrap();
    }
    let (status, _, body, _) = tokio::time::timeout(WAIT, read_h1(&mut r)).await.unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"xxxxxxxxxx"[..]));
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// One HTTPS keep-alive connection (python's http.client): on each `go` line from stdin, a
/// chunked upload then a Content-Length one; prints `ok PORT BODY1 BODY2` (or `error ...`).
const PY_HTTPS_UPLOADS: &str = r#"
import http.client, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
c = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=20)
c.connect()
for line in sys.stdin:
    try:
        c.request("POST", "/chunked", body=iter([b"hello", b" world"]), encode_chunked=True)
        r = c.getresponse()
        one = r.read()
        c.request("PUT", "/length", body=b"abc")
        r2 = c.getresponse()
        two = r2.read()
        print("ok", c.sock.getsockname()[1], r.status, one.decode(), r2.status, two.decode(), flush=True)
    except Exception as e:
        print("error", repr(e), flush=True)
"#;

/// A TLS listener whose route reaches an h2c upstream (a gRPC-style deployment: TLS ends at
/// baton, the service speaks cleartext HTTP/2): an h2 client (ALPN) and an HTTP/1.1 one both
/// reach it, bodies and `x-forwarded-proto: https` included, and the HTTP/1.1 keep-alive
/// connection moves across upgrades (same local port, no error). Such a listener used to be
/// refused by the config check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_clients_reach_an_h2c_upstream_and_keep_alive_moves_across_upgrades() {
    let (app, seen) = h2c_echo().await;
    let dir = tempfile::tempdir().unwrap();
    make_cert(
        dir.path(),
        "localhost",
        &["DNS:localhost", "IP:127.0.0.1"],
        30,
    );
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "runtime:\n  drain_timeout: 10s\nlisteners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n    tls:\n      certificates: [{{ cert: localhost.pem, key: localhost.key }}]\n      alpn: [h2, http/1.1]\nupstreams:\n  app:\n    servers: [\"{app}\"]\n    http:\n      protocol: h2c\n"
        ),
    )
    .unwrap();
    let b = Baton::start_in(dir, config);
    let port = b.addr("web").port();
    let ca = b.dir().join("localhost.pem");

    // HTTP/2 over TLS to the h2c upstream.
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--http2",
            "--data-binary",
            "h2 body",
        ])
        .args(["-w", "\nversion=%{http_version}", "--cacert"])
        .arg(&ca)
        .arg(format!("https://localhost:{port}/h2"))
        .output()
        .unwrap();
    let text = printed(&out);
    assert!(out.status.success(), "curl --http2: {text}");
    assert!(text.starts_with("h2 body\nversion=2"), "{text}");
    {
        let s = seen.lock().unwrap();
        let s = s.last().unwrap();
        assert_eq!(s.body, b"h2 body");
        assert_eq!(s.header("x-forwarded-proto"), Some("https"));
    }

    // HTTP/1.1 over TLS to the h2c upstream, on one connection across upgrades.
    let mut py = std::process::Command::new("python3")
        .args(["-c", PY_HTTPS_UPLOADS, &port.to_string()])
        .arg(&ca)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut stdin = py.stdin.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(py.stdout.take().unwrap()));
    let mut round_trip = move || {
        std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
        let line = lines.next().unwrap().unwrap();
        let f: Vec<String> = line.split(' ').map(String::from).collect();
        assert_eq!(f[0], "ok", "{line}");
        assert_eq!(f[2..], ["200", "hello", "world", "200", "abc"], "{line}");
        f[1].clone()
    };
    let first = tokio::task::block_in_place(&mut round_trip);
    {
        let s = seen.lock().unwrap();
        let n = s.len();
        assert_eq!(s[n - 2].body, b"hello world");
        assert_eq!(s[n - 2].header("x-forwarded-proto"), Some("https"));
        assert_eq!(s[n - 1].body, b"abc");
    }
    for round in 0..3 {
        upgrade_until_old_gone(&b, round).await;
        let port_now = tokio::task::block_in_place(&mut round_trip);
        assert_eq!(
            port_now, first,
            "upgrade {round}: the connection was replaced"
        );
    }
    assert_eq!(seen.lock().unwrap().len(), 1 + 2 * 4);
    drop(round_trip);
    let _ = py.wait();
}
