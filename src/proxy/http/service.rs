//! The hyper service of one h2c client connection: each request (stream) is checked
//! (`:authority`, size), routed, and forwarded: to an h2c upstream with its headers rewritten
//! here, to an HTTP/1.1 upstream through the engine (`to_h1`). Its response body is wrapped so
//! the request counts as in flight until that body ends, then logged as one access line.

use super::body::{Release, ReplayBody, ResBody, Tracked};
use super::errors::ProxyError;
use super::forward::{self, Head, Target};
use super::headers::TraceId;
use super::shared::{ConnShared, InFlight};
use super::{headers, route};
use crate::proxy::tcp::OrDash;
use crate::proxy::ListenerCtx;
use http::{header, request, HeaderValue, Method, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio::time::Instant;

/// What every request of one client connection shares.
#[derive(Debug)]
pub struct SvcCtx {
    /// The listener.
    pub ctx: Arc<ListenerCtx>,
    /// State shared with the connection loop.
    pub shared: Arc<ConnShared>,
    /// The client.
    pub client: SocketAddr,
}

/// The service given to hyper.
#[derive(Debug, Clone)]
pub struct Svc(pub Arc<SvcCtx>);

impl hyper::service::Service<Request<Incoming>> for Svc {
    type Response = Response<ResBody>;
    type Error = Infallible;
    // Boxed: `poll_without_shutdown` (handover) needs an Unpin service future.
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let s = self.0.clone();
        Box::pin(async move { Ok(serve_request(s, req).await) })
    }
}

/// One access-log line in the making; also keeps the request counted as in flight. Its fields
/// are cheap clones of what the request already holds (no String per request): the line is
/// formatted only if the access log is enabled.
#[derive(Debug)]
pub struct ReqLog {
    /// The connection's registry counters (its id, its TLS facts).
    stats: Arc<crate::registry::ConnStats>,
    listener: Arc<str>,
    method: Method,
    /// The Host header (or URI authority) as the client sent it.
    host: Option<HeaderValue>,
    uri: Uri,
    client: SocketAddr,
    trace_id: TraceId,
    server: Option<SocketAddr>,
    /// The upstream chosen by routing, for its request metrics.
    upstream: Option<Arc<crate::upstream::Upstream>>,
    metrics: Arc<crate::metrics::Metrics>,
    status: u16,
    start: Instant,
    _in_flight: InFlight,
}

impl ReqLog {
    fn host(&self) -> OrDash<std::borrow::Cow<'_, str>> {
        OrDash(
            self.host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .map(route::normalize_host),
        )
    }

    /// Writes the access line: `bytes` of response body sent, `complete` if it all went out.
    pub fn emit(self, bytes: u64, complete: bool) {
        let elapsed = self.start.elapsed();
        // The upstream's own metrics handle: no lookup by name per request.
        match self.upstream.as_ref().and_then(|u| u.metrics()) {
            Some(h) => h.request_to(self.server, self.status, elapsed),
            None => self.metrics.http_request(
                self.upstream.as_ref().map_or("", |u| u.name()),
                self.status,
                elapsed,
            ),
        }
        // The same fields as the HTTP/1.1 engine's line (`h1::outcome::log_access`); an h2
        // connection over TLS adds what its handshake agreed on.
        macro_rules! access {
            ($($tls:tt)*) => {
                tracing::info!(
                    target: "baton::access",
                    conn = self.stats.id,
                    listener = %self.listener,
                    method = %self.method,
                    host = %self.host(),
                    path = %self.uri.path(),
                    status = self.status,
                    bytes,
                    complete,
                    duration_ms = elapsed.as_millis() as u64,
                    server = %OrDash(self.server),
                    client = %self.client,
                    trace_id = %self.trace_id,
                    $($tls)*
                    "request"
                )
            };
        }
        match self.stats.tls() {
            None => access!(),
            Some(t) => access!(
                tls_version = %t.version,
                tls_cipher = %t.cipher,
                sni = %OrDash(t.sni.as_deref()),
                alpn = %OrDash(t.alpn.as_deref()),
                tls_resumed = t.resumed,
            ),
        }
    }
}

