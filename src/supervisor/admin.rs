//! The HTTP admin endpoint of a supervisor (`admin.listen` with `workers > 1`): the same
//! server as a single process's ([`crate::admin::http`]: `/status`, `/metrics`, `/healthz`,
//! `/readyz`, the page), with a [`Source`] that reads what the supervisor knows of its
//! workers. `/status` is the supervisor's status (what `baton status --json` prints);
//! `/metrics` has the service's totals under the single-process names (every worker's
//! counters added up, upgrades counted once per upgrade) and per-worker families labelled
//! `worker`; `/readyz` is ready while at least one worker serves.
//!
//! The supervisor publishes its workers' counters here at every heartbeat, so a scrape never
//! waits for its loop.

use super::Supervisor;
use crate::admin::http::{AdminCtx, Source};
use crate::config::Config;
use crate::metrics::{Counters, Metrics, WorkerSeries};
use std::sync::{Arc, Mutex};

/// What the supervisor last published for its admin endpoint.
#[derive(Debug, Default, Clone)]
pub(super) struct Published {
    /// The counters that make the totals: workers alive, retiring and retired.
    parts: Vec<Counters>,
    /// Upgrades of the service.
    upgrades: super::UpgradeCounts,
    /// One entry per slot.
    workers: Vec<WorkerSeries>,
    /// The workers' generation.
    generation: u64,
}

/// The supervisor's [`Source`].
#[derive(Debug)]
struct SupervisorSource {
    /// For the series created up front (listeners, upstreams).
    cfg: Config,
    published: Arc<Mutex<Published>>,
}

impl SupervisorSource {
    fn published(&self) -> Published {
        self.published.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

impl Source for SupervisorSource {
    fn metrics_text(&self) -> String {
        let p = self.published();
        let m = Metrics::new(&self.cfg, p.generation);
        for c in &p.parts {
            m.absorb(&Counters {
                // Each worker counts its own handovers; the service's upgrades are below.
                upgrades_ok: 0,
                upgrades_failed: 0,
                ..c.clone()
            });
        }
        m.upgrades_ok
            .store(p.upgrades.ok, std::sync::atomic::Ordering::Relaxed);
        m.upgrades_failed
            .store(p.upgrades.failed, std::sync::atomic::Ordering::Relaxed);
        let mut out = m.render();
        crate::metrics::render_workers(&mut out, &p.workers);
        out
    }

    fn not_ready(&self, status: &serde_json::Value) -> Vec<String> {
        let serving = status["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["state"] == "serving")
            .count();
        if serving == 0 {
            return vec!["no worker serving".to_string()];
        }
        Vec::new()
    }

    fn freshen(&self, v: &mut serde_json::Value) {
        let p = self.published();
        for (i, w) in p.workers.iter().enumerate() {
            v["workers"][i]["counters"] = serde_json::json!(w.counters);
        }
    }
}

impl Supervisor {
    /// Serves `admin.listen`, if configured: on `inherited` (the socket the image before a
    /// re-exec served, so scrapes queue in its backlog across the exec), or bound here.
    pub(super) fn start_admin(
        &mut self,
        inherited: Option<std::os::fd::OwnedFd>,
    ) -> Result<(), super::SupervisorError> {
        let Some(admin) = self.cfg.admin.clone() else {
            return Ok(());
        };
        let failed = |source| super::SupervisorError::Bind {
            name: "admin".into(),
            addr: admin.listen,
            source,
        };
        let listener = match inherited {
            Some(fd) => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true).map_err(failed)?;
                l
            }
            None => crate::admin::http::bind(admin.listen)
                .and_then(|l| l.into_std())
                .map_err(failed)?,
        };
        // A copy kept for the re-exec.
        self.admin_fd = Some(listener.try_clone().map_err(failed)?.into());
        let listener = tokio::net::TcpListener::from_std(listener).map_err(failed)?;
        let published = Arc::new(Mutex::new(Published::default()));
        self.published = Some(published.clone());
        self.publish();
        let source = SupervisorSource {
            cfg: self.cfg.clone(),
            published,
        };
        let ctx = AdminCtx::with_source(Box::new(source), self.control_tx.clone());
        // Ends with the process (or its image, at a re-exec).
        tokio::spawn(crate::admin::http::serve(
            listener,
            Arc::new(ctx),
            tokio_util::sync::CancellationToken::new(),
        ));
        Ok(())
    }

    /// Publishes the workers' counters for the admin endpoint.
    pub(super) fn publish(&self) {
        let Some(published) = &self.published else {
            return;
        };
        let mut parts = vec![self.retired.clone()];
        parts.extend(
            self.slots
                .iter()
                .filter_map(|s| s.worker.as_ref())
                .chain(self.retiring.iter())
                .map(|w| w.counters.clone()),
        );
        let workers = self
            .slots
            .iter()
            .map(|s| WorkerSeries {
                index: s.index,
                up: s.worker.as_ref().is_some_and(|w| w.live_since.is_some()),
                restarts: s.restarts,
                counters: s
                    .worker
                    .as_ref()
                    .map(|w| w.counters.clone())
                    .unwrap_or_default(),
            })
            .collect();
        if let Ok(mut p) = published.lock() {
            *p = Published {
                parts,
                upgrades: self.upgrades,
                workers,
                generation: self.slots.iter().map(|s| s.generation).max().unwrap_or(1),
            };
        }
    }
}
