//! Process metrics that continue across upgrades.
//!
//! Everything here is a relaxed atomic, so the data path pays one or two `fetch_add`s per
//! event: no lock and no allocation per connection or request. Per-listener and per-upstream
//! series live behind [`ListenerHandle`] and [`UpstreamHandle`]: created once (when a
//! listener or pool is set up, or up front by [`Metrics::new`]) and kept by the caller.
//!
//! The predecessor sends [`Metrics::snapshot`] in the handover's `Done { counters }` message
//! and the successor adds it with [`Metrics::absorb`], so counters never restart at zero on an
//! upgrade. Gauges (active connections, generation, start time) describe this process and are
//! not carried.
//!
//! The API the data path calls:
//! ```text
//! let l = metrics.listener("web");         // once per listener (ListenerCtx)
//! l.accepted();                            // a connection was accepted (+active)
//! l.resumed();                             // a connection came from a predecessor / rollback (+active)
//! l.parked();                              // a connection left to be handed over (-active)
//! l.closed();                              // a connection closed here (-active)
//! l.bytes(bytes_in, bytes_out);            // bytes relayed, at close (or periodically)
//! metrics.http_request("api", 200, elapsed);   // one answered HTTP request ("" = no upstream)
//! let u = metrics.upstream("api");         // or cache a handle per pool:
//! u.request(503, elapsed);               // or u.request_to(Some(server), 200, elapsed)
//! u.connect_failure(server); u.ejection(server); u.retry(); u.health_transition(false);
//! metrics.record_handover(handed_over, drained, closed_at_deadline);   // end of an upgrade
//! ```
//! [`Metrics::render`] writes the Prometheus text format (see `metrics/render.rs`).

mod process;
mod render;
mod upstream;

pub use render::{render_workers, ServerLive, WorkerSeries, CONTENT_TYPE};
pub use upstream::{
    Histogram, ServerCounters, ServerMetrics, UpstreamCounters, UpstreamHandle, UpstreamKind,
    UpstreamMetrics,
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds (seconds) of the request-duration histogram buckets; `+Inf` is implied.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Status classes counted per upstream: 1xx to 5xx (anything else counts as 5xx).
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Counters of one process, continued across upgrades.
#[derive(Debug)]
pub struct Metrics {
    /// Client connections accepted (all listeners).
    pub accepted: AtomicU64,
    /// Client connections closed (all listeners).
    pub closed: AtomicU64,
    /// Bytes received from clients.
    pub bytes_in: AtomicU64,
    /// Bytes sent to clients.
    pub bytes_out: AtomicU64,
    /// HTTP requests answered.
    pub requests: AtomicU64,
    /// Upstream connect failures.
    pub connect_failures: AtomicU64,
    /// Upgrades that completed (counted by the predecessor, before its snapshot).
    pub upgrades_ok: AtomicU64,
    /// Upgrades that were rolled back.
    pub upgrades_failed: AtomicU64,
    /// Upstream attempts retried on another server.
    pub retries: AtomicU64,
    /// Connections passed to a successor.
    pub handed_over: AtomicU64,
    /// Connections that finished in an old process while it drained after an upgrade.
    pub drained: AtomicU64,
    /// Connections closed because the drain deadline passed.
    pub closed_at_deadline: AtomicU64,
    /// 1 for a first start, +1 per upgrade (a gauge, not carried).
    generation: AtomicU64,
    /// When this process started, ms since the Unix epoch (a gauge, not carried).
    started_unix_ms: u64,
    /// Per-listener series by listener name; swapped (copy on write) only when one is added.
    listeners: ArcSwap<BTreeMap<String, Arc<ListenerMetrics>>>,
    /// Per-upstream series by pool name; `""` collects requests that reached no upstream.
    upstreams: ArcSwap<BTreeMap<String, Arc<UpstreamMetrics>>>,
    /// Some listener speaks HTTP (else the HTTP totals cannot move and are not rendered).
    any_http: bool,
}

impl Default for Metrics {
    fn default() -> Self {
        let started_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        Metrics {
            accepted: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            upgrades_ok: AtomicU64::new(0),
            upgrades_failed: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            handed_over: AtomicU64::new(0),
            drained: AtomicU64::new(0),
            closed_at_deadline: AtomicU64::new(0),
            generation: AtomicU64::new(1),
            started_unix_ms,
            listeners: ArcSwap::from_pointee(BTreeMap::new()),
            upstreams: ArcSwap::from_pointee(BTreeMap::new()),
            any_http: false,
        }
    }
}

/// Series of one listener.
#[derive(Debug, Default)]
pub struct ListenerMetrics {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections served now (accepted or received, not yet closed or handed over).
    pub active: AtomicI64,
    /// Connections closed.
    pub closed: AtomicU64,
    /// Bytes received from clients.
    pub bytes_in: AtomicU64,
    /// Bytes sent to clients.
    pub bytes_out: AtomicU64,
}

/// The handle a listener's connections count through. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ListenerHandle {
    totals: Arc<Metrics>,
    m: Arc<ListenerMetrics>,
}

