//! One worker process as the supervisor sees it: spawning it with its private channel, the
//! tasks that watch it (its exit, its messages), and the supervisor playing the predecessor
//! for a fresh worker (Hello, Listeners, Ready, Commit, Done with zero counters: the
//! single-process handover with no connection to move).

use crate::config::Protocol;
use crate::handover::{self, Channel, Message};
use crate::lifecycle::worker::split_channel;
use crate::metrics::Counters;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A listening socket the supervisor owns and passes to workers.
#[derive(Debug)]
pub struct ListenerFd {
    /// Listener name.
    pub name: String,
    /// Bound address.
    pub addr: SocketAddr,
    /// What it speaks.
    pub protocol: Protocol,
    /// The socket.
    pub fd: OwnedFd,
}

/// Something a worker or its watcher reports, keyed by the worker's pid.
#[derive(Debug)]
pub enum Event {
    /// A heartbeat with the worker's counters.
    Heartbeat(u32, Counters),
    /// The worker accepts.
    Live(u32),
    /// The worker refused to start (e.g. invalid config), or its introduction failed.
    Failed(u32, String),
    /// The worker process exited.
    Exited(u32, std::process::ExitStatus),
}

/// A running worker process.
#[derive(Debug)]
pub struct Worker {
    /// Its index.
    pub index: usize,
    /// Its pid.
    pub pid: u32,
    /// Its generation.
    pub generation: u64,
    /// When it was spawned.
    pub spawned: Instant,
    /// When it started accepting.
    pub live_since: Option<Instant>,
    /// Its last heartbeat (its spawn time until the first).
    pub last_heartbeat: Instant,
    /// Its counters as of the last heartbeat.
    pub counters: Counters,
    /// The sending half of its channel.
    pub tx: Channel,
    /// Its cgroups, if limits are in force.
    pub cgroup: Option<super::limits::WorkerCgroup>,
}

impl Worker {
    /// Sends a signal; a worker that is already gone is not an error worth reporting.
    pub fn signal(&self, sig: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// Sends a fresh handover channel (one end of a new socketpair) to the worker.
    pub async fn send_hand_over_to(&mut self, end: &OwnedFd) -> Result<(), String> {
        self.tx
            .send(&Message::HandOverTo, &[end.as_fd()], &[])
            .await
            .map_err(|e| format!("worker {}: send hand_over_to: {e}", self.pid))
    }
}

/// A new socketpair for a handover, both ends close-on-exec.
pub fn pair() -> Result<(OwnedFd, OwnedFd), String> {
    let (a, b) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| format!("cannot create a socketpair: {e}"))?;
    Ok((OwnedFd::from(a), OwnedFd::from(b)))
}

/// Spawns `binary worker -c CONFIG --index i --generation g` and starts its watchers.
pub fn spawn(
    binary: &Path,
    config: &Path,
    index: usize,
    generation: u64,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<Worker, String> {
    let args: Vec<std::ffi::OsString> = vec![
        "worker".into(),
        "-c".into(),
        config.as_os_str().to_owned(),
        "--index".into(),
        index.to_string().into(),
        "--generation".into(),
        generation.to_string().into(),
    ];
    let spawned = handover::spawn_successor(binary, &args)
        .map_err(|e| format!("cannot start worker {index}: {e}"))?;
    let mut child = spawned.child;
    let pid = child.id().unwrap_or(0);
    let (rx, tx) = split_channel(spawned.channel)
        .map_err(|e| format!("worker {index}: split channel: {e}"))?;
    let ev = events.clone();
    tokio::spawn(async move {
        if let Ok(st) = child.wait().await {
            let _ = ev.send(Event::Exited(pid, st));
        }
    });
    tokio::spawn(listen(rx, pid, events.clone()));
    let now = Instant::now();
    Ok(Worker {
        index,
        pid,
        generation,
        spawned: now,
        live_since: None,
        last_heartbeat: now,
        counters: Counters::default(),
        tx,
        cgroup: None,
    })
}

/// Forwards what a worker says to the supervisor's loop, until its channel ends.
async fn listen(mut rx: Channel, pid: u32, events: mpsc::UnboundedSender<Event>) {
    loop {
        let ev = match rx.recv().await {
            Ok(r) => match r.msg {
                Message::Heartbeat { counters } => Event::Heartbeat(pid, counters),
                Message::Ready { .. } => Event::Live(pid),
                Message::Refused { reason } => Event::Failed(pid, reason),
                other => {
                    tracing::warn!(
                        worker_pid = pid,
                        got = other.name(),
                        "unexpected message from a worker"
                    );
                    continue;
                }
            },
            Err(e) => {
                tracing::debug!(worker_pid = pid, error = %e, "worker channel ended");
                return;
            }
        };
        if events.send(ev).is_err() {
            return;
        }
    }
}

/// Plays the predecessor for a fresh worker over `ch`: its listeners, then an empty handover.
pub async fn introduce(
    mut ch: Channel,
    listeners: Vec<(String, SocketAddr, Protocol, OwnedFd)>,
    limit: Duration,
) -> Result<(), String> {
    let steps = async {
        handover::predecessor_hello(&mut ch).await?;
        let entries: Vec<_> = listeners
            .iter()
            .map(|(n, a, p, fd)| (n.as_str(), *a, *p, fd.as_fd()))
            .collect();
        handover::send_listeners(&mut ch, &entries).await?;
        handover::recv_ready(&mut ch).await?;
        ch.send(&Message::Commit, &[], &[]).await?;
        match ch.recv().await?.msg {
            Message::Ack { seq: 0, .. } => {}
            other => return Err(handover::unexpected(other, "ack of commit")),
        }
        handover::send_done(&mut ch, Counters::default()).await
    };
    match tokio::time::timeout(limit, steps).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("not ready within {limit:?}")),
    }
}
