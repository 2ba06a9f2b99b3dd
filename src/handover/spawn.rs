//! Starting the successor with one end of a private socketpair, and finding that end again
//! in the successor.
//!
//! The predecessor creates a close-on-exec `socketpair(AF_UNIX, SOCK_STREAM)`, clears
//! close-on-exec on the child's end only, and spawns the binary with
//! `BATON_HANDOVER_FD=<n>` in its environment; then it closes its copy of the child's end, so
//! the successor's exit is seen as EOF on the channel. No `fork()` in our process and no
//! `pre_exec`: tokio's `Command` (posix_spawn or fork+exec inside std) inherits the one fd.
//!
//! The only unsafe code of the crate is here: turning the inherited fd *number* into an owned
//! fd cannot be done without it. Each block says who owns the fd afterwards.
#![allow(unsafe_code)]

use super::channel::Channel;
use super::HandoverError;
use rustix::io::{fcntl_getfd, fcntl_setfd, FdFlags};
use rustix::net::{socketpair, sockopt, AddressFamily, SocketFlags, SocketType};
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Stdio;

/// The environment variable that names the inherited channel fd in a successor.
pub const HANDOVER_FD_ENV: &str = "BATON_HANDOVER_FD";

/// A started successor.
#[derive(Debug)]
pub struct Spawned {
    /// The child process. It is not killed on drop: rollback kills it explicitly.
    pub child: tokio::process::Child,
    /// Our end of the channel.
    pub channel: Channel,
}

/// Spawns `binary args...` with the child's end of a new socketpair inherited and named in
/// `BATON_HANDOVER_FD`; stdin is null, stdout and stderr are inherited. The child leads a
/// process group of its own, so a successor that is a wrapper script can be ended with every
/// process it started ([`kill_group`]): none of them keeps the channel open. Needs a tokio
/// runtime. Call it from one task at a time: while the child's end is not close-on-exec,
/// any other child spawned concurrently by this process would inherit it too.
pub fn spawn_successor<I, S>(binary: &Path, args: I) -> Result<Spawned, HandoverError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let spawn_err = |source: std::io::Error| HandoverError::Spawn {
        binary: binary.display().to_string(),
        source,
    };
    let (ours, theirs) = socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| spawn_err(e.into()))?;
    fcntl_setfd(&theirs, FdFlags::empty()).map_err(|e| spawn_err(e.into()))?;
    let child = tokio::process::Command::new(binary)
        .args(args)
        .env(HANDOVER_FD_ENV, theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .map_err(spawn_err)?;
    // The child has its copy; ours must go so that the child's exit reads as EOF.
    drop(theirs);
    let channel =
        Channel::from_std(std::os::unix::net::UnixStream::from(ours)).map_err(spawn_err)?;
    tracing::info!(pid = child.id(), binary = %binary.display(), "successor spawned");
    Ok(Spawned { child, channel })
}

/// Sends SIGKILL to the process group led by `pid` (a child started by [`spawn_successor`]):
/// the successor and anything it started, such as the real binary behind a wrapper script.
pub fn kill_group(pid: u32) {
    let Some(pgid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    // ESRCH (all gone already) is the expected case after a clean exit.
    let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
}

/// In a successor: the channel inherited from the predecessor, or `None` for a first
/// generation. Reads and removes `BATON_HANDOVER_FD` (so a second call returns `None` and a
/// later child never sees it), checks that the fd is an inherited Unix stream socket, and
/// makes it close-on-exec so it never leaks further. Call it once, early, inside the tokio
/// runtime.
pub fn inherited_channel() -> Option<Result<Channel, HandoverError>> {
    let value = std::env::var_os(HANDOVER_FD_ENV)?;
    // Removing it is safe in edition 2021; done at start, before other code reads the env.
    std::env::remove_var(HANDOVER_FD_ENV);
    Some(adopt_channel_fd(&value))
}

fn parse_fd(value: &OsStr) -> Result<RawFd, HandoverError> {
    let bad = |why: &str| HandoverError::Inherited(format!("{HANDOVER_FD_ENV}={value:?}: {why}"));
    let fd: RawFd = value
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("not an fd number"))?;
    if fd < 3 {
        return Err(bad("stdin, stdout and stderr cannot be the channel"));
    }
    Ok(fd)
}

