//! Request and response header rewriting: hop-by-hop stripping, `X-Forwarded-*`, `Via`, and
//! W3C trace context (`traceparent`).

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::{IpAddr, SocketAddr};

// Names built at compile time: `HeaderName::from_static` at run time validates the text each call.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Whether a header is hop-by-hop by itself: `Connection`, `Keep-Alive`, `TE`, `Trailer`,
/// `Transfer-Encoding`, `Upgrade` or `Proxy-*`. A parsed name is lower case already, and a
/// `match` on the text compares lengths first, where most names fail (this runs for every
/// header, twice per request).
fn is_hop_header(k: &HeaderName) -> bool {
    match k.as_str() {
        "connection" | "keep-alive" | "te" | "trailer" | "transfer-encoding" | "upgrade" => true,
        n => n.starts_with("proxy-"),
    }
}

/// Removes hop-by-hop headers (of an h2c message): `Connection` and every header it names,
/// `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade` and `Proxy-*`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // The names `Connection` lists, read once, in a small array (a Vec only past four):
    // the common message allocates nothing. `keep-alive` is skipped: hop-by-hop by itself.
    let mut first: [&[u8]; 4] = [&[]; 4];
    let mut n = 0;
    let mut more: Vec<&[u8]> = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        for t in v.as_bytes().split(|&b| b == b',') {
            let t = trim_ows(t);
            if t.is_empty() || t.eq_ignore_ascii_case(b"keep-alive") {
                continue;
            }
            if n < first.len() {
                first[n] = t;
                n += 1;
            } else {
                more.push(t);
            }
        }
    }
    let listed = first[..n].iter().chain(more.iter());
    // One pass over the names present decides; only those are removed.
    let doomed_here = |k: &HeaderName| {
        is_hop_header(k)
            || listed
                .clone()
                .any(|t| t.eq_ignore_ascii_case(k.as_str().as_bytes()))
    };
    // Count first: the usual message has none, or only `Connection` (an upstream's
    // `Connection: keep-alive`), which is removed without collecting names.
    let (mut found, mut only_connection) = (0usize, true);
    for k in headers.keys().filter(|k| doomed_here(k)) {
        found += 1;
        only_connection &= *k == header::CONNECTION;
    }
    if found > 0 && only_connection {
        headers.remove(header::CONNECTION);
    } else if found > 0 {
        let doomed: Vec<HeaderName> = headers.keys().filter(|k| doomed_here(k)).cloned().collect();
        for n in doomed {
            headers.remove(n);
        }
    }
}

/// Adds `X-Forwarded-For` (appended to any list the client sent), `X-Forwarded-Proto`
/// (`https` when the client came over TLS), `X-Forwarded-Host` (the Host the client asked
/// for) and a `Via` line.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    client: IpAddr,
    https: bool,
    host: Option<&HeaderValue>,
    via: &'static str,
) {
    let xff = X_FORWARDED_FOR;
    // One buffer for the whole value, no intermediate Strings: this runs on every request.
    let mut value = BytesMut::with_capacity(48);
    for v in headers.get_all(&xff) {
        let v = trim_ows(v.as_bytes());
        if !v.is_empty() {
            value.extend_from_slice(v);
            value.extend_from_slice(b", ");
        }
    }
    write_ip(&mut value, client);
    if let Ok(v) = HeaderValue::from_maybe_shared(value.freeze()) {
        headers.insert(xff, v);
    }
    let proto = if https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST, h.clone());
    }
    headers.append(header::VIA, HeaderValue::from_static(via));
}

/// The Host value naming a server, `ip:port` (as `SocketAddr` displays it), written without the
/// formatting machinery for IPv4: this runs on every request.
pub fn host_value(addr: SocketAddr) -> Option<HeaderValue> {
    let mut value = BytesMut::with_capacity(24);
    match addr {
        SocketAddr::V4(a) => {
            write_ip(&mut value, IpAddr::V4(*a.ip()));
            value.extend_from_slice(b":");
            value.extend_from_slice(super::syntax::decimal(a.port().into(), &mut [0; 20]));
        }
        SocketAddr::V6(a) => {
            use std::fmt::Write as _;
            let _ = write!(value, "{a}");
        }
    }
    HeaderValue::from_maybe_shared(value.freeze()).ok()
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

thread_local! {
    /// State of the trace-id generator of this thread (0: not seeded yet).
    static TRACE_STATE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A random 64-bit value for trace ids. Ids need to be unique and unpredictable enough not to
/// collide, not secret (W3C Trace Context §6): wyrand (a 64-bit counter through a 128-bit
/// multiply) per thread, seeded once from the OS-seeded `ThreadRng`, costs a few instructions
/// per value where `rand::random` (ChaCha12, with its reseeding checks) cost ~0.2k per request.
fn trace_random() -> u64 {
    TRACE_STATE.with(|s| {
        let mut x = s.get();
        if x == 0 {
            x = rand::random::<u64>() | 1;
        }
        x = x.wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        (t >> 64) as u64 ^ t as u64
    })
}

/// A new `traceparent` value (random trace and span ids, sampled) and its trace id.
pub fn new_traceparent() -> (TraceId, [u8; 55]) {
    let (hi, mut lo, mut span) = (trace_random(), trace_random(), trace_random());
    // All-zero ids are invalid.
    if hi == 0 && lo == 0 {
        lo = 1;
    }
    span = span.max(1);
    let mut value = [0u8; 55];
    value[..3].copy_from_slice(b"00-");
    value[3..19].copy_from_slice(&hex16(hi));
    value[19..35].copy_from_slice(&hex16(lo));
    value[35] = b'-';
    value[36..52].copy_from_slice(&hex16(span));
    value[52..].copy_from_slice(b"-01");
    (TraceId::from_hex(&value[3..35]), value)
}

/// Keeps a valid incoming `traceparent`, or sets a new one (random trace and span ids, sampled);
/// returns the trace id for the access log.
pub fn trace_context(headers: &mut HeaderMap) -> TraceId {
    let tp = TRACEPARENT;
    if let Some(id) = headers
        .get(&tp)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent)
    {
        return TraceId::from_hex(id.as_bytes());
    }
    let (id, value) = new_traceparent();
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::copy_from_slice(&value)) {
        headers.insert(tp, v);
    }
    id
}

