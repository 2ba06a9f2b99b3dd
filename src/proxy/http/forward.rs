//! Sending one request upstream: choosing a server, reusing or opening a connection, the
//! response timeout, and retries.
//!
//! Retry rules: a request is tried on another server (one not tried yet, via
//! [`Upstream::pick`]'s exclude list) up to the upstream's `retries` when the connect failed
//! (any method: nothing was sent), or when it failed before a response and it is idempotent
//! (GET, HEAD, OPTIONS, PUT, DELETE) and no byte of its body was sent. Never after any
//! response byte, never after a response timeout. A pooled connection found closed before the
//! request was written is replaced by a fresh one to the same server without counting a retry.

use super::body::{Release, ReplayBody};
use super::errors::ProxyError;
use super::headers;
use super::pool::{connect_tcp, Lease, Pool, Sender};
use crate::config::UpstreamProtocol;
use crate::upstream::{ServerGuard, Upstream};
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Where a request goes.
pub struct Target<'a> {
    /// The listener's upstream connections.
    pub pool: &'a Arc<Pool>,
    /// The upstream chosen by routing.
    pub upstream: &'a Arc<Upstream>,
    /// The client, for balancing.
    pub client_ip: IpAddr,
    /// Forward the client's Host header as is.
    pub preserve_host: bool,
    /// The request's `request_timeout` deadline: every wait here ends by it (with
    /// [`ProxyError::RequestTimeout`]), so one timer per wait covers both this and the step's
    /// own timeout instead of an outer timer around the whole exchange.
    pub deadline: Option<Instant>,
}

/// The rewritten request head, reused for each attempt.
pub struct Head {
    /// Method.
    pub method: Method,
    /// Request target as the client sent it.
    pub uri: Uri,
    /// Rewritten headers.
    pub headers: HeaderMap,
}

/// A response head from a server, and what its body's end releases.
pub struct Forwarded {
    /// The response (its body streams from the server).
    pub resp: Response<Incoming>,
    /// The server that answered.
    pub server: SocketAddr,
    /// Pool lease and server guard.
    pub release: Release,
}

/// The upstream side of an accepted `Upgrade` or `CONNECT`.
#[derive(Debug)]
pub struct Tunnel {
    /// The raw upstream socket.
    pub stream: TcpStream,
    /// Bytes the server sent after its response head (already read by hyper).
    pub read_buf: Bytes,
    /// Keeps the server counted as active.
    pub guard: ServerGuard,
}

/// Which limit ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// The step's own timeout (connect, response).
    Step,
    /// The request's deadline (`request_timeout`).
    Request,
}

impl Target<'_> {
    /// The earlier of `now + limit` and the request deadline, and which one it is.
    fn until(&self, limit: Option<Duration>) -> Option<(Instant, Expired)> {
        let step = limit.map(|d| Instant::now() + d);
        match (step, self.deadline) {
            (Some(a), Some(b)) if b <= a => Some((b, Expired::Request)),
            (Some(a), _) => Some((a, Expired::Step)),
            (None, Some(b)) => Some((b, Expired::Request)),
            (None, None) => None,
        }
    }

    /// Runs `f` for at most `limit` and never past the request deadline.
    async fn within<F: Future>(&self, limit: Option<Duration>, f: F) -> Result<F::Output, Expired> {
        match self.until(limit) {
            Some((at, which)) => tokio::time::timeout_at(at, f).await.map_err(|_| which),
            None => Ok(f.await),
        }
    }

    /// `limit`, shortened to what is left before the request deadline.
    fn capped(&self, limit: Duration) -> Duration {
        self.deadline.map_or(limit, |d| {
            limit.min(d.saturating_duration_since(Instant::now()))
        })
    }

    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// The error for a response wait that ran out.
fn timed_out(which: Expired, addr: SocketAddr) -> ProxyError {
    match which {
        Expired::Step => ProxyError::UpstreamTimeout(addr),
        Expired::Request => ProxyError::RequestTimeout,
    }
}

