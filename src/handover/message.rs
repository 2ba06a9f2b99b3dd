//! The typed, versioned messages of the handover protocol and their framing.
//!
//! A frame is a fixed [`HEADER_LEN`]-byte header, then a JSON payload, then bulk bytes:
//!
//! ```text
//! offset  size  field
//!  0      4     magic  b"BTNH"
//!  4      2     protocol version (big-endian u16, must equal PROTOCOL_VERSION)
//!  6      2     reserved, must be zero
//!  8      4     payload length (u32, ≤ MAX_PAYLOAD)
//! 12      4     fd count (u32, ≤ MAX_FDS), fds travel as SCM_RIGHTS with the header's first byte
//! 16      8     bulk length (u64, ≤ MAX_BULK)
//! ```
//!
//! The bulk bytes are the pending bytes of every connection in a [`Message::Conns`],
//! concatenated in entry order (a tunnel's client→upstream bytes, then its upstream→client
//! bytes). Everything here is a pure function over bytes so it can be property-tested; the
//! socket side lives in [`super::channel`].

use super::HandoverError;
use crate::config::Protocol;
use crate::metrics::Counters;
use crate::registry::{ClientTls, ConnMeta, Parked, UpstreamSession};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Version of the framing and of the message set; both sides must speak the same one.
pub const PROTOCOL_VERSION: u16 = 1;
/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"BTNH";
/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 24;
/// Largest JSON payload accepted (16 MiB).
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Largest bulk section accepted (256 MiB).
pub const MAX_BULK: u64 = 256 << 20;
/// Most fds one message may carry: the kernel's `SCM_MAX_FD` (254 gives `EINVAL`).
pub const MAX_FDS: usize = 253;

/// A listener offered to the successor; one fd travels with each entry, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerEntry {
    /// The listener's name in the config.
    pub name: String,
    /// The address it is bound to.
    pub addr: SocketAddr,
    /// What it speaks.
    pub protocol: Protocol,
}

/// One direction of a tunnel, without its bytes (they travel in the bulk section).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HalfEntry {
    /// Number of pending bytes of this direction in the bulk section.
    pub pending: u64,
    /// The source has sent FIN.
    pub read_eof: bool,
    /// The FIN was passed on to the destination.
    pub shut: bool,
}

/// Describes one [`Parked`] connection: its metadata, how many fds and bulk bytes it owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ConnEntry {
    /// A tunnel: two fds (client, then upstream), then its pending bytes.
    Tunnel {
        /// Metadata and counters.
        meta: ConnMeta,
        /// Client → upstream direction.
        to_upstream: HalfEntry,
        /// Upstream → client direction.
        to_client: HalfEntry,
        /// The client's TLS session (secrets included: this channel is private).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls: Option<Box<ClientTls>>,
        /// The upstream's TLS session (secrets included: this channel is private).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        up_tls: Option<Box<UpstreamSession>>,
        /// How long the tunnel had been quiet when it parked, in ms (absent from a
        /// predecessor that did not send it: the idle clock then starts again).
        #[serde(default)]
        idle_ms: u64,
    },
    /// An idle HTTP/1.1 connection: one fd, then its read-ahead bytes.
    IdleHttp {
        /// Metadata and counters.
        meta: ConnMeta,
        /// Number of read-ahead bytes in the bulk section.
        read_ahead: u64,
    },
    /// An HTTP/1.1 connection in any phase: the client fd (and the upstream fd when
    /// `state.has_upstream`), then its four buffers in the bulk section.
    Http {
        /// Metadata and counters.
        meta: ConnMeta,
        /// The engine's state without its buffers (boxed: larger than the other entries).
        state: Box<crate::proxy::http::h1::state::Wire>,
        /// The client's TLS session (secrets included: this channel is private).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls: Option<Box<ClientTls>>,
        /// The upstream's TLS session (secrets included: this channel is private).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        up_tls: Option<Box<UpstreamSession>>,
    },
    /// An idle pooled upstream connection: one fd, no bulk bytes.
    Pooled {
        /// The listener and the server (`meta.server`).
        meta: ConnMeta,
        /// Its TLS session, for a TLS upstream (secrets included: this channel is private).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls: Option<Box<UpstreamSession>>,
    },
}

