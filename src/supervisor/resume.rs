//! The supervisor after its re-exec: the state the previous image left (which inherited fd is
//! which listener, worker channel and the control socket; worker pids, generations,
//! counters, restarts, history), and [`resume`], which takes all of it back and carries on
//! supervising the same workers — still this process's children, reaped here by pidfd.

use super::worker::{self, ListenerFd, Listening};
use super::{fds, io_err, limits, Slot, Supervisor, SupervisorError};
use crate::config::{Config, Protocol};
use crate::lifecycle::{RunOptions, Triggers};
use crate::metrics::Counters;
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The version of [`State`]; a new image refuses (and exits) on another.
pub(super) const STATE_FORMAT: u32 = 1;

/// What a supervisor image hands to the next one, as JSON in a memfd.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct State {
    pub format: u32,
    /// The control socket's listening fd.
    pub control_fd: RawFd,
    pub sets: Vec<Vec<ListenerState>>,
    pub slots: Vec<SlotState>,
    pub retiring: Vec<WorkerState>,
    pub retired: Counters,
    pub uptime_ms: u64,
    pub history: Vec<serde_json::Value>,
    /// Upgrades of the service (absent in the state of an older image).
    #[serde(default)]
    pub upgrades: super::UpgradeCounts,
    /// The admin endpoint's listening fd, if it serves one.
    #[serde(default)]
    pub admin_fd: Option<RawFd>,
    /// The accept board's fd (`accept: shared`).
    #[serde(default)]
    pub board_fd: Option<RawFd>,
    /// A memfd with the session-ticket keys (absent from an older image: fresh keys then).
    #[serde(default)]
    pub ticket_keys_fd: Option<RawFd>,
    /// How long the current ticket key has been current.
    #[serde(default)]
    pub ticket_keys_age_ms: u64,
}

/// One listening socket.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ListenerState {
    pub name: String,
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub fd: RawFd,
}

/// One worker position.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SlotState {
    pub index: usize,
    pub binary: PathBuf,
    pub generation: u64,
    pub restarts: u64,
    pub oom_kills: u64,
    pub missed_heartbeat_kills: u64,
    pub backoff_ms: u64,
    pub restart_in_ms: Option<u64>,
    pub crash_streak: u32,
    pub last_exit: Option<String>,
    pub worker: Option<WorkerState>,
}

/// One worker process.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct WorkerState {
    pub index: usize,
    pub pid: u32,
    pub generation: u64,
    /// Its channel (`None` if it had ended).
    pub fd: Option<RawFd>,
    pub uptime_ms: u64,
    pub live_ms: Option<u64>,
    pub counters: Counters,
    pub cgroup: Vec<(String, PathBuf)>,
    /// Its CPUs and namespaces (absent in the state of an older image).
    #[serde(default)]
    pub placement: crate::isolation::namespaces::Placement,
}

fn ago(ms: u64) -> Instant {
    let now = Instant::now();
    now.checked_sub(Duration::from_millis(ms)).unwrap_or(now)
}

