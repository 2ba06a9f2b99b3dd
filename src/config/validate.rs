//! From the raw file to a [`Config`]: defaults, parsing of durations and addresses, and the
//! cross-checks between sections. Every error found is reported, each as
//! `file:line:column: key.path: what is wrong`.

use super::errors::{check_log_filter, Errors, MIN_HEADER_BYTES};
use super::file::{self, S};
use super::runtime::runtime;
use super::server_addr::{parse_server_addr, MIN_RESOLVE};
use super::yaml_error::read_yaml;
use super::*;
use std::collections::HashMap;

pub(super) fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Parses and validates a whole configuration text.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let (raw, unknown) = read_yaml(path, text)?;
    let mut errs = Errors {
        file: path,
        list: unknown
            .into_iter()
            .map(|(l, c, m)| (l, c, format!("{}:{m}", path.display())))
            .collect(),
    };
    let dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."));
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());

    let runtime = runtime(&mut errs, &raw.runtime, &dir);
    let admin = raw.admin.as_ref().and_then(|a| {
        errs.addr(&a.listen, "admin.listen")
            .map(|listen| Admin { listen })
    });
    let format = errs.choice(
        &raw.log.format,
        "log.format",
        &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        LogFormat::Text,
    );
    let log = Log {
        format,
        // The access file follows the main log's format unless told otherwise.
        access_format: errs.choice(
            &raw.log.access_format,
            "log.access_format",
            &[
                ("combined", AccessFormat::Combined),
                ("json", AccessFormat::Json),
            ],
            match format {
                LogFormat::Text => AccessFormat::Combined,
                LogFormat::Json => AccessFormat::Json,
            },
        ),
        access_file: raw.log.access_file.as_deref().map(|f| resolve(&dir, f)),
        level: raw
            .log
            .level
            .as_ref()
            .map(|l| l.value.clone())
            .unwrap_or_else(|| "info".into()),
        file: raw.log.file.as_deref().map(|f| resolve(&dir, f)),
    };
    if let Some(l) = &raw.log.level {
        if let Err(e) = check_log_filter(&l.value) {
            errs.at(l, "log.level", e);
        }
    }

    let mut upstreams = BTreeMap::new();
    for (name, u) in &raw.upstreams {
        upstreams.insert(name.clone(), upstream(&mut errs, name, u, &dir));
    }
    let mut listeners = BTreeMap::new();
    let mut seen: HashMap<SocketAddr, &str> = HashMap::new();
    if let Some(a) = &admin {
        seen.insert(a.listen, "admin");
    }
    for (name, l) in &raw.listeners {
        let lst = listener(&mut errs, name, l, &raw.upstreams, &dir);
        if let Some(lst) = lst {
            // Port 0 asks the OS for a free port: never a clash.
            let clash = if lst.listen.port() == 0 {
                None
            } else {
                seen.insert(lst.listen, name)
            };
            if let Some(other) = clash {
                errs.at(
                    &l.value.listen,
                    &format!("listeners.{name}.listen"),
                    format!("address {} is already used by {other}", lst.listen),
                );
            }
            listeners.insert(name.clone(), lst);
        }
    }
    if errs.list.is_empty() {
        Ok(Config {
            source: path.to_path_buf(),
            runtime,
            admin,
            log,
            listeners,
            upstreams,
        })
    } else {
        errs.list.sort_by_key(|(l, c, _)| (*l, *c));
        Err(ConfigError(
            errs.list.into_iter().map(|(_, _, m)| m).collect(),
        ))
    }
}

