//! The raw shape of `config.yaml`, exactly as serde reads it.
//!
//! Unknown keys are skipped here and reported, every one with its position, by
//! `config::unknown` (serde's `deny_unknown_fields` would stop at the first). Values that validation may still refuse (addresses,
//! durations, names of other sections) keep their source position through [`Spanned`], so an
//! error can point at the line and column the operator has to fix.

use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::BTreeMap;

/// A value with the place in the file it came from.
pub type S<T> = Spanned<T>;

/// The whole file.
#[derive(Debug, Deserialize)]
pub struct File {
    #[serde(default)]
    pub runtime: Runtime,
    pub admin: Option<Admin>,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub listeners: BTreeMap<String, S<Listener>>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, S<Upstream>>,
}

/// `runtime:` — process-wide settings.
#[derive(Debug, Default, Deserialize)]
pub struct Runtime {
    pub pid_file: Option<String>,
    pub control_socket: Option<String>,
    pub drain_timeout: Option<S<String>>,
    pub upgrade_timeout: Option<S<String>>,
    pub worker_threads: Option<S<usize>>,
    /// Binary started on upgrade; default: the path this process was started from.
    pub binary: Option<String>,
    /// Worker processes: a number or `auto`.
    pub workers: Option<S<NumOrText>>,
    /// How workers accept: `shared` or `reuseport`.
    pub accept: Option<S<String>>,
    /// Per-worker resource limits.
    pub worker_limits: Option<WorkerLimits>,
    /// Isolation (`super::isolation`): drop to this user after binding.
    pub user: Option<S<String>>,
    /// And this group.
    pub group: Option<S<String>>,
    /// Capabilities kept after the drop.
    pub capabilities: Option<Vec<S<String>>>,
    /// PID, mount and IPC namespaces per worker.
    pub worker_isolation: Option<bool>,
    /// `auto` or a list of CPU lists.
    pub cpu_affinity: Option<S<super::isolation::RawCpuAffinity>>,
}

/// `runtime.worker_limits:`.
#[derive(Debug, Default, Deserialize)]
pub struct WorkerLimits {
    pub memory: Option<S<NumOrText>>,
    pub cpu: Option<S<f64>>,
    pub pids: Option<S<u64>>,
    pub nofile: Option<S<u64>>,
    pub cpuset: Option<S<String>>,
    pub io_weight: Option<S<u64>>,
}

