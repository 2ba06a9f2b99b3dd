//! h2c client connections (prior knowledge), served by hyper. Their state lives inside hyper,
//! so they cannot be handed over: on park or drain they finish in the old process and end
//! with GOAWAY.
//!
//! How they end matters to clients. hyper's graceful shutdown sends GOAWAY, then PING, then a
//! second GOAWAY, and keeps sending the open streams' frames; python's `h2` stack (httpx)
//! treats a connection as closed at the first GOAWAY and fails on any later frame but another
//! GOAWAY ("RECV_PING in state CLOSED"). So baton sends a single GOAWAY itself (NO_ERROR, the
//! last stream the client opened), and only where nothing can follow it: glued, in the same
//! write, to the frame that ends the last open stream. That write is held until the client
//! has answered [`ROUNDS`] PINGs (at most [`HOLD`]): httpcore (httpx) reads under a lock and
//! fails every request still waiting for that lock once a GOAWAY has been read, responses in
//! or not, and each PING makes its blocked reader let go of the lock, so the requests whose
//! responses are in are done before the GOAWAY arrives. The client reads the last response
//! and the GOAWAY together, so its next request goes to a new connection. (A GOAWAY sent to an
//! idle connection would wait in the client's buffer; httpx reads it only once its next
//! requests are under way, and fails those it had not sent yet.) After the GOAWAY, hyper is
//! stopped, baton closes its sending side and reads until the client closes, so no reset
//! overtakes the GOAWAY. To know when a write ends the last stream, [`Frames`] follows the
//! frame headers going each way. A connection with no request within [`IDLE_GRACE`] gets the
//! GOAWAY alone; one that is never without an open stream gets hyper's graceful shutdown; the
//! drain deadline bounds both.

use super::io::PrefixedIo;
use super::service::Svc;
use crate::proxy::tcp::close_log;
use crate::proxy::ListenerCtx;
use crate::registry::ConnHandle;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

/// How long a stopping connection waits for a response to glue its GOAWAY to: then an idle
/// one gets the GOAWAY alone, a busy one hyper's graceful shutdown (GOAWAY, PING, GOAWAY).
pub const IDLE_GRACE: Duration = Duration::from_secs(5);
/// How long the client gets to close after our GOAWAY before the socket is closed anyway.
const LINGER: Duration = Duration::from_secs(2);
/// How long the write that ends the last open stream (and carries the GOAWAY) waits at most
/// for the client to answer the [`ROUNDS`] PINGs sent before it; a client that does not
/// answer in time gets the GOAWAY all the same.
const HOLD: Duration = Duration::from_secs(1);
/// PING round trips the client completes before the write that ends the last open stream
/// goes out with the GOAWAY. httpx (httpcore) reads under a lock and, on getting that lock,
/// fails its request if a GOAWAY has been read meanwhile, even when the request's response
/// is already in: so no other request may still wait for the lock when the GOAWAY is read.
/// The lock is held by a reader blocked on the socket, and each PING makes that read return:
/// after the first round the requests whose responses are in pass the lock; the second PING
/// is read by the request still waiting (the one whose response carries the GOAWAY), behind
/// which nothing waits any more.
const ROUNDS: u8 = 2;
/// Our PING payloads start with this tag; the last four bytes number the PINGs of a
/// connection. A hold given up (the client opened a stream) leaves its PING unanswered, and
/// its acknowledgement may come during the next hold: a number of its own per PING keeps that
/// late acknowledgement from counting as the next hold's round (which let the GOAWAY go after
/// one real round trip instead of two, and httpx failed the requests still waiting to read).
const PING_TAG: [u8; 4] = *b"btn\0";
/// The client connection preface, before its first frame.
const PREFACE_LEN: usize = 24;

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const DATA: u8 = 0x0;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;

/// Follows frame boundaries in one direction of the byte stream.
#[derive(Debug, Default, Clone)]
struct Parser {
    /// Bytes of the connection preface still to skip (client side only).
    skip: usize,
    head: [u8; 9],
    have: usize,
    payload_left: usize,
    /// Bytes fed so far.
    pos: u64,
}

