//! The Prometheus text exposition format (version 0.0.4), written by hand: a few dozen
//! families of plain atomics need no registry, and keeping our own atomics is what makes the
//! carry-over across upgrades a simple add (see docs/dependencies.md).

use super::{get, Metrics, DURATION_BUCKETS, STATUS_CLASSES};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Escapes a label value: backslash, double quote and newline.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn one(out: &mut String, name: &str, kind: &str, help: &str, v: impl std::fmt::Display) {
    head(out, name, kind, help);
    let _ = writeln!(out, "{name} {v}");
}

impl Metrics {
    /// Every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(8192);
        let out = &mut o;
        one(
            out,
            "baton_generation",
            "gauge",
            "Generation of this process: 1 for a first start, +1 per upgrade.",
            self.generation(),
        );
        one(
            out,
            "baton_process_start_time_seconds",
            "gauge",
            "Start time of this process since the Unix epoch, in seconds.",
            self.start_time_seconds(),
        );
        let totals: [(&str, &str, u64); 10] = [
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
            (
                "baton_http_requests_total",
                "HTTP requests answered, all upstreams.",
                get(&self.requests),
            ),
            (
                "baton_upstream_connect_failures_total",
                "Failed connects to upstream servers, all upstreams.",
                get(&self.connect_failures),
            ),
            (
                "baton_upstream_retries_total",
                "Upstream attempts retried on another server, all upstreams.",
                get(&self.retries),
            ),
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
        ];
        for (name, help, v) in totals {
            one(out, name, "counter", help, v);
        }
        head(
            out,
            "baton_upgrades_total",
            "counter",
            "Upgrades by result (ok, or failed and rolled back).",
        );
        let _ = writeln!(
            out,
            "baton_upgrades_total{{result=\"ok\"}} {}",
            get(&self.upgrades_ok)
        );
        let _ = writeln!(
            out,
            "baton_upgrades_total{{result=\"failed\"}} {}",
            get(&self.upgrades_failed)
        );
        self.render_listeners(out);
        self.render_upstreams(out);
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
            head(out, name, kind, help);
            for (l, m) in listeners.iter() {
                let v = match i {
                    0 => get(&m.accepted) as i64,
                    1 => m.active.load(Ordering::Relaxed).max(0),
                    2 => get(&m.closed) as i64,
                    3 => get(&m.bytes_in) as i64,
                    _ => get(&m.bytes_out) as i64,
                };
                let _ = writeln!(out, "{name}{{listener=\"{}\"}} {v}", esc(l));
            }
        }
    }

    fn render_upstreams(&self, out: &mut String) {
        let ups = self.upstreams.load();
        let name = "baton_upstream_http_responses_total";
        head(
            out,
            name,
            "counter",
            "HTTP responses by upstream (\"\" = none, e.g. no route) and status class.",
        );
        for (u, m) in ups.iter() {
            for (class, c) in STATUS_CLASSES.iter().zip(&m.responses) {
                let _ = writeln!(
                    out,
                    "{name}{{upstream=\"{}\",class=\"{class}\"}} {}",
                    esc(u),
                    get(c)
                );
            }
        }
        let name = "baton_http_request_duration_seconds";
        head(
            out,
            name,
            "histogram",
            "Time from request received to response head sent, by upstream.",
        );
        for (u, m) in ups.iter() {
            let u = esc(u);
            let mut cum = 0;
            for (b, c) in DURATION_BUCKETS.iter().zip(&m.duration.buckets) {
                cum += get(c);
                let _ = writeln!(out, "{name}_bucket{{upstream=\"{u}\",le=\"{b}\"}} {cum}");
            }
            let count = get(&m.duration.count);
            let _ = writeln!(out, "{name}_bucket{{upstream=\"{u}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(
                out,
                "{name}_sum{{upstream=\"{u}\"}} {}",
                get(&m.duration.sum_us) as f64 / 1e6
            );
            let _ = writeln!(out, "{name}_count{{upstream=\"{u}\"}} {count}");
        }
        let families: [(&str, &str); 2] = [
            (
                "baton_upstream_server_connect_failures_total",
                "Failed connects to the servers of an upstream.",
            ),
            (
                "baton_upstream_server_retries_total",
                "Attempts on an upstream retried on another of its servers.",
            ),
        ];
        let named = || ups.iter().filter(|(u, _)| !u.is_empty());
        for (i, (name, help)) in families.into_iter().enumerate() {
            head(out, name, "counter", help);
            for (u, m) in named() {
                let v = if i == 0 {
                    get(&m.connect_failures)
                } else {
                    get(&m.retries)
                };
                let _ = writeln!(out, "{name}{{upstream=\"{}\"}} {v}", esc(u));
            }
        }
        let name = "baton_upstream_health_transitions_total";
        head(
            out,
            name,
            "counter",
            "Servers of an upstream that became healthy (to=up) or unhealthy or ejected (to=down).",
        );
        for (u, m) in named() {
            let u = esc(u);
            let _ = writeln!(
                out,
                "{name}{{upstream=\"{u}\",to=\"up\"}} {}",
                get(&m.health_up)
            );
            let _ = writeln!(
                out,
                "{name}{{upstream=\"{u}\",to=\"down\"}} {}",
                get(&m.health_down)
            );
        }
    }
}
