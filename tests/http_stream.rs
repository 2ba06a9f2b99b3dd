//! Large bodies stream through baton in both directions with bounded memory, and a slow reader
//! does not make baton buffer a response.
#![allow(clippy::unwrap_used)]
mod common;
mod http_support;
use common::Baton;
use http_body_util::BodyExt;
use http_support::*;
use hyper::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SIZE: u64 = 100 * 1024 * 1024;

/// A field of /proc/PID/status in kB.
fn status_kb(pid: i32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_up_and_down_with_bounded_memory() {
    let (app, _) = backend("app").await;
    let b = Baton::start(&config("", &upstream("app", &[app], "")));
    let mut c = h1(b.addr("web")).await;

    let body = PatternBody {
        sent: 0,
        total: SIZE,
    }
    .boxed();
    let req = Request::builder()
        .method("POST")
        .uri("/sum")
        .header("host", "x")
        .header("content-length", SIZE.to_string())
        .body(body)
        .unwrap();
    let (status, _, got) = exchange(&mut c, req).await;
    assert_eq!(status, StatusCode::OK);
    let mut want = 0u64;
    let mut off = 0u64;
    while off < SIZE {
        let n = (SIZE - off).min(64 * 1024) as usize;
        want = checksum(&pattern(off, n), want);
        off += n as u64;
    }
    assert_eq!(got, format!("{SIZE} {want}"));

    c.ready().await.unwrap();
    let resp = c
        .send_request(get("x", &format!("/download/{SIZE}")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let (mut len, mut sum) = (0u64, 0u64);
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            sum = checksum(&d, sum);
            len += d.len() as u64;
        }
    }
    assert_eq!((len, sum), (SIZE, want));
    let hwm = status_kb(b.pid(), "VmHWM:");
    eprintln!("baton VmHWM after 2 x 100 MB: {hwm} kB");
    assert!(hwm < 60 * 1024, "baton peak RSS {hwm} kB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_does_not_grow_memory() {
    let (app, _) = backend("app").await;
    let b = Baton::start(&config("", &upstream("app", &[app], "")));
    let mut s = TcpStream::connect(b.addr("web")).await.unwrap();
    s.write_all(format!("GET /download/{} HTTP/1.1\r\nHost: x\r\n\r\n", 4 * SIZE).as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0usize;
    while read < 1024 * 1024 {
        read += tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
    }
    let start = status_kb(b.pid(), "VmRSS:");
    // Stop reading while the backend could send 400 MB; baton must hold back, not buffer.
    for _ in 0..20 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let rss = status_kb(b.pid(), "VmRSS:");
        assert!(
            rss < start + 20 * 1024 && rss < 60 * 1024,
            "RSS grew from {start} kB to {rss} kB"
        );
    }
    let hwm = status_kb(b.pid(), "VmHWM:");
    eprintln!("slow reader: baton RSS at start {start} kB, peak {hwm} kB");
    assert!(hwm < 60 * 1024);
}
