//! HTTP/1.1 requests in flight move with a live upgrade: a Server-Sent-Events stream, large
//! downloads and uploads (Content-Length and chunked) and a long poll continue on the same
//! client socket through the successor, byte for byte, while the old process exits.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The byte at `offset` of every large body.
fn pat(offset: u64) -> u8 {
    (offset.wrapping_mul(7).wrapping_add(3) % 251) as u8
}

/// A backend written on raw sockets, so its framing and pacing are exactly what the test says:
/// `/sse` (an event every 50 ms, chunked, forever), `/download/N` (N bytes, Content-Length,
/// ~25 MB/s), `/upload` (reads a Content-Length or chunked body, checks its pattern, answers
/// `ok N`), `/poll/S` (answers after S seconds).
async fn backend() -> SocketAddr {
    counted_backend().await.0
}

/// [`backend`], with the number of connections it accepted.
async fn counted_backend() -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(serve(s));
        }
    });
    (addr, accepted)
}

async fn serve(s: TcpStream) {
    let mut r = BufReader::new(s);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let end = line == b"\r\n";
            head.extend_from_slice(&line);
            if end {
                break;
            }
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        if path == "/sse" {
            let w = r.get_mut();
            let _ = w
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            for i in 0u64.. {
                let ev = format!("data: {i}\n\n");
                let chunk = format!("{:x}\r\n{ev}\r\n", ev.len());
                if w.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else if let Some(n) = path.strip_prefix("/download/") {
            let n: u64 = n.parse().unwrap();
            let w = r.get_mut();
            let h = format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n");
            if w.write_all(h.as_bytes()).await.is_err() {
                return;
            }
            let mut off = 0u64;
            while off < n {
                let len = (n - off).min(256 * 1024);
                let buf: Vec<u8> = (off..off + len).map(pat).collect();
                if w.write_all(&buf).await.is_err() {
                    return;
                }
                off += len;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        } else if path == "/upload" {
            let (n, ok) = if head.contains("transfer-encoding: chunked") {
                read_chunked(&mut r).await
            } else {
                let len: u64 = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                read_exact_pattern(&mut r, len, 0).await
            };
            let body = format!("ok {n} {ok}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = r.get_mut().write_all(resp.as_bytes()).await;
        } else if let Some(secs) = path.strip_prefix("/poll/") {
            tokio::time::sleep(Duration::from_secs(secs.parse().unwrap())).await;
            let _ = r
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\npolled")
                .await;
        } else {
            let _ = r
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
        }
    }
}

/// Reads `len` body bytes starting at pattern offset `off`: (bytes read, all matched).
async fn read_exact_pattern(r: &mut BufReader<TcpStream>, len: u64, off: u64) -> (u64, bool) {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut got, mut ok) = (0u64, true);
    while got < len {
        let want = ((len - got) as usize).min(buf.len());
        let n = r.read(&mut buf[..want]).await.unwrap();
        assert!(n > 0, "upload cut short at {got}");
        ok &= buf[..n]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pat(off + got + i as u64));
        got += n as u64;
    }
    (got, ok)
}

async fn read_chunked(r: &mut BufReader<TcpStream>) -> (u64, bool) {
    let (mut total, mut ok) = (0u64, true);
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        let size = u64::from_str_radix(line.trim(), 16).unwrap();
        if size == 0 {
            let mut end = String::new();
            r.read_line(&mut end).await.unwrap();
            return (total, ok);
        }
        let (n, good) = read_exact_pattern(r, size, total).await;
        total += n;
        ok &= good;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf).await.unwrap();
        assert_eq!(&crlf, b"\r\n");
    }
}

fn config(backend: SocketAddr) -> String {
    format!(
        "runtime:\n  drain_timeout: 30s\nlisteners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n    http:\n      request_timeout: 0\nupstreams:\n  app:\n    servers: [\"{backend}\"]\n    http:\n      response_timeout: 60s\n"
    )
}