impl ListenerHandle {
    /// A connection was accepted.
    pub fn accepted(&self) {
        add(&self.totals.accepted, 1);
        add(&self.m.accepted, 1);
        self.m.active.fetch_add(1, Ordering::Relaxed);
    }
    /// A connection was received from a predecessor, or taken back after a rollback.
    pub fn resumed(&self) {
        self.m.active.fetch_add(1, Ordering::Relaxed);
    }
    /// A connection stopped being served here to be handed over (it may come back with
    /// [`Self::resumed`] if the upgrade is rolled back).
    pub fn parked(&self) {
        self.m.active.fetch_sub(1, Ordering::Relaxed);
    }
    /// A connection closed here.
    pub fn closed(&self) {
        add(&self.totals.closed, 1);
        add(&self.m.closed, 1);
        self.m.active.fetch_sub(1, Ordering::Relaxed);
    }
    /// Bytes relayed: `bytes_in` from the client, `bytes_out` to it.
    pub fn bytes(&self, bytes_in: u64, bytes_out: u64) {
        add(&self.totals.bytes_in, bytes_in);
        add(&self.totals.bytes_out, bytes_out);
        add(&self.m.bytes_in, bytes_in);
        add(&self.m.bytes_out, bytes_out);
    }
}

/// The carried counters of one listener.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ListenerCounters {
    /// See [`ListenerMetrics::accepted`].
    pub accepted: u64,
    /// See [`ListenerMetrics::closed`].
    pub closed: u64,
    /// See [`ListenerMetrics::bytes_in`].
    pub bytes_in: u64,
    /// See [`ListenerMetrics::bytes_out`].
    pub bytes_out: u64,
}

/// A snapshot of [`Metrics`], sent to a successor in the handover's `Done` message. Fields
/// added after protocol version 1 default to zero, so an older predecessor's message decodes.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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
    /// See [`Metrics::retries`].
    pub retries: u64,
    /// See [`Metrics::handed_over`].
    pub handed_over: u64,
    /// See [`Metrics::drained`].
    pub drained: u64,
    /// See [`Metrics::closed_at_deadline`].
    pub closed_at_deadline: u64,
    /// Per listener.
    pub listeners: BTreeMap<String, ListenerCounters>,
    /// Per upstream.
    pub upstreams: BTreeMap<String, UpstreamCounters>,
}

impl Counters {
    /// Adds `other` to these counters: every field, per listener and per upstream (the same
    /// sums as [`Metrics::absorb`], which does the adding). The supervisor keeps the last
    /// counters of its dead workers this way, so the service's totals never go down.
    pub fn add(&mut self, other: &Counters) {
        let m = Metrics::default();
        m.absorb(self);
        m.absorb(other);
        *self = m.snapshot();
    }
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
            upgrades_failed,
            retries,
            handed_over,
            drained,
            closed_at_deadline
        )
    };
}

impl Metrics {
    /// Metrics for a process of `generation` with the series of `cfg`'s listeners and
    /// upstreams created up front.
    pub fn new(cfg: &crate::config::Config, generation: u64) -> Metrics {
        let mut m = Metrics::default();
        m.generation.store(generation, Ordering::Relaxed);
        m.listeners.store(Arc::new(
            cfg.listeners
                .keys()
                .map(|n| (n.clone(), Arc::default()))
                .collect(),
        ));
        m.upstreams.store(Arc::new(
            UpstreamKind::of(cfg)
                .into_iter()
                .map(|(n, kind)| (n, Arc::new(UpstreamMetrics::new(kind))))
                .collect(),
        ));
        m.any_http = cfg
            .listeners
            .values()
            .any(|l| l.protocol == crate::config::Protocol::Http);
        m
    }

