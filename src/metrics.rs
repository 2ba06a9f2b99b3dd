//! Process counters. They are plain atomics so the data path pays one relaxed add, and they
//! serialise to [`Counters`] so a successor continues from its predecessor's totals.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one process, continued across upgrades.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Client connections accepted.
    pub accepted: AtomicU64,
    /// Client connections closed.
    pub closed: AtomicU64,
    /// Bytes received from clients.
    pub bytes_in: AtomicU64,
    /// Bytes sent to clients.
    pub bytes_out: AtomicU64,
    /// HTTP requests answered.
    pub requests: AtomicU64,
    /// Upstream connect failures.
    pub connect_failures: AtomicU64,
    /// Upgrades that completed (counted by the successor).
    pub upgrades_ok: AtomicU64,
    /// Upgrades that were rolled back.
    pub upgrades_failed: AtomicU64,
}

/// A snapshot of [`Metrics`], sent to a successor in the handover's `Done` message.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// See [`Metrics::accepted`].
    pub accepted: u64,
    /// See [`Metrics::closed`].
    pub closed: u64,
    /// See [`Metrics::bytes_in`].
    pub bytes_in: u64,
    /// See [`Metrics::bytes_out`].
    pub bytes_out: u64,
    /// See [`Metrics::requests`].
    pub requests: u64,
    /// See [`Metrics::connect_failures`].
    pub connect_failures: u64,
    /// See [`Metrics::upgrades_ok`].
    pub upgrades_ok: u64,
    /// See [`Metrics::upgrades_failed`].
    pub upgrades_failed: u64,
}

macro_rules! fields {
    ($m:ident) => {
        $m!(
            accepted,
            closed,
            bytes_in,
            bytes_out,
            requests,
            connect_failures,
            upgrades_ok,
            upgrades_failed
        )
    };
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Current values.
    pub fn snapshot(&self) -> Counters {
        macro_rules! snap {
            ($($f:ident),*) => { Counters { $($f: self.$f.load(Ordering::Relaxed)),* } };
        }
        fields!(snap)
    }

    /// Adds a predecessor's totals to ours.
    pub fn absorb(&self, c: &Counters) {
        macro_rules! add {
            ($($f:ident),*) => {{ $(self.$f.fetch_add(c.$f, Ordering::Relaxed);)* }};
        }
        fields!(add);
    }
}
