//! Support for the conformance tests: a raw-socket backend that records the exact bytes each
//! of its connections received and answers with canned bytes, and a raw client that reads
//! responses by their framing. Both parse with `httparse` and their own small chunked reader,
//! independently of baton's engine.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous bound for conditions on a noisy 2-core machine.
pub const WAIT: Duration = Duration::from_secs(20);

/// One request as the backend received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Got {
    /// Which connection (0 = the first one accepted).
    pub conn: usize,
    /// The head's lines (request line first), without CRLFs and without the final empty line.
    pub head: Vec<String>,
    /// The body's bytes exactly as framed on the wire (chunk sizes and trailers included).
    pub body: Vec<u8>,
}

impl Got {
    /// The request line.
    pub fn line(&self) -> &str {
        &self.head[0]
    }

    /// The value of the one header `name` (case-insensitive), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        let all: Vec<&str> = self.headers(name);
        assert!(
            all.len() <= 1,
            "{name} sent {} times: {:?}",
            all.len(),
            self.head
        );
        all.first().copied()
    }

    /// Every value of header `name`.
    pub fn headers(&self, name: &str) -> Vec<&str> {
        values(&self.head, name)
    }

    /// The head lines without `traceparent` (random per request).
    pub fn stable_head(&self) -> Vec<String> {
        self.head
            .iter()
            .filter(|l| !l.to_ascii_lowercase().starts_with("traceparent:"))
            .cloned()
            .collect()
    }
}

/// Every value of header `name` in a head's lines (the first line is the start line).
fn values<'a>(head: &'a [String], name: &str) -> Vec<&'a str> {
    head[1..]
        .iter()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

/// What the backend answers to one request, chosen by [`Reply`].
pub struct Canned {
    /// Raw response bytes.
    pub bytes: Vec<u8>,
    /// Close the connection after writing them.
    pub close: bool,
}

/// Chooses the answer by the request.
pub type Reply = fn(&Got) -> Canned;

/// `200 OK` with a two-byte body.
pub fn ok(_: &Got) -> Canned {
    Canned {
        bytes: b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        close: false,
    }
}

/// What the backend saw.
#[derive(Default)]
pub struct Capture {
    /// Every complete request, in arrival order.
    pub reqs: Mutex<Vec<Got>>,
    /// Every byte each connection received (index = accept order).
    pub raw: Mutex<Vec<Vec<u8>>>,
    /// Connections accepted.
    pub accepted: AtomicUsize,
    /// Connections that the proxy closed (EOF or reset seen).
    pub closed: AtomicUsize,
}

impl Capture {
    /// Requests received so far.
    pub fn reqs(&self) -> Vec<Got> {
        self.reqs.lock().unwrap().clone()
    }

    /// Forgets what was received (between table rows).
    pub fn clear(&self) {
        self.reqs.lock().unwrap().clear();
    }

    /// The one request received since the last [`Capture::clear`].
    pub fn one(&self) -> Got {
        let r = self.reqs();
        assert_eq!(r.len(), 1, "upstream requests: {r:?}");
        r[0].clone()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Where one message's body ends in `buf` (which starts with the body): `None` if not yet.
fn body_end(buf: &[u8], chunked: bool, len: usize) -> Option<usize> {
    if !chunked {
        return (buf.len() >= len).then_some(len);
    }
    let mut i = 0;
    loop {
        let line_end = i + buf[i..].windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&buf[i..line_end]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        i = line_end + 2;
        if size == 0 {
            // Trailer lines up to the empty line.
            loop {
                let e = i + buf[i..].windows(2).position(|w| w == b"\r\n")?;
                let empty = e == i;
                i = e + 2;
                if empty {
                    return Some(i);
                }
            }
        }
        if buf.len() < i + size + 2 {
            return None;
        }
        i += size + 2;
    }
}

/// A parsed head at the front of `buf`: (lines, head length, chunked, content length,
/// expects 100-continue).
fn parse_head(buf: &[u8]) -> Option<(Vec<String>, usize, bool, usize, bool)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&buf[..end - 4]).into_owned();
    let lines: Vec<String> = text.split("\r\n").map(str::to_string).collect();
    let mut chunked = false;
    let mut len = 0;
    let mut expect = false;
    for l in &lines[1..] {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
        match k.as_str() {
            "transfer-encoding" => chunked = v.ends_with("chunked"),
            "content-length" => len = v.split(',').next().unwrap().trim().parse().unwrap_or(0),
            "expect" => expect = v == "100-continue",
            _ => {}
        }
    }
    Some((lines, end, chunked, len, expect))
}

