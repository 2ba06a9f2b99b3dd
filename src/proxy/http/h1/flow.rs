//! Moving bytes of one exchange: request body from the client to the upstream, the response
//! head and body back, each by its framing. [`poll_flow`] makes every step it can and returns
//! when something needs a decision; between two calls all state is in [`State`], so the
//! connection can stop (park) after any of them.

use super::super::framing::{encode_chunk, FramingError, LAST_CHUNK};
use super::super::head::{parse_response_into, ClientBody, RespOpts};
use super::state::{RespState, State};
use crate::proxy::client_io::ClientIo;
use bytes::Buf;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;

/// Buffer cap per direction and side: reading stops while a buffer holds this much.
pub const CAP: usize = 32 * 1024;

/// What stopped the flow.
#[derive(Debug)]
pub enum Flow {
    /// The response has been read whole and the request sent whole: the upstream connection
    /// is free (to the pool, if reusable) while the rest goes to the client.
    UpstreamDone,
    /// The response ended and is written; the request body ended too.
    Complete,
    /// The response ended and is written, but the request body did not (the upstream answered
    /// early): the client connection must close.
    CompleteEarly,
    /// The upstream failed before any response byte (retry may be possible).
    UpstreamFailed(String),
    /// The upstream broke the response (bad head, bad framing, closed mid-body).
    UpstreamBroke(&'static str, u16),
    /// The client went away or broke its request body.
    ClientFailed(&'static str, Option<u16>),
    /// The upstream switched protocols (101): become a tunnel.
    Switched,
    /// The request body grew past `max_body_bytes`.
    TooLarge,
}

/// Limits and facts the flow needs.
pub struct FlowOpts {
    /// Largest response head.
    pub max_head: usize,
    /// Largest request body.
    pub max_body: Option<u64>,
    /// Response parsing facts.
    pub resp: RespOpts,
}

fn poll_write<S: AsyncWrite + Unpin>(
    s: &mut S,
    b: &[u8],
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    Pin::new(s).poll_write(cx, b)
}

/// Makes all the progress possible now. `client_in`/`client_out` count bytes for the registry.
pub fn poll_flow(
    st: &mut State,
    client: &mut ClientIo,
    mut up: Option<&mut ClientIo>,
    o: &FlowOpts,
    stats: &crate::registry::ConnStats,
    cx: &mut Context<'_>,
) -> Poll<Flow> {
    let Some(ex) = st.ex.as_mut() else {
        return Poll::Ready(Flow::Complete);
    };
    loop {
        let mut progressed = false;

        // Client → upstream: the head first, then body bytes as they are.
        if let Some(up) = up.as_deref_mut().filter(|_| !ex.body_discard) {
            if !st.to_up.is_empty() {
                match poll_write(up, &st.to_up, cx) {
                    Poll::Ready(Ok(n)) => {
                        st.to_up.advance(n);
                        progressed = true;
                    }
                    Poll::Ready(Err(e)) => {
                        if ex.resp_seen {
                            ex.body_discard = true;
                        } else {
                            return Poll::Ready(Flow::UpstreamFailed(e.to_string()));
                        }
                    }
                    Poll::Pending => {}
                }
            } else if st.cl_ready > 0 {
                match poll_write(up, &st.cbuf[..st.cl_ready], cx) {
                    Poll::Ready(Ok(n)) => {
                        st.cbuf.advance(n);
                        st.cl_ready -= n;
                        ex.body_written += n as u64;
                        // The response timeout counts from the upstream's last taking of the
                        // request: an upload longer than it is not cut while the upstream reads.
                        ex.attempt_ms = crate::clock::coarse_ms();
                        progressed = true;
                    }
                    Poll::Ready(Err(e)) => {
                        if ex.resp_seen {
                            ex.body_discard = true;
                        } else {
                            return Poll::Ready(Flow::UpstreamFailed(e.to_string()));
                        }
                    }
                    Poll::Pending => {}
                }
            }
        }
        if ex.body_discard && st.cl_ready > 0 {
            st.cbuf.advance(st.cl_ready);
            st.cl_ready = 0;
        }

        // Request body framing: mark the body bytes now in the buffer.
        if !ex.body.is_done() && st.cl_ready < st.cbuf.len() {
            match ex.body.advance(&st.cbuf[st.cl_ready..], None) {
                Ok(a) => {
                    if a.used > 0 {
                        st.cl_ready += a.used;
                        ex.body_taken += a.used as u64;
                        progressed = true;
                        if o.max_body.is_some_and(|m| ex.body_taken > m) {
                            return Poll::Ready(Flow::TooLarge);
                        }
                    }
                }
                Err(e) => return Poll::Ready(Flow::ClientFailed(framing_reason(e), Some(400))),
            }
        }
        // Read the client only for the body (and only while the buffer has room).
        if !ex.body.is_done() && st.cbuf.len() < CAP {
            match client.poll_fill(&mut st.cbuf, cx) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Flow::ClientFailed("client closed mid-body", Some(400)))
                }
                Poll::Ready(Ok(n)) => {
                    stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                    ex.body_seen_ms = crate::clock::coarse_ms();
                    progressed = true;
                }
                Poll::Ready(Err(_)) => {
                    return Poll::Ready(Flow::ClientFailed("client reset mid-body", None))
                }
                Poll::Pending => {}
            }
        }

