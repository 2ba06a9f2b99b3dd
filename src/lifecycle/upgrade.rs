//! The predecessor's side of an upgrade: spawn the successor, hand it the listeners, then the
//! live connections, and either commit (and drain what is left) or roll everything back.
//!
//! The rollback point is the `Commit` message. Before it, the successor holds received
//! connections without touching them and does not accept, so the old process can take
//! every connection back with no byte lost. After it, the successor serves everything and the
//! old process only finishes in-flight HTTP requests, handing each connection over once idle.

use super::process::{Process, UpgradeRecord};
use super::triggers::{Trigger, Triggers};
use super::Phase;
use crate::admin::control::Reply;
use crate::config::Config;
use crate::handover::{self, Channel, Message};
use crate::metrics::Metrics;
use crate::registry::{ConnKind, Parked};
use serde::Serialize;
use std::collections::HashSet;
use std::future::Future;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::process::Child;
use tokio::time::timeout;

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
    /// Connections that finished their work in the old process and closed there.
    pub finished_in_old: usize,
    /// Connections closed at the drain deadline.
    pub closed_at_deadline: usize,
    /// From trigger to the end of the old process's work.
    pub millis: u64,
    /// What changed in the configuration (`config::diff`), if the file could be read.
    pub changes: Option<String>,
}

impl UpgradeReport {
    /// One line for a person.
    pub fn summary(&self) -> String {
        format!(
            "upgrade ok: pid {} -> {}: {} listeners passed, {} tunnels and {} idle http connections handed over, \
             {} finished in the old process, {} closed at the drain deadline, {} ms",
            self.old_pid, self.new_pid, self.listeners, self.tunnels, self.idle_http,
            self.finished_in_old, self.closed_at_deadline, self.millis
        ) + &self.changes.as_ref().map(|c| format!("; {c}")).unwrap_or_default()
    }
}

/// Runs `f` while refusing any other upgrade trigger (one upgrade at a time).
async fn guarded<F: Future>(
    triggers: &mut Triggers,
    status: &serde_json::Value,
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
                Trigger::Stop { why, reply, .. } => {
                    tracing::warn!(trigger = why, "stop ignored: an upgrade is in progress; stop the new process instead");
                    if let Some(r) = reply {
                        let _ = r.send(Reply::err("an upgrade is in progress; retry when it is over"));
                    }
                }
            }
        }
    }
}

/// The successor's process when this process spawned it; `None` when the successor is a peer
/// the supervisor connected us to (multi-process mode), whose death shows as channel EOF.
type Succ = Option<Child>;

/// Waits for the spawned successor to exit; never returns for a peer.
async fn wait_child(child: &mut Succ) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(c) => c.wait().await,
        None => std::future::pending().await,
    }
}

/// Receives one message, failing if the successor exits or the deadline passes.
async fn expect(
    ch: &mut Channel,
    child: &mut Succ,
    deadline: Instant,
) -> Result<handover::Received, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::select! {
        r = ch.recv() => match r {
            Ok(m) => Ok(m),
            Err(e) => {
                // The channel usually breaks because the successor died: say how, if it did.
                match timeout(Duration::from_millis(500), wait_child(child)).await {
                    Ok(Ok(st)) => Err(format!("successor exited ({st}) : {e}")),
                    _ => Err(format!("handover channel: {e}")),
                }
            }
        },
        st = wait_child(child) => Err(match st {
            Ok(st) => format!("successor exited ({st})"),
            Err(e) => format!("successor lost: {e}"),
        }),
        _ = tokio::time::sleep(left) => Err("successor not ready within upgrade_timeout".to_string()),
    }
}

