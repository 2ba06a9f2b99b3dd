//! Configuration: the YAML model (`file`), its validation (`validate`), and the typed,
//! validated [`Config`] every other module reads. Plain data: depends on nothing else in baton.

mod connect;
mod diff;
mod dump;
mod errors;
mod file;
mod isolation;
mod runtime;
mod server_addr;
mod tls;
mod unknown;
mod upstream_tls;
mod validate;
mod yaml_error;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use connect::{ConnectPolicy, ConnectTarget};
pub use diff::{diff, ConfigDiff};
pub use dump::format_duration;
pub use errors::parse_duration;
pub use isolation::{parse_cpu_list, Account, CpuAffinity, Isolation, CAPABILITY_NAMES};
pub use tls::{Certificate, ListenerTls, TlsVersion, DEFAULT_HANDSHAKE_TIMEOUT};
pub use upstream_tls::{TrustRoots, UpstreamTls};

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (as given, for error messages and reloads).
    pub source: PathBuf,
    /// Process-wide settings.
    pub runtime: Runtime,
    /// The HTTP admin endpoint, if configured.
    pub admin: Option<Admin>,
    /// Logging.
    pub log: Log,
    /// Listeners by name.
    pub listeners: BTreeMap<String, Listener>,
    /// Upstream pools by name.
    pub upstreams: BTreeMap<String, Upstream>,
}

/// `runtime:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Runtime {
    /// Where the pid of the serving process is written; absolute. Default `baton.pid` in
    /// systemd's `$RUNTIME_DIRECTORY` when set, else beside the config.
    pub pid_file: PathBuf,
    /// The CLI's Unix socket; absolute. Default `baton.sock`, in the same folder as the pid file's.
    pub control_socket: PathBuf,
    /// How long a stopping or replaced process lets open connections finish.
    pub drain_timeout: Duration,
    /// How long a successor has to become ready before it is rolled back.
    pub upgrade_timeout: Duration,
    /// Tokio worker threads; 0 means one per core.
    pub worker_threads: usize,
    /// The binary started on upgrade; `None` means the path this process was started from.
    pub binary: Option<PathBuf>,
    /// Worker processes; 1 runs a single process (no supervisor).
    pub workers: usize,
    /// How workers share the listeners (multi-process mode only).
    pub accept: AcceptMode,
    /// Resource limits applied to each worker (multi-process mode only).
    pub worker_limits: WorkerLimits,
    /// User, capabilities, namespaces and CPU pinning ([`crate::isolation`]).
    pub isolation: Isolation,
}

/// How the workers of a supervisor accept connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceptMode {
    /// Every worker accepts on the same listening sockets.
    Shared,
    /// Each worker has its own SO_REUSEPORT socket per listener (the kernel spreads connections).
    Reuseport,
}

/// `runtime.worker_limits`: each `None` is "no limit".
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WorkerLimits {
    /// Memory in bytes (cgroup).
    pub memory: Option<u64>,
    /// CPUs, e.g. 1.5 (cgroup CPU quota).
    pub cpu: Option<f64>,
    /// Processes and threads (cgroup).
    pub pids: Option<u64>,
    /// Open files (RLIMIT_NOFILE).
    pub nofile: Option<u64>,
    /// CPUs the workers may run on, a cpuset list such as `0-3` (cgroup cpuset).
    pub cpuset: Option<String>,
    /// I/O weight, 1 to 10000 (cgroup `io.weight`, or v1 `blkio.weight` scaled).
    pub io_weight: Option<u64>,
}

/// `admin:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    /// Address of the HTTP admin endpoint.
    pub listen: SocketAddr,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `log:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    /// Text or JSON.
    pub format: LogFormat,
    /// A tracing filter directive such as `info` or `baton=debug`.
    pub level: String,
    /// Log file; stderr when absent.
    pub file: Option<PathBuf>,
    /// HTTP access log file; access lines go to the main log when absent.
    pub access_file: Option<PathBuf>,
    /// The access file's format.
    pub access_format: AccessFormat,
}

/// The access log's line format (`log.access_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessFormat {
    /// Like nginx's `combined`: `ip - - [time] "METHOD path" status bytes "-" "-"`, then the
    /// other fields as `key=value`.
    Combined,
    /// One JSON object per request.
    Json,
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Raw TCP forwarding (L4).
    Tcp,
    /// HTTP/1.1 and h2c reverse proxying (L7).
    Http,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
        })
    }
}