async fn serve_request(s: Arc<SvcCtx>, req: Request<Incoming>) -> Response<ResBody> {
    let start = Instant::now();
    let in_flight = s.shared.begin();
    let (mut parts, body) = req.into_parts();
    let trace_id = headers::trace_context(&mut parts.headers);
    // The URI's authority (h2c `:authority`, HTTP/1 absolute-form) is the host; `Host` only
    // stands in without one (RFC 9113 §8.3.1, RFC 9112 §3.2.2). `proxy` refuses a mismatch.
    let raw_host = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| parts.headers.get(header::HOST).cloned());
    let mut log = ReqLog {
        stats: s.shared.stats.clone(),
        listener: s.ctx.name.clone(),
        method: parts.method.clone(),
        host: raw_host.clone(),
        uri: parts.uri.clone(),
        client: s.client,
        trace_id,
        server: None,
        upstream: None,
        metrics: s.ctx.metrics.clone(),
        status: 0,
        start,
        _in_flight: in_flight,
    };
    let host = raw_host
        .as_ref()
        .and_then(|h| h.to_str().ok())
        .map(route::normalize_host);
    let http_cfg = &s.ctx.cfg.http;
    let deadline = http_cfg.request_timeout.map(|d| start + d);
    // The deadline bounds every wait inside (see `forward::Target::deadline`): no outer timer.
    let result = proxy(
        &s,
        parts,
        body,
        (host.as_deref(), raw_host.as_ref()),
        (&mut log.server, &mut log.upstream),
        deadline,
    )
    .await;
    let (resp, release) = match result {
        Ok(x) => x,
        Err(mut e) => {
            if let ProxyError::BodyTooLarge(limit) = &mut e {
                *limit = http_cfg.max_body_bytes.unwrap_or(0);
            }
            tracing::warn!(
                conn = log.stats.id,
                client = %s.client,
                method = %log.method,
                host = %log.host(),
                path = %log.uri.path(),
                status = e.status().as_u16(),
                side = e.side().as_str(),
                error = %e,
                trace_id = %log.trace_id,
                "request failed"
            );
            (e.response(), Release::default())
        }
    };
    log.status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    Response::from_parts(
        parts,
        Tracked::new(body, log, deadline, release).boxed_unsync(),
    )
}

fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// h2c: `:authority` must carry no userinfo, and a `Host` header, if any, must name the same
/// authority: otherwise routing and the upstream could disagree on the host.
fn check_authority(parts: &request::Parts) -> Result<(), ProxyError> {
    let Some(a) = parts.uri.authority() else {
        return Ok(());
    };
    if a.as_str().contains('@') {
        return Err(ProxyError::BadRequest("userinfo in :authority"));
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let differs = hosts.any(|h| !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()));
    if differs {
        return Err(ProxyError::BadRequest(
            "host header differs from :authority",
        ));
    }
    Ok(())
}

async fn proxy(
    s: &SvcCtx,
    mut parts: request::Parts,
    body: Incoming,
    (host, orig_host): (Option<&str>, Option<&HeaderValue>),
    (server, chosen): (
        &mut Option<SocketAddr>,
        &mut Option<Arc<crate::upstream::Upstream>>,
    ),
    deadline: Option<Instant>,
) -> Result<(Response<ResBody>, Release), ProxyError> {
    let cfg = &s.ctx.cfg;
    check_authority(&parts)?;
    if let Some(limit) = cfg.http.max_body_bytes {
        if content_length(&parts.headers).is_some_and(|n| n > limit) {
            return Err(ProxyError::BodyTooLarge(limit));
        }
    }
    let name = route::select(&cfg.routes, &cfg.upstream, host, parts.uri.path())
        .ok_or(ProxyError::NoRoute)?;
    let upstream = s
        .ctx
        .upstreams
        .get(name)
        .ok_or_else(|| ProxyError::MissingUpstream(name.to_string()))?;
    *chosen = Some(upstream.clone());
    if parts.method == Method::CONNECT {
        // Tunnels to a client-named target are the engine's (`h1::connect`), for HTTP/1.1
        // clients; never a splice after an upstream's 2xx.
        return Err(ProxyError::NotSupported("CONNECT over HTTP/2"));
    }
    if upstream.config().http.protocol == crate::config::UpstreamProtocol::Http1 {
        // HTTP/1.1 upstreams are the engine's: its head rules, its raw pool.
        let (resp, addr, release) =
            super::to_h1::send(&s.ctx, upstream, s.client, parts, body, deadline).await?;
        *server = Some(addr);
        return Ok((resp, release));
    }
    let te_trailers = parts
        .headers
        .get_all(header::TE)
        .iter()
        .any(|v| super::syntax::te_lists_trailers(v.as_bytes()));
    headers::strip_hop_by_hop(&mut parts.headers);
    // The one `TE` HTTP/2 allows (RFC 9113 §8.2.2), kept when the client sent it: gRPC
    // servers refuse a request without it.
    if te_trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let via = "2.0 baton";
    let https = s.ctx.cfg.tls.is_some();
    headers::add_forwarding(&mut parts.headers, s.client.ip(), https, orig_host, via);
    if let (false, Some(h)) = (parts.headers.contains_key(header::HOST), orig_host) {
        parts.headers.insert(header::HOST, h.clone());
    }
    let head = Head {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
    };
    let target = Target {
        pool: &s.ctx.http_pool,
        upstream,
        client_ip: s.client.ip(),
        preserve_host: cfg.http.preserve_host,
        deadline,
    };
    let body = ReplayBody::new(
        body.map_err(Into::into).boxed_unsync(),
        cfg.http.max_body_bytes,
    );
    let f = forward::send(&target, head, body).await?;
    *server = Some(f.server);
    let (mut rparts, rbody) = f.resp.into_parts();
    headers::strip_hop_by_hop(&mut rparts.headers);
    rparts
        .headers
        .append(header::VIA, HeaderValue::from_static(via));
    Ok((
        Response::from_parts(rparts, rbody.map_err(Into::into).boxed_unsync()),
        f.release,
    ))
}
