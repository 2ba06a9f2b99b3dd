//! The held write: while a connection stops, the write that ends its last open stream waits
//! for the client to answer [`ROUNDS`] PINGs, then goes out with the GOAWAY appended (see the
//! module above for why).

use super::frames::{goaway, Frames, ACK, HEADERS, PING};
use crate::proxy::http::io::PrefixedIo;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long the write that ends the last open stream (and carries the GOAWAY) waits at most
/// for the client to answer the [`ROUNDS`] PINGs sent before it; a client that does not
/// answer in time gets the GOAWAY all the same.
pub(super) const HOLD: Duration = Duration::from_secs(1);
/// PING round trips the client completes before the write that ends the last open stream
/// goes out with the GOAWAY. httpx (httpcore) reads under a lock and, on getting that lock,
/// fails its request if a GOAWAY has been read meanwhile, even when the request's response
/// is already in: so no other request may still wait for the lock when the GOAWAY is read.
/// The lock is held by a reader blocked on the socket, and each PING makes that read return:
/// after the first round the requests whose responses are in pass the lock; the second PING
/// is read by the request still waiting (the one whose response carries the GOAWAY), behind
/// which nothing waits any more.
pub(super) const ROUNDS: u8 = 2;
/// Our PING payloads start with this tag; the last four bytes number the PINGs of a
/// connection. A hold given up (the client opened a stream) leaves its PING unanswered, and
/// its acknowledgement may come during the next hold: a number of its own per PING keeps that
/// late acknowledgement from counting as the next hold's round (which let the GOAWAY go after
/// one real round trip instead of two, and httpx failed the requests still waiting to read).
pub(super) const PING_TAG: [u8; 4] = *b"btn\0";

/// Where the GOAWAY is.
#[derive(Debug, Default)]
pub(super) enum Goaway {
    /// Not sent.
    #[default]
    No,
    /// Sent, except these bytes (the socket took only part of it).
    Partly(Vec<u8>),
    /// Sent whole.
    Sent,
}

/// The socket, its frame view and the GOAWAY state, under one short lock.
pub(super) struct Conn {
    pub(super) io: PrefixedIo,
    pub(super) frames: Frames,
    /// The connection is stopping: the write that ends the last stream carries the GOAWAY.
    pub(super) stopping: bool,
    pub(super) goaway: Goaway,
    /// While stopping: the hold of the write that ends the last stream (see [`HOLD`]).
    pub(super) hold: Option<Pin<Box<tokio::time::Sleep>>>,
    /// While that write is held: the PING rounds (see [`ROUNDS`]).
    pub(super) rounds: Rounds,
}

/// The PING rounds before the GOAWAY, while the write that ends the last stream is held.
#[derive(Debug, Default)]
pub(super) struct Rounds {
    /// The round whose PING is out (0: none sent yet).
    pub(super) round: u8,
    /// The number of the last PING this connection sent (kept from one hold to the next).
    pub(super) seq: u32,
    /// Our PING not yet written whole.
    pub(super) out: Vec<u8>,
    /// Client bytes read while holding: whole frames not ours, for hyper (it reads them after).
    pub(super) keep: Vec<u8>,
    /// Client bytes read while holding, not yet a whole frame.
    pub(super) partial: Vec<u8>,
    /// hyper's read, waiting while we read the socket ourselves.
    pub(super) reader: Option<std::task::Waker>,
}

/// How the PING rounds ended.
#[derive(Debug, Clone, Copy)]
pub(super) enum RoundsEnd {
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
pub(super) fn ping(seq: u32, ack: bool) -> [u8; 17] {
    let mut f = [0u8; 17];
    f[2] = 8;
    f[3] = PING;
    f[4] = if ack { ACK } else { 0 };
    f[9..13].copy_from_slice(&PING_TAG);
    f[13..17].copy_from_slice(&seq.to_be_bytes());
    f
}

/// Whether `frame` (whole) acknowledges one of our PINGs, of this hold or an earlier one.
pub(super) fn is_our_ack(frame: &[u8]) -> bool {
    frame.len() == 17 && frame[3] == PING && frame[4] & ACK != 0 && frame[9..13] == PING_TAG
}

impl Rounds {
    /// Starts round `round`: its PING, with the connection's next number, is queued.
    pub(super) fn start(&mut self, round: u8) {
        self.round = round;
        self.seq = self.seq.wrapping_add(1);
        self.out = ping(self.seq, false).to_vec();
    }
}

impl Conn {
    /// Writes what is left of a partly sent GOAWAY; ready once it is all out.
    pub(super) fn poll_goaway(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
    pub(super) fn poll_write(
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
    pub(super) fn poll_rounds(&mut self, cx: &mut Context<'_>) -> Poll<RoundsEnd> {
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
    pub(super) fn end_rounds(&mut self, end: RoundsEnd) -> RoundsEnd {
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
    pub(super) fn drop_hold(&mut self) {
        if (1..=ROUNDS).contains(&self.rounds.round) {
            let _ = self.end_rounds(RoundsEnd::ClientMoved);
        }
        if let Some(w) = self.rounds.reader.take() {
            w.wake();
        }
        self.hold = None;
    }

    /// Whether the client sent bytes nobody has read yet (they may open streams).
    pub(super) fn socket_has_more(&mut self, cx: &mut Context<'_>) -> bool {
        self.io.inner.poll_has_input(cx)
    }

    /// Whether the client sent bytes hyper has not read yet (they may open streams).
    pub(super) fn client_has_sent_more(&mut self, cx: &mut Context<'_>) -> bool {
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
pub(super) fn take_frames(r: &mut Rounds) -> bool {
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
pub(super) fn truncate<'b>(bufs: &'b [io::IoSlice<'_>], n: usize) -> Vec<io::IoSlice<'b>> {
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
pub(super) fn feed(frames: &mut Frames, bufs: &[io::IoSlice<'_>], n: usize) {
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

#[cfg(test)]
mod tests {
    use super::super::frames::tests::frame;
    use super::*;

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
