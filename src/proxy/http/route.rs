//! Choosing the upstream of a request from the listener's routes.
//!
//! A route matches when its host matches (exact, or `*.suffix` for any name below the suffix;
//! the port of the Host header is ignored, case does not matter) and its path prefix is a plain
//! string prefix of the request path. Among matching routes the most specific wins: an exact host
//! beats a wildcard (a longer suffix beats a shorter), a wildcard beats no host, then the longest
//! path prefix; on a tie the route listed first wins. With no match the listener's default
//! `upstream` is used; with no default the request gets 404.

use crate::config::Route;
use std::borrow::Cow;

/// How specific a matching route is; larger wins.
type Score = (u8, usize, usize);

fn host_score(pattern: Option<&str>, host: Option<&str>) -> Option<(u8, usize)> {
    let Some(pattern) = pattern else {
        return Some((0, 0));
    };
    let host = host?;
    if let Some(suffix) = pattern.strip_prefix("*.") {
        let below = host.len() > suffix.len() + 1
            && host.ends_with(suffix)
            && host.as_bytes()[host.len() - suffix.len() - 1] == b'.';
        below.then_some((1, suffix.len()))
    } else {
        (pattern == host).then_some((2, pattern.len()))
    }
}

/// Lower-cased host name of a Host header or URI authority, without its port.
pub fn normalize_host(raw: &str) -> Cow<'_, str> {
    let raw = raw.trim();
    let name = if let Some(rest) = raw.strip_prefix('[') {
        // IPv6 literal: keep the brackets' content.
        rest.split(']').next().unwrap_or(rest)
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                raw
            }
        })
    };
    let name = name.trim_end_matches('.');
    // The common case (already lower case) borrows: no allocation per request.
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// The upstream for a request to `host` (already normalised) and `path`, or `None` (404).
pub fn select<'a>(
    routes: &'a [Route],
    default: &'a str,
    host: Option<&str>,
    path: &str,
) -> Option<&'a str> {
    let mut best: Option<(Score, &'a str)> = None;
    for r in routes {
        let Some((hrank, hlen)) = host_score(r.host.as_deref(), host) else {
            continue;
        };
        let plen = match &r.path_prefix {
            Some(p) if path.starts_with(p.as_str()) => p.len(),
            Some(_) => continue,
            None => 0,
        };
        let score = (hrank, hlen, plen);
        if best.is_none_or(|(b, _)| score > b) {
            best = Some((score, r.upstream.as_str()));
        }
    }
    match best {
        Some((_, u)) => Some(u),
        None if default.is_empty() => None,
        None => Some(default),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(host: Option<&str>, prefix: Option<&str>, up: &str) -> Route {
        Route {
            host: host.map(Into::into),
            path_prefix: prefix.map(Into::into),
            upstream: up.into(),
        }
    }

    #[test]
    fn host_then_longest_prefix() {
        let routes = vec![
            r(Some("api.example.com"), Some("/v1"), "api1"),
            r(Some("api.example.com"), Some("/v1/admin"), "admin"),
            r(Some("*.static.example.com"), None, "static"),
            r(None, Some("/health"), "health"),
            r(Some("api.example.com"), Some("/v1"), "shadowed"),
        ];
        let sel = |h: &str, p: &str| select(&routes, "app", Some(&normalize_host(h)), p);
        assert_eq!(sel("api.example.com", "/v1/users"), Some("api1"));
        assert_eq!(sel("API.example.com:8080", "/v1/admin/x"), Some("admin"));
        assert_eq!(sel("api.example.com", "/v2"), Some("app"));
        assert_eq!(sel("img.static.example.com", "/a.png"), Some("static"));
        assert_eq!(sel("a.b.static.example.com", "/"), Some("static"));
        assert_eq!(sel("static.example.com", "/"), Some("app"));
        assert_eq!(sel("xstatic.example.com", "/"), Some("app"));
        assert_eq!(sel("other", "/health/live"), Some("health"));
        assert_eq!(sel("img.static.example.com", "/health"), Some("static"));
        assert_eq!(select(&routes, "", Some("nowhere"), "/"), None);
        assert_eq!(select(&routes, "", None, "/v1"), None);
    }

    #[test]
    fn normalizes_hosts() {
        assert_eq!(normalize_host("Example.COM:80"), "example.com");
        assert_eq!(normalize_host("[::1]:8080"), "::1");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("127.0.0.1"), "127.0.0.1");
    }
}
