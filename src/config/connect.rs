//! `listeners.X.http.connect`: which CONNECT targets an HTTP listener opens tunnels to. Off by
//! default (CONNECT gets 405); with an allow-list, a listed target gets a tunnel and any other
//! gets 403.

use super::errors::Errors;
use super::file::{ConnectRaw, S};
use std::time::Duration;

/// Default time allowed to connect to a CONNECT target.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The CONNECT settings of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectPolicy {
    /// Targets a tunnel may be opened to.
    pub allow: Vec<ConnectTarget>,
    /// Time allowed to connect to a target (504 after it).
    pub connect_timeout: Duration,
}

/// One allowed target: a host pattern and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectTarget {
    /// Lower-case host: a name, an IPv4 address or a bracketed IPv6 literal; with
    /// `wildcard`, the suffix after `*.`.
    pub host: String,
    /// `*.suffix`: any name below `suffix` (not `suffix` itself).
    pub wildcard: bool,
    /// The port; `None` for `*` (any port).
    pub port: Option<u16>,
}

impl ConnectTarget {
    /// Parses `host:port` (`db.internal:5432`, `*.internal:443`, `10.0.0.5:*`, `[::1]:22`).
    pub fn parse(s: &str) -> Result<ConnectTarget, &'static str> {
        let (host, port) = s.rsplit_once(':').ok_or("needs host:port")?;
        if host.starts_with('[') != host.ends_with(']') {
            return Err("bad IPv6 literal (write it as [addr]:port)");
        }
        if !host.starts_with('[') && host.contains(':') {
            return Err("an IPv6 address needs brackets: [addr]:port");
        }
        let port = match port {
            "*" => None,
            p => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
                _ => return Err("port must be 1-65535 or *"),
            },
        };
        let host = host.to_ascii_lowercase();
        let (wildcard, name) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, host),
        };
        let ok_name = |n: &str| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        };
        let ok = if let Some(inner) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
            !wildcard && inner.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            ok_name(&name)
        };
        if !ok {
            return Err("bad host (a name, an IP address, [IPv6], or *.suffix)");
        }
        Ok(ConnectTarget {
            host: name,
            wildcard,
            port,
        })
    }

    /// Whether `host` (lower case, brackets kept for IPv6) and `port` are this target.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        if self.wildcard {
            host.len() > self.host.len() + 1
                && host.ends_with(self.host.as_str())
                && host.as_bytes()[host.len() - self.host.len() - 1] == b'.'
        } else {
            host == self.host
        }
    }
}

impl std::fmt::Display for ConnectTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let star = if self.wildcard { "*." } else { "" };
        match self.port {
            Some(p) => write!(f, "{star}{}:{p}", self.host),
            None => write!(f, "{star}{}:*", self.host),
        }
    }
}

impl ConnectPolicy {
    /// Whether a CONNECT request target (`host:port`, as the client sent it) is allowed.
    pub fn allows(&self, target: &str) -> bool {
        let Some((host, port)) = target.rsplit_once(':') else {
            return false;
        };
        let Ok(port) = port.parse::<u16>() else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        // A trailing dot names the same host (`db.internal.`).
        let host = host.strip_suffix('.').unwrap_or(&host);
        self.allow.iter().any(|t| t.matches(host, port))
    }
}

/// Validates `listeners.X.http.connect` (`path` is its key path).
pub(super) fn validate(
    errs: &mut Errors<'_>,
    raw: &S<ConnectRaw>,
    path: &str,
) -> Option<ConnectPolicy> {
    let connect_timeout = errs.nonzero_duration(
        &raw.value.connect_timeout,
        &format!("{path}.connect_timeout"),
        DEFAULT_CONNECT_TIMEOUT,
        "every tunnel would time out before it connects",
    );
    let Some(list) = &raw.value.allow else {
        errs.at(
            raw,
            path,
            "needs allow: [host:port, ...] (remove connect to refuse CONNECT with 405)",
        );
        return None;
    };
    if list.value.is_empty() {
        errs.at(
            list,
            &format!("{path}.allow"),
            "an empty list allows nothing (remove connect to refuse CONNECT with 405)",
        );
        return None;
    }
    let mut allow = Vec::new();
    for (i, t) in list.value.iter().enumerate() {
        match ConnectTarget::parse(&t.value) {
            Ok(t) => allow.push(t),
            Err(why) => errs.at(
                t,
                &format!("{path}.allow[{i}]"),
                format!("{:?}: {why}", t.value),
            ),
        }
    }
    Some(ConnectPolicy {
        allow,
        connect_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(list: &[&str]) -> ConnectPolicy {
        ConnectPolicy {
            allow: list
                .iter()
                .map(|s| ConnectTarget::parse(s).expect("valid pattern"))
                .collect(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    #[test]
    fn patterns_parse_or_say_why() {
        for ok in [
            "127.0.0.1:5432",
            "db.internal:5432",
            "*.internal:443",
            "10.0.0.5:*",
            "[::1]:22",
            "DB.Internal:1",
        ] {
            assert!(ConnectTarget::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "db.internal",
            "db.internal:0",
            "db.internal:65536",
            "db.internal:+1",
            ":443",
            "*.:443",
            "a*.b:443",
            "::1:22",
            "[::1:22",
            "[*.x]:22",
            "db/x:1",
        ] {
            assert!(ConnectTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn targets_match_by_host_and_port() {
        let p = policy(&["127.0.0.1:5432", "*.internal:443", "10.0.0.5:*", "[::1]:22"]);
        for yes in [
            "127.0.0.1:5432",
            "db.internal:443",
            "A.B.Internal:443",
            "db.internal.:443",
            "10.0.0.5:1",
            "[::1]:22",
        ] {
            assert!(p.allows(yes), "{yes}");
        }
        for no in [
            "127.0.0.1:5433",
            "internal:443",
            "xinternal:443",
            "db.internal:444",
            "127.0.0.2:5432",
            "10.0.0.50:1",
            "[::2]:22",
            "db.internal",
            "db.internal:x",
        ] {
            assert!(!p.allows(no), "{no}");
        }
    }
}
