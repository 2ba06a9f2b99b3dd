//! The surfaces baton owns besides its proxy listeners (the control socket, the admin HTTP
//! endpoint) cannot be starved or made to spin: out of file descriptors (the live process's
//! limit lowered with prlimit) every accept loop backs off; idle clients are capped and timed
//! out; an upstream connect failing for lack of fds is not held against the server.
#![allow(clippy::unwrap_used)]
mod common;
use common::*;
use rustix::process::{prlimit, Pid, Resource, Rlimit};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

fn pid_of(b: &Baton) -> Pid {
    Pid::from_raw(b.pid()).unwrap()
}

/// Open file descriptors of `pid`.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The lowest fd number `pid` has free: with the soft limit at it, no fd can be opened (fds
/// are always the lowest free number); one above it, exactly one can.
fn lowest_free_fd(pid: i32) -> u64 {
    let used: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap()
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Linux reports /proc times in USER_HZ, 100 on every architecture baton runs on.
fn ticks_per_second() -> u64 {
    100
}

/// Sets the soft open-file limit of `pid`, keeping the hard one; returns the old soft limit.
fn set_nofile(pid: Pid, soft: u64) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", pid.as_raw_nonzero())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let hard: u64 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
    let old = prlimit(
        Some(pid),
        Resource::Nofile,
        Rlimit {
            current: Some(soft),
            maximum: Some(hard),
        },
    )
    .unwrap();
    old.current.unwrap_or(hard)
}

fn config(backend: std::net::SocketAddr, admin: bool) -> String {
    let admin = if admin {
        "admin:\n  listen: 127.0.0.1:0\n"
    } else {
        ""
    };
    format!(
        "{admin}listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\nupstreams:\n  u:\n    servers: [\"{backend}\"]\n    eject_after: 1\n    eject_for: 1m\n"
    )
}

/// The admin address, from its "listening" log line.
fn admin_addr(b: &Baton) -> std::net::SocketAddr {
    b.addr("admin")
}

async fn status_json(b: &Baton) -> serde_json::Value {
    let config = b.config.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || cli(&config, "status", &["--json"]))
        .await
        .unwrap();
    assert!(ok, "{out}");
    serde_json::from_str(&out).unwrap()
}

