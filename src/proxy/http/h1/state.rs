//! The whole state of one HTTP/1.1 client connection as plain data: what phase it is in, the
//! framing of each body, the bytes read but not yet passed on in each direction, and the
//! request's metadata. Sockets aside, this is what a parked connection carries to the
//! successor, which resumes from exactly here.

use super::super::framing::Framing;
use super::super::head::ClientBody;
use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reading a request head (the client buffer holds what came of it so far).
    #[default]
    Head,
    /// A request head is parsed and rewritten; an upstream connection is needed.
    Connect,
    /// Request body and response flowing between the client and the upstream.
    Exchange,
    /// Writing what is left for the client, then closing.
    Flush,
}

/// The response's head facts, once it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RespState {
    /// Status code.
    pub status: u16,
    /// The body's framing from the upstream, and what is left of it.
    pub framing: Framing,
    /// How the body goes to the client.
    pub body: ClientBody,
    /// The client connection closes after this response.
    pub close_client: bool,
    /// The upstream connection may go back to the pool after it.
    pub reusable: bool,
}

/// One request in flight: what it is, where it goes, how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    /// Method as sent.
    pub method: String,
    /// Normalized target.
    pub target: String,
    /// Routing host (absolute-form authority, else Host).
    pub host: Option<String>,
    /// The client spoke HTTP/1.0.
    pub http10: bool,
    /// The client asked to keep the connection.
    pub keep_alive: bool,
    /// An allowed upgrade was asked for.
    pub upgrade: bool,
    /// The rewritten request line.
    pub line: Vec<u8>,
    /// The rewritten headers after Host, with the final empty line.
    pub rest: Vec<u8>,
    /// Trace id (32 hex digits; serialized as text).
    pub trace: super::super::headers::TraceId,
    /// The upstream chosen by routing.
    pub upstream: String,
    /// Its handle, looked up once per request instead of by name at every step; not part
    /// of the moved state (a resumed exchange looks it up by name again).
    #[serde(skip)]
    pub up: UpstreamRef,
    /// The request body's framing as the head announced it (for a retry from the start).
    pub body_initial: Framing,
    /// What is left of the request body.
    pub body: Framing,
    /// Request body bytes written to the upstream by this attempt.
    pub body_written: u64,
    /// Request body bytes taken from the client.
    pub body_taken: u64,
    /// When the client last sent body bytes (ms since the epoch).
    pub body_seen_ms: u64,
    /// The server of the current attempt.
    pub server: Option<SocketAddr>,
    /// Servers tried and failed.
    pub tried: Vec<SocketAddr>,
    /// The current upstream connection came from the pool.
    pub reused: bool,
    /// Some response byte arrived in this attempt (no retry after that).
    pub resp_seen: bool,
    /// The response head, once it arrived.
    pub resp: Option<RespState>,
    /// The request started (ms since the epoch).
    pub started_ms: u64,
    /// The current attempt started, or later the upstream last took request body bytes (ms
    /// since the epoch): the response timeout counts from here.
    pub attempt_ms: u64,
    /// Response bytes written to the client.
    pub resp_bytes: u64,
    /// The upstream stopped taking the request body (it answered early): drop what is left.
    pub body_discard: bool,
    /// The next attempt opens a new connection (a pooled one just failed).
    pub fresh_only: bool,
    /// An allowed CONNECT: the target (`target`) is connected to and the connection becomes
    /// a tunnel after baton's own `200`. Absent in the state of older versions.
    #[serde(default)]
    pub connect: bool,
    /// The client's `TE` lists `trailers` ([`crate::proxy::http::head::Request::te_trailers`]).
    /// Absent in the state of older versions.
    #[serde(default)]
    pub te_trailers: bool,
}

/// A cached [`crate::upstream::Upstream`] handle in an [`Exchange`]: compares equal to any
/// other (a cache is not part of what the exchange is).
#[derive(Clone, Default)]
pub struct UpstreamRef(pub Option<std::sync::Arc<crate::upstream::Upstream>>);

impl PartialEq for UpstreamRef {
    fn eq(&self, _: &UpstreamRef) -> bool {
        true
    }
}

impl Eq for UpstreamRef {}

impl std::fmt::Debug for UpstreamRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "cached" } else { "-" })
    }
}

impl Exchange {
    /// The exchange's upstream: the cached handle, else by name (after a resume).
    pub fn upstream_in<'a>(
        &'a self,
        ctx: &'a crate::proxy::ListenerCtx,
    ) -> Option<&'a std::sync::Arc<crate::upstream::Upstream>> {
        self.up
            .0
            .as_ref()
            .or_else(|| ctx.upstreams.get(&self.upstream))
    }
}

