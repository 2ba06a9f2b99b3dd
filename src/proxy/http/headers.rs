//! Request and response header rewriting: hop-by-hop stripping, `X-Forwarded-*`, `Via`, and
//! W3C trace context (`traceparent`).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

/// Whether a header value list (`Connection`) names `token`.
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// An HTTP/1.1 `Upgrade` request (WebSocket and others): `Connection: upgrade` plus `Upgrade`.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && has_token(headers, header::CONNECTION, "upgrade")
}

/// Removes hop-by-hop headers: `Connection` and every header it names, `Keep-Alive`, `TE`,
/// `Trailer`, `Transfer-Encoding`, `Proxy-*`, and `Upgrade` unless `upgrade` (then
/// `Connection: upgrade` and `Upgrade` are kept, as the next hop needs them).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if !(upgrade && n == header::UPGRADE) {
            headers.remove(n);
        }
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
    ] {
        headers.remove(n);
    }
    headers.remove("keep-alive");
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for n in proxy {
        headers.remove(n);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Adds `X-Forwarded-For` (appended to any list the client sent), `X-Forwarded-Proto`,
/// `X-Forwarded-Host` (the Host the client asked for) and a `Via` line.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    client: IpAddr,
    host: Option<&HeaderValue>,
    via: &'static str,
) {
    let xff = HeaderName::from_static("x-forwarded-for");
    let prior: Vec<String> = headers
        .get_all(&xff)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    let value = if prior.is_empty() {
        client.to_string()
    } else {
        format!("{}, {client}", prior.join(", "))
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(xff, v);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    if let Some(h) = host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), h.clone());
    }
    headers.append(header::VIA, HeaderValue::from_static(via));
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The trace id of a valid W3C `traceparent` (version 00 format, lower-case hex, non-zero ids).
pub fn parse_traceparent(v: &str) -> Option<&str> {
    let mut it = v.trim().split('-');
    let (ver, trace, span, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
    let ok = is_hex(ver, 2)
        && ver != "ff"
        && (ver != "00" || it.next().is_none())
        && is_hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && is_hex(span, 16)
        && span.bytes().any(|b| b != b'0')
        && is_hex(flags, 2);
    ok.then_some(trace)
}

/// Keeps a valid incoming `traceparent`, or sets a new one (random trace and span ids, sampled);
/// returns the trace id for the access log.
pub fn trace_context(headers: &mut HeaderMap) -> String {
    let tp = HeaderName::from_static("traceparent");
    if let Some(id) = headers
        .get(&tp)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent)
    {
        return id.to_string();
    }
    let trace: u128 = rand::random::<u128>().max(1);
    let span: u64 = rand::random::<u64>().max(1);
    let trace_id = format!("{trace:032x}");
    let value = format!("00-{trace_id}-{span:016x}-01");
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(tp, v);
    }
    trace_id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_named() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("proxy-authorization", HeaderValue::from_static("x"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn keeps_upgrade_on_upgrade_requests() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(
            h.get("upgrade").map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(
            h.get("connection").map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
    }

    #[test]
    fn forwarding_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("via", HeaderValue::from_static("1.0 edge"));
        let host = HeaderValue::from_static("example.com");
        add_forwarding(
            &mut h,
            "127.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            Some(&host),
            "1.1 baton",
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h.get_all("via").iter().count(), 2);
    }

    #[test]
    fn traceparent_kept_or_created() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(good),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static(good));
        assert_eq!(trace_context(&mut h), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut h = HeaderMap::new();
        let id = trace_context(&mut h);
        let v = h["traceparent"].to_str().unwrap_or_default().to_string();
        assert_eq!(parse_traceparent(&v), Some(id.as_str()));
    }
}