/// Sends `req` on a control-socket connection and reads the reply line.
async fn control_exchange(s: &mut UnixStream, req: &[u8]) -> String {
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accept_loop_backs_off_at_emfile() {
    let be = echo_backend("E").await;
    let b = Baton::start(&config(be, true));
    let admin = admin_addr(&b);
    let proxy = b.addr("t");
    let pid = b.pid();
    let sock = b.dir().join("baton.sock");
    // Settle: the first status answer means every loop is up.
    status_json(&b).await;

    // No fd left: every new connection waits in a backlog, each accept fails with EMFILE.
    let old = set_nofile(pid_of(&b), lowest_free_fd(pid));
    let mut ctl = UnixStream::connect(&sock).await.unwrap();
    let mut adm = TcpStream::connect(admin).await.unwrap();
    let _px = TcpStream::connect(proxy).await.unwrap();
    assert!(
        b.log
            .wait_for(&["listener=control", "out of resources, backing off"], WAIT)
            .is_some(),
        "the control socket did not report the EMFILE"
    );
    assert!(
        b.log
            .wait_for(&["listener=admin", "out of resources, backing off"], WAIT)
            .is_some(),
        "the admin endpoint did not report the EMFILE"
    );
    // Backing off, the process is nearly idle; a spinning accept loop takes a core.
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = (cpu_ticks(pid) - c0) as f64 / ticks_per_second() as f64;
    let wall = t0.elapsed().as_secs_f64();
    assert!(
        used < 0.25 * wall,
        "baton used {used:.2}s of CPU in {wall:.2}s while out of fds: an accept loop spins"
    );
    // Warned once a second at most, not once per attempt.
    assert!(b.log.count("listener=control") <= 2 + wall as usize);

    // Fds again: the waiting connections are served.
    set_nofile(pid_of(&b), old);
    let reply = control_exchange(&mut ctl, b"{\"cmd\":\"status\"}\n").await;
    assert!(reply.contains("\"ok\":true"), "{reply}");
    adm.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    adm.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_emfile_is_not_held_against_the_server() {
    let be = echo_backend("E").await;
    let b = Baton::start(&config(be, false));
    let proxy = b.addr("t");
    status_json(&b).await;
    // One fd left: the accept takes it, the upstream connect then fails with EMFILE. An fd
    // baton was still closing (the status connection) may leave a second one free: then the
    // client is served, and the next try starts from the new count.
    let mut old = None;
    let mut served = Vec::new();
    let closed = loop {
        let prev = set_nofile(pid_of(&b), lowest_free_fd(b.pid()) + 1);
        old.get_or_insert(prev);
        let mut c = TcpStream::connect(proxy).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(WAIT, c.read(&mut buf))
            .await
            .expect("client neither served nor closed")
            .unwrap_or(0);
        if n == 0 {
            break true;
        }
        served.push(c);
        if served.len() == 5 {
            break false;
        }
    };
    assert!(closed, "the client should be closed without a server");
    let old = old.unwrap();
    assert!(
        b.log
            .wait_for(&["no server connected", "out of local resources"], WAIT)
            .is_some(),
        "the close does not say why"
    );
    set_nofile(pid_of(&b), old);
    let v = status_json(&b).await;
    let s = &v["upstreams"]["u"][0];
    assert_eq!(s["ejected"], false, "{s}");
    assert_eq!(s["failures"], 0, "{s}");
    // eject_after is 1: had the failure counted, this client would find no server.
    let (_c, g) = greeting(proxy, 1).await;
    assert_eq!(g, "E");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_clients_are_capped_and_timed_out() {
    let be = echo_backend("E").await;
    let b = Baton::start(&config(be, true));
    let admin = admin_addr(&b);
    let proxy = b.addr("t");
    status_json(&b).await;
    let before = open_fds(b.pid());
    // Far more idle clients than the cap: the rest wait in the backlog, not in baton.
    let mut held = Vec::new();
    for _ in 0..200 {
        held.push(TcpStream::connect(admin).await.unwrap());
    }
    // `before` may still count the status client's connection (it closes on baton's side a
    // moment later), so "took its 64" allows for that one.
    let ok = wait_until(WAIT, || open_fds(b.pid()) >= before + 63).await;
    assert!(ok, "the admin endpoint did not take its 64 connections");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = open_fds(b.pid());
    assert!(
        during <= before + 64 + 4,
        "{during} fds with 200 idle admin clients (was {before}): no cap"
    );
    // The proxy is not starved meanwhile.
    let (tunnel, g) = greeting(proxy, 1).await;
    assert_eq!(g, "E");
    // Closed now, so its two fds in baton do not count against the final check below.
    drop(tunnel);
    // Idle clients are closed after the header timeout, and the queued ones get their turn.
    let mut first = held.remove(0);
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(30), first.read(&mut buf))
        .await
        .expect("an idle admin connection was never closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    drop(held);
    let ok = wait_until(Duration::from_secs(30), || open_fds(b.pid()) <= before + 2).await;
    assert!(
        ok,
        "admin connections left open after their clients went away"
    );
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_caps_idle_clients_times_them_out_and_limits_lines() {
    let be = echo_backend("E").await;
    let b = Baton::start(&config(be, false));
    let sock = b.dir().join("baton.sock");
    status_json(&b).await;
    let before = open_fds(b.pid());
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(UnixStream::connect(&sock).await.unwrap());
    }
    // `before` may still count the status client's connection (it closes on baton's side a
    // moment later), so "took its 32" allows for that one.
    let ok = wait_until(WAIT, || open_fds(b.pid()) >= before + 31).await;
    assert!(ok, "the control socket did not take its 32 connections");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = open_fds(b.pid());
    assert!(
        during <= before + 32 + 4,
        "{during} fds with 100 idle control clients (was {before}): no cap"
    );
    // A silent client is told why it is dropped.
    let mut first = held.remove(0);
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(30), first.read_to_string(&mut out))
        .await
        .expect("an idle control client was never answered")
        .unwrap();
    assert!(out.contains("no request line within 5s"), "{out}");
    drop(held);
    // A request line past the cap is refused, not buffered.
    let mut s = UnixStream::connect(&sock).await.unwrap();
    let long = vec![b'x'; 70 * 1024];
    let reply = tokio::time::timeout(Duration::from_secs(30), async {
        let _ = s.write_all(&long).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap();
    assert!(reply.contains("request line longer than 64 KiB"), "{reply}");
    // And the socket still serves.
    let v = status_json(&b).await;
    assert_eq!(v["pid"], b.pid());
}
