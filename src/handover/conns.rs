//! Live connections across the channel: [`send_conns`] borrows the parked connections and
//! sends them in messages of at most 253 fds; [`recv_conns`] turns a received message back
//! into [`Parked`] values; [`send_ack`] / [`expect_ack`] close the loop.
//!
//! A batch (one `seq`) may span several `Conns` messages. The successor acknowledges each
//! message with `Ack { seq, count }` once it owns its connections; the batch is complete when
//! the counts add up to the number of connections sent. Until then the predecessor still holds
//! its own copies of every fd, so on any failure it resumes serving them itself.

use super::channel::{Channel, Received};
use super::handshake::unexpected;
use super::message::{ConnEntry, HalfEntry, Message, MAX_BULK, MAX_FDS};
use super::HandoverError;
use crate::proxy::http::h1::state::State;
use crate::registry::{HttpState, IdleHttpState, Parked, PendingHalf, PooledState, TunnelState};
use rustix::net::{sockopt, AddressFamily, SocketType};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Bulk bytes per message before a batch is split (well under [`MAX_BULK`], so one message
/// never holds much memory on either side).
pub const SPLIT_BULK: u64 = 32 << 20;

/// Splits `parked` into consecutive runs that each fit one message: at most [`MAX_FDS`] fds
/// and, unless a single connection alone is larger, at most [`SPLIT_BULK`] bulk bytes.
pub fn split_batches(parked: &[Parked]) -> Vec<&[Parked]> {
    let mut out = Vec::new();
    let (mut start, mut fds, mut bulk) = (0usize, 0usize, 0u64);
    for (i, p) in parked.iter().enumerate() {
        let (f, b) = (fd_count(p), bulk_len(p));
        if i > start && (fds + f > MAX_FDS || bulk.saturating_add(b) > SPLIT_BULK) {
            out.push(&parked[start..i]);
            (start, fds, bulk) = (i, 0, 0);
        }
        fds += f;
        bulk = bulk.saturating_add(b);
    }
    if start < parked.len() {
        out.push(&parked[start..]);
    }
    out
}

fn fd_count(p: &Parked) -> usize {
    match p {
        Parked::Tunnel(_) => 2,
        Parked::IdleHttp(_) => 1,
        Parked::Http(h) => 1 + usize::from(h.upstream.is_some()),
        Parked::Pooled(_) => 1,
    }
}

fn bulk_len(p: &Parked) -> u64 {
    match p {
        Parked::Tunnel(t) => (t.to_upstream.bytes.len() + t.to_client.bytes.len()) as u64,
        Parked::IdleHttp(h) => h.read_ahead.len() as u64,
        Parked::Http(h) => h.state.buffers().iter().map(|b| b.len() as u64).sum(),
        Parked::Pooled(_) => 0,
    }
}

/// Sends every parked connection as batch `seq`, in as many messages as needed. The
/// connections are borrowed: the caller keeps its copies until [`expect_ack`] succeeds, and
/// resumes them itself on any error. Sends nothing for an empty slice.
pub async fn send_conns(
    ch: &mut Channel,
    seq: u64,
    parked: &[Parked],
) -> Result<(), HandoverError> {
    if let Some(p) = parked.iter().find(|p| bulk_len(p) > MAX_BULK) {
        return Err(HandoverError::TooLarge {
            what: "bulk",
            len: bulk_len(p),
            cap: MAX_BULK,
        });
    }
    for batch in split_batches(parked) {
        let mut fds: Vec<BorrowedFd<'_>> = Vec::with_capacity(MAX_FDS);
        let mut bulk = Vec::new();
        let mut conns = Vec::with_capacity(batch.len());
        for p in batch {
            conns.push(ConnEntry::describe(p));
            match p {
                Parked::Tunnel(t) => {
                    fds.push(t.client.as_fd());
                    fds.push(t.upstream.as_fd());
                    bulk.extend_from_slice(&t.to_upstream.bytes);
                    bulk.extend_from_slice(&t.to_client.bytes);
                }
                Parked::IdleHttp(h) => {
                    fds.push(h.client.as_fd());
                    bulk.extend_from_slice(&h.read_ahead);
                }
                Parked::Pooled(p) => fds.push(p.upstream.as_fd()),
                Parked::Http(h) => {
                    fds.push(h.client.as_fd());
                    if let Some(u) = &h.upstream {
                        fds.push(u.as_fd());
                    }
                    for b in h.state.buffers() {
                        bulk.extend_from_slice(b);
                    }
                }
            }
        }
        tracing::debug!(
            seq,
            conns = conns.len(),
            fds = fds.len(),
            bulk = bulk.len(),
            "sending connections"
        );
        ch.send(&Message::Conns { seq, conns }, &fds, &bulk).await?;
    }
    Ok(())
}

/// Turns a received `Conns` message back into parked connections, with std `TcpStream`s
/// (checked: each fd is a connected TCP stream socket). They keep the file status flags the
/// predecessor set (non-blocking). On error every fd of the message is closed; the
/// predecessor still holds its copies.
pub fn recv_conns(received: Received) -> Result<Vec<Parked>, HandoverError> {
    let Received { msg, fds, bulk } = received;
    let conns = match msg {
        Message::Conns { conns, .. } => conns,
        other => return Err(unexpected(other, "conns")),
    };
    // The decoder checked that the fds and bulk bytes are exactly what the entries need;
    // the iterators below still fail cleanly rather than trust that.
    let mut fds = fds.into_iter().enumerate();
    let mut bulk = Bulk {
        bytes: &bulk,
        at: 0,
    };
    let mut out = Vec::with_capacity(conns.len());
    for entry in conns {
        let parked = match entry {
            ConnEntry::Tunnel {
                meta,
                to_upstream,
                to_client,
                tls,
                up_tls,
                idle_ms,
            } => Parked::Tunnel(TunnelState {
                meta,
                client: take_stream(&mut fds)?,
                client_tls: tls,
                upstream: take_stream(&mut fds)?,
                upstream_tls: up_tls,
                to_upstream: bulk.half(&to_upstream)?,
                to_client: bulk.half(&to_client)?,
                idle_ms,
            }),
            ConnEntry::IdleHttp { meta, read_ahead } => Parked::IdleHttp(IdleHttpState {
                meta,
                client: take_stream(&mut fds)?,
                read_ahead: bulk.take(read_ahead)?.to_vec(),
            }),
            ConnEntry::Pooled { meta, tls } => Parked::Pooled(PooledState {
                meta,
                upstream: take_stream(&mut fds)?,
                tls,
            }),
            ConnEntry::Http {
                meta,
                state,
                tls,
                up_tls,
            } => {
                let client = take_stream(&mut fds)?;
                let upstream = if state.has_upstream {
                    Some(take_stream(&mut fds)?)
                } else {
                    None
                };
                let len = state
                    .lens
                    .iter()
                    .try_fold(0u64, |a, l| a.checked_add(*l))
                    .ok_or(HandoverError::Truncated { what: "bulk" })?;
                let bytes = bulk.take(len)?;
                let state = State::from_wire(*state, bytes).ok_or(HandoverError::BadHeader(
                    "http connection state does not match its buffers",
                ))?;
                Parked::Http(Box::new(HttpState {
                    meta,
                    client,
                    client_tls: tls,
                    upstream,
                    upstream_tls: up_tls,
                    state,
                }))
            }
        };
        out.push(parked);
    }
    if fds.next().is_some() || bulk.at != bulk.bytes.len() {
        return Err(HandoverError::BadHeader(
            "conns message carries more fds or bulk bytes than its entries",
        ));
    }
    Ok(out)
}

/// The bulk section, consumed in entry order.
struct Bulk<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Bulk<'a> {
    fn take(&mut self, len: u64) -> Result<&'a [u8], HandoverError> {
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| self.at.checked_add(l));
        let s = end
            .and_then(|e| self.bytes.get(self.at..e))
            .ok_or(HandoverError::Truncated { what: "bulk" })?;
        self.at += s.len();
        Ok(s)
    }

    fn half(&mut self, h: &HalfEntry) -> Result<PendingHalf, HandoverError> {
        Ok(PendingHalf {
            bytes: self.take(h.pending)?.to_vec(),
            read_eof: h.read_eof,
            shut: h.shut,
        })
    }
}

