//! The protocol as two typed sessions, one per side, each step with a deadline: the only
//! implementation of the handover, used by the single process ([`crate::lifecycle`]) and by
//! the supervisor for its workers ([`crate::supervisor`]).
//!
//! ```text
//!  Predecessor                           Successor
//!  hello()            ◀── Hello ───      hello()
//!                     ─── Hello ──▶
//!  offer_listeners()  ─ Listeners ─▶     listeners()
//!  await_ready()      ◀── Ready ───      ready()          (or refuse(): Refused)
//!  send_batch()*      ─── Conns ──▶      next() → Batch   (one Ack per message)
//!                     ◀── Ack ─────      ack()
//!  commit()           ── Commit ──▶      next() → Commit
//!                     ◀─ Ack(0) ───      ack_commit()
//!  send_batch()*      (late: connections that finished a request in the old process)
//!  done()             ─── Done ───▶      next() → Done
//! ```
//!
//! A batch may span several `Conns` messages (at most 253 fds each); the successor acks each
//! message, and the batch is complete once the counts add up. Every failure is a
//! [`SessionError`]: the stage it happened at and the cause (the peer exited, refused with a
//! reason, aborted, said nothing in time, or broke the protocol). The sessions only move
//! values; what to park, the deadlines and rollback are the lifecycle's decisions.

use super::channel::{Channel, Received};
use super::conns::{expect_ack, recv_conns, send_ack, send_conns};
use super::handshake::{self, unexpected, PeerHello};
use super::message::{ListenerEntry, Message};
use super::HandoverError;
use crate::config::Protocol;
use crate::metrics::Counters;
use crate::registry::Parked;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

/// How long the predecessor keeps reading the channel after its successor exited, for the
/// reason the successor wrote just before (it is in the socket buffer already, or never).
const LAST_WORDS: Duration = Duration::from_millis(500);

/// Where in the protocol a session was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The `Hello` exchange.
    Hello,
    /// Passing the listeners.
    Listeners,
    /// Waiting for (or sending) `Ready`.
    Ready,
    /// A batch of connections, by its sequence number.
    Batch(u64),
    /// `Commit` and its acknowledgement.
    Commit,
    /// `Done`, or waiting for it.
    Done,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Hello => f.write_str("hello"),
            Stage::Listeners => f.write_str("listeners"),
            Stage::Ready => f.write_str("ready"),
            Stage::Batch(seq) => write!(f, "connection batch {seq}"),
            Stage::Commit => f.write_str("commit"),
            Stage::Done => f.write_str("done"),
        }
    }
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// The peer process exited (or its end of the channel closed).
    #[error("{0}")]
    PeerExited(String),
    /// The successor refused to start; the reason is for the operator.
    #[error("successor refused to start: {0}")]
    Refused(String),
    /// The peer gave up the upgrade.
    #[error("peer aborted: {0}")]
    Aborted(String),
    /// The peer said nothing within the step's deadline.
    #[error("no answer within {setting} ({limit:?})")]
    Timeout {
        /// The deadline.
        limit: Duration,
        /// The setting it comes from, for the operator.
        setting: &'static str,
    },
    /// The channel failed or the peer broke the protocol.
    #[error("{0}")]
    Protocol(HandoverError),
}

impl From<HandoverError> for Cause {
    fn from(e: HandoverError) -> Cause {
        match e {
            HandoverError::Refused(r) => Cause::Refused(r),
            HandoverError::Aborted(r) => Cause::Aborted(r),
            HandoverError::Closed => Cause::PeerExited("handover channel closed".into()),
            // Writing to a channel whose other end is closed: the peer is gone just the same.
            HandoverError::Io(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                Cause::PeerExited(format!("handover channel closed: {e}"))
            }
            other => Cause::Protocol(other),
        }
    }
}

/// A failed step: where, and why.
#[derive(Debug, thiserror::Error)]
#[error("at {stage}: {cause}")]
pub struct SessionError {
    /// The step.
    pub stage: Stage,
    /// What went wrong.
    pub cause: Cause,
}

/// A step's deadline and the setting it comes from (named in a timeout's message).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// How long one step may wait for the peer.
    pub limit: Duration,
    /// The config setting behind it.
    pub setting: &'static str,
}

impl Deadline {
    /// `limit`, from `setting`.
    pub fn new(limit: Duration, setting: &'static str) -> Deadline {
        Deadline { limit, setting }
    }
}

