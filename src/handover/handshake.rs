//! The control steps of the protocol around the connection batches: the `Hello` exchange,
//! the listeners, `Ready`/`Refused`, `Abort` and `Done`. Each `recv_*` accepts exactly the
//! message its step allows; a `Refused` or `Abort` from the peer becomes the matching
//! [`HandoverError`], anything else is [`HandoverError::Unexpected`]. Timeouts are the
//! caller's (wrap the future in `tokio::time::timeout`).

use super::channel::{Channel, Received};
use super::message::{ListenerEntry, Message, PROTOCOL_VERSION};
use super::HandoverError;
use crate::config::Protocol;
use crate::metrics::Counters;
use rustix::net::{sockopt, SocketType};
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};

/// What a peer said about itself in its `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHello {
    /// Its protocol version (equal to ours once accepted).
    pub protocol_version: u16,
    /// Its program version.
    pub version: String,
    /// Its process id.
    pub pid: u32,
}

/// Turns a message that does not belong here into the right error.
pub fn unexpected(msg: Message, expected: &'static str) -> HandoverError {
    match msg {
        Message::Refused { reason } => HandoverError::Refused(reason),
        Message::Abort { reason } => HandoverError::Aborted(reason),
        other => HandoverError::Unexpected {
            expected,
            got: other.name(),
        },
    }
}

/// Receives a message that carries no fds (the header check already guarantees it).
async fn recv_msg(ch: &mut Channel) -> Result<Message, HandoverError> {
    let Received { msg, .. } = ch.recv().await?;
    Ok(msg)
}

/// This process's `Hello`.
pub fn hello() -> Message {
    Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        version: env!("CARGO_PKG_VERSION").to_string(),
        // A worker in its own PID namespace is 1 to itself; its peers know it by this one.
        pid: crate::isolation::report::outer_pid(),
    }
}

/// Receives the peer's `Hello` and checks that we can talk to it.
pub async fn recv_hello(ch: &mut Channel) -> Result<PeerHello, HandoverError> {
    match recv_msg(ch).await? {
        Message::Hello {
            protocol_version,
            version,
            pid,
        } => {
            if protocol_version != PROTOCOL_VERSION {
                return Err(HandoverError::IncompatiblePeer {
                    theirs: protocol_version,
                    ours: PROTOCOL_VERSION,
                    version,
                    pid,
                });
            }
            Ok(PeerHello {
                protocol_version,
                version,
                pid,
            })
        }
        other => Err(unexpected(other, "hello")),
    }
}

/// The successor's side of the opening: sends its `Hello`, then receives and checks the
/// predecessor's (if its version cannot talk to ours, tells it why with `Abort`).
pub async fn successor_hello(ch: &mut Channel) -> Result<PeerHello, HandoverError> {
    ch.send(&hello(), &[], &[]).await?;
    let r = recv_hello(ch).await;
    if let Err(e @ HandoverError::IncompatiblePeer { .. }) = &r {
        // Best effort: the peer may already be gone, and the version error matters more.
        let _ = send_abort(ch, &e.to_string()).await;
    }
    r
}