/// Starts a capturing backend that answers each complete request with `reply` (and `100
/// Continue` first when the request expects it). Runs until the test's runtime ends.
pub async fn backend(reply: Reply) -> (SocketAddr, Arc<Capture>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cap = Arc::new(Capture::default());
    let c = cap.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { break };
            let id = c.accepted.fetch_add(1, Ordering::SeqCst);
            c.raw.lock().unwrap().push(Vec::new());
            tokio::spawn(serve(s, id, c.clone(), reply));
        }
    });
    (addr, cap)
}

async fn serve(mut s: TcpStream, id: usize, cap: Arc<Capture>, reply: Reply) {
    let mut buf = Vec::new();
    let mut continued = false;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // Serve every complete request buffered.
        while let Some((head, head_len, chunked, len, expect)) = parse_head(&buf) {
            let Some(n) = body_end(&buf[head_len..], chunked, len) else {
                if expect && !continued {
                    continued = true;
                    if s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
                        return;
                    }
                }
                break;
            };
            continued = false;
            let got = Got {
                conn: id,
                head,
                body: buf[head_len..head_len + n].to_vec(),
            };
            buf.drain(..head_len + n);
            let answer = reply(&got);
            cap.reqs.lock().unwrap().push(got);
            if s.write_all(&answer.bytes).await.is_err() {
                cap.closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if answer.close {
                let _ = s.shutdown().await;
                // Wait for the proxy to close its side too (counts as closed).
                let _ = s.read_to_end(&mut Vec::new()).await;
                cap.closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                cap.closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                cap.raw.lock().unwrap()[id].extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// A response as a client read it.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    /// The status line and header lines, without CRLFs.
    pub head: Vec<String>,
    /// The body as framed on the wire (chunks and trailers included).
    pub body: Vec<u8>,
}

impl Resp {
    /// Every value of header `name`.
    pub fn headers(&self, name: &str) -> Vec<&str> {
        values(&self.head, name)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers(name).first().copied()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw client connection with its read-ahead buffer.
pub struct Client {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Client {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// Reads more; `false` at EOF or error. Bounded by [`WAIT`].
    async fn fill(&mut self) -> bool {
        let mut chunk = vec![0u8; 64 * 1024];
        match tokio::time::timeout(WAIT, self.s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Ok(_) => false,
            Err(_) => panic!(
                "no answer within {WAIT:?}; buffered: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Reads one response (interim ones included: each is returned by itself). `head` says
    /// the request was HEAD. `None` if the connection closed before a whole head.
    pub async fn response(&mut self, head: bool) -> Option<Resp> {
        let (lines, head_len) = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                break (
                    text.split("\r\n").map(str::to_string).collect::<Vec<_>>(),
                    end + 4,
                );
            }
            if !self.fill().await {
                return None;
            }
        };
        self.buf.drain(..head_len);
        let status: u16 = lines[0].split(' ').nth(1)?.parse().ok()?;
        let mut r = Resp {
            status,
            head: lines,
            body: Vec::new(),
        };
        let bodyless = head || (100..200).contains(&status) || status == 204 || status == 304;
        if bodyless {
            return Some(r);
        }
        let chunked = r
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().ends_with("chunked"));
        let len: Option<usize> = r.header("content-length").and_then(|v| v.parse().ok());
        if !chunked && len.is_none() {
            while self.fill().await {}
            r.body = std::mem::take(&mut self.buf);
            return Some(r);
        }
        loop {
            if let Some(n) = body_end(&self.buf, chunked, len.unwrap_or(0)) {
                r.body = self.buf.drain(..n).collect();
                return Some(r);
            }
            if !self.fill().await {
                // Cut short: what came is the body, so the test can see it.
                r.body = std::mem::take(&mut self.buf);
                r.status = 0;
                return Some(r);
            }
        }
    }

    /// Waits until the server closes the connection; returns the bytes that came first.
    pub async fn until_closed(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }
}

/// Sends `req` on a new connection and reads one response (not HEAD).
pub async fn send_one(addr: SocketAddr, req: &[u8]) -> Resp {
    let mut c = Client::connect(addr).await;
    c.send(req).await;
    c.response(false)
        .await
        .unwrap_or_else(|| panic!("no response to {:?}", String::from_utf8_lossy(req)))
}

/// Decodes a chunked body read as framed (for checks of its data).
pub fn dechunk(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(p) = body[i..].windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&body[i..i + p]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        i += p + 2;
        if size == 0 {
            break;
        }
        out.extend_from_slice(&body[i..i + size]);
        i += size + 2;
    }
    out
}

// Shared by the conformance test files.

/// A config with one HTTP listener `web` (extra listener lines, indented for `listeners.web`),
/// default upstream `app`, and one single-server upstream per `(name, addr)`.
pub fn conf(listener_extra: &str, ups: &[(&str, SocketAddr)]) -> String {
    let mut y = format!(
        "listeners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n{listener_extra}upstreams:\n"
    );
    for (name, addr) in ups {
        y.push_str(&format!(
            "  {name}:\n    servers: [\"{addr}\"]\n    retries: 0\n"
        ));
    }
    y
}

/// The head lines baton adds after the client's own headers for a request from 127.0.0.1
/// (`traceparent` left out: it is random).
pub fn tail(host: &str) -> Vec<String> {
    vec![
        "x-forwarded-for: 127.0.0.1".into(),
        "x-forwarded-proto: http".into(),
        format!("x-forwarded-host: {host}"),
        "via: 1.1 baton".into(),
    ]
}

pub fn lines(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Sends each row on its own connection and checks the status (and, for refusals, that
/// nothing reached the upstream and the connection closed).
pub async fn status_rows(addr: SocketAddr, cap: &Capture, rows: &[(&str, &[u8], u16)]) {
    for (name, req, want) in rows {
        cap.clear();
        let mut c = Client::connect(addr).await;
        c.send(req).await;
        let r = c
            .response(false)
            .await
            .unwrap_or_else(|| panic!("{name}: no response"));
        assert_eq!(r.status, *want, "{name}: {:?} → {:?}", show(req), r.head);
        if *want >= 400 {
            assert!(
                r.header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close")),
                "{name}: refusal must close: {:?}",
                r.head
            );
            assert!(
                c.until_closed().await.is_empty(),
                "{name}: bytes after refusal"
            );
            assert!(cap.reqs().is_empty(), "{name}: refused request forwarded");
        }
    }
}

/// The scripted backend: the path chooses the answer.
pub fn scripted(g: &Got) -> Canned {
    let mut parts = g.line().split(' ');
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("/");
    let asked_upgrade = g.header("upgrade").is_some();
    let (bytes, close): (&[u8], bool) = match path {
        "/cl-te" => (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false),
        "/bad-cl" => (b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nabc", false),
        "/two-cl" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc", false),
        "/bad-chunk" => (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", false),
        "/head" => (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false),
        "/204" => (b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", false),
        "/204-body" => (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello", false),
        "/304" => (b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 5\r\n\r\n", false),
        "/103" => (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
        "/trailers" => (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 42\r\n\r\n", false),
        "/http10-close" => (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nold server", true),
        "/http10-cl" => (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", true),
        "/http10-keep" => (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok", false),
        "/close-cl" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", true),
        "/ws" if asked_upgrade => (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", false),
        "/unasked-101" => (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", false),
        "/te-identity" => (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 3\r\n\r\nuntil close", true),
        "/status-999" => (b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\nok", false),
        "/status-099" => (b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok", false),
        "/te-gzip" => (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8bzipped", true),
        "/te-chunked-gzip" => (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n", true),
        "/hop" => (b"HTTP/1.1 200 OK\r\nConnection: X-Secret, close\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: 1\r\nContent-Length: 2\r\n\r\nok", false),
        "/bad-trailer" => (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX Y: z\r\n\r\n", false),
        "/cl-trailer" => (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n", false),
        p if p.starts_with("/big-head/") => {
            // A head with one header of the given size (bytes).
            let n: usize = p["/big-head/".len()..].parse().unwrap_or(0);
            return Canned {
                bytes: format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\nok", "b".repeat(n)).into_bytes(),
                close: false,
            };
        }
        _ if method == "HEAD" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", false),
        p if p.starts_with("/echo/") => {
            return Canned {
                bytes: format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{p}", p.len()).into_bytes(),
                close: false,
            }
        }
        _ => return ok(g),
    };
    Canned {
        bytes: bytes.to_vec(),
        close,
    }
}
