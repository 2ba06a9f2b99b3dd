//! Which record layer runs a session after its handshake: the kernel's (kTLS) or baton's own.
//!
//! The probe sets the `tls` upper-layer protocol on a fresh TCP socket at start. A kernel
//! without the TLS module answers `ENOENT` (this is what the Firecracker 6.x kernels of the
//! build machines do); one with it answers `ENOTCONN` (the ULP attaches only to an established
//! connection). kTLS itself is not wired in yet: where it would plug in is
//! `TlsStream::from_session` — `setsockopt(TCP_ULP, "tls")`, then `TLS_TX`/`TLS_RX` with the
//! [`super::Session`]'s keys, IVs and sequence numbers — and a kTLS socket handed to a
//! successor keeps its record state in the kernel, so only the traffic secrets (for future
//! KeyUpdates) would move. Until then both answers run the user-space layer, and the log says
//! which one is in force and why.

use nix::sys::socket::{setsockopt, sockopt::TcpUlp};
use std::sync::OnceLock;

/// The record layer sessions use in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordPath {
    /// baton's own record layer ([`super::Session`]) on ring's AEADs.
    UserSpace,
    /// The kernel offers kTLS (not used yet: the user-space layer still runs).
    KernelAvailable,
}

/// What the kernel said to `setsockopt(TCP_ULP, "tls")` on a fresh socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `ENOENT`: no TLS ULP in this kernel.
    NoKtls,
    /// `ENOTCONN` (or success): the TLS ULP exists.
    Ktls,
    /// Anything else (errno): treated as no kTLS.
    Other(i32),
}

/// Asks the kernel whether it has kTLS.
pub fn probe() -> Probe {
    let sock = match socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) {
        Ok(s) => s,
        Err(e) => return Probe::Other(e.raw_os_error().unwrap_or(0)),
    };
    match setsockopt(&sock, TcpUlp::default(), b"tls") {
        Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Probe::Ktls,
        Err(nix::errno::Errno::ENOENT) => Probe::NoKtls,
        Err(e) => Probe::Other(e as i32),
    }
}

/// The record layer in force, probed once per process and logged once.
pub fn record_path() -> RecordPath {
    static PATH: OnceLock<RecordPath> = OnceLock::new();
    *PATH.get_or_init(|| {
        let probe = probe();
        let path = match probe {
            Probe::Ktls => RecordPath::KernelAvailable,
            Probe::NoKtls | Probe::Other(_) => RecordPath::UserSpace,
        };
        tracing::info!(
            ?probe,
            record_layer = "user space",
            "tls record layer: baton's own (kernel TLS {})",
            if path == RecordPath::KernelAvailable {
                "is available but not used yet"
            } else {
                "is not available"
            }
        );
        path
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_answers_and_the_path_follows() {
        let p = probe();
        // This machine's kernel has no kTLS; elsewhere the probe may find it. Either way the
        // answer is one of the known ones and the path agrees with it.
        let path = record_path();
        match p {
            Probe::Ktls => assert_eq!(path, RecordPath::KernelAvailable),
            Probe::NoKtls | Probe::Other(_) => assert_eq!(path, RecordPath::UserSpace),
        }
    }
}
