//! One worker process as the supervisor sees it: spawning it with its private channel, the
//! tasks that watch it (its exit, its messages), and the supervisor playing the predecessor
//! for a fresh worker (Hello, Listeners, Ready, Commit, Done with zero counters: the
//! single-process handover with no connection to move).

use crate::config::Protocol;
use crate::handover::session::{Deadline, Peer, Predecessor, SessionError};
use crate::handover::{self, Channel, Message};
use crate::lifecycle::worker::split_channel;
use crate::metrics::Counters;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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

/// A listener as handed to a worker: name, address, protocol and a duplicate of the socket.
pub type Offered = (String, SocketAddr, Protocol, OwnedFd);

/// Duplicates set `index` of `sets` (the only set, in `shared` mode), to hand to a worker.
pub fn offered(sets: &[Vec<ListenerFd>], index: usize) -> Result<Vec<Offered>, String> {
    let set = sets
        .get(index)
        .or_else(|| sets.first())
        .ok_or("no listener set")?;
    set.iter()
        .map(|l| {
            let fd =
                l.fd.try_clone()
                    .map_err(|e| format!("dup listener {}: {e}", l.name))?;
            Ok((l.name.clone(), l.addr, l.protocol, fd))
        })
        .collect()
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
    /// Heartbeats received by this supervisor image (reset by a re-exec).
    pub heartbeats: u64,
    /// How it exited, once it has (a new worker that dies during an upgrade step).
    pub exited: Option<String>,
    /// Set by the task that waits for it, as soon as its exit is reaped.
    reaped: Arc<AtomicBool>,
    /// The task forwarding its messages, and how to stop it at a frame boundary.
    pub listening: Option<Listening>,
    /// Its CPUs and namespaces as set up at its spawn ([`crate::isolation`]).
    pub placement: crate::isolation::namespaces::Placement,
    /// Which rotation of the supervisor's session-ticket keys it holds
    /// ([`super::tickets`]).
    pub tickets_epoch: u64,
    /// Cancelled once its channel has ended and every message on it was forwarded: its exit
    /// is reported after that, so its last heartbeat (its final counters) comes first.
    pub silent: CancellationToken,
}

/// How long a worker's exit waits for its channel to end (it ends with the process, unless
/// something else still holds the worker's end).
const LAST_WORDS: Duration = Duration::from_secs(1);

/// Reports the exit of worker `pid` (`status`) once its channel went `silent`, so its last
/// heartbeat is handled before its exit.
async fn report_exit(
    pid: u32,
    status: std::process::ExitStatus,
    silent: CancellationToken,
    events: &mpsc::UnboundedSender<Event>,
) {
    let _ = tokio::time::timeout(LAST_WORDS, silent.cancelled()).await;
    let _ = events.send(Event::Exited(pid, status));
}

/// The task that reads a worker's channel, stoppable between frames so the channel can be
/// kept across the supervisor's re-exec without losing half a message.
#[derive(Debug)]
pub struct Listening {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Option<Channel>>,
}

impl Listening {
    /// Starts forwarding what worker `pid` says on `rx` to `events`; `silent` is cancelled
    /// once the channel ended (not when the task is stopped).
    pub fn start(
        rx: Channel,
        pid: u32,
        events: mpsc::UnboundedSender<Event>,
        silent: CancellationToken,
    ) -> Listening {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let kept = listen(rx, pid, events, stopped).await;
            if kept.is_none() {
                silent.cancel();
            }
            kept
        });
        Listening { stop, task }
    }

    /// Stops the task between two frames and returns the channel (`None` if it had ended).
    pub async fn stop(self) -> Option<Channel> {
        let _ = self.stop.send(());
        self.task.await.ok().flatten()
    }
}

impl Worker {
    /// A worker just spawned or adopted: its messages on `rx` are forwarded to `events`.
    fn new(
        index: usize,
        pid: u32,
        generation: u64,
        (rx, tx): (Channel, Channel),
        events: &mpsc::UnboundedSender<Event>,
        silent: CancellationToken,
        reaped: Arc<AtomicBool>,
    ) -> Worker {
        let now = Instant::now();
        Worker {
            index,
            pid,
            generation,
            spawned: now,
            live_since: None,
            last_heartbeat: now,
            counters: Counters::default(),
            tx,
            cgroup: None,
            heartbeats: 0,
            exited: None,
            reaped,
            listening: Some(Listening::start(rx, pid, events.clone(), silent.clone())),
            placement: Default::default(),
            tickets_epoch: 0,
            silent,
        }
    }