impl ConnEntry {
    /// Describes a parked connection (without copying its bytes).
    pub fn describe(p: &Parked) -> ConnEntry {
        let half = |h: &crate::registry::PendingHalf| HalfEntry {
            pending: h.bytes.len() as u64,
            read_eof: h.read_eof,
            shut: h.shut,
        };
        match p {
            Parked::Tunnel(t) => ConnEntry::Tunnel {
                meta: t.meta.clone(),
                to_upstream: half(&t.to_upstream),
                to_client: half(&t.to_client),
                tls: t.client_tls.clone(),
                up_tls: t.upstream_tls.clone(),
                idle_ms: t.idle_ms,
            },
            Parked::IdleHttp(h) => ConnEntry::IdleHttp {
                meta: h.meta.clone(),
                read_ahead: h.read_ahead.len() as u64,
            },
            Parked::Pooled(p) => ConnEntry::Pooled {
                meta: p.meta.clone(),
                tls: p.tls.clone(),
            },
            Parked::Http(h) => ConnEntry::Http {
                meta: h.meta.clone(),
                state: Box::new(h.state.to_wire(h.upstream.is_some())),
                tls: h.client_tls.clone(),
                up_tls: h.upstream_tls.clone(),
            },
        }
    }

    /// How many fds this connection owns.
    pub fn fd_count(&self) -> usize {
        match self {
            ConnEntry::Tunnel { .. } => 2,
            ConnEntry::IdleHttp { .. } => 1,
            ConnEntry::Http { state, .. } => 1 + usize::from(state.has_upstream),
            ConnEntry::Pooled { .. } => 1,
        }
    }

    /// How many bulk bytes this connection owns; `None` on overflow (a hostile entry).
    pub fn bulk_len(&self) -> Option<u64> {
        match self {
            ConnEntry::Tunnel {
                to_upstream,
                to_client,
                ..
            } => to_upstream.pending.checked_add(to_client.pending),
            ConnEntry::IdleHttp { read_ahead, .. } => Some(*read_ahead),
            ConnEntry::Http { state, .. } => {
                state.lens.iter().try_fold(0u64, |a, l| a.checked_add(*l))
            }
            ConnEntry::Pooled { .. } => Some(0),
        }
    }

    /// The connection's metadata.
    pub fn meta(&self) -> &ConnMeta {
        match self {
            ConnEntry::Tunnel { meta, .. }
            | ConnEntry::IdleHttp { meta, .. }
            | ConnEntry::Http { meta, .. }
            | ConnEntry::Pooled { meta, .. } => meta,
        }
    }
}

/// Every message of the protocol. See the module overview of [`super`] for the flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Introduces a side (both directions).
    Hello {
        /// The protocol version the sender speaks.
        protocol_version: u16,
        /// The sender's program version.
        version: String,
        /// The sender's process id.
        pid: u32,
    },
    /// The successor cannot start (e.g. its config is invalid).
    Refused {
        /// Why, for the operator.
        reason: String,
    },
    /// The predecessor's listeners; one fd per entry, in order.
    Listeners {
        /// The listeners.
        listeners: Vec<ListenerEntry>,
        /// Session-ticket keys in the bulk section, [`crate::tls::tickets::KEY_WIRE_LEN`]
        /// bytes each (so the successor resumes the predecessor's TLS sessions). Secrets:
        /// only here, on the private socketpair, never in the JSON payload or a log.
        #[serde(default)]
        ticket_keys: u32,
    },
    /// The successor accepts on its listeners.
    Ready {
        /// Names of the listeners it adopted; the predecessor closes the others at the end.
        adopted: Vec<String>,
    },
    /// A batch of live connections, with their fds and pending bytes.
    Conns {
        /// Batch number; a batch may span several messages, each acknowledged on its own.
        seq: u64,
        /// The connections, in fd and bulk order.
        conns: Vec<ConnEntry>,
    },
    /// The successor owns the connections of one `Conns` message.
    Ack {
        /// The batch number acknowledged.
        seq: u64,
        /// How many connections that message carried.
        count: u32,
    },
    /// The predecessor commits the upgrade: the successor starts accepting and serving the
    /// connections it holds. Before this, the predecessor can still take everything back.
    Commit,
    /// The predecessor is finished; its counters continue in the successor.
    Done {
        /// The predecessor's totals.
        counters: Counters,
        /// The predecessor's upgrade history (opaque records, newest last), so the timeline
        /// survives upgrades like the counters do.
        #[serde(default)]
        history: Vec<serde_json::Value>,
    },
    /// Either side gives up the upgrade.
    Abort {
        /// Why, for the operator.
        reason: String,
    },
    /// Multi-process mode, worker → supervisor, every second: alive, with its counters.
    Heartbeat {
        /// The worker's totals.
        counters: Counters,
    },
    /// Multi-process mode, supervisor → worker, with one fd: a fresh handover channel. A
    /// starting worker takes over through it (its predecessor is the supervisor or the old
    /// worker); a serving worker hands everything over through it to its replacement.
    HandOverTo,
}