fn take_stream(
    fds: &mut impl Iterator<Item = (usize, OwnedFd)>,
) -> Result<std::net::TcpStream, HandoverError> {
    let (index, fd) = fds.next().ok_or(HandoverError::FdCountMismatch {
        header: 0,
        received: 0,
    })?;
    check_connected_tcp(index, &fd)?;
    Ok(std::net::TcpStream::from(fd))
}

/// Checks that a received fd is a TCP (IPv4 or IPv6) stream socket that is not listening.
///
/// It does not insist on a peer address: a connection reset (or fully closed) while parked
/// has none any more (`getpeername` gives `ENOTCONN`), and one dead connection must not abort
/// the whole upgrade. The resumed relay sees the error and closes it as it would have anyway.
fn check_connected_tcp(index: usize, fd: &OwnedFd) -> Result<(), HandoverError> {
    let bad = |detail: String| HandoverError::BadFd {
        index,
        expected: "a connected TCP stream socket",
        detail,
    };
    let ty = sockopt::socket_type(fd).map_err(|e| bad(e.to_string()))?;
    if ty != SocketType::STREAM {
        return Err(bad(format!("socket type {ty:?}")));
    }
    let domain = sockopt::socket_domain(fd).map_err(|e| bad(e.to_string()))?;
    if domain != AddressFamily::INET && domain != AddressFamily::INET6 {
        return Err(bad(format!("address family {domain:?}")));
    }
    if sockopt::socket_acceptconn(fd).map_err(|e| bad(e.to_string()))? {
        return Err(bad("it is a listening socket".into()));
    }
    Ok(())
}

