//! The handover: the private channel to a successor, its framed messages, and fd passing.
//!
//! The predecessor P starts its successor S with one end of a `socketpair(AF_UNIX,
//! SOCK_STREAM)` inherited ([`spawn_successor`], [`inherited_channel`]); no filesystem path
//! exists that another user could connect to. Over it they exchange typed, versioned
//! [`Message`]s, each framed as a fixed header (magic, version, payload length, fd count, bulk
//! length), a JSON payload and bulk bytes (see [`message`]); fds travel as `SCM_RIGHTS`
//! attached to the header's first byte, at most 253 per message (see [`Channel`]).
//!
//! The message flow:
//!
//! ```text
//!  S → P  Hello { protocol_version, version, pid }   (or Refused { reason }: S cannot start)
//!  P → S  Hello                                      (or Abort: versions cannot talk)
//!  P → S  Listeners { name, addr, protocol }*        + one listening fd per entry
//!  S → P  Ready { adopted }                          (or Refused { reason })
//!  P → S  Conns { seq, conns }*                      + 2 fds per tunnel, 1 per idle HTTP conn,
//!                                                      + their pending bytes as bulk
//!  S → P  Ack { seq, count }*                        one per Conns message, once S owns them
//!  P → S  Done { counters }                          P exits; S carries its counters on
//!  either Abort { reason }                           gives up; P keeps or resumes serving
//! ```
//!
//! P keeps its copies of every fd until the matching `Ack` (listeners until the end), so if S
//! dies or misbehaves at any point, P resumes serving everything. Every decoding failure is a
//! typed [`HandoverError`], never a panic.
//!
//! The flow is implemented once, as two typed sessions in [`session`]: a
//! [`session::Predecessor`] (hello, offer listeners, await ready, batches, commit, done) and a
//! [`session::Successor`] (the mirror), each step bounded by a deadline and failing with a
//! [`session::SessionError`] that names the stage and the cause. The process, its successor
//! and the supervisor all use them. The caller (the lifecycle) owns the decisions (what to
//! park, the deadlines, rollback); this module only moves values and fds. docs/architecture.md
//! follows one tunnel through it, file by file.

pub mod channel;
pub mod conns;
mod error;
pub mod handshake;
pub mod message;
pub mod session;
pub mod spawn;

pub use channel::{Channel, Received};
pub use conns::{expect_ack, recv_conns, send_ack, send_conns, split_batches};
pub use error::HandoverError;
pub use handshake::{
    hello, listeners_in, listeners_with_keys_in, predecessor_hello, recv_hello, recv_listeners,
    recv_listeners_with_keys, recv_ready, send_abort, send_done, send_listeners,
    send_listeners_with_keys, send_ready, send_refused, successor_hello, unexpected, PeerHello,
};
pub use message::{ConnEntry, HalfEntry, ListenerEntry, Message, MAX_FDS, PROTOCOL_VERSION};
pub use spawn::{inherited_channel, spawn_successor, Spawned, HANDOVER_FD_ENV};
