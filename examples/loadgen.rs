//! A small, bounded load generator for the demo and the upgrade-under-load script: HTTP/1.1
//! keep-alive (or one connection per request) clients plus long-lived TCP tunnels that send
//! numbered lines and check their echo. Prints one summary line and exits non-zero on any
//! error, so a script can tell whether a client noticed anything.
//!
//! Usage: loadgen [--http ADDR] [--conns N] [--close] [--tunnels ADDR] [--tunnel-conns N] [--seconds S]
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    non2xx: AtomicU64,
    errors: AtomicU64,
    tunnel_msgs: AtomicU64,
    tunnel_errors: AtomicU64,
}

async fn one_request(r: &mut BufReader<TcpStream>, close: bool) -> std::io::Result<u16> {
    let req = if close {
        "GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
    } else {
        "GET / HTTP/1.1\r\nHost: demo\r\n\r\n"
    };
    r.get_mut().write_all(req.as_bytes()).await?;
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
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
    r.read_exact(&mut body).await?;
    Ok(status)
}

async fn http_client(addr: SocketAddr, close: bool, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    conn = Some(BufReader::new(s));
                }
                Err(e) => {
                    eprintln!("connect error: {e}");
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(r) = conn.as_mut() else { continue };
        match one_request(r, close).await {
            Ok(s) if (200..300).contains(&s) => {
                stats.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(s) => {
                eprintln!("status {s}");
                stats.non2xx.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("request error: {e}");
                stats.errors.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
        if close {
            conn = None;
        }
    }
}

async fn tunnel_client(addr: SocketAddr, id: usize, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        stats.tunnel_errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let line = format!("tunnel {id} seq {n}\n");
        let mut back = vec![0u8; line.len()];
        let res = async {
            s.write_all(line.as_bytes()).await?;
            s.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(10), res).await {
            Ok(Ok(())) if back == line.as_bytes() => {
                stats.tunnel_msgs.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                eprintln!(
                    "tunnel {id} seq {n}: broken ({:?})",
                    other.map(|r| r.map(|_| String::from_utf8_lossy(&back).to_string()))
                );
                stats.tunnel_errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() {
    let mut http: Option<SocketAddr> = None;
    let mut tunnels: Option<SocketAddr> = None;
    let (mut conns, mut tunnel_conns, mut seconds, mut close) = (16usize, 20usize, 10u64, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_default();
        match a.as_str() {
            "--http" => http = val().parse().ok(),
            "--tunnels" => tunnels = val().parse().ok(),
            "--conns" => conns = val().parse().unwrap_or(conns),
            "--tunnel-conns" => tunnel_conns = val().parse().unwrap_or(tunnel_conns),
            "--seconds" => seconds = val().parse().unwrap_or(seconds),
            "--close" => close = true,
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    if let Some(a) = http {
        for _ in 0..conns {
            tasks.push(tokio::spawn(http_client(
                a,
                close,
                stats.clone(),
                stop.clone(),
            )));
        }
    }
    if let Some(a) = tunnels {
        for i in 0..tunnel_conns {
            tasks.push(tokio::spawn(tunnel_client(
                a,
                i,
                stats.clone(),
                stop.clone(),
            )));
        }
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let ok = stats.ok.load(Ordering::Relaxed);
    let (non2xx, errors) = (
        stats.non2xx.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
    );
    let (tm, te) = (
        stats.tunnel_msgs.load(Ordering::Relaxed),
        stats.tunnel_errors.load(Ordering::Relaxed),
    );
    println!(
        "requests ok {ok} ({:.0}/s), non-2xx {non2xx}, errors {errors}; tunnels {tunnel_conns_used} with {tm} echoes checked, broken {te}",
        ok as f64 / secs,
        tunnel_conns_used = if tunnels.is_some() { tunnel_conns } else { 0 },
    );
    if non2xx + errors + te > 0 {
        std::process::exit(1);
    }
}