/// Everything before the rollback point: handshake, listeners, readiness.
async fn prepare(p: &Process, ch: &mut Channel, child: &mut Succ) -> Result<Vec<String>, String> {
    let deadline = Instant::now() + p.cfg.runtime.upgrade_timeout;
    match expect(ch, child, deadline).await?.msg {
        Message::Hello {
            protocol_version, ..
        } if protocol_version == handover::PROTOCOL_VERSION => {}
        Message::Hello {
            protocol_version,
            version,
            ..
        } => {
            return Err(format!(
                "successor {version} speaks handover protocol {protocol_version}, this process {}",
                handover::PROTOCOL_VERSION
            ))
        }
        Message::Refused { reason } => return Err(format!("successor refused to start: {reason}")),
        other => return Err(format!("expected hello, got {}", other.name())),
    }
    ch.send(&handover::hello(), &[], &[])
        .await
        .map_err(|e| format!("send hello: {e}"))?;
    let mut entries = Vec::new();
    for (name, slot) in &p.slots {
        let addr = rustix::net::getsockname(&slot.fd)
            .ok()
            .and_then(|a| std::net::SocketAddr::try_from(a).ok())
            .unwrap_or(slot.ctx.cfg.listen);
        entries.push((name.as_str(), addr, slot.ctx.cfg.protocol, slot.fd.as_fd()));
    }
    handover::send_listeners(ch, &entries)
        .await
        .map_err(|e| format!("send listeners: {e}"))?;
    match expect(ch, child, deadline).await?.msg {
        Message::Ready { adopted } => Ok(adopted),
        Message::Refused { reason } => Err(format!("successor refused to start: {reason}")),
        other => Err(format!("expected ready, got {}", other.name())),
    }
}

/// Sends one batch of parked connections and waits for its acknowledgement.
async fn send_batch(
    ch: &mut Channel,
    child: &mut Succ,
    seq: u64,
    batch: &[Parked],
    wait: Duration,
) -> Result<(), String> {
    handover::send_conns(ch, seq, batch)
        .await
        .map_err(|e| format!("send connections: {e}"))?;
    match expect(ch, child, Instant::now() + wait).await?.msg {
        Message::Ack { seq: s, count } if s == seq && count as usize == batch.len() => Ok(()),
        Message::Ack { seq: s, count } => Err(format!(
            "ack for batch {s} ({count}) does not match batch {seq} ({})",
            batch.len()
        )),
        Message::Abort { reason } => Err(format!("successor aborted: {reason}")),
        other => Err(format!("expected ack, got {}", other.name())),
    }
}

/// Collects the connections that park promptly (tunnels, idle HTTP). Ends when every
/// connection asked to park has done so, or only busy HTTP connections (which finish their
/// request here first) remain, bounded by `limit`.
async fn collect_prompt(p: &mut Process, asked: &HashSet<u64>, limit: Duration) -> Vec<Parked> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let waiting = p
            .registry
            .snapshot()
            .into_iter()
            .filter(|c| asked.contains(&c.id))
            // Every connection but HTTP/2 parks wherever it is; h2 ones finish here.
            .any(|c| c.kind() != ConnKind::Http2);
        if !waiting {
            // Take what is already queued, then stop.
            while let Ok(c) = p.parked_rx.try_recv() {
                got.push(c);
            }
            return got;
        }
        tokio::select! {
            Some(c) = p.parked_rx.recv() => got.push(c),
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            _ = tokio::time::sleep_until(deadline) => return got,
        }
    }
}

fn count_kinds(conns: &[Parked], tunnels: &mut usize, idle: &mut usize) {
    for c in conns {
        match c {
            Parked::Tunnel(_) => *tunnels += 1,
            Parked::IdleHttp(_) | Parked::Http(_) => *idle += 1,
        }
    }
}

