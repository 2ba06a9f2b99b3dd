//! An h2c client's request to an HTTP/1.1 upstream, on the engine's raw connections: the
//! request becomes HTTP/1.1 bytes and goes through the engine's parser and rewriter
//! (`head::parse_request`: the same header rules as for an HTTP/1.1 client, `Via: 2.0 baton`),
//! is written on a connection from the engine's pool (`h1::pool::RawPool`), and the response is
//! read with the engine's parser (`head::parse_response`) and framing. One task per exchange
//! writes the request body (chunked, trailers included, unless it has a length) and reads the
//! response, handing its body to hyper as frames (data, then trailers). The connection goes
//! back to the pool when both messages ended cleanly.
//!
//! Retries as for the engine: a connect failure tries another server (any method); a pooled
//! connection that fails before any response byte with nothing of the body taken is replaced by
//! a new one to the same server; an idempotent request with nothing of its body taken may go
//! to another server, up to `retries`.

use super::body::{BoxError, Release, ResBody};
use super::bridge::{self, ChanBody, FrameTx, Unframe};
use super::errors::ProxyError;
use super::framing::{Framing, LAST_CHUNK};
use super::head::{self, ReqOpts, RespOpts};
use crate::proxy::client_io::ClientIo;
use crate::proxy::http::h1::pool::PoolKey;
use crate::proxy::ListenerCtx;
use crate::upstream::Upstream;
use bytes::BytesMut;
use http::{request, Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Frames waiting between the exchange task and hyper.
const DEPTH: usize = 4;

/// What the exchange task reports once the response head is in (or the attempt failed).
type HeadResult = Result<http::response::Parts, Failed>;

/// An attempt that failed before a response head.
struct Failed {
    reason: String,
    /// The request body, if nothing of it was taken (so another attempt can send it).
    body: Option<Option<Incoming>>,
    /// Some response byte arrived.
    answered: bool,
    /// The client paused its body longer than `body_timeout`: a 408, never a retry.
    body_timeout: bool,
}

/// The request as HTTP/1.1 bytes for the engine's parser: request line, `Host` (or
/// `:authority`), the headers, and `Transfer-Encoding: chunked` for a body of unknown length.
fn h1_bytes(parts: &request::Parts, body: &Incoming) -> Vec<u8> {
    let mut raw = Vec::with_capacity(256);
    raw.extend_from_slice(parts.method.as_str().as_bytes());
    raw.push(b' ');
    raw.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    raw.extend_from_slice(b" HTTP/1.1\r\n");
    // A Host header equals `:authority` but for case (the service checked): kept as sent.
    let host = parts
        .headers
        .get(http::header::HOST)
        .map(|h| h.as_bytes())
        .or_else(|| parts.uri.authority().map(|a| a.as_str().as_bytes()));
    if let Some(h) = host {
        raw.extend_from_slice(b"host: ");
        raw.extend_from_slice(h);
        raw.extend_from_slice(b"\r\n");
    }
    bridge::write_request_lines(&mut raw, &parts.headers);
    if !parts.headers.contains_key(http::header::CONTENT_LENGTH) && !body.is_end_stream() {
        raw.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    raw.extend_from_slice(b"\r\n");
    raw
}

/// Sends an h2c client's request to an HTTP/1.1 upstream; the response's body streams from
/// the upstream connection. `Release` keeps the server counted as active until it ends.
pub async fn send(
    ctx: &Arc<ListenerCtx>,
    upstream: &Arc<Upstream>,
    client: SocketAddr,
    parts: request::Parts,
    body: Incoming,
    deadline: Option<Instant>,
) -> Result<(Response<ResBody>, SocketAddr, Release), ProxyError> {
    let cfg = upstream.config();
    let http = &ctx.cfg.http;
    let raw = h1_bytes(&parts, &body);
    let client_ip = super::head::ip_text(client.ip());
    let opts = ReqOpts {
        client_ip: &client_ip,
        // hyper bounded the header list already; the rewrite adds forwarding headers.
        max_header_bytes: usize::MAX,
        max_uri_bytes: http.max_uri_bytes,
        upgrades: &[],
        max_body_bytes: http.max_body_bytes,
        via: "2.0 baton",
        // h2 clients of a TLS listener came over TLS (ALPN h2); h2c ones over plain TCP.
        https: ctx.cfg.tls.is_some(),
    };
    let req = match head::parse_request(&raw, &opts) {
        Ok(Some(r)) => r,
        Ok(None) => return Err(ProxyError::BadRequest("incomplete request head")),
        Err(e) if e.status == 413 => {
            return Err(ProxyError::BodyTooLarge(http.max_body_bytes.unwrap_or(0)))
        }
        Err(e) => return Err(ProxyError::BadRequest(e.reason)),
    };
    let head_request = parts.method == Method::HEAD;
    let idempotent = super::forward::idempotent(&parts.method);
    let until = |limit: Option<std::time::Duration>| {
        let step = limit.map(|d| Instant::now() + d);
        match (step, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    };
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut body = Some(Some(body).filter(|b| !b.is_end_stream()));
    let mut fresh_only = false;
    loop {
        let Some(this_body) = body.take() else {
            return Err(ProxyError::NoServer(cfg.name.clone()));
        };
        let Some(guard) = upstream.pick(client.ip(), &tried) else {
            return Err(ProxyError::NoServer(cfg.name.clone()));
        };
        let addr = guard.addr();
        let key = PoolKey {
            addr,
            tls: upstream.tls_key(),
        };
        let pooled = if std::mem::take(&mut fresh_only) {
            None
        } else {
            ctx.h1_pool.checkout(&key)
        };
        let reused = pooled.is_some();
        let stream = match pooled {
            Some(s) => s,
            None => {
                let at = until(Some(cfg.connect_timeout));
                // The TLS handshake, if any, is part of the connect and of its timeout.
                let conn = async {
                    let s = TcpStream::connect(addr).await?;
                    let _ = s.set_nodelay(true);
                    if !upstream.is_tls() {
                        return Ok(ClientIo::from(s));
                    }
                    match upstream.start_tls(s, guard.host()).await {
                        Ok(t) => Ok(ClientIo::upstream_tls(t)),
                        Err(e) => {
                            tracing::warn!(upstream = %cfg.name, server = %addr, error = %e, side = "upstream", "upstream tls handshake failed");
                            Err(std::io::Error::other(format!("tls handshake failed: {e}")))
                        }
                    }
                };
                let r = match at {
                    Some(at) => tokio::time::timeout_at(at, conn).await.ok(),
                    None => Some(conn.await),
                };
                match r {
                    Some(Ok(s)) => {
                        upstream.report(addr, true);
                        s
                    }
                    other => {
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            return Err(ProxyError::RequestTimeout);
                        }
                        upstream.report(addr, false);
                        tried.push(addr);
                        let reason = match other {
                            Some(Err(e)) => e.to_string(),
                            _ => "connect timed out".into(),
                        };
                        tracing::debug!(server = %addr, error = %reason, side = "upstream", "upstream connect failed");
                        if tried.len() as u32 > cfg.retries {
                            return Err(ProxyError::Upstream {
                                server: addr,
                                reason,
                            });
                        }
                        body = Some(this_body);
                        continue;
                    }
                }
            }
        };
        let host = (!http.preserve_host || req.host.is_none()).then(|| addr.to_string());
        let wire = head::assemble(
            &req.line,
            host.as_deref().or(req.host.as_deref()),
            &req.rest,
        );
        let (head_tx, mut head_rx) = oneshot::channel();
        let (frames_tx, frames) = ChanBody::channel(DEPTH);
        let took = Arc::new(Took::new());
        let x = Exchange {
            took: took.clone(),
            stream,
            wire,
            framing: req.framing,
            body: this_body,
            body_timeout: http.body_timeout,
            head_request,
            max_head: http.max_header_bytes.max(8192),
            pool: ctx.h1_pool.clone(),
            addr,
            key,
            max_idle: cfg.http.pool_idle_per_server,
        };
        tokio::spawn(x.run(head_tx, frames_tx));
        // As in the engine, `response_timeout` counts from the upstream's last taking of request
        // bytes: an upload longer than it is not cut while the upstream reads it.
        let waited = loop {
            let at = match (cfg.http.response_timeout, deadline) {
                (Some(t), Some(d)) => Some((took.last() + t).min(d)),
                (Some(t), None) => Some(took.last() + t),
                (None, d) => d,
            };
            let Some(at) = at else {
                break Some((&mut head_rx).await);
            };
            match tokio::time::timeout_at(at, &mut head_rx).await {
                Ok(r) => break Some(r),
                Err(_) => {
                    // The upstream took more of the body meanwhile: its time starts again.
                    let now = Instant::now();
                    let moved = cfg
                        .http
                        .response_timeout
                        .is_some_and(|t| took.last() + t > now);
                    if moved && deadline.is_none_or(|d| now < d) {
                        continue;
                    }
                    break None;
                }
            }
        };
        let failed = match waited {
            None => {
                return Err(if deadline.is_some_and(|d| Instant::now() >= d) {
                    ProxyError::RequestTimeout
                } else {
                    ProxyError::UpstreamTimeout(addr)
                })
            }
            Some(Ok(Ok(parts))) => {
                let resp = Response::from_parts(parts, frames.boxed_unsync());
                let release = Release { guard: Some(guard) };
                return Ok((resp, addr, release));
            }
            Some(Ok(Err(f))) => f,
            Some(Err(_)) => Failed {
                reason: "exchange ended".into(),
                body: None,
                answered: true,
                body_timeout: false,
            },
        };
        if failed.body_timeout {
            // The client's fault, not the server's: no health report, no retry.
            return Err(ProxyError::BodyTimeout);
        }
        tracing::debug!(server = %addr, error = %failed.reason, side = "upstream", "upstream request failed");
        let again = !failed.answered && failed.body.is_some();
        if again && reused {
            fresh_only = true;
            body = failed.body;
            continue;
        }
        upstream.report(addr, false);
        tried.push(addr);
        if again && idempotent && tried.len() as u32 <= cfg.retries {
            if let Some(m) = upstream.metrics() {
                m.retry();
            }
            body = failed.body;
            continue;
        }
        return Err(ProxyError::Upstream {
            server: addr,
            reason: failed.reason,
        });
    }
}

/// When the upstream last took bytes of the request (the attempt's start until a body write),
/// shared by the attempt's task and the wait for its response head.
struct Took {
    base: Instant,
    /// Nanoseconds after `base`.
    last_ns: AtomicU64,
}

impl Took {
    fn new() -> Took {
        Took {
            base: Instant::now(),
            last_ns: AtomicU64::new(0),
        }
    }

    fn last(&self) -> Instant {
        self.base + std::time::Duration::from_nanos(self.last_ns.load(Relaxed))
    }

    fn now(&self) {
        let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_ns.store(ns, Relaxed);
    }
}

/// One attempt on one upstream connection, run as its own task.
struct Exchange {
    /// When the upstream last took request bytes (for the response timeout).
    took: Arc<Took>,
    stream: ClientIo,
    /// The request head, as the upstream gets it.
    wire: BytesMut,
    /// The request body's framing (`Length` as the client announced it, or chunked).
    framing: Framing,
    body: Option<Incoming>,
    /// The longest pause allowed between two frames of the request body (`http.body_timeout`).
    body_timeout: Option<std::time::Duration>,
    head_request: bool,
    max_head: usize,
    pool: Arc<crate::proxy::http::h1::pool::RawPool>,
    addr: SocketAddr,
    key: PoolKey,
    max_idle: usize,
}

/// How the request side of an exchange went (atomics: the writer shares it with the reader
/// in one task, and the task must be `Send`).
#[derive(Default)]
struct Sent {
    /// A body frame was taken from the client (the body cannot be sent again).
    taken: AtomicBool,
    /// The whole request was written.
    done: AtomicBool,
    /// Writing stopped because the client paused its body longer than `body_timeout`.
    timed_out: AtomicBool,
}

/// Writes the head and then the body, frame by frame.
async fn write_request(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    wire: &[u8],
    body: &mut Option<Incoming>,
    (chunked, body_timeout): (bool, Option<std::time::Duration>),
    sent: &Sent,
    took: &Took,
) -> Result<(), BoxError> {
    w.write_all(wire).await?;
    if let Some(b) = body.as_mut() {
        let mut out = BytesMut::new();
        let mut trailers = false;
        loop {
            // As the engine's `body_timeout`: the pause between two reads of the client's
            // body (here its frames), not the whole upload.
            let next = match body_timeout {
                Some(t) => match tokio::time::timeout(t, b.frame()).await {
                    Ok(next) => next,
                    Err(_) => {
                        sent.timed_out.store(true, Relaxed);
                        return Err("request body timeout".into());
                    }
                },
                None => b.frame().await,
            };
            let Some(f) = next else { break };
            sent.taken.store(true, Relaxed);
            let f = f?;
            trailers |= f.is_trailers();
            bridge::put_frame(&mut out, f, chunked);
            w.write_all(&out).await?;
            took.now();
            out.clear();
        }
        if chunked && !trailers {
            w.write_all(LAST_CHUNK).await?;
        }
    }
    sent.done.store(true, Relaxed);
    Ok(())
}

impl Exchange {
    async fn run(mut self, head_tx: oneshot::Sender<HeadResult>, frames: FrameTx) {
        let chunked = matches!(self.framing, Framing::Chunked(_));
        let sent = Sent::default();
        let mut ubuf = BytesMut::with_capacity(16 * 1024);
        let reusable = {
            // One task reads and writes: the halves share the transport (plain or TLS).
            let (mut r, mut w) = tokio::io::split(&mut self.stream);
            let mut writer = Some(Box::pin(write_request(
                &mut w,
                &self.wire,
                &mut self.body,
                (chunked, self.body_timeout),
                &sent,
                &self.took,
            )));
            let mut writing = true;
            let mut head_tx = Some(head_tx);
            let mut answered = false;
            // The response head (interim 1xx heads are dropped: hyper's server cannot send them;
            // docs/http.md says why).
            let resp = 'head: loop {
                let (Some(tx), Some(wr)) = (head_tx.as_mut(), writer.as_mut()) else {
                    return;
                };
                tokio::select! {
                    w = wr, if writing => {
                        writing = false;
                        if let Err(e) = w {
                            if sent.timed_out.load(Relaxed) {
                                // 408 for the client; this upstream connection, with half a
                                // body sent, is closed.
                                if let Some(tx) = head_tx.take() {
                                    let _ = tx.send(Err(Failed { reason: e.to_string(), body: None, answered, body_timeout: true }));
                                }
                                return;
                            }
                            // Without a response yet, a write failure fails the attempt
                            // unless the upstream answers all the same (it read enough).
                            tracing::debug!(server = %self.addr, error = %e, "writing the request upstream failed");
                        }
                    }
                    _ = tx.closed() => return,
                    n = r.read_buf(&mut ubuf) => {
                        let fail = match n {
                            Ok(0) | Err(_) => Some(if answered {
                                "truncated response head"
                            } else {
                                "connection closed before a response"
                            }),
                            Ok(_) => None,
                        };
                        if let Some(reason) = fail {
                            // The writer (and its hold on the body) ends here.
                            drop(writer);
                            let body = (!sent.taken.load(Relaxed)).then(|| self.body.take());
                            if let Some(tx) = head_tx.take() {
                                let _ = tx.send(Err(Failed { reason: reason.into(), body, answered, body_timeout: false }));
                            }
                            return;
                        }
                        answered = true;
                        let opts = RespOpts {
                            head_request: self.head_request,
                            client_http10: false,
                            keep_alive: true,
                            upgrade: false,
                            via: "2.0 baton",
                        };
                        // Every head the buffer holds: interim ones are dropped (hyper's
                        // server cannot send them), and the final one may be right behind.
                        loop {
                            match head::parse_response(&ubuf, self.max_head, &opts) {
                                Ok(Some(resp)) => {
                                    let _ = ubuf.split_to(resp.head_len);
                                    if !resp.interim() {
                                        break 'head resp;
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    if let Some(tx) = head_tx.take() {
                                        let _ = tx.send(Err(Failed { reason: e.reason.into(), body: None, answered, body_timeout: false }));
                                    }
                                    return;
                                }
                            }
                        }
                    }
                }
            };
            let Some(parts) = response_parts(&resp.out) else {
                if let Some(tx) = head_tx.take() {
                    let _ = tx.send(Err(Failed {
                        reason: "response head not valid for HTTP/2".into(),
                        body: None,
                        answered: true,
                        body_timeout: false,
                    }));
                }
                return;
            };
            if let Some(tx) = head_tx.take() {
                if tx.send(Ok(parts)).is_err() {
                    return;
                }
            }
            // The body: frames to hyper as they are decoded, the request still written meanwhile.
            let mut unframe = Unframe::new(resp.framing);
            let mut eof = false;
            loop {
                if !ubuf.is_empty() || unframe.framing.is_done() {
                    match unframe.take(&mut ubuf) {
                        Ok((data, trailers)) => {
                            for f in data
                                .map(Frame::data)
                                .into_iter()
                                .chain(trailers.map(Frame::trailers))
                            {
                                if frames.send(Ok(f)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = frames.send(Err(Box::new(e))).await;
                            return;
                        }
                    }
                }
                if unframe.framing.is_done() {
                    break;
                }
                if eof {
                    if unframe.framing == Framing::UntilClose {
                        break;
                    }
                    let _ = frames
                        .send(Err("upstream closed mid-response".into()))
                        .await;
                    return;
                }
                let Some(wr) = writer.as_mut() else { return };
                tokio::select! {
                    w = wr, if writing => {
                        writing = false;
                        if w.is_err() {
                            sent.done.store(false, Relaxed);
                        }
                        if sent.timed_out.load(Relaxed) {
                            // The response has started, so its status cannot become a 408:
                            // it is cut (the client's stream is reset), as the engine cuts a
                            // started response at a deadline, and this upstream connection,
                            // waiting for the rest of the body, is closed.
                            let _ = frames.send(Err("request body timeout".into())).await;
                            return;
                        }
                    }
                    n = r.read_buf(&mut ubuf) => {
                        eof = !matches!(n, Ok(n) if n > 0);
                    }
                }
            }
            drop(frames);
            resp.reusable && !writing && sent.done.load(Relaxed) && ubuf.is_empty() && !eof
        };
        if reusable {
            self.pool.put(self.key, self.stream, self.max_idle);
        }
    }
}

/// The response head the engine rewrote (for an HTTP/1.1 client) as hyper's parts for an h2c
/// client: status and headers, without the connection-specific ones.
fn response_parts(out: &[u8]) -> Option<http::response::Parts> {
    let mut hdrs = [httparse::EMPTY_HEADER; 160];
    let mut resp = httparse::Response::new(&mut hdrs);
    resp.parse(out).ok()?;
    let status = StatusCode::from_u16(resp.code?).ok()?;
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    parts.headers = bridge::map_of(resp.headers);
    Some(parts)
}