impl Parser {
    /// Feeds bytes; calls `frame(type, flags, stream, end)` at each complete frame header,
    /// `end` being the position (in bytes fed) where that frame ends.
    fn feed(&mut self, mut bytes: &[u8], mut frame: impl FnMut(u8, u8, u32, u64)) {
        self.pos += bytes.len() as u64;
        let last = self.pos;
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (9 - self.have).min(bytes.len());
                self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == 9 {
                    let h = self.head;
                    self.have = 0;
                    self.payload_left =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    let end = last - (bytes.len() as u64) + self.payload_left as u64;
                    frame(h[3], h[4], stream, end);
                }
            }
        }
    }

    /// Whether everything fed so far ends exactly at a frame boundary.
    fn at_boundary(&self) -> bool {
        self.skip == 0 && self.have == 0 && self.payload_left == 0
    }
}

/// The streams of one connection as seen in its frame headers.
#[derive(Debug, Clone)]
struct Frames {
    inbound: Parser,
    outbound: Parser,
    /// Streams the client opened that we have not ended (END_STREAM sent) or reset.
    open: Vec<u32>,
    /// The highest stream id the client opened.
    last_stream: u32,
    /// Since when no stream has been open (`None` while one is): `keepalive_timeout` after
    /// it, the connection is closed with a GOAWAY.
    quiet_since: Option<tokio::time::Instant>,
}

impl Frames {
    fn new() -> Frames {
        Frames {
            inbound: Parser {
                skip: PREFACE_LEN,
                ..Parser::default()
            },
            outbound: Parser::default(),
            open: Vec::new(),
            last_stream: 0,
            quiet_since: Some(tokio::time::Instant::now()),
        }
    }

    fn read(&mut self, bytes: &[u8]) {
        let (open, last, since) = (&mut self.open, &mut self.last_stream, &mut self.quiet_since);
        self.inbound.feed(bytes, |kind, _, stream, _| match kind {
            HEADERS if stream != 0 && !open.contains(&stream) && stream > *last => {
                open.push(stream);
                *last = stream;
                *since = None;
            }
            RST_STREAM if open.contains(&stream) => {
                open.retain(|s| *s != stream);
                if open.is_empty() {
                    *since = Some(tokio::time::Instant::now());
                }
            }
            _ => {}
        });
    }

    /// Feeds bytes written; returns where (in bytes written) each frame that ends a stream
    /// ends.
    fn written(&mut self, bytes: &[u8]) -> Vec<u64> {
        let (open, since) = (&mut self.open, &mut self.quiet_since);
        let mut ends = Vec::new();
        self.outbound.feed(bytes, |kind, flags, stream, end| {
            let ended = match kind {
                HEADERS | DATA => flags & END_STREAM != 0,
                RST_STREAM => true,
                _ => false,
            };
            if ended && open.contains(&stream) {
                open.retain(|s| *s != stream);
                ends.push(end);
                if open.is_empty() {
                    *since = Some(tokio::time::Instant::now());
                }
            }
        });
        ends
    }

    /// No stream open and no frame half written: a single GOAWAY can go now.
    fn quiet(&self) -> bool {
        self.open.is_empty() && self.outbound.at_boundary()
    }
}

/// Where the GOAWAY is.
#[derive(Debug, Default)]
enum Goaway {
    /// Not sent.
    #[default]
    No,
    /// Sent, except these bytes (the socket took only part of it).
    Partly(Vec<u8>),
    /// Sent whole.
    Sent,
}

/// The socket, its frame view and the GOAWAY state, under one short lock.
struct Conn {
    io: PrefixedIo,
    frames: Frames,
    /// The connection is stopping: the write that ends the last stream carries the GOAWAY.
    stopping: bool,
    goaway: Goaway,
    /// While stopping: the hold of the write that ends the last stream (see [`HOLD`]).
    hold: Option<Pin<Box<tokio::time::Sleep>>>,
    /// While that write is held: the PING rounds (see [`ROUNDS`]).
    rounds: Rounds,
}

