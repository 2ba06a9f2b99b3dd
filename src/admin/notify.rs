//! systemd integration: readiness notifications and socket activation.
//!
//! Notifications (`sd_notify`, a datagram to `$NOTIFY_SOCKET`; nothing happens without it):
//! `READY=1` once a first generation serves, `RELOADING=1` when an upgrade starts, and from a
//! successor at commit `MAINPID=<its pid>` with `READY=1`, so systemd follows the new process
//! and does not take the old one's exit for the service's end. `NOTIFY_SOCKET` is left in the
//! environment on purpose: the successor inherits it. The unit needs `NotifyAccess=all`,
//! because the successor is not the pid systemd started.
//!
//! Socket activation: a first generation started with `LISTEN_FDS`, `LISTEN_FDNAMES` and
//! `LISTEN_PID` equal to its own pid adopts, for each listener whose name matches an fd's
//! name, that socket instead of binding ([`systemd_listeners`]).

use sd_notify::NotifyState;
use std::collections::HashMap;
use std::os::fd::OwnedFd;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// `READY=1`: serving (first start, or again after a rolled-back upgrade).
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// `RELOADING=1` (with `MONOTONIC_USEC`, which systemd 253+ asks for): an upgrade started.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `MAINPID=<this pid>` and `READY=1`: a successor took over at commit.
pub fn took_over() {
    send(&[NotifyState::MainPid(std::process::id()), NotifyState::Ready]);
}

/// `STOPPING=1`: a graceful stop began.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The sockets systemd passed to this process by name (`LISTEN_FDNAMES`; an unnamed fd is
/// called `unknown`, as systemd does). Empty unless `LISTEN_PID` is this process's pid.
/// Each socket is checked to be a TCP stream socket and made close-on-exec; fds that are not
/// are left alone and logged. Reads and removes the `LISTEN_*` variables, so a successor
/// never sees them. Call once, early, in a first generation.
pub fn systemd_listeners() -> HashMap<String, OwnedFd> {
    let mut out = HashMap::new();
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        == Some(std::process::id());
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    std::env::remove_var("LISTEN_FDNAMES");
    if !ours {
        // Not for us (or not set): do not touch fds another process was meant to get.
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_PID");
        return out;
    }
    // listenfd reads LISTEN_FDS (and removes it and LISTEN_PID); it owns the one unsafe
    // conversion from an fd number to a socket, after checking the fd's type.
    let mut fds = listenfd::ListenFd::from_env();
    for i in 0..fds.len() {
        let name = names
            .get(i)
            .filter(|n| !n.is_empty())
            .cloned()
            .unwrap_or_else(|| "unknown".to_string());
        match fds.take_tcp_listener(i) {
            Ok(Some(l)) => {
                tracing::info!(fd = 3 + i, name = %name, "socket passed by systemd");
                out.insert(name, OwnedFd::from(l));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(fd = 3 + i, name = %name, error = %e, "ignoring a socket passed by systemd")
            }
        }
    }
    out
}