/// One listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// Its name (the key under `listeners:`).
    pub name: String,
    /// Address to bind.
    pub listen: SocketAddr,
    /// TCP or HTTP.
    pub protocol: Protocol,
    /// Default upstream; empty for an HTTP listener that routes only by `routes`.
    pub upstream: String,
    /// Accepting pauses while this many connections are open.
    pub max_connections: usize,
    /// A connection with no traffic for this long is closed; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// Listen backlog.
    pub backlog: u32,
    /// Bind with SO_REUSEPORT.
    pub reuse_port: bool,
    /// TCP_DEFER_ACCEPT: the kernel hands a connection over only once its first bytes have
    /// arrived (or after about a second without any). On by default where the client speaks
    /// first (HTTP, TLS).
    pub defer_accept: bool,
    /// HTTP routes, first match wins (HTTP listeners only).
    pub routes: Vec<Route>,
    /// HTTP settings (HTTP listeners only).
    pub http: ListenerHttp,
    /// TLS termination, if configured (`tls:`).
    pub tls: Option<ListenerTls>,
}

/// One HTTP route.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Exact host, or `*.suffix`; `None` matches any host.
    pub host: Option<String>,
    /// Path prefix; `None` matches any path.
    pub path_prefix: Option<String>,
    /// Upstream that serves matching requests.
    pub upstream: String,
}

/// HTTP settings of a listener.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerHttp {
    /// Time allowed to receive a request's headers (slowloris guard).
    pub header_read_timeout: Duration,
    /// Time allowed for a whole request and response; `None` = no limit.
    pub request_timeout: Option<Duration>,
    /// How long an idle keep-alive client connection is kept.
    pub keepalive_timeout: Duration,
    /// Largest accepted request head.
    pub max_header_bytes: usize,
    /// Largest accepted request body; `None` = unlimited.
    pub max_body_bytes: Option<u64>,
    /// Forward the client's Host header (otherwise the server's address).
    pub preserve_host: bool,
    /// Longest request line accepted (414 above).
    pub max_uri_bytes: usize,
    /// Longest pause between two reads of a request body (408 after it); `None` = none.
    pub body_timeout: Option<Duration>,
    /// `Upgrade` protocols that may start a tunnel (lower case).
    pub upgrade_protocols: Vec<String>,
    /// CONNECT tunnels and their allowed targets; `None`: CONNECT gets 405.
    pub connect: Option<ConnectPolicy>,
}

impl Default for ListenerHttp {
    fn default() -> Self {
        ListenerHttp {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Some(Duration::from_secs(60)),
            keepalive_timeout: Duration::from_secs(75),
            max_header_bytes: 65536,
            max_body_bytes: None,
            preserve_host: true,
            max_uri_bytes: 8192,
            body_timeout: Some(Duration::from_secs(60)),
            upgrade_protocols: vec!["websocket".to_string()],
            connect: None,
        }
    }
}

/// Load-balancing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Smooth weighted round robin (nginx's algorithm).
    RoundRobin,
    /// Fewest active connections (weighted).
    LeastConn,
    /// Power of two random choices.
    RandomTwo,
    /// Consistent hash of the client IP.
    HashClient,
}

/// Where a server listens: a fixed socket address, or a hostname that baton resolves at run
/// time (every address it resolves to is one server; see docs/upstreams.md, "DNS discovery").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServerAddr {
    /// `ip:port`: used as is, never resolved.
    Ip(SocketAddr),
    /// `host:port`: resolved at start, and every `resolve` interval if set.
    Name {
        /// The hostname, lower-cased, without a trailing dot.
        host: String,
        /// The port every resolved address is given.
        port: u16,
    },
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddr::Ip(a) => write!(f, "{a}"),
            ServerAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl From<SocketAddr> for ServerAddr {
    fn from(a: SocketAddr) -> Self {
        ServerAddr::Ip(a)
    }
}

