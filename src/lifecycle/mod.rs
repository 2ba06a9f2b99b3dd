//! The life of one process: get listeners, serve, stop gracefully (and, with the upgrade,
//! hand over to a successor). The phases are an explicit enum, logged at each transition.

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{self, ListenerCtx};
use crate::registry::{ParkedRx, Registry};
use crate::upstream::{self, Upstreams};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Where the process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Loading config and getting listeners.
    Starting,
    /// Serving.
    Ready,
    /// Passing listeners and connections to a successor.
    HandingOver,
    /// Finishing what could not be handed over.
    Draining,
    /// About to exit.
    Stopped,
}

/// Why the process could not run.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// A listener could not be bound.
    #[error("listener {name}: cannot bind {addr}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Its address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// Another OS-level failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LifecycleError {
    let what = what.into();
    move |source| LifecycleError::Io { what, source }
}

/// How this process was started.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The config file, re-read on reload.
    pub config_path: PathBuf,
    /// 1 for a first start, +1 per upgrade.
    pub generation: u64,
}

/// A listener being served: its context and the accept task, which gives the socket back.
struct Slot {
    ctx: Arc<ListenerCtx>,
    stop: CancellationToken,
    task: JoinHandle<TcpListener>,
}

/// The running process's state.
struct Process {
    cfg: Config,
    registry: Arc<Registry>,
    parked_rx: ParkedRx,
    metrics: Arc<Metrics>,
    upstreams: Upstreams,
    slots: BTreeMap<String, Slot>,
    /// Cancelled at exit: stops health checks and other background tasks.
    shutdown: CancellationToken,
    phase: Phase,
}

impl Process {
    fn set_phase(&mut self, p: Phase) {
        tracing::info!(from = ?self.phase, to = ?p, "phase");
        self.phase = p;
    }

    fn start_listener(
        &mut self,
        name: &str,
        l: std::net::TcpListener,
    ) -> Result<(), LifecycleError> {
        let Some(lcfg) = self.cfg.listeners.get(name) else {
            return Ok(());
        };
        let ctx = ListenerCtx::new(
            lcfg.clone(),
            self.upstreams.clone(),
            self.registry.clone(),
            self.metrics.clone(),
        );
        let listener = crate::listener::to_tokio(l).map_err(io_err(format!("listener {name}")))?;
        let addr = listener
            .local_addr()
            .map_err(io_err(format!("listener {name}")))?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(proxy::serve(listener, ctx.clone(), stop.clone()));
        tracing::info!(listener = name, addr = %addr, protocol = %lcfg.protocol, "listening");
        self.slots
            .insert(name.to_string(), Slot { ctx, stop, task });
        Ok(())
    }

    /// Stops accepting on every listener and closes them.
    async fn stop_listeners(&mut self) {
        for (_, slot) in std::mem::take(&mut self.slots) {
            slot.stop.cancel();
            drop(slot.task.await);
        }
    }
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit: a proxy holds two fds per connection.
pub fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
    }
}

fn write_pid_file(path: &Path) -> io::Result<()> {
    let tmp = path.with_extension("pid.tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, path)
}

/// Removes the pid file if it still names this process (a successor may have rewritten it).
fn remove_pid_file(path: &Path) {
    let ours = std::fs::read_to_string(path)
        .map(|s| s.trim() == std::process::id().to_string())
        .unwrap_or(false);
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

/// Runs baton until it is stopped; returns once every connection is finished or closed.
pub async fn run(cfg: Config, opts: RunOptions) -> Result<(), LifecycleError> {
    raise_nofile();
    // Register every handler before serving: a signal arriving early must not kill us.
    let mut sigterm = signal(SignalKind::terminate()).map_err(io_err("signal handler"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(io_err("signal handler"))?;
    let (registry, parked_rx) = Registry::new();
    let upstreams = upstream::build(&cfg);
    let mut p = Process {
        registry,
        parked_rx,
        metrics: Arc::new(Metrics::default()),
        upstreams,
        slots: BTreeMap::new(),
        shutdown: CancellationToken::new(),
        phase: Phase::Starting,
        cfg,
    };
    tracing::info!(version = env!("CARGO_PKG_VERSION"), generation = opts.generation, config = %opts.config_path.display(), "starting");
    for u in p.upstreams.values() {
        u.spawn_health_checks(p.shutdown.child_token());
    }
    let bound: Vec<(String, std::net::TcpListener)> = p
        .cfg
        .listeners
        .values()
        .map(|l| {
            crate::listener::bind(l)
                .map(|s| (l.name.clone(), s))
                .map_err(|source| LifecycleError::Bind {
                    name: l.name.clone(),
                    addr: l.listen,
                    source,
                })
        })
        .collect::<Result<_, _>>()?;
    for (name, l) in bound {
        p.start_listener(&name, l)?;
    }
    write_pid_file(&p.cfg.runtime.pid_file).map_err(io_err(format!(
        "pid file {}",
        p.cfg.runtime.pid_file.display()
    )))?;
    p.set_phase(Phase::Ready);

    let why = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            Some(parked) = p.parked_rx.recv() => {
                // A connection parked after an upgrade was abandoned: serve it here again.
                resume_parked(&p, parked).await;
            }
        }
    };
    tracing::info!(signal = why, "stopping gracefully");
    p.set_phase(Phase::Draining);
    p.stop_listeners().await;
    p.registry.drain_all();
    let drain = p.cfg.runtime.drain_timeout;
    let live = p.registry.len();
    if tokio::time::timeout(drain, p.registry.wait_empty())
        .await
        .is_err()
    {
        let left = p.registry.len();
        tracing::warn!(connections = left, timeout = ?drain, "drain deadline reached; closing the rest");
        p.registry.kill_all();
        // Give the tasks a moment to log their close; they exit at their next poll.
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(1), p.registry.wait_empty()).await;
    } else {
        tracing::info!(connections = live, "drained");
    }
    p.shutdown.cancel();
    p.set_phase(Phase::Stopped);
    remove_pid_file(&p.cfg.runtime.pid_file);
    Ok(())
}

async fn resume_parked(p: &Process, parked: crate::registry::Parked) {
    match p.slots.get(&parked.meta().listener) {
        Some(slot) => proxy::resume(slot.ctx.clone(), parked).await,
        None => {
            tracing::warn!(listener = %parked.meta().listener, "parked connection for an unknown listener; closing it")
        }
    }
}
