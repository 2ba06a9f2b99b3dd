//! Multi-process mode (`runtime.workers: N > 1`): a small supervisor that owns the listening
//! sockets, the control socket and the pid file, and runs N worker processes of the same
//! binary (`baton worker`, a hidden subcommand). Each worker is a successor in the sense of the
//! handover protocol: the supervisor hands it its listeners (`shared`: the same sockets for
//! every worker; `reuseport`: a SO_REUSEPORT socket per worker and listener, created and kept
//! here so a worker restart never loses an accept queue). Workers report a heartbeat every
//! second; one that misses 3 in a row is killed and, like any worker that exits, restarted
//! with exponential back-off. Signals go to the supervisor: SIGTERM/SIGINT stop every worker
//! gracefully, SIGUSR2 replaces them one by one through the single-process handover (see
//! [`upgrade`]). Per-worker limits: [`limits`].

mod admin;
pub(crate) mod fds;
pub mod limits;
mod listeners;
mod reexec;
mod resume;
mod serve;
mod status;
mod tickets;
mod upgrade;
pub mod worker;

pub use resume::resume;

pub use status::render as render_status;

use crate::admin::control;
use crate::config::Config;
use crate::lifecycle::{RunOptions, Triggers};
use crate::metrics::Counters;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use worker::{Event, ListenerFd, Worker};

/// Missed heartbeats before a worker is killed and replaced.
pub const MISSED_HEARTBEATS: u32 = 3;
/// First restart delay; doubles per consecutive crash.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Largest restart delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker that served this long resets its back-off.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// Consecutive crashes that count as a crash loop.
pub const CRASH_LOOP: u32 = 5;

/// Why the supervisor could not run.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A listener could not be bound.
    #[error("listener {name}: cannot bind {addr}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Its address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another OS-level failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("{0}")]
    Lifecycle(#[from] crate::lifecycle::LifecycleError),
}

/// One worker position (index) and its history.
#[derive(Debug)]
struct Slot {
    index: usize,
    worker: Option<Worker>,
    /// The binary and generation a (re)start of this slot uses.
    binary: PathBuf,
    generation: u64,
    restarts: u64,
    oom_kills: u64,
    missed_heartbeat_kills: u64,
    backoff: Duration,
    restart_at: Option<Instant>,
    crash_streak: u32,
    last_exit: Option<String>,
}

/// The supervisor's state.
struct Supervisor {
    cfg: Config,
    opts: RunOptions,
    /// Listener sets: one for `shared`, one per worker for `reuseport`.
    sets: Vec<Vec<ListenerFd>>,
    /// During an upgrade whose config changes the listeners: the sets the new workers get
    /// (in force once every worker is replaced).
    next_sets: Option<Vec<Vec<ListenerFd>>>,
    slots: Vec<Slot>,
    /// Old workers draining after handing over to their replacement.
    retiring: Vec<Worker>,
    /// The new worker of an upgrade step, until it is live.
    incoming: Option<Worker>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    cgroups: Option<limits::Cgroups>,
    /// Counters of workers that died, so the service's totals never go back.
    retired: Counters,
    stopping: bool,
    started: Instant,
    history: Vec<serde_json::Value>,
    /// Where control-socket requests go (to the loop's [`Triggers`]).
    control_tx: mpsc::Sender<crate::admin::control::ControlRequest>,
    /// The control socket, kept across the re-exec.
    control: Option<serve::ControlServer>,
    /// Whether the one warning about isolation the host refused was logged.
    isolation_warned: bool,
    /// Signals and control requests. Read by the main loop, and while the supervisor is busy
    /// (starting, upgrading, stopping) by [`Supervisor::pump_until`], so `baton status`
    /// always gets an answer.
    triggers: Triggers,
    /// A stop asked while the supervisor was busy: handled as soon as it is not.
    deferred: Option<crate::lifecycle::Trigger>,
    /// Since when an upgrade runs, if one does.
    upgrading: Option<Instant>,
    /// Upgrades of the whole service (not of each worker), for status and metrics.
    upgrades: UpgradeCounts,
    /// What the admin endpoint reads, when `admin.listen` is set.
    published: Option<std::sync::Arc<std::sync::Mutex<admin::Published>>>,
    /// The admin endpoint's listening socket, kept across the re-exec.
    admin_fd: Option<std::os::fd::OwnedFd>,
    /// `accept: shared`: the board the workers take turns by ([`crate::spread`]).
    board: Option<crate::spread::Board>,
    /// The session-ticket keys every worker gets ([`tickets`]).
    tickets: tickets::Keys,
}

