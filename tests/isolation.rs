//! Isolation end to end: the real binary as root dropping to `nobody`, workers in
//! their own PID, mount and IPC namespaces, pinned to CPUs — checked where the kernel says it,
//! in `/proc/PID/status`, `/proc/PID/ns/*`, the worker's own `/proc` and its mount table —
//! and upgrades, crash restarts and a single process's successor that keep all of it while
//! every tunnel and idle keep-alive connection survives. Needs root (CI runs as root); each
//! test says SKIPPED and passes when not.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
mod http_support;
use common::*;
use http_support::read_response;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const NOBODY: u32 = 65534;

/// `Cpus_allowed_list` of each of `pid`'s tokio runtime threads.
fn runtime_thread_cpus(pid: i32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let t = t.ok()?.path();
            let comm = std::fs::read_to_string(t.join("comm")).ok()?;
            if !comm.starts_with("tokio-rt-worker") {
                return None;
            }
            std::fs::read_to_string(t.join("status"))
                .ok()?
                .lines()
                .find_map(|l| {
                    l.strip_prefix("Cpus_allowed_list:")
                        .map(|v| v.trim().to_string())
                })
        })
        .collect()
}

fn root_or_skip(test: &str) -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        eprintln!("SKIPPED {test}: needs root to drop privileges and create namespaces");
    }
    root
}