fn upstream(errs: &mut Errors, name: &str, u: &S<file::Upstream>, dir: &Path) -> Upstream {
    let p = format!("upstreams.{name}");
    let raw = &u.value;
    let mut servers = Vec::new();
    if raw.servers.value.is_empty() {
        errs.at(&raw.servers, &format!("{p}.servers"), "empty server list");
    }
    for (i, s) in raw.servers.value.iter().enumerate() {
        let sp = format!("{p}.servers[{i}]");
        let (addr, weight) = match &s.value {
            file::ServerEntry::Short(a) => (a.as_str(), 1),
            file::ServerEntry::Long(l) => (l.addr.as_str(), l.weight.unwrap_or(1)),
        };
        if weight == 0 {
            errs.at(s, &format!("{sp}.weight"), "weight must be at least 1");
        }
        match parse_server_addr(addr) {
            Ok(addr) => {
                if servers.iter().any(|x: &Server| x.addr == addr) {
                    errs.at(s, &sp, format!("server {addr} is listed twice"));
                }
                servers.push(Server {
                    addr,
                    weight: weight.max(1),
                })
            }
            Err(e) => errs.at(s, &sp, e),
        }
    }
    // Judged on the raw entries, so a malformed entry does not also make `resolve` look unused.
    let has_names = raw.servers.value.iter().any(|s| {
        let a = match &s.value {
            file::ServerEntry::Short(a) => a,
            file::ServerEntry::Long(l) => &l.addr,
        };
        a.parse::<SocketAddr>().is_err()
    });
    let resolve = raw.resolve.as_ref().and_then(|r| {
        let rp = format!("{p}.resolve");
        match parse_duration(&r.value) {
            Err(e) => errs.at(r, &rp, e),
            Ok(d) if d < MIN_RESOLVE => errs.at(
                r,
                &rp,
                format!(
                    "must be at least {MIN_RESOLVE:?} (leave resolve out to resolve names once at start)"
                ),
            ),
            Ok(_) if !has_names => errs.at(
                r,
                &rp,
                "no server is a hostname, so there is nothing to re-resolve",
            ),
            Ok(d) => return Some(d),
        }
        None
    });
    let health_check = raw.health_check.as_ref().map(|h| {
        let hp = format!("{p}.health_check");
        let kind = match errs.choice(
            &h.kind,
            &format!("{hp}.kind"),
            &[("tcp", false), ("http", true)],
            false,
        ) {
            false => CheckKind::Tcp,
            true => CheckKind::Http {
                path: h.path.clone().unwrap_or_else(|| "/healthz".into()),
            },
        };
        let mut count = |v: &Option<S<u32>>, key: &str, default: u32| match v {
            Some(n) if n.value == 0 => {
                errs.at(n, &format!("{hp}.{key}"), "must be at least 1");
                default
            }
            Some(n) => n.value,
            None => default,
        };
        let rise = count(&h.rise, "rise", 2);
        let fall = count(&h.fall, "fall", 3);
        HealthCheck {
            kind,
            interval: errs.nonzero_duration(
                &h.interval,
                &format!("{hp}.interval"),
                Duration::from_secs(2),
                "servers would be checked without pause",
            ),
            timeout: errs.nonzero_duration(
                &h.timeout,
                &format!("{hp}.timeout"),
                Duration::from_secs(1),
                "every check would time out and mark its server down",
            ),
            rise,
            fall,
        }
    });
    let http = raw.http.as_ref().map(|h| {
        let d = UpstreamHttp::default();
        UpstreamHttp {
            pool_idle_per_server: h.pool_idle_per_server.unwrap_or(d.pool_idle_per_server),
            response_timeout: errs.opt_duration(
                &h.response_timeout,
                &format!("{p}.http.response_timeout"),
                d.response_timeout,
            ),
            protocol: errs.choice(
                &h.protocol,
                &format!("{p}.http.protocol"),
                &[
                    ("http1", UpstreamProtocol::Http1),
                    ("h2c", UpstreamProtocol::H2c),
                ],
                d.protocol,
            ),
        }
    });
    let h2c = http
        .as_ref()
        .is_some_and(|h| h.protocol == UpstreamProtocol::H2c);
    let tls = raw
        .tls
        .as_ref()
        .and_then(|t| super::upstream_tls::upstream_tls(errs, &p, dir, t, h2c));
    Upstream {
        name: name.to_string(),
        tls,
        servers,
        balance: errs.choice(
            &raw.balance,
            &format!("{p}.balance"),
            &[
                ("round_robin", Balance::RoundRobin),
                ("least_conn", Balance::LeastConn),
                ("random_two", Balance::RandomTwo),
                ("hash_client", Balance::HashClient),
            ],
            Balance::RoundRobin,
        ),
        connect_timeout: errs.nonzero_duration(
            &raw.connect_timeout,
            &format!("{p}.connect_timeout"),
            Duration::from_secs(2),
            "every connect would time out",
        ),
        resolve,
        retries: raw.retries.unwrap_or(2),
        health_check,
        eject_after: raw.eject_after.unwrap_or(3),
        eject_for: errs.nonzero_duration(
            &raw.eject_for,
            &format!("{p}.eject_for"),
            Duration::from_secs(10),
            "an ejection would end at once; set eject_after: 0 to turn ejection off",
        ),
        http: http.unwrap_or_default(),
    }
}

