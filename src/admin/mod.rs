//! Operating a running baton: the control socket the CLI talks to, the status it reports, the
//! HTTP admin endpoint ([`http`]) and the systemd integration ([`notify`]).

pub mod control;
pub mod http;
pub mod notify;

use std::fmt::Write as _;

/// Appends one line per listener of a status JSON (single process or supervisor).
pub fn render_listeners(out: &mut String, v: &serde_json::Value) {
    for (name, l) in v["listeners"].as_object().into_iter().flatten() {
        let _ = writeln!(
            out,
            "listener {name}: {} {} -> {}",
            l["protocol"].as_str().unwrap_or("?"),
            l["addr"].as_str().unwrap_or("?"),
            l["upstream"].as_str().unwrap_or("?")
        );
    }
}

/// Renders the status JSON (see `lifecycle`) as a few lines for a person.
pub fn render_status(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "baton {} pid {} generation {} phase {} up {}s",
        v["version"].as_str().unwrap_or("?"),
        v["pid"],
        v["generation"],
        v["phase"].as_str().unwrap_or("?"),
        v["uptime_s"]
    );
    render_listeners(&mut out, v);
    if let Some(us) = v["upstreams"].as_object() {
        for (name, servers) in us {
            for s in servers.as_array().into_iter().flatten() {
                let health = if s["ejected"].as_bool() == Some(true) {
                    "ejected"
                } else if s["healthy"].as_bool() == Some(false) {
                    "down"
                } else {
                    "up"
                };
                let _ = writeln!(
                    out,
                    "upstream {name}: {} {health} weight {} active {}",
                    s["addr"].as_str().unwrap_or("?"),
                    s["weight"],
                    s["active"]
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "connections: {} {}",
        v["connections"]["total"], v["connections"]["by_kind"]
    );
    for u in v["upgrades"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "upgrade: {}", u["summary"].as_str().unwrap_or("?"));
    }
    out
}