        // The response: its head, then its body by framing.
        if ex.resp.is_none() && !st.ubuf.is_empty() && st.to_cl.len() < CAP {
            // A final response that comes before the request body is all forwarded (an early
            // 401 or 413 to an upload) says `connection: close`, and the client connection closes
            // after it: a close must be announced (RFC 9112 §9.6).
            let mut ro = o.resp;
            if !(ex.body.is_done() && st.cl_ready == 0 && st.to_up.is_empty()) {
                ro.keep_alive = false;
            }
            // The rewritten head goes straight into the client's buffer.
            match parse_response_into(&st.ubuf, o.max_head, &ro, &mut st.to_cl) {
                Ok(Some(r)) => {
                    st.ubuf.advance(r.head_len);
                    progressed = true;
                    if r.status == 101 {
                        return Poll::Ready(Flow::Switched);
                    }
                    if !r.interim() {
                        ex.resp = Some(RespState {
                            status: r.status,
                            framing: r.framing,
                            body: r.body,
                            close_client: r.close_client,
                            reusable: r.reusable,
                        });
                    }
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(Flow::UpstreamBroke(e.reason, 502)),
            }
        }
        // Framed in the same pass as the head, so a small response goes out in one write.
        match ex.resp.as_mut() {
            None => {}
            Some(r) if !r.framing.is_done() => match r.body {
                ClientBody::Pass => {
                    if st.up_ready < st.ubuf.len() {
                        match r.framing.advance(&st.ubuf[st.up_ready..], None) {
                            Ok(a) => {
                                st.up_ready += a.used;
                                progressed |= a.used > 0 || a.done;
                            }
                            Err(_) => {
                                return Poll::Ready(Flow::UpstreamBroke(
                                    "invalid response framing",
                                    502,
                                ))
                            }
                        }
                    }
                }
                ClientBody::Decode => {
                    if !st.ubuf.is_empty() && st.to_cl.len() < CAP {
                        match r.framing.advance(&st.ubuf, Some(&mut st.to_cl)) {
                            Ok(a) => {
                                st.ubuf.advance(a.used);
                                progressed |= a.used > 0 || a.done;
                            }
                            Err(_) => {
                                return Poll::Ready(Flow::UpstreamBroke(
                                    "invalid response framing",
                                    502,
                                ))
                            }
                        }
                    }
                }
                ClientBody::Encode => {
                    if !st.ubuf.is_empty() && st.to_cl.len() < CAP {
                        encode_chunk(&mut st.to_cl, &st.ubuf);
                        st.ubuf.clear();
                        progressed = true;
                    }
                }
            },
            Some(_) => {}
        }

        // Upstream → client: heads and re-framed bytes, then body bytes as they are — in one
        // write when both are there (a small response: head and body in one segment).
        if !st.to_cl.is_empty() || st.up_ready > 0 {
            let r = if st.to_cl.is_empty() {
                poll_write(client, &st.ubuf[..st.up_ready], cx)
            } else if st.up_ready > 0 {
                let bufs = [
                    io::IoSlice::new(&st.to_cl),
                    io::IoSlice::new(&st.ubuf[..st.up_ready]),
                ];
                Pin::new(&mut *client).poll_write_vectored(cx, &bufs)
            } else {
                poll_write(client, &st.to_cl, cx)
            };
            match r {
                Poll::Ready(Ok(n)) => {
                    let from_head = n.min(st.to_cl.len());
                    st.to_cl.advance(from_head);
                    st.ubuf.advance(n - from_head);
                    st.up_ready -= n - from_head;
                    stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                    ex.resp_bytes += n as u64;
                    progressed = true;
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Flow::ClientFailed("client gone", None)),
                Poll::Pending => {}
            }
        }

        // Read the upstream while a response is still to come (and the buffer has room).
        // Only once the framing has taken what is buffered: an EOF right behind a small body
        // must not be acted on before that body is framed.
        let want = match ex.resp.as_ref() {
            None => true,
            Some(r) if r.framing.is_done() => false,
            Some(r) if r.body == ClientBody::Pass => st.up_ready == st.ubuf.len(),
            Some(_) => st.ubuf.is_empty(),
        };
        // A response head may be larger than one buffer: it is read on up to `max_head` (past
        // that it is refused), else a head between the two would wait for `response_timeout`.
        let cap = if ex.resp.is_none() {
            CAP.max(o.max_head + 1)
        } else {
            CAP
        };
        if let Some(up) = up.as_deref_mut().filter(|_| want && st.ubuf.len() < cap) {
            match up.poll_fill(&mut st.ubuf, cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => match ex.resp.as_mut() {
                    None if !ex.resp_seen => {
                        return Poll::Ready(Flow::UpstreamFailed(
                            "connection closed before a response".into(),
                        ))
                    }
                    None => {
                        return Poll::Ready(Flow::UpstreamBroke("truncated response head", 502))
                    }
                    Some(r) if r.framing == super::super::framing::Framing::UntilClose => {
                        r.framing = super::super::framing::Framing::Done;
                        r.reusable = false;
                        if r.body == ClientBody::Encode {
                            st.to_cl.extend_from_slice(LAST_CHUNK);
                        }
                        progressed = true;
                    }
                    Some(_) => return Poll::Ready(Flow::UpstreamBroke("response cut short", 0)),
                },
                Poll::Ready(Ok(_)) => {
                    ex.resp_seen = true;
                    progressed = true;
                }
                Poll::Pending => {}
            }
        }

        // The upstream's part is over once the response is read and the request sent.
        if let Some(r) = &mut ex.resp {
            let sent = ex.body.is_done() && st.cl_ready == 0 && st.to_up.is_empty();
            if up.is_some() && r.framing.is_done() && sent {
                if st.ubuf.len() > st.up_ready {
                    // Bytes after the response: the upstream is confused; never reuse it.
                    r.reusable = false;
                    st.ubuf.truncate(st.up_ready);
                }
                return Poll::Ready(Flow::UpstreamDone);
            }
        }
        // Done when the response is complete and written.
        if let Some(r) = &ex.resp {
            if r.framing.is_done() && st.to_cl.is_empty() && st.up_ready == 0 {
                let body_done = ex.body.is_done() && st.cl_ready == 0 && st.to_up.is_empty();
                if !st.ubuf.is_empty() {
                    // Bytes after the response: the upstream is confused; never reuse it.
                    if let Some(r) = ex.resp.as_mut() {
                        r.reusable = false;
                    }
                    st.ubuf.clear();
                }
                return Poll::Ready(if body_done {
                    Flow::Complete
                } else {
                    Flow::CompleteEarly
                });
            }
        }
        if !progressed {
            return Poll::Pending;
        }
    }
}

fn framing_reason(e: FramingError) -> &'static str {
    match e {
        FramingError::ChunkSize => "invalid chunk size",
        FramingError::ChunkLine => "chunk extension too long",
        FramingError::Syntax => "invalid chunked framing",
        FramingError::Trailers => "trailer section too large",
        FramingError::TrailerField => "forbidden trailer field",
    }
}