/// Upgrades to a successor. On success the caller exits; on failure everything is serving
/// here again and the error says why.
pub(super) async fn upgrade(
    p: &mut Process,
    triggers: &mut Triggers,
    reload: bool,
    binary: Option<PathBuf>,
) -> Result<UpgradeReport, String> {
    let started = Instant::now();
    if reload {
        Config::load(&p.opts.config_path)
            .map_err(|e| format!("config refused, nothing changed:\n{e}"))?;
    }
    let binary = binary
        .or_else(|| p.cfg.runtime.binary.clone())
        .unwrap_or_else(|| p.opts.binary.clone());
    let status = p.status();
    p.set_phase(Phase::HandingOver);
    let args: Vec<std::ffi::OsString> = vec![
        "run".into(),
        "-c".into(),
        p.opts.config_path.clone().into_os_string(),
        "--generation".into(),
        (p.opts.generation + 1).to_string().into(),
    ];
    let spawned = match handover::spawn_successor(&binary, &args) {
        Ok(s) => s,
        Err(e) => {
            p.set_phase(Phase::Ready);
            Metrics::inc(&p.metrics.upgrades_failed);
            return Err(format!("cannot start {}: {e}", binary.display()));
        }
    };
    tracing::info!(successor = spawned.child.id(), binary = %binary.display(), "successor started");
    hand_over(
        p,
        triggers,
        Some(spawned.child),
        spawned.channel,
        started,
        status,
    )
    .await
}

/// Hands everything over to a successor the supervisor connected us to through `ch`
/// (multi-process mode: the replacement of this worker). Same protocol as [`upgrade`].
pub(super) async fn upgrade_to_peer(
    p: &mut Process,
    triggers: &mut Triggers,
    ch: Channel,
) -> Result<UpgradeReport, String> {
    let status = p.status();
    p.set_phase(Phase::HandingOver);
    hand_over(p, triggers, None, ch, Instant::now(), status).await
}

