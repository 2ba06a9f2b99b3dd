//! `baton check --dump`: the effective configuration, every default filled in, as YAML that
//! `baton run` reads back to the same [`Config`] (like `nginx -T` or `haproxy -c -dD`).

use super::*;

/// An ordered YAML value: keys print in the order of the file's sections, not sorted.
enum Y {
    Map(Vec<(&'static str, Y)>),
    Named(Vec<(String, Y)>),
    Seq(Vec<Y>),
    Str(String),
    Num(u64),
    Float(f64),
    Bool(bool),
}

impl Serialize for Y {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Y::Map(entries) => {
                let mut m = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
            Y::Named(entries) => {
                let mut m = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
            Y::Seq(items) => {
                let mut q = s.serialize_seq(Some(items.len()))?;
                for i in items {
                    q.serialize_element(i)?;
                }
                q.end()
            }
            // Quoted, a value is read back literally, not substituted again.
            Y::Str(v) if v.contains("${") => serde_saphyr::DoubleQuoted(v.as_str()).serialize(s),
            Y::Str(v) => s.serialize_str(v),
            Y::Num(v) => s.serialize_u64(*v),
            Y::Float(v) => s.serialize_f64(*v),
            Y::Bool(v) => s.serialize_bool(*v),
        }
    }
}

fn text(s: impl fmt::Display) -> Y {
    Y::Str(s.to_string())
}

fn path(p: &Path) -> Y {
    Y::Str(p.display().to_string())
}

/// A duration as the config writes it: `0`, `250ms`, `2s`, `5m`, `1h`, `1d`, or `1.5ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if d.is_zero() {
        "0".into()
    } else if Duration::from_millis(ms as u64) != d {
        format!("{}s", d.as_secs_f64())
    } else if ms.is_multiple_of(86_400_000) {
        format!("{}d", ms / 86_400_000)
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn dur(d: Duration) -> Y {
    Y::Str(format_duration(d))
}

/// `None` ("no limit") is written `0`, which reads back as `None`.
fn opt_dur(d: Option<Duration>) -> Y {
    dur(d.unwrap_or(Duration::ZERO))
}

fn runtime(r: &Runtime) -> Y {
    let mut m = vec![
        ("pid_file", path(&r.pid_file)),
        ("control_socket", path(&r.control_socket)),
        ("drain_timeout", dur(r.drain_timeout)),
        ("upgrade_timeout", dur(r.upgrade_timeout)),
        ("worker_threads", Y::Num(r.worker_threads as u64)),
    ];
    if let Some(b) = &r.binary {
        m.push(("binary", path(b)));
    }
    m.push(("workers", Y::Num(r.workers as u64)));
    m.push((
        "accept",
        text(match r.accept {
            AcceptMode::Shared => "shared",
            AcceptMode::Reuseport => "reuseport",
        }),
    ));
    let l = &r.worker_limits;
    let mut limits = Vec::new();
    if let Some(v) = l.memory {
        limits.push(("memory", Y::Num(v)));
    }
    if let Some(v) = l.cpu {
        limits.push(("cpu", Y::Float(v)));
    }
    if let Some(v) = l.pids {
        limits.push(("pids", Y::Num(v)));
    }
    if let Some(v) = l.nofile {
        limits.push(("nofile", Y::Num(v)));
    }
    if let Some(v) = &l.cpuset {
        limits.push(("cpuset", text(v)));
    }
    if let Some(v) = l.io_weight {
        limits.push(("io_weight", Y::Num(v)));
    }
    if let Some(v) = &l.cpuset {
        limits.push(("cpuset", text(v)));
    }
    if let Some(v) = l.io_weight {
        limits.push(("io_weight", Y::Num(v)));
    }
    if !limits.is_empty() {
        m.push(("worker_limits", Y::Map(limits)));
    }
    isolation(&r.isolation, &mut m);
    Y::Map(m)
}

/// The isolation keys, users and groups by the name found on this host.
fn isolation(i: &super::Isolation, m: &mut Vec<(&'static str, Y)>) {
    if let Some(u) = &i.user {
        m.push(("user", text(&u.name)));
    }
    if let Some(g) = &i.group {
        m.push(("group", text(&g.name)));
    }
    if !i.capabilities.is_empty() {
        m.push((
            "capabilities",
            Y::Seq(i.capabilities.iter().map(text).collect()),
        ));
    }
    if i.worker_isolation {
        m.push(("worker_isolation", Y::Bool(true)));
    }
    match &i.cpu_affinity {
        super::CpuAffinity::None => {}
        super::CpuAffinity::Auto => m.push(("cpu_affinity", text("auto"))),
        super::CpuAffinity::Lists(l) => m.push((
            "cpu_affinity",
            Y::Seq(
                l.iter()
                    .map(|cpus| Y::Seq(cpus.iter().map(|c| Y::Num(*c as u64)).collect()))
                    .collect(),
            ),
        )),
    }
}

fn log(l: &Log) -> Y {
    let mut m = vec![
        (
            "format",
            text(match l.format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }),
        ),
        ("level", text(&l.level)),
    ];
    if let Some(f) = &l.file {
        m.push(("file", path(f)));
    }
    if let Some(f) = &l.access_file {
        m.push(("access_file", path(f)));
    }
    m.push((
        "access_format",
        text(match l.access_format {
            AccessFormat::Combined => "combined",
            AccessFormat::Json => "json",
        }),
    ));
    Y::Map(m)
}

fn listener(l: &Listener) -> Y {
    let mut m = vec![("listen", text(l.listen)), ("protocol", text(l.protocol))];
    if !l.upstream.is_empty() {
        m.push(("upstream", text(&l.upstream)));
    }
    m.extend([
        ("max_connections", Y::Num(l.max_connections as u64)),
        ("idle_timeout", opt_dur(l.idle_timeout)),
        ("backlog", Y::Num(u64::from(l.backlog))),
        ("reuse_port", Y::Bool(l.reuse_port)),
        ("defer_accept", Y::Bool(l.defer_accept)),
    ]);
    if let Some(t) = &l.tls {
        m.push(("tls", tls(t)));
    }
    if l.protocol != Protocol::Http {
        return Y::Map(m);
    }
    let routes = l
        .routes
        .iter()
        .map(|r| {
            let mut e = Vec::new();
            if let Some(h) = &r.host {
                e.push(("host", text(h)));
            }
            if let Some(p) = &r.path_prefix {
                e.push(("path_prefix", text(p)));
            }
            e.push(("upstream", text(&r.upstream)));
            Y::Map(e)
        })
        .collect();
    m.push(("routes", Y::Seq(routes)));
    let h = &l.http;
    let mut hm = vec![
        ("header_read_timeout", dur(h.header_read_timeout)),
        ("request_timeout", opt_dur(h.request_timeout)),
        ("keepalive_timeout", dur(h.keepalive_timeout)),
        ("max_header_bytes", Y::Num(h.max_header_bytes as u64)),
        ("max_body_bytes", Y::Num(h.max_body_bytes.unwrap_or(0))),
        ("preserve_host", Y::Bool(h.preserve_host)),
    ];
    if let Some(c) = &h.connect {
        hm.push((
            "connect",
            Y::Map(vec![
                ("allow", Y::Seq(c.allow.iter().map(text).collect())),
                ("connect_timeout", dur(c.connect_timeout)),
            ]),
        ));
    }
    m.push(("http", Y::Map(hm)));
    Y::Map(m)
}

fn tls(t: &ListenerTls) -> Y {
    let certs = t
        .certificates
        .iter()
        .map(|c| Y::Map(vec![("cert", path(&c.cert)), ("key", path(&c.key))]))
        .collect();
    Y::Map(vec![
        ("certificates", Y::Seq(certs)),
        ("alpn", Y::Seq(t.alpn.iter().map(text).collect())),
        ("min_version", text(t.min_version)),
        ("handshake_timeout", dur(t.handshake_timeout)),
    ])
}

fn upstream(u: &Upstream) -> Y {
    let servers = u
        .servers
        .iter()
        .map(|s| {
            Y::Map(vec![
                ("addr", text(&s.addr)),
                ("weight", Y::Num(u64::from(s.weight))),
            ])
        })
        .collect();
    let mut m = vec![("servers", Y::Seq(servers))];
    if let Some(r) = u.resolve {
        m.push(("resolve", dur(r)));
    }
    m.extend([
        (
            "balance",
            text(match u.balance {
                Balance::RoundRobin => "round_robin",
                Balance::LeastConn => "least_conn",
                Balance::RandomTwo => "random_two",
                Balance::HashClient => "hash_client",
            }),
        ),
        ("connect_timeout", dur(u.connect_timeout)),
        ("retries", Y::Num(u64::from(u.retries))),
    ]);
    if let Some(h) = &u.health_check {
        let mut c = match &h.kind {
            CheckKind::Tcp => vec![("kind", text("tcp"))],
            CheckKind::Http { path } => vec![("kind", text("http")), ("path", text(path))],
        };
        c.extend([
            ("interval", dur(h.interval)),
            ("timeout", dur(h.timeout)),
            ("rise", Y::Num(u64::from(h.rise))),
            ("fall", Y::Num(u64::from(h.fall))),
        ]);
        m.push(("health_check", Y::Map(c)));
    }
    m.extend([
        ("eject_after", Y::Num(u64::from(u.eject_after))),
        ("eject_for", dur(u.eject_for)),
    ]);
    let h = &u.http;
    m.push((
        "http",
        Y::Map(vec![
            (
                "pool_idle_per_server",
                Y::Num(h.pool_idle_per_server as u64),
            ),
            ("response_timeout", opt_dur(h.response_timeout)),
            (
                "protocol",
                text(match h.protocol {
                    UpstreamProtocol::Http1 => "http1",
                    UpstreamProtocol::H2c => "h2c",
                }),
            ),
        ]),
    ));
    if let Some(t) = &u.tls {
        m.push(("tls", upstream_tls(t)));
    }
    Y::Map(m)
}

/// `upstreams.X.tls`: `ca` only when a file is named (the default is the system's roots).
fn upstream_tls(t: &UpstreamTls) -> Y {
    let mut m = Vec::new();
    if let TrustRoots::File(f) = &t.roots {
        m.push(("ca", path(f)));
    }
    if let Some(n) = &t.server_name {
        m.push(("server_name", text(n)));
    }
    if let Some(c) = &t.client_certificate {
        m.push((
            "client_certificate",
            Y::Map(vec![("cert", path(&c.cert)), ("key", path(&c.key))]),
        ));
    }
    m.push(("verify", Y::Bool(t.verify)));
    m.push(("alpn", Y::Seq(t.alpn.iter().map(text).collect())));
    Y::Map(m)
}

impl Config {
    /// The effective configuration as YAML, every default filled in and every path absolute;
    /// reading it back gives the same configuration.
    pub fn dump(&self) -> String {
        let mut top = vec![("runtime", runtime(&self.runtime))];
        if let Some(a) = &self.admin {
            top.push(("admin", Y::Map(vec![("listen", text(a.listen))])));
        }
        top.push(("log", log(&self.log)));
        top.push((
            "listeners",
            Y::Named(
                self.listeners
                    .iter()
                    .map(|(n, l)| (n.clone(), listener(l)))
                    .collect(),
            ),
        ));
        top.push((
            "upstreams",
            Y::Named(
                self.upstreams
                    .iter()
                    .map(|(n, u)| (n.clone(), upstream(u)))
                    .collect(),
            ),
        ));
        let body = serde_saphyr::to_string(&Y::Map(top))
            .unwrap_or_else(|e| format!("# cannot write the configuration: {e}\n"));
        format!(
            "# effective configuration of {}, defaults filled in\n{body}",
            self.source.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_back() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(250),
            Duration::from_secs(2),
            Duration::from_secs(300),
            Duration::from_secs(7200),
            Duration::from_secs(86400),
            Duration::from_micros(1500),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{d:?}");
        }
    }

    #[test]
    fn dump_reads_back_to_the_same_config() {
        let text = "
runtime: {drain_timeout: 90s, workers: 2, worker_limits: {memory: 1.5GiB, cpu: 1.5}, cpu_affinity: [[0], [0, 1]], user: root}
admin: {listen: 127.0.0.1:9901}
log: {level: warn, format: json, access_file: a.log, access_format: combined}
listeners:
  web:
    listen: 127.0.0.1:8080
    protocol: http
    routes: [{host: '*.example.com', path_prefix: /api, upstream: api}]
    http: {request_timeout: 0, max_body_bytes: 1MiB}
  db: {listen: 127.0.0.1:5432, upstream: pg, idle_timeout: 1h}
upstreams:
  api:
    servers: [127.0.0.1:9001, {addr: localhost:9002, weight: 3}]
    resolve: 30s
    health_check: {kind: http, path: /ready, interval: 500ms}
    http: {protocol: h2c}
  pg: {servers: [127.0.0.1:6432], balance: least_conn, eject_after: 0}
";
        let cfg = Config::parse(Path::new("/etc/baton/config.yaml"), text).expect("valid");
        let dumped = cfg.dump();
        let again = Config::parse(Path::new("/etc/baton/config.yaml"), &dumped)
            .unwrap_or_else(|e| panic!("dump does not read back: {e}\n{dumped}"));
        assert_eq!(cfg, again, "{dumped}");
        assert!(dumped.contains("connect_timeout: 2s"), "{dumped}");
        assert!(dumped.contains("/etc/baton/baton.sock"), "{dumped}");
    }
}