    /// Sends a signal; a worker that is already gone is not an error worth reporting. One
    /// that was reaped gets none: its pid may belong to another process by now (its exit is
    /// reported up to [`LAST_WORDS`] later, and until then it still looks alive here).
    pub fn signal(&self, sig: rustix::process::Signal) {
        if self.reaped.load(Ordering::Acquire) {
            return;
        }
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// Sends the supervisor's listeners to a new worker, before its [`Self::send_hand_over_to`]:
    /// it uses them rather than binding, for the listeners its predecessor does not have.
    pub async fn send_listeners(&mut self, listeners: &[Offered]) -> Result<(), String> {
        let offers: Vec<_> = listeners
            .iter()
            .map(|(n, a, p, fd)| (n.as_str(), *a, *p, fd.as_fd()))
            .collect();
        handover::send_listeners(&mut self.tx, &offers)
            .await
            .map_err(|e| format!("worker {}: send listeners: {e}", self.pid))
    }

    /// Sends the supervisor's session-ticket keys to a serving worker (a `Listeners` message
    /// with no listener), which takes them in place of its own.
    pub async fn send_ticket_keys(&mut self, keys: &[u8]) -> Result<(), String> {
        let none: [(&str, SocketAddr, Protocol, std::os::fd::BorrowedFd<'_>); 0] = [];
        handover::send_listeners_with_keys(&mut self.tx, &none, keys)
            .await
            .map_err(|e| format!("worker {}: send ticket keys: {e}", self.pid))
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

/// Spawns `binary worker -c CONFIG --index i --generation g [--accept-board FD]`, placed as `plan` says (CPUs,
/// namespaces: [`crate::isolation::namespaces`]), and starts its watchers.
pub fn spawn(
    binary: &Path,
    config: &Path,
    (index, generation): (usize, u64),
    accept_board: Option<i32>,
    plan: &crate::isolation::namespaces::Plan,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<Worker, String> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "worker".into(),
        "-c".into(),
        config.as_os_str().to_owned(),
        "--index".into(),
        index.to_string().into(),
        "--generation".into(),
        generation.to_string().into(),
    ];
    if let Some(fd) = accept_board {
        // Not close-on-exec: the worker inherits it under this number.
        args.extend(["--accept-board".into(), fd.to_string().into()]);
    }
    let runtime = tokio::runtime::Handle::current();
    let (spawned, placement) = crate::isolation::namespaces::spawn_placed(plan, || {
        let _in_runtime = runtime.enter();
        handover::spawn_successor(binary, &args)
    });
    let spawned = spawned.map_err(|e| format!("cannot start worker {index}: {e}"))?;
    let mut child = spawned.child;
    let pid = child.id().unwrap_or(0);
    let (rx, tx) = split_channel(spawned.channel)
        .map_err(|e| format!("worker {index}: split channel: {e}"))?;
    let (ev, silent) = (events.clone(), CancellationToken::new());
    let watch = silent.clone();
    let reaped = Arc::new(AtomicBool::new(false));
    let mark = reaped.clone();
    tokio::spawn(async move {
        if let Ok(st) = child.wait().await {
            mark.store(true, Ordering::Release);
            report_exit(pid, st, watch, &ev).await;
        }
    });
    let mut w = Worker::new(index, pid, generation, (rx, tx), events, silent, reaped);
    w.placement = placement;
    Ok(w)
}

/// Forwards what a worker says to the supervisor's loop, until its channel ends (`None`) or
/// `stop` (the channel is given back). A worker sends each frame with one small `sendmsg`,
/// which a Unix stream socket delivers whole, so `recv` is only ever pending between frames:
/// stopping it there loses nothing.
async fn listen(
    mut rx: Channel,
    pid: u32,
    events: mpsc::UnboundedSender<Event>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Option<Channel> {
    loop {
        let received = tokio::select! {
            biased;
            _ = &mut stop => return Some(rx),
            r = rx.recv() => r,
        };
        let ev = match received {
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
                return None;
            }
        };
        if events.send(ev).is_err() {
            return None;
        }
    }
}

/// Plays the predecessor for a fresh worker over `ch`: its listeners with the supervisor's
/// session-ticket keys, then an empty handover, through the same [`Predecessor`] session a
/// process uses for its successor.
pub async fn introduce(
    ch: Channel,
    listeners: Vec<Offered>,
    ticket_keys: zeroize::Zeroizing<Vec<u8>>,
    limit: Duration,
) -> Result<(), String> {
    let mut s = Predecessor::new(ch, Peer::Remote, Deadline::new(limit, "upgrade_timeout"));
    s.set_ticket_keys(ticket_keys);
    let steps = async {
        s.hello().await?;
        let offers: Vec<_> = listeners
            .iter()
            .map(|(n, a, p, fd)| (n.as_str(), *a, *p, fd.as_fd()))
            .collect();
        s.offer_listeners(&offers).await?;
        s.await_ready().await?;
        s.commit().await?;
        s.done(Counters::default(), Vec::new()).await
    };
    steps.await.map_err(|e: SessionError| e.to_string())
}

/// After the supervisor's re-exec: takes over worker `pid` (still this process's child) with
/// its channel (`None` if it had ended), and watches for its exit by pidfd.
pub fn adopt(
    index: usize,
    pid: u32,
    generation: u64,
    channel: Option<OwnedFd>,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<Worker, String> {
    let channel = match channel {
        Some(fd) => fd,
        // A worker whose channel had ended is exiting: a dead end stands in for it.
        None => pair()?.0,
    };
    let ch = Channel::from_std(std::os::unix::net::UnixStream::from(channel))
        .map_err(|e| format!("worker {index}: channel: {e}"))?;
    let (rx, tx) = split_channel(ch).map_err(|e| format!("worker {index}: split channel: {e}"))?;
    let (ev, silent) = (events.clone(), CancellationToken::new());
    let watch = silent.clone();
    let reaped = Arc::new(AtomicBool::new(false));
    let mark = reaped.clone();
    tokio::spawn(async move {
        let st = wait_adopted(pid).await;
        mark.store(true, Ordering::Release);
        report_exit(pid, st, watch, &ev).await;
    });
    Ok(Worker::new(
        index,
        pid,
        generation,
        (rx, tx),
        events,
        silent,
        reaped,
    ))
}

/// Waits for an adopted child to exit and reaps it. Not a tokio `Child` (that one belonged
/// to the previous image), so: `waitpid` first (it may already be a zombie, or — if the old
/// image reaped it just before the exec — gone), then a pidfd, readable once it exits.
async fn wait_adopted(pid: u32) -> std::process::ExitStatus {
    use rustix::process::{pidfd_open, waitpid, PidfdFlags, WaitOptions};
    use std::os::unix::process::ExitStatusExt;
    // Exit code 255: what is reported when the real status was lost across the exec.
    let lost = std::process::ExitStatus::from_raw(0xff00);
    let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
        return lost;
    };
    let mut pidfd = None;
    loop {
        match waitpid(Some(p), WaitOptions::NOHANG) {
            Ok(Some((_, st))) => return std::process::ExitStatus::from_raw(st.as_raw()),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(worker_pid = pid, error = %e, "adopted worker already reaped; its exit status is lost");
                return lost;
            }
        }
        // Still our unreaped child, so the pid cannot have been reused: the pidfd is its.
        if pidfd.is_none() {
            pidfd = pidfd_open(p, PidfdFlags::empty())
                .ok()
                .and_then(super::fds::watch_pidfd);
        }
        match &pidfd {
            Some(fd) => {
                // Readable once it exited; readiness is kept, so a pause avoids spinning in
                // the (brief) case where waitpid does not see the exit yet.
                let _ = fd.readable().await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    /// A process that dies of the first fatal signal sent to it, and which that was.
    async fn killed_by(send: impl FnOnce(u32)) -> Option<i32> {
        let mut p = tokio::process::Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = p.id().unwrap();
        send(pid);
        // SIGTERM second: it decides only if nothing was sent before it.
        let raw = rustix::process::Pid::from_raw(pid as i32).unwrap();
        let _ = rustix::process::kill_process(raw, rustix::process::Signal::TERM);
        let st = tokio::time::timeout(Duration::from_secs(20), p.wait()).await;
        st.unwrap().unwrap().signal()
    }

    /// A reaped worker is never signalled: its pid stands here for a process that took the
    /// number over, which the supervisor's SIGKILL must not reach.
    #[tokio::test]
    async fn a_reaped_worker_gets_no_signal() {
        let (events, _rx) = mpsc::unbounded_channel();
        for (reaped, want) in [(true, libc::SIGTERM), (false, libc::SIGKILL)] {
            let got = killed_by(|pid| {
                let w = Worker::new(
                    0,
                    pid,
                    1,
                    Channel::pair().unwrap(),
                    &events,
                    CancellationToken::new(),
                    Arc::new(AtomicBool::new(reaped)),
                );
                w.signal(rustix::process::Signal::KILL);
            })
            .await;
            assert_eq!(got, Some(want), "reaped: {reaped}");
        }
    }
}
