//! The Prometheus text exposition format (version 0.0.4), written by hand: the metrics are
//! baton's own relaxed atomics so that a handover can snapshot them and the successor add them
//! back (see docs/dependencies.md for why not prometheus-client).
//!
//! A family is written only with at least one series, and a series only where it can move:
//! no HTTP series for an upstream no HTTP listener uses, no ejection series where ejection is
//! off, no health-transition series without active checks. Counts carried from a predecessor
//! are always shown.

use super::process::ProcessStats;
use super::{get, Metrics, UpstreamMetrics, DURATION_BUCKETS, STATUS_CLASSES};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The live state of one upstream server, read from its pool at scrape time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLive {
    /// The upstream's name.
    pub upstream: String,
    /// The server's address.
    pub server: SocketAddr,
    /// Whether picks may choose it now (healthy and not ejected).
    pub up: bool,
    /// Connections using it now.
    pub active: usize,
}

/// One worker of a supervisor, for the per-worker series of its `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct WorkerSeries {
    /// The worker's index.
    pub index: usize,
    /// Whether a worker serves in that slot now.
    pub up: bool,
    /// Restarts of that slot.
    pub restarts: u64,
    /// The worker's counters as of its last heartbeat.
    pub counters: super::Counters,
}

/// Appends the per-worker families of a supervisor's `/metrics` (label `worker`), after the
/// service's totals that [`Metrics::render`] wrote.
pub fn render_workers(out: &mut String, workers: &[WorkerSeries]) {
    type Pick = fn(&WorkerSeries) -> i64;
    let families: [(&'static str, &'static str, &'static str, Pick); 8] = [
        (
            "baton_worker_up",
            "gauge",
            "1 if a worker serves in this slot now, else 0.",
            |w| i64::from(w.up),
        ),
        (
            "baton_worker_restarts_total",
            "counter",
            "Restarts of a worker slot after its worker exited.",
            |w| w.restarts as i64,
        ),
        (
            "baton_worker_connections_accepted_total",
            "counter",
            "Client connections a worker accepted.",
            |w| w.counters.accepted as i64,
        ),
        (
            "baton_worker_connections_active",
            "gauge",
            "Client connections a worker serves now (accepted minus closed).",
            |w| w.counters.accepted.saturating_sub(w.counters.closed) as i64,
        ),
        (
            "baton_worker_connections_closed_total",
            "counter",
            "Client connections a worker closed.",
            |w| w.counters.closed as i64,
        ),
        (
            "baton_worker_received_bytes_total",
            "counter",
            "Bytes a worker received from clients.",
            |w| w.counters.bytes_in as i64,
        ),
        (
            "baton_worker_sent_bytes_total",
            "counter",
            "Bytes a worker sent to clients.",
            |w| w.counters.bytes_out as i64,
        ),
        (
            "baton_worker_http_requests_total",
            "counter",
            "HTTP requests a worker answered.",
            |w| w.counters.requests as i64,
        ),
    ];
    for (name, kind, help, pick) in families {
        let mut f = Family::new(out, name, kind, help);
        for w in workers {
            f.series("", &format!("worker=\"{}\"", w.index), pick(w));
        }
    }
}

/// Escapes a label value: backslash, double quote and newline.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One family being written: its header goes out with its first series.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    started: bool,
}

impl<'a> Family<'a> {
    fn new(
        out: &'a mut String,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
    ) -> Self {
        Family {
            out,
            name,
            kind,
            help,
            started: false,
        }
    }

    /// Writes `name{labels} value` (`labels` already formatted, without braces; may be empty).
    fn series(&mut self, suffix: &str, labels: &str, v: impl std::fmt::Display) {
        if !self.started {
            let _ = writeln!(self.out, "# HELP {} {}", self.name, self.help);
            let _ = writeln!(self.out, "# TYPE {} {}", self.name, self.kind);
            self.started = true;
        }
        if labels.is_empty() {
            let _ = writeln!(self.out, "{}{suffix} {v}", self.name);
        } else {
            let _ = writeln!(self.out, "{}{suffix}{{{labels}}} {v}", self.name);
        }
    }
}

fn one(out: &mut String, name: &'static str, kind: &'static str, help: &'static str, v: u64) {
    Family::new(out, name, kind, help).series("", "", v);
}

fn up_label(u: &str) -> String {
    format!("upstream=\"{}\"", esc(u))
}

fn server_label(u: &str, s: SocketAddr) -> String {
    format!("upstream=\"{}\",server=\"{s}\"", esc(u))
}

/// Whether any of the counters is above zero.
fn any(c: &[std::sync::atomic::AtomicU64]) -> bool {
    c.iter().any(|c| get(c) > 0)
}

