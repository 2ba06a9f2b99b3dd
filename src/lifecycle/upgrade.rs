//! The predecessor's side of an upgrade: spawn the successor, run the [`Predecessor`] session
//! (listeners, then the live connections), and either commit (and drain what is left) or roll
//! everything back. The protocol steps are the session's; the decisions are here: what to
//! park and how long to wait for it, the deadlines, rollback, and taking over again.
//!
//! The rollback point is the commit. Before it, the successor holds received connections
//! without touching them and does not accept, so the old process can take every connection
//! back with no byte lost. After it, the successor serves everything and the old process only
//! finishes in-flight requests, handing each connection over once idle; if the successor dies
//! then, the old process still holds every listener and takes over again.

use super::process::Process;
use super::triggers::{Trigger, Triggers};
use super::Phase;
use crate::admin::control::Reply;
use crate::config::Config;
use crate::handover::session::{Deadline, Peer, Predecessor, SessionError};
use crate::handover::{self, Channel};
use crate::metrics::Metrics;
use crate::registry::Parked;
use serde::Serialize;
use serde_json::json;
use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::time::timeout;

/// The longest the listeners stay paused waiting for connections to park before the commit.
/// Tunnels and idle HTTP/1.1 connections park within milliseconds; one that has not by then
/// is handed over after the commit, like a connection finishing a request.
pub const PARK_WINDOW: Duration = Duration::from_secs(1);

/// What an upgrade did, for the CLI's summary line and status.
#[derive(Debug, Clone, Serialize)]
pub struct UpgradeReport {
    /// This (old) process.
    pub old_pid: u32,
    /// The successor.
    pub new_pid: u32,
    /// Listening sockets passed.
    pub listeners: usize,
    /// TCP and Upgrade/CONNECT tunnels handed over.
    pub tunnels: usize,
    /// Idle HTTP keep-alive connections handed over (including those that finished a request first).
    pub idle_http: usize,
    /// HTTP/1.1 connections handed over mid-request, by phase.
    pub busy_http: BusyHttp,
    /// Of the client connections handed over, those over TLS (their sessions moved too).
    pub tls: usize,
    /// At the commit: connections still finishing in the old process (they move once idle,
    /// or finish there).
    pub still_finishing: usize,
    /// Connections that finished their work in the old process and closed there.
    pub finished_in_old: usize,
    /// Connections closed at the drain deadline.
    pub closed_at_deadline: usize,
    /// How long no process accepted: from pausing here to the successor's commit.
    pub accept_paused_ms: u64,
    /// From trigger to the commit, or (once drained) to the end of the old process's work.
    pub millis: u64,
    /// Whether the old process has finished (false in the reply sent at the commit).
    pub drained: bool,
    /// What changed in the configuration (`config::diff`), if the file could be read.
    pub changes: Option<String>,
}

/// HTTP/1.1 connections handed over in the middle of a request, by the engine's phase.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct BusyHttp {
    /// Reading a request head.
    pub head: usize,
    /// Choosing or connecting to a server.
    pub connect: usize,
    /// Request body or response flowing.
    pub exchange: usize,
    /// Writing the rest of a response (an error) before closing.
    pub flush: usize,
    /// Idle pooled upstream connections (not client connections; not in the total).
    pub pooled: usize,
}

impl BusyHttp {
    fn total(&self) -> usize {
        self.head + self.connect + self.exchange + self.flush
    }
}

impl std::fmt::Display for BusyHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} busy http (head {}, connect {}, exchange {}, flush {}) connections and {} pooled upstream",
            self.total(),
            self.head,
            self.connect,
            self.exchange,
            self.flush,
            self.pooled
        )
    }
}

impl UpgradeReport {
    /// One line for a person.
    pub fn summary(&self) -> String {
        self.counts()
            + &self
                .changes
                .as_ref()
                .map(|c| format!("; {c}"))
                .unwrap_or_default()
    }

    fn counts(&self) -> String {
        if !self.drained {
            return format!(
                "upgrade ok: pid {} -> {} committed and serving: {} listeners passed, {} tunnels, {} idle http and {} connections handed over ({} over tls), \
                 {} connections still finishing in the old process, accepting paused {} ms, {} ms",
                self.old_pid, self.new_pid, self.listeners, self.tunnels, self.idle_http, self.busy_http,
                self.tls, self.still_finishing, self.accept_paused_ms, self.millis
            );
        }
        format!(
            "upgrade ok: pid {} -> {}: {} listeners passed, {} tunnels, {} idle http and {} connections handed over ({} over tls), \
             {} finished in the old process, {} closed at the drain deadline, accepting paused {} ms, {} ms",
            self.old_pid, self.new_pid, self.listeners, self.tunnels, self.idle_http, self.busy_http,
            self.tls, self.finished_in_old, self.closed_at_deadline, self.accept_paused_ms, self.millis
        )
    }
}

