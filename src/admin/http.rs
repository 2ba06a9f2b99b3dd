//! The HTTP admin endpoint on `admin.listen`: `GET /status` (the control socket's status
//! JSON), `GET /metrics` (Prometheus text), `GET /healthz` (alive), `GET /readyz` (listeners
//! bound and at least one healthy server per upstream in use) and `GET /` (a self-contained
//! status page). Served by the small HTTP/1.1 loop below (httparse): GET and HEAD, keep-alive,
//! a bounded head, nothing streamed.
//!
//! The status comes from the lifecycle over the same channel as the control socket's, so it is
//! exactly what `baton status --json` prints. While the lifecycle is busy (draining after an
//! upgrade or a stop) it cannot answer; then the last answer is served with fresh counters and
//! upstream health, marked `"stale": true`.
//!
//! On upgrade the admin socket is not handed over: the successor binds it once the
//! predecessor has closed it at exit (retrying every 100 ms), so scrapes during the drain
//! still see the old process's full counters, and the new process answers only once it has
//! absorbed them. Scrapes in the gap of a few milliseconds are refused, never wrong.

use super::control::{Command, ControlRequest, Reply};
use crate::metrics::{Metrics, ServerLive, CONTENT_TYPE};
use crate::upstream::Upstreams;
use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The status page, served at `/`.
const PAGE: &str = include_str!("page.html");

/// How long a status request waits for the lifecycle before the last answer is used.
const STATUS_WAIT: Duration = Duration::from_secs(1);

/// What the admin endpoint serves besides the status, which always comes from the
/// lifecycle's command channel: a single process's own metrics and upstream pools
/// ([`ProcessSource`]), or a supervisor's view of its workers (`supervisor::admin`).
pub trait Source: Send + Sync + std::fmt::Debug {
    /// The Prometheus text for `/metrics`.
    fn metrics_text(&self) -> String;
    /// Why this process cannot take traffic, its phase aside (none: it can). `status` is
    /// the lifecycle's status, fresh or last known.
    fn not_ready(&self, status: &serde_json::Value) -> Vec<String>;
    /// Refreshes a last-known status with what is known without the lifecycle (it is
    /// busy): counters, upstream health.
    fn freshen(&self, status: &mut serde_json::Value);
}

/// A single process (or a worker): its own metrics, and the upstream pools it picks from.
#[derive(Debug)]
pub struct ProcessSource {
    /// Counters and the Prometheus rendering.
    pub metrics: Arc<Metrics>,
    /// Upstream pools, for readiness and fresh health.
    pub upstreams: Upstreams,
    /// Names of the upstreams some listener or route uses.
    pub in_use: Vec<String>,
}

impl Source for ProcessSource {
    /// The Prometheus text, with each upstream server's live state.
    fn metrics_text(&self) -> String {
        let live: Vec<ServerLive> = self
            .upstreams
            .iter()
            .flat_map(|(name, u)| {
                u.status().into_iter().map(move |s| ServerLive {
                    upstream: name.clone(),
                    server: s.addr,
                    up: s.healthy && !s.ejected,
                    active: s.active,
                })
            })
            .collect();
        self.metrics.render_with(&live)
    }

    /// At least one healthy server per upstream in use.
    fn not_ready(&self, _status: &serde_json::Value) -> Vec<String> {
        let mut why = Vec::new();
        for name in &self.in_use {
            let Some(u) = self.upstreams.get(name) else {
                continue;
            };
            if !u.status().iter().any(|s| s.healthy && !s.ejected) {
                why.push(format!("upstream {name}: no healthy server"));
            }
        }
        why
    }

    fn freshen(&self, v: &mut serde_json::Value) {
        v["counters"] = json!(self.metrics.snapshot());
        for (name, u) in &self.upstreams {
            v["upstreams"][name] = json!(u.status());
        }
    }
}

/// What the admin endpoint reads.
#[derive(Debug)]
pub struct AdminCtx {
    /// Metrics, readiness and fresh values.
    pub source: Box<dyn Source>,
    /// The lifecycle's command channel, for status.
    pub control: mpsc::Sender<ControlRequest>,
    /// The last status the lifecycle gave.
    last_status: Mutex<Option<serde_json::Value>>,
}

impl AdminCtx {
    /// The context of a single process (or a worker) running `cfg`.
    pub fn new(
        cfg: &crate::config::Config,
        metrics: Arc<Metrics>,
        control: mpsc::Sender<ControlRequest>,
        upstreams: Upstreams,
    ) -> AdminCtx {
        let mut in_use: Vec<String> = cfg
            .listeners
            .values()
            .flat_map(|l| {
                std::iter::once(l.upstream.clone())
                    .chain(l.routes.iter().map(|r| r.upstream.clone()))
            })
            .collect();
        in_use.sort();
        in_use.dedup();
        let source = ProcessSource {
            metrics,
            upstreams,
            in_use,
        };
        AdminCtx::with_source(Box::new(source), control)
    }