impl Metrics {
    /// Every metric in the Prometheus text format, without live per-server gauges.
    pub fn render(&self) -> String {
        self.render_with(&[])
    }

    /// Every metric in the Prometheus text format; `live` gives each upstream server's state
    /// (its `up` and active-connection gauges, and a zero for its counters before any event).
    pub fn render_with(&self, live: &[ServerLive]) -> String {
        let mut o = String::with_capacity(8192);
        let out = &mut o;
        let commit = option_env!("BATON_COMMIT").unwrap_or("unknown");
        Family::new(
            out,
            "baton_build_info",
            "gauge",
            "Always 1; the labels say which build of baton this process runs.",
        )
        .series(
            "",
            &format!(
                "version=\"{}\",commit=\"{}\"",
                esc(env!("CARGO_PKG_VERSION")),
                esc(commit)
            ),
            1,
        );
        one(
            out,
            "baton_generation",
            "gauge",
            "Generation of this process: 1 for a first start, +1 per upgrade.",
            self.generation(),
        );
        ProcessStats::read().render(out, self.start_time_seconds());
        let mut totals: Vec<(&'static str, &'static str, u64)> = vec![
            (
                "baton_connections_accepted_total",
                "Client connections accepted, all listeners.",
                get(&self.accepted),
            ),
            (
                "baton_connections_closed_total",
                "Client connections closed, all listeners.",
                get(&self.closed),
            ),
            (
                "baton_received_bytes_total",
                "Bytes received from clients, all listeners.",
                get(&self.bytes_in),
            ),
            (
                "baton_sent_bytes_total",
                "Bytes sent to clients, all listeners.",
                get(&self.bytes_out),
            ),
        ];
        if self.any_http || get(&self.requests) > 0 {
            totals.push((
                "baton_http_requests_total",
                "HTTP requests answered, all upstreams.",
                get(&self.requests),
            ));
        }
        totals.extend([
            (
                "baton_connections_handed_over_total",
                "Connections passed to a successor process.",
                get(&self.handed_over),
            ),
            (
                "baton_connections_drained_total",
                "Connections that finished in an old process after an upgrade.",
                get(&self.drained),
            ),
            (
                "baton_connections_closed_at_deadline_total",
                "Connections closed when a drain deadline passed.",
                get(&self.closed_at_deadline),
            ),
        ]);
        for (name, help, v) in totals {
            one(out, name, "counter", help, v);
        }
        let mut f = Family::new(
            out,
            "baton_upgrades_total",
            "counter",
            "Upgrades by result (ok, or failed and rolled back).",
        );
        f.series("", "result=\"ok\"", get(&self.upgrades_ok));
        f.series("", "result=\"failed\"", get(&self.upgrades_failed));
        self.render_listeners(out);
        self.render_upstreams(out);
        self.render_servers(out, live);
        o
    }

    fn render_listeners(&self, out: &mut String) {
        let listeners = self.listeners.load();
        let families: [(&str, &str, &str); 5] = [
            (
                "baton_listener_connections_accepted_total",
                "counter",
                "Connections accepted by a listener.",
            ),
            (
                "baton_listener_connections_active",
                "gauge",
                "Connections of a listener served by this process now.",
            ),
            (
                "baton_listener_connections_closed_total",
                "counter",
                "Connections of a listener closed.",
            ),
            (
                "baton_listener_received_bytes_total",
                "counter",
                "Bytes received from clients of a listener.",
            ),
            (
                "baton_listener_sent_bytes_total",
                "counter",
                "Bytes sent to clients of a listener.",
            ),
        ];
        for (i, (name, kind, help)) in families.into_iter().enumerate() {
            let mut f = Family::new(out, name, kind, help);
            for (l, m) in listeners.iter() {
                let v = match i {
                    0 => get(&m.accepted) as i64,
                    1 => m.active.load(Ordering::Relaxed).max(0),
                    2 => get(&m.closed) as i64,
                    3 => get(&m.bytes_in) as i64,
                    _ => get(&m.bytes_out) as i64,
                };
                f.series("", &format!("listener=\"{}\"", esc(l)), v);
            }
        }
    }

