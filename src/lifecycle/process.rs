//! The running process: its listeners, connections and counters, and the main loop that
//! waits for triggers.

use super::history::History;
use super::listeners::Listeners;
use super::successor::TakeOverEvent;
use super::triggers::{Trigger, Triggers};
use super::{io_err, remove_pid_file, write_pid_file, LifecycleError, Phase, RunOptions};
use crate::admin::control::{self, Reply};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{self, ListenerCtx};
use crate::registry::{ConnKind, Parked, ParkedRx, Registry};
use crate::upstream::{self, Upstreams};
use serde_json::json;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// The running process's state.
pub(super) struct Process {
    pub cfg: Config,
    pub opts: RunOptions,
    pub registry: Arc<Registry>,
    pub parked_rx: ParkedRx,
    pub metrics: Arc<Metrics>,
    pub upstreams: Upstreams,
    pub listeners: Listeners,
    /// Session-ticket keys of every TLS listener; handed to the successor.
    pub tickets: Arc<crate::tls::tickets::Ticketer>,
    /// Cancelled at exit: stops health checks and the control socket.
    pub shutdown: CancellationToken,
    pub phase: Phase,
    pub started: Instant,
    pub started_ms: u64,
    pub history: History,
    /// Device and inode of the control socket this process bound, so it removes the path at
    /// exit only if no successor has bound its own there since.
    pub control_inode: Option<(u64, u64)>,
    /// Control-socket handlers, waited for at exit so their replies get written.
    pub control_tasks: tokio_util::task::TaskTracker,
    /// Where control-socket requests go (the main loop's [`Triggers`]); kept to serve the
    /// socket again after taking over from a successor that died.
    pub control_tx: tokio::sync::mpsc::Sender<control::ControlRequest>,
    /// Stops the control-socket server this process runs, if any.
    pub control_stop: Option<CancellationToken>,
    /// Whether the admin HTTP server was started (once per process).
    pub admin_started: bool,
}

impl Process {
    pub fn set_phase(&mut self, p: Phase) {
        tracing::info!(from = ?self.phase, to = ?p, "phase");
        self.phase = p;
        // systemd: READY=1 when serving (again), RELOADING=1 when an upgrade starts.
        match p {
            Phase::Ready => crate::admin::notify::ready(),
            Phase::HandingOver => crate::admin::notify::reloading(),
            _ => {}
        }
    }

    /// Starts accepting on a listener.
    pub fn start_listener(
        &mut self,
        name: &str,
        l: std::net::TcpListener,
    ) -> Result<(), LifecycleError> {
        self.add_listener(name, l, true)
    }

    /// Registers a listener without accepting yet ([`Self::resume_listeners`] starts it).
    pub fn start_listener_paused(
        &mut self,
        name: &str,
        l: std::net::TcpListener,
    ) -> Result<(), LifecycleError> {
        self.add_listener(name, l, false)
    }

    fn add_listener(
        &mut self,
        name: &str,
        l: std::net::TcpListener,
        accept: bool,
    ) -> Result<(), LifecycleError> {
        let Some(lcfg) = self.cfg.listeners.get(name) else {
            return Ok(());
        };
        let ctx = ListenerCtx::with_tickets(
            lcfg.clone(),
            self.upstreams.clone(),
            self.registry.clone(),
            self.metrics.clone(),
            self.tickets.clone(),
        );
        self.listeners.add(name, ctx, l, accept)
    }

    /// Serves a parked connection in this process again.
    pub async fn resume_parked(&self, parked: Parked) {
        match self.listeners.ctx(&parked.meta().listener) {
            Some(ctx) => proxy::resume(ctx.clone(), parked).await,
            None => {
                tracing::warn!(listener = %parked.meta().listener, client = %parked.meta().client,
                "parked connection for an unknown listener; closing it")
            }
        }
    }

    /// Takes the control socket and writes the pid file: this process is now the one serving.
    pub fn go_live(&mut self) -> Result<(), LifecycleError> {
        // A worker's supervisor owns the control socket and the pid file.
        if self.opts.worker.is_some() {
            return Ok(());
        }
        if !self.admin_started {
            self.admin_started = true;
            // Admin HTTP: a successor waits for the predecessor to release the address.
            if let Some(admin) = &self.cfg.admin {
                let ctx = crate::admin::http::AdminCtx::new(
                    &self.cfg,
                    self.metrics.clone(),
                    self.control_tx.clone(),
                    self.upstreams.clone(),
                );
                crate::admin::http::start(
                    admin.listen,
                    Arc::new(ctx),
                    self.opts.generation > 1,
                    self.shutdown.child_token(),
                )
                .map_err(|source| LifecycleError::Bind {
                    name: "admin".into(),
                    addr: admin.listen,
                    source,
                })?;
            }
        }
        self.serve_control()?;
        write_pid_file(&self.cfg.runtime.pid_file).map_err(io_err(format!(
            "pid file {}",
            self.cfg.runtime.pid_file.display()
        )))
    }