/// `baton status --json`, or `None` while nothing answers on the control socket yet.
fn try_status(config: &Path) -> Option<serde_json::Value> {
    let out = std::process::Command::new(bin())
        .args(["status", "--json", "-c"])
        .arg(config)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// `baton status --json`.
fn status(config: &Path) -> serde_json::Value {
    try_status(config).expect("baton status failed")
}

/// Waits until `n` workers serve and heartbeat; returns their pids (index order).
async fn serving(config: &Path, n: usize) -> Vec<i32> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s = try_status(config).unwrap_or_default();
        let ws = s["workers"].as_array().cloned().unwrap_or_default();
        if ws.len() == n && ws.iter().all(|w| w["state"] == "serving") {
            return ws
                .iter()
                .map(|w| w["pid"].as_i64().unwrap() as i32)
                .collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "workers not serving: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `Key:` of `/proc/PID/status`.
fn proc_field(pid: i32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn ns(pid: i32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .display()
        .to_string()
}

/// The CPUs this test may use (so expectations hold under taskset or a container cpuset).
fn my_cpus() -> Vec<usize> {
    let set = rustix::thread::sched_getaffinity(None).unwrap();
    (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|c| set.is_set(*c))
        .collect()
}

/// Asserts what the kernel reports for an isolated worker running as nobody on `cpu`.
fn assert_isolated(worker: i32, supervisor: i32, cpu: usize, dir: &Path) {
    let lines: Vec<String> = [
        "Uid",
        "Gid",
        "Groups",
        "NoNewPrivs",
        "CapEff",
        "CapPrm",
        "CapBnd",
        "Cpus_allowed_list",
        "NSpid",
    ]
    .iter()
    .map(|k| format!("{k}:\t{}", proc_field(worker, k)))
    .collect();
    eprintln!("/proc/{worker}/status:\n{}", lines.join("\n"));
    let all = |v: String| v.split_whitespace().all(|x| x == NOBODY.to_string());
    assert!(all(proc_field(worker, "Uid")), "{lines:?}");
    assert!(all(proc_field(worker, "Gid")), "{lines:?}");
    assert_eq!(
        proc_field(worker, "Groups"),
        "",
        "supplementary groups cleared"
    );
    assert_eq!(proc_field(worker, "NoNewPrivs"), "1");
    assert_eq!(proc_field(worker, "CapEff"), "0000000000000000");
    assert_eq!(proc_field(worker, "CapPrm"), "0000000000000000");
    assert_eq!(proc_field(worker, "Cpus_allowed_list"), cpu.to_string());
    // Its own PID namespace, where it is pid 1.
    assert!(
        proc_field(worker, "NSpid").ends_with("\t1") || proc_field(worker, "NSpid").ends_with(" 1")
    );
    for kind in ["pid", "mnt", "ipc"] {
        assert_ne!(
            ns(worker, kind),
            ns(supervisor, kind),
            "{kind} namespace shared"
        );
    }
    assert_eq!(
        ns(worker, "net"),
        ns(supervisor, "net"),
        "the network stays shared"
    );
    // Its own /proc: only itself.
    let pids: Vec<String> = std::fs::read_dir(format!("/proc/{worker}/root/proc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
        .collect();
    assert_eq!(
        pids,
        vec!["1".to_string()],
        "the worker's /proc lists only itself"
    );
    // Its mount table: everything read-only except the log file's folder.
    let mountinfo = std::fs::read_to_string(format!("/proc/{worker}/mountinfo")).unwrap();
    let root_line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap();
    assert!(
        root_line
            .split(' ')
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "{root_line}"
    );
    // Writing through its mount namespace: refused outside the allowed paths, allowed inside.
    let outside = format!("/proc/{worker}/root{}/probe", dir.display());
    let err = std::fs::write(&outside, b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{outside}: {err}");
    let inside = format!("/proc/{worker}/root{}/logs/probe", dir.display());
    std::fs::write(&inside, b"x").unwrap_or_else(|e| panic!("{inside}: {e}"));
}

/// Starts `baton run` on `yaml` with its log in `logs/baton.log` (so the workers have a path
/// to write), and waits until `workers` serve.
async fn start_logging_to_file(yaml: &str, workers: usize) -> (Baton, Vec<i32>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("logs")).unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!("log:\n  file: logs/baton.log\n  level: debug\n{yaml}"),
    )
    .unwrap();
    let child = std::process::Command::new(bin())
        .args(["run", "-c"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let b = Baton {
        child,
        dir,
        config,
        log: Default::default(),
    };
    let pids = serving(&b.config, workers).await;
    (b, pids)
}

fn tcp_config(backend: std::net::SocketAddr, runtime: &str) -> String {
    format!(
        "runtime:\n  drain_timeout: 5s\n{runtime}listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\nupstreams:\n  u:\n    servers: [\"{backend}\"]\n"
    )
}

const ISOLATED: &str = "  workers: 2\n  user: nobody\n  group: nogroup\n  worker_isolation: true\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_proc_status_shows_the_drop_its_cpus_and_its_own_namespaces_also_after_kill_9() {
    if !root_or_skip("workers_proc_status") {
        return;
    }
    let be = echo_backend("").await;
    let cpus = my_cpus();
    let (first, last) = (cpus[0], *cpus.last().unwrap());
    let all = format!("{first}-{last}");
    let runtime = format!("{ISOLATED}  cpu_affinity: [[{first}], [{last}]]\n  worker_limits: {{cpuset: \"{all}\", pids: 4096}}\n");
    let (b, pids) = start_logging_to_file(&tcp_config(be, &runtime), 2).await;
    let sup = b.pid();
    assert_isolated(pids[0], sup, first, b.dir());
    assert_isolated(pids[1], sup, last, b.dir());
    assert_ne!(
        ns(pids[0], "pid"),
        ns(pids[1], "pid"),
        "one PID namespace per worker"
    );

    // The supervisor stays root but keeps only what it uses.
    assert_eq!(proc_field(sup, "NoNewPrivs"), "1");
    let bnd = u64::from_str_radix(&proc_field(sup, "CapBnd"), 16).unwrap();
    assert_eq!(
        bnd & (1 << 21),
        1 << 21,
        "sys_admin kept for the namespaces"
    );
    assert_eq!(
        bnd & (1 << 1),
        1 << 1,
        "dac_override kept: cgroup limits are configured"
    );
    assert_eq!(bnd & (1 << 0), 0, "chown dropped");

    // Status says it per worker, as JSON and as a line.
    let s = status(&b.config);
    let w0 = &s["workers"][0]["isolation"];
    assert_eq!(w0["in_force"]["uid"][0], NOBODY);
    assert_eq!(w0["namespaces"], serde_json::json!(["pid", "mnt", "ipc"]));
    assert_eq!(w0["read_only"], true);
    // The cgroup side: worker 0's own cpuset cgroup, limited to the configured CPUs.
    let cpuset_dir = w0["cgroup_dirs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| std::path::PathBuf::from(d.as_str().unwrap()))
        .find(|d| d.to_string_lossy().contains("/cpuset/") || d.join("cpuset.cpus").exists())
        .expect("a cpuset cgroup for worker 0");
    let cpus = std::fs::read_to_string(cpuset_dir.join("cpuset.cpus")).unwrap();
    let want: Vec<usize> = (first..=last).collect();
    assert_eq!(
        baton::config::parse_cpu_list(&cpus).unwrap(),
        want,
        "{}",
        cpuset_dir.display()
    );
    let procs = std::fs::read_to_string(cpuset_dir.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|p| p.trim() == pids[0].to_string()),
        "{procs}"
    );
    let (ok, text) = cli(&b.config, "status", &[]);
    assert!(ok);
    let line = text.lines().find(|l| l.contains("isolation:")).unwrap();
    eprintln!("status line: {line}");
    assert!(
        line.contains("uid 65534 gid 65534 groups none no_new_privs caps none"),
        "{line}"
    );
    assert!(line.contains("namespaces pid,mnt,ipc read-only"), "{line}");
    assert!(line.contains("cgroups pids,cpuset"), "{line}");

    // A worker killed with SIGKILL comes back isolated the same way, on the same CPU.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pids[0]).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let again = loop {
        let now = serving(&b.config, 2).await;
        if now[0] != pids[0] {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "worker 0 not restarted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_isolated(again[0], sup, first, b.dir());
    // And it serves.
    let (mut c, _) = greeting(b_addr(&b), 0).await;
    c.write_all(b"ping\n").await.unwrap();
}

/// The address of listener `t`, from status (the log goes to a file here).
fn b_addr(b: &Baton) -> std::net::SocketAddr {
    status(&b.config)["listeners"]["t"]["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Connects and does one keep-alive request; the connection then stays idle in baton.
async fn idle_keep_alive(addr: std::net::SocketAddr) -> BufReader<TcpStream> {
    let mut r = BufReader::new(TcpStream::connect(addr).await.unwrap());
    get_ok(&mut r).await;
    r
}

async fn get_ok(r: &mut BufReader<TcpStream>) {
    r.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let (status, body) = tokio::time::timeout(WAIT, read_response(r))
        .await
        .expect("response in time")
        .expect("a response");
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_workers_keep_30_tunnels_and_idle_keep_alives_through_5_upgrades() {
    if !root_or_skip("five_upgrades") {
        return;
    }
    let be = echo_backend("").await;
    let (web, _) = http_support::backend("a").await;
    let yaml = format!(
        "runtime:\n  drain_timeout: 5s\n{ISOLATED}  cpu_affinity: auto\nlisteners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\nupstreams:\n  u:\n    servers: [\"{be}\"]\n  app:\n    servers: [\"{web}\"]\n"
    );
    let (b, first) = start_logging_to_file(&yaml, 2).await;
    let s = status(&b.config);
    let addr: std::net::SocketAddr = s["listeners"]["t"]["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let web_addr: std::net::SocketAddr = s["listeners"]["web"]["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let mut tunnels = Vec::new();
    for id in 0..30 {
        tunnels.push(started_numbered_echo(addr, id, stop.clone()).await);
    }
    let mut idle = Vec::new();
    for _ in 0..6 {
        idle.push(idle_keep_alive(web_addr).await);
    }
    let sup = b.pid();
    let mut before = first;
    for round in 1..=5 {
        let (ok, out) = upgrade_async(&b.config).await;
        assert!(ok, "upgrade {round}: {out}");
        let deadline = std::time::Instant::now() + WAIT;
        let now = loop {
            let now = serving(&b.config, 2).await;
            let gen = status(&b.config)["supervisor_generation"]
                .as_u64()
                .unwrap_or(0);
            if now.iter().all(|p| !before.contains(p)) && gen == round + 1 {
                break now;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "upgrade {round} not complete"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // The successors are isolated the same way, the supervisor is the same process.
        for (i, w) in now.iter().enumerate() {
            let cpus = my_cpus();
            assert_isolated(*w, sup, cpus[i % cpus.len()], b.dir());
        }
        before = now;
    }
    assert_eq!(b.pid(), sup);
    // Every idle keep-alive connection moved five times and is still served on its socket.
    for r in idle.iter_mut() {
        get_ok(r).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tunnels {
        let n = t.await.unwrap().expect("tunnel broke");
        assert!(n > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_process_as_nobody_serves_upgrades_with_live_tunnels_and_its_successor_is_nobody()
{
    if !root_or_skip("single_process_user") {
        return;
    }
    let be = echo_backend("").await;
    let dir = tempfile::tempdir().unwrap();
    // nobody rewrites the pid file and binds the control socket here, and so does its successor.
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        tcp_config(
            be,
            "  user: nobody\n  cpu_affinity: auto\n  worker_threads: 2\n",
        ),
    )
    .unwrap();
    let b = Baton::start_in(dir, config);
    let addr = b.addr("t");
    let first = b.serving_pid();
    assert_eq!(first, b.pid());
    let check = |pid: i32| {
        let uid = proc_field(pid, "Uid");
        eprintln!(
            "/proc/{pid}/status Uid: {uid} NoNewPrivs: {} CapEff: {}",
            proc_field(pid, "NoNewPrivs"),
            proc_field(pid, "CapEff")
        );
        assert!(
            uid.split_whitespace().all(|x| x == NOBODY.to_string()),
            "{uid}"
        );
        assert_eq!(proc_field(pid, "NoNewPrivs"), "1");
        assert_eq!(proc_field(pid, "CapEff"), "0000000000000000");
        // Its runtime threads are pinned one per CPU, round robin. A thread takes its name
        // only once it first runs, and pins itself just after (tokio's thread-start hook,
        // before it runs any task), so on a loaded machine wait for both to show, pinned.
        let cpus = my_cpus();
        let on_one_cpu = |p: &String| cpus.iter().any(|c| &c.to_string() == p);
        let deadline = std::time::Instant::now() + WAIT;
        let pinned = loop {
            let pinned = runtime_thread_cpus(pid);
            let settled = pinned.len() >= 2 && pinned.iter().all(on_one_cpu);
            if settled || std::time::Instant::now() > deadline {
                break pinned;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Blocking-pool threads share the name and are pinned as well: at least the two
        // workers, each on one CPU.
        assert!(pinned.len() >= 2, "{pinned:?}");
        for p in &pinned {
            assert!(
                cpus.iter().any(|c| &c.to_string() == p),
                "thread on {p}, expected one CPU of {cpus:?}"
            );
        }
    };
    check(first);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tunnels = Vec::new();
    for id in 0..10 {
        tunnels.push(started_numbered_echo(addr, id, stop.clone()).await);
    }
    let mut pid = first;
    for round in 0..2 {
        let (ok, out) = upgrade_async(&b.config).await;
        assert!(ok && out.contains("10 tunnels"), "upgrade {round}: {out}");
        let next = b.serving_pid();
        assert_ne!(next, pid);
        check(next);
        pid = next;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tunnels {
        assert!(t.await.unwrap().expect("tunnel broke") > 0);
    }
    // New connections are served by the last successor.
    let (mut c, _) = greeting(addr, 0).await;
    c.write_all(b"x").await.unwrap();
}

/// A port below 1024 on 127.0.0.1 that is free now.
fn free_privileged_port() -> u16 {
    (900..1024)
        .rev()
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1024")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_a_privileged_listener_the_supervisor_binds_for_workers_running_as_nobody() {
    if !root_or_skip("privileged_reload") {
        return;
    }
    let be = echo_backend("").await;
    // reuseport: the kernel spreads connections over both workers' sockets, so the
    // per-worker counters show that each worker serves the new listener.
    let runtime = format!("{ISOLATED}  accept: reuseport\n");
    let (b, first) = start_logging_to_file(&tcp_config(be, &runtime), 2).await;
    let port = free_privileged_port();
    let text = std::fs::read_to_string(&b.config).unwrap().replace(
        "upstreams:\n",
        &format!("  low:\n    listen: 127.0.0.1:{port}\n    upstream: u\nupstreams:\n"),
    );
    std::fs::write(&b.config, text).unwrap();
    let (ok, out) = cli(&b.config, "reload", &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("listeners added low (127.0.0.1:{port})")),
        "{out}"
    );
    let low: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for i in 0..20 {
        let mut s = TcpStream::connect(low).await.unwrap();
        let line = format!("low {i}\n");
        s.write_all(line.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; line.len()];
        tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf, line.as_bytes());
    }
    // Both new workers serve it, and both still run as nobody with no capability.
    let deadline = std::time::Instant::now() + WAIT;
    let s = loop {
        let s = status(&b.config);
        let on = |i: usize| {
            s["workers"][i]["counters"]["listeners"]["low"]["accepted"]
                .as_u64()
                .unwrap_or(0)
        };
        if on(0) > 0 && on(1) > 0 {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "both workers serve low: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for i in 0..2 {
        let w = s["workers"][i]["pid"].as_i64().unwrap() as i32;
        assert!(!first.contains(&w), "worker {i} replaced");
        assert!(
            proc_field(w, "Uid")
                .split_whitespace()
                .all(|x| x == NOBODY.to_string()),
            "worker {w}"
        );
        assert_eq!(proc_field(w, "CapEff"), "0000000000000000");
    }
}

/// Worker 1's status line says its pinning was refused.
fn assert_refused_line(s: &serde_json::Value) {
    let line = s["workers"][1]["isolation_text"].as_str().unwrap_or("");
    assert!(line.contains("refused: cpu_affinity"), "{s:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_host_refuses_is_warned_once_and_status_says_what_is_in_force() {
    if !root_or_skip("host_refuses") {
        return;
    }
    let be = echo_backend("").await;
    // CPU 1000 does not exist here: pinning worker 1 fails. This host's blkio controller may
    // have no weight file: then io_weight cannot be in force, while pids still is.
    let blkio = Path::new("/sys/fs/cgroup/blkio");
    let v2_io = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "io"));
    let weight_file = ["blkio.weight", "blkio.bfq.weight"]
        .into_iter()
        .find(|f| blkio.join(f).exists());
    let runtime = "  workers: 2\n  cpu_affinity: [[0], [1000]]\n  worker_limits:\n    pids: 500\n    io_weight: 500\n";
    let (b, pids) = start_logging_to_file(&tcp_config(be, runtime), 2).await;
    let log = std::fs::read_to_string(b.dir().join("logs/baton.log")).unwrap();
    let warned = log
        .lines()
        .filter(|l| l.contains("the host refused part of the workers' isolation"))
        .count();
    assert_eq!(warned, 1, "one warning for the refused pinning:\n{log}");
    let s = status(&b.config);
    let w1 = &s["workers"][1]["isolation"];
    let refused: Vec<String> = serde_json::from_value(w1["refused"].clone()).unwrap();
    assert!(
        refused.iter().any(|r| r.contains("cpu_affinity")),
        "status says what was refused: {w1:#}"
    );
    assert_refused_line(&s);
    // Worker 0 is pinned as asked; worker 1 runs where the supervisor may.
    assert_eq!(proc_field(pids[0], "Cpus_allowed_list"), "0");
    assert_eq!(
        proc_field(pids[1], "Cpus_allowed_list"),
        proc_field(b.pid(), "Cpus_allowed_list")
    );
    let cgroups: Vec<String> = serde_json::from_value(w1["cgroups"].clone()).unwrap_or_default();
    assert!(
        cgroups.iter().any(|c| c == "pids" || c == "v2"),
        "pids in force: {w1:#}"
    );
    match (v2_io, weight_file) {
        (false, None) => {
            eprintln!("io_weight: this host has no blkio weight file; checking it is reported as not in force");
            assert!(
                log.contains("worker_limits.io_weight: this host's blkio controller has no weight file; not in force"),
                "{log}"
            );
            assert!(!cgroups.iter().any(|c| c == "io" || c == "blkio"), "{w1:#}");
        }
        (_, file) => {
            // Where the cgroup offers a weight, the worker's cgroup has it.
            let dirs: Vec<String> =
                serde_json::from_value(w1["cgroup_dirs"].clone()).unwrap_or_default();
            let (_, dir) = cgroups
                .iter()
                .zip(&dirs)
                .find(|(c, _)| *c == "io" || *c == "v2")
                .expect("an io cgroup folder");
            let (name, want) = match file {
                Some(f) if !v2_io => (f, "50"),
                _ => ("io.weight", "default 500"),
            };
            let got = std::fs::read_to_string(Path::new(dir).join(name)).unwrap();
            assert!(got.contains(want), "{name}: {got}");
        }
    }
    // A restarted worker is refused the same way, with no second warning.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pids[1]).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let now = serving(&b.config, 2).await;
        if now[1] != pids[1] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "worker 1 restarted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = status(&b.config);
    assert_refused_line(&s);
    let log = std::fs::read_to_string(b.dir().join("logs/baton.log")).unwrap();
    assert_eq!(
        log.matches("the host refused part of the workers' isolation")
            .count(),
        1,
        "{log}"
    );
}