    /// Adds one to a counter.
    pub fn inc(c: &AtomicU64) {
        add(c, 1);
    }

    /// This process's generation.
    pub fn generation(&self) -> u64 {
        get(&self.generation)
    }

    /// When this process started, seconds since the Unix epoch.
    pub fn start_time_seconds(&self) -> f64 {
        self.started_unix_ms as f64 / 1000.0
    }

    fn listener_metrics(&self, name: &str) -> Arc<ListenerMetrics> {
        if let Some(m) = self.listeners.load().get(name) {
            return m.clone();
        }
        self.listeners.rcu(|map| {
            let mut map = BTreeMap::clone(map);
            map.entry(name.to_string()).or_default();
            map
        });
        self.listeners.load().get(name).cloned().unwrap_or_default()
    }

    fn upstream_metrics(&self, name: &str) -> Arc<UpstreamMetrics> {
        if let Some(m) = self.upstreams.load().get(name) {
            return m.clone();
        }
        self.upstreams.rcu(|map| {
            let mut map = BTreeMap::clone(map);
            map.entry(name.to_string()).or_default();
            map
        });
        self.upstreams.load().get(name).cloned().unwrap_or_default()
    }

    /// The handle of listener `name` (created if new). Call once per listener, not per
    /// connection: a new name copies the table.
    pub fn listener(self: &Arc<Self>, name: &str) -> ListenerHandle {
        ListenerHandle {
            totals: self.clone(),
            m: self.listener_metrics(name),
        }
    }

    /// The handle of upstream `name` (created if new); `""` means "no upstream".
    pub fn upstream(self: &Arc<Self>, name: &str) -> UpstreamHandle {
        UpstreamHandle {
            totals: self.clone(),
            m: self.upstream_metrics(name),
        }
    }

    /// One HTTP request answered with `status` after `d`, by upstream name (`""`: none, e.g.
    /// no route matched). Lock-free; an unknown name counts under `""` rather than allocate.
    pub fn http_request(&self, upstream: &str, status: u16, d: Duration) {
        add(&self.requests, 1);
        let map = self.upstreams.load();
        if let Some(m) = map.get(upstream).or_else(|| map.get("")) {
            m.request(status, d);
        }
    }

    /// Counts the outcome of one upgrade's connection handover, in the old process before
    /// it sends its snapshot.
    pub fn record_handover(&self, handed_over: u64, drained: u64, closed_at_deadline: u64) {
        add(&self.handed_over, handed_over);
        add(&self.drained, drained);
        add(&self.closed_at_deadline, closed_at_deadline);
    }

    /// Current values of every carried counter.
    pub fn snapshot(&self) -> Counters {
        macro_rules! snap {
            ($($f:ident),*) => { Counters { $($f: get(&self.$f),)* ..Counters::default() } };
        }
        let mut c = fields!(snap);
        for (name, l) in self.listeners.load().iter() {
            c.listeners.insert(
                name.clone(),
                ListenerCounters {
                    accepted: get(&l.accepted),
                    closed: get(&l.closed),
                    bytes_in: get(&l.bytes_in),
                    bytes_out: get(&l.bytes_out),
                },
            );
        }
        for (name, u) in self.upstreams.load().iter() {
            c.upstreams.insert(name.clone(), u.snapshot());
        }
        c
    }

    /// Adds a predecessor's totals to ours. Series of listeners and upstreams this process
    /// does not have are kept too, so no count is lost when a reload renames one.
    pub fn absorb(&self, c: &Counters) {
        macro_rules! absorb {
            ($($f:ident),*) => {{ $(add(&self.$f, c.$f);)* }};
        }
        fields!(absorb);
        for (name, lc) in &c.listeners {
            let l = self.listener_metrics(name);
            add(&l.accepted, lc.accepted);
            add(&l.closed, lc.closed);
            add(&l.bytes_in, lc.bytes_in);
            add(&l.bytes_out, lc.bytes_out);
        }
        for (name, uc) in &c.upstreams {
            self.upstream_metrics(name).absorb(uc);
        }
    }
}

#[cfg(test)]
mod tests;
