//! The upgrade in multi-process mode: workers are replaced one at a time. For worker i the
//! supervisor spawns its replacement (next generation, binary re-read from disk), creates a
//! fresh socketpair and sends one end to the old worker and the other to the new one
//! (`HandOverTo`); the two then run the single-process handover over it, the old worker as
//! predecessor (listeners, connections with their pending bytes, commit, drain, done). Once
//! the new worker reports it accepts, the old one is retired (it drains and exits) and the
//! next worker follows. A new worker that fails, exits or is not live in time is killed: the
//! old worker rolls back on its own (its successor vanished before the commit) and keeps
//! serving, and the upgrade stops there. Once every worker is replaced, the supervisor
//! re-executes itself in place ([`super::reexec`]).

use super::Supervisor;
use crate::config::Config;
use std::path::PathBuf;
use std::time::Duration;

impl Supervisor {
    /// Replaces every worker; returns a summary and the binary used, or why it stopped
    /// (workers already replaced stay replaced, the others keep serving).
    pub(super) async fn upgrade(
        &mut self,
        reload: bool,
        binary: Option<PathBuf>,
    ) -> Result<(String, PathBuf), String> {
        if reload {
            Config::load(&self.opts.config_path)
                .map_err(|e| format!("config refused, nothing changed:\n{e}"))?;
        }
        let binary = binary
            .or_else(|| self.cfg.runtime.binary.clone())
            .unwrap_or_else(|| self.opts.binary.clone());
        let mut replaced = Vec::new();
        for i in 0..self.slots.len() {
            let generation = self.slots[i].generation + 1;
            let live = self.slots[i]
                .worker
                .as_ref()
                .is_some_and(|w| w.live_since.is_some());
            if !live {
                // Not serving (restarting or starting): its next start uses the new binary.
                self.slots[i].binary = binary.clone();
                self.slots[i].generation = generation;
                continue;
            }
            match self.replace(i, &binary, generation).await {
                Ok((old, new)) => replaced.push(format!("worker {i}: pid {old} -> {new}")),
                Err(e) => {
                    return Err(format!(
                        "worker {i} not replaced, it keeps serving ({} of {} replaced{}): {e}",
                        replaced.len(),
                        self.slots.len(),
                        if replaced.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", replaced.join(", "))
                        }
                    ))
                }
            }
        }
        let summary = format!(
            "upgrade ok: supervisor pid {} kept; {} workers replaced: {}",
            std::process::id(),
            replaced.len(),
            replaced.join(", ")
        );
        Ok((summary, binary))
    }

    /// One step: worker `i` hands over to a new worker. Returns (old pid, new pid).
    async fn replace(
        &mut self,
        i: usize,
        binary: &std::path::Path,
        generation: u64,
    ) -> Result<(u32, u32), String> {
        let mut new = self.spawn_for(i, binary, generation)?;
        let new_pid = new.pid;
        let (a, b) = super::worker::pair()?;
        // A new worker that dies at once (a broken binary) closes its channel before it takes
        // this: it exited, whatever the send's own error says.
        let sent_new = new
            .send_hand_over_to(&b)
            .await
            .map_err(|e| format!("new worker pid {new_pid} exited before its handover ({e})"));
        self.incoming = Some(new);
        let sent_old = match self.slots[i].worker.as_mut() {
            Some(old) => old.send_hand_over_to(&a).await,
            None => Err("old worker gone".to_string()),
        };
        drop((a, b));
        let old_pid = self.slots[i].worker.as_ref().map_or(0, |w| w.pid);
        let limit = self.cfg.runtime.upgrade_timeout
            + self.cfg.runtime.drain_timeout.min(Duration::from_secs(5));
        let outcome = match sent_new.and(sent_old) {
            Err(e) => Err(e),
            Ok(()) => {
                // Ends as soon as the new worker is live, or has exited (no waiting for the
                // deadline when it died at once).
                self.pump_until(limit, |s| match &s.incoming {
                    Some(w) => w.live_since.is_some() || w.exited.is_some(),
                    None => true,
                })
                .await;
                match &self.incoming {
                    Some(w) if w.live_since.is_some() => Ok(()),
                    Some(w) => match &w.exited {
                        Some(st) => Err(format!("new worker pid {} exited ({st})", w.pid)),
                        None => Err(format!("new worker not live within {limit:?}")),
                    },
                    None => Err("new worker exited".to_string()),
                }
            }
        };
        if let Err(e) = outcome {
            if let Some(w) = self.incoming.take() {
                w.signal(rustix::process::Signal::KILL);
                // Its exit is reported later; it is no longer tracked, so nothing restarts it.
                if let Some(c) = &w.cgroup {
                    c.remove();
                }
            }
            tracing::error!(index = i, old_pid, new_pid, reason = %e, "worker upgrade rolled back");
            return Err(e);
        }
        let Some(new) = self.incoming.take() else {
            return Err("new worker lost".to_string());
        };
        if let Some(old) = self.slots[i].worker.replace(new) {
            self.retiring.push(old);
        }
        let slot = &mut self.slots[i];
        slot.binary = binary.to_path_buf();
        slot.generation = generation;
        slot.crash_streak = 0;
        slot.backoff = super::BACKOFF_MIN;
        tracing::info!(index = i, old_pid, new_pid, generation, "worker replaced");
        Ok((old_pid, new_pid))
    }
}