/// Checks the fd named by `value` and takes ownership of it.
fn adopt_channel_fd(value: &OsStr) -> Result<Channel, HandoverError> {
    let fd = parse_fd(value)?;
    let bad = |why: String| HandoverError::Inherited(format!("{HANDOVER_FD_ENV}={fd}: {why}"));
    {
        // SAFETY: the borrow only lives for the three read-only queries below and nothing is
        // closed through it; ownership stays where it was. If `fd` is not open, each query
        // fails with EBADF, which we report. A number the predecessor did not put there is
        // caught below: every fd this process opens itself is close-on-exec (std, tokio and
        // rustix all open with O_CLOEXEC), so only an fd inherited across exec lacks the flag.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let flags = fcntl_getfd(borrowed).map_err(|e| bad(format!("not an open fd: {e}")))?;
        if flags.contains(FdFlags::CLOEXEC) {
            return Err(bad("close-on-exec is set, so it was not inherited".into()));
        }
        let domain =
            sockopt::socket_domain(borrowed).map_err(|e| bad(format!("not a socket: {e}")))?;
        let ty = sockopt::socket_type(borrowed).map_err(|e| bad(format!("not a socket: {e}")))?;
        if domain != AddressFamily::UNIX || ty != SocketType::STREAM {
            return Err(bad(format!(
                "not a Unix stream socket ({domain:?}, {ty:?})"
            )));
        }
    }
    // SAFETY: `fd` is open, was inherited across exec (no close-on-exec, checked above) and is
    // the Unix stream socket our predecessor named for us in the environment, which we have
    // just removed: nothing else in this process knows this number, so nothing else owns it.
    // From here the OwnedFd (then the Channel) is its only owner and closes it once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    fcntl_setfd(&owned, FdFlags::CLOEXEC)
        .map_err(|e| bad(format!("cannot set close-on-exec: {e}")))?;
    Channel::from_std(std::os::unix::net::UnixStream::from(owned)).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handover::Message;
    use std::ffi::OsString;
    use std::os::fd::IntoRawFd;

    /// Gives up ownership of an fd without closing it, as an exec would: the number is then
    /// handed to [`adopt_channel_fd`].
    fn leak(fd: impl Into<OwnedFd>) -> OsString {
        fd.into().into_raw_fd().to_string().into()
    }

    #[test]
    fn bad_values_are_errors() {
        for v in ["", "abc", "-1", "0", "2", "99999999999"] {
            assert!(
                matches!(parse_fd(OsStr::new(v)), Err(HandoverError::Inherited(_))),
                "{v}"
            );
        }
        assert_eq!(parse_fd(OsStr::new("7")).unwrap(), 7);
    }

    #[tokio::test]
    async fn adopts_an_inherited_socket_and_sets_cloexec() {
        let (ours, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        fcntl_setfd(&theirs, FdFlags::empty()).unwrap();
        let n = leak(theirs);
        let mut ch = adopt_channel_fd(&n).unwrap();
        assert!(fcntl_getfd(&ch).unwrap().contains(FdFlags::CLOEXEC));
        let mut peer = Channel::from_std(std::os::unix::net::UnixStream::from(ours)).unwrap();
        ch.send(&Message::Ack { seq: 1, count: 1 }, &[], &[])
            .await
            .unwrap();
        assert_eq!(
            peer.recv().await.unwrap().msg,
            Message::Ack { seq: 1, count: 1 }
        );
    }

    #[tokio::test]
    async fn refuses_fds_that_were_not_inherited_or_are_not_unix_streams() {
        // Close-on-exec set: opened by this process, not inherited. It must not be closed.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let n = a.as_raw_fd().to_string();
        assert!(matches!(
            adopt_channel_fd(OsStr::new(&n)),
            Err(HandoverError::Inherited(_))
        ));
        assert!(
            fcntl_getfd(&a).is_ok(),
            "the refused fd stays open and owned by its owner"
        );

        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        fcntl_setfd(&l, FdFlags::empty()).unwrap();
        let err = adopt_channel_fd(&leak(l)).unwrap_err();
        assert!(
            err.to_string().contains("not a Unix stream socket"),
            "{err}"
        );

        let f = tempfile::tempfile().unwrap();
        fcntl_setfd(&f, FdFlags::empty()).unwrap();
        let err = adopt_channel_fd(&leak(f)).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
    }
}
