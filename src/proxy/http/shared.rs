//! The state one HTTP/1.1 client connection shares between its loop (`server`), its service
//! (`service`: requests in flight) and its socket wrapper (`io`: bytes read), and the deadline
//! an idle connection is waiting for.

use super::forward::Tunnel;
use crate::proxy::ListenerCtx;
use crate::registry::{ConnState, ConnStats};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The idle-time facts the connection loop's deadline is computed from.
#[derive(Debug)]
pub(super) struct Timing {
    /// When the connection last became idle (no request in flight).
    pub(super) idle_since: Instant,
    /// When the first byte of the next request head arrived, if one did.
    pub(super) head_started: Option<Instant>,
    /// When the connection loop's timer fires; `None` while it is not armed.
    pub(super) armed: Option<Instant>,
}

/// How long an idle keep-alive connection keeps its hyper state (two 8 KiB buffers and the
/// connection struct) before it is taken back and waits for its next request with no buffer.
pub(super) const IDLE_RELEASE: std::time::Duration = std::time::Duration::from_millis(250);

/// State of one client connection shared by its loop, its service and its io.
#[derive(Debug)]
pub struct ConnShared {
    /// The registry entry's live facts.
    pub stats: Arc<ConnStats>,
    pub(super) in_flight: AtomicUsize,
    /// Requests started so far.
    pub(super) started: AtomicU64,
    /// Content-Length header lines seen in the raw bytes (see `io`).
    pub cl_lines: AtomicU64,
    /// `cl_lines` as of the start of the latest request.
    pub cl_accounted: AtomicU64,
    pub(super) timing: Mutex<Timing>,
    /// The header read timeout, to tell whether a starting head needs an earlier timer.
    pub(super) header_read_timeout: std::time::Duration,
    /// The loop waits to park: wake it when the connection becomes idle.
    pub(super) wake_on_idle: AtomicBool,
    /// Woken when the loop must look again: idle while waiting to park, or a head started
    /// before the armed timer would fire.
    pub(super) changed: Notify,
    /// The upstream side of an accepted upgrade, picked up by the loop after the 101.
    pub(super) upgrade: Mutex<Option<Tunnel>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts a request as in flight until dropped (when its response body ends).
#[derive(Debug)]
pub struct InFlight(Arc<ConnShared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            {
                let mut t = lock(&self.0.timing);
                t.idle_since = Instant::now();
                t.head_started = None;
            }
            self.0.stats.set_state(ConnState::Idle);
            // The loop's timer is left as it is (it fires, finds the deadline moved, re-arms):
            // no timer work and no wake-up per request.
            if self.0.wake_on_idle.load(Ordering::Acquire) {
                self.0.changed.notify_one();
            }
        }
    }
}

impl ConnShared {
    pub(super) fn new(
        stats: Arc<ConnStats>,
        idle_since: Instant,
        head_started: Option<Instant>,
        header_read_timeout: std::time::Duration,
    ) -> Arc<ConnShared> {
        Arc::new(ConnShared {
            stats,
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            cl_lines: AtomicU64::new(0),
            cl_accounted: AtomicU64::new(0),
            timing: Mutex::new(Timing {
                idle_since,
                head_started,
                armed: None,
            }),
            header_read_timeout,
            wake_on_idle: AtomicBool::new(false),
            changed: Notify::new(),
            upgrade: Mutex::new(None),
        })
    }

    /// A request started.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.started.fetch_add(1, Ordering::Relaxed);
        lock(&self.timing).head_started = None;
        self.stats.set_state(ConnState::Active);
        InFlight(self.clone())
    }

    /// Bytes arrived from the client.
    pub fn on_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let mut t = lock(&self.timing);
            if t.head_started.is_none() {
                let now = Instant::now();
                t.head_started = Some(now);
                let due = now + self.header_read_timeout;
                // Wake the loop only if its timer would fire too late for the header timeout.
                if t.armed.is_none_or(|a| a > due) {
                    drop(t);
                    self.changed.notify_one();
                }
            }
        }
    }

    /// Stores the upstream side of an accepted upgrade.
    pub fn set_upgrade(&self, t: Tunnel) {
        *lock(&self.upgrade) = Some(t);
    }

    pub(super) fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// When the idle connection next needs attention, and why.
    pub(super) fn deadline(&self, ctx: &ListenerCtx) -> Option<(Instant, Due)> {
        if !self.idle() {
            return None;
        }
        let t = lock(&self.timing);
        Some(match t.head_started {
            Some(h) => (h + ctx.cfg.http.header_read_timeout, Due::Header),
            None => {
                let keepalive = t.idle_since + ctx.cfg.http.keepalive_timeout;
                let release = t.idle_since + IDLE_RELEASE;
                if release < keepalive {
                    (release, Due::Release)
                } else {
                    (keepalive, Due::KeepAlive)
                }
            }
        })
    }

    pub(super) fn set_armed(&self, at: Option<Instant>) {
        lock(&self.timing).armed = at;
    }
}

/// What an idle connection's deadline stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    /// The request head did not arrive within `header_read_timeout`: 408.
    Header,
    /// Idle past `keepalive_timeout`: close.
    KeepAlive,
    /// Idle for [`IDLE_RELEASE`]: take the socket back from hyper.
    Release,
}