/// The movable state of one client connection.
#[derive(Debug, Default)]
pub struct State {
    /// The phase.
    pub phase: Phase,
    /// Bytes read from the client and not yet passed on; the first `cl_ready` are request body
    /// bytes to write to the upstream as they are.
    pub cbuf: BytesMut,
    /// See `cbuf`.
    pub cl_ready: usize,
    /// Bytes for the upstream that go before `cbuf[..cl_ready]` (the rewritten head).
    pub to_up: BytesMut,
    /// Bytes read from the upstream and not yet passed on; the first `up_ready` are response
    /// body bytes to write to the client as they are.
    pub ubuf: BytesMut,
    /// See `ubuf`.
    pub up_ready: usize,
    /// Bytes for the client that go before `ubuf[..up_ready]` (heads, re-framed bodies, errors).
    pub to_cl: BytesMut,
    /// The request in flight.
    pub ex: Option<Exchange>,
    /// When the first byte of the current head arrived (ms since the epoch).
    pub head_started_ms: Option<u64>,
    /// Close the client connection once `to_cl` is written (Flush) or the exchange ends.
    pub close_after: bool,
}

/// [`State`] without its buffers, as it travels in a handover message (the buffers go in the
/// message's bulk section, in the order of [`Wire::lens`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wire {
    /// The phase.
    pub phase: Phase,
    /// Lengths of `cbuf`, `to_up`, `ubuf`, `to_cl`.
    pub lens: [u64; 4],
    /// See [`State::cl_ready`].
    pub cl_ready: u64,
    /// See [`State::up_ready`].
    pub up_ready: u64,
    /// The request in flight.
    pub ex: Option<Exchange>,
    /// See [`State::head_started_ms`].
    pub head_started_ms: Option<u64>,
    /// See [`State::close_after`].
    pub close_after: bool,
    /// Whether an upstream socket travels with it (second fd).
    pub has_upstream: bool,
}

impl State {
    /// Frees the allocations of the buffers that hold nothing (an idle connection that stays
    /// in the engine — TLS — need not keep a request's worth of buffers).
    pub fn release_buffers(&mut self) {
        for b in [
            &mut self.cbuf,
            &mut self.to_up,
            &mut self.ubuf,
            &mut self.to_cl,
        ] {
            if b.is_empty() {
                *b = BytesMut::new();
            }
        }
    }

    /// The state without its buffers, and the buffers in wire order.
    pub fn to_wire(&self, has_upstream: bool) -> Wire {
        Wire {
            phase: self.phase,
            lens: [
                self.cbuf.len() as u64,
                self.to_up.len() as u64,
                self.ubuf.len() as u64,
                self.to_cl.len() as u64,
            ],
            cl_ready: self.cl_ready as u64,
            up_ready: self.up_ready as u64,
            ex: self.ex.clone(),
            head_started_ms: self.head_started_ms,
            close_after: self.close_after,
            has_upstream,
        }
    }

    /// The buffers, in wire order.
    pub fn buffers(&self) -> [&[u8]; 4] {
        [&self.cbuf, &self.to_up, &self.ubuf, &self.to_cl]
    }

    /// Rebuilds a state from its wire form and its bulk bytes (`bulk` holds the four buffers
    /// back to back). `None` if the lengths or ready counts do not fit.
    pub fn from_wire(w: Wire, bulk: &[u8]) -> Option<State> {
        let total = w.lens.iter().try_fold(0u64, |a, l| a.checked_add(*l))?;
        if total != bulk.len() as u64 || w.cl_ready > w.lens[0] || w.up_ready > w.lens[2] {
            return None;
        }
        let mut at = 0usize;
        let mut take = |n: u64| {
            let b = BytesMut::from(&bulk[at..at + n as usize]);
            at += n as usize;
            b
        };
        let (cbuf, to_up, ubuf, to_cl) = (
            take(w.lens[0]),
            take(w.lens[1]),
            take(w.lens[2]),
            take(w.lens[3]),
        );
        Some(State {
            phase: w.phase,
            cbuf,
            cl_ready: w.cl_ready as usize,
            to_up,
            ubuf,
            up_ready: w.up_ready as usize,
            to_cl,
            ex: w.ex,
            head_started_ms: w.head_started_ms,
            close_after: w.close_after,
        })
    }
}
