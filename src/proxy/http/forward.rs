//! Sending one request to an h2c upstream (for h2c clients, and for the engine's HTTP/1.1
//! clients through `h1::h2up`): choosing a server, the shared connection or a new one, the
//! response timeout, and retries.
//!
//! Retry rules: a request is tried on another server (one not tried yet, via
//! [`Upstream::pick`]'s exclude list) up to the upstream's `retries` when the connect failed
//! (any method: nothing was sent), or when it failed before a response and it is idempotent
//! (GET, HEAD, OPTIONS, PUT, DELETE) and no byte of its body was sent. Never after any
//! response byte, never after a response timeout.

use super::body::{Release, ReplayBody};
use super::errors::ProxyError;
use super::headers;
use super::pool::Pool;
use crate::upstream::Upstream;
use http::{header, HeaderMap, Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
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

/// Which limit ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// The step's own timeout (connect, response).
    Step,
    /// The request's deadline (`request_timeout`).
    Request,
}

impl Target<'_> {
    /// The earlier of `from + limit` and the request deadline, and which one it is.
    fn until_from(&self, from: Instant, limit: Option<Duration>) -> Option<(Instant, Expired)> {
        let step = limit.map(|d| from + d);
        match (step, self.deadline) {
            (Some(a), Some(b)) if b <= a => Some((b, Expired::Request)),
            (Some(a), _) => Some((a, Expired::Step)),
            (None, Some(b)) => Some((b, Expired::Request)),
            (None, None) => None,
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

/// The HTTP/2 request of one attempt, with `headers` (the rewritten head's, moved or cloned
/// by the caller): `Host` (the client's with `preserve_host`, else the server's address)
/// becomes `:authority`.
fn build(
    head: &Head,
    mut headers: HeaderMap,
    t: &Target<'_>,
    addr: SocketAddr,
    body: ReplayBody,
) -> Request<ReplayBody> {
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.version_mut() = Version::HTTP_2;
    if !t.preserve_host || !headers.contains_key(header::HOST) {
        if let Some(v) = headers::host_value(addr) {
            headers.insert(header::HOST, v);
        }
    }
    let pq = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = headers
        .remove(header::HOST)
        .and_then(|h| h.to_str().ok().map(str::to_string))
        .unwrap_or_else(|| addr.to_string());
    *req.uri_mut() = format!("http://{authority}{pq}")
        .parse()
        .unwrap_or_else(|_| head.uri.clone());
    *req.headers_mut() = headers;
    req
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
    let retry_ok = idempotent(&head.method);
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last: Option<ProxyError> = None;
    let mut next_body = Some(body);
    loop {
        let Some(body) = next_body.take() else {
            return Err(last.unwrap_or_else(|| ProxyError::NoServer(cfg.name.clone())));
        };
        let Some(guard) = t.upstream.pick(t.client_ip, &tried) else {
            return Err(last.unwrap_or_else(|| ProxyError::NoServer(cfg.name.clone())));
        };
        let addr = guard.addr();
        let sender = match t.pool.checkout(addr) {
            Some(s) => s,
            None => match t.pool.connect(addr, t.capped(cfg.connect_timeout)).await {
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
        let headers = if retry_ok && (tried.len() as u32) < cfg.retries {
            head.headers.clone()
        } else {
            std::mem::take(&mut head.headers)
        };
        let req = build(&head, headers, t, addr, body);
        let mut s = sender;
        // `response_timeout` counts from the upstream's last taking of a body frame (as in the
        // engine): an upload longer than it is not cut while the upstream reads it.
        let mut sending = std::pin::pin!(s.send_request(req));
        let start = Instant::now();
        let answer = loop {
            let from = handle.taken_at().unwrap_or(start);
            let waited = match t.until_from(from, cfg.http.response_timeout) {
                Some((at, which)) => tokio::time::timeout_at(at, &mut sending)
                    .await
                    .map_err(|_| which),
                None => Ok((&mut sending).await),
            };
            match waited {
                Err(Expired::Step)
                    if cfg.http.response_timeout.is_some_and(|rt| {
                        handle.taken_at().is_some_and(|at| at + rt > Instant::now())
                    }) =>
                {
                    continue
                }
                r => break r,
            }
        };
        let err = match answer {
            Err(which) => return Err(timed_out(which, addr)),
            Ok(Ok(resp)) => {
                return Ok(Forwarded {
                    resp,
                    server: addr,
                    release: Release { guard: Some(guard) },
                });
            }
            Ok(Err(e)) => e,
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