/// The request of one attempt, with `headers` (the rewritten head's, moved or cloned by the
/// caller). Returns whether the Host header was added (it was missing and `preserve_host` is on),
/// so headers taken back from an unsent request can be restored.
fn build(
    head: &Head,
    mut headers: HeaderMap,
    t: &Target<'_>,
    addr: SocketAddr,
    proto: UpstreamProtocol,
    body: ReplayBody,
) -> (Request<ReplayBody>, bool) {
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    let had_host = headers.contains_key(header::HOST);
    let mut host_added = false;
    if !t.preserve_host || !had_host {
        if let Some(v) = headers::host_value(addr) {
            headers.insert(header::HOST, v);
            host_added = !had_host;
        }
    }
    let pq = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = if head.method == Method::CONNECT {
        head.uri.clone()
    } else if proto == UpstreamProtocol::H2c {
        *req.version_mut() = Version::HTTP_2;
        let authority = headers
            .remove(header::HOST)
            .and_then(|h| h.to_str().ok().map(str::to_string))
            .unwrap_or_else(|| addr.to_string());
        format!("http://{authority}{pq}")
            .parse()
            .unwrap_or_else(|_| head.uri.clone())
    } else {
        pq.parse().unwrap_or_else(|_| head.uri.clone())
    };
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    (req, host_added)
}

/// Whether a method may be retried after its request reached a server.
pub fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// Sends a request and returns the response head, with retries as described above. The last
/// attempt that may be made takes `head`'s headers instead of a copy (with `retries: 0`, the
/// only one).
pub async fn send(
    t: &Target<'_>,
    mut head: Head,
    body: ReplayBody,
) -> Result<Forwarded, ProxyError> {
    let cfg = t.upstream.config();
    let proto = cfg.http.protocol;
    let retry_ok = idempotent(&head.method);
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last: Option<ProxyError> = None;
    let mut next_body = Some(body);
    let mut fresh_only = false;
    loop {
        let Some(body) = next_body.take() else {
            return Err(last.unwrap_or_else(|| ProxyError::NoServer(cfg.name.clone())));
        };
        let Some(guard) = t.upstream.pick(t.client_ip, &tried) else {
            return Err(last.unwrap_or_else(|| ProxyError::NoServer(cfg.name.clone())));
        };
        let addr = guard.addr();
        let pooled = if fresh_only {
            None
        } else {
            t.pool.checkout(addr, proto)
        };
        fresh_only = false;
        let reused = pooled.is_some();
        let sender = match pooled {
            Some(s) => s,
            None => match t
                .pool
                .connect(addr, proto, t.capped(cfg.connect_timeout))
                .await
            {
                Ok(s) => {
                    t.upstream.report(addr, true);
                    s
                }
                Err(e) => {
                    if t.past_deadline() {
                        // Cut short by the request deadline: not the server's fault.
                        return Err(ProxyError::RequestTimeout);
                    }
                    t.upstream.report(addr, false);
                    tracing::debug!(server = %addr, error = %e, side = "upstream", "upstream connect failed");
                    tried.push(addr);
                    last = Some(ProxyError::Upstream {
                        server: addr,
                        reason: e.to_string(),
                    });
                    if tried.len() as u32 > cfg.retries {
                        return Err(last.unwrap_or_else(|| ProxyError::NoServer(cfg.name.clone())));
                    }
                    next_body = Some(body);
                    continue;
                }
            },
        };
        let handle = body.handle();
        // A retry after this attempt needs the headers again; otherwise this attempt takes them.
        let headers_taken = !(retry_ok && (tried.len() as u32) < cfg.retries);
        let take_headers = |head: &mut Head| {
            if headers_taken {
                std::mem::take(&mut head.headers)
            } else {
                head.headers.clone()
            }
        };
        let err = match sender {
            Sender::H1(mut s) => {
                let ready = if reused {
                    t.within(Some(cfg.connect_timeout), s.ready()).await
                } else {
                    Ok(Ok(()))
                };
                if matches!(ready, Err(Expired::Request)) {
                    return Err(ProxyError::RequestTimeout);
                }
                if !matches!(ready, Ok(Ok(()))) {
                    // The pooled connection was closed by the server while idle: nothing sent.
                    fresh_only = true;
                    next_body = Some(body);
                    continue;
                }
                let headers = take_headers(&mut head);
                let (req, host_added) = build(&head, headers, t, addr, proto, body);
                match t
                    .within(cfg.http.response_timeout, s.try_send_request(req))
                    .await
                {
                    Err(which) => return Err(timed_out(which, addr)),
                    Ok(Ok(resp)) => {
                        let lease = Lease {
                            pool: t.pool.clone(),
                            addr,
                            sender: s,
                            max_idle: cfg.http.pool_idle_per_server,
                        };
                        let release = Release {
                            lease: Some(lease),
                            guard: Some(guard),
                        };
                        return Ok(Forwarded {
                            resp,
                            server: addr,
                            release,
                        });
                    }
                    Ok(Err(mut e)) => {
                        if let Some(req) = e.take_message() {
                            if reused {
                                fresh_only = true;
                                let (parts, body) = req.into_parts();
                                if headers_taken {
                                    // Unsent: its headers serve the next attempt as they were.
                                    head.headers = parts.headers;
                                    if host_added {
                                        head.headers.remove(header::HOST);
                                    }
                                }
                                next_body = Some(body);
                                continue;
                            }
                        }
                        e.into_error()
                    }
                }
            }
            Sender::H2(mut s) => {
                let headers = take_headers(&mut head);
                let (req, _) = build(&head, headers, t, addr, proto, body);
                match t
                    .within(cfg.http.response_timeout, s.send_request(req))
                    .await
                {
                    Err(which) => return Err(timed_out(which, addr)),
                    Ok(Ok(resp)) => {
                        let release = Release {
                            lease: None,
                            guard: Some(guard),
                        };
                        return Ok(Forwarded {
                            resp,
                            server: addr,
                            release,
                        });
                    }
                    Ok(Err(e)) => e,
                }
            }
        };
        if handle.too_large() {
            return Err(ProxyError::BodyTooLarge(0));
        }
        tracing::debug!(server = %addr, error = %err, side = "upstream", "upstream request failed");
        tried.push(addr);
        last = Some(ProxyError::Upstream {
            server: addr,
            reason: err.to_string(),
        });
        if retry_ok && tried.len() as u32 <= cfg.retries && !t.past_deadline() {
            if let Some(b) = handle.replay() {
                if let Some(m) = t.upstream.metrics() {
                    m.retry();
                }
                next_body = Some(b);
                continue;
            }
        }
        return Err(last.unwrap_or_else(|| ProxyError::NoServer(cfg.name.clone())));
    }
}

