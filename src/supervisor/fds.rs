//! The supervisor's re-exec at the OS level: keeping fds open across `execv`, taking them back
//! by number in the new image, holding signals pending across the exec, and the `execv`
//! itself. std's `CommandExt::exec` would do for the exec, but it empties the signal mask first,
//! so a SIGTERM or SIGUSR2 arriving during the exec would meet the default action (terminate)
//! in the new image before its handlers exist; `execv` keeps the mask and pending signals.
//!
//! The only unsafe code of the supervisor is here. Each block says who owns what afterwards.
#![allow(unsafe_code)]

use rustix::io::{fcntl_getfd, fcntl_setfd, FdFlags};
use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The signals the supervisor handles: held pending from just before the exec until the new
/// image has its handlers.
const HELD: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR2, libc::SIGHUP];

/// Lets `fd` survive the next exec (clears close-on-exec).
pub fn keep_across_exec(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    fcntl_setfd(fd, FdFlags::empty()).map_err(Into::into)
}

/// Sets close-on-exec again (after a failed exec, or once adopted).
pub fn close_on_exec(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    fcntl_setfd(fd, FdFlags::CLOEXEC).map_err(Into::into)
}

/// Takes ownership of fd number `raw`, inherited across the exec: it must be open and must
/// not be close-on-exec (every fd this image opens itself is), so a wrong number in the state
/// is an error, not a stolen fd. Close-on-exec is set again.
pub fn adopt(raw: RawFd, what: &str) -> Result<OwnedFd, String> {
    if raw < 3 {
        return Err(format!("{what}: fd {raw} cannot be inherited state"));
    }
    {
        // SAFETY: the borrow lives for one read-only query; nothing is closed through it. A
        // closed number makes the query fail with EBADF, reported below.
        let b = unsafe { BorrowedFd::borrow_raw(raw) };
        let flags = fcntl_getfd(b).map_err(|e| format!("{what}: fd {raw} is not open: {e}"))?;
        if flags.contains(FdFlags::CLOEXEC) {
            return Err(format!(
                "{what}: fd {raw} is close-on-exec, so it was not inherited"
            ));
        }
    }
    // SAFETY: `raw` is open and was inherited across exec (checked above); the state names
    // each fd once, and nothing else in this image knows the number, so the OwnedFd is its
    // only owner from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    close_on_exec(fd.as_fd()).map_err(|e| format!("{what}: fd {raw}: {e}"))?;
    Ok(fd)
}

fn held_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given; sigaddset with valid signal
    // numbers only writes into it. The set is a plain value owned by this function.
    unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        let mut set = set.assume_init();
        for s in HELD {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn mask(how: libc::c_int) -> std::io::Result<()> {
    let set = held_set();
    // SAFETY: `set` is initialised; the old mask is not asked for (null).
    let r = unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(r))
    }
}

/// Holds the handled signals pending in this thread (the one that calls [`execv`]); the mask
/// and pending signals survive the exec.
pub fn hold_signals() -> std::io::Result<()> {
    mask(libc::SIG_BLOCK)
}

/// Releases the held signals (in the new image once its handlers exist, or after a failed
/// exec): anything that arrived meanwhile is delivered now.
pub fn release_signals() -> std::io::Result<()> {
    mask(libc::SIG_UNBLOCK)
}

/// Replaces this process's image with `binary args...` (argv[0] = `binary`), keeping the pid,
/// the fds without close-on-exec, the signal mask and the environment. Returns only on
/// failure.
pub fn execv(binary: &Path, args: &[OsString]) -> std::io::Error {
    let cstr = |b: &[u8]| CString::new(b).map_err(|_| std::io::Error::other("NUL in argument"));
    let path = match cstr(binary.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let mut owned = vec![path.clone()];
    for a in args {
        match cstr(a.as_bytes()) {
            Ok(c) => owned.push(c),
            Err(e) => return e,
        }
    }
    let mut argv: Vec<*const libc::c_char> = owned.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: `path` and every `argv` entry are NUL-terminated strings alive for the call;
    // `argv` ends with a null pointer. On success nothing of this image remains; on failure
    // execv returns -1 with errno set and nothing was changed.
    unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
    std::io::Error::last_os_error()
}

/// Registers a pidfd with tokio, to await the process's exit (readable once it exited).
pub fn watch_pidfd(fd: OwnedFd) -> Option<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open fd, owned by the AsyncFd until it is dropped, and
    // its `as_raw_fd` always returns that same number.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE).ok()
    }
}