/// The successor process as the predecessor sees it.
#[derive(Debug)]
pub enum Peer {
    /// A child this process spawned in a process group of its own: its exit is awaited, and
    /// [`Predecessor::kill`] ends its whole group.
    Child(tokio::process::Child),
    /// A process watched by someone else (a worker the supervisor connected us to): its end
    /// of the channel closing is how it shows it is gone.
    Remote,
}

impl Peer {
    /// Resolves when the child exits; never for a remote peer. Cancel-safe.
    async fn exited(&mut self) -> String {
        match self {
            Peer::Child(c) => match c.wait().await {
                Ok(st) => format!("successor exited ({st})"),
                Err(e) => format!("successor lost: {e}"),
            },
            Peer::Remote => std::future::pending().await,
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Peer::Child(c) => c.id().unwrap_or(0),
            Peer::Remote => 0,
        }
    }
}

/// How a step ended before the channel was looked at again.
enum Outcome<T> {
    Done(Result<T, SessionError>),
    /// The peer is gone (how, for the message): its last words on the channel say why.
    Gone(String),
}

/// Runs one step's future against the peer: bounded by the deadline and, for a child, by its
/// exit. See [`settle`] for what happens when the peer is gone.
async fn race<T>(
    fut: impl Future<Output = Result<T, HandoverError>>,
    peer: &mut Peer,
    stage: Stage,
    deadline: Deadline,
) -> Outcome<T> {
    let fail = |cause: Cause| Outcome::Done(Err(SessionError { stage, cause }));
    tokio::select! {
        biased;
        r = fut => match r {
            Ok(v) => Outcome::Done(Ok(v)),
            Err(e @ (HandoverError::Refused(_) | HandoverError::Aborted(_))) => fail(e.into()),
            // The channel usually breaks because the successor died: say how, if it did.
            Err(e) => match peer {
                Peer::Child(_) => match tokio::time::timeout(LAST_WORDS, peer.exited()).await {
                    Ok(st) => Outcome::Gone(format!("{st}: {e}")),
                    Err(_) => fail(e.into()),
                },
                Peer::Remote => fail(e.into()),
            },
        },
        st = peer.exited() => Outcome::Gone(st),
        _ = tokio::time::sleep(deadline.limit) => {
            fail(Cause::Timeout { limit: deadline.limit, setting: deadline.setting })
        }
    }
}

/// The step's result. When the peer exited first, the channel is read a moment longer: a
/// `Refused` or `Abort` written just before the exit gives the real reason.
async fn settle<T>(ch: &mut Channel, stage: Stage, o: Outcome<T>) -> Result<T, SessionError> {
    match o {
        Outcome::Done(r) => r,
        Outcome::Gone(exit) => Err(SessionError {
            stage,
            cause: last_words(ch).await.unwrap_or(Cause::PeerExited(exit)),
        }),
    }
}

/// One step of a session: `$fut` (which borrows `$ch`) raced against `$peer` and the deadline.
macro_rules! step {
    ($ch:expr, $peer:expr, $stage:expr, $deadline:expr, $fut:expr) => {{
        let stage = $stage;
        let o = race($fut, $peer, stage, $deadline).await;
        settle($ch, stage, o).await
    }};
}

/// The reason a peer that is gone may have left on the channel.
async fn last_words(ch: &mut Channel) -> Option<Cause> {
    loop {
        let r = tokio::time::timeout(LAST_WORDS, ch.recv()).await.ok()?;
        match r.ok()?.msg {
            Message::Refused { reason } => return Some(Cause::Refused(reason)),
            Message::Abort { reason } => return Some(Cause::Aborted(reason)),
            // Anything else it said before (a heartbeat, an ack) is not the reason.
            _ => continue,
        }
    }
}

/// The predecessor's side: hello, offer listeners, await ready, batches, commit, done.
#[derive(Debug)]
pub struct Predecessor {
    ch: Channel,
    peer: Peer,
    deadline: Deadline,
    /// The last batch's sequence number (0 is the commit's acknowledgement).
    seq: u64,
    /// Session-ticket keys to send with the listeners (see [`Self::set_ticket_keys`]).
    ticket_keys: zeroize::Zeroizing<Vec<u8>>,
    /// The pid the successor's `Hello` gave (0 until then).
    hello_pid: u32,
}