    /// The context for another [`Source`] (the supervisor's).
    pub fn with_source(source: Box<dyn Source>, control: mpsc::Sender<ControlRequest>) -> AdminCtx {
        AdminCtx {
            source,
            control,
            last_status: Mutex::new(None),
        }
    }

    /// The lifecycle's status, or the last one with fresh counters if it is busy.
    pub async fn status(&self) -> Option<serde_json::Value> {
        let (tx, rx) = oneshot::channel();
        let asked = self
            .control
            .try_send(ControlRequest {
                command: Command::Status,
                reply: tx,
            })
            .is_ok();
        if asked {
            if let Ok(Ok(Reply { ok: true, data, .. })) =
                tokio::time::timeout(STATUS_WAIT, rx).await
            {
                if let Ok(mut last) = self.last_status.lock() {
                    *last = Some(data.clone());
                }
                return Some(data);
            }
        }
        let mut v = self.last_status.lock().ok()?.clone()?;
        v["stale"] = json!(true);
        self.source.freshen(&mut v);
        Some(v)
    }

    /// The Prometheus text.
    pub fn metrics_text(&self) -> String {
        self.source.metrics_text()
    }

    /// Why this process is not ready, if it is not.
    pub async fn not_ready(&self) -> Vec<String> {
        let mut why = Vec::new();
        match self.status().await {
            None => why.push("no status from the lifecycle yet".to_string()),
            Some(s) => {
                let phase = s["phase"].as_str().unwrap_or("?");
                if !matches!(
                    phase,
                    "ready" | "taking_over" | "handing_over" | "upgrading"
                ) {
                    why.push(format!("phase is {phase}"));
                }
                why.extend(self.source.not_ready(&s));
            }
        }
        why
    }
}

/// Starts the admin endpoint on `addr` until `stop`. A first generation binds at once and
/// fails if it cannot. A successor (`wait_for_release`) binds in the background, retrying
/// every 100 ms while the predecessor still holds the address.
pub fn start(
    addr: SocketAddr,
    ctx: Arc<AdminCtx>,
    wait_for_release: bool,
    stop: CancellationToken,
) -> std::io::Result<()> {
    if !wait_for_release {
        let l = bind(addr)?;
        tokio::spawn(serve(l, ctx, stop));
        return Ok(());
    }
    tokio::spawn(async move {
        let mut logged = false;
        loop {
            match bind(addr) {
                Ok(l) => return serve(l, ctx, stop).await,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    if !logged {
                        tracing::info!(addr = %addr, "admin address busy; waiting for the predecessor to release it");
                        logged = true;
                    }
                }
                Err(e) => {
                    tracing::error!(addr = %addr, error = %e, "cannot bind the admin address; retrying");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    Ok(())
}

/// Binds the admin address (SO_REUSEADDR, backlog 128), non-blocking, in the current runtime.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    s.set_nonblocking(true)?;
    TcpListener::from_std(s.into())
}

/// Most admin connections served at once; accepting pauses while this many are open (like a
/// proxy listener's `max_connections`), so idle clients cannot starve the proxy of fds.
pub const MAX_CONNECTIONS: usize = 64;

/// Time a client has to send a request head, counted whenever a connection waits for one, so
/// it is also how long an idle (keep-alive) admin connection is kept.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest an admin connection lives, whatever it does (a client that never reads its
/// response holds a connection no longer than this).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves the admin endpoint on `listener` until `stop`.
pub async fn serve(listener: TcpListener, ctx: Arc<AdminCtx>, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listener = "admin", addr = %addr, protocol = "http", "listening");
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = crate::listener::AcceptBackoff::new("admin");
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                if !backoff.failed(&e, &stop).await {
                    break;
                }
                continue;
            }
        };
        tokio::spawn(serve_connection(stream, ctx.clone(), stop.clone(), permit));
    }
    tracing::debug!("admin endpoint closed");
}

/// Largest request head accepted (431 above): admin requests are a line and a few headers.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body skipped on a kept connection (larger: answered, then closed).
const MAX_SKIP: u64 = 64 * 1024;

/// Serves one admin connection, holding its slot of [`MAX_CONNECTIONS`] until it closes.
async fn serve_connection(
    mut stream: tokio::net::TcpStream,
    ctx: Arc<AdminCtx>,
    stop: CancellationToken,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    tokio::select! {
        r = exchanges(&mut stream, &ctx) => if let Err(e) = r {
            tracing::debug!(error = %e, "admin connection error");
        },
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
            tracing::debug!("admin connection closed: lifetime over");
        }
        _ = stop.cancelled() => {}
    }
}