fn check_upstream_ref(
    errs: &mut Errors,
    r: &S<String>,
    path: &str,
    upstreams: &BTreeMap<String, S<file::Upstream>>,
) {
    if !upstreams.contains_key(&r.value) {
        errs.at(r, path, format!("unknown upstream {:?}", r.value));
    }
}

fn listener(
    errs: &mut Errors,
    name: &str,
    l: &S<file::Listener>,
    upstreams: &BTreeMap<String, S<file::Upstream>>,
    dir: &Path,
) -> Option<Listener> {
    let p = format!("listeners.{name}");
    let raw = &l.value;
    let listen = errs.addr(&raw.listen, &format!("{p}.listen"));
    let protocol = errs.choice(
        &raw.protocol,
        &format!("{p}.protocol"),
        &[("tcp", Protocol::Tcp), ("http", Protocol::Http)],
        Protocol::Tcp,
    );
    match &raw.upstream {
        Some(u) => check_upstream_ref(errs, u, &format!("{p}.upstream"), upstreams),
        // An HTTP listener may route only by `routes` (no match → 404); TCP has nothing else.
        None if protocol == Protocol::Http && !raw.routes.is_empty() => {}
        None if protocol == Protocol::Http => errs.at(
            l,
            &p,
            "missing key upstream (an http listener needs a default upstream or routes)",
        ),
        None => errs.at(l, &p, "missing key upstream"),
    }
    let mut routes = Vec::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let rp = format!("{p}.routes[{i}]");
        if protocol != Protocol::Http {
            errs.at(r, &rp, "routes need protocol: http");
        }
        check_upstream_ref(
            errs,
            &r.value.upstream,
            &format!("{rp}.upstream"),
            upstreams,
        );
        if let Some(h) = &r.value.host {
            let rest = h.value.strip_prefix("*.").unwrap_or(&h.value);
            if rest.is_empty() || rest.contains('*') || rest.contains('/') {
                errs.at(
                    h,
                    &format!("{rp}.host"),
                    format!("bad host pattern {:?} (exact, or *.suffix)", h.value),
                );
            }
        }
        if let Some(pp) = &r.value.path_prefix {
            if !pp.value.starts_with('/') {
                errs.at(pp, &format!("{rp}.path_prefix"), "must start with /");
            }
        }
        routes.push(Route {
            host: r.value.host.as_ref().map(|h| h.value.to_ascii_lowercase()),
            path_prefix: r.value.path_prefix.as_ref().map(|p| p.value.clone()),
            upstream: r.value.upstream.value.clone(),
        });
    }
    let max_connections = match &raw.max_connections {
        Some(m) if m.value == 0 => {
            errs.at(m, &format!("{p}.max_connections"), "must be at least 1");
            1
        }
        Some(m) => m.value,
        None => 10_000,
    };
    let http = match &raw.http {
        None => ListenerHttp::default(),
        Some(h) => {
            let d = ListenerHttp::default();
            let hp = format!("{p}.http");
            ListenerHttp {
                header_read_timeout: errs.nonzero_duration(
                    &h.header_read_timeout,
                    &format!("{hp}.header_read_timeout"),
                    d.header_read_timeout,
                    "every request would time out before its head arrived",
                ),
                request_timeout: errs.opt_duration(
                    &h.request_timeout,
                    &format!("{hp}.request_timeout"),
                    d.request_timeout,
                ),
                keepalive_timeout: errs.duration(
                    &h.keepalive_timeout,
                    &format!("{hp}.keepalive_timeout"),
                    d.keepalive_timeout,
                ),
                max_header_bytes: h
                    .max_header_bytes
                    .as_ref()
                    .and_then(|m| {
                        let path = format!("{hp}.max_header_bytes");
                        let n = errs.size(m, &path)?;
                        if n < MIN_HEADER_BYTES {
                            errs.at(
                                m,
                                &path,
                                format!("must be at least {MIN_HEADER_BYTES} (1KiB): a smaller limit refuses ordinary requests"),
                            );
                            return None;
                        }
                        usize::try_from(n).ok()
                    })
                    .unwrap_or(d.max_header_bytes),
                max_body_bytes: h
                    .max_body_bytes
                    .as_ref()
                    .and_then(|m| errs.size_or_zero(m, &format!("{hp}.max_body_bytes")))
                    .filter(|b| *b > 0),
                preserve_host: h.preserve_host.unwrap_or(d.preserve_host),
                max_uri_bytes: h.max_uri_bytes.unwrap_or(d.max_uri_bytes).max(64),
                body_timeout: errs.opt_duration(
                    &h.body_timeout,
                    &format!("{hp}.body_timeout"),
                    d.body_timeout,
                ),
                upgrade_protocols: h
                    .upgrade_protocols
                    .as_ref()
                    .map(|v| v.iter().map(|p| p.to_ascii_lowercase()).collect())
                    .unwrap_or(d.upgrade_protocols),
                connect: h
                    .connect
                    .as_ref()
                    .and_then(|c| super::connect::validate(errs, c, &format!("{hp}.connect"))),
            }
        }
    };
    if raw.http.is_some() && protocol != Protocol::Http {
        errs.at(l, &format!("{p}.http"), "http settings need protocol: http");
    }
    let idle_timeout = errs.opt_duration(&raw.idle_timeout, &format!("{p}.idle_timeout"), None);
    if protocol == Protocol::Http {
        check_upstream_alpn(errs, name, raw, upstreams);
    }
    let tls = raw
        .tls
        .as_ref()
        .and_then(|t| super::tls::listener_tls(errs, &p, dir, protocol, t));
    Some(Listener {
        name: name.to_string(),
        listen: listen?,
        protocol,
        upstream: raw
            .upstream
            .as_ref()
            .map(|u| u.value.clone())
            .unwrap_or_default(),
        max_connections,
        idle_timeout,
        backlog: raw.backlog.unwrap_or(1024),
        reuse_port: raw.reuse_port.unwrap_or(false),
        defer_accept: raw
            .defer_accept
            .unwrap_or(protocol == Protocol::Http || raw.tls.is_some()),
        routes,
        http,
        tls,
    })
}