/// Sends an `Upgrade` or `CONNECT` request over a fresh connection. If the server switches
/// protocols (101, or 2xx to CONNECT) the raw upstream socket comes back as a [`Tunnel`].
/// Only connect failures are retried.
pub async fn upgrade(
    t: &Target<'_>,
    mut head: Head,
    body: ReplayBody,
) -> Result<(Response<Incoming>, SocketAddr, Option<Tunnel>), ProxyError> {
    let cfg = t.upstream.config();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last: Option<ProxyError> = None;
    let (guard, tcp) = loop {
        let Some(guard) = t.upstream.pick(t.client_ip, &tried) else {
            return Err(last.unwrap_or_else(|| ProxyError::NoServer(cfg.name.clone())));
        };
        let addr = guard.addr();
        match connect_tcp(addr, t.capped(cfg.connect_timeout)).await {
            Ok(s) => {
                t.upstream.report(addr, true);
                break (guard, s);
            }
            Err(_) if t.past_deadline() => return Err(ProxyError::RequestTimeout),
            Err(e) => {
                t.upstream.report(addr, false);
                tried.push(addr);
                last = Some(ProxyError::Upstream {
                    server: addr,
                    reason: e.to_string(),
                });
                if tried.len() as u32 > cfg.retries {
                    return Err(last.unwrap_or_else(|| ProxyError::NoServer(cfg.name.clone())));
                }
            }
        }
    };
    let addr = guard.addr();
    let fail = |e: hyper::Error| ProxyError::Upstream {
        server: addr,
        reason: e.to_string(),
    };
    let (mut s, conn) = http1::handshake::<_, ReplayBody>(TokioIo::new(tcp))
        .await
        .map_err(fail)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(server = %addr, error = %e, "upstream upgrade connection ended with an error");
        }
    });
    let headers = std::mem::take(&mut head.headers);
    let (req, _) = build(&head, headers, t, addr, UpstreamProtocol::Http1, body);
    let mut resp = match t
        .within(cfg.http.response_timeout, s.send_request(req))
        .await
    {
        Err(which) => return Err(timed_out(which, addr)),
        Ok(r) => r.map_err(fail)?,
    };
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if !switched {
        return Ok((resp, addr, None));
    }
    let upgraded = hyper::upgrade::on(&mut resp).await.map_err(fail)?;
    let parts = upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| ProxyError::Upstream {
            server: addr,
            reason: "upgraded connection is not a TCP stream".into(),
        })?;
    let tunnel = Tunnel {
        stream: parts.io.into_inner(),
        read_buf: parts.read_buf,
        guard,
    };
    Ok((resp, addr, Some(tunnel)))
}
