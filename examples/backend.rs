//! A small demo and test backend on hyper.
//!
//! `cargo run --example backend -- --listen 127.0.0.1:9101 --name a` answers every request
//! with `200 hello from a`, echoes request bodies on POST and PUT (streamed), and answers an
//! `Upgrade` request with 101 and then echoes raw bytes (enough for a WebSocket-style check).
//! With `--echo ADDR` it also runs a raw TCP echo server there (a target for L4 tunnels).

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, hyper::Error>;

fn text(s: String) -> Body {
    Full::new(Bytes::from(s)).map_err(|n| match n {}).boxed()
}

async fn answer(
    name: &'static str,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if req.headers().contains_key(hyper::header::UPGRADE) {
        let proto = req.headers()[hyper::header::UPGRADE].clone();
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
        let mut r = Response::new(text(String::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert(hyper::header::UPGRADE, proto);
        r.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        return Ok(r);
    }
    if matches!(*req.method(), Method::POST | Method::PUT) {
        return Ok(Response::new(req.into_body().boxed()));
    }
    Ok(Response::new(text(format!("hello from {name}\n"))))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen = "127.0.0.1:9101".to_string();
    let mut name = "a".to_string();
    let mut echo: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?,
            "--name" => name = args.next().ok_or("--name needs a value")?,
            "--echo" => echo = Some(args.next().ok_or("--echo needs an address")?),
            other => {
                return Err(format!(
                    "unknown argument {other:?} (use --listen ADDR --name NAME [--echo ADDR])"
                )
                .into())
            }
        }
    }
    let name: &'static str = Box::leak(name.into_boxed_str());
    if let Some(addr) = echo {
        let l = TcpListener::bind(&addr).await?;
        eprintln!("backend {name} echoing on {}", l.local_addr()?);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    }
    let listener = TcpListener::bind(&listen).await?;
    eprintln!("backend {name} listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| answer(name, req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            let _ = conn.with_upgrades().await;
        });
    }
}
