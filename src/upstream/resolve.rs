//! DNS discovery: servers given as `host:port` become one server per address the name
//! resolves to, and follow the records when the upstream says `resolve: <interval>`.
//!
//! One task per pool with hostname entries resolves them ([`start`] spawns the tasks and waits
//! briefly for their first answers, so the first connections find servers). Each answer is
//! compared with the name's previous addresses; on a change the pool's whole set is rebuilt in
//! configuration order and swapped in ([`Upstream::set_servers`]), and the change is logged with
//! `upstream`, `name`, `added` and `removed`. A failed lookup never removes servers: the name
//! keeps its last addresses (a DNS outage must not empty a pool), and a name that has never
//! resolved is retried with a growing delay. Without `resolve`, names are resolved once (each
//! retried until it resolves) and then left alone.
//!
//! Names go to the system resolver (tokio's `lookup_host`: getaddrinfo, so /etc/hosts and DNS
//! as nsswitch.conf says) unless, in a build with the test hooks ([`crate::test_hooks`]),
//! `BATON_HOSTS_FILE` names an /etc/hosts-style file, which is then the only source, read again
//! at every lookup: it lets a test move a name between addresses without a DNS server.

use super::{ServerSpec, Upstream, Upstreams};
use crate::config::ServerAddr;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// The environment variable that points name resolution at a hosts file (test hooks only).
#[cfg(feature = "test-hooks")]
pub const HOSTS_FILE_ENV: &str = "BATON_HOSTS_FILE";

/// How long [`start`] waits for the first answers before letting the process go on.
pub const FIRST_WAIT: Duration = Duration::from_secs(2);

/// Time allowed for one lookup.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// First retry delay of a name that has never resolved; doubled per failure up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);

/// Longest retry delay of a name that has never resolved.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Where names are looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolver {
    /// The system resolver (getaddrinfo through `tokio::net::lookup_host`).
    System,
    /// Only this /etc/hosts-style file (`ip name...` lines), read at every lookup.
    HostsFile(PathBuf),
}

/// Why a name did not resolve.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    /// The system resolver failed.
    #[error("{0}")]
    Lookup(String),
    /// The lookup succeeded but gave no address.
    #[error("no address found")]
    NoAddress,
    /// The hosts file could not be read.
    #[error("cannot read hosts file {path}: {reason}")]
    HostsFile {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The lookup did not finish in time.
    #[error("lookup timed out after {0:?}")]
    Timeout(Duration),
}

impl Resolver {
    /// The system resolver, or (test hooks only) the hosts file named by `BATON_HOSTS_FILE`
    /// when it is set and not empty.
    pub fn from_env() -> Resolver {
        #[cfg(feature = "test-hooks")]
        if let Some(p) = std::env::var_os(HOSTS_FILE_ENV).filter(|p| !p.is_empty()) {
            return Resolver::HostsFile(PathBuf::from(p));
        }
        Resolver::System
    }

    /// The addresses of `host` with `port`, sorted and without duplicates; never empty.
    pub async fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        let mut addrs: Vec<SocketAddr> = match self {
            Resolver::System => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| ResolveError::Lookup(e.to_string()))?
                .collect(),
            Resolver::HostsFile(path) => {
                let text =
                    tokio::fs::read_to_string(path)
                        .await
                        .map_err(|e| ResolveError::HostsFile {
                            path: path.display().to_string(),
                            reason: e.to_string(),
                        })?;
                hosts_lookup(&text, host)
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect()
            }
        };
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(ResolveError::NoAddress);
        }
        Ok(addrs)
    }
}

/// The addresses an /etc/hosts-style text gives `host`: lines `ip name [alias...]`, `#`
/// starting a comment; names compared without case and without a trailing dot; lines whose
/// first field is not an IP address skipped.
pub fn hosts_lookup(text: &str, host: &str) -> Vec<IpAddr> {
    let want = host.strip_suffix('.').unwrap_or(host);
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        if fields.any(|n| n.strip_suffix('.').unwrap_or(n).eq_ignore_ascii_case(want)) {
            out.push(ip);
        }
    }
    out
}