/// The upgrade from the handshake on, with the successor started.
async fn hand_over(
    p: &mut Process,
    triggers: &mut Triggers,
    mut child: Succ,
    mut ch: Channel,
    started: Instant,
    status: serde_json::Value,
) -> Result<UpgradeReport, String> {
    let new_pid = child.as_ref().and_then(Child::id).unwrap_or(0);

    // Phase 1: handshake and listeners, then stop accepting here.
    let adopted = match guarded(triggers, &status, prepare(p, &mut ch, &mut child)).await {
        Ok(a) => a,
        Err(e) => return Err(rollback(p, child, &mut ch, Vec::new(), e).await),
    };
    tracing::info!(successor = new_pid, adopted = ?adopted, "successor ready; handing over connections");
    p.pause_listeners().await;

    // Phase 2: park and send every connection that can move now; the successor holds them.
    let adopted: HashSet<String> = adopted.into_iter().collect();
    let asked = p.registry.park_where(|c| adopted.contains(&*c.listener));
    let wait = p.cfg.runtime.upgrade_timeout;
    let prompt = collect_prompt(p, &asked, wait).await;
    let (mut tunnels, mut idle_http) = (0, 0);
    count_kinds(&prompt, &mut tunnels, &mut idle_http);
    let mut seq = 0u64;
    let mut sent_ok = Ok(());
    // Each split batch fits one message (≤253 fds), so each gets exactly one Ack.
    for batch in handover::split_batches(&prompt) {
        seq += 1;
        sent_ok = guarded(
            triggers,
            &status,
            send_batch(&mut ch, &mut child, seq, batch, wait),
        )
        .await;
        if sent_ok.is_err() {
            break;
        }
    }
    if let Err(e) = sent_ok {
        return Err(rollback(p, child, &mut ch, prompt, e).await);
    }
    if let Err(e) = ch.send(&Message::Commit, &[], &[]).await {
        return Err(rollback(p, child, &mut ch, prompt, format!("send commit: {e}")).await);
    }
    // Past the rollback point. The successor answers once it accepts and owns the pid file.
    match expect(&mut ch, &mut child, Instant::now() + wait)
        .await
        .map(|r| r.msg)
    {
        Ok(Message::Ack { seq: 0, .. }) => {}
        Ok(other) => tracing::warn!(got = other.name(), "unexpected answer to commit"),
        Err(e) => tracing::warn!(error = %e, "no answer to commit"),
    }
    // Committed: the successor serves them now; our copies close here.
    drop(prompt);
    tracing::info!(
        successor = new_pid,
        tunnels,
        idle_http,
        "handover committed"
    );

    // Phase 3: finish in-flight requests, handing each connection over once idle.
    p.set_phase(Phase::Draining);
    let drain_deadline = tokio::time::Instant::now() + p.cfg.runtime.drain_timeout;
    let before = p.registry.len();
    let mut late_handed = 0usize;
    let mut closed_at_deadline = 0usize;
    // A connection registered just before accepting paused may have missed the first request.
    let mut repark = tokio::time::interval(Duration::from_millis(100));
    loop {
        let mut batch = Vec::new();
        let mut last = false;
        tokio::select! {
            Some(c) = p.parked_rx.recv() => batch.push(c),
            _ = repark.tick() => {
                p.registry.park_where(|c| adopted.contains(&*c.listener));
            }
            // A parked connection is queued before it leaves the registry, so once the registry
            // is empty everything still to send is in the queue.
            _ = p.registry.wait_empty() => last = true,
            _ = tokio::time::sleep_until(drain_deadline) => {
                closed_at_deadline = p.registry.len();
                tracing::warn!(connections = closed_at_deadline, "drain deadline reached; closing the rest");
                p.registry.kill_all();
                let _ = timeout(Duration::from_secs(1), p.registry.wait_empty()).await;
                last = true;
            }
        }
        while let Ok(more) = p.parked_rx.try_recv() {
            batch.push(more);
        }
        for part in handover::split_batches(&batch) {
            seq += 1;
            match send_batch(&mut ch, &mut child, seq, part, wait).await {
                Ok(()) => {
                    late_handed += part.len();
                    count_kinds(part, &mut tunnels, &mut idle_http);
                }
                Err(e) => {
                    tracing::warn!(error = %e, connections = part.len(), "late handover failed; closing them")
                }
            }
        }
        if last {
            break;
        }
    }
    let finished_in_old = before.saturating_sub(late_handed + closed_at_deadline);
    Metrics::inc(&p.metrics.upgrades_ok);
    p.metrics.record_handover(
        (tunnels + idle_http) as u64,
        finished_in_old as u64,
        closed_at_deadline as u64,
    );
    let listeners = p.slots.len();
    let report = UpgradeReport {
        old_pid: std::process::id(),
        new_pid,
        listeners,
        tunnels,
        idle_http,
        finished_in_old,
        closed_at_deadline,
        millis: started.elapsed().as_millis() as u64,
        // The successor read the same file: what changed goes in the summary.
        changes: Config::load(&p.opts.config_path)
            .ok()
            .map(|new| crate::config::diff(&p.cfg, &new).to_string()),
    };
    p.history.push(UpgradeRecord {
        at_ms: crate::registry::now_ms(),
        ok: true,
        summary: report.summary(),
    });
    let counters = p.metrics.snapshot();
    let history = p
        .history
        .iter()
        .filter_map(|r| serde_json::to_value(r).ok())
        .collect();
    if let Err(e) = ch
        .send(&Message::Done { counters, history }, &[], &[])
        .await
    {
        tracing::warn!(error = %e, "cannot send done to the successor");
    }
    p.close_listeners().await;
    tracing::info!(summary = %report.summary(), "upgrade complete; exiting");
    Ok(report)
}

/// Takes everything back: kills the successor, resumes accepting and serving every parked
/// connection here. Returns the reason, for the caller to report.
async fn rollback(
    p: &mut Process,
    child: Succ,
    ch: &mut Channel,
    held: Vec<Parked>,
    why: String,
) -> String {
    tracing::error!(reason = %why, "upgrade failed; rolling back");
    let _ = timeout(
        Duration::from_millis(200),
        ch.send(
            &Message::Abort {
                reason: why.clone(),
            },
            &[],
            &[],
        ),
    )
    .await;
    if let Some(mut child) = child {
        let _ = child.start_kill();
        let _ = timeout(Duration::from_secs(5), child.wait()).await;
    }
    p.resume_listeners();
    let n = held.len();
    for c in held {
        p.resume_parked(c).await;
    }
    Metrics::inc(&p.metrics.upgrades_failed);
    p.set_phase(Phase::Ready);
    tracing::info!(resumed = n, "rollback complete; serving everything here");
    why
}