/// The PING rounds before the GOAWAY, while the write that ends the last stream is held.
#[derive(Debug, Default)]
struct Rounds {
    /// The round whose PING is out (0: none sent yet).
    round: u8,
    /// The number of the last PING this connection sent (kept from one hold to the next).
    seq: u32,
    /// Our PING not yet written whole.
    out: Vec<u8>,
    /// Client bytes read while holding: whole frames not ours, for hyper (it reads them after).
    keep: Vec<u8>,
    /// Client bytes read while holding, not yet a whole frame.
    partial: Vec<u8>,
    /// hyper's read, waiting while we read the socket ourselves.
    reader: Option<std::task::Waker>,
}

/// How the PING rounds ended.
#[derive(Debug, Clone, Copy)]
enum RoundsEnd {
    /// The client answered every round: the GOAWAY can go.
    Answered,
    /// The client opened a stream, or closed: no GOAWAY on this write.
    ClientMoved,
    /// No answer in time: the GOAWAY goes anyway.
    NoAnswer,
    /// No clean frame boundary (or unread bytes) to start at: the GOAWAY goes unless the
    /// client sent more.
    NotStarted,
}

/// PING frame number `seq` (`ack`: its acknowledgement).
fn ping(seq: u32, ack: bool) -> [u8; 17] {
    let mut f = [0u8; 17];
    f[2] = 8;
    f[3] = PING;
    f[4] = if ack { ACK } else { 0 };
    f[9..13].copy_from_slice(&PING_TAG);
    f[13..17].copy_from_slice(&seq.to_be_bytes());
    f
}

/// Whether `frame` (whole) acknowledges one of our PINGs, of this hold or an earlier one.
fn is_our_ack(frame: &[u8]) -> bool {
    frame.len() == 17 && frame[3] == PING && frame[4] & ACK != 0 && frame[9..13] == PING_TAG
}

impl Rounds {
    /// Starts round `round`: its PING, with the connection's next number, is queued.
    fn start(&mut self, round: u8) {
        self.round = round;
        self.seq = self.seq.wrapping_add(1);
        self.out = ping(self.seq, false).to_vec();
    }
}

impl Conn {
    /// Writes what is left of a partly sent GOAWAY; ready once it is all out.
    fn poll_goaway(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Goaway::Partly(rest) = &mut self.goaway {
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            rest.drain(..n);
            if rest.is_empty() {
                self.goaway = Goaway::Sent;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// hyper's write of `bufs` (`len` bytes in all). Once the GOAWAY is out, nothing more is
    /// sent (hyper is told it was). While stopping, a write that ends the last open stream
    /// goes out with the GOAWAY appended, in one `writev`.
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
        len: usize,
    ) -> Poll<io::Result<usize>> {
        if !matches!(self.goaway, Goaway::No) {
            std::task::ready!(self.poll_goaway(cx))?;
            return Poll::Ready(Ok(len));
        }
        // What the frame view would be once all of `bufs` is out (only while stopping), and
        // where the frames that end streams end.
        let base = self.frames.outbound.pos;
        let ends_last = self.stopping.then(|| {
            let mut after = self.frames.clone();
            let mut ends = Vec::new();
            for b in bufs {
                ends.extend(after.written(b));
            }
            (after, ends)
        });
        let Some((after, ends)) = ends_last.filter(|(a, _)| a.quiet()) else {
            self.drop_hold();
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write_vectored(cx, bufs))?;
            feed(&mut self.frames, bufs, n);
            return Poll::Ready(Ok(n));
        };
        if ends.len() > 1 {
            // This write ends several streams: only the last may travel with the GOAWAY, so
            // the client reads the others first (and is done with them during the hold).
            let upto = usize::try_from(ends[ends.len() - 2] - base).unwrap_or(len);
            let head = truncate(bufs, upto);
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &head))?;
            feed(&mut self.frames, bufs, n);
            return Poll::Ready(Ok(n));
        }
        if self.hold.is_none() {
            self.hold = Some(Box::pin(tokio::time::sleep(HOLD)));
            self.rounds = Rounds {
                seq: self.rounds.seq,
                ..Rounds::default()
            };
        }
        let end = std::task::ready!(self.poll_rounds(cx));
        if let Some(w) = self.rounds.reader.take() {
            w.wake();
        }
        let moved = match end {
            RoundsEnd::ClientMoved => true,
            RoundsEnd::NotStarted => self.client_has_sent_more(cx),
            // The rounds read the socket and kept no HEADERS: only bytes after them count.
            RoundsEnd::Answered | RoundsEnd::NoAnswer => self.socket_has_more(cx),
        };
        tracing::debug!(
            ?end,
            moved,
            last_stream = after.last_stream,
            "h2 stopping: pings before the goaway"
        );
        if moved {
            // New requests wait unread: they open streams, so this write does not end the
            // last one after all. The GOAWAY waits for the next quiet moment.
            self.drop_hold();
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write_vectored(cx, bufs))?;
            feed(&mut self.frames, bufs, n);
            return Poll::Ready(Ok(n));
        }
        let frame = goaway(after.last_stream);
        let mut with = bufs.to_vec();
        with.push(io::IoSlice::new(&frame));
        let n = std::task::ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &with))?;
        if n < len {
            feed(&mut self.frames, bufs, n);
            return Poll::Ready(Ok(n));
        }
        self.frames = after;
        let sent = n - len;
        self.goaway = if sent == frame.len() {
            Goaway::Sent
        } else {
            Goaway::Partly(frame[sent..].to_vec())
        };
        Poll::Ready(Ok(len))
    }
}