/// One listener to offer: name, bound address, protocol, and the fd (which stays ours).
pub type Offer<'a> = (&'a str, SocketAddr, Protocol, BorrowedFd<'a>);

impl Predecessor {
    /// A session over `ch` with the successor `peer`; each step waits at most `deadline`.
    pub fn new(ch: Channel, peer: Peer, deadline: Deadline) -> Predecessor {
        Predecessor {
            ch,
            peer,
            deadline,
            seq: 0,
            ticket_keys: zeroize::Zeroizing::new(Vec::new()),
            hello_pid: 0,
        }
    }

    /// Session-ticket keys for the successor, sent with the listeners (whole keys of
    /// [`crate::tls::tickets::KEY_WIRE_LEN`] bytes; wiped when the session ends).
    pub fn set_ticket_keys(&mut self, keys: zeroize::Zeroizing<Vec<u8>>) {
        self.ticket_keys = keys;
    }

    /// The successor's pid: the child's, or (a remote peer) the one its `Hello` gave; 0
    /// before that.
    pub fn peer_pid(&self) -> u32 {
        match self.peer.pid() {
            0 => self.hello_pid,
            pid => pid,
        }
    }

    /// Receives the successor's `Hello` (a `Refused` ends here with its reason), checks its
    /// protocol version (telling it why with `Abort` if it cannot talk), answers ours.
    pub async fn hello(&mut self) -> Result<PeerHello, SessionError> {
        let hello = step!(
            &mut self.ch,
            &mut self.peer,
            Stage::Hello,
            self.deadline,
            handshake::predecessor_hello(&mut self.ch)
        )?;
        self.hello_pid = hello.pid;
        Ok(hello)
    }

    /// Offers the listeners, one fd each, in one message. The fds stay open here until the
    /// end, so this process can take over again.
    pub async fn offer_listeners(&mut self, offers: &[Offer<'_>]) -> Result<(), SessionError> {
        step!(
            &mut self.ch,
            &mut self.peer,
            Stage::Listeners,
            self.deadline,
            {
                let ch = &mut self.ch;
                handshake::send_listeners_with_keys(ch, offers, &self.ticket_keys)
            }
        )
    }

    /// Waits for `Ready`; returns the names of the listeners the successor adopted.
    pub async fn await_ready(&mut self) -> Result<Vec<String>, SessionError> {
        step!(
            &mut self.ch,
            &mut self.peer,
            Stage::Ready,
            self.deadline,
            handshake::recv_ready(&mut self.ch)
        )
    }

    /// Sends `parked` as the next batch and waits until the successor owns every one. The
    /// connections are borrowed: keep them until this succeeds, resume them on any error.
    /// An empty slice sends nothing.
    pub async fn send_batch(&mut self, parked: &[Parked]) -> Result<(), SessionError> {
        if parked.is_empty() {
            return Ok(());
        }
        self.seq += 1;
        let seq = self.seq;
        let ch = &mut self.ch;
        let fut = async move {
            send_conns(ch, seq, parked).await?;
            expect_ack(ch, seq, parked.len()).await
        };
        step!(
            &mut self.ch,
            &mut self.peer,
            Stage::Batch(seq),
            self.deadline,
            fut
        )
    }

    /// The rollback point: from the successor's acknowledgement on it accepts and serves
    /// what it received.
    pub async fn commit(&mut self) -> Result<(), SessionError> {
        let ch = &mut self.ch;
        let fut = async move {
            ch.send(&Message::Commit, &[], &[]).await?;
            match ch.recv().await?.msg {
                Message::Ack { seq: 0, .. } => Ok(()),
                other => Err(unexpected(other, "ack of commit")),
            }
        };
        step!(
            &mut self.ch,
            &mut self.peer,
            Stage::Commit,
            self.deadline,
            fut
        )
    }

    /// The last message: this process's counters and upgrade history continue in the successor.
    pub async fn done(
        &mut self,
        counters: Counters,
        history: Vec<serde_json::Value>,
    ) -> Result<(), SessionError> {
        let msg = Message::Done { counters, history };
        step!(&mut self.ch, &mut self.peer, Stage::Done, self.deadline, {
            let ch = &mut self.ch;
            async move { ch.send(&msg, &[], &[]).await }
        })
    }

    /// Resolves once a spawned successor has exited (never for a remote one). Cancel-safe:
    /// for a `select!` while this process drains after the commit.
    pub async fn exited(&mut self) -> String {
        self.peer.exited().await
    }

    /// Gives up: tells the successor why (best effort, briefly), then ends a spawned successor
    /// with its whole process group and reaps it.
    pub async fn abort(mut self, reason: &str) {
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            handshake::send_abort(&mut self.ch, reason),
        )
        .await;
        self.kill().await;
    }