/// A scalar that may be written as a number (`2`) or a word (`auto`, `512MiB`).
#[derive(Debug, Clone)]
pub enum NumOrText {
    Num(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for NumOrText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = NumOrText;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number or a word")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<NumOrText, E> {
                Ok(NumOrText::Num(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<NumOrText, E> {
                u64::try_from(v)
                    .map(NumOrText::Num)
                    .map_err(|_| E::custom(format!("{v} is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<NumOrText, E> {
                Ok(NumOrText::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `admin:` — the HTTP admin endpoint.
#[derive(Debug, Deserialize)]
pub struct Admin {
    pub listen: S<String>,
}

/// `log:` — format and level.
#[derive(Debug, Default, Deserialize)]
pub struct Log {
    pub format: Option<S<String>>,
    pub level: Option<S<String>>,
    pub file: Option<String>,
    pub access_file: Option<String>,
    pub access_format: Option<S<String>>,
}

/// One entry of `listeners:`.
#[derive(Debug, Deserialize)]
pub struct Listener {
    pub listen: S<String>,
    pub protocol: Option<S<String>>,
    pub upstream: Option<S<String>>,
    pub max_connections: Option<S<usize>>,
    pub idle_timeout: Option<S<String>>,
    pub backlog: Option<u32>,
    pub reuse_port: Option<bool>,
    pub defer_accept: Option<bool>,
    #[serde(default)]
    pub routes: Vec<S<Route>>,
    pub http: Option<ListenerHttp>,
    /// TLS termination (`super::tls`).
    pub tls: Option<S<ListenerTls>>,
}

/// `listeners.X.tls:`.
#[derive(Debug, Deserialize)]
pub struct ListenerTls {
    /// The first is the default; the others are chosen by SNI.
    pub certificates: S<Vec<S<CertEntry>>>,
    pub alpn: Option<Vec<S<String>>>,
    /// `"1.2"` or `"1.3"`.
    pub min_version: Option<S<String>>,
    pub handshake_timeout: Option<S<String>>,
}

/// One entry of `listeners.X.tls.certificates`.
#[derive(Debug, Deserialize)]
pub struct CertEntry {
    /// PEM: the certificate, then its chain.
    pub cert: S<String>,
    /// PEM: the private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key: S<String>,
}

/// One entry of `listeners.X.routes`.
#[derive(Debug, Deserialize)]
pub struct Route {
    pub host: Option<S<String>>,
    pub path_prefix: Option<S<String>>,
    pub upstream: S<String>,
}

/// `listeners.X.http:`.
#[derive(Debug, Default, Deserialize)]
pub struct ListenerHttp {
    pub header_read_timeout: Option<S<String>>,
    pub request_timeout: Option<S<String>>,
    pub keepalive_timeout: Option<S<String>>,
    /// A size: a number of bytes or `64KiB`.
    pub max_header_bytes: Option<S<NumOrText>>,
    /// A size; `0` = unlimited.
    pub max_body_bytes: Option<S<NumOrText>>,
    pub preserve_host: Option<bool>,
    pub max_uri_bytes: Option<usize>,
    pub body_timeout: Option<S<String>>,
    pub upgrade_protocols: Option<Vec<String>>,
    pub connect: Option<S<ConnectRaw>>,
}

/// `listeners.X.http.connect:` (CONNECT tunnels to listed targets).
#[derive(Debug, Deserialize)]
pub struct ConnectRaw {
    /// `host:port` patterns: `db.internal:5432`, `*.internal:443`, `10.0.0.5:*`, `[::1]:22`.
    pub allow: Option<S<Vec<S<String>>>>,
    pub connect_timeout: Option<S<String>>,
}

/// One entry of `upstreams:`.
#[derive(Debug, Deserialize)]
pub struct Upstream {
    pub servers: S<Vec<S<ServerEntry>>>,
    pub balance: Option<S<String>>,
    pub connect_timeout: Option<S<String>>,
    pub retries: Option<u32>,
    pub health_check: Option<HealthCheck>,
    pub eject_after: Option<u32>,
    pub eject_for: Option<S<String>>,
    pub http: Option<UpstreamHttp>,
    /// Re-resolution interval of hostname servers.
    pub resolve: Option<S<String>>,
    /// TLS to the servers (`super::upstream_tls`).
    pub tls: Option<S<UpstreamTls>>,
}

/// `upstreams.X.tls:`.
#[derive(Debug, Deserialize)]
pub struct UpstreamTls {
    /// PEM file of the CAs that may sign the servers' certificates; default: the system's roots.
    pub ca: Option<S<String>>,
    /// The name sent as SNI and verified; default: each server's host name.
    pub server_name: Option<S<String>>,
    /// A certificate baton presents when a server asks for one.
    pub client_certificate: Option<S<CertEntry>>,
    /// `false` turns certificate verification off (a loudly warned escape hatch).
    pub verify: Option<S<bool>>,
    /// ALPN protocols offered.
    pub alpn: Option<Vec<S<String>>>,
}

/// A server: `"host:port"` or `{ addr: "host:port", weight: 3 }`.
///
/// Not `#[serde(untagged)]`: an untagged enum swallows the inner error ("did not match any
/// variant"), so a typo such as `wieght` would not be named. The visitor below picks the form
/// from the YAML node's shape and lets the long form report its own errors.
#[derive(Debug)]
pub enum ServerEntry {
    Short(String),
    Long(ServerLong),
}

impl<'de> Deserialize<'de> for ServerEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ServerEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a server: \"host:port\" or {addr: \"host:port\", weight: N}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ServerEntry, E> {
                Ok(ServerEntry::Short(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<ServerEntry, A::Error> {
                ServerLong::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(ServerEntry::Long)
            }
        }
        d.deserialize_any(V)
    }
}

/// The long form of a server.
#[derive(Debug, Deserialize)]
pub struct ServerLong {
    pub addr: String,
    pub weight: Option<u32>,
}

/// `upstreams.X.health_check:`.
#[derive(Debug, Deserialize)]
pub struct HealthCheck {
    pub kind: Option<S<String>>,
    pub path: Option<String>,
    pub interval: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub rise: Option<S<u32>>,
    pub fall: Option<S<u32>>,
}

/// `upstreams.X.http:`.
#[derive(Debug, Default, Deserialize)]
pub struct UpstreamHttp {
    pub pool_idle_per_server: Option<usize>,
    pub response_timeout: Option<S<String>>,
    pub protocol: Option<S<String>>,
}