/// How an upgrade ended.
#[derive(Debug)]
pub(super) enum Ended {
    /// The successor serves; this process is done and exits.
    Replaced(UpgradeReport),
    /// This process serves everything (the upgrade failed, or the successor died after the
    /// commit and this process took over again); the message says why.
    Failed(String),
}

type ReplyTx = tokio::sync::oneshot::Sender<Reply>;

/// Who asked, and when they want their answer: at the commit, or (`wait`) at the end.
pub(super) struct Asker {
    reply: Option<ReplyTx>,
    wait: bool,
}

impl Asker {
    /// The reply channel of a CLI request (none for a signal).
    pub(super) fn new(reply: Option<ReplyTx>, wait: bool) -> Asker {
        Asker { reply, wait }
    }

    fn committed(&mut self, report: &UpgradeReport) {
        if !self.wait {
            if let Some(r) = self.reply.take() {
                let _ = r.send(Reply::ok(report.summary(), json!(report)));
            }
        }
    }

    fn finish(self, ended: &Ended) {
        if let Some(r) = self.reply {
            let _ = r.send(match ended {
                Ended::Replaced(report) => Reply::ok(report.summary(), json!(report)),
                Ended::Failed(msg) => Reply::err(msg.clone()),
            });
        }
    }
}

/// Runs `f` while refusing any other upgrade trigger (one upgrade at a time). A stop asked by
/// a signal (SIGTERM, SIGINT: nobody waits for an answer) is kept in `later`, for the main
/// loop once the upgrade is over: if the upgrade is rolled back, this process still serves and
/// then stops (a worker's supervisor, or systemd, must not see its stop lost to a rollback).
/// `baton stop` is answered at once: retry when the upgrade is over.
async fn guarded<F: Future>(
    triggers: &mut Triggers,
    status: &serde_json::Value,
    later: &mut Option<Trigger>,
    f: F,
) -> F::Output {
    tokio::pin!(f);
    loop {
        tokio::select! {
            out = &mut f => return out,
            t = triggers.next() => match t {
                Trigger::Upgrade { why, reply, .. } => {
                    tracing::warn!(trigger = why, "upgrade refused: an upgrade is already in progress");
                    if let Some(r) = reply {
                        let _ = r.send(Reply::err("upgrade refused: an upgrade is already in progress"));
                    }
                }
                Trigger::Status(r) => {
                    let _ = r.send(Reply::ok("status", status.clone()));
                }
                Trigger::Stop { why, fast, reply: None } => {
                    tracing::warn!(trigger = why, "stop deferred: an upgrade is in progress; this process stops once it is over, if it still serves");
                    // A stop replaces an upgrade queued for later; the first stop stays.
                    if !matches!(later, Some(Trigger::Stop { .. })) {
                        *later = Some(Trigger::Stop { why, fast, reply: None });
                    }
                }
                Trigger::Stop { why, reply: Some(r), .. } => {
                    tracing::warn!(trigger = why, "stop refused: an upgrade is in progress");
                    let _ = r.send(Reply::err("an upgrade is in progress; retry when it is over"));
                }
            }
        }
    }
}

/// Everything before the rollback point: handshake, listeners, readiness.
async fn prepare(p: &Process, s: &mut Predecessor) -> Result<Vec<String>, SessionError> {
    s.hello().await?;
    crate::test_hooks::hold_upgrade("listeners").await;
    // The successor decrypts the session tickets this process issued (docs/tls.md).
    s.set_ticket_keys(p.ticket_keys());
    s.offer_listeners(&p.listeners().offers()).await?;
    s.await_ready().await
}