    fn render_upstreams(&self, out: &mut String) {
        let ups = self.upstreams.load();
        let http =
            |m: &UpstreamMetrics| m.kind.http || any(&m.responses) || get(&m.duration.count) > 0;
        let mut f = Family::new(
            out,
            "baton_upstream_http_responses_total",
            "counter",
            "HTTP responses by upstream (\"\" = none, e.g. no route) and status class.",
        );
        for (u, m) in ups.iter().filter(|(_, m)| http(m)) {
            for (class, c) in STATUS_CLASSES.iter().zip(&m.responses) {
                f.series("", &format!("{},class=\"{class}\"", up_label(u)), get(c));
            }
        }
        let mut f = Family::new(
            out,
            "baton_http_request_duration_seconds",
            "histogram",
            "Time from request received to response head sent, by upstream.",
        );
        for (u, m) in ups.iter().filter(|(_, m)| http(m)) {
            let l = up_label(u);
            let mut cum = 0;
            for (b, c) in DURATION_BUCKETS.iter().zip(&m.duration.buckets) {
                cum += get(c);
                f.series("_bucket", &format!("{l},le=\"{b}\""), cum);
            }
            let count = get(&m.duration.count);
            f.series("_bucket", &format!("{l},le=\"+Inf\""), count);
            f.series("_sum", &l, get(&m.duration.sum_us) as f64 / 1e6);
            f.series("_count", &l, count);
        }
        let named = || ups.iter().filter(|(u, _)| !u.is_empty());
        let mut f = Family::new(
            out,
            "baton_upstream_retries_total",
            "counter",
            "Attempts on an upstream retried on another of its servers.",
        );
        for (u, m) in named().filter(|(_, m)| m.kind.retries || get(&m.retries) > 0) {
            f.series("", &up_label(u), get(&m.retries));
        }
        let mut f = Family::new(
            out,
            "baton_upstream_health_transitions_total",
            "counter",
            "Servers of an upstream that active checks found healthy (to=up) or unhealthy (to=down).",
        );
        let checked = |m: &UpstreamMetrics| {
            m.kind.health_checks || get(&m.health_up) + get(&m.health_down) > 0
        };
        for (u, m) in named().filter(|(_, m)| checked(m)) {
            f.series("", &format!("{},to=\"up\"", up_label(u)), get(&m.health_up));
            f.series(
                "",
                &format!("{},to=\"down\"", up_label(u)),
                get(&m.health_down),
            );
        }
    }

    fn render_servers(&self, out: &mut String, live: &[ServerLive]) {
        let ups = self.upstreams.load();
        let mut f = Family::new(
            out,
            "baton_upstream_server_up",
            "gauge",
            "1 if the server may be chosen now (healthy and not ejected), else 0.",
        );
        for s in live {
            f.series("", &server_label(&s.upstream, s.server), u8::from(s.up));
        }
        let mut f = Family::new(
            out,
            "baton_upstream_server_connections_active",
            "gauge",
            "Connections using the server now.",
        );
        for s in live {
            f.series("", &server_label(&s.upstream, s.server), s.active);
        }
        // Every server that is live or has counts (one removed since keeps its series).
        let mut servers: Vec<(String, SocketAddr)> = live
            .iter()
            .map(|s| (s.upstream.clone(), s.server))
            .collect();
        for (u, m) in ups.iter().filter(|(u, _)| !u.is_empty()) {
            servers.extend(m.servers.load().keys().map(|a| (u.clone(), *a)));
        }
        servers.sort();
        servers.dedup();
        let counts = |u: &str, s: SocketAddr| {
            let m = ups.get(u)?;
            let sm = m.servers.load().get(&s).cloned();
            Some((m.kind, sm))
        };
        let mut f = Family::new(
            out,
            "baton_upstream_server_http_responses_total",
            "counter",
            "HTTP responses a server gave, by status class.",
        );
        for (u, s) in &servers {
            let Some((kind, sm)) = counts(u, *s) else {
                continue;
            };
            if !kind.http && !sm.as_ref().is_some_and(|m| any(&m.responses)) {
                continue;
            }
            for (i, class) in STATUS_CLASSES.iter().enumerate() {
                let v = sm.as_ref().map_or(0, |m| get(&m.responses[i]));
                f.series("", &format!("{},class=\"{class}\"", server_label(u, *s)), v);
            }
        }
        let mut f = Family::new(
            out,
            "baton_upstream_server_connect_failures_total",
            "counter",
            "Failed connects to a server (not those failed for lack of local file descriptors).",
        );
        for (u, s) in &servers {
            if let Some((_, sm)) = counts(u, *s) {
                let v = sm.as_ref().map_or(0, |m| get(&m.connect_failures));
                f.series("", &server_label(u, *s), v);
            }
        }
        let mut f = Family::new(
            out,
            "baton_upstream_server_ejections_total",
            "counter",
            "Times a server was ejected after consecutive connect failures.",
        );
        for (u, s) in &servers {
            let Some((kind, sm)) = counts(u, *s) else {
                continue;
            };
            let v = sm.as_ref().map_or(0, |m| get(&m.ejections));
            if kind.ejects || v > 0 {
                f.series("", &server_label(u, *s), v);
            }
        }
    }
}