    /// Binds the control socket (replacing whatever is at its path) and serves it, ending
    /// the server this process ran before, if any.
    fn serve_control(&mut self) -> Result<(), LifecycleError> {
        if let Some(stop) = self.control_stop.take() {
            stop.cancel();
        }
        let path = self.cfg.runtime.control_socket.clone();
        let ctl =
            control::bind(&path).map_err(io_err(format!("control socket {}", path.display())))?;
        self.control_inode = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        let stop = self.shutdown.child_token();
        tokio::spawn(control::serve(
            ctl,
            self.control_tx.clone(),
            stop.clone(),
            self.control_tasks.clone(),
        ));
        self.control_stop = Some(stop);
        Ok(())
    }

    /// After the successor died past the commit: the control socket and the pid file are
    /// this process's again.
    pub fn take_back_control(&mut self) -> Result<(), LifecycleError> {
        self.go_live()
    }

    /// Status for `baton status` and the admin API.
    pub fn status(&self) -> serde_json::Value {
        let conns = self.registry.snapshot();
        let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &conns {
            let k = match c.kind() {
                ConnKind::Tcp => "tcp",
                ConnKind::Http => "http",
                ConnKind::Http2 => "http2",
                ConnKind::Tunnel => "tunnel",
            };
            *by_kind.entry(k).or_default() += 1;
        }
        let listeners: BTreeMap<&String, serde_json::Value> = self
            .cfg
            .listeners
            .iter()
            .map(|(n, l)| {
                let addr = self.listeners.local_addr(n).unwrap_or(l.listen);
                (n, crate::admin::status::listener_json(l, addr))
            })
            .collect();
        let upstreams: BTreeMap<&String, serde_json::Value> = self
            .upstreams
            .iter()
            .map(|(n, u)| (n, json!(u.status())))
            .collect();
        json!({
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "generation": self.opts.generation,
            "phase": self.phase,
            "uptime_s": self.started.elapsed().as_secs(),
            "started_ms": self.started_ms,
            "listeners": listeners,
            "upstreams": upstreams,
            "connections": { "total": conns.len(), "by_kind": by_kind },
            "counters": self.metrics.snapshot(),
            "upgrades": self.history,
            "isolation": crate::isolation::report::in_force(None).ok(),
        })
    }

    /// Finishes open connections (up to the drain timeout, or none with `fast`), then closes the
    /// rest. Returns how many finished on their own and how many were closed at the deadline;
    /// each connection is in exactly one of the two.
    pub async fn drain_and_stop(&mut self, fast: bool) -> (usize, usize) {
        self.set_phase(Phase::Draining);
        self.listeners.close().await;
        // Counted before the drain signal: an idle connection closes at once on it.
        let live = self.registry.len();
        self.registry.drain_all();
        let drain = if fast {
            std::time::Duration::ZERO
        } else {
            self.cfg.runtime.drain_timeout
        };
        let mut closed = 0;
        if tokio::time::timeout(drain, self.registry.wait_empty())
            .await
            .is_err()
        {
            closed = self.registry.len();
            tracing::warn!(connections = closed, timeout = ?drain, "drain deadline reached; closing the rest");
            self.registry.kill_all();
            // Tasks exit at their next poll; give them a moment to log their close.
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                self.registry.wait_empty(),
            )
            .await;
        } else {
            tracing::info!(connections = live, "drained");
        }
        (live.saturating_sub(closed), closed)
    }
}

/// Runs baton until it is stopped or replaced; returns once every connection is finished,
/// closed or handed over. A successor that cannot take over returns an error (exit non-zero).
pub async fn run(cfg: Config, opts: RunOptions) -> Result<(), LifecycleError> {
    run_prebound(cfg, opts, BTreeMap::new()).await
}

