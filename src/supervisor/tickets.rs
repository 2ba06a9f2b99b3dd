//! TLS session-ticket keys in multi-process mode. The supervisor makes the keys and every
//! worker encrypts and decrypts with the same ones, so a client resumes its session on any
//! worker, after a worker restart and across an upgrade. The keys go only over the private
//! channels: to a fresh worker with its listeners (the supervisor plays its predecessor),
//! from an old worker to its replacement (the single-process handover), and, at every
//! rotation ([`crate::tls::tickets::ROTATE`]), to each serving worker as a `Listeners`
//! message with no listener. Across the supervisor's re-exec they travel in a memfd of their
//! own that only the new image inherits, with their age, so the rotation schedule carries on.
//!
//! Every worker records the rotation (`epoch`) its keys are from; the tick sends the keys to
//! each serving worker that is behind, so a worker that was starting during a rotation gets
//! the new keys as soon as it serves.

use super::Supervisor;
use std::io::{Read, Seek, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

/// The supervisor's keys and which rotation they are.
#[derive(Debug, Default)]
pub(super) struct Keys {
    /// The keys every worker gets.
    pub ticketer: crate::tls::tickets::Ticketer,
    /// +1 per rotation (and when the keys were replaced); a worker's `tickets_epoch` says
    /// which ones it holds.
    pub epoch: u64,
}

impl Supervisor {
    /// Rotates the keys when due, then sends them to every serving worker that does not have
    /// them yet. A worker that cannot be sent them keeps its keys (its tickets then resume
    /// only on itself) and is tried again at the next tick.
    pub(super) async fn share_ticket_keys(&mut self) {
        let asked = crate::test_hooks::rotate_ticket_keys();
        if asked {
            self.tickets.ticketer.rotate();
        }
        if asked || self.tickets.ticketer.rotate_if_due() {
            self.tickets.epoch += 1;
            tracing::info!(
                epoch = self.tickets.epoch,
                "session-ticket keys rotated; sending them to the workers"
            );
        }
        let epoch = self.tickets.epoch;
        let behind = self
            .slots
            .iter_mut()
            .filter_map(|s| s.worker.as_mut())
            .filter(|w| w.live_since.is_some() && w.tickets_epoch != epoch);
        for w in behind {
            let keys = self.tickets.ticketer.export();
            match w.send_ticket_keys(&keys).await {
                Ok(()) => {
                    w.tickets_epoch = epoch;
                    tracing::debug!(
                        index = w.index,
                        worker_pid = w.pid,
                        epoch,
                        "session-ticket keys sent"
                    );
                }
                Err(e) => {
                    tracing::warn!(index = w.index, error = %e, "cannot send the session-ticket keys")
                }
            }
        }
    }
}

/// The keys in a new memfd (close-on-exec until the re-exec keeps it), for the next image.
pub(super) fn write_for_exec(keys: &Keys) -> std::io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create("baton-ticket-keys", rustix::fs::MemfdFlags::CLOEXEC)?;
    let mut f = std::fs::File::from(fd);
    f.write_all(&keys.ticketer.export())?;
    Ok(OwnedFd::from(f))
}

/// Takes the keys the previous image left in memfd `fd` (closed here), current for `age`.
/// Without them (`None`: an image that did not pass them), or if they cannot be read, the
/// supervisor makes fresh ones and every worker gets them at the next tick.
pub(super) fn read_after_exec(fd: Option<RawFd>, age: Duration) -> Keys {
    let keys = Keys::default();
    let Some(fd) = fd else {
        tracing::info!(
            "no session-ticket keys from the previous image; sending fresh ones to the workers"
        );
        return Keys { epoch: 1, ..keys };
    };
    let read = || -> Result<usize, String> {
        let mut f = std::fs::File::from(super::fds::adopt(fd, "ticket keys")?);
        let mut bytes = zeroize::Zeroizing::new(Vec::new());
        f.rewind().map_err(|e| e.to_string())?;
        f.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
        keys.ticketer
            .import_aged(&bytes, age)
            .map_err(|e| e.to_string())
    };
    match read() {
        Ok(_) => keys,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take the session-ticket keys over the re-exec; sending fresh ones to the workers");
            Keys { epoch: 1, ..keys }
        }
    }
}