/// One server entry of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// Its address or hostname.
    pub addr: ServerAddr,
    /// Relative weight, at least 1 (each address a hostname resolves to gets it).
    pub weight: u32,
}

/// Active health check kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect succeeds.
    Tcp,
    /// `GET path` answers 2xx or 3xx.
    Http {
        /// Request path.
        path: String,
    },
}

/// Active health checks.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    /// What a check does.
    pub kind: CheckKind,
    /// Time between checks of one server.
    pub interval: Duration,
    /// Time one check may take.
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy server healthy.
    pub rise: u32,
    /// Consecutive failures that make a healthy server unhealthy.
    pub fall: u32,
}

/// Upstream protocol for HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    Http1,
    /// HTTP/2 over cleartext (prior knowledge).
    H2c,
}

/// HTTP settings of an upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamHttp {
    /// Idle pooled connections kept per server.
    pub pool_idle_per_server: usize,
    /// Time the server has to start its response; `None` = no limit.
    pub response_timeout: Option<Duration>,
    /// HTTP/1.1 or h2c.
    pub protocol: UpstreamProtocol,
}

impl Default for UpstreamHttp {
    fn default() -> Self {
        UpstreamHttp {
            pool_idle_per_server: 64,
            response_timeout: Some(Duration::from_secs(30)),
            protocol: UpstreamProtocol::Http1,
        }
    }
}

/// One upstream pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// Its name (the key under `upstreams:`).
    pub name: String,
    /// Its server entries, never empty.
    pub servers: Vec<Server>,
    /// Re-resolve hostname servers this often; `None` = resolve once at start (retrying a
    /// name until it resolves).
    pub resolve: Option<Duration>,
    /// How a server is chosen.
    pub balance: Balance,
    /// Time allowed for a TCP connect.
    pub connect_timeout: Duration,
    /// Other servers tried when a connect fails.
    pub retries: u32,
    /// Active health checks, if any.
    pub health_check: Option<HealthCheck>,
    /// Consecutive connect failures before passive ejection; 0 disables it.
    pub eject_after: u32,
    /// How long an ejected server is skipped.
    pub eject_for: Duration,
    /// HTTP settings.
    pub http: UpstreamHttp,
    /// TLS to the servers, if configured (`tls:`).
    pub tls: Option<UpstreamTls>,
}

/// Every problem found in a configuration file, one per line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigError(pub Vec<String>);

impl Config {
    /// Reads and validates `path`; relative paths inside resolve against its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(vec![format!("{}: cannot read: {e}", path.display())]))?;
        Self::parse(path, &text)
    }

    /// The control socket named by `path`, read leniently: only `runtime.control_socket` must
    /// make sense, so the CLI can still reach a running process whose config file was since
    /// broken (and let it explain what is wrong).
    pub fn control_socket_of(path: &Path) -> Option<PathBuf> {
        #[derive(serde::Deserialize)]
        struct Lenient {
            runtime: Option<LenientRuntime>,
        }
        #[derive(serde::Deserialize)]
        struct LenientRuntime {
            control_socket: Option<String>,
        }
        let text = std::fs::read_to_string(path).ok()?;
        let l: Lenient = serde_saphyr::from_str(&text).ok()?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        Some(match l.runtime.and_then(|r| r.control_socket) {
            Some(name) => dir.join(name),
            None => runtime::default_runtime_dir(&dir).join("baton.sock"),
        })
    }

    /// Warnings about a configuration that loads (certificates expired or not yet valid,
    /// upstream certificate verification turned off), one line each, `file:line:col: key:
    /// warning: ...`: `check` prints them, `run` logs them.
    pub fn warnings(&self) -> Vec<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let listeners = self
            .listeners
            .values()
            .filter_map(|l| l.tls.as_ref())
            .flat_map(|t| t.certificates.iter())
            .flat_map(|c| c.warnings(now));
        let upstreams = self
            .upstreams
            .values()
            .filter_map(|u| u.tls.as_ref())
            .flat_map(|t| t.warnings(now));
        listeners.chain(upstreams).collect()
    }

    /// Validates `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        validate::parse(path, text)
    }
}
