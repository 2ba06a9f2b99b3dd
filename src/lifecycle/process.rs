//! The running process: its listeners, connections and counters, with the methods the rest of
//! the lifecycle changes them through; the main loop is in [`run_loop`].

use super::history::History;
use super::listeners::Listeners;
use super::successor::TakeOverEvent;
use super::triggers::Triggers;
use super::{io_err, remove_pid_file, write_pid_file, LifecycleError, Phase, RunOptions};
use crate::admin::control;
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

mod run_loop;

/// The running process's state. Other parts of the lifecycle change it only through its
/// methods, each named for what it does.
pub(super) struct Process {
    cfg: Config,
    opts: RunOptions,
    registry: Arc<Registry>,
    /// Connections that parked (for a handover), in the order they did.
    parked_rx: ParkedRx,
    metrics: Arc<Metrics>,
    upstreams: Upstreams,
    listeners: Listeners,
    /// Session-ticket keys of every TLS listener; handed to the successor.
    tickets: Arc<crate::tls::tickets::Ticketer>,
    /// A worker's link to its supervisor (`None` for a process of its own).
    link: Option<super::worker::WorkerLink>,
    /// Cancelled at exit: stops health checks and the control socket.
    shutdown: CancellationToken,
    phase: Phase,
    started: Instant,
    started_ms: u64,
    history: History,
    /// Device and inode of the control socket this process bound, so it removes the path at
    /// exit only if no successor has bound its own there since.
    control_inode: Option<(u64, u64)>,
    /// Control-socket handlers, waited for at exit so their replies get written.
    control_tasks: tokio_util::task::TaskTracker,
    /// Where control-socket requests go (the main loop's [`Triggers`]); kept to serve the
    /// socket again after taking over from a successor that died.
    control_tx: tokio::sync::mpsc::Sender<control::ControlRequest>,
    /// Stops the control-socket server this process runs, if any.
    control_stop: Option<CancellationToken>,
    /// Whether the admin HTTP server was started (once per process).
    admin_started: bool,
}

/// Read access for the other parts of the lifecycle.
impl Process {
    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    pub fn opts(&self) -> &RunOptions {
        &self.opts
    }

    pub fn role(&self) -> super::Role {
        self.opts.role
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The live connections (parking and closing them goes through the registry's own API).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The session-ticket keys every TLS listener uses.
    pub fn ticketer(&self) -> &Arc<crate::tls::tickets::Ticketer> {
        &self.tickets
    }

    /// The listeners, to offer them or read their contexts (pausing, resuming and closing
    /// them are methods of the process).
    pub fn listeners(&self) -> &Listeners {
        &self.listeners
    }
}

impl Process {
    /// Stops accepting on every listener, keeping the sockets (a handover).
    pub async fn pause_accepting(&mut self) {
        self.listeners.pause().await;
    }

    /// Accepts again on every paused listener (a rollback, a commit, taking over again).
    pub fn resume_accepting(&mut self) {
        self.listeners.resume();
    }

    /// Stops accepting and closes every listener (this process is done with them).
    pub async fn close_listeners(&mut self) {
        self.listeners.close().await;
    }

    /// The next connection that parked, waiting for one.
    pub async fn next_parked(&mut self) -> Option<Parked> {
        self.parked_rx.recv().await
    }

    /// A connection that already parked, if any.
    pub fn try_next_parked(&mut self) -> Option<Parked> {
        self.parked_rx.try_recv().ok()
    }

    /// Adds an upgrade record (kept for status and passed on to the successor).
    pub fn record_upgrade(&mut self, ok: bool, summary: impl Into<String>) {
        self.history.record(ok, summary);
    }

    /// Puts the predecessor's upgrade records before this process's own.
    pub fn carry_history(&mut self, earlier: Vec<super::history::UpgradeRecord>) {
        self.history.carry(earlier);
    }

    /// The upgrade records, for the successor.
    pub fn history_values(&self) -> Vec<serde_json::Value> {
        self.history.to_values()
    }

    /// The session-ticket keys, for the successor (wiped when dropped).
    pub fn ticket_keys(&self) -> zeroize::Zeroizing<Vec<u8>> {
        self.tickets.export()
    }

    /// Takes the predecessor's session-ticket keys in place of this process's own, so the
    /// tickets it issued resume here; keys that are not whole are refused with a warning.
    pub fn take_ticket_keys(&self, keys: &[u8]) {
        if keys.is_empty() {
            return;
        }
        match self.tickets.import(keys) {
            Ok(n) => tracing::debug!(keys = n, "took over the predecessor's session-ticket keys"),
            Err(e) => {
                tracing::warn!(error = %e, "predecessor's session-ticket keys refused; tickets it issued will not resume")
            }
        }
    }
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

    /// Takes the control socket and writes the pid file: this process is now the one serving
    /// (a worker's supervisor has them).
    pub fn go_live(&mut self) -> Result<(), LifecycleError> {
        if !self.role().owns_control() {
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
    p.start_upstreams().await;
    let mut takeover = p.get_listeners(inherited, prebound).await?;
    let result = p.serve(&mut triggers, &mut takeover).await;
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
        let turn = super::worker::accept_turn(&cfg, opts.role, &registry, &shutdown);
        Process {
            registry,
            parked_rx,
            metrics: Arc::new(Metrics::new(&cfg, opts.generation)),
            upstreams: upstream::build(&cfg),
            listeners: Listeners::taking_turns(turn),
            tickets: Arc::new(opts.role.ticketer()),
            link: None,
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

    /// Health checks and name resolution of every upstream.
    async fn start_upstreams(&self) {
        for u in self.upstreams.values() {
            u.set_metrics(self.metrics.upstream(u.name()));
            u.spawn_health_checks(self.shutdown.child_token());
        }
        upstream::resolve::start(&self.upstreams, self.shutdown.child_token()).await;
    }

    /// Gets the listeners: through a take-over (a successor; a worker, from its supervisor,
    /// over the channel it sends), or bound here (then this process serves at once). Returns
    /// the take-over's progress, for the main loop.
    async fn get_listeners(
        &mut self,
        inherited: Option<Result<crate::handover::Channel, crate::handover::HandoverError>>,
        prebound: BTreeMap<String, std::net::TcpListener>,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<TakeOverEvent>>, LifecycleError> {
        let setup = super::worker::setup(self, inherited).await?;
        self.link = setup.link;
        match setup.channel {
            Some(ch) => {
                let t = super::successor::take_over(self, ch, setup.from_supervisor).await?;
                self.set_phase(Phase::TakingOver);
                Ok(Some(t.finish(self)))
            }
            None => {
                self.bind_listeners(prebound)?;
                self.go_live()?;
                self.set_phase(Phase::Ready);
                Ok(None)
            }
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
                (None, Some(fd)) => crate::listener::adopt_for(fd, l),
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

    /// The end of the process: stops health checks and the control socket (letting pending
    /// replies be written), removes the pid file and the control socket if still ours.
    async fn exit(&mut self) {
        super::worker::last_report(&self.link).await;
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
