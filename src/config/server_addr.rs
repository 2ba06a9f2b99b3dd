//! Server addresses of upstreams: `ip:port`, or `host:port` for DNS discovery. Names are
//! checked for syntax only; nothing is resolved at config time (see src/upstream/resolve.rs).

use super::ServerAddr;
use std::net::SocketAddr;
use std::time::Duration;

/// Shortest accepted `resolve` interval: shorter would only load the resolver.
pub(super) const MIN_RESOLVE: Duration = Duration::from_millis(100);

/// Parses a server address: `ip:port`, `[v6]:port` or `host:port`. Names are checked for
/// syntax only; nothing is resolved here, so `baton check` does not depend on DNS.
pub(super) fn parse_server_addr(s: &str) -> Result<ServerAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(ServerAddr::Ip(a));
    }
    let bad = |why: String| Err(format!("bad address {s:?}: {why}"));
    let Some((host, port)) = s.rsplit_once(':') else {
        return bad(
            "missing port (expected host:port, like app.internal:8080 or 10.0.0.1:8080)".into(),
        );
    };
    if host.contains(':') || host.starts_with('[') {
        return bad(
            "expected ip:port or host:port (an IPv6 address in brackets, like [::1]:8080)".into(),
        );
    }
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return bad(format!("bad port {port:?} (expected 1 to 65535)")),
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return bad("empty hostname".into());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return bad(format!(
            "bad hostname {host:?} (dot-separated labels of letters, digits, '-' and '_')"
        ));
    }
    // A last label of digits only is a mistyped IP address (no top-level domain is numeric).
    if name
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return bad(format!("{host:?} is not a valid IP address"));
    }
    Ok(ServerAddr::Name {
        host: name.to_ascii_lowercase(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses() {
        let name = |h: &str, port| ServerAddr::Name {
            host: h.into(),
            port,
        };
        assert_eq!(
            parse_server_addr("10.0.0.1:80"),
            Ok(ServerAddr::Ip(SocketAddr::from(([10, 0, 0, 1], 80))))
        );
        assert!(matches!(
            parse_server_addr("[::1]:80"),
            Ok(ServerAddr::Ip(_))
        ));
        assert_eq!(
            parse_server_addr("App.Internal:8080"),
            Ok(name("app.internal", 8080))
        );
        assert_eq!(
            parse_server_addr("db.service.consul.:5432"),
            Ok(name("db.service.consul", 5432))
        );
        assert_eq!(
            parse_server_addr("_http._tcp.x:1"),
            Ok(name("_http._tcp.x", 1))
        );
        let err = |s: &str| parse_server_addr(s).unwrap_err();
        assert!(err("app.internal").contains("missing port"));
        assert!(err("127.0.0.1").contains("missing port"));
        assert!(err(":8080").contains("empty hostname"));
        assert!(err("app:0").contains("bad port"));
        assert!(err("app:http").contains("bad port"));
        assert!(err("::1:80").contains("brackets"));
        assert!(err("a..b:80").contains("bad hostname"));
        assert!(err("-a.b:80").contains("bad hostname"));
        assert!(err("a b:80").contains("bad hostname"));
        assert!(err("10.0.0.300:80").contains("not a valid IP address"));
        assert!(err(&format!("{}:80", "a".repeat(64))).contains("bad hostname"));
    }
}
