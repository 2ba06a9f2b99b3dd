//! Per-upstream and per-server series: HTTP responses by class and their durations, connect
//! failures, retries, ejections and health transitions, with their carried form.

use super::{add, get, Metrics, DURATION_BUCKETS};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// Which series can move for an upstream, from the configuration; a series that cannot move
/// is not rendered (unless it holds counts carried from a predecessor).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamKind {
    /// An HTTP listener or route sends requests to it (else its HTTP series stay at zero).
    pub http: bool,
    /// It has active health checks.
    pub health_checks: bool,
    /// Passive ejection is on (`eject_after` > 0).
    pub ejects: bool,
    /// Failed attempts are retried on another server (`retries` > 0).
    pub retries: bool,
}

impl UpstreamKind {
    /// The kind of every upstream of `cfg`, and of `""` (requests that reached no upstream:
    /// HTTP if any listener is).
    pub fn of(cfg: &crate::config::Config) -> BTreeMap<String, UpstreamKind> {
        use crate::config::Protocol;
        let mut kinds: BTreeMap<String, UpstreamKind> = cfg
            .upstreams
            .iter()
            .map(|(name, u)| {
                let k = UpstreamKind {
                    http: false,
                    health_checks: u.health_check.is_some(),
                    ejects: u.eject_after > 0,
                    retries: u.retries > 0,
                };
                (name.clone(), k)
            })
            .collect();
        let any_http = cfg.listeners.values().any(|l| l.protocol == Protocol::Http);
        kinds.insert(
            String::new(),
            UpstreamKind {
                http: any_http,
                ..UpstreamKind::default()
            },
        );
        for l in cfg
            .listeners
            .values()
            .filter(|l| l.protocol == Protocol::Http)
        {
            let used = std::iter::once(&l.upstream).chain(l.routes.iter().map(|r| &r.upstream));
            for u in used {
                if let Some(k) = kinds.get_mut(u) {
                    k.http = true;
                }
            }
        }
        kinds
    }
}

/// A request-duration histogram: non-cumulative bucket counts (cumulated when rendered).
#[derive(Debug, Default)]
pub struct Histogram {
    /// One count per [`DURATION_BUCKETS`] bound; slower requests only reach `count`.
    pub(super) buckets: [AtomicU64; DURATION_BUCKETS.len()],
    /// Sum of observed durations in microseconds.
    pub(super) sum_us: AtomicU64,
    /// Observations.
    pub(super) count: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = DURATION_BUCKETS.iter().position(|b| secs <= *b) {
            add(&self.buckets[i], 1);
        }
        add(&self.sum_us, d.as_micros().min(u64::MAX as u128) as u64);
        add(&self.count, 1);
    }
}

/// The index in [`super::STATUS_CLASSES`] of `status` (anything outside 1xx–5xx is 5xx).
fn class_of(status: u16) -> usize {
    usize::from((status / 100).clamp(1, 5)) - 1
}

/// Series of one server of an upstream.
#[derive(Debug, Default)]
pub struct ServerMetrics {
    /// HTTP responses by status class.
    pub responses: [AtomicU64; 5],
    /// Failed connects to it (not those failed for lack of local resources).
    pub connect_failures: AtomicU64,
    /// Passive ejections.
    pub ejections: AtomicU64,
}

/// Series of one upstream pool.
#[derive(Debug, Default)]
pub struct UpstreamMetrics {
    /// Which of its series can move.
    pub kind: UpstreamKind,
    /// HTTP responses by status class (see [`super::STATUS_CLASSES`]).
    pub responses: [AtomicU64; 5],
    /// Request durations.
    pub duration: Histogram,
    /// Attempts retried on another server.
    pub retries: AtomicU64,
    /// Servers that active checks found healthy again.
    pub health_up: AtomicU64,
    /// Servers that active checks found unhealthy.
    pub health_down: AtomicU64,
    /// Per-server series, created by a server's first event; swapped (copy on write) only
    /// when one is added.
    pub servers: ArcSwap<BTreeMap<SocketAddr, Arc<ServerMetrics>>>,
}

impl UpstreamMetrics {
    /// A pool's series for an upstream of `kind`.
    pub(super) fn new(kind: UpstreamKind) -> UpstreamMetrics {
        UpstreamMetrics {
            kind,
            ..UpstreamMetrics::default()
        }
    }

    pub(super) fn request(&self, status: u16, d: Duration) {
        add(&self.responses[class_of(status)], 1);
        self.duration.observe(d);
    }

    /// The series of `server`, created if new.
    pub(super) fn server(&self, server: SocketAddr) -> Arc<ServerMetrics> {
        if let Some(m) = self.servers.load().get(&server) {
            return m.clone();
        }
        self.servers.rcu(|map| {
            let mut map = BTreeMap::clone(map);
            map.entry(server).or_default();
            map
        });
        self.servers
            .load()
            .get(&server)
            .cloned()
            .unwrap_or_default()
    }