/// A trace id (32 lower-case hex digits), stored inline so the access log needs no String.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceId([u8; 32]);

impl TraceId {
    /// A trace id from (up to) 32 hex digits.
    pub fn from_hex(hex: &[u8]) -> TraceId {
        let mut id = [b'0'; 32];
        let n = hex.len().min(32);
        id[..n].copy_from_slice(&hex[..n]);
        TraceId(id)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only ever built from ASCII hex digits.
        std::str::from_utf8(&self.0).unwrap_or("-")
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// As its text, so a parked exchange's `trace` reads the same as when it was a `String`
/// (a successor of an older version exchanges states with this one).
impl serde::Serialize for TraceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for TraceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TraceId, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(TraceId::from_hex(text.as_bytes()))
    }
}

/// The 16 lower-case hex digits of `v`, most significant first, eight at a time in a `u64`:
/// each nibble spread to its own byte, then `'0'` added, and `'a' - '0' - 10` more where the
/// nibble is 10 or above (no table, no loop).
fn hex16(v: u64) -> [u8; 16] {
    fn eight(x: u32) -> [u8; 8] {
        let mut x = u64::from(x);
        x = (x | x << 16) & 0x0000_ffff_0000_ffff;
        x = (x | x << 8) & 0x00ff_00ff_00ff_00ff;
        x = (x | x << 4) & 0x0f0f_0f0f_0f0f_0f0f;
        // Nibble k (from the low end) is now byte k.
        let letters = ((x + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        (x + 0x3030_3030_3030_3030 + letters * 39).to_be_bytes()
    }
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&eight((v >> 32) as u32));
    out[8..].copy_from_slice(&eight(v as u32));
    out
}

/// Strips optional white space (spaces and tabs) around a header value.
fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// Appends an IP address in its usual text form.
fn write_ip(out: &mut BytesMut, ip: IpAddr) {
    use std::fmt::Write as _;
    match ip {
        IpAddr::V4(v4) => {
            for (i, o) in v4.octets().iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b".");
                }
                push_dec(out, *o);
            }
        }
        // Rare enough (and its compression rules subtle enough) to keep the std formatting.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

fn push_dec(out: &mut BytesMut, v: u8) {
    if v >= 100 {
        out.extend_from_slice(&[b'0' + v / 100]);
    }
    if v >= 10 {
        out.extend_from_slice(&[b'0' + (v / 10) % 10]);
    }
    out.extend_from_slice(&[b'0' + v % 10]);
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
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn strips_every_name_of_a_long_connection_list() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("a, b,c , d"));
        h.append("connection", HeaderValue::from_static("e,, F, keep-alive"));
        for n in ["a", "b", "c", "d", "e", "f", "x-keep"] {
            h.insert(HeaderName::from_static(n), HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn strips_named_in_any_case_and_leaves_clean_maps_alone() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("Close, X-Gone , Proxy-Thing, Upgrade"),
        );
        h.insert("close", HeaderValue::from_static("1"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("a"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        let name = |n: &str| HeaderName::from_bytes(n.as_bytes()).unwrap();
        assert!(is_hop_header(&name("Proxy-Authorization")) && is_hop_header(&name("TE")));
        assert!(!is_hop_header(&name("prox")) && !is_hop_header(&name("x-keep")));
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
            false,
            Some(&host),
            "1.1 baton",
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h.get_all("via").iter().count(), 2);
        // A client that came over TLS.
        add_forwarding(
            &mut h,
            IpAddr::from([127, 0, 0, 1]),
            true,
            None,
            "1.1 baton",
        );
        assert_eq!(h["x-forwarded-proto"], "https");
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
        assert_eq!(
            trace_context(&mut h).as_str(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let mut h = HeaderMap::new();
        let id = trace_context(&mut h);
        let v = h["traceparent"].to_str().unwrap_or_default().to_string();
        assert_eq!(parse_traceparent(&v), Some(id.as_str()));
        let mut b = BytesMut::new();
        for ip in ["10.20.3.255", "0.0.0.0", "::1", "2001:db8::7"] {
            b.clear();
            write_ip(&mut b, ip.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])));
            assert_eq!(&b[..], ip.as_bytes());
        }
        for addr in [
            "127.0.0.1:80",
            "10.0.0.255:65535",
            "1.2.3.4:0",
            "[::1]:8080",
        ] {
            let a: SocketAddr = addr.parse().unwrap();
            assert_eq!(host_value(a).unwrap(), addr);
        }
        for v in [
            0,
            1,
            0x0123_4567_89ab_cdef,
            0xfedc_ba98_7654_3210,
            u64::MAX,
            0xa0_0000_0009,
        ] {
            assert_eq!(hex16(v), *format!("{v:016x}").as_bytes(), "{v:x}");
        }
        let (a, b) = (new_traceparent(), new_traceparent());
        assert_ne!(a.1, b.1, "two new traceparents are the same");
        for (id, v) in [a, b] {
            let v = std::str::from_utf8(&v).unwrap_or_default();
            assert_eq!(parse_traceparent(v), Some(id.as_str()), "{v}");
        }
        assert_eq!(trim_ows(b" \t a b \t"), b"a b");
        assert_eq!(trim_ows(b"  "), b"");
    }
}