/// The successor owns the `count` connections of one message of batch `seq`.
pub async fn send_ack(ch: &mut Channel, seq: u64, count: usize) -> Result<(), HandoverError> {
    let count = u32::try_from(count)
        .map_err(|_| HandoverError::BadAck(format!("count {count} too large")))?;
    ch.send(&Message::Ack { seq, count }, &[], &[]).await
}

/// Waits until the successor has acknowledged all `count` connections of batch `seq` (one
/// `Ack` per message). An ack for another batch, or for more connections than were sent, is
/// [`HandoverError::BadAck`]; `Abort` is [`HandoverError::Aborted`].
pub async fn expect_ack(ch: &mut Channel, seq: u64, count: usize) -> Result<(), HandoverError> {
    let mut acked = 0usize;
    while acked < count {
        let Received { msg, .. } = ch.recv().await?;
        match msg {
            Message::Ack { seq: s, count: c } if s == seq => {
                acked = acked.saturating_add(c as usize);
                if acked > count {
                    return Err(HandoverError::BadAck(format!(
                        "batch {seq}: {acked} acked, {count} sent"
                    )));
                }
                if c == 0 {
                    return Err(HandoverError::BadAck(format!("batch {seq}: empty ack")));
                }
            }
            Message::Ack { seq: s, .. } => {
                return Err(HandoverError::BadAck(format!(
                    "ack for batch {s} while waiting for {seq}"
                )));
            }
            other => return Err(unexpected(other, "ack")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ConnKind, ConnMeta};
    use std::net::{TcpListener, TcpStream};

    fn meta() -> ConnMeta {
        ConnMeta {
            listener: "l".into(),
            client: "127.0.0.1:9".parse().unwrap(),
            server: None,
            kind: ConnKind::Http,
            started_ms: 0,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    fn idle(l: &TcpListener, read_ahead: usize) -> (Parked, TcpStream) {
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (
            Parked::IdleHttp(IdleHttpState {
                meta: meta(),
                client: s,
                read_ahead: vec![b'x'; read_ahead],
            }),
            c,
        )
    }

    #[test]
    fn batches_respect_fd_and_bulk_limits() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut parked, mut keep) = (Vec::new(), Vec::new());
        for _ in 0..300 {
            let (p, c) = idle(&l, 0);
            parked.push(p);
            keep.push(c);
        }
        let b = split_batches(&parked);
        assert_eq!(b.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![253, 47]);
        assert!(split_batches(&[]).is_empty());

        let (big1, _c1) = idle(&l, SPLIT_BULK as usize);
        let (big2, _c2) = idle(&l, 1);
        let two = [big1, big2];
        assert_eq!(split_batches(&two).len(), 2);
    }

    #[tokio::test]
    async fn idle_connection_round_trips_and_acks_add_up() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (p, _c) = idle(&l, 5);
        let (mut a, mut b) = Channel::pair().unwrap();
        send_conns(&mut a, 7, std::slice::from_ref(&p))
            .await
            .unwrap();
        let got = recv_conns(b.recv().await.unwrap()).unwrap();
        match &got[..] {
            [Parked::IdleHttp(h)] => assert_eq!(h.read_ahead, b"xxxxx"),
            other => panic!("{other:?}"),
        }
        send_ack(&mut b, 7, 1).await.unwrap();
        expect_ack(&mut a, 7, 1).await.unwrap();

        send_ack(&mut b, 8, 1).await.unwrap();
        assert!(matches!(
            expect_ack(&mut a, 7, 1).await,
            Err(HandoverError::BadAck(_))
        ));
        send_ack(&mut b, 7, 2).await.unwrap();
        assert!(matches!(
            expect_ack(&mut a, 7, 1).await,
            Err(HandoverError::BadAck(_))
        ));
        expect_ack(&mut a, 7, 0).await.unwrap();
    }

    #[tokio::test]
    async fn a_connection_reset_while_parked_still_crosses() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (p, c) = idle(&l, 0);
        socket2::SockRef::from(&c)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(c);
        let Parked::IdleHttp(h) = &p else {
            unreachable!()
        };
        // Loopback delivers the RST at once; wait (bounded) until the socket has no peer.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while rustix::net::getpeername(&h.client).is_ok() {
            assert!(std::time::Instant::now() < deadline, "reset never arrived");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let (mut a, mut b) = Channel::pair().unwrap();
        send_conns(&mut a, 1, std::slice::from_ref(&p))
            .await
            .unwrap();
        assert_eq!(recv_conns(b.recv().await.unwrap()).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_unix_socket_is_not_accepted_as_a_connection() {
        let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mut a, mut b) = Channel::pair().unwrap();
        let msg = Message::Conns {
            seq: 1,
            conns: vec![ConnEntry::IdleHttp {
                meta: meta(),
                read_ahead: 0,
            }],
        };
        a.send(&msg, &[x.as_fd()], &[]).await.unwrap();
        let err = recv_conns(b.recv().await.unwrap()).unwrap_err();
        assert!(
            matches!(err, HandoverError::BadFd { index: 0, .. }),
            "{err}"
        );
    }
}