/// One request head: method, path, whether the connection stays open, and the body length to
/// skip (`None`: a body that cannot be skipped, so the connection closes after the answer).
struct Asked {
    method: String,
    path: String,
    keep_alive: bool,
    body: Option<u64>,
}

fn parse_head(buf: &[u8]) -> Result<Option<(Asked, usize)>, StatusCode> {
    let mut hdrs = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut hdrs);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        }
        Err(_) => return Err(StatusCode::BAD_REQUEST),
    };
    let http10 = req.version == Some(0);
    let mut keep_alive = !http10;
    let mut body = Some(0);
    for h in req.headers.iter() {
        let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
        if h.name.eq_ignore_ascii_case("connection") {
            keep_alive = if http10 {
                v.contains("keep-alive")
            } else {
                !v.contains("close")
            };
        } else if h.name.eq_ignore_ascii_case("content-length") {
            body = v.trim().parse::<u64>().ok().filter(|n| *n <= MAX_SKIP);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            body = None;
        }
    }
    let path = req.path.unwrap_or("/");
    let asked = Asked {
        method: req.method.unwrap_or("GET").to_string(),
        path: path.split('?').next().unwrap_or("/").to_string(),
        keep_alive: keep_alive && body.is_some(),
        body,
    };
    Ok(Some((asked, n)))
}

/// Answers requests on one connection until it closes, asks to, or stays idle past
/// [`HEADER_TIMEOUT`].
async fn exchanges(s: &mut tokio::net::TcpStream, ctx: &AdminCtx) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let head = tokio::time::timeout(HEADER_TIMEOUT, async {
            loop {
                match parse_head(&buf) {
                    Ok(Some(x)) => return Ok(Some(x)),
                    Ok(None) => {}
                    Err(status) => return Err(status),
                }
                if !matches!(s.read_buf(&mut buf).await, Ok(n) if n > 0) {
                    return Ok(None);
                }
            }
        })
        .await;
        let (asked, n) = match head {
            Err(_) | Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(x))) => x,
            Ok(Err(status)) => {
                let a = Answer::text(status, "bad request\n");
                return s.write_all(&a.encode(false, false)).await;
            }
        };
        buf.advance(n);
        let answer = handle(ctx, &asked.method, &asked.path).await;
        s.write_all(&answer.encode(asked.method == "HEAD", asked.keep_alive))
            .await?;
        if !asked.keep_alive {
            return s.shutdown().await;
        }
        // Skip the request's body (bounded above), from the buffer and then the socket.
        let mut left = asked.body.unwrap_or(0);
        let here = left.min(buf.len() as u64);
        buf.advance(here as usize);
        left -= here;
        while left > 0 {
            let n = s.read_buf(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            let here = left.min(buf.len() as u64);
            buf.advance(here as usize);
            left -= here;
        }
    }
}

/// A complete answer: status, content type and body.
struct Answer {
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
}

impl Answer {
    fn text(status: StatusCode, body: &'static str) -> Answer {
        reply(status, "text/plain", body)
    }

    /// The response's bytes; `head_only` for HEAD (the length, no body).
    fn encode(&self, head_only: bool, keep_alive: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncache-control: no-store\r\ncontent-length: {}\r\n{}{}\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            self.content_type,
            self.body.len(),
            // RFC 9110 §15.5.6: a 405 names what is allowed.
            if self.status == StatusCode::METHOD_NOT_ALLOWED { "allow: GET, HEAD\r\n" } else { "" },
            if keep_alive { "" } else { "connection: close\r\n" },
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    Answer {
        status,
        content_type,
        body: body.into(),
    }
}

fn json_reply(status: StatusCode, v: &serde_json::Value) -> Answer {
    reply(status, "application/json", format!("{v}\n"))
}

async fn handle(ctx: &AdminCtx, method: &str, path: &str) -> Answer {
    if method != "GET" && method != "HEAD" {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
    }
    match path {
        "/" => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        "/metrics" => reply(StatusCode::OK, CONTENT_TYPE, ctx.metrics_text()),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let why = ctx.not_ready().await;
            if why.is_empty() {
                json_reply(StatusCode::OK, &json!({ "ready": true }))
            } else {
                json_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({ "ready": false, "reasons": why }),
                )
            }
        }
        "/status" => match ctx.status().await {
            Some(v) => json_reply(StatusCode::OK, &v),
            None => json_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "error": "no status from the lifecycle yet" }),
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}