/// The HTTP/1.1 engine speaks HTTP/1.1 to every upstream: one it reaches over TLS may offer
/// no ALPN protocol but `http/1.1` (a server that picked `h2` would be spoken to wrongly).
fn check_upstream_alpn(
    errs: &mut Errors,
    listener: &str,
    raw: &file::Listener,
    upstreams: &BTreeMap<String, S<file::Upstream>>,
) {
    let mut reach: Vec<&str> = raw
        .upstream
        .iter()
        .chain(raw.routes.iter().map(|r| &r.value.upstream))
        .map(|u| u.value.as_str())
        .collect();
    reach.sort_unstable();
    reach.dedup();
    for u in reach {
        let Some(tls) = upstreams.get(u).and_then(|x| x.value.tls.as_ref()) else {
            continue;
        };
        for (i, a) in tls.value.alpn.iter().flatten().enumerate() {
            if a.value != "http/1.1" && !a.value.is_empty() {
                errs.at(
                    a,
                    &format!("upstreams.{u}.tls.alpn[{i}]"),
                    format!(
                        "{:?} cannot be spoken to this upstream by http listener {listener:?}: the HTTP/1.1 engine speaks http/1.1 only",
                        a.value
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn log_filters() {
        for ok in [
            "info",
            "WARN",
            "warn,baton=debug",
            "baton::access=off",
            "off",
        ] {
            assert_eq!(check_log_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["inof", "", "baton=loud", "=info", "info,"] {
            assert!(check_log_filter(bad).is_err(), "{bad}");
        }
    }
}
