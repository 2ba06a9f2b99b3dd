//! `baton status` for a person: the status JSON (see `lifecycle` and `supervisor`) rendered as
//! plain lines — listeners with their routes, upstream servers, connections by kind, and the
//! upgrade history with the time of each entry.

use crate::config::Listener;
use std::fmt::Write as _;
use std::net::SocketAddr;

/// A listener as status reports it: address (the bound one), protocol, default upstream, routes.
pub fn listener_json(l: &Listener, addr: SocketAddr) -> serde_json::Value {
    let routes: Vec<serde_json::Value> = l
        .routes
        .iter()
        .map(|r| serde_json::json!({ "host": r.host, "path_prefix": r.path_prefix, "upstream": r.upstream }))
        .collect();
    serde_json::json!({
        "addr": addr.to_string(),
        "protocol": l.protocol,
        "upstream": l.upstream,
        "routes": routes,
    })
}

fn s(v: &serde_json::Value) -> &str {
    v.as_str().unwrap_or("?")
}

/// Appends one line per listener of a status JSON (single process or supervisor), and one
/// indented line per route.
pub fn render_listeners(out: &mut String, v: &serde_json::Value) {
    for (name, l) in v["listeners"].as_object().into_iter().flatten() {
        let upstream = match l["upstream"].as_str() {
            Some("") | None => "no default upstream (unmatched requests get 404)",
            Some(u) => u,
        };
        let _ = writeln!(
            out,
            "listener {name}: {} {} -> {upstream}",
            s(&l["protocol"]),
            s(&l["addr"]),
        );
        for r in l["routes"].as_array().into_iter().flatten() {
            let mut m = String::new();
            if let Some(h) = r["host"].as_str() {
                let _ = write!(m, " host {h}");
            }
            if let Some(p) = r["path_prefix"].as_str() {
                let _ = write!(m, "{} path {p}", if m.is_empty() { "" } else { "," });
            }
            let _ = writeln!(out, "  route{m} -> {}", s(&r["upstream"]));
        }
    }
}

/// Appends the upgrade history, oldest first, each entry with its time (RFC 3339, UTC).
pub fn render_history(out: &mut String, v: &serde_json::Value) {
    let entries = v["upgrades"].as_array().map_or(&[][..], |a| a.as_slice());
    if entries.is_empty() {
        return;
    }
    let _ = writeln!(out, "upgrades (oldest first):");
    for u in entries {
        let at = u["at_ms"]
            .as_u64()
            .map_or_else(|| "?".into(), crate::logging::time::rfc3339_ms);
        let _ = writeln!(out, "  {at} {}", s(&u["summary"]));
    }
}

/// `secs` as `1d 2h 3m 4s`, leaving out leading zero units.
pub fn duration_text(secs: u64) -> String {
    let parts = [
        (secs / 86_400, "d"),
        (secs / 3600 % 24, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
    ];
    let mut out = String::new();
    for (n, unit) in parts {
        if n > 0 || !out.is_empty() || unit == "s" {
            let _ = write!(out, "{}{n}{unit}", if out.is_empty() { "" } else { " " });
        }
    }
    out
}

/// Renders the single-process status JSON as a few lines for a person.
pub fn render_status(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let since = v["started_ms"]
        .as_u64()
        .map(|ms| format!(" (since {})", crate::logging::time::rfc3339_ms(ms)))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "baton {}: pid {}, generation {}, {}, up {}{since}",
        s(&v["version"]),
        v["pid"],
        v["generation"],
        s(&v["phase"]),
        duration_text(v["uptime_s"].as_u64().unwrap_or(0)),
    );
    render_listeners(&mut out, v);
    for (name, servers) in v["upstreams"].as_object().into_iter().flatten() {
        for srv in servers.as_array().into_iter().flatten() {
            let health = if srv["ejected"].as_bool() == Some(true) {
                "ejected"
            } else if srv["healthy"].as_bool() == Some(false) {
                "down"
            } else {
                "up"
            };
            let from = srv["name"]
                .as_str()
                .map(|n| format!(" (from {n})"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "upstream {name}: {}{from} {health}, weight {}, {} active",
                s(&srv["addr"]),
                srv["weight"],
                srv["active"]
            );
        }
    }
    let by_kind: Vec<String> = v["connections"]["by_kind"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let _ = write!(out, "connections: {}", v["connections"]["total"]);
    if !by_kind.is_empty() {
        let _ = write!(out, " ({})", by_kind.join(", "));
    }
    out.push('\n');
    render_history(&mut out, v);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_text_has_no_json_and_times_its_history() {
        let v = json!({
            "version": "0.1.0", "pid": 42, "generation": 3, "phase": "ready",
            "uptime_s": 3723, "started_ms": 0,
            "listeners": {
                "web": { "addr": "127.0.0.1:8080", "protocol": "http", "upstream": "app",
                         "routes": [ { "host": null, "path_prefix": "/b", "upstream": "b" },
                                     { "host": "api.example.com", "path_prefix": "/v1", "upstream": "api" } ] },
                "db": { "addr": "127.0.0.1:5432", "protocol": "tcp", "upstream": "pg", "routes": [] }
            },
            "upstreams": { "pg": [ { "addr": "127.0.0.1:1", "weight": 1, "healthy": true, "ejected": false, "active": 2 } ] },
            "connections": { "total": 0, "by_kind": {} },
            "upgrades": [ { "at_ms": 1000, "ok": true, "summary": "upgrade ok: pid 41 -> 42" } ],
        });
        let text = render_status(&v);
        assert_eq!(
            text,
            "baton 0.1.0: pid 42, generation 3, ready, up 1h 2m 3s (since 1970-01-01T00:00:00.000Z)\n\
             listener db: tcp 127.0.0.1:5432 -> pg\n\
             listener web: http 127.0.0.1:8080 -> app\n\
             \x20 route path /b -> b\n\
             \x20 route host api.example.com, path /v1 -> api\n\
             upstream pg: 127.0.0.1:1 up, weight 1, 2 active\n\
             connections: 0\n\
             upgrades (oldest first):\n\
             \x20 1970-01-01T00:00:01.000Z upgrade ok: pid 41 -> 42\n"
        );
    }

    #[test]
    fn durations_leave_out_leading_zero_units() {
        assert_eq!(duration_text(0), "0s");
        assert_eq!(duration_text(61), "1m 1s");
        assert_eq!(duration_text(86_400), "1d 0h 0m 0s");
    }
}
