//! The one error type of the handover. Every failure on the channel, whether the peer died,
//! sent garbage or broke the protocol, is one of these variants: the lifecycle aborts the
//! upgrade on any of them and keeps (or resumes) serving; none of them is a panic.

use std::io;

/// Why a handover step failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// A system call on the channel failed.
    #[error("handover channel i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the channel between two frames.
    #[error("handover channel closed by the peer")]
    Closed,
    /// The input ended inside a frame.
    #[error("handover frame truncated in its {what}")]
    Truncated {
        /// Which part of the frame was cut short.
        what: &'static str,
    },
    /// The frame does not start with the magic bytes.
    #[error("handover frame has bad magic {0:#010x}")]
    BadMagic(u32),
    /// The frame speaks another protocol version.
    #[error("handover protocol version {got} is not supported (this binary speaks {ours})")]
    UnsupportedVersion {
        /// The version in the frame.
        got: u16,
        /// Ours.
        ours: u16,
    },
    /// A malformed header field.
    #[error("handover frame header: {0}")]
    BadHeader(&'static str),
    /// A length is over its cap.
    #[error("handover frame {what} of {len} bytes exceeds the cap of {cap}")]
    TooLarge {
        /// Which length.
        what: &'static str,
        /// Its value.
        len: u64,
        /// The cap.
        cap: u64,
    },
    /// More fds than one message may carry (`SCM_MAX_FD` = 253).
    #[error("{0} fds in one handover message (at most 253)")]
    TooManyFds(usize),
    /// The header announced a number of fds other than the number that arrived.
    #[error("handover frame announced {header} fds but {received} arrived")]
    FdCountMismatch {
        /// Announced by the header.
        header: usize,
        /// Arrived as SCM_RIGHTS.
        received: usize,
    },
    /// The message's entries need another number of fds than the header announced.
    #[error("handover message needs {needed} fds but its header announces {header}")]
    FdsForEntries {
        /// What the entries need.
        needed: usize,
        /// What the header says.
        header: usize,
    },
    /// The message's entries need another number of bulk bytes than the header announced.
    #[error("handover message needs {needed:?} bulk bytes but its header announces {header}")]
    BulkMismatch {
        /// What the entries need (`None`: their sum overflows).
        needed: Option<u64>,
        /// What the header says.
        header: u64,
    },
    /// The payload is not a valid message.
    #[error("handover payload is not a valid message: {0}")]
    Json(#[from] serde_json::Error),
    /// The kernel truncated the control data (`MSG_CTRUNC`): some fds were lost.
    #[error("handover fds lost: control data truncated (MSG_CTRUNC)")]
    ControlTruncated,
    /// A valid message, but not one allowed at this point of the protocol.
    #[error("unexpected handover message: expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol allows here.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// The peer speaks a protocol version we cannot talk to.
    #[error("peer (pid {pid}, version {version}) speaks handover protocol {theirs}, this binary speaks {ours}")]
    IncompatiblePeer {
        /// The peer's protocol version.
        theirs: u16,
        /// Ours.
        ours: u16,
        /// The peer's program version.
        version: String,
        /// The peer's pid.
        pid: u32,
    },
    /// The successor refused to start.
    #[error("successor refused: {0}")]
    Refused(String),
    /// The peer aborted the upgrade.
    #[error("peer aborted the handover: {0}")]
    Aborted(String),
    /// An acknowledgement that does not match what was sent.
    #[error("bad handover ack: {0}")]
    BadAck(String),
    /// A received fd is not what its entry says (e.g. not a connected TCP socket).
    #[error("received fd #{index} is not {expected}: {detail}")]
    BadFd {
        /// Its position in the message.
        index: usize,
        /// What it should be.
        expected: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The inherited channel fd is missing, malformed or not a Unix stream socket.
    #[error("inherited handover channel: {0}")]
    Inherited(String),
    /// The successor could not be started.
    #[error("cannot spawn successor {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: String,
        /// The OS error.
        source: io::Error,
    },
}
