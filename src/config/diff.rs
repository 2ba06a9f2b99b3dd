//! What changed between two configurations, for the summary of a reload or an upgrade:
//! listeners added, removed or moved, upstream servers added or removed, routes and other
//! settings changed.

use super::{Config, ServerAddr};
use std::fmt;
use std::net::SocketAddr;

/// The differences between an old and a new [`Config`], each list sorted by name.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigDiff {
    /// Listeners only the new config has, with their address.
    pub listeners_added: Vec<(String, SocketAddr)>,
    /// Listeners only the old config has.
    pub listeners_removed: Vec<String>,
    /// Listeners whose address changed: name, old, new.
    pub listeners_moved: Vec<(String, SocketAddr, SocketAddr)>,
    /// Listeners whose routes changed.
    pub routes_changed: Vec<String>,
    /// Listeners with other settings changed (protocol, upstream, limits, timeouts).
    pub listeners_changed: Vec<String>,
    /// Upstreams only the new config has.
    pub upstreams_added: Vec<String>,
    /// Upstreams only the old config has.
    pub upstreams_removed: Vec<String>,
    /// Servers added to an upstream both configs have: upstream, server.
    pub servers_added: Vec<(String, String)>,
    /// Servers removed from an upstream both configs have: upstream, server.
    pub servers_removed: Vec<(String, String)>,
    /// Upstreams with other settings changed (weights, balancing, checks, timeouts).
    pub upstreams_changed: Vec<String>,
    /// Other sections that changed: `runtime`, `admin`, `log`.
    pub sections_changed: Vec<&'static str>,
}

impl ConfigDiff {
    /// Whether the two configurations are the same.
    pub fn is_empty(&self) -> bool {
        *self == ConfigDiff::default()
    }
}

/// Compares `old` with `new`.
pub fn diff(old: &Config, new: &Config) -> ConfigDiff {
    let mut d = ConfigDiff::default();
    for (name, l) in &new.listeners {
        match old.listeners.get(name) {
            None => d.listeners_added.push((name.clone(), l.listen)),
            Some(o) => {
                if o.listen != l.listen {
                    d.listeners_moved.push((name.clone(), o.listen, l.listen));
                }
                if o.routes != l.routes {
                    d.routes_changed.push(name.clone());
                }
                let same_rest = super::Listener {
                    listen: l.listen,
                    routes: l.routes.clone(),
                    ..o.clone()
                } == *l;
                if !same_rest {
                    d.listeners_changed.push(name.clone());
                }
            }
        }
    }
    d.listeners_removed = old
        .listeners
        .keys()
        .filter(|n| !new.listeners.contains_key(*n))
        .cloned()
        .collect();
    for (name, u) in &new.upstreams {
        let Some(o) = old.upstreams.get(name) else {
            d.upstreams_added.push(name.clone());
            continue;
        };
        let addrs = |u: &super::Upstream| -> Vec<ServerAddr> {
            u.servers.iter().map(|s| s.addr.clone()).collect()
        };
        let (old_addrs, new_addrs) = (addrs(o), addrs(u));
        for a in new_addrs.iter().filter(|a| !old_addrs.contains(a)) {
            d.servers_added.push((name.clone(), a.to_string()));
        }
        for a in old_addrs.iter().filter(|a| !new_addrs.contains(a)) {
            d.servers_removed.push((name.clone(), a.to_string()));
        }
        // Compared with the servers kept in place: a change of weight counts here.
        let kept: Vec<_> = o
            .servers
            .iter()
            .filter(|s| new_addrs.contains(&s.addr))
            .cloned()
            .collect();
        let kept_new: Vec<_> = u
            .servers
            .iter()
            .filter(|s| old_addrs.contains(&s.addr))
            .cloned()
            .collect();
        let same_rest = kept == kept_new
            && super::Upstream {
                servers: u.servers.clone(),
                ..o.clone()
            } == *u;
        if !same_rest {
            d.upstreams_changed.push(name.clone());
        }
    }
    d.upstreams_removed = old
        .upstreams
        .keys()
        .filter(|n| !new.upstreams.contains_key(*n))
        .cloned()
        .collect();
    if old.runtime != new.runtime {
        d.sections_changed.push("runtime");
    }
    if old.admin != new.admin {
        d.sections_changed.push("admin");
    }
    if old.log != new.log {
        d.sections_changed.push("log");
    }
    d
}