fn bad(e: impl std::fmt::Display) -> SupervisorError {
    SupervisorError::Io {
        what: "resuming the supervisor after its re-exec".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Reads the state from the inherited memfd `fd`.
fn read_state(fd: RawFd) -> Result<State, SupervisorError> {
    let mut f = std::fs::File::from(fds::adopt(fd, "supervisor state").map_err(bad)?);
    f.rewind().map_err(io_err("supervisor state"))?;
    let mut text = String::new();
    f.read_to_string(&mut text)
        .map_err(io_err("supervisor state"))?;
    let st: State = serde_json::from_str(&text).map_err(bad)?;
    if st.format != STATE_FORMAT {
        return Err(bad(format!(
            "state format {} (this binary reads {STATE_FORMAT})",
            st.format
        )));
    }
    Ok(st)
}

fn adopt_worker(
    w: WorkerState,
    events: &mpsc::UnboundedSender<worker::Event>,
) -> Result<super::Worker, SupervisorError> {
    let channel = match w.fd {
        Some(fd) => Some(fds::adopt(fd, &format!("worker {} channel", w.index)).map_err(bad)?),
        None => None,
    };
    let mut a = worker::adopt(w.index, w.pid, w.generation, channel, events).map_err(bad)?;
    a.spawned = ago(w.uptime_ms);
    a.live_since = w.live_ms.map(ago);
    a.counters = w.counters;
    a.placement = w.placement;
    if !w.cgroup.is_empty() {
        a.cgroup = Some(limits::WorkerCgroup::from_dirs(w.cgroup));
    }
    Ok(a)
}

/// Runs the supervisor after a re-exec: `state_fd` is the memfd the previous image wrote.
/// Signal handlers come first (the previous image held the signals pending across the exec).
pub async fn resume(cfg: Config, opts: RunOptions, state_fd: RawFd) -> Result<(), SupervisorError> {
    crate::lifecycle::raise_nofile();
    let (control_tx, control_rx) = mpsc::channel(16);
    let triggers = Triggers::new(control_rx)?;
    if let Err(e) = fds::release_signals() {
        tracing::warn!(error = %e, "cannot release the signals held across the re-exec");
    }
    let st = read_state(state_fd)?;
    let mut sets = Vec::new();
    for set in st.sets {
        let mut out = Vec::new();
        for l in set {
            let fd = fds::adopt(l.fd, &format!("listener {}", l.name)).map_err(bad)?;
            out.push(ListenerFd {
                name: l.name,
                addr: l.addr,
                protocol: l.protocol,
                fd,
            });
        }
        sets.push(out);
    }
    let control_fd = fds::adopt(st.control_fd, "control socket").map_err(bad)?;
    let board = match st.board_fd {
        Some(fd) => {
            let fd = fds::adopt(fd, "accept board").map_err(bad)?;
            // Every worker started from now on inherits it, and so does the next image.
            fds::keep_across_exec(std::os::fd::AsFd::as_fd(&fd)).map_err(io_err("accept board"))?;
            Some(crate::spread::Board::adopt(fd, st.slots.len()))
        }
        None => None,
    };
    let admin_fd = match st.admin_fd {
        Some(fd) => Some(fds::adopt(fd, "admin socket").map_err(bad)?),
        None => None,
    };
    for name in cfg.listeners.keys() {
        if !sets.iter().flatten().any(|l| &l.name == name) {
            tracing::warn!(listener = %name,
                "listener is in the config but not in the supervisor: a new listener needs a restart");
        }
    }
    if cfg.runtime.workers != st.slots.len() {
        tracing::warn!(
            configured = cfg.runtime.workers,
            running = st.slots.len(),
            "the number of workers changes with a restart only"
        );
    }
    let (events_tx, events) = mpsc::unbounded_channel();
    let mut slots = Vec::new();
    let mut pids = Vec::new();
    for s in st.slots {
        let worker = match s.worker {
            Some(w) => Some(adopt_worker(w, &events_tx)?),
            None => None,
        };
        pids.extend(worker.as_ref().map(|w| w.pid));
        slots.push(Slot {
            index: s.index,
            worker,
            binary: s.binary,
            generation: s.generation,
            restarts: s.restarts,
            oom_kills: s.oom_kills,
            missed_heartbeat_kills: s.missed_heartbeat_kills,
            backoff: Duration::from_millis(s.backoff_ms),
            restart_at: s
                .restart_in_ms
                .map(|ms| Instant::now() + Duration::from_millis(ms)),
            crash_streak: s.crash_streak,
            last_exit: s.last_exit,
        });
    }
    let mut retiring = Vec::new();
    for w in st.retiring {
        retiring.push(adopt_worker(w, &events_tx)?);
    }
    let cgroups = limits::Cgroups::setup(&cfg.runtime.worker_limits);
    let mut s = Supervisor {
        cfg,
        opts,
        sets,
        next_sets: None,
        slots,
        retiring,
        incoming: None,
        events_tx,
        events,
        cgroups,
        retired: st.retired,
        stopping: false,
        started: ago(st.uptime_ms),
        history: st.history,
        control_tx,
        control: None,
        isolation_warned: false,
        triggers,
        deferred: None,
        upgrading: None,
        upgrades: st.upgrades,
        published: None,
        admin_fd: None,
        board,
        tickets: super::tickets::read_after_exec(
            st.ticket_keys_fd,
            Duration::from_millis(st.ticket_keys_age_ms),
        ),
    };
    s.start_control(control_fd).map_err(bad)?;
    s.start_admin(admin_fd)?;
    tracing::info!(
        supervisor_generation = s.opts.generation,
        workers = ?pids,
        retiring = s.retiring.len(),
        binary = %s.opts.binary.display(),
        "supervisor resumed after re-exec"
    );
    super::serve::serve(s).await
}

impl Supervisor {
    /// Restarts the message task of every worker from the channels taken back by
    /// [`Supervisor::stop_listening`] (after a re-exec that did not happen).
    pub(super) fn restart_listening(&mut self, channels: Vec<(u32, crate::handover::Channel)>) {
        let events = self.events_tx.clone();
        for (pid, ch) in channels {
            if let Some(w) = self.find(pid) {
                w.listening = Some(Listening::start(ch, pid, events.clone(), w.silent.clone()));
            }
        }
    }
}
