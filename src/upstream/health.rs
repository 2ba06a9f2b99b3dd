//! Active health checks: probing each server every `interval`, and the rise/fall state machine
//! that turns a run of results into healthy/unhealthy transitions.
//!
//! One task per server probes it (a TCP connect, or a tiny hand-written HTTP/1.1 `GET` whose
//! status line must be 2xx or 3xx), feeds the result to its [`HealthState`], and on a
//! transition flips the server's `healthy` flag, counts it on the pool and logs it (info when a
//! server comes back, warn when it goes). Tasks hold only a weak reference to their pool, so a
//! dropped pool stops its checks, and each stops at once on shutdown. The pool's [`Checks`]
//! keeps one stop token per server address, so the tasks follow a server set that changes
//! (DNS discovery): a task starts for each added server and stops when its server is removed.
//!
//! For an upstream with `tls:` a check speaks TLS as the proxy would: the handshake, with the
//! same verification, SNI and client certificate, is part of every check (a server whose
//! certificate no longer verifies is marked down, as HAProxy's `check ssl` does), and the
//! HTTP check's `GET` goes over it, with the server name as its Host.

use super::{ServerState, Upstream};
use crate::config::{CheckKind, HealthCheck};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// A change of a server's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// `rise` consecutive successes brought an unhealthy server back.
    Up,
    /// `fall` consecutive failures took a healthy server out.
    Down,
}

/// The rise/fall state machine of one server. Servers start healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    /// Whether the server is healthy now.
    pub healthy: bool,
    /// Consecutive results that disagree with `healthy` (successes while unhealthy, failures
    /// while healthy); a result that agrees resets it.
    streak: u32,
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState {
            healthy: true,
            streak: 0,
        }
    }
}

impl HealthState {
    /// Records one check result; returns the transition it caused, if any.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Transition> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy { fall } else { rise };
        if self.streak < needed.max(1) {
            return None;
        }
        self.healthy = ok;
        self.streak = 0;
        Some(if ok { Transition::Up } else { Transition::Down })
    }
}

/// Why a check failed, in words for the log.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    /// The check did not finish within its timeout.
    #[error("check timed out after {0:?}")]
    Timeout(Duration),
    /// Connecting, writing or reading failed.
    #[error("{0}")]
    Io(String),
    /// The TLS handshake failed (the server's certificate refused, a server without TLS).
    #[error("tls handshake: {0}")]
    Tls(String),
    /// This process is out of file descriptors or memory: says nothing about the server, so
    /// the check is not counted.
    #[error("out of local resources: {0}")]
    Local(String),
    /// The server answered something that is not an HTTP/1.x status line.
    #[error("malformed status line")]
    Malformed,
    /// The server answered with a status other than 2xx/3xx.
    #[error("status {0}")]
    Status(u16),
}

/// Runs one check of `addr` within `timeout`, in plain TCP.
pub async fn check(
    kind: &CheckKind,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(), CheckError> {
    check_on(kind, addr, timeout, None).await
}

/// Runs one check of `addr`, a server of `up`, within `timeout`: over TLS if `up` has `tls:`.
pub async fn check_on(
    kind: &CheckKind,
    addr: SocketAddr,
    timeout: Duration,
    up: Option<&Upstream>,
) -> Result<(), CheckError> {
    let probe = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| {
            if crate::listener::is_resource_exhaustion(&e) {
                CheckError::Local(e.to_string())
            } else {
                CheckError::Io(format!("connect: {e}"))
            }
        })?;
        let Some(up) = up.filter(|u| u.is_tls()) else {
            return match kind {
                CheckKind::Tcp => Ok(()),
                CheckKind::Http { path } => http_probe(&mut s, &addr.to_string(), path).await,
            };
        };
        let host = up.host_of(addr);
        let mut t = up
            .start_tls(s, host.as_deref())
            .await
            .map_err(|e| CheckError::Tls(e.to_string()))?;
        let r = match kind {
            CheckKind::Tcp => Ok(()),
            CheckKind::Http { path } => {
                let name = up.config().tls.as_ref().and_then(|t| t.server_name.clone());
                let host = name.or(host).unwrap_or_else(|| addr.to_string());
                http_probe(&mut t, &host, path).await
            }
        };
        // close_notify, so the server sees a clean end rather than a truncation.
        let _ = t.shutdown().await;
        r
    };
    tokio::time::timeout(timeout, probe)
        .await
        .unwrap_or(Err(CheckError::Timeout(timeout)))
}

/// Longest status line read before giving up on it.
const MAX_STATUS_LINE: usize = 1024;

