//! Shared support for integration tests: start the real `baton` binary with a config written
//! to a temporary folder, learn its listeners' OS-chosen ports from its log, and small real
//! backends on 127.0.0.1.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod supervisor;
pub mod tls;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous bound for conditions on a noisy 2-core machine.
pub const WAIT: Duration = Duration::from_secs(20);

/// Log lines of a child process, shared with the thread that reads them.
#[derive(Default)]
pub struct LogLines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl LogLines {
    /// Waits until a line containing every one of `needles` appears; returns it.
    pub fn wait_for(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| needles.iter().all(|n| l.contains(n))) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self.changed.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

/// Reads `r` line by line into `log` (and echoes to the test's stderr for failures).
pub fn pump(r: impl std::io::Read + Send + 'static, log: Arc<LogLines>, tag: &'static str) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{tag}] {line}");
            log.lines.lock().unwrap().push(line);
            log.changed.notify_all();
        }
    });
}

/// A running baton process in its own temporary folder.
pub struct Baton {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub log: Arc<LogLines>,
}

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_baton")
}

impl Baton {
    /// Writes `yaml` as config.yaml in a new temporary folder and starts `baton run` on it,
    /// waiting until it is ready.
    pub fn start(yaml: &str) -> Baton {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        Self::start_in(dir, config)
    }

    /// Starts `baton run -c config` and waits for readiness.
    pub fn start_in(dir: tempfile::TempDir, config: PathBuf) -> Baton {
        Self::start_with_env(dir, config, &[])
    }

    /// Like [`Baton::start_in`], with extra environment variables for this process only
    /// (its successors inherit them).
    pub fn start_with_env(dir: tempfile::TempDir, config: PathBuf, env: &[(&str, &str)]) -> Baton {
        let child = Command::new(bin())
            .args(["run", "-c"])
            .arg(&config)
            .envs(env.iter().copied())
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn baton");
        Baton::adopt(child, dir, config)
    }