/// Collects the connections that park promptly (see
/// [`crate::registry::ConnStats::parks_promptly`]) among those asked. Ends when none of them
/// is left to wait for (`expected` of them were asked), bounded by `limit`.
async fn collect_prompt(
    p: &mut Process,
    asked: &HashSet<u64>,
    expected: usize,
    limit: Duration,
) -> Vec<Parked> {
    // The registry is scanned only when nothing arrived for a moment, never per connection:
    // with thousands of connections a scan per arrival made the pause in accepting quadratic.
    let mut got = Vec::with_capacity(expected);
    let deadline = tokio::time::Instant::now() + limit;
    while got.len() < expected {
        tokio::select! {
            Some(c) = p.next_parked() => got.push(c),
            _ = tokio::time::sleep(Duration::from_millis(5)) => {
                // Quiet: those not here yet may have closed instead of parking.
                let waiting = p
                    .registry()
                    .count(|c| asked.contains(&c.id) && c.parks_promptly())
                    > 0;
                if !waiting {
                    break;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(limit = ?limit, "some connections did not park in time; they move after the commit");
                break;
            }
        }
    }
    // Take what is already queued, then stop.
    while let Some(c) = p.try_next_parked() {
        got.push(c);
    }
    got
}

fn count_kinds(conns: &[Parked], tunnels: &mut usize, idle: &mut usize, busy: &mut BusyHttp) {
    use crate::proxy::http::h1::state::Phase;
    for c in conns {
        match c {
            Parked::Tunnel(_) => *tunnels += 1,
            Parked::IdleHttp(_) => *idle += 1,
            Parked::Pooled(_) => busy.pooled += 1,
            Parked::Http(h) => match h.state.phase {
                Phase::Head if h.state.ex.is_none() && h.state.cbuf.is_empty() => *idle += 1,
                Phase::Head => busy.head += 1,
                Phase::Connect => busy.connect += 1,
                Phase::Exchange => busy.exchange += 1,
                Phase::Flush => busy.flush += 1,
            },
        }
    }
}

/// Client connections over TLS among `conns`.
fn count_tls(conns: &[Parked]) -> usize {
    conns.iter().filter(|c| c.client_tls().is_some()).count()
}

/// The step deadline of a handover, from the config.
fn deadline(p: &Process) -> Deadline {
    Deadline::new(p.cfg().runtime.upgrade_timeout, "upgrade_timeout")
}

/// Checks a configuration a successor would load: it must load, and name a listener.
pub fn check_config(cfg: &Config) -> Result<(), String> {
    if cfg.listeners.is_empty() {
        return Err(
            "the config has no listeners: refusing it, it would close every listener".into(),
        );
    }
    Ok(())
}

/// Upgrades to a successor. On [`Ended::Replaced`] the caller exits; otherwise everything is
/// serving here again and the message says why. `asker` gets its reply at the commit (or at
/// the end, if it waits).
pub(super) async fn upgrade(
    p: &mut Process,
    triggers: &mut Triggers,
    reload: bool,
    binary: Option<PathBuf>,
    mut asker: Asker,
    later: &mut Option<Trigger>,
) -> Ended {
    let ended = async {
        let started = Instant::now();
        if reload {
            let cfg = Config::load(&p.opts().config_path)
                .map_err(|e| format!("config refused, nothing changed:\n{e}"))?;
            check_config(&cfg).map_err(|e| format!("config refused, nothing changed: {e}"))?;
        }
        let binary = binary
            .or_else(|| p.cfg().runtime.binary.clone())
            .unwrap_or_else(|| p.opts().binary.clone());
        let status = p.status();
        p.set_phase(Phase::HandingOver);
        let args: Vec<std::ffi::OsString> = vec![
            "run".into(),
            "-c".into(),
            p.opts().config_path.clone().into_os_string(),
            "--generation".into(),
            (p.opts().generation + 1).to_string().into(),
        ];
        let spawned = match handover::spawn_successor(&binary, &args) {
            Ok(s) => s,
            Err(e) => {
                p.set_phase(Phase::Ready);
                Metrics::inc(&p.metrics().upgrades_failed);
                return Err(format!("cannot start {}: {e}", binary.display()));
            }
        };
        tracing::info!(successor = spawned.child.id(), binary = %binary.display(), "successor started");
        let session = Predecessor::new(spawned.channel, Peer::Child(spawned.child), deadline(p));
        Ok(hand_over(p, triggers, later, session, started, status, &mut asker).await)
    }
    .await
    .unwrap_or_else(Ended::Failed);
    asker.finish(&ended);
    ended
}

/// Hands everything over to a successor the supervisor connected us to through `ch`
/// (multi-process mode: the replacement of this worker). Same protocol as [`upgrade`].
pub(super) async fn upgrade_to_peer(
    p: &mut Process,
    triggers: &mut Triggers,
    ch: Channel,
    later: &mut Option<Trigger>,
) -> Ended {
    let status = p.status();
    p.set_phase(Phase::HandingOver);
    let session = Predecessor::new(ch, Peer::Remote, deadline(p));
    let mut asker = Asker::new(None, false);
    hand_over(
        p,
        triggers,
        later,
        session,
        Instant::now(),
        status,
        &mut asker,
    )
    .await
}

/// The upgrade from the handshake on, with the successor started.
async fn hand_over(
    p: &mut Process,
    triggers: &mut Triggers,
    later: &mut Option<Trigger>,
    mut s: Predecessor,
    started: Instant,
    status: serde_json::Value,
    asker: &mut Asker,
) -> Ended {
    // Phase 1: handshake and listeners, then stop accepting here.
    let adopted = match guarded(triggers, &status, later, prepare(p, &mut s)).await {
        Ok(a) => a,
        Err(e) => return rollback(p, s, Vec::new(), e).await,
    };
    // Known for a remote successor (a worker's replacement) from its Hello.
    let new_pid = s.peer_pid();
    tracing::info!(successor = new_pid, adopted = ?adopted, "successor ready; handing over connections");
    p.pause_accepting().await;
    let paused = Instant::now();

    // Phase 2: park and send every connection that can move now; the successor holds them.
    let adopted: HashSet<String> = adopted.into_iter().collect();
    // Counted as they are asked, under the registry's lock: one that parks at once leaves the
    // registry before any later count could see it.
    let prompt_asked = std::cell::Cell::new(0usize);
    let registry = p.registry().clone();
    let asked = registry.park_where(|c| {
        let ask = adopted.contains(&*c.listener);
        if ask && c.parks_promptly() {
            prompt_asked.set(prompt_asked.get() + 1);
        }
        ask
    });
    let window = p.cfg().runtime.upgrade_timeout.min(PARK_WINDOW);
    let mut prompt = collect_prompt(p, &asked, prompt_asked.get(), window).await;
    // Idle pooled upstream connections move too: the successor starts with a warm pool.
    prompt.extend(p.listeners().take_pooled(&adopted));
    let (mut tunnels, mut idle_http, mut busy_http) = (0, 0, BusyHttp::default());
    count_kinds(&prompt, &mut tunnels, &mut idle_http, &mut busy_http);
    let mut tls = count_tls(&prompt);
    let upstream_tls = prompt.iter().filter(|c| c.upstream_tls().is_some()).count();
    crate::test_hooks::hold_upgrade("batch").await;
    if let Err(e) = guarded(triggers, &status, later, s.send_batch(&prompt)).await {
        return rollback(p, s, prompt, e).await;
    }
    crate::test_hooks::hold_upgrade("commit").await;
    if let Err(e) = guarded(triggers, &status, later, s.commit()).await {
        // Without the acknowledgement the successor may or may not serve: it is killed
        // with its process group, so only this process does.
        return rollback(p, s, prompt, e).await;
    }
    // Committed: the successor serves them now; our copies close here.
    drop(prompt);
    let accept_paused_ms = paused.elapsed().as_millis() as u64;
    let still_finishing = registry.len();
    tracing::info!(
        successor = new_pid,
        tunnels,
        idle_http,
        busy_http = %busy_http,
        tls,
        upstream_tls,
        still_finishing,
        accept_paused_ms,
        "handover committed"
    );
    let mut report = UpgradeReport {
        old_pid: crate::isolation::report::outer_pid(),
        new_pid,
        listeners: p.listeners().len(),
        tunnels,
        idle_http,
        busy_http,
        tls,
        still_finishing,
        finished_in_old: 0,
        closed_at_deadline: 0,
        accept_paused_ms,
        millis: started.elapsed().as_millis() as u64,
        drained: false,
        // The successor read the same file: what changed goes in the summary.
        changes: Config::load(&p.opts().config_path)
            .ok()
            .map(|new| crate::config::diff(p.cfg(), &new).to_string()),
    };
    asker.committed(&report);
    crate::test_hooks::hold_upgrade("done").await;

    // Phase 3: finish in-flight requests, handing each connection over once idle.
    p.set_phase(Phase::Draining);
    let drain_deadline = tokio::time::Instant::now() + p.cfg().runtime.drain_timeout;
    let before = registry.len();
    let mut late_handed = 0usize;
    let mut closed_at_deadline = 0usize;
    // A connection registered just before accepting paused may have missed the first request.
    let mut repark = tokio::time::interval(Duration::from_millis(100));
    loop {
        let mut batch = Vec::new();
        let mut last = false;
        tokio::select! {
            Some(c) = p.next_parked() => batch.push(c),
            _ = repark.tick() => {
                registry.park_where(|c| adopted.contains(&*c.listener));
            }
            // A parked connection is queued before it leaves the registry, so once the registry
            // is empty everything still to send is in the queue.
            _ = registry.wait_empty() => last = true,
            _ = tokio::time::sleep_until(drain_deadline) => {
                closed_at_deadline = registry.len();
                tracing::warn!(connections = closed_at_deadline, "drain deadline reached; closing the rest");
                registry.kill_all();
                let _ = timeout(Duration::from_secs(1), registry.wait_empty()).await;
                last = true;
            }
            why = s.exited() => return take_over_again(p, s, new_pid, why).await,
        }
        while let Some(more) = p.try_next_parked() {
            batch.push(more);
        }
        match s.send_batch(&batch).await {
            Ok(()) => {
                late_handed += batch.len();
                count_kinds(&batch, &mut tunnels, &mut idle_http, &mut busy_http);
                tls += count_tls(&batch);
            }
            Err(e) => {
                // Still ours: served here again once this process takes over.
                tracing::error!(error = %e, connections = batch.len(), "late handover failed");
                for c in batch {
                    p.resume_parked(c).await;
                }
                return take_over_again(p, s, new_pid, e.to_string()).await;
            }
        }
        if last {
            break;
        }
    }
    let finished_in_old = before.saturating_sub(late_handed + closed_at_deadline);
    Metrics::inc(&p.metrics().upgrades_ok);
    p.metrics().record_handover(
        (tunnels + idle_http + busy_http.total()) as u64,
        finished_in_old as u64,
        closed_at_deadline as u64,
    );
    report.tunnels = tunnels;
    report.idle_http = idle_http;
    report.busy_http = busy_http;
    report.tls = tls;
    report.finished_in_old = finished_in_old;
    report.closed_at_deadline = closed_at_deadline;
    report.millis = started.elapsed().as_millis() as u64;
    report.drained = true;
    p.record_upgrade(true, report.summary());
    let counters = p.metrics().snapshot();
    let history = p.history_values();
    if let Err(e) = s.done(counters, history).await {
        tracing::warn!(error = %e, "cannot send done to the successor");
    }
    p.close_listeners().await;
    tracing::info!(summary = %report.summary(), "upgrade complete; exiting");
    Ended::Replaced(report)
}

/// Takes everything back: tells the successor why and kills it with its process group,
/// resumes accepting and serving every parked connection here.
async fn rollback(p: &mut Process, s: Predecessor, held: Vec<Parked>, why: SessionError) -> Ended {
    let why = why.to_string();
    tracing::error!(reason = %why, "upgrade failed; rolling back");
    s.abort(&why).await;
    p.resume_accepting();
    let n = held.len();
    for c in held {
        p.resume_parked(c).await;
    }
    Metrics::inc(&p.metrics().upgrades_failed);
    p.set_phase(Phase::Ready);
    tracing::info!(resumed = n, "rollback complete; serving everything here");
    let msg = format!(
        "upgrade failed, old process {} still serving: {why}",
        crate::isolation::report::outer_pid()
    );
    p.record_upgrade(false, &msg);
    Ended::Failed(msg)
}

/// The successor died after the commit: this process still holds every listener, so it
/// accepts again, takes the control socket and pid file back, and serves what it still has
/// (connections finishing a request park and are resumed here). What the successor held is
/// lost with it.
async fn take_over_again(p: &mut Process, s: Predecessor, new_pid: u32, why: String) -> Ended {
    tracing::error!(successor = new_pid, reason = %why,
        "SUCCESSOR DIED AFTER THE COMMIT: this process takes over again");
    s.kill().await;
    p.resume_accepting();
    if let Err(e) = p.take_back_control() {
        tracing::error!(error = %e, "cannot take the control socket or pid file back");
    }
    Metrics::inc(&p.metrics().upgrades_failed);
    p.set_phase(Phase::Ready);
    let msg = format!(
        "upgrade failed after the commit: successor pid {new_pid} died ({why}); old process {} took over again and serves",
        crate::isolation::report::outer_pid()
    );
    p.record_upgrade(false, &msg);
    Ended::Failed(msg)
}