async fn http_probe<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    path: &str,
) -> Result<(), CheckError> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: baton-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| CheckError::Io(format!("write: {e}")))?;
    let mut buf = [0u8; MAX_STATUS_LINE];
    let mut len = 0;
    loop {
        if let Some(end) = buf[..len].windows(2).position(|w| w == b"\r\n") {
            return status_ok(&buf[..end]);
        }
        if len == buf.len() {
            return Err(CheckError::Malformed);
        }
        let n = s
            .read(&mut buf[len..])
            .await
            .map_err(|e| CheckError::Io(format!("read: {e}")))?;
        if n == 0 {
            return Err(if len == 0 {
                CheckError::Io("closed without a response".into())
            } else {
                CheckError::Malformed
            });
        }
        len += n;
    }
}

/// Parses `HTTP/1.x NNN reason` and accepts 2xx and 3xx.
pub fn status_ok(line: &[u8]) -> Result<(), CheckError> {
    let rest = line.strip_prefix(b"HTTP/1.").ok_or(CheckError::Malformed)?;
    let code = match rest {
        [b'0' | b'1', b' ', a, b, c, ..] if [a, b, c].iter().all(|d| d.is_ascii_digit()) => {
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => return Err(CheckError::Malformed),
    };
    match code {
        200..=399 => Ok(()),
        _ => Err(CheckError::Status(code)),
    }
}

/// A pool's checking tasks: one per server address, each with its own stop token.
#[derive(Debug, Default)]
pub struct Checks {
    /// Set once the checks are started; `None` means the pool has no checks (yet).
    started: Option<Started>,
    /// The stop token of each server's task, by address.
    tasks: HashMap<SocketAddr, CancellationToken>,
}

/// What every task of a pool shares.
#[derive(Debug)]
struct Started {
    /// The pool, weak so that a dropped pool ends its checks.
    up: Weak<Upstream>,
    /// The check's settings.
    hc: HealthCheck,
    /// Stops every task (each task's token is a child of it).
    shutdown: CancellationToken,
}

impl Checks {
    /// Turns checking on for `up` with settings `hc` until `shutdown`; tasks start at the next
    /// [`Checks::follow`]. A second call is ignored.
    pub fn start(&mut self, up: &Arc<Upstream>, hc: &HealthCheck, shutdown: CancellationToken) {
        if self.started.is_none() {
            self.started = Some(Started {
                up: Arc::downgrade(up),
                hc: hc.clone(),
                shutdown,
            });
        }
    }

    /// Makes the tasks match `servers`: starts one for each server without one, stops those
    /// of servers no longer listed. Does nothing before [`Checks::start`].
    pub fn follow(&mut self, servers: &[Arc<ServerState>]) {
        let Some(st) = &self.started else { return };
        self.tasks.retain(|addr, stop| {
            let keep = servers.iter().any(|s| s.addr == *addr) && !stop.is_cancelled();
            if !keep {
                stop.cancel();
            }
            keep
        });
        for s in servers {
            if self.tasks.contains_key(&s.addr) {
                continue;
            }
            let stop = st.shutdown.child_token();
            self.tasks.insert(s.addr, stop.clone());
            let task = CheckTask {
                up: st.up.clone(),
                addr: s.addr,
                hc: st.hc.clone(),
                stop,
            };
            tokio::spawn(task.run());
        }
    }

    /// The addresses being checked now.
    pub fn checked(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self.tasks.keys().copied().collect();
        v.sort();
        v
    }
}

/// What one server's checking task needs.
struct CheckTask {
    /// The pool, weak so that a dropped pool ends its checks.
    up: Weak<Upstream>,
    /// The server checked. Its state is looked up in the pool at each transition, so a state
    /// replaced by a swap of the set is the one updated.
    addr: SocketAddr,
    /// The check's settings.
    hc: HealthCheck,
    /// Stops the task: on shutdown, or when its server leaves the set.
    stop: CancellationToken,
}

impl CheckTask {
    async fn run(self) {
        let mut ticker = tokio::time::interval(self.hc.interval);
        // A slow check delays the next one rather than bunching checks up after it.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut state = HealthState::default();
        let addr = self.addr;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let Some(up) = self.up.upgrade() else { return };
            let result = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = check_on(&self.hc.kind, addr, self.hc.timeout, Some(&*up)) => r,
            };
            if let Err(e) = &result {
                if matches!(e, CheckError::Local(_)) {
                    tracing::debug!(upstream = %up.name(), server = %addr, reason = %e, "health check not counted");
                    continue;
                }
                tracing::debug!(upstream = %up.name(), server = %addr, reason = %e, "health check failed");
            }
            let ok = result.is_ok();
            let Some(transition) = state.record(ok, self.hc.rise, self.hc.fall) else {
                continue;
            };
            let Some(server) = up.find(addr) else {
                // Removed from the set while this check ran; the task is being stopped.
                return;
            };
            match transition {
                Transition::Down => {
                    server.healthy.store(false, Ordering::Relaxed);
                    up.counters.marked_down.fetch_add(1, Ordering::Relaxed);
                    if let Some(m) = up.metrics() {
                        m.health_transition(false);
                    }
                    let reason = result.err().map(|e| e.to_string()).unwrap_or_default();
                    tracing::warn!(upstream = %up.name(), server = %addr, reason = %reason, checks = self.hc.fall, "server marked unhealthy");
                }
                Transition::Up => {
                    server.healthy.store(true, Ordering::Relaxed);
                    up.counters.marked_up.fetch_add(1, Ordering::Relaxed);
                    if let Some(m) = up.metrics() {
                        m.health_transition(true);
                    }
                    tracing::info!(upstream = %up.name(), server = %addr, reason = "health checks passed", checks = self.hc.rise, "server marked healthy");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn run(
        state: &mut HealthState,
        results: &[bool],
        rise: u32,
        fall: u32,
    ) -> Vec<Option<Transition>> {
        results
            .iter()
            .map(|&ok| state.record(ok, rise, fall))
            .collect()
    }

    #[test]
    fn starts_healthy_and_falls_after_fall_consecutive_failures() {
        let mut s = HealthState::default();
        assert!(s.healthy);
        let t = run(&mut s, &[false, false, true, false, false, false], 2, 3);
        // The success in the middle resets the count: only the third failure in a row counts.
        assert_eq!(
            t,
            vec![None, None, None, None, None, Some(Transition::Down)]
        );
        assert!(!s.healthy);
    }

    #[test]
    fn rises_after_rise_consecutive_successes() {
        let mut s = HealthState::default();
        run(&mut s, &[false], 2, 1);
        assert!(!s.healthy);
        let t = run(&mut s, &[true, false, true, true, true], 2, 1);
        assert_eq!(t, vec![None, None, None, Some(Transition::Up), None]);
        assert!(s.healthy);
    }

    #[test]
    fn rise_and_fall_of_one_flip_at_once() {
        let mut s = HealthState::default();
        assert_eq!(s.record(false, 1, 1), Some(Transition::Down));
        assert_eq!(s.record(false, 1, 1), None);
        assert_eq!(s.record(true, 1, 1), Some(Transition::Up));
        assert_eq!(s.record(true, 1, 1), None);
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_ok(b"HTTP/1.1 200 OK"), Ok(()));
        assert_eq!(status_ok(b"HTTP/1.0 302 Found"), Ok(()));
        assert_eq!(status_ok(b"HTTP/1.1 399"), Ok(()));
        assert_eq!(
            status_ok(b"HTTP/1.1 503 Service Unavailable"),
            Err(CheckError::Status(503))
        );
        assert_eq!(status_ok(b"HTTP/1.1 199 x"), Err(CheckError::Status(199)));
        assert_eq!(status_ok(b"HTTP/2 200"), Err(CheckError::Malformed));
        assert_eq!(status_ok(b"AGET / HTTP/1.1"), Err(CheckError::Malformed));
        assert_eq!(status_ok(b"HTTP/1.1 2x0 OK"), Err(CheckError::Malformed));
        assert_eq!(status_ok(b""), Err(CheckError::Malformed));
    }

    /// A one-shot HTTP server on 127.0.0.1 that answers `response` and returns the request.
    async fn one_shot(response: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 512];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(response).await.unwrap();
            String::from_utf8(req).unwrap()
        });
        (addr, h)
    }

    #[tokio::test]
    async fn http_check_against_real_sockets() {
        let kind = CheckKind::Http {
            path: "/healthz".into(),
        };
        let t = Duration::from_secs(10);
        let (addr, h) = one_shot(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(check(&kind, addr, t).await, Ok(()));
        let req = h.await.unwrap();
        assert!(req.starts_with("GET /healthz HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("\r\nHost: {addr}\r\n")), "{req}");
        assert!(req.contains("\r\nConnection: close\r\n"), "{req}");

        let (addr, _h) = one_shot(b"HTTP/1.1 500 Internal Server Error\r\n\r\n").await;
        assert_eq!(check(&kind, addr, t).await, Err(CheckError::Status(500)));

        let (addr, _h) = one_shot(b"SSH-2.0-OpenSSH\r\n").await;
        assert_eq!(check(&kind, addr, t).await, Err(CheckError::Malformed));
    }

    #[tokio::test]
    async fn tcp_check_against_real_sockets() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(
            check(&CheckKind::Tcp, addr, Duration::from_secs(10)).await,
            Ok(())
        );
        drop(l);
        assert!(matches!(
            check(&CheckKind::Tcp, addr, Duration::from_secs(10)).await,
            Err(CheckError::Io(_))
        ));
    }

    #[tokio::test]
    async fn http_check_times_out_on_a_silent_server() {
        // Accepts (the kernel completes the handshake from the backlog) but never answers.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let kind = CheckKind::Http { path: "/".into() };
        let r = check(&kind, addr, Duration::from_millis(200)).await;
        assert_eq!(r, Err(CheckError::Timeout(Duration::from_millis(200))));
        drop(l);
    }
}