/// The predecessor's side of the opening: receives the successor's `Hello` (a `Refused`
/// gives [`HandoverError::Refused`]); if its version cannot talk to ours, tells it why with
/// `Abort` before failing; otherwise answers with our `Hello`.
pub async fn predecessor_hello(ch: &mut Channel) -> Result<PeerHello, HandoverError> {
    match recv_hello(ch).await {
        Ok(peer) => {
            ch.send(&hello(), &[], &[]).await?;
            Ok(peer)
        }
        Err(e @ HandoverError::IncompatiblePeer { .. }) => {
            // Best effort: the peer may already be gone, and the version error matters more.
            let _ = send_abort(ch, &e.to_string()).await;
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// Sends the predecessor's listeners, one fd per entry, in one message (at most 253).
/// The fds stay ours: the predecessor keeps them open until the end so it can roll back.
pub async fn send_listeners<N: AsRef<str>>(
    ch: &mut Channel,
    listeners: &[(N, SocketAddr, Protocol, BorrowedFd<'_>)],
) -> Result<(), HandoverError> {
    send_listeners_with_keys(ch, listeners, &[]).await
}

/// [`send_listeners`] with the session-ticket keys (whole keys of
/// [`crate::tls::tickets::KEY_WIRE_LEN`] bytes) in the bulk section.
pub async fn send_listeners_with_keys<N: AsRef<str>>(
    ch: &mut Channel,
    listeners: &[(N, SocketAddr, Protocol, BorrowedFd<'_>)],
    ticket_keys: &[u8],
) -> Result<(), HandoverError> {
    let entries = listeners
        .iter()
        .map(|(name, addr, protocol, _)| ListenerEntry {
            name: name.as_ref().to_string(),
            addr: *addr,
            protocol: *protocol,
        })
        .collect();
    let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|l| l.3).collect();
    let count = ticket_keys.len() / crate::tls::tickets::KEY_WIRE_LEN;
    let keys = &ticket_keys[..count * crate::tls::tickets::KEY_WIRE_LEN];
    let msg = Message::Listeners {
        listeners: entries,
        ticket_keys: u32::try_from(count).unwrap_or(0),
    };
    ch.send(&msg, &fds, keys).await
}

/// Receives the predecessor's listeners, each with its fd (checked: a listening stream
/// socket; close-on-exec). Adopt them with [`crate::listener::adopt`].
pub async fn recv_listeners(
    ch: &mut Channel,
) -> Result<Vec<(ListenerEntry, OwnedFd)>, HandoverError> {
    Ok(recv_listeners_with_keys(ch).await?.0)
}

/// [`recv_listeners`], and the session-ticket keys that came with them (zeroized on drop;
/// empty from a predecessor without TLS keys).
pub async fn recv_listeners_with_keys(
    ch: &mut Channel,
) -> Result<(Vec<(ListenerEntry, OwnedFd)>, zeroize::Zeroizing<Vec<u8>>), HandoverError> {
    listeners_with_keys_in(ch.recv().await?)
}

/// The listeners of a received `Listeners` message, each with its fd (checked as by
/// [`recv_listeners`]); another message is unexpected.
pub fn listeners_in(r: Received) -> Result<Vec<(ListenerEntry, OwnedFd)>, HandoverError> {
    Ok(listeners_with_keys_in(r)?.0)
}

/// Listeners with their fds, and the session-ticket keys that came with them.
pub type WithKeys = (Vec<(ListenerEntry, OwnedFd)>, zeroize::Zeroizing<Vec<u8>>);

/// The listeners of a received `Listeners` message with their fds (checked as by
/// [`recv_listeners`]), and the session-ticket keys that came with them (zeroized on drop).
pub fn listeners_with_keys_in(r: Received) -> Result<WithKeys, HandoverError> {
    let Received { msg, fds, bulk } = r;
    // Wrapped at once, so the key bytes are wiped on every path out of here.
    let keys = zeroize::Zeroizing::new(bulk);
    let listeners = match msg {
        Message::Listeners { listeners, .. } => listeners,
        other => return Err(unexpected(other, "listeners")),
    };
    for (index, fd) in fds.iter().enumerate() {
        check_listener(index, fd)?;
    }
    // The decoder checked that there is exactly one fd per entry, and the keys' length.
    Ok((listeners.into_iter().zip(fds).collect(), keys))
}

fn check_listener(index: usize, fd: &OwnedFd) -> Result<(), HandoverError> {
    let bad = |detail: String| HandoverError::BadFd {
        index,
        expected: "a listening stream socket",
        detail,
    };
    let ty = sockopt::socket_type(fd).map_err(|e| bad(e.to_string()))?;
    if ty != SocketType::STREAM {
        return Err(bad(format!("socket type {ty:?}")));
    }
    if !sockopt::socket_acceptconn(fd).map_err(|e| bad(e.to_string()))? {
        return Err(bad("not listening".into()));
    }
    Ok(())
}

/// The successor accepts on its listeners; `adopted` names the ones it took over.
pub async fn send_ready(ch: &mut Channel, adopted: Vec<String>) -> Result<(), HandoverError> {
    ch.send(&Message::Ready { adopted }, &[], &[]).await
}

/// Receives `Ready` (the names of the adopted listeners); `Refused` gives
/// [`HandoverError::Refused`].
pub async fn recv_ready(ch: &mut Channel) -> Result<Vec<String>, HandoverError> {
    match recv_msg(ch).await? {
        Message::Ready { adopted } => Ok(adopted),
        other => Err(unexpected(other, "ready")),
    }
}

/// The successor cannot start (e.g. invalid config); `reason` is shown to the operator.
pub async fn send_refused(ch: &mut Channel, reason: &str) -> Result<(), HandoverError> {
    ch.send(
        &Message::Refused {
            reason: reason.to_string(),
        },
        &[],
        &[],
    )
    .await
}

/// Gives up the upgrade; `reason` is shown to the operator.
pub async fn send_abort(ch: &mut Channel, reason: &str) -> Result<(), HandoverError> {
    ch.send(
        &Message::Abort {
            reason: reason.to_string(),
        },
        &[],
        &[],
    )
    .await
}

/// The predecessor is finished; its counters continue in the successor.
pub async fn send_done(ch: &mut Channel, counters: Counters) -> Result<(), HandoverError> {
    ch.send(
        &Message::Done {
            counters,
            history: Vec::new(),
        },
        &[],
        &[],
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hello_exchange_and_version_mismatch() {
        let (mut p, mut s) = Channel::pair().unwrap();
        let (a, b) = tokio::join!(predecessor_hello(&mut p), successor_hello(&mut s));
        assert_eq!(a.unwrap().pid, std::process::id());
        assert_eq!(b.unwrap().protocol_version, PROTOCOL_VERSION);

        let future = Message::Hello {
            protocol_version: 99,
            version: "9.0.0".into(),
            pid: 7,
        };
        s.send(&future, &[], &[]).await.unwrap();
        let err = predecessor_hello(&mut p).await.unwrap_err();
        assert!(
            matches!(err, HandoverError::IncompatiblePeer { theirs: 99, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("speaks handover protocol 99"));
        // The successor is told why.
        assert!(matches!(
            recv_msg(&mut s).await.unwrap(),
            Message::Abort { .. }
        ));
    }

    #[tokio::test]
    async fn refused_and_unexpected_messages_are_errors() {
        let (mut p, mut s) = Channel::pair().unwrap();
        send_refused(&mut s, "config: listeners.web: bad address")
            .await
            .unwrap();
        match predecessor_hello(&mut p).await {
            Err(HandoverError::Refused(r)) => assert!(r.contains("bad address")),
            other => panic!("{other:?}"),
        }
        send_done(&mut s, Counters::default()).await.unwrap();
        assert!(matches!(
            recv_ready(&mut p).await,
            Err(HandoverError::Unexpected {
                expected: "ready",
                got: "done"
            })
        ));
        send_abort(&mut s, "bye").await.unwrap();
        assert!(
            matches!(recv_listeners(&mut p).await, Err(HandoverError::Aborted(r)) if r == "bye")
        );
    }

    #[tokio::test]
    async fn a_non_listening_socket_is_refused_as_listener() {
        let (mut p, mut s) = Channel::pair().unwrap();
        let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsFd;
        let l = [(
            "web",
            "127.0.0.1:1".parse().unwrap(),
            Protocol::Http,
            x.as_fd(),
        )];
        send_listeners(&mut p, &l).await.unwrap();
        assert!(matches!(
            recv_listeners(&mut s).await,
            Err(HandoverError::BadFd { index: 0, .. })
        ));
    }
}