/// Upgrades of the whole service: one per `baton upgrade`/`reload`, whatever the number of
/// workers it replaced.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(crate) struct UpgradeCounts {
    /// Every worker replaced.
    pub ok: u64,
    /// Stopped before every worker was replaced.
    pub failed: u64,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Io { what, source }
}

/// Runs the supervisor until it is stopped.
pub async fn run(cfg: Config, opts: RunOptions) -> Result<(), SupervisorError> {
    crate::lifecycle::raise_nofile();
    let (control_tx, control_rx) = mpsc::channel(16);
    let triggers = Triggers::new(control_rx)?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), workers = cfg.runtime.workers,
        accept = ?cfg.runtime.accept, config = %opts.config_path.display(), "supervisor starting");
    let sets = listeners::bind_all(&cfg)?;
    let (cfg_accept, workers) = (cfg.runtime.accept, cfg.runtime.workers);
    let cgroups = limits::Cgroups::setup(&cfg.runtime.worker_limits);
    let (events_tx, events) = mpsc::unbounded_channel();
    let binary = cfg
        .runtime
        .binary
        .clone()
        .unwrap_or_else(|| opts.binary.clone());
    let slots = (0..cfg.runtime.workers)
        .map(|index| Slot {
            index,
            worker: None,
            binary: binary.clone(),
            generation: opts.generation,
            restarts: 0,
            oom_kills: 0,
            missed_heartbeat_kills: 0,
            backoff: BACKOFF_MIN,
            restart_at: None,
            crash_streak: 0,
            last_exit: None,
        })
        .collect();
    let mut s = Supervisor {
        cfg,
        opts,
        sets,
        next_sets: None,
        slots,
        retiring: Vec::new(),
        incoming: None,
        events_tx,
        events,
        cgroups,
        retired: Counters::default(),
        stopping: false,
        started: Instant::now(),
        history: Vec::new(),
        control_tx,
        control: None,
        isolation_warned: false,
        triggers,
        deferred: None,
        upgrading: None,
        upgrades: UpgradeCounts::default(),
        published: None,
        admin_fd: None,
        board: accept_board(&cfg_accept, workers),
        tickets: tickets::Keys::default(),
    };
    for i in 0..s.slots.len() {
        if let Err(e) = s.start_worker(i).await {
            tracing::error!(index = i, error = %e, "cannot start worker");
            s.schedule_restart(i);
        }
    }
    let path = s.cfg.runtime.control_socket.clone();
    let ctl = control::bind(&path).map_err(io_err(format!("control socket {}", path.display())))?;
    s.start_control(std::os::fd::OwnedFd::from(
        ctl.into_std()
            .map_err(io_err(format!("control socket {}", path.display())))?,
    ))
    .map_err(|e| SupervisorError::Io {
        what: format!("control socket {}", path.display()),
        source: std::io::Error::other(e),
    })?;
    s.start_admin(None)?;
    write_pid_file(&s.cfg.runtime.pid_file).map_err(io_err(format!(
        "pid file {}",
        s.cfg.runtime.pid_file.display()
    )))?;
    // Ready once every worker accepts (or after the upgrade timeout, with what there is).
    let limit = s.cfg.runtime.upgrade_timeout;
    s.pump_until(limit, |s| {
        s.slots
            .iter()
            .all(|w| w.worker.as_ref().is_some_and(|w| w.live_since.is_some()))
    })
    .await;
    tracing::info!(
        from = "Starting",
        to = "Ready",
        workers = s.slots.len(),
        "phase"
    );
    serve::serve(s).await
}