    /// Takes a `baton run` child started some other way (stderr piped): collects its log
    /// lines and waits until it is ready.
    pub fn adopt(mut child: Child, dir: tempfile::TempDir, config: PathBuf) -> Baton {
        let log = Arc::new(LogLines::default());
        pump(child.stderr.take().unwrap(), log.clone(), "baton");
        let b = Baton {
            child,
            dir,
            config,
            log,
        };
        assert!(
            b.log.wait_for(&["phase", "to=Ready"], WAIT).is_some(),
            "baton did not become ready"
        );
        b
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The address a listener is bound to, read from the "listening" log line of the
    /// process with the given pid (or any, if `None`).
    pub fn addr(&self, listener: &str) -> SocketAddr {
        let line = self
            .log
            .wait_for(&["listening", &format!("listener={listener} ")], WAIT)
            .expect("listener address in log");
        let addr = line
            .split("addr=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        addr.parse().unwrap()
    }

    /// Sends a signal to the baton process.
    pub fn signal(&self, sig: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_raw(self.pid()).unwrap(), sig)
            .unwrap();
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Baton {
    /// Ends every process of this baton, also when the test panics: the one we started, and
    /// every successor, worker or wrapper started for it (each names a file of this folder on
    /// its command line). A successor is not our child and leads a process group of its own,
    /// so killing only our child (or the pid file's process) left one that was mid-take-over
    /// running, holding its listeners, after the test had passed.
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left: Vec<i32> = processes_naming(self.dir.path())
                .into_iter()
                .filter(|p| alive(*p))
                .collect();
            if left.is_empty() || Instant::now() >= deadline {
                break;
            }
            for pid in left {
                kill_with_group(pid);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Every other process with an argument inside `dir` (its config file, a wrapper script).
pub fn processes_naming(dir: &Path) -> Vec<i32> {
    use std::os::unix::ffi::OsStrExt;
    let prefix = dir.as_os_str().as_bytes();
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg.starts_with(prefix)))
        })
        .collect()
}

/// SIGKILL to `pid` and, if it leads one, its process group (a successor's: a wrapper
/// script's children go with it).
pub fn kill_with_group(pid: i32) {
    let Some(p) = rustix::process::Pid::from_raw(pid) else {
        return;
    };
    let _ = rustix::process::kill_process_group(p, rustix::process::Signal::KILL);
    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
}

/// A successor started by the test itself ([`baton::handover::spawn_successor`]): killed with
/// its process group and reaped when dropped, also when the test panics (tokio's `Child` is
/// not killed on drop, and `spawn_successor` must not ask for that: a successor outlives its
/// predecessor's `Spawned`).
pub struct Reaped(pub tokio::process::Child);

impl std::ops::Deref for Reaped {
    type Target = tokio::process::Child;
    fn deref(&self) -> &tokio::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut tokio::process::Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_some() {
            return;
        }
        if let Some(pid) = self.0.id() {
            kill_with_group(pid as i32);
        }
        let _ = self.0.start_kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The TCP addresses process `pid` is listening on (its fds matched against the kernel's
/// socket table), so a test can see which listeners a process holds without its log.
pub fn listening_addrs(pid: u32) -> Vec<SocketAddr> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?;
            let link = link.to_str()?;
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local_address st ... inode; 0A is LISTEN.
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                return None;
            }
            let (ip, port) = f[1].split_once(':')?;
            let ip = u32::from_str_radix(ip, 16).ok()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            // The kernel prints the address as a native-endian u32 of network-order bytes.
            let ip = std::net::Ipv4Addr::from(ip.to_ne_bytes());
            Some(SocketAddr::from((ip, port)))
        })
        .collect()
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// A TCP echo backend that first writes `greeting` (its name) to each connection, so a client
/// can tell which server it reached. Runs until the test's runtime ends.
pub async fn echo_backend(greeting: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                break;
            };
            tokio::spawn(async move {
                if !greeting.is_empty() && s.write_all(greeting.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A port on 127.0.0.1 free at this moment, for a process to bind (bound then released).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// An address on 127.0.0.1 where nothing listens: connects to it are refused.
pub fn dead_addr() -> SocketAddr {
    // Bound but never listening, and kept for the rest of the test process: a connect is
    // refused, and no other socket on the machine can take the port meanwhile (a port only
    // probed free was taken by a parallel test's backend and answered).
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    std::mem::forget(s);
    addr
}

/// Connects through baton and reads the backend's greeting of `len` bytes.
pub async fn greeting(addr: SocketAddr, len: usize) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = vec![0u8; len];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    (s, String::from_utf8(buf).unwrap())
}

/// Counts by value.
pub fn tally<T: std::hash::Hash + Eq>(items: impl IntoIterator<Item = T>) -> HashMap<T, usize> {
    let mut m = HashMap::new();
    for i in items {
        *m.entry(i).or_insert(0) += 1;
    }
    m
}

impl Baton {
    /// Runs `baton upgrade -c CONFIG [extra]` against the running process (blocking);
    /// returns (success, everything it printed).
    pub fn cli_upgrade(&self, extra: &[&str]) -> (bool, String) {
        cli(&self.config, "upgrade", extra)
    }

    /// The pid currently serving, from the pid file.
    pub fn serving_pid(&self) -> i32 {
        std::fs::read_to_string(self.dir().join("baton.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

/// Runs `baton CMD -c CONFIG [extra]` (blocking); returns (success, everything it printed).
pub fn cli(config: &Path, cmd: &str, extra: &[&str]) -> (bool, String) {
    let out = Command::new(bin())
        .args([cmd, "-c"])
        .arg(config)
        .args(extra)
        .output()
        .unwrap();
    let text = printed(&out);
    eprintln!("[{cmd}] {}", text.trim());
    (out.status.success(), text)
}

/// Everything a finished command printed: its stdout, then its stderr.
pub fn printed(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `baton upgrade` from async code.
pub async fn upgrade_async(config: &Path) -> (bool, String) {
    let config = config.to_path_buf();
    tokio::task::spawn_blocking(move || cli(&config, "upgrade", &[]))
        .await
        .unwrap()
}

/// `baton upgrade --wait` from async code: returns once the old process has finished.
pub async fn upgrade_wait_async(config: &Path) -> (bool, String) {
    let config = config.to_path_buf();
    tokio::task::spawn_blocking(move || cli(&config, "upgrade", &["--wait"]))
        .await
        .unwrap()
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Connects a tunnel client and makes one echo round trip before spawning [`numbered_echo`],
/// so the proxy has accepted the connection and reached the backend before the caller goes
/// on: a connection still in the listen backlog moves with the listener, not as a tunnel,
/// and an upgrade started at once would count one tunnel fewer.
pub async fn started_numbered_echo(
    addr: std::net::SocketAddr,
    id: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Result<u64, String>> {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("client {id}: connect: {e}"));
    let hello = format!("client {id} hello\n");
    s.write_all(hello.as_bytes()).await.unwrap();
    let mut buf = vec![0; hello.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("client {id}: first echo timed out"))
        .unwrap_or_else(|e| panic!("client {id}: first echo: {e}"));
    assert_eq!(buf, hello.as_bytes(), "client {id}: first echo");
    tokio::spawn(numbered_echo(s, id, stop))
}

/// A client holding one tunnel open, sending a numbered line every 50 ms and checking that
/// the echo comes back complete and in order, until `stop`. Returns the round trips made.
pub async fn numbered_echo(
    mut s: TcpStream,
    id: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<u64, String> {
    let mut n = 0u64;
    let mut buf = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let line = format!("client {id} seq {n}\n");
        s.write_all(line.as_bytes())
            .await
            .map_err(|e| format!("client {id} seq {n}: write: {e}"))?;
        buf.resize(line.len(), 0);
        tokio::time::timeout(WAIT, s.read_exact(&mut buf))
            .await
            .map_err(|_| format!("client {id} seq {n}: echo timed out"))?
            .map_err(|e| format!("client {id} seq {n}: read: {e}"))?;
        if buf != line.as_bytes() {
            return Err(format!(
                "client {id} seq {n}: got {:?}",
                String::from_utf8_lossy(&buf)
            ));
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(n)
}

/// A self-signed ECDSA P-256 certificate made with the openssl CLI: `STEM.pem` and
/// `STEM.key` in `dir`, with the subjectAltNames `sans` (`DNS:a.test`, `IP:127.0.0.1`) and
/// valid for `days` from now (negative: already expired). Returns (cert, key).
pub fn make_cert(dir: &Path, stem: &str, sans: &[&str], days: i64) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{stem}.key"));
    let csr = dir.join(format!("{stem}.csr"));
    let cert = dir.join(format!("{stem}.pem"));
    let ext = dir.join(format!("{stem}.ext"));
    std::fs::write(&ext, format!("subjectAltName={}\n", sans.join(","))).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", printed(&out));
    };
    let p = |p: &Path| p.to_str().unwrap().to_string();
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &p(&key),
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        &p(&key),
        "-subj",
        &format!("/CN={stem}"),
        "-out",
        &p(&csr),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-signkey",
        &p(&key),
        "-days",
        &days.to_string(),
        "-extfile",
        &p(&ext),
        "-out",
        &p(&cert),
    ]);
    (cert, key)
}