    /// Ends a spawned successor and its process group, and reaps it (bounded).
    pub async fn kill(self) {
        if let Peer::Child(mut c) = self.peer {
            if let Some(pid) = c.id() {
                super::spawn::kill_group(pid);
            }
            let _ = c.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
        }
    }
}

/// What the predecessor sends once the successor is ready.
#[derive(Debug)]
pub enum Incoming {
    /// Connections, to hold (before the commit) or serve (after); acknowledge with
    /// [`Successor::ack`].
    Batch {
        /// The batch's sequence number.
        seq: u64,
        /// The connections of one message.
        conns: Vec<Parked>,
    },
    /// The rollback point has passed: start serving, then [`Successor::ack_commit`].
    Commit,
    /// The predecessor is finished.
    Done {
        /// Its counters, to continue from.
        counters: Counters,
        /// Its upgrade history.
        history: Vec<serde_json::Value>,
    },
}

/// The successor's side: hello, listeners, ready (or refuse), batches, commit, done.
#[derive(Debug)]
pub struct Successor {
    ch: Channel,
    deadline: Deadline,
    /// What the predecessor said about itself.
    pub predecessor: PeerHello,
    /// The predecessor's session-ticket keys, once the listeners arrived.
    ticket_keys: zeroize::Zeroizing<Vec<u8>>,
}

impl Successor {
    /// Sends our `Hello` and receives the predecessor's (an incompatible one is told why).
    pub async fn hello(mut ch: Channel, deadline: Deadline) -> Result<Successor, SessionError> {
        let predecessor = step!(
            &mut ch,
            &mut Peer::Remote,
            Stage::Hello,
            deadline,
            handshake::successor_hello(&mut ch)
        )?;
        Ok(Successor {
            ch,
            deadline,
            predecessor,
            ticket_keys: zeroize::Zeroizing::new(Vec::new()),
        })
    }

    /// Receives the listeners, each with its fd (checked: a listening stream socket).
    pub async fn listeners(&mut self) -> Result<Vec<(ListenerEntry, OwnedFd)>, SessionError> {
        let (listeners, keys) = step!(
            &mut self.ch,
            &mut Peer::Remote,
            Stage::Listeners,
            self.deadline,
            handshake::recv_listeners_with_keys(&mut self.ch)
        )?;
        self.ticket_keys = keys;
        Ok(listeners)
    }

    /// The session-ticket keys that came with the listeners (empty if none did).
    pub fn take_ticket_keys(&mut self) -> zeroize::Zeroizing<Vec<u8>> {
        std::mem::replace(&mut self.ticket_keys, zeroize::Zeroizing::new(Vec::new()))
    }

    /// Reports that the listeners named in `adopted` were taken over and this process is
    /// ready (it accepts only after the commit).
    pub async fn ready(&mut self, adopted: Vec<String>) -> Result<(), SessionError> {
        step!(
            &mut self.ch,
            &mut Peer::Remote,
            Stage::Ready,
            self.deadline,
            {
                let ch = &mut self.ch;
                handshake::send_ready(ch, adopted)
            }
        )
    }

    /// Tells the predecessor why this process cannot take over (best effort).
    pub async fn refuse(&mut self, reason: &str) {
        let _ = tokio::time::timeout(
            self.deadline.limit,
            handshake::send_refused(&mut self.ch, reason),
        )
        .await;
    }

    /// Gives up, telling the predecessor why (best effort).
    pub async fn abort(&mut self, reason: &str) {
        let _ = tokio::time::timeout(
            self.deadline.limit,
            handshake::send_abort(&mut self.ch, reason),
        )
        .await;
    }