/// The accept board of `accept: shared` (none for `reuseport`: each worker has its own queue).
/// Without one (memfd refused), workers accept without taking turns.
fn accept_board(
    accept: &crate::config::AcceptMode,
    workers: usize,
) -> Option<crate::spread::Board> {
    if *accept != crate::config::AcceptMode::Shared {
        return None;
    }
    crate::spread::Board::create(workers)
        .map_err(|e| tracing::warn!(error = %e, "cannot create the accept board; workers accept without taking turns"))
        .ok()
}

fn write_pid_file(path: &std::path::Path) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, path)
}

fn remove_pid_file(path: &std::path::Path) {
    let ours = std::fs::read_to_string(path)
        .map(|s| s.trim() == std::process::id().to_string())
        .unwrap_or(false);
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

impl Supervisor {
    /// Duplicates the listener set of worker `index`, to hand to it. During an upgrade that
    /// changes the listeners, a worker (re)started meanwhile reads the new config, so it gets
    /// the new set.
    fn listeners_for(&self, index: usize) -> Result<Vec<worker::Offered>, String> {
        worker::offered(self.next_sets.as_ref().unwrap_or(&self.sets), index)
    }

    /// Spawns a worker process for slot `index` (binary and generation of the slot).
    fn spawn_for(
        &mut self,
        index: usize,
        binary: &std::path::Path,
        generation: u64,
    ) -> Result<Worker, String> {
        let plan = crate::isolation::worker_plan(&self.cfg, index);
        let mut w = worker::spawn(
            binary,
            &self.opts.config_path,
            (index, generation),
            self.board.as_ref().map(|b| b.raw_fd()),
            &plan,
            &self.events_tx,
        )?;
        if !w.placement.refused.is_empty() && !self.isolation_warned {
            self.isolation_warned = true;
            tracing::warn!(refused = ?w.placement.refused,
                "the host refused part of the workers' isolation; they run with what is possible (baton status shows what is in force)");
        }
        if let Some(cg) = &self.cgroups {
            match cg.place(index, w.pid) {
                Ok(c) => w.cgroup = Some(c),
                Err(e) => {
                    tracing::warn!(index, worker_pid = w.pid, error = %e, "cannot apply cgroup limits to worker")
                }
            }
        }
        tracing::info!(index, worker_pid = w.pid, generation, "worker spawned");
        Ok(w)
    }

    /// Starts worker `index` fresh: the supervisor plays its predecessor.
    async fn start_worker(&mut self, index: usize) -> Result<(), String> {
        let (binary, generation) = {
            let s = &self.slots[index];
            (s.binary.clone(), s.generation)
        };
        let listeners = self.listeners_for(index)?;
        let mut w = self.spawn_for(index, &binary, generation)?;
        let (ours, theirs) = worker::pair()?;
        let sent = w.send_hand_over_to(&theirs).await;
        drop(theirs);
        self.slots[index].worker = Some(w);
        sent?;
        let ch = crate::handover::Channel::from_std(std::os::unix::net::UnixStream::from(ours))
            .map_err(|e| format!("handover channel: {e}"))?;
        let limit = self.cfg.runtime.upgrade_timeout;
        let events = self.events_tx.clone();
        let pid = self.slots[index].worker.as_ref().map_or(0, |w| w.pid);
        let keys = self.tickets.ticketer.export();
        if let Some(w) = self.slots[index].worker.as_mut() {
            w.tickets_epoch = self.tickets.epoch;
        }
        tokio::spawn(async move {
            if let Err(e) = worker::introduce(ch, listeners, keys, limit).await {
                let _ = events.send(Event::Failed(pid, e));
            }
        });
        Ok(())
    }

    fn find(&mut self, pid: u32) -> Option<&mut Worker> {
        self.slots
            .iter_mut()
            .filter_map(|s| s.worker.as_mut())
            .chain(self.retiring.iter_mut())
            .chain(self.incoming.iter_mut())
            .find(|w| w.pid == pid)
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Heartbeat(pid, counters) => {
                if let Some(w) = self.find(pid) {
                    w.last_heartbeat = Instant::now();
                    w.heartbeats += 1;
                    w.counters = counters;
                }
            }
            Event::Live(pid) => {
                if let Some(w) = self.find(pid) {
                    w.live_since = Some(Instant::now());
                    w.last_heartbeat = Instant::now();
                    tracing::info!(
                        index = w.index,
                        worker_pid = pid,
                        generation = w.generation,
                        "worker started"
                    );
                }
            }
            Event::Failed(pid, reason) => {
                tracing::error!(worker_pid = pid, %reason, "worker failed to start; killing it");
                if let Some(w) = self.find(pid) {
                    w.signal(rustix::process::Signal::KILL);
                }
            }
            Event::Exited(pid, status) => self.on_exit(pid, status),
        }
        self.publish();
    }

    fn index_of(&self, pid: u32) -> Option<usize> {
        self.slots
            .iter()
            .find(|s| s.worker.as_ref().is_some_and(|w| w.pid == pid))
            .map(|s| s.index)
    }

    fn on_exit(&mut self, pid: u32, status: std::process::ExitStatus) {
        if let Some(pos) = self.retiring.iter().position(|w| w.pid == pid) {
            let w = self.retiring.remove(pos);
            // Its last heartbeat came before its exit: these are its final counters. Its
            // replacement did not take them (a worker does not carry counters), so they stay
            // in the totals from here.
            self.retired.add(&w.counters);
            if let Some(c) = &w.cgroup {
                c.remove();
            }
            tracing::info!(worker_pid = pid, %status, "replaced worker exited");
            return;
        }
        if let Some(w) = self.incoming.as_mut().filter(|w| w.pid == pid) {
            // The upgrade step watching it sees it gone, and fails at once.
            w.exited = Some(status.to_string());
            self.retired.add(&w.counters);
            w.counters = Counters::default();
            if let Some(c) = &w.cgroup {
                c.remove();
            }
            tracing::warn!(worker_pid = pid, %status, "new worker exited during the upgrade");
            return;
        }
        let Some(index) = self.index_of(pid) else {
            return;
        };
        if let Some(b) = &self.board {
            b.gone(index);
        }
        let slot = &mut self.slots[index];
        let Some(w) = slot.worker.take() else { return };
        self.retired.add(&w.counters);
        let oom = w.cgroup.as_ref().map_or(0, |c| c.oom_kills());
        if let Some(c) = &w.cgroup {
            c.remove();
        }
        if oom > 0 {
            slot.oom_kills += 1;
            tracing::error!(
                index,
                worker_pid = pid,
                "worker killed by the kernel for exceeding its memory limit"
            );
        }
        slot.last_exit = Some(format!(
            "{status}{}",
            if oom > 0 { " (memory limit)" } else { "" }
        ));
        if self.stopping {
            tracing::info!(index, worker_pid = pid, %status, "worker stopped");
            return;
        }
        if w.live_since.is_some_and(|t| t.elapsed() >= HEALTHY_AFTER) {
            slot.backoff = BACKOFF_MIN;
            slot.crash_streak = 0;
        }
        slot.restarts += 1;
        slot.crash_streak += 1;
        let delay = slot.backoff;
        slot.backoff = (slot.backoff * 2).min(BACKOFF_MAX);
        slot.restart_at = Some(Instant::now() + delay);
        tracing::warn!(index, worker_pid = pid, %status, restart_in_ms = delay.as_millis() as u64,
            restarts = slot.restarts, "worker exited; restarting");
        if slot.crash_streak >= CRASH_LOOP {
            tracing::error!(
                index,
                crashes = slot.crash_streak,
                restart_in_ms = delay.as_millis() as u64,
                "WORKER CRASH LOOP: worker keeps exiting; check its log lines above"
            );
        }
    }

    fn schedule_restart(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        slot.restart_at = Some(Instant::now() + slot.backoff);
        slot.backoff = (slot.backoff * 2).min(BACKOFF_MAX);
    }

    /// Kills workers that missed their heartbeats, restarts those whose back-off is over.
    async fn tick(&mut self) {
        let limit = crate::lifecycle::worker::HEARTBEAT_INTERVAL * MISSED_HEARTBEATS
            + Duration::from_millis(500);
        for slot in &mut self.slots {
            let Some(w) = &slot.worker else { continue };
            if w.last_heartbeat.elapsed() > limit {
                tracing::error!(
                    index = slot.index,
                    worker_pid = w.pid,
                    missed = MISSED_HEARTBEATS,
                    "worker missed its heartbeats; killing it"
                );
                slot.missed_heartbeat_kills += 1;
                w.signal(rustix::process::Signal::KILL);
                // Not again before it is seen gone.
                if let Some(w) = slot.worker.as_mut() {
                    w.last_heartbeat = Instant::now() + Duration::from_secs(3600);
                }
            }
        }
        if self.stopping {
            return;
        }
        for i in 0..self.slots.len() {
            let due = self.slots[i].worker.is_none()
                && self.slots[i]
                    .restart_at
                    .is_some_and(|t| Instant::now() >= t);
            if due {
                self.slots[i].restart_at = None;
                if let Err(e) = self.start_worker(i).await {
                    tracing::error!(index = i, error = %e, "cannot restart worker");
                    self.schedule_restart(i);
                }
            }
        }
        self.share_ticket_keys().await;
    }

    /// Waits (handling events and ticks) until `done` holds or `limit` passes.
    async fn pump_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&Supervisor) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        while !done(self) {
            tokio::select! {
                Some(ev) = self.events.recv() => self.on_event(ev),
                _ = tick.tick() => self.tick().await,
                t = self.triggers.next() => self.while_busy(t),
                _ = tokio::time::sleep_until(deadline) => return done(self),
            }
        }
        true
    }

    /// Runs `f` (which must not need the supervisor) while handling worker events and
    /// answering triggers as [`Self::while_busy`] does.
    async fn busy<F: std::future::Future>(&mut self, f: F) -> F::Output {
        tokio::pin!(f);
        loop {
            tokio::select! {
                out = &mut f => return out,
                Some(ev) = self.events.recv() => self.on_event(ev),
                t = self.triggers.next() => self.while_busy(t),
            }
        }
    }

    /// A trigger that arrives while the supervisor is starting, upgrading or stopping:
    /// status is answered at once, another upgrade is refused, a stop waits until the
    /// current step is over (an upgrade stops before its next worker).
    fn while_busy(&mut self, t: crate::lifecycle::Trigger) {
        use crate::admin::control::Reply;
        use crate::lifecycle::Trigger;
        match t {
            Trigger::Status(r) => {
                let _ = r.send(Reply::ok("status", self.status()));
            }
            Trigger::Upgrade { why, reply, .. } => {
                let msg = if self.stopping {
                    "upgrade refused: the supervisor is stopping"
                } else if self.upgrading.is_some() {
                    "upgrade refused: an upgrade is already in progress"
                } else {
                    "upgrade refused: the supervisor is not ready yet"
                };
                tracing::warn!(trigger = why, "{msg}");
                if let Some(r) = reply {
                    let _ = r.send(Reply::err(msg));
                }
            }
            Trigger::Stop { why, reply, .. } if self.stopping => {
                tracing::info!(trigger = why, "already stopping");
                if let Some(r) = reply {
                    let _ = r.send(Reply::err("the supervisor is already stopping"));
                }
            }
            stop @ Trigger::Stop { .. } => {
                tracing::info!("stop requested while busy: it follows the current step");
                if self.deferred.is_none() {
                    self.deferred = Some(stop);
                }
            }
        }
    }

    fn all_workers(&self) -> impl Iterator<Item = &Worker> {
        self.slots
            .iter()
            .filter_map(|s| s.worker.as_ref())
            .chain(self.retiring.iter())
            .chain(self.incoming.iter())
    }

    /// Forwards SIGTERM to every worker and waits for them (SIGKILL after the drain timeout).
    async fn stop(&mut self) -> usize {
        self.stopping = true;
        let n = self.all_workers().count();
        for w in self.all_workers() {
            w.signal(rustix::process::Signal::TERM);
        }
        let limit = self.cfg.runtime.drain_timeout + Duration::from_secs(5);
        if !self
            .pump_until(limit, |s| s.all_workers().next().is_none())
            .await
        {
            for w in self.all_workers() {
                tracing::warn!(
                    worker_pid = w.pid,
                    "worker did not stop in time; killing it"
                );
                w.signal(rustix::process::Signal::KILL);
            }
            self.pump_until(Duration::from_secs(5), |s| s.all_workers().next().is_none())
                .await;
        }
        n
    }
}