impl Message {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Refused { .. } => "refused",
            Message::Listeners { .. } => "listeners",
            Message::Ready { .. } => "ready",
            Message::Conns { .. } => "conns",
            Message::Ack { .. } => "ack",
            Message::Commit => "commit",
            Message::Done { .. } => "done",
            Message::Abort { .. } => "abort",
            Message::Heartbeat { .. } => "heartbeat",
            Message::HandOverTo => "hand_over_to",
        }
    }

    /// How many fds must travel with this message.
    pub fn fds_needed(&self) -> usize {
        match self {
            Message::Listeners { listeners, .. } => listeners.len(),
            Message::Conns { conns, .. } => conns.iter().map(ConnEntry::fd_count).sum(),
            Message::HandOverTo => 1,
            _ => 0,
        }
    }

    /// How many bulk bytes must follow this message; `None` on overflow.
    pub fn bulk_needed(&self) -> Option<u64> {
        match self {
            Message::Conns { conns, .. } => conns
                .iter()
                .try_fold(0u64, |acc, c| acc.checked_add(c.bulk_len()?)),
            Message::Listeners { ticket_keys, .. } => {
                u64::from(*ticket_keys).checked_mul(crate::tls::tickets::KEY_WIRE_LEN as u64)
            }
            _ => Some(0),
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Length of the JSON payload.
    pub payload_len: u32,
    /// Number of fds sent with the frame.
    pub fd_count: u32,
    /// Length of the bulk section.
    pub bulk_len: u64,
}

impl Header {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        b[8..12].copy_from_slice(&self.payload_len.to_be_bytes());
        b[12..16].copy_from_slice(&self.fd_count.to_be_bytes());
        b[16..24].copy_from_slice(&self.bulk_len.to_be_bytes());
        b
    }

    /// Decodes and checks a header: magic, version, reserved bits and caps.
    pub fn decode(b: &[u8]) -> Result<Header, HandoverError> {
        let b: &[u8; HEADER_LEN] = b
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(HandoverError::Truncated { what: "header" })?;
        let [m0, m1, m2, m3, v0, v1, r0, r1, p0, p1, p2, p3, f0, f1, f2, f3, rest @ ..] = *b;
        let magic = [m0, m1, m2, m3];
        if magic != MAGIC {
            return Err(HandoverError::BadMagic(u32::from_be_bytes(magic)));
        }
        let version = u16::from_be_bytes([v0, v1]);
        if version != PROTOCOL_VERSION {
            return Err(HandoverError::UnsupportedVersion {
                got: version,
                ours: PROTOCOL_VERSION,
            });
        }
        if [r0, r1] != [0, 0] {
            return Err(HandoverError::BadHeader("reserved bytes are not zero"));
        }
        let h = Header {
            payload_len: u32::from_be_bytes([p0, p1, p2, p3]),
            fd_count: u32::from_be_bytes([f0, f1, f2, f3]),
            bulk_len: u64::from_be_bytes(rest),
        };
        h.check_caps()?;
        Ok(h)
    }

    fn check_caps(&self) -> Result<(), HandoverError> {
        if self.payload_len > MAX_PAYLOAD {
            return Err(HandoverError::TooLarge {
                what: "payload",
                len: self.payload_len.into(),
                cap: MAX_PAYLOAD.into(),
            });
        }
        if self.fd_count as usize > MAX_FDS {
            return Err(HandoverError::TooManyFds(self.fd_count as usize));
        }
        if self.bulk_len > MAX_BULK {
            return Err(HandoverError::TooLarge {
                what: "bulk",
                len: self.bulk_len,
                cap: MAX_BULK,
            });
        }
        Ok(())
    }
}

