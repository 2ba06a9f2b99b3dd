//! An HTTP/1.1 client's request to an h2c upstream: the engine parsed and rewrote the head as
//! for any upstream; here it becomes an HTTP/2 request on hyper's h2 client (`forward::send`,
//! the shared multiplexed connection per server), the request body is decoded by its framing
//! into frames (data, then trailers) as it arrives, and the response comes back through the
//! engine's response parser (`head::parse_response`: the same rules as any upstream's response)
//! and is written with HTTP/1.1 framing, trailers included when chunked. The client may be
//! plain or TLS: the body pump reads while the response is written, on the socket through a
//! shared reference, or on the two halves of the TLS session ([`Reader`], [`Writer`]).
//!
//! While such an exchange is in flight its state is partly inside hyper, so the connection
//! does not park mid-request: it finishes the exchange (a kill still closes it), then parks
//! idle like any other.

use super::outcome::{fail, log_access};
use super::state::{Phase, RespState};
use super::{ms_to_instant, Conn, Step};
use crate::proxy::client_io::ClientIo;
use crate::proxy::http::body::ReplayBody;
use crate::proxy::http::bridge::{self, ChanBody, FrameTx, Unframe};
use crate::proxy::http::forward::{self, Head, Target};
use crate::proxy::http::framing::{Framing, LAST_CHUNK};
use crate::proxy::http::head::{self, ClientBody, RespOpts};
use crate::proxy::ListenerCtx;
use crate::registry::{ConnHandle, SIG_DRAIN, SIG_KILL};
use bytes::BytesMut;
use http::{HeaderValue, Method, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// Frames of the request body waiting for hyper.
const DEPTH: usize = 4;

/// Why the request body could not be passed on: reason and status.
type ClientFault = (&'static str, u16);

/// The client's reading side, for the body pump, while the response is written on the other.
enum Reader<'a> {
    /// A plain socket, read through a shared reference.
    Plain(&'a TcpStream),
    /// A TLS session: reading decrypts, so each side holds half of the session.
    Tls(ReadHalf<&'a mut ClientIo>),
}

impl Reader<'_> {
    /// Reads once into `buf`; `Ok(0)` is EOF.
    async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Reader::Plain(s) => loop {
                s.readable().await?;
                match s.try_read_buf(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            },
            Reader::Tls(r) => r.read_buf(buf).await,
        }
    }
}

/// The client's writing side, for the response.
enum Writer<'a> {
    /// A plain socket, written through a shared reference (the body pump reads it).
    Plain(&'a TcpStream),
    /// A TLS session's writing half.
    Tls(WriteHalf<&'a mut ClientIo>),
}

impl Writer<'_> {
    /// Writes all of `b` (and, TLS, the records it became).
    async fn write_all(&mut self, mut b: &[u8]) -> io::Result<()> {
        match self {
            Writer::Plain(s) => {
                while !b.is_empty() {
                    s.writable().await?;
                    match s.try_write(b) {
                        Ok(n) => b = &b[n..],
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Writer::Tls(w) => {
                w.write_all(b).await?;
                w.flush().await
            }
        }
    }
}

/// Reads the client's request body from `cbuf` and the socket, decoded into frames for
/// hyper, until it ends (what follows it stays in `cbuf`).
async fn pump(
    ctx: &ListenerCtx,
    mut client: Reader<'_>,
    cbuf: &mut BytesMut,
    framing: Framing,
    tx: FrameTx,
    stats: &crate::registry::ConnStats,
) -> Result<(), ClientFault> {
    let http = &ctx.cfg.http;
    let mut unframe = Unframe::new(framing);
    let mut taken = 0u64;
    loop {
        if !cbuf.is_empty() {
            let before = cbuf.len();
            let (data, trailers) = unframe
                .take(cbuf)
                .map_err(|_| ("invalid request body framing", 400))?;
            taken += (before - cbuf.len()) as u64;
            if http.max_body_bytes.is_some_and(|m| taken > m) {
                return Err(("request body too large", 413));
            }
            for f in data
                .map(Frame::data)
                .into_iter()
                .chain(trailers.map(Frame::trailers))
            {
                // hyper gone (the upstream answered or failed): the rest is not needed.
                if tx.send(Ok(f)).await.is_err() {
                    return Ok(());
                }
            }
        }
        if unframe.framing.is_done() {
            return Ok(());
        }
        if cbuf.capacity() - cbuf.len() < 8192 {
            cbuf.reserve(16 * 1024);
        }
        let read = client.read_buf(cbuf);
        let n = match http.body_timeout {
            Some(t) => tokio::time::timeout(t, read)
                .await
                .map_err(|_| ("body timeout", 408))?,
            None => read.await,
        };
        match n {
            Ok(0) => return Err(("client closed mid-body", 400)),
            Ok(n) => {
                stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => return Err(("client reset mid-body", 400)),
        }
    }
}

/// The rewritten request as hyper's head: method, target, and the header lines (with `Host`,
/// which `forward` turns into `:authority`).
fn hyper_head(ex: &super::state::Exchange) -> Option<Head> {
    let method = Method::from_bytes(ex.method.as_bytes()).ok()?;
    let uri: Uri = ex.target.parse().ok()?;
    let mut lines = [httparse::EMPTY_HEADER; 160];
    let headers = match httparse::parse_headers(&ex.rest, &mut lines) {
        Ok(httparse::Status::Complete((_, lines))) => lines,
        _ => return None,
    };
    let mut headers = bridge::map_of(headers);
    if let Some(h) = ex.host.as_deref() {
        headers.insert(http::header::HOST, HeaderValue::from_str(h).ok()?);
    }
    // The one `TE` HTTP/2 allows (RFC 9113 §8.2.2), passed on as the client said it.
    if ex.te_trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    Some(Head {
        method,
        uri,
        headers,
    })
}

/// Runs the exchange of `c` with an h2c upstream, to the end of its response.
pub(super) async fn exchange(ctx: &Arc<ListenerCtx>, conn: &ConnHandle, c: &mut Conn) -> Step {
    let stats = conn.stats().clone();
    let Some(ex) = c.st.ex.as_mut() else {
        c.st.phase = Phase::Head;
        return Step::Go;
    };
    let Some(upstream) = ex.upstream_in(ctx).cloned() else {
        fail(ctx, conn, c, 500, true, "missing upstream");
        return Step::Go;
    };
    let Some(head) = hyper_head(ex) else {
        fail(ctx, conn, c, 400, true, "request head not valid for HTTP/2");
        return Step::Go;
    };
    // A plain response is written to the socket directly ([`Writer`]), past ClientIo's lazy
    // TCP_NODELAY and registration.
    c.client.nodelay_now();
    if c.client.tcp().is_err() {
        fail(ctx, conn, c, 500, true, "client socket lost");
        return Step::Go;
    }
    let framing = ex.body;
    let (tx, body) = if framing.is_done() {
        (None, ChanBody::empty())
    } else {
        let (tx, body) = ChanBody::channel(DEPTH);
        (Some(tx), body)
    };
    let deadline = ctx
        .cfg
        .http
        .request_timeout
        .map(|t| ms_to_instant(ex.started_ms + t.as_millis() as u64));
    let head_request = ex.method == "HEAD";
    let target = Target {
        pool: &ctx.http_pool,
        upstream: &upstream,
        client_ip: stats.client.ip(),
        preserve_host: ctx.cfg.http.preserve_host,
        deadline,
    };
    let body = ReplayBody::new(body.boxed_unsync(), None);
    // Boxed, so each can be dropped (ending its borrows) before the connection is used whole.
    let mut send = Box::pin(forward::send(&target, head, body));
    let (reader, mut writer) = if c.client.is_tls() {
        let (r, w) = tokio::io::split(&mut c.client);
        (Reader::Tls(r), Writer::Tls(w))
    } else {
        let Some(t) = c.client.registered() else {
            return Step::Go;
        };
        (Reader::Plain(t), Writer::Plain(t))
    };
    let mut pumping = Box::pin(pump(
        ctx,
        reader,
        &mut c.st.cbuf,
        framing,
        tx.unwrap_or_else(closed_tx),
        &stats,
    ));
    let mut body_done = framing.is_done();
    // A drain lets the exchange finish (then the connection closes); a kill ends it.
    let kill = conn.requested(SIG_KILL | SIG_DRAIN);
    tokio::pin!(kill);
    let mut pump_failed = None;
    let sent = loop {
        tokio::select! {
            r = &mut send => break Some(r),
            p = &mut pumping, if !body_done => {
                body_done = true;
                if let Err(e) = p {
                    pump_failed = Some(e);
                    break None;
                }
            }
            bits = &mut kill => {
                if bits & SIG_KILL != 0 {
                    return Step::Close("closed at drain deadline");
                }
                kill.set(conn.requested(SIG_KILL));
                c.st.close_after = true;
            }
        }
    };
    drop(send);
    let sent = match (sent, pump_failed) {
        (Some(r), _) => r,
        (None, e) => {
            drop(pumping);
            drop(writer);
            let (why, status) = e.unwrap_or(("request body broken", 400));
            fail(ctx, conn, c, status, true, why);
            return Step::Go;
        }
    };
    let f = match sent {
        Ok(f) => f,
        Err(e) => {
            drop(pumping);
            drop(writer);
            let close = !body_done;
            let why = e.to_string();
            tracing::debug!(error = %why, side = e.side().as_str(), "h2c upstream request failed");
            fail(
                ctx,
                conn,
                c,
                e.status().as_u16(),
                close,
                "upstream request failed",
            );
            return Step::Go;
        }
    };
    let (parts, mut rbody) = f.resp.into_parts();
    let _release = f.release;
    let Some(ex) = c.st.ex.as_mut() else {
        return Step::Close("closed");
    };
    ex.server = Some(f.server);
    stats.set_server(Some(f.server));
    // The response head through the engine's parser, as if the upstream spoke HTTP/1.1.
    let mut raw = Vec::with_capacity(256);
    raw.extend_from_slice(b"HTTP/1.1 ");
    raw.extend_from_slice(parts.status.as_str().as_bytes());
    raw.push(b' ');
    raw.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    raw.extend_from_slice(b"\r\n");
    bridge::write_lines(&mut raw, &parts.headers);
    if !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        raw.extend_from_slice(if rbody.is_end_stream() {
            b"content-length: 0\r\n"
        } else {
            b"transfer-encoding: chunked\r\n"
        });
    }
    raw.extend_from_slice(b"\r\n");
    let opts = RespOpts {
        head_request,
        client_http10: ex.http10,
        keep_alive: ex.keep_alive && !c.st.close_after,
        upgrade: false,
        via: "1.1 baton",
    };
    let r = match head::parse_response(&raw, usize::MAX, &opts) {
        Ok(Some(r)) => r,
        _ => {
            drop(pumping);
            drop(writer);
            fail(
                ctx,
                conn,
                c,
                502,
                !body_done,
                "h2c response not valid for HTTP/1.1",
            );
            return Step::Go;
        }
    };
    ex.resp = Some(RespState {
        status: r.status,
        framing: Framing::Done,
        body: r.body,
        close_client: r.close_client,
        reusable: false,
    });
    let chunked = matches!(r.framing, Framing::Chunked(_)) && r.body == ClientBody::Pass;
    let mut out = BytesMut::from(&r.out[..]);
    let mut trailers_sent = false;
    let mut ended = r.framing.is_done();
    let mut written = 0u64;
    let mut broken: Option<&'static str> = None;
    let sleep = tokio::time::sleep_until(deadline.unwrap_or_else(|| {
        tokio::time::Instant::now() + std::time::Duration::from_secs(86400 * 365)
    }));
    tokio::pin!(sleep);
    loop {
        if !out.is_empty() {
            if writer.write_all(&out).await.is_err() {
                broken = Some("client gone");
                break;
            }
            written += out.len() as u64;
            stats
                .bytes_out
                .fetch_add(out.len() as u64, Ordering::Relaxed);
            out.clear();
        }
        if ended {
            break;
        }
        tokio::select! {
            fr = rbody.frame() => match fr {
                None => {
                    if chunked && !trailers_sent {
                        out.extend_from_slice(LAST_CHUNK);
                    }
                    ended = true;
                }
                Some(Ok(fr)) => {
                    trailers_sent |= fr.is_trailers();
                    bridge::put_frame(&mut out, fr, chunked);
                }
                Some(Err(_)) => {
                    broken = Some("h2c response cut");
                    break;
                }
            },
            p = &mut pumping, if !body_done => {
                body_done = true;
                if p.is_err() {
                    // The response is under way: its status cannot change anymore.
                    broken = Some("request body broken");
                    break;
                }
            }
            bits = &mut kill => {
                if bits & SIG_KILL != 0 {
                    broken = Some("closed at drain deadline");
                    break;
                }
                kill.set(conn.requested(SIG_KILL));
                c.st.close_after = true;
            }
            _ = &mut sleep => {
                broken = Some("request took longer than request_timeout");
                break;
            }
        }
    }
    drop(pumping);
    drop(writer);
    if let Some(ex) = c.st.ex.as_mut() {
        ex.resp_bytes = written;
    }
    if let Some(why) = broken {
        log_access(ctx, conn, &c.st, false);
        return Step::Close(why);
    }
    log_access(ctx, conn, &c.st, true);
    c.st.ex = None;
    c.st.phase = Phase::Head;
    if r.close_client || !body_done {
        c.st.close_after = true;
    }
    if c.st.close_after {
        let _ = c.client.shutdown().await;
        return Step::Close("closed");
    }
    Step::Go
}

/// A sender whose body is already complete (nothing to pump).
fn closed_tx() -> FrameTx {
    let (tx, _) = tokio::sync::mpsc::channel(1);
    tx
}