impl Conn {
    /// The PING rounds (see [`ROUNDS`]) while the write that ends the last stream is held:
    /// writes our PINGs, reads the client's bytes itself (hyper's reads wait meanwhile),
    /// drops the acknowledgements and keeps every other whole frame for hyper.
    fn poll_rounds(&mut self, cx: &mut Context<'_>) -> Poll<RoundsEnd> {
        if self.rounds.round == 0 {
            if !self.frames.inbound.at_boundary()
                || !self.frames.outbound.at_boundary()
                || !self.io.prefix.is_empty()
            {
                // Our frames go between whole frames only, each way.
                self.rounds.round = ROUNDS + 1;
                return Poll::Ready(RoundsEnd::NotStarted);
            }
            self.rounds.start(1);
        }
        if self.rounds.round > ROUNDS {
            return Poll::Ready(RoundsEnd::Answered);
        }
        loop {
            while !self.rounds.out.is_empty() {
                match Pin::new(&mut self.io).poll_write(cx, &self.rounds.out) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        self.rounds.out.drain(..n);
                    }
                    Poll::Ready(_) => return Poll::Ready(self.end_rounds(RoundsEnd::ClientMoved)),
                    Poll::Pending => break,
                }
            }
            let mut chunk = [0u8; 4096];
            let mut buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.io.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    return Poll::Ready(self.end_rounds(RoundsEnd::ClientMoved));
                }
                Poll::Ready(Ok(())) => {
                    self.rounds.partial.extend_from_slice(buf.filled());
                    if take_frames(&mut self.rounds) {
                        return Poll::Ready(self.end_rounds(RoundsEnd::ClientMoved));
                    }
                    if self.rounds.round > ROUNDS {
                        return Poll::Ready(self.end_rounds(RoundsEnd::Answered));
                    }
                    continue;
                }
                Poll::Ready(Err(_)) => {
                    return Poll::Ready(self.end_rounds(RoundsEnd::ClientMoved));
                }
                Poll::Pending => {}
            }
            let expired = self
                .hold
                .as_mut()
                .is_some_and(|h| h.as_mut().poll(cx).is_ready());
            if expired {
                return Poll::Ready(self.end_rounds(RoundsEnd::NoAnswer));
            }
            return Poll::Pending;
        }
    }

    /// Ends the rounds: what the client sent meanwhile goes to hyper, read first; half a
    /// frame among it may be a HEADERS, so it counts as the client moving on.
    fn end_rounds(&mut self, end: RoundsEnd) -> RoundsEnd {
        let r = &mut self.rounds;
        let end = if r.partial.is_empty() {
            end
        } else {
            RoundsEnd::ClientMoved
        };
        if !r.keep.is_empty() || !r.partial.is_empty() {
            let mut all = Vec::with_capacity(self.io.prefix.len() + r.keep.len() + r.partial.len());
            all.extend_from_slice(&self.io.prefix);
            all.append(&mut r.keep);
            all.append(&mut r.partial);
            self.io.prefix = bytes::Bytes::from(all);
        }
        r.round = ROUNDS + 1;
        r.out.clear();
        end
    }

    /// Lets go of a held write: rounds under way end (their bytes go to hyper), hyper may read.
    fn drop_hold(&mut self) {
        if (1..=ROUNDS).contains(&self.rounds.round) {
            let _ = self.end_rounds(RoundsEnd::ClientMoved);
        }
        if let Some(w) = self.rounds.reader.take() {
            w.wake();
        }
        self.hold = None;
    }

    /// Whether the client sent bytes nobody has read yet (they may open streams).
    fn socket_has_more(&mut self, cx: &mut Context<'_>) -> bool {
        self.io.inner.poll_has_input(cx)
    }

    /// Whether the client sent bytes hyper has not read yet (they may open streams).
    fn client_has_sent_more(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.io.prefix.is_empty() {
            return true;
        }
        // Pending (nothing to read) registers our waker for readability, which is harmless:
        // hyper's own read registration stays in place.
        self.io.inner.poll_has_input(cx)
    }
}