/// Encodes a message into header + JSON payload (the bulk bytes are sent as they are),
/// checking that `fd_count` and `bulk_len` are what the message needs.
pub fn encode(
    msg: &Message,
    fd_count: usize,
    bulk_len: usize,
) -> Result<zeroize::Zeroizing<Vec<u8>>, HandoverError> {
    let bulk_len = bulk_len as u64;
    check_counts(msg, fd_count, bulk_len)?;
    // A Conns message may carry TLS sessions' secrets: the buffers holding it are wiped
    // when dropped, and sized up front so serde_json's growth leaves few freed copies.
    let mut payload = zeroize::Zeroizing::new(Vec::with_capacity(payload_hint(msg)));
    serde_json::to_writer(&mut *payload, msg)?;
    let payload_len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let header = Header {
        payload_len,
        fd_count: u32::try_from(fd_count).unwrap_or(u32::MAX),
        bulk_len,
    };
    header.check_caps()?;
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(HEADER_LEN + payload.len()));
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Room for a message's JSON: enough for the TLS sessions and metadata of a full batch.
fn payload_hint(msg: &Message) -> usize {
    match msg {
        Message::Conns { conns, .. } => 1024 + conns.len() * 2048,
        _ => 1024,
    }
}

/// Decodes the payload of a frame whose header is `h`, and checks the message against the
/// header: the fds and bulk bytes its entries need must be what the header announces.
pub fn decode_payload(h: &Header, payload: &[u8]) -> Result<Message, HandoverError> {
    if payload.len() != h.payload_len as usize {
        return Err(HandoverError::Truncated { what: "payload" });
    }
    let msg: Message = serde_json::from_slice(payload)?;
    check_counts(&msg, h.fd_count as usize, h.bulk_len)?;
    Ok(msg)
}

fn check_counts(msg: &Message, fd_count: usize, bulk_len: u64) -> Result<(), HandoverError> {
    let needed = msg.fds_needed();
    if needed > MAX_FDS || fd_count > MAX_FDS {
        return Err(HandoverError::TooManyFds(needed.max(fd_count)));
    }
    if needed != fd_count {
        return Err(HandoverError::FdsForEntries {
            needed,
            header: fd_count,
        });
    }
    match msg.bulk_needed() {
        Some(n) if n == bulk_len => Ok(()),
        needed => Err(HandoverError::BulkMismatch {
            needed,
            header: bulk_len,
        }),
    }
}

/// A whole frame decoded from bytes.
#[derive(Debug)]
pub struct Frame<'a> {
    /// The header.
    pub header: Header,
    /// The message.
    pub msg: Message,
    /// The bulk bytes.
    pub bulk: &'a [u8],
    /// How many bytes of the input the frame used.
    pub consumed: usize,
}

/// Decodes one whole frame from the start of `bytes` (the pure counterpart of
/// [`super::Channel::recv`], minus the fds). Short input is [`HandoverError::Truncated`].
pub fn decode_frame(bytes: &[u8]) -> Result<Frame<'_>, HandoverError> {
    let header = Header::decode(bytes)?;
    let payload_end = HEADER_LEN + header.payload_len as usize;
    let payload = bytes
        .get(HEADER_LEN..payload_end)
        .ok_or(HandoverError::Truncated { what: "payload" })?;
    let msg = decode_payload(&header, payload)?;
    // bulk_len ≤ MAX_BULK, so it fits a usize on every platform we build for.
    let end = usize::try_from(header.bulk_len)
        .ok()
        .and_then(|b| payload_end.checked_add(b))
        .ok_or(HandoverError::Truncated { what: "bulk" })?;
    let bulk = bytes
        .get(payload_end..end)
        .ok_or(HandoverError::Truncated { what: "bulk" })?;
    Ok(Frame {
        header,
        msg,
        bulk,
        consumed: end,
    })
}

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;