/// Starts DNS discovery for every pool with hostname entries, stopped by `shutdown`, and
/// waits until each has had its first answers (at most [`FIRST_WAIT`]): the first connections
/// then find servers, and a name not resolved by then is retried in the background.
pub async fn start(upstreams: &Upstreams, shutdown: CancellationToken) {
    let resolver = Resolver::from_env();
    let mut first = Vec::new();
    for up in upstreams.values() {
        if !up.config().servers.iter().any(|s| is_name(&s.addr)) {
            continue;
        }
        if let Resolver::HostsFile(path) = &resolver {
            tracing::info!(upstream = %up.name(), hosts_file = %path.display(), "resolving server names from a hosts file only");
        }
        first.push(spawn(up, resolver.clone(), shutdown.clone()));
    }
    let all = async {
        for rx in first {
            let _ = rx.await;
        }
    };
    if tokio::time::timeout(FIRST_WAIT, all).await.is_err() {
        tracing::warn!(wait = ?FIRST_WAIT, "server names not all resolved yet; going on and resolving them in the background");
    }
}

fn is_name(a: &ServerAddr) -> bool {
    matches!(a, ServerAddr::Name { .. })
}

/// Starts the discovery task of one pool; the receiver completes after its first round.
pub fn spawn(
    up: &Arc<Upstream>,
    resolver: Resolver,
    shutdown: CancellationToken,
) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    let entries = up
        .config()
        .servers
        .iter()
        .map(|s| match &s.addr {
            ServerAddr::Ip(addr) => Entry::Static(ServerSpec {
                addr: *addr,
                weight: s.weight,
                name: None,
            }),
            ServerAddr::Name { host, port } => Entry::Name(Name {
                label: Arc::from(s.addr.to_string()),
                host: host.clone(),
                port: *port,
                weight: s.weight,
                addrs: None,
                failing: false,
            }),
        })
        .collect();
    let task = Task {
        up: Arc::downgrade(up),
        upstream: up.name().to_string(),
        entries,
        resolver,
        interval: up.config().resolve,
        shutdown,
    };
    tokio::spawn(task.run(tx));
    rx
}

/// One server entry of a pool, as discovery tracks it.
enum Entry {
    /// `ip:port`: always in the set.
    Static(ServerSpec),
    /// `host:port`: in the set with its last resolved addresses.
    Name(Name),
}

/// A hostname entry and what it last resolved to.
struct Name {
    /// `host:port`, as logged and shown in status.
    label: Arc<str>,
    host: String,
    port: u16,
    weight: u32,
    /// The last answer; `None` until the name first resolves.
    addrs: Option<Vec<SocketAddr>>,
    /// The last lookup failed (a warning was logged; the next success says so).
    failing: bool,
}

/// The discovery task of one pool.
struct Task {
    /// The pool, weak so that a dropped pool ends its discovery.
    up: Weak<Upstream>,
    /// Its name, for logs.
    upstream: String,
    /// Its entries in configuration order.
    entries: Vec<Entry>,
    resolver: Resolver,
    /// `resolve`: re-resolve every name this often; `None` = until each has resolved once.
    interval: Option<Duration>,
    shutdown: CancellationToken,
}

