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
        let refused = |e: String| format!("config refused, nothing changed: {e}");
        // The config the new workers will read. A reload must load; an upgrade to another
        // binary may bring keys this one does not know, so its workers judge it themselves.
        let new_cfg = match Config::load(&self.opts.config_path) {
            Ok(c) => {
                crate::lifecycle::check_config(&c).map_err(refused)?;
                Some(c)
            }
            Err(e) if reload => return Err(format!("config refused, nothing changed:\n{e}")),
            Err(e) => {
                tracing::warn!(error = %e, "this binary cannot read the config; the new workers judge it, and its listeners are not changed");
                None
            }
        };
        // Listeners the new config adds are bound here, before any worker is touched: one that
        // cannot be bound refuses the reload at once.
        let mut change = match &new_cfg {
            Some(c) => super::listeners::plan(&self.sets, c).map_err(refused)?,
            None => None,
        };
        if let Some(c) = &change {
            tracing::info!(change = %c.describe(), "the new workers get the supervisor's new listener set");
        }
        let binary = binary
            .or_else(|| self.cfg.runtime.binary.clone())
            .unwrap_or_else(|| self.opts.binary.clone());
        let changes_config = new_cfg
            .as_ref()
            .is_some_and(|c| !crate::config::diff(&self.cfg, c).is_empty());
        self.next_sets = change.as_mut().map(|c| std::mem::take(&mut c.sets));
        let mut replaced = Vec::new();
        let mut failed = None;
        for i in 0..self.slots.len() {
            if self.deferred.is_some() {
                failed = Some((i, "a stop was requested".to_string()));
                break;
            }
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
                    failed = Some((i, e));
                    break;
                }
            }
        }
        let listed = |r: &[String]| {
            if r.is_empty() {
                String::new()
            } else {
                format!(": {}", r.join(", "))
            }
        };
        let mut note = String::new();
        if let Some((i, e)) = failed {
            if replaced.is_empty() || !changes_config || self.deferred.is_some() {
                // Nothing runs the new config (or it is the same config): stop here.
                self.next_sets = None;
                return Err(format!(
                    "worker {i} not replaced, it keeps serving ({} of {} replaced{}): {e}",
                    replaced.len(),
                    self.slots.len(),
                    listed(&replaced)
                ));
            }
            // Some workers already run the new config: the others must too, so they start
            // afresh with it, and the old ones drain.
            note = format!(
                "; worker {i} could not take over by handover ({e}): workers {i}..{} restarted with the new config, their old processes drain",
                self.slots.len() - 1
            );
            tracing::error!(index = i, reason = %e, "worker handover failed after others took the new config; restarting the rest with it");
            self.commit_listeners(change.as_ref(), new_cfg.as_ref());
            for j in i..self.slots.len() {
                self.restart_fresh(j, &binary);
            }
        } else {
            self.commit_listeners(change.as_ref(), new_cfg.as_ref());
        }
        let summary = format!(
            "upgrade ok: supervisor pid {} kept; {} workers replaced{}{}{}",
            std::process::id(),
            replaced.len(),
            listed(&replaced),
            change
                .as_ref()
                .map(|c| format!("; {}", c.describe()))
                .unwrap_or_default(),
            note
        );
        Ok((summary, binary))
    }

    /// Puts the listener sets of a finished upgrade in force: removed listeners close here
    /// (each old worker closes its copy as it exits), added ones go to every later worker.
    fn commit_listeners(
        &mut self,
        change: Option<&super::listeners::Change>,
        new: Option<&Config>,
    ) {
        let (Some(sets), Some(change), Some(new)) = (self.next_sets.take(), change, new) else {
            return;
        };
        self.sets = sets;
        self.cfg.listeners = new.listeners.clone();
        tracing::info!(change = %change.describe(), "listener set in force");
    }

    /// Stops slot `j`'s worker gracefully (it drains as a retiring worker) and starts a
    /// fresh one in its place with `binary` and the current listener set.
    fn restart_fresh(&mut self, j: usize, binary: &std::path::Path) {
        if let Some(old) = self.slots[j].worker.take() {
            old.signal(rustix::process::Signal::TERM);
            self.retiring.push(old);
        }
        let slot = &mut self.slots[j];
        slot.binary = binary.to_path_buf();
        slot.generation += 1;
        // Started by the loop's next tick, with the usual back-off if it fails.
        slot.restart_at = Some(std::time::Instant::now());
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
        // Its session-ticket keys come from the old worker, in the handover.
        new.tickets_epoch = self.slots[i].worker.as_ref().map_or(0, |w| w.tickets_epoch);
        let (a, b) = super::worker::pair()?;
        // With a listener change, the new worker gets the supervisor's new set first.
        let offered = match &self.next_sets {
            Some(sets) => Some(super::worker::offered(sets, i)?),
            None => None,
        };
        let sent_listeners = match &offered {
            Some(l) => new.send_listeners(l).await,
            None => Ok(()),
        };
        drop(offered);
        // A new worker that dies at once (a broken binary) closes its channel before it takes
        // this: it exited, whatever the send's own error says.
        let sent_new = match sent_listeners {
            Ok(()) => new.send_hand_over_to(&b).await,
            Err(e) => Err(e),
        }
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