/// Takes the whole frames from `r.partial`: the acknowledgement of the PING now out moves to
/// the next round (and queues its PING), a late one of an earlier PING of ours is dropped, and
/// any other frame is kept for hyper. True once a
/// HEADERS frame came (a new stream: the client moved on).
fn take_frames(r: &mut Rounds) -> bool {
    loop {
        if r.partial.len() < 9 {
            return false;
        }
        let len = (usize::from(r.partial[0]) << 16)
            | (usize::from(r.partial[1]) << 8)
            | usize::from(r.partial[2]);
        if r.partial.len() < 9 + len {
            return false;
        }
        let frame: Vec<u8> = r.partial.drain(..9 + len).collect();
        if is_our_ack(&frame) {
            // Ours: hyper never sent it. Only the answer to the PING now out ends a round.
            if r.round <= ROUNDS && frame[..] == ping(r.seq, true)[..] {
                if r.round < ROUNDS {
                    r.start(r.round + 1);
                } else {
                    r.round += 1;
                }
            }
            continue;
        }
        let opens = frame[3] == HEADERS;
        r.keep.extend_from_slice(&frame);
        if opens {
            return true;
        }
    }
}

/// The first `n` bytes of `bufs`.
fn truncate<'b>(bufs: &'b [io::IoSlice<'_>], n: usize) -> Vec<io::IoSlice<'b>> {
    let mut out = Vec::new();
    let mut left = n;
    for b in bufs {
        if left == 0 {
            break;
        }
        let take = left.min(b.len());
        out.push(io::IoSlice::new(&b[..take]));
        left -= take;
    }
    out
}

/// Feeds the first `n` bytes of `bufs` to the outbound frame view.
fn feed(frames: &mut Frames, bufs: &[io::IoSlice<'_>], n: usize) {
    let mut left = n;
    for b in bufs {
        let take = left.min(b.len());
        let _ = frames.written(&b[..take]);
        left -= take;
        if left == 0 {
            break;
        }
    }
}

/// The connection state shared by hyper's side ([`Tap`]) and the connection loop.
struct Shared {
    inner: Mutex<Conn>,
    /// Notified once the GOAWAY has gone out (then hyper is not polled again).
    goaway_sent: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Conn> {
        // Plain data behind a short lock; a panic elsewhere leaves it usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The socket as hyper sees it: every byte passes [`Frames`] on its way.
struct Tap(Arc<Shared>);

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut g = self.0.lock();
        let c = &mut *g;
        if c.hold.is_some() && (1..=ROUNDS).contains(&c.rounds.round) {
            // The PING rounds read the socket themselves; hyper reads once they end.
            c.rounds.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut c.io).poll_read(cx, buf);
        c.frames.read(&buf.filled()[before..]);
        r
    }
}

impl Tap {
    fn tap_write(&self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        let mut g = self.0.lock();
        let was = matches!(g.goaway, Goaway::No);
        let r = g.poll_write(cx, bufs, len);
        if was && !matches!(g.goaway, Goaway::No) {
            self.0.goaway_sent.notify_one();
        }
        r
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.tap_write(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.tap_write(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.lock().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.lock().io).poll_shutdown(cx)
    }
}

/// The socket itself, for the connection loop once hyper is gone.
struct Raw(Arc<Shared>);

impl AsyncRead for Raw {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.lock().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Raw {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0.lock().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.lock().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.lock().io).poll_shutdown(cx)
    }
}

/// A GOAWAY frame: NO_ERROR, `last_stream` the last stream the client opened.
fn goaway(last_stream: u32) -> [u8; 17] {
    let mut f = [0u8; 17];
    f[2] = 8;
    f[3] = GOAWAY;
    f[9..13].copy_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    f
}

/// Ends a connection once its GOAWAY is written (or, idle, writes it now): the rest of a
/// partly sent GOAWAY goes out, our side is closed, then the client's bytes are read and
/// dropped until it closes (a reset would overtake the GOAWAY), at most [`LINGER`].
async fn close_with_goaway(shared: Arc<Shared>, conn: &ConnHandle) {
    {
        let mut g = shared.lock();
        if matches!(g.goaway, Goaway::No) {
            g.goaway = Goaway::Partly(goaway(g.frames.last_stream).to_vec());
        }
    }
    let flushed = std::future::poll_fn(|cx| shared.lock().poll_goaway(cx)).await;
    let mut raw = Raw(shared);
    if flushed.is_err() || raw.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let linger = async {
        while let Ok(n) = raw.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        _ = linger => {}
        _ = tokio::time::sleep(LINGER) => {}
        _ = conn.kill_requested() => {}
    }
}

/// Serves one h2c connection until it closes, or until a park, drain or kill ends it.
pub(super) async fn serve_h2(ctx: Arc<ListenerCtx>, conn: ConnHandle, io: PrefixedIo, svc: Svc) {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(ctx.cfg.http.max_header_bytes.min(u32::MAX as usize) as u32);
    let shared = Arc::new(Shared {
        inner: Mutex::new(Conn {
            io,
            frames: Frames::new(),
            stopping: false,
            goaway: Goaway::No,
            hold: None,
            rounds: Rounds::default(),
        }),
        goaway_sent: Notify::new(),
    });
    let hconn = builder.serve_connection(TokioIo::new(Tap(shared.clone())), svc);
    let mut hconn = std::pin::pin!(hconn);
    // Stopping: waiting for a response to glue the GOAWAY to, until the grace ends.
    let mut stopping = false;
    let mut fallback = false;
    let grace = tokio::time::sleep(Duration::MAX);
    tokio::pin!(grace);
    // keepalive_timeout without an open stream closes the connection, as between two
    // requests of HTTP/1.1: a client that sent the preface (or its last request) and then
    // nothing would otherwise hold its connection, and its max_connections permit, for ever.
    let keepalive = ctx.cfg.http.keepalive_timeout;
    let idle = tokio::time::sleep(keepalive);
    tokio::pin!(idle);
    let result = loop {
        tokio::select! {
            r = hconn.as_mut() => break r,
            _ = conn.requested(crate::registry::SIG_PARK | crate::registry::SIG_DRAIN), if !stopping => {
                stopping = true;
                shared.lock().stopping = true;
                grace.as_mut().reset(tokio::time::Instant::now() + IDLE_GRACE);
            }
            _ = shared.goaway_sent.notified() => {
                // hyper is not polled again (it is dropped at return): the GOAWAY is the
                // last frame the client sees.
                close_with_goaway(shared, &conn).await;
                return close_log(&ctx, &conn, "drained (goaway)");
            }
            _ = &mut grace, if stopping && !fallback => {
                if shared.lock().frames.quiet() {
                    close_with_goaway(shared, &conn).await;
                    return close_log(&ctx, &conn, "drained (goaway, idle)");
                }
                tracing::debug!(conn = conn.stats().id, "h2 connection never quiet; graceful shutdown");
                fallback = true;
                shared.lock().stopping = false;
                hconn.as_mut().graceful_shutdown();
            }
            _ = &mut idle, if !stopping => {
                let due = {
                    let g = shared.lock();
                    g.frames.quiet_since.filter(|_| g.frames.quiet()).map(|t| t + keepalive)
                };
                match due {
                    Some(due) if due <= tokio::time::Instant::now() => {
                        close_with_goaway(shared, &conn).await;
                        return close_log(&ctx, &conn, "idle timeout");
                    }
                    Some(due) => idle.as_mut().reset(due),
                    // A stream is open: look again a keepalive_timeout from now.
                    None => idle.as_mut().reset(tokio::time::Instant::now() + keepalive),
                }
            }
            _ = conn.kill_requested() => return close_log(&ctx, &conn, "closed at drain deadline"),
        }
    };
    let reason = match result {
        Ok(()) if stopping => "drained (goaway)",
        Ok(()) => "closed",
        Err(e) => {
            tracing::debug!(conn = conn.stats().id, error = %e, side = "client", "h2 connection error");
            "error"
        }
    };
    close_log(&ctx, &conn, reason);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn streams_open_on_client_headers_and_end_on_our_end_stream() {
        let mut f = Frames::new();
        let mut client = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        client.extend(frame(0x4, 0, 0, &[0; 6])); // SETTINGS
        client.extend(frame(HEADERS, 0x5, 1, &[1, 2, 3]));
        client.extend(frame(HEADERS, 0x5, 3, &[1, 2, 3]));
        // Byte by byte: boundaries span reads.
        for b in &client {
            f.read(std::slice::from_ref(b));
        }
        assert_eq!(f.open, vec![1, 3]);
        assert_eq!(f.last_stream, 3);
        assert!(!f.quiet());
        let resp = frame(HEADERS, 0x4, 1, &[9; 4]);
        let _ = f.written(&resp);
        let data = frame(DATA, END_STREAM, 1, b"hello");
        let _ = f.written(&data[..7]);
        assert_eq!(f.open, vec![1, 3]);
        let _ = f.written(&data[7..]);
        assert_eq!(f.open, vec![3]);
        let _ = f.written(&frame(RST_STREAM, 0, 3, &[0; 4])[..10]);
        assert!(f.open.is_empty());
        assert!(!f.quiet(), "half a frame written");
        let _ = f.written(&[0; 3]);
        assert!(f.quiet());
        assert_eq!(goaway(3)[9..13], [0, 0, 0, 3]);
    }

    #[test]
    fn rounds_drop_their_acks_keep_other_frames_and_stop_at_a_new_stream() {
        // A hold given up earlier left PING 1 unanswered: this hold's first round is PING 2.
        let mut r = Rounds {
            seq: 1,
            ..Rounds::default()
        };
        r.start(1);
        assert_eq!(r.out, ping(2, false));
        let update = frame(0x8, 0, 0, &[0, 0, 1, 0]);
        // A WINDOW_UPDATE, the late answer to PING 1 (ours, dropped, no round), then the answer
        // to PING 2 split across reads: the update is kept, and round 2's PING queued.
        r.partial.extend_from_slice(&update);
        r.partial.extend_from_slice(&ping(1, true));
        r.partial.extend_from_slice(&ping(2, true)[..5]);
        assert!(!take_frames(&mut r));
        assert_eq!((r.round, r.keep.clone()), (1, update.clone()));
        r.partial.extend_from_slice(&ping(2, true)[5..]);
        assert!(!take_frames(&mut r));
        assert_eq!(r.round, 2);
        assert_eq!(r.out, ping(3, false));
        assert!(r.partial.is_empty());
        // Another answer to PING 2 is dropped without a round; a client's own PING is not ours:
        // kept for hyper.
        r.partial.extend_from_slice(&ping(2, true));
        r.partial.extend_from_slice(&ping(3, false));
        assert!(!take_frames(&mut r));
        assert_eq!(r.round, 2);
        assert_eq!(r.keep.len(), update.len() + 17);
        r.partial.extend_from_slice(&ping(3, true));
        assert!(!take_frames(&mut r));
        assert_eq!(r.round, ROUNDS + 1);
        // A HEADERS frame: a new stream, the client moved on.
        let mut r = Rounds::default();
        r.start(1);
        r.partial.extend_from_slice(&frame(HEADERS, 0x5, 5, &[1]));
        assert!(take_frames(&mut r));
        assert_eq!(r.keep.len(), 10);
    }
}