impl Task {
    async fn run(mut self, first: oneshot::Sender<()>) {
        let mut first = Some(first);
        let mut retry = RETRY_FIRST;
        let shutdown = self.shutdown.clone();
        loop {
            let resolved = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.round() => r,
            };
            if !resolved {
                return; // the pool is gone
            }
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
            let never = self.names().filter(|n| n.addrs.is_none()).count();
            let wait = if never > 0 {
                let w = retry.min(self.interval.unwrap_or(RETRY_MAX));
                retry = (retry * 2).min(RETRY_MAX);
                w
            } else {
                match self.interval {
                    Some(d) => d,
                    None => return,
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn names(&self) -> impl Iterator<Item = &Name> {
        self.entries.iter().filter_map(|e| match e {
            Entry::Name(n) => Some(n),
            Entry::Static(_) => None,
        })
    }

    /// Looks up every name due (all with `resolve`, else those never resolved) and applies
    /// each change to the pool. False when the pool is gone.
    async fn round(&mut self) -> bool {
        for i in 0..self.entries.len() {
            let Entry::Name(n) = &self.entries[i] else {
                continue;
            };
            if self.interval.is_none() && n.addrs.is_some() {
                continue;
            }
            let answer =
                match tokio::time::timeout(LOOKUP_TIMEOUT, self.resolver.lookup(&n.host, n.port))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(ResolveError::Timeout(LOOKUP_TIMEOUT)),
                };
            let Some(up) = self.up.upgrade() else {
                return false;
            };
            let Entry::Name(n) = &mut self.entries[i] else {
                continue;
            };
            let addrs = match answer {
                Ok(a) => a,
                Err(e) => {
                    let kept = n.addrs.as_ref().map_or(0, Vec::len);
                    if n.failing {
                        tracing::debug!(upstream = %self.upstream, name = %n.label, error = %e, kept, "cannot resolve server name");
                    } else if n.addrs.is_none() {
                        tracing::warn!(upstream = %self.upstream, name = %n.label, error = %e, "cannot resolve server name; it has no servers yet, retrying");
                    } else {
                        tracing::warn!(upstream = %self.upstream, name = %n.label, error = %e, kept, "cannot resolve server name; keeping its last addresses");
                    }
                    n.failing = true;
                    continue;
                }
            };
            if n.failing {
                if n.addrs.is_some() {
                    tracing::info!(upstream = %self.upstream, name = %n.label, addrs = addrs.len(), "server name resolves again");
                } else {
                    tracing::info!(upstream = %self.upstream, name = %n.label, addrs = addrs.len(), "server name resolved after failing");
                }
                n.failing = false;
            }
            let prev = n.addrs.take().unwrap_or_default();
            let added: Vec<SocketAddr> = addrs
                .iter()
                .filter(|a| !prev.contains(a))
                .copied()
                .collect();
            let removed: Vec<SocketAddr> = prev
                .iter()
                .filter(|a| !addrs.contains(a))
                .copied()
                .collect();
            n.addrs = Some(addrs);
            if added.is_empty() && removed.is_empty() {
                continue;
            }
            let label = n.label.clone();
            up.set_servers(&self.specs());
            tracing::info!(upstream = %self.upstream, name = %label, added = ?added, removed = ?removed,
                servers = up.status().len(), "upstream servers changed");
        }
        true
    }

    /// The pool's servers as the entries now say, in configuration order.
    fn specs(&self) -> Vec<ServerSpec> {
        let mut out = Vec::new();
        for e in &self.entries {
            match e {
                Entry::Static(s) => out.push(s.clone()),
                Entry::Name(n) => {
                    for a in n.addrs.iter().flatten() {
                        out.push(ServerSpec {
                            addr: *a,
                            weight: n.weight,
                            name: Some(n.label.clone()),
                        });
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    #[test]
    fn hosts_file_lines() {
        let text = "# comment\n127.0.0.1 localhost\n10.0.0.1 app.test other # trailing\n\n\
                    not-an-ip app.test\n10.0.0.2\tAPP.test.\n::1 app.test\n10.0.0.3 xapp.test\n";
        let ips: Vec<String> = hosts_lookup(text, "app.test")
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(ips, vec!["10.0.0.1", "10.0.0.2", "::1"]);
        assert_eq!(hosts_lookup(text, "App.Test.").len(), 3);
        assert!(hosts_lookup(text, "missing.test").is_empty());
        assert!(hosts_lookup("10.0.0.9 # app.test\n", "app.test").is_empty());
    }

    #[tokio::test]
    async fn hosts_file_resolver() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(
            &path,
            "10.0.0.2 app.test\n10.0.0.1 app.test\n10.0.0.1 app.test\n",
        )
        .unwrap();
        let r = Resolver::HostsFile(path.clone());
        assert_eq!(
            r.lookup("app.test", 80).await,
            Ok(vec![
                SocketAddr::from(([10, 0, 0, 1], 80)),
                SocketAddr::from(([10, 0, 0, 2], 80))
            ])
        );
        assert_eq!(
            r.lookup("nope.test", 80).await,
            Err(ResolveError::NoAddress)
        );
        let gone = Resolver::HostsFile(dir.path().join("missing"));
        assert!(matches!(
            gone.lookup("app.test", 80).await,
            Err(ResolveError::HostsFile { .. })
        ));
    }

    #[tokio::test]
    async fn system_resolver_reads_localhost() {
        // /etc/hosts (or the resolver) knows localhost on every machine this runs on.
        let addrs = Resolver::System.lookup("localhost", 8080).await.unwrap();
        assert!(
            addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 8080),
            "{addrs:?}"
        );
    }

    fn upstream(resolve: Option<Duration>) -> Arc<Upstream> {
        Upstream::new(&config::Upstream {
            name: "u".into(),
            servers: vec![
                config::Server {
                    addr: ServerAddr::Name {
                        host: "app.test".into(),
                        port: 9000,
                    },
                    weight: 2,
                },
                config::Server {
                    addr: SocketAddr::from(([10, 0, 0, 9], 9000)).into(),
                    weight: 1,
                },
            ],
            balance: config::Balance::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            retries: 0,
            health_check: None,
            resolve,
            eject_after: 0,
            eject_for: Duration::from_secs(1),
            http: config::UpstreamHttp::default(),
            tls: None,
        })
    }

    fn ips(u: &Upstream) -> Vec<(String, u32, Option<String>)> {
        u.status()
            .into_iter()
            .map(|s| (s.addr.to_string(), s.weight, s.name))
            .collect()
    }

    async fn wait_for(u: &Upstream, want: &[&str]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let now: Vec<String> = ips(u).into_iter().map(|x| x.0).collect();
            if now == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "servers {now:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn discovery_follows_the_hosts_file() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "10.0.0.1 app.test\n").unwrap();
        let u = upstream(Some(Duration::from_millis(100)));
        assert_eq!(ips(&u).len(), 1, "only the static server before resolution");
        let shutdown = CancellationToken::new();
        let first = spawn(&u, Resolver::HostsFile(hosts.clone()), shutdown.clone());
        first.await.unwrap();
        assert_eq!(
            ips(&u),
            vec![
                ("10.0.0.1:9000".into(), 2, Some("app.test:9000".into())),
                ("10.0.0.9:9000".into(), 1, None)
            ]
        );
        std::fs::write(&hosts, "10.0.0.3 app.test\n10.0.0.1 app.test\n").unwrap();
        wait_for(&u, &["10.0.0.1:9000", "10.0.0.3:9000", "10.0.0.9:9000"]).await;
        // (That a failed lookup keeps the last addresses is checked in tests/upstream_dns.rs,
        // where the log says when the lookup failed.)
        std::fs::write(&hosts, "10.0.0.3 app.test\n").unwrap();
        wait_for(&u, &["10.0.0.3:9000", "10.0.0.9:9000"]).await;
        shutdown.cancel();
    }

    #[tokio::test]
    async fn without_resolve_a_name_is_retried_until_it_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "").unwrap();
        let u = upstream(None);
        let shutdown = CancellationToken::new();
        let first = spawn(&u, Resolver::HostsFile(hosts.clone()), shutdown.clone());
        first.await.unwrap();
        assert_eq!(ips(&u).len(), 1);
        std::fs::write(&hosts, "10.0.0.1 app.test\n").unwrap();
        wait_for(&u, &["10.0.0.1:9000", "10.0.0.9:9000"]).await;
        shutdown.cancel();
    }
}