    /// The predecessor's next message, within `deadline` (`stage` names what is awaited).
    pub async fn next(
        &mut self,
        stage: Stage,
        deadline: Deadline,
    ) -> Result<Incoming, SessionError> {
        let ch = &mut self.ch;
        let fut = async move {
            let received: Received = ch.recv().await?;
            match received.msg {
                Message::Conns { seq, .. } => Ok(Incoming::Batch {
                    seq,
                    conns: recv_conns(received)?,
                }),
                Message::Commit => Ok(Incoming::Commit),
                Message::Done { counters, history } => Ok(Incoming::Done { counters, history }),
                other => Err(unexpected(other, "conns, commit or done")),
            }
        };
        step!(&mut self.ch, &mut Peer::Remote, stage, deadline, fut)
    }

    /// This process owns the `count` connections of one message of batch `seq`.
    pub async fn ack(&mut self, seq: u64, count: usize) -> Result<(), SessionError> {
        step!(
            &mut self.ch,
            &mut Peer::Remote,
            Stage::Batch(seq),
            self.deadline,
            {
                let ch = &mut self.ch;
                send_ack(ch, seq, count)
            }
        )
    }

    /// This process accepts now (sequence 0 is never a batch: it acknowledges the commit).
    pub async fn ack_commit(&mut self) -> Result<(), SessionError> {
        step!(
            &mut self.ch,
            &mut Peer::Remote,
            Stage::Commit,
            self.deadline,
            {
                let ch = &mut self.ch;
                send_ack_commit(ch)
            }
        )
    }
}

async fn send_ack_commit(ch: &mut Channel) -> Result<(), HandoverError> {
    ch.send(&Message::Ack { seq: 0, count: 0 }, &[], &[]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> Deadline {
        Deadline::new(Duration::from_millis(300), "upgrade_timeout")
    }

    #[tokio::test]
    async fn both_sides_run_the_whole_protocol_with_no_connection() {
        let (p, s) = Channel::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let pred = async {
            let mut p = Predecessor::new(p, Peer::Remote, quick());
            p.hello().await?;
            use std::os::fd::AsFd;
            p.offer_listeners(&[("web", addr, Protocol::Http, l.as_fd())])
                .await?;
            let adopted = p.await_ready().await?;
            p.send_batch(&[]).await?;
            p.commit().await?;
            p.done(Counters::default(), Vec::new()).await?;
            Ok::<_, SessionError>(adopted)
        };
        let succ = async {
            let mut s = Successor::hello(s, quick()).await?;
            let ls = s.listeners().await?;
            s.ready(ls.iter().map(|(e, _)| e.name.clone()).collect())
                .await?;
            assert!(matches!(
                s.next(Stage::Commit, quick()).await?,
                Incoming::Commit
            ));
            s.ack_commit().await?;
            assert!(matches!(
                s.next(Stage::Done, quick()).await?,
                Incoming::Done { .. }
            ));
            Ok::<_, SessionError>(())
        };
        let (a, b) = tokio::join!(pred, succ);
        assert_eq!(a.unwrap(), vec!["web".to_string()]);
        b.unwrap();
    }

    #[tokio::test]
    async fn a_silent_peer_is_a_timeout_at_its_stage() {
        let (p, _s) = Channel::pair().unwrap();
        let mut p = Predecessor::new(p, Peer::Remote, quick());
        let e = p.hello().await.unwrap_err();
        assert_eq!(e.stage, Stage::Hello);
        assert!(matches!(e.cause, Cause::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("upgrade_timeout"), "{e}");

        let (_p, s) = Channel::pair().unwrap();
        let e = Successor::hello(s, quick()).await.unwrap_err();
        assert!(matches!(e.cause, Cause::Timeout { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_refusal_then_exit_keeps_its_reason() {
        let (p, mut s) = Channel::pair().unwrap();
        handshake::send_refused(&mut s, "invalid config: listeners.web")
            .await
            .unwrap();
        drop(s);
        let mut p = Predecessor::new(p, Peer::Remote, quick());
        let e = p.hello().await.unwrap_err();
        match e.cause {
            Cause::Refused(r) => assert!(r.contains("listeners.web")),
            other => panic!("{other:?}"),
        }
        // A peer that closes without a word is gone.
        let (p, s) = Channel::pair().unwrap();
        drop(s);
        let mut p = Predecessor::new(p, Peer::Remote, quick());
        let e = p.await_ready().await.unwrap_err();
        assert!(matches!(e.cause, Cause::PeerExited(_)), "{e}");
    }
}