/// Writes `items` as `label a, b`, preceded by `; ` unless it is the first part.
fn part<T>(
    f: &mut fmt::Formatter<'_>,
    first: &mut bool,
    label: &str,
    items: &[T],
    show: impl Fn(&T) -> String,
) -> fmt::Result {
    if items.is_empty() {
        return Ok(());
    }
    if !*first {
        f.write_str("; ")?;
    }
    *first = false;
    let shown: Vec<String> = items.iter().map(show).collect();
    write!(f, "{label} {}", shown.join(", "))
}

impl fmt::Display for ConfigDiff {
    /// One line: `listeners added api (127.0.0.1:8081); servers added app 10.0.0.3:80; …`, or
    /// `config unchanged`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("config unchanged");
        }
        let first = &mut true;
        part(
            f,
            first,
            "listeners added",
            &self.listeners_added,
            |(n, a)| format!("{n} ({a})"),
        )?;
        part(
            f,
            first,
            "listeners removed",
            &self.listeners_removed,
            |n| n.clone(),
        )?;
        part(
            f,
            first,
            "listeners moved",
            &self.listeners_moved,
            |(n, o, a)| format!("{n} ({o} -> {a})"),
        )?;
        part(f, first, "routes changed on", &self.routes_changed, |n| {
            n.clone()
        })?;
        part(
            f,
            first,
            "listener settings changed on",
            &self.listeners_changed,
            |n| n.clone(),
        )?;
        part(f, first, "upstreams added", &self.upstreams_added, |n| {
            n.clone()
        })?;
        part(
            f,
            first,
            "upstreams removed",
            &self.upstreams_removed,
            |n| n.clone(),
        )?;
        part(f, first, "servers added", &self.servers_added, |(u, s)| {
            format!("{u} {s}")
        })?;
        part(
            f,
            first,
            "servers removed",
            &self.servers_removed,
            |(u, s)| format!("{u} {s}"),
        )?;
        part(
            f,
            first,
            "upstream settings changed on",
            &self.upstreams_changed,
            |n| n.clone(),
        )?;
        part(f, first, "sections changed", &self.sections_changed, |n| {
            n.to_string()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(text: &str) -> Config {
        Config::parse(Path::new("test.yaml"), text).expect("valid test config")
    }

    const OLD: &str = "
listeners:
  web: {listen: 127.0.0.1:8080, protocol: http, upstream: app}
  db: {listen: 127.0.0.1:5432, upstream: pg}
upstreams:
  app: {servers: [127.0.0.1:9001, 127.0.0.1:9002]}
  pg: {servers: [127.0.0.1:6432]}
";

    #[test]
    fn same_config_is_unchanged() {
        let d = diff(&cfg(OLD), &cfg(OLD));
        assert!(d.is_empty());
        assert_eq!(d.to_string(), "config unchanged");
    }

    #[test]
    fn every_kind_of_change_is_named() {
        let new = "
log: {level: debug}
listeners:
  web:
    listen: 127.0.0.1:8081
    protocol: http
    upstream: app
    routes: [{path_prefix: /api, upstream: api}]
  admin2: {listen: 127.0.0.1:9999, upstream: pg, max_connections: 5}
upstreams:
  app: {servers: [127.0.0.1:9002, 127.0.0.1:9003]}
  pg: {servers: [127.0.0.1:6432], connect_timeout: 1s}
  api: {servers: [127.0.0.1:7000]}
";
        let d = diff(&cfg(OLD), &cfg(new));
        assert_eq!(
            d.to_string(),
            "listeners added admin2 (127.0.0.1:9999); listeners removed db; \
             listeners moved web (127.0.0.1:8080 -> 127.0.0.1:8081); routes changed on web; \
             upstreams added api; servers added app 127.0.0.1:9003; \
             servers removed app 127.0.0.1:9001; upstream settings changed on pg; \
             sections changed log"
        );
    }

    #[test]
    fn a_weight_change_is_a_setting_change() {
        let new = OLD.replace(
            "[127.0.0.1:9001, 127.0.0.1:9002]",
            "[127.0.0.1:9001, {addr: 127.0.0.1:9002, weight: 3}]",
        );
        let d = diff(&cfg(OLD), &cfg(&new));
        assert_eq!(d.to_string(), "upstream settings changed on app");
    }
}