/// [`run`] with listeners already bound by name (before a privilege drop,
/// [`crate::isolation::prepare`]); a first generation serves those instead of binding.
pub async fn run_prebound(
    cfg: Config,
    opts: RunOptions,
    prebound: BTreeMap<String, std::net::TcpListener>,
) -> Result<(), LifecycleError> {
    super::raise_nofile();
    let (control_tx, control_rx) = tokio::sync::mpsc::channel(16);
    let mut triggers = Triggers::new(control_rx)?;
    crate::logging::reopen_on_sigusr1().map_err(io_err("SIGUSR1 handler"))?;
    let inherited = crate::handover::inherited_channel();
    let mut p = Process::new(cfg, opts, control_tx);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), generation = p.opts.generation,
        config = %p.opts.config_path.display(), "starting");
    for u in p.upstreams.values() {
        u.set_metrics(p.metrics.upstream(u.name()));
        u.spawn_health_checks(p.shutdown.child_token());
    }
    upstream::resolve::start(&p.upstreams, p.shutdown.child_token()).await;
    // Multi-process mode: the inherited channel is the supervisor's; take over through the one
    // it sends.
    let setup = super::worker::setup(&p, inherited).await?;
    let mut worker_link = setup.link;
    let mut takeover = match setup.channel {
        Some(ch) => {
            let t = super::successor::take_over(&mut p, ch, setup.from_supervisor).await?;
            p.set_phase(Phase::TakingOver);
            Some(t.finish(&mut p))
        }
        None => {
            p.bind_listeners(prebound)?;
            p.go_live()?;
            p.set_phase(Phase::Ready);
            None
        }
    };
    let result = p
        .serve(&mut triggers, &mut takeover, &mut worker_link)
        .await;
    p.exit().await;
    result
}

impl Process {
    fn new(
        cfg: Config,
        opts: RunOptions,
        control_tx: tokio::sync::mpsc::Sender<control::ControlRequest>,
    ) -> Process {
        let (registry, parked_rx) = Registry::new();
        let shutdown = CancellationToken::new();
        let turn = super::worker::accept_turn(&cfg, &opts, &registry, &shutdown);
        Process {
            registry,
            parked_rx,
            metrics: Arc::new(Metrics::new(&cfg, opts.generation)),
            upstreams: upstream::build(&cfg),
            listeners: Listeners::taking_turns(turn),
            tickets: Arc::default(),
            shutdown,
            phase: Phase::Starting,
            started: Instant::now(),
            started_ms: crate::registry::now_ms(),
            history: History::default(),
            control_tasks: tokio_util::task::TaskTracker::new(),
            control_inode: None,
            control_tx,
            control_stop: None,
            admin_started: false,
            opts,
            cfg,
        }
    }

    /// A first generation's listeners: bound before a privilege drop (`prebound`),
    /// adopted from systemd socket activation under their name, or bound.
    fn bind_listeners(
        &mut self,
        mut prebound: BTreeMap<String, std::net::TcpListener>,
    ) -> Result<(), LifecycleError> {
        let mut activated = crate::admin::notify::systemd_listeners();
        for l in self.cfg.listeners.clone().values() {
            let s = match (prebound.remove(&l.name), activated.remove(&l.name)) {
                (Some(s), _) => Ok(s),
                (None, Some(fd)) => crate::listener::adopt(fd),
                (None, None) => crate::listener::bind(l),
            }
            .map_err(|source| LifecycleError::Bind {
                name: l.name.clone(),
                addr: l.listen,
                source,
            })?;
            self.start_listener(&l.name.clone(), s)?;
        }
        Ok(())
    }

