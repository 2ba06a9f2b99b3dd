//! Upstream pools through the real binary: weighted balancing, failover, active health checks,
//! passive ejection and fail-open, observed from what clients receive and from baton's log.
//!
//! The runtime is multi-threaded because `LogLines::wait_for` blocks the test's thread: the
//! backends, which run on the test's runtime, must keep serving meanwhile.
#![allow(clippy::unwrap_used)]
mod common;
use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A config with one TCP listener `t` in front of upstream `u`, whose extra keys are `extra`
/// (already indented by four spaces).
fn config(servers: &[(SocketAddr, u32)], extra: &str) -> String {
    let mut s = String::from("listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\nupstreams:\n  u:\n    servers:\n");
    for (addr, w) in servers {
        s.push_str(&format!("      - {{ addr: \"{addr}\", weight: {w} }}\n"));
    }
    s.push_str(extra);
    s
}

/// Whether a log line carries `key=value` as a whole field.
fn has_field(line: &str, key: &str, value: impl std::fmt::Display) -> bool {
    let f = format!(" {key}={value}");
    line.contains(&format!("{f} ")) || line.ends_with(&f)
}

/// Log lines containing `msg` whose `server` field is `addr`, in log order, with their index.
fn lines_about(b: &Baton, msg: &str, addr: SocketAddr) -> Vec<(usize, String)> {
    b.log
        .all()
        .into_iter()
        .enumerate()
        .filter(|(_, l)| l.contains(msg) && has_field(l, "server", addr))
        .collect()
}

/// The wall-clock time (seconds since the epoch) of the RFC 3339 timestamp
/// (`2026-12-01T08:09:03.561Z`) that starts every text log line.
fn ts(line: &str) -> f64 {
    let t = line.split(' ').next().unwrap();
    let n = |r: std::ops::Range<usize>| t[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from 1970-01-01 to y-m-d (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19);
    secs as f64 + n(20..23) as f64 / 1000.0
}

/// A backend that can stop listening and listen again on the same port.
struct Switchable {
    addr: SocketAddr,
    name: &'static str,
    task: Option<JoinHandle<()>>,
}

impl Switchable {
    async fn start(name: &'static str) -> Switchable {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        Switchable {
            addr,
            name,
            task: Some(tokio::spawn(serve(l, name))),
        }
    }

    /// Closes the listening socket (connections already accepted are left alone).
    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens again on the same port.
    async fn restart(&mut self) {
        let l = TcpListener::bind(self.addr).await.unwrap();
        self.task = Some(tokio::spawn(serve(l, self.name)));
    }
}

