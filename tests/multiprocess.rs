//! Multi-process mode, end to end: a real supervisor and real worker processes, real signals
//! (kill -9, SIGSTOP), real sockets. What a client sees is what is checked: clients on a
//! surviving worker never notice, new connections are always accepted, tunnels survive a
//! rolling upgrade byte for byte, and the supervisor's pid never changes.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::supervisor::*;
use common::*;
use rustix::process::{kill_process, Pid, Signal};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config_text(backend: std::net::SocketAddr) -> String {
    config(backend, "")
}

fn config(backend: std::net::SocketAddr, runtime: &str) -> String {
    format!(
        "runtime:\n  workers: 2\n  drain_timeout: 5s\n  upgrade_timeout: 10s\n{runtime}listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\nupstreams:\n  u:\n    servers: [\"{backend}\"]\n"
    )
}

/// Whether a process is gone and reaped (no /proc entry, not even a zombie).
fn reaped(pid: i32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn signal(pid: i32, sig: Signal) {
    kill_process(Pid::from_raw(pid).unwrap(), sig).unwrap();
}

/// Stops the supervisor gracefully and checks it exits 0 with its workers.
fn stop(mut b: Baton, workers: &[i32]) {
    b.signal(Signal::TERM);
    assert_eq!(b.wait_exit(WAIT), Some(0), "supervisor exit code");
    for w in workers {
        assert!(!alive(*w), "worker {w} outlived its supervisor");
    }
}

/// A client making short connections in a loop (connect, echo one line, close) until `stop`;
/// every one must succeed. Returns how many it made.
async fn short_connections(
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    made: Arc<AtomicU64>,
) -> Result<u64, String> {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let line = format!("short {n}\n");
        let one = async {
            let mut s = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            s.write_all(line.as_bytes())
                .await
                .map_err(|e| format!("write: {e}"))?;
            let mut buf = vec![0u8; line.len()];
            s.read_exact(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if buf != line.as_bytes() {
                return Err(format!("got {:?}", String::from_utf8_lossy(&buf)));
            }
            Ok::<(), String>(())
        };
        tokio::time::timeout(WAIT, one)
            .await
            .map_err(|_| format!("short connection {n} timed out"))?
            .map_err(|e| format!("short connection {n}: {e}"))?;
        n += 1;
        made.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_worker_leaves_the_other_workers_clients_untouched() {
    let be = echo_backend("").await;
    // reuseport: the kernel spreads clients over both workers' sockets, and the killed
    // worker's socket (kept by the supervisor) queues new connections for its replacement.
    let b = Baton::start(&config(be, "  accept: reuseport\n"));
    let addr = b.addr("t");
    let s0 = two_serving(&b).await;
    let victim = worker_pid(&s0, 0).unwrap();
    let survivor = worker_pid(&s0, 1).unwrap();

    let stop_long = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let stop = stop_long.clone();
            tokio::spawn(async move {
                let s = TcpStream::connect(addr).await.unwrap();
                numbered_echo(s, i, stop).await
            })
        })
        .collect();
    // Where did they land? The heartbeat counters say.
    let placed = wait_status(&b, "20 clients accepted", |s| {
        accepted(s, 0) + accepted(s, 1) == 20
    })
    .await;
    let (on_victim, on_survivor) = (accepted(&placed, 0), accepted(&placed, 1));
    eprintln!("clients on the victim: {on_victim}, on the survivor: {on_survivor}");
    assert!(
        on_survivor > 0 && on_victim > 0,
        "reuseport spread the clients: {placed:#}"
    );

    let stop_short = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let short = tokio::spawn(short_connections(addr, stop_short.clone(), made.clone()));
    assert!(wait_until(WAIT, || made.load(Ordering::Relaxed) >= 5).await);

    signal(victim, Signal::KILL);
    let started = b
        .log
        .wait_for(&["worker started", "index=0", "generation=1"], WAIT)
        .and_then(|_| {
            // The line of the replacement, not of the first start.
            let deadline = std::time::Instant::now() + WAIT;
            loop {
                if b.log.count("worker started") >= 3 {
                    return Some(());
                }
                if std::time::Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    assert!(started.is_some(), "replacement worker started");
    let after = wait_status(&b, "replacement serving", |s| {
        worker_pid(s, 0).is_some_and(|p| p != victim) && s["workers"][0]["state"] == "serving"
    })
    .await;
    assert_eq!(after["workers"][0]["restarts"], 1);
    assert_eq!(
        worker_pid(&after, 1),
        Some(survivor),
        "the other worker is untouched"
    );

    // New connections keep working and reach the replacement too.
    let before = made.load(Ordering::Relaxed);
    assert!(wait_until(WAIT, || made.load(Ordering::Relaxed) >= before + 30).await);
    wait_status(&b, "the replacement accepts", |s| accepted(s, 0) > 0).await;
    stop_short.store(true, Ordering::Relaxed);
    let n = short.await.unwrap().unwrap();
    assert!(n > 30);

    stop_long.store(true, Ordering::Relaxed);
    let mut ok = 0;
    let mut failed = 0;
    for c in clients {
        match c.await.unwrap() {
            Ok(rounds) => {
                assert!(rounds > 0);
                ok += 1;
            }
            Err(e) => {
                eprintln!("client on the killed worker: {e}");
                failed += 1;
            }
        }
    }
    assert_eq!(
        ok, on_survivor,
        "every client of the surviving worker kept its tunnel"
    );
    assert_eq!(
        failed, on_victim,
        "only the killed worker's clients lost their tunnel"
    );
    let pids = [worker_pid(&after, 0).unwrap(), survivor];
    stop(b, &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_is_replaced_after_missed_heartbeats() {
    let be = echo_backend("").await;
    let b = Baton::start(&config(be, ""));
    let addr = b.addr("t");
    let s0 = two_serving(&b).await;
    let frozen = worker_pid(&s0, 1).unwrap();
    signal(frozen, Signal::STOP);
    assert!(
        b.log
            .wait_for(
                &[
                    "worker missed its heartbeats",
                    &format!("worker_pid={frozen}")
                ],
                WAIT
            )
            .is_some(),
        "missed heartbeats detected"
    );
    let after = wait_status(&b, "replacement serving", |s| {
        worker_pid(s, 1).is_some_and(|p| p != frozen) && s["workers"][1]["state"] == "serving"
    })
    .await;
    assert_eq!(after["workers"][1]["missed_heartbeat_kills"], 1);
    assert!(
        wait_until(WAIT, || !alive(frozen)).await,
        "the frozen worker is gone"
    );
    // The service still answers.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"ping\n").await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping\n");
    let pids = [
        worker_pid(&after, 0).unwrap(),
        worker_pid(&after, 1).unwrap(),
    ];
    stop(b, &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_two_workers_keeps_every_tunnel_and_the_supervisor_pid() {
    let be = echo_backend("").await;
    let b = Baton::start(&config(be, ""));
    let addr = b.addr("t");
    let supervisor = b.pid();
    let s0 = two_serving(&b).await;
    let old: Vec<i32> = (0..2).map(|i| worker_pid(&s0, i).unwrap()).collect();
    let stop_long = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..30)
        .map(|i| {
            let stop = stop_long.clone();
            tokio::spawn(async move {
                let s = TcpStream::connect(addr).await.unwrap();
                numbered_echo(s, i, stop).await
            })
        })
        .collect();
    let stop_short = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let short = tokio::spawn(short_connections(addr, stop_short.clone(), made.clone()));
    wait_status(&b, "clients accepted", |s| {
        accepted(s, 0) + accepted(s, 1) >= 30
    })
    .await;

    for round in 0..2 {
        let (ok, out) = upgrade_async(&b.config).await;
        assert!(ok, "upgrade {round}: {out}");
        assert!(out.contains("2 workers replaced"), "upgrade {round}: {out}");
        assert_eq!(b.serving_pid(), supervisor, "pid file names the supervisor");
        assert!(alive(supervisor));
    }
    // The supervisor re-executed itself after each round: same pid, new generation.
    let after = wait_status(&b, "supervisor re-executed twice", |s| {
        s["supervisor_generation"] == 3
    })
    .await;
    assert_eq!(after["pid"], supervisor as i64);
    assert_eq!(after["generation"], 3);
    assert_eq!(b.log.count("supervisor resumed after re-exec"), 2);
    let new: Vec<i32> = (0..2).map(|i| worker_pid(&after, i).unwrap()).collect();
    for p in &old {
        assert!(!new.contains(p));
        // Reaped by the re-executed supervisor (not left a zombie).
        assert!(
            wait_until(WAIT, || reaped(*p)).await,
            "old worker {p} exited and was reaped"
        );
    }
    // The same workers keep heartbeating to the re-executed supervisor (4 heartbeats: more
    // than the 3 it may miss before being killed).
    let beating = wait_status(&b, "heartbeats to the new image", |s| {
        (0..2).all(|i| s["workers"][i]["heartbeats"].as_u64() >= Some(4))
    })
    .await;
    for i in 0..2 {
        assert_eq!(worker_pid(&beating, i), Some(new[i]), "worker {i} kept");
        assert_eq!(beating["workers"][i]["missed_heartbeat_kills"], 0);
    }
    // Counters carried over (with the next heartbeats): the 30 tunnels were accepted by the
    // first generation.
    wait_status(&b, "counters carried over", |s| {
        s["totals"]["accepted"].as_u64() >= Some(30)
    })
    .await;

    let before = made.load(Ordering::Relaxed);
    assert!(wait_until(WAIT, || made.load(Ordering::Relaxed) > before + 10).await);
    stop_short.store(true, Ordering::Relaxed);
    short.await.unwrap().unwrap();
    stop_long.store(true, Ordering::Relaxed);
    for c in clients {
        let rounds = c.await.unwrap().unwrap();
        assert!(rounds > 0);
    }
    stop(b, &new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_worker_and_the_totals() {
    let be = echo_backend("").await;
    let b = Baton::start(&config(be, ""));
    let addr = b.addr("t");
    connections(addr, 10).await;
    let s = wait_status(&b, "10 connections counted", |s| {
        s["totals"]["accepted"].as_u64() == Some(10)
    })
    .await;
    assert_eq!(s["mode"], "supervisor");
    assert_eq!(s["pid"], b.pid() as i64);
    let workers = s["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    for (i, w) in workers.iter().enumerate() {
        assert_eq!(w["index"], i as i64);
        assert!(w["pid"].as_i64().unwrap() > 0);
        assert_eq!(w["generation"], 1);
        assert_eq!(w["restarts"], 0);
        assert!(w["last_heartbeat_ms"].as_u64().unwrap() < 10_000);
    }
    assert_eq!(accepted(&s, 0) + accepted(&s, 1), 10, "totals are the sum");
    let (ok, text) = cli(&b.config, "status", &[]);
    assert!(ok);
    assert!(
        text.contains("worker 0: pid") && text.contains("worker 1: pid"),
        "{text}"
    );
    assert!(text.contains("total: accepted 10"), "{text}");
    let pids = [worker_pid(&s, 0).unwrap(), worker_pid(&s, 1).unwrap()];
    stop(b, &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_over_its_memory_limit_is_killed_and_restarted() {
    let be = echo_backend("").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        config(
            be,
            "  worker_limits:\n    memory: 96MiB\n    nofile: 4096\n",
        ),
    )
    .unwrap();
    let b = Baton::start_with_env(dir, cfg, &[("BATON_TEST_FAULT", "grow_memory:0")]);
    let s = status(&b);
    if s["cgroups"].is_null() {
        eprintln!("SKIPPED: cgroups cannot be written here, so no memory limit can be enforced");
        return;
    }
    let first = worker_pid(&s, 0);
    assert!(
        b.log
            .wait_for(
                &[
                    "worker killed by the kernel for exceeding its memory limit",
                    "index=0"
                ],
                WAIT
            )
            .is_some(),
        "OOM kill seen"
    );
    // The replacement starts (and, growing too, will be killed again: a crash loop).
    assert!(
        wait_until(WAIT, || b.log.count("worker started") >= 3).await,
        "worker 0 restarted"
    );
    let after = wait_status(&b, "worker 0 restarted", |s| {
        s["workers"][0]["restarts"].as_u64() >= Some(1) && worker_pid(s, 0) != first
    })
    .await;
    assert!(
        after["workers"][0]["oom_kills"].as_u64() >= Some(1),
        "{after:#}"
    );
    assert_eq!(after["workers"][1]["restarts"], 0, "worker 1 untouched");
    // The other worker's open-file limit is the configured one.
    let w1 = worker_pid(&after, 1).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{w1}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert!(line.contains("4096"), "{line}");
    stop(b, &[w1]);
}

/// Starts `exe run -c config` (a copy of baton elsewhere than `bin()`).
fn start_copy(exe: &std::path::Path, dir: tempfile::TempDir, config: std::path::PathBuf) -> Baton {
    let child = std::process::Command::new(exe)
        .args(["run", "-c"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    Baton::adopt(child, dir, config)
}

/// Replaces `exe` (as `mv` of a new build would) with a script that appends "PID ARGS" to
/// `marker` and then runs `then` (a shell command line) with the same arguments.
fn replace_with_wrapper(exe: &std::path::Path, marker: &std::path::Path, then: &str) {
    let staged = exe.with_extension("new");
    std::fs::write(
        &staged,
        format!(
            "#!/bin/sh\necho \"$$ $*\" >> {}\n{then}\n",
            marker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&staged, exe).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_re_executes_the_binary_on_disk_in_place() {
    let be = echo_backend("").await;
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("baton");
    std::fs::copy(bin(), &exe).unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, config_text(be)).unwrap();
    let b = start_copy(&exe, dir, config);
    let addr = b.addr("t");
    let supervisor = b.pid();
    wait_status(&b, "two workers serving", |s| {
        (0..2).all(|i| s["workers"][i]["state"] == "serving") && s["supervisor_generation"] == 1
    })
    .await;
    // A tunnel open across the whole upgrade.
    let stop_long = Arc::new(AtomicBool::new(false));
    let tunnel = tokio::spawn({
        let stop = stop_long.clone();
        async move { numbered_echo(TcpStream::connect(addr).await.unwrap(), 0, stop).await }
    });
    let marker = b.dir().join("ran");
    replace_with_wrapper(&exe, &marker, &format!("exec {} \"$@\"", bin()));
    let (ok, out) = upgrade_async(&b.config).await;
    assert!(ok, "{out}");
    assert!(out.contains("supervisor re-executing"), "{out}");
    let s = wait_status(&b, "supervisor generation 2", |s| {
        s["supervisor_generation"] == 2
    })
    .await;
    assert_eq!(s["pid"], supervisor as i64, "same pid");
    // The new file ran as the supervisor's own pid, with the resume argument.
    let ran = std::fs::read_to_string(&marker).unwrap();
    assert!(
        ran.lines()
            .any(|l| l.starts_with(&format!("{supervisor} run"))
                && l.contains("--resume-supervisor")),
        "the supervisor did not exec the new file: {ran}"
    );
    assert!(
        ran.lines().any(|l| l.contains(" check -c")),
        "validated first: {ran}"
    );
    let workers: Vec<i32> = (0..2).map(|i| worker_pid(&s, i).unwrap()).collect();
    let beating = wait_status(&b, "heartbeats to the new image", |s| {
        (0..2).all(|i| s["workers"][i]["heartbeats"].as_u64() >= Some(4))
    })
    .await;
    for (i, w) in workers.iter().enumerate() {
        assert_eq!(worker_pid(&beating, i), Some(*w), "worker {i} kept");
    }
    // New connections are served by the re-executed supervisor's workers.
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"after\n").await.unwrap();
    let mut buf = [0u8; 6];
    tokio::time::timeout(WAIT, c.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"after\n");
    stop_long.store(true, Ordering::Relaxed);
    assert!(tunnel.await.unwrap().unwrap() > 0);
    // It still supervises them: a graceful stop waits for (and reaps) both.
    stop(b, &workers);
    for w in workers {
        assert!(reaped(w), "worker {w} reaped");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_fails_its_check_is_not_executed() {
    let be = echo_backend("").await;
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("baton");
    std::fs::copy(bin(), &exe).unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, config_text(be)).unwrap();
    let b = start_copy(&exe, dir, config);
    let supervisor = b.pid();
    two_serving(&b).await;
    // Workers start fine from it, but `check` fails.
    let marker = b.dir().join("ran");
    replace_with_wrapper(
        &exe,
        &marker,
        &format!(
            "if [ \"$1\" = check ]; then echo 'broken build' >&2; exit 3; fi\nexec {} \"$@\"",
            bin()
        ),
    );
    let (ok, out) = upgrade_async(&b.config).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("NOT re-executed") && out.contains("broken build"),
        "{out}"
    );
    let s = status(&b);
    assert_eq!(s["pid"], supervisor as i64);
    assert_eq!(
        s["supervisor_generation"], 1,
        "the old supervisor keeps running"
    );
    assert_eq!(s["generation"], 2, "the workers were replaced");
    let ran = std::fs::read_to_string(&marker).unwrap();
    assert!(!ran.contains("--resume-supervisor"), "{ran}");
    let workers: Vec<i32> = (0..2).map(|i| worker_pid(&s, i).unwrap()).collect();
    stop(b, &workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_worker_that_dies_fails_the_upgrade_at_once() {
    let be = echo_backend("").await;
    // A long upgrade_timeout: waiting for it (as before) would take more than a minute.
    let b = Baton::start(&config(be, "").replace("upgrade_timeout: 10s", "upgrade_timeout: 90s"));
    let s0 = two_serving(&b).await;
    let before = [worker_pid(&s0, 0).unwrap(), worker_pid(&s0, 1).unwrap()];
    let config = b.config.clone();
    let up =
        tokio::task::spawn_blocking(move || cli(&config, "upgrade", &["--binary", "/bin/false"]));
    let (ok, out) = tokio::time::timeout(WAIT, up)
        .await
        .expect("the upgrade waited for upgrade_timeout")
        .unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains("worker 0 not replaced") && out.contains("exited"),
        "{out}"
    );
    // Nothing changed: both old workers serve.
    let after = wait_status(&b, "old workers serving", |s| {
        s["workers"][0]["state"] == "serving" && s["workers"][1]["state"] == "serving"
    })
    .await;
    assert_eq!(worker_pid(&after, 0), Some(before[0]));
    assert_eq!(worker_pid(&after, 1), Some(before[1]));
    stop(b, &before);
}