/// Upgrades `n` times while `busy` says the transfer is still going; checks each old process
/// exits while it goes on.
async fn upgrades_while(b: &Baton, n: usize, progress: &AtomicU64, total: u64) -> Vec<String> {
    let mut outs = Vec::new();
    for round in 0..n {
        let before = progress.load(Ordering::Relaxed);
        assert!(before < total, "transfer ended before upgrade {round}");
        let old = b.serving_pid();
        let (ok, out) = upgrade_async(&b.config).await;
        assert!(ok, "upgrade {round}: {out}");
        assert!(
            wait_until(WAIT, || !alive(old)).await,
            "old process {old} still running after upgrade {round}"
        );
        // The transfer goes on through the successor before the next upgrade.
        assert!(
            wait_until(WAIT, || progress.load(Ordering::Relaxed) > before).await,
            "no progress after upgrade {round}"
        );
        outs.push(out);
    }
    outs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_stream_survives_ten_upgrades_every_event_once_in_order() {
    let be = backend().await;
    let b = Baton::start(&config(be));
    let mut s = TcpStream::connect(b.addr("web")).await.unwrap();
    s.write_all(b"GET /sse HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let events = Arc::new(AtomicU64::new(0));
    let seen = events.clone();
    let reader = tokio::spawn(async move {
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let mut next = 0u64;
        loop {
            let n = tokio::time::timeout(WAIT, s.read(&mut buf))
                .await
                .expect("stream stalled")
                .unwrap();
            assert!(n > 0, "stream closed after event {next}");
            raw.extend_from_slice(&buf[..n]);
            // Every `data: N` line, in order, exactly once.
            while let Some(at) = raw.windows(6).position(|w| w == b"data: ") {
                let Some(end) = raw[at..].iter().position(|&b| b == b'\n') else {
                    break;
                };
                let v: u64 = std::str::from_utf8(&raw[at + 6..at + end])
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(v, next, "event out of order or repeated");
                next += 1;
                seen.store(next, Ordering::Relaxed);
                raw.drain(..at + end);
            }
            if next >= 1_000_000 {
                return;
            }
        }
    });
    assert!(wait_until(WAIT, || events.load(Ordering::Relaxed) >= 3).await);
    upgrades_while(&b, 10, &events, u64::MAX).await;
    assert!(
        !reader.is_finished(),
        "the stream ended: {:?}",
        reader.await
    );
    reader.abort();
}

/// Reads a Content-Length response of the download pattern, counting progress.
async fn download(addr: SocketAddr, size: u64, progress: Arc<AtomicU64>) -> u64 {
    let mut s = BufReader::new(TcpStream::connect(addr).await.unwrap());
    s.get_mut()
        .write_all(format!("GET /download/{size} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = String::new();
    loop {
        let mut line = String::new();
        s.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains(&format!("content-length: {size}")), "{head}");
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < size {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("download stalled")
            .unwrap();
        assert!(n > 0, "download cut at {got} of {size}");
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, pat(got + i as u64), "wrong byte at {}", got + i as u64);
        }
        got += n as u64;
        progress.store(got, Ordering::Relaxed);
    }
    // The connection stays usable: keep-alive intact after the moves.
    s.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut tail = [0u8; 64];
    let n = tokio::time::timeout(WAIT, s.read(&mut tail))
        .await
        .unwrap()
        .unwrap();
    assert!(tail[..n].starts_with(b"HTTP/1.1 200"));
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_survives_five_upgrades_byte_for_byte() {
    let be = backend().await;
    let b = Baton::start(&config(be));
    let size = 200 * 1024 * 1024;
    let progress = Arc::new(AtomicU64::new(0));
    let dl = tokio::spawn(download(b.addr("web"), size, progress.clone()));
    assert!(wait_until(WAIT, || progress.load(Ordering::Relaxed) > 0).await);
    let outs = upgrades_while(&b, 5, &progress, size).await;
    for out in &outs {
        // The summary says what moved, by phase: this one connection, mid-response.
        assert!(
            out.contains("1 busy http (head 0, connect 0, exchange 1, flush 0)"),
            "{out}"
        );
    }
    assert_eq!(dl.await.unwrap(), size);
}

/// Sends a pattern body of `size` bytes (chunked or with Content-Length), paced so the upload
/// lasts several seconds; returns the backend's answer.
async fn upload(addr: SocketAddr, size: u64, chunked: bool, progress: Arc<AtomicU64>) -> String {
    let mut s = BufReader::new(TcpStream::connect(addr).await.unwrap());
    let framing = if chunked {
        "transfer-encoding: chunked".to_string()
    } else {
        format!("content-length: {size}")
    };
    s.get_mut()
        .write_all(format!("POST /upload HTTP/1.1\r\nHost: t\r\n{framing}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut off = 0u64;
    while off < size {
        let len = (size - off).min(256 * 1024);
        let data: Vec<u8> = (off..off + len).map(pat).collect();
        if chunked {
            s.get_mut()
                .write_all(format!("{len:x}\r\n").as_bytes())
                .await
                .unwrap();
        }
        s.get_mut().write_all(&data).await.unwrap();
        if chunked {
            s.get_mut().write_all(b"\r\n").await.unwrap();
        }
        off += len;
        progress.store(off, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if chunked {
        s.get_mut().write_all(b"0\r\n\r\n").await.unwrap();
    }
    let mut resp = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("no answer to the upload")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&resp));
        resp.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&resp);
        if text.contains(" true") || text.contains(" false") {
            return text.into_owned();
        }
    }
}

async fn upload_across_upgrades(chunked: bool) {
    let be = backend().await;
    let b = Baton::start(&config(be));
    let size = 200 * 1024 * 1024;
    let progress = Arc::new(AtomicU64::new(0));
    let up = tokio::spawn(upload(b.addr("web"), size, chunked, progress.clone()));
    assert!(wait_until(WAIT, || progress.load(Ordering::Relaxed) > 0).await);
    upgrades_while(&b, 5, &progress, size).await;
    let answer = up.await.unwrap();
    assert!(
        answer.ends_with(&format!("ok {size} true")),
        "the backend saw a different body: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_content_length_upload_survives_five_upgrades() {
    upload_across_upgrades(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_chunked_upload_survives_five_upgrades() {
    upload_across_upgrades(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_survives_upgrades_and_gets_its_answer() {
    let be = backend().await;
    let b = Baton::start(&config(be));
    let mut s = TcpStream::connect(b.addr("web")).await.unwrap();
    let local = s.local_addr().unwrap();
    s.write_all(b"GET /poll/6 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    for round in 0..3 {
        let old = b.serving_pid();
        let (ok, out) = upgrade_async(&b.config).await;
        assert!(ok, "upgrade {round}: {out}");
        assert!(wait_until(WAIT, || !alive(old)).await, "old process stayed");
    }
    let mut resp = Vec::new();
    let mut buf = [0u8; 256];
    while !resp.ends_with(b"polled") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("no answer to the long poll")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&resp));
        resp.extend_from_slice(&buf[..n]);
    }
    assert!(resp.starts_with(b"HTTP/1.1 200"));
    assert_eq!(s.local_addr().unwrap(), local);
}

/// One `Connection: close` request: its answer.
async fn get_close(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_upstream_connection_moves_to_the_successor() {
    let (be, accepted) = counted_backend().await;
    let b = Baton::start(&config(be));
    assert!(get_close(b.addr("web")).await.starts_with("HTTP/1.1 200"));
    assert_eq!(accepted.load(Ordering::Relaxed), 1);
    let old = b.serving_pid();
    let (ok, out) = upgrade_async(&b.config).await;
    assert!(ok && out.contains("1 pooled upstream"), "{out}");
    assert!(wait_until(WAIT, || !alive(old)).await);
    // The successor answers on the connection the old process pooled: no new upstream connect.
    for _ in 0..3 {
        assert!(get_close(b.addr("web")).await.starts_with("HTTP/1.1 200"));
    }
    assert_eq!(
        accepted.load(Ordering::Relaxed),
        1,
        "the warm pool was used"
    );
}