async fn serve(l: TcpListener, name: &'static str) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            break;
        };
        tokio::spawn(async move {
            let _ = s.write_all(name.as_bytes()).await;
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// Makes one more client and waits until baton has logged its close: the log is a pipe read
/// in order, so every line about earlier clients has been read by then.
async fn settle(b: &Baton, addr: SocketAddr) {
    let (s, _) = greeting(addr, 1).await;
    let me = s.local_addr().unwrap();
    drop(s);
    let l = b
        .log
        .wait_for(&["connection closed", &format!("client={me} ")], WAIT);
    assert!(l.is_some(), "close of {me} not logged");
}

/// One client through baton: the name of the backend that greeted it.
async fn who(addr: SocketAddr) -> String {
    greeting(addr, 1).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_follows_weights_across_three_backends() {
    let (a, b2, c) = (
        echo_backend("A").await,
        echo_backend("B").await,
        echo_backend("C").await,
    );
    let b = Baton::start(&config(
        &[(a, 3), (b2, 2), (c, 1)],
        "    balance: round_robin\n",
    ));
    let addr = b.addr("t");
    let mut seen = Vec::new();
    for _ in 0..60 {
        seen.push(who(addr).await);
    }
    let t = tally(seen.iter().map(String::as_str));
    // Smooth weighted round robin is exact over whole cycles of 6.
    assert_eq!(
        (t.get("A"), t.get("B"), t.get("C")),
        (Some(&30), Some(&20), Some(&10)),
        "{t:?}"
    );
    // Smooth: the heaviest server never gets more than two in a row with weights 3:2:1.
    assert!(
        !seen.windows(3).any(|w| w.iter().all(|s| s == "A")),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_reaches_a_live_server_when_one_is_down() {
    let (a, c) = (echo_backend("A").await, echo_backend("C").await);
    let dead = dead_addr();
    // No ejection: every round of the round robin meets the dead server and must retry.
    let b = Baton::start(&config(
        &[(dead, 1), (a, 1), (c, 1)],
        "    retries: 2\n    eject_after: 0\n",
    ));
    let addr = b.addr("t");
    let mut seen = Vec::new();
    for _ in 0..30 {
        seen.push(who(addr).await);
    }
    let t = tally(seen.iter().map(String::as_str));
    assert_eq!(
        t.get("A").unwrap_or(&0) + t.get("C").unwrap_or(&0),
        30,
        "{t:?}"
    );
    assert!(t.contains_key("A") && t.contains_key("C"), "{t:?}");
    // The dead server really was chosen and failed over from, repeatedly.
    assert!(lines_about(&b, "connect attempt failed", dead).len() >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_check_removes_and_restores_a_backend() {
    let (a, b2) = (echo_backend("A").await, echo_backend("B").await);
    let mut c = Switchable::start("C").await;
    let b = Baton::start(&config(
        &[(a, 1), (b2, 1), (c.addr, 1)],
        "    retries: 2\n    eject_after: 0\n    health_check:\n      kind: tcp\n      interval: 100ms\n      timeout: 1s\n      rise: 2\n      fall: 2\n",
    ));
    let addr = b.addr("t");
    assert!(
        wait_for_greeting(addr, "C").await,
        "C never reached before it stopped"
    );

    c.stop().await;
    let down = b.log.wait_for(
        &["server marked unhealthy", &format!("server={}", c.addr)],
        WAIT,
    );
    let down = down.expect("no unhealthy transition for C");
    assert!(
        down.contains("WARN") && down.contains("upstream=u") && down.contains("reason="),
        "{down}"
    );
    // From now on no client is even tried on C: every one reaches A or B at the first attempt.
    let attempts_before = lines_about(&b, "connect attempt failed", c.addr).len();
    for _ in 0..30 {
        let g = who(addr).await;
        assert!(g == "A" || g == "B", "{g}");
    }
    settle(&b, addr).await;
    assert_eq!(
        lines_about(&b, "connect attempt failed", c.addr).len(),
        attempts_before
    );

    c.restart().await;
    let up = b.log.wait_for(
        &["server marked healthy", &format!("server={}", c.addr)],
        WAIT,
    );
    let up = up.expect("no healthy transition for C");
    assert!(up.contains("INFO") && up.contains("upstream=u"), "{up}");
    assert!(
        wait_for_greeting(addr, "C").await,
        "traffic did not return to C"
    );
}

/// Connects until a client is greeted by `name` (bounded by WAIT).
async fn wait_for_greeting(addr: SocketAddr, name: &str) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if who(addr).await == name {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_skips_a_failing_server_for_eject_for() {
    let a = echo_backend("A").await;
    let dead = dead_addr();
    let b = Baton::start(&config(
        &[(dead, 1), (a, 1)],
        "    retries: 1\n    eject_after: 3\n    eject_for: 1s\n",
    ));
    let addr = b.addr("t");
    // Clients until the dead server has been ejected, returned, and (on probation) ejected again.
    let deadline = Instant::now() + WAIT;
    let mut clients = 0;
    while lines_about(&b, "server ejected", dead).len() < 2 {
        assert!(Instant::now() < deadline, "no second ejection");
        assert_eq!(
            who(addr).await,
            "A",
            "a client did not reach the live server"
        );
        clients += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ejected = lines_about(&b, "server ejected", dead);
    let failed = lines_about(&b, "connect attempt failed", dead);
    let returned = lines_about(&b, "server returned from ejection", dead);
    let (e1, e2) = (&ejected[0], &ejected[1]);
    assert!(
        e1.1.contains("WARN") && has_field(&e1.1, "failures", 3),
        "{}",
        e1.1
    );
    // Exactly eject_after failures before the first ejection, then one on probation.
    assert_eq!(failed.iter().filter(|(i, _)| *i < e1.0).count(), 3);
    assert_eq!(
        failed
            .iter()
            .filter(|(i, _)| *i > e1.0 && *i < e2.0)
            .count(),
        1
    );
    assert_eq!(returned.len(), 1);
    assert!(e1.0 < returned[0].0 && returned[0].0 < e2.0);
    // While ejected, nothing was attempted on it: the next attempt is at least eject_for later
    // (100 ms allowance for the log's millisecond timestamps and clock reads).
    let next = failed.iter().find(|(i, _)| *i > e1.0).unwrap();
    assert!(
        ts(&next.1) - ts(&e1.1) >= 0.9,
        "attempt {} s after ejection",
        ts(&next.1) - ts(&e1.1)
    );
    assert!(clients > 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_open_when_every_server_is_down() {
    // Echo backends answer an HTTP check with their greeting, not a status line, so the HTTP
    // health check marks both down while they still accept and serve TCP clients.
    let (a, b2) = (echo_backend("A").await, echo_backend("B").await);
    let b = Baton::start(&config(
        &[(a, 1), (b2, 1)],
        "    health_check:\n      kind: http\n      path: /healthz\n      interval: 100ms\n      timeout: 1s\n      rise: 2\n      fall: 1\n",
    ));
    let addr = b.addr("t");
    for s in [a, b2] {
        let l = b
            .log
            .wait_for(&["server marked unhealthy", &format!("server={s}")], WAIT);
        assert!(l
            .expect("server not marked down")
            .contains("malformed status line"));
    }
    let start = Instant::now();
    let mut seen = Vec::new();
    for _ in 0..40 {
        seen.push(who(addr).await);
    }
    let t = tally(seen.iter().map(String::as_str));
    assert_eq!(t.get("A"), Some(&20), "{t:?}");
    assert_eq!(t.get("B"), Some(&20), "{t:?}");
    settle(&b, addr).await;
    let elapsed = start.elapsed();
    let warnings = b.log.count("failing open");
    assert!(warnings >= 1);
    // Rate limited to one a second.
    assert!(
        warnings as u64 <= elapsed.as_secs() + 1,
        "{warnings} warnings in {elapsed:?}"
    );
}
