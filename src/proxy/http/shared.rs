//! The state one client connection's loop shares with the requests in flight on it (h2c: the
//! service, one call per stream), and how long an idle HTTP/1.1 connection keeps its task.

use crate::registry::{ConnState, ConnStats};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// How long an idle keep-alive connection keeps its engine state (buffers and task) before it
/// waits for its next request in the listener's idle watcher, with no buffer.
pub(super) const IDLE_RELEASE: std::time::Duration = std::time::Duration::from_millis(250);

/// State of one client connection shared by its loop and its requests.
#[derive(Debug)]
pub struct ConnShared {
    /// The registry entry's live facts.
    pub stats: Arc<ConnStats>,
    /// Requests in flight (the connection is idle at 0).
    in_flight: AtomicUsize,
}

/// Counts a request as in flight until dropped (when its response body ends).
#[derive(Debug)]
pub struct InFlight(Arc<ConnShared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.stats.set_state(ConnState::Idle);
        }
    }
}

impl ConnShared {
    pub(super) fn new(stats: Arc<ConnStats>) -> Arc<ConnShared> {
        Arc::new(ConnShared {
            stats,
            in_flight: AtomicUsize::new(0),
        })
    }

    /// A request started.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.stats.set_state(ConnState::Active);
        InFlight(self.clone())
    }
}
