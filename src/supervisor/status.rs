//! The supervisor's status: each worker (index, pid, generation, restarts, last heartbeat, its
//! counters), the supervisor's own generation (re-execs) and the service's totals, for `baton status` (JSON and text).

use super::Supervisor;
use crate::metrics::Counters;
use serde_json::json;
use std::fmt::Write as _;

impl Supervisor {
    /// Status for `baton status`.
    pub(super) fn status(&self) -> serde_json::Value {
        let mut totals = self.retired.clone();
        let mut workers = Vec::new();
        let describe = |w: &super::Worker, state: &str| {
            let isolation = crate::isolation::worker_status(
                w.pid,
                &w.placement,
                w.cgroup.as_ref().map(|c| c.dirs()).unwrap_or_default(),
            );
            json!({
                "pid": w.pid,
                "generation": w.generation,
                "state": state,
                "uptime_s": w.spawned.elapsed().as_secs(),
                "last_heartbeat_ms": w.last_heartbeat.elapsed().as_millis() as u64,
                "heartbeats": w.heartbeats,
                // Connections it serves now: how the accept spread shows.
                "active": w.counters.accepted.saturating_sub(w.counters.closed),
                "counters": w.counters,
                // The line `baton status` prints, for the status page.
                "isolation_text": isolation.is_object().then(|| crate::isolation::render_line(&isolation)),
                "isolation": isolation,
            })
        };
        for s in &self.slots {
            let mut v = match &s.worker {
                Some(w) => {
                    totals.add(&w.counters);
                    describe(
                        w,
                        if w.live_since.is_some() {
                            "serving"
                        } else {
                            "starting"
                        },
                    )
                }
                None => json!({ "state": "restarting", "counters": Counters::default() }),
            };
            v["index"] = json!(s.index);
            v["restarts"] = json!(s.restarts);
            v["oom_kills"] = json!(s.oom_kills);
            v["missed_heartbeat_kills"] = json!(s.missed_heartbeat_kills);
            v["crash_loop"] = json!(s.crash_streak >= super::CRASH_LOOP);
            v["last_exit"] = json!(s.last_exit);
            workers.push(v);
        }
        for w in &self.retiring {
            totals.add(&w.counters);
        }
        // Each worker counts its own handovers; the service's upgrades are the supervisor's.
        totals.upgrades_ok = self.upgrades.ok;
        totals.upgrades_failed = self.upgrades.failed;
        let listeners: serde_json::Map<String, serde_json::Value> = self
            .cfg
            .listeners
            .iter()
            .map(|(n, l)| {
                let addr = self
                    .sets
                    .first()
                    .and_then(|set| set.iter().find(|x| &x.name == n))
                    .map_or(l.listen, |x| x.addr);
                (n.clone(), crate::admin::status::listener_json(l, addr))
            })
            .collect();
        json!({
            "mode": "supervisor",
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            // +1 per re-exec of the supervisor in place.
            "supervisor_generation": self.opts.generation,
            "binary": self.opts.binary,
            "generation": self.slots.iter().map(|s| s.generation).max().unwrap_or(1),
            "phase": if self.stopping {
                "draining"
            } else if self.upgrading.is_some() {
                "upgrading"
            } else {
                "ready"
            },
            "upgrading_ms": self.upgrading.map(|t| t.elapsed().as_millis() as u64),
            "uptime_s": self.started.elapsed().as_secs(),
            "accept": self.cfg.runtime.accept,
            "accept_turns": self.board.is_some(),
            "limits": self.cfg.runtime.worker_limits,
            "isolation": crate::isolation::report::in_force(None).ok(),
            "cgroups": self.cgroups.as_ref().map(|c| c.version),
            "listeners": listeners,
            "workers": workers,
            "retiring": self.retiring.iter().map(|w| describe(w, "handing_over")).collect::<Vec<_>>(),
            // The new worker of the current upgrade step, until it is live.
            "incoming": self.incoming.as_ref().map(|w| {
                let mut v = describe(w, if w.exited.is_some() { "exited" } else { "starting" });
                v["index"] = json!(w.index);
                v
            }),
            "totals": totals,
            "upgrades": self.history,
        })
    }
}

/// Renders the supervisor's status JSON as lines for a person.
pub fn render(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "baton {} supervisor pid {} (generation {}) workers' generation {} phase {} up {} accept {}",
        v["version"].as_str().unwrap_or("?"),
        v["pid"],
        v["supervisor_generation"],
        v["generation"],
        v["phase"].as_str().unwrap_or("?"),
        crate::admin::status::duration_text(v["uptime_s"].as_u64().unwrap_or(0)),
        v["accept"].as_str().unwrap_or("?"),
    );
    crate::admin::render_listeners(&mut out, v);
    let line = |c: &serde_json::Value| {
        format!(
            "accepted {} closed {} requests {} bytes_in {} bytes_out {}",
            c["accepted"], c["closed"], c["requests"], c["bytes_in"], c["bytes_out"]
        )
    };
    // The spread: connections each worker serves now, and its share.
    let workers = v["workers"].as_array().map_or(&[][..], |w| w.as_slice());
    let active: Vec<u64> = workers
        .iter()
        .map(|w| w["active"].as_u64().unwrap_or(0))
        .collect();
    let all: u64 = active.iter().sum();
    let shares: Vec<String> = workers
        .iter()
        .zip(&active)
        .map(|(w, n)| {
            let pct = (n * 100).checked_div(all).unwrap_or(0);
            format!("worker {} {n} ({pct}%)", w["index"])
        })
        .collect();
    let _ = writeln!(
        out,
        "spread ({}{}): {} active: {}",
        v["accept"].as_str().unwrap_or("?"),
        if v["accept_turns"].as_bool() == Some(true) {
            ", workers take turns"
        } else {
            ""
        },
        all,
        shares.join(", ")
    );
    for w in v["workers"].as_array().into_iter().flatten() {
        let _ =
            writeln!(
            out,
            "worker {}: pid {} generation {} {} restarts {} oom_kills {} heartbeat {} ms ago{}: {}",
            w["index"],
            w["pid"],
            w["generation"],
            w["state"].as_str().unwrap_or("?"),
            w["restarts"],
            w["oom_kills"],
            w["last_heartbeat_ms"],
            if w["crash_loop"].as_bool() == Some(true) { " CRASH LOOP" } else { "" },
            line(&w["counters"]),
        );
        if w["isolation"].is_object() {
            let _ = writeln!(
                out,
                "  isolation: {}",
                crate::isolation::render_line(&w["isolation"])
            );
        }
    }
    if let Some(w) = v["incoming"].as_object() {
        let _ = writeln!(
            out,
            "upgrading for {} ms: new worker {} pid {} {} (spawned {} s ago)",
            v["upgrading_ms"],
            w["index"],
            w["pid"],
            w["state"].as_str().unwrap_or("?"),
            w["uptime_s"],
        );
    }
    let _ = writeln!(out, "total: {}", line(&v["totals"]));
    crate::admin::status::render_history(&mut out, v);
    out
}