    /// The main loop: triggers, connections parked for an abandoned upgrade, the take-over
    /// from a predecessor, and (a worker) the supervisor's requests. Returns when this process
    /// is done: stopped, or replaced.
    async fn serve(
        &mut self,
        triggers: &mut Triggers,
        takeover: &mut Option<tokio::sync::mpsc::Receiver<TakeOverEvent>>,
        worker_link: &mut Option<super::worker::WorkerLink>,
    ) -> Result<(), LifecycleError> {
        // An upgrade asked for while this successor still takes over waits until it is done.
        let mut deferred: Option<Trigger> = None;
        loop {
            let trigger = tokio::select! {
                t = async { deferred.take().expect("checked by the guard") }, if deferred.is_some() && self.phase == Phase::Ready => t,
                t = triggers.next() => t,
                Some(parked) = self.parked_rx.recv() => {
                    // A connection parked for an upgrade that was abandoned: serve it here again.
                    self.resume_parked(parked).await;
                    continue;
                }
                ev = async { match takeover.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {
                    match ev {
                        Some(TakeOverEvent::Committed(live)) => {
                            self.listeners.resume();
                            super::worker::live(worker_link);
                            if let Err(e) = self.go_live() {
                                tracing::error!(error = %e, "cannot take the control socket or pid file");
                            }
                            crate::admin::notify::took_over(); // systemd: MAINPID=, READY=1
                            let _ = live.send(());
                        }
                        Some(TakeOverEvent::Done(done)) => {
                            *takeover = None;
                            super::successor::taken_over(self, done);
                        }
                        Some(TakeOverEvent::Failed(why)) => {
                            tracing::error!(reason = %why, "take-over failed; exiting");
                            self.listeners.close().await;
                            return Err(LifecycleError::TakeOver(why));
                        }
                        None => *takeover = None,
                    }
                    continue;
                }
                ev = super::worker::next(worker_link) => {
                    match ev {
                        super::worker::WorkerEvent::HandOverTo(ch) => {
                            if super::worker::hand_over(self, triggers, ch).await {
                                return Ok(());
                            }
                        }
                        super::worker::WorkerEvent::SupervisorGone => {
                            tracing::warn!("supervisor gone; stopping gracefully");
                            self.drain_and_stop(false).await;
                            return Ok(());
                        }
                    }
                    continue;
                }
            };
            match trigger {
                Trigger::Status(reply) => {
                    let _ = reply.send(Reply::ok("status", self.status()));
                }
                Trigger::Stop { why, fast, reply } => {
                    tracing::info!(trigger = why, fast, "stopping gracefully");
                    crate::admin::notify::stopping(); // systemd
                    let (finished, closed) = self.drain_and_stop(fast).await;
                    if let Some(r) = reply {
                        let _ = r.send(Reply::ok(
                            format!("stopped pid {}: {finished} connections finished, {closed} closed at the deadline", std::process::id()),
                            json!({ "finished": finished, "closed": closed }),
                        ));
                    }
                    return Ok(());
                }
                Trigger::Upgrade {
                    why,
                    reload,
                    binary,
                    wait,
                    reply,
                } => {
                    if self.phase == Phase::TakingOver
                        && deferred.is_none()
                        && self.opts.worker.is_none()
                    {
                        tracing::info!(
                            trigger = why,
                            "upgrade queued until the predecessor is gone"
                        );
                        deferred = Some(Trigger::Upgrade {
                            why,
                            reload,
                            binary,
                            wait,
                            reply,
                        });
                        continue;
                    }
                    if let Err(msg) = self.may_upgrade() {
                        tracing::warn!(trigger = why, "{msg}");
                        if let Some(r) = reply {
                            let _ = r.send(Reply::err(msg));
                        }
                        continue;
                    }
                    tracing::info!(trigger = why, reload, "upgrade requested");
                    let asker = super::upgrade::Asker::new(reply, wait);
                    match super::upgrade::upgrade(self, triggers, reload, binary, asker).await {
                        super::upgrade::Ended::Replaced(_) => return Ok(()),
                        super::upgrade::Ended::Failed(msg) => {
                            tracing::error!(trigger = why, "{msg}")
                        }
                    }
                }
            }
        }
    }

    /// Whether an upgrade may start now; the refusal says why.
    fn may_upgrade(&self) -> Result<(), String> {
        if self.opts.worker.is_some() {
            return Err("upgrade refused: this is a worker; upgrade its supervisor".into());
        }
        if self.phase != Phase::Ready {
            return Err(format!(
                "upgrade refused: process is {:?}, not ready",
                self.phase
            ));
        }
        Ok(())
    }

    /// The end of the process: stops health checks and the control socket (letting pending
    /// replies be written), removes the pid file and the control socket if still ours.
    async fn exit(&mut self) {
        self.shutdown.cancel();
        self.control_tasks.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.control_tasks.wait())
            .await;
        self.set_phase(Phase::Stopped);
        remove_pid_file(&self.cfg.runtime.pid_file);
        let ctl = &self.cfg.runtime.control_socket;
        if self.control_inode.is_some()
            && std::fs::metadata(ctl).ok().map(|m| (m.dev(), m.ino())) == self.control_inode
        {
            let _ = std::fs::remove_file(ctl);
        }
    }
}