    pub(super) fn snapshot(&self) -> UpstreamCounters {
        UpstreamCounters {
            responses: std::array::from_fn(|i| get(&self.responses[i])),
            duration_buckets: self.duration.buckets.iter().map(get).collect(),
            duration_sum_us: get(&self.duration.sum_us),
            duration_count: get(&self.duration.count),
            connect_failures: self
                .servers
                .load()
                .values()
                .map(|s| get(&s.connect_failures))
                .sum(),
            retries: get(&self.retries),
            health_up: get(&self.health_up),
            health_down: get(&self.health_down),
            servers: self
                .servers
                .load()
                .iter()
                .map(|(addr, s)| {
                    let c = ServerCounters {
                        responses: std::array::from_fn(|i| get(&s.responses[i])),
                        connect_failures: get(&s.connect_failures),
                        ejections: get(&s.ejections),
                    };
                    (addr.to_string(), c)
                })
                .collect(),
        }
    }

    pub(super) fn absorb(&self, uc: &UpstreamCounters) {
        for (a, n) in self.responses.iter().zip(uc.responses) {
            add(a, n);
        }
        // A different bucket layout (another version) cannot be merged bucket by bucket; its
        // observations still count in sum and count (and so in `+Inf`).
        if uc.duration_buckets.len() == DURATION_BUCKETS.len() {
            for (a, n) in self.duration.buckets.iter().zip(&uc.duration_buckets) {
                add(a, *n);
            }
        }
        add(&self.duration.sum_us, uc.duration_sum_us);
        add(&self.duration.count, uc.duration_count);
        add(&self.retries, uc.retries);
        add(&self.health_up, uc.health_up);
        add(&self.health_down, uc.health_down);
        for (addr, sc) in &uc.servers {
            let Ok(addr) = addr.parse::<SocketAddr>() else {
                continue;
            };
            let s = self.server(addr);
            for (a, n) in s.responses.iter().zip(sc.responses) {
                add(a, n);
            }
            add(&s.connect_failures, sc.connect_failures);
            add(&s.ejections, sc.ejections);
        }
    }
}

/// The handle an upstream pool counts through. Cheap to clone.
#[derive(Debug, Clone)]
pub struct UpstreamHandle {
    pub(super) totals: Arc<Metrics>,
    pub(super) m: Arc<UpstreamMetrics>,
}

impl UpstreamHandle {
    /// One HTTP request answered with `status` after `d` (no server known, e.g. a 502 before
    /// any connect; [`Self::request_to`] also counts it for the server).
    pub fn request(&self, status: u16, d: Duration) {
        add(&self.totals.requests, 1);
        self.m.request(status, d);
    }

    /// One HTTP request answered with `status` after `d`, counted for the upstream and, when
    /// known, for the server that answered it.
    pub fn request_to(&self, server: Option<SocketAddr>, status: u16, d: Duration) {
        self.request(status, d);
        if let Some(s) = server {
            // Once per request: borrowed from the map when the series exists (an `Arc` clone
            // and drop saved), created otherwise.
            let class = class_of(status);
            match self.m.servers.load().get(&s) {
                Some(m) => add(&m.responses[class], 1),
                None => add(&self.m.server(s).responses[class], 1),
            }
        }
    }

    /// A connect to `server` failed.
    pub fn connect_failure(&self, server: SocketAddr) {
        add(&self.totals.connect_failures, 1);
        add(&self.m.server(server).connect_failures, 1);
    }

    /// `server` was ejected (passive health).
    pub fn ejection(&self, server: SocketAddr) {
        add(&self.m.server(server).ejections, 1);
    }

    /// An attempt is retried on another server.
    pub fn retry(&self) {
        add(&self.totals.retries, 1);
        add(&self.m.retries, 1);
    }

    /// Active checks found a server healthy (`true`) or unhealthy (`false`).
    pub fn health_transition(&self, healthy: bool) {
        add(
            if healthy {
                &self.m.health_up
            } else {
                &self.m.health_down
            },
            1,
        );
    }
}

/// The carried counters of one server.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerCounters {
    /// See [`ServerMetrics::responses`].
    pub responses: [u64; 5],
    /// See [`ServerMetrics::connect_failures`].
    pub connect_failures: u64,
    /// See [`ServerMetrics::ejections`].
    pub ejections: u64,
}

/// The carried counters of one upstream.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpstreamCounters {
    /// Responses by status class, 1xx to 5xx.
    pub responses: [u64; 5],
    /// Non-cumulative histogram bucket counts, one per [`DURATION_BUCKETS`] bound.
    pub duration_buckets: Vec<u64>,
    /// Sum of durations, µs.
    pub duration_sum_us: u64,
    /// Number of durations.
    pub duration_count: u64,
    /// Failed connects to its servers (the sum of theirs; kept for status and older readers).
    pub connect_failures: u64,
    /// See [`UpstreamMetrics::retries`].
    pub retries: u64,
    /// See [`UpstreamMetrics::health_up`].
    pub health_up: u64,
    /// See [`UpstreamMetrics::health_down`].
    pub health_down: u64,
    /// Per server, by address.
    pub servers: BTreeMap<String, ServerCounters>,
}
