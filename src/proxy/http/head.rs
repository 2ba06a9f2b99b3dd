//! Request and response heads: parsed with `httparse`, checked against RFC 9110/9112, and
//! rewritten in one pass into the bytes the next hop receives (hop-by-hop headers removed,
//! `X-Forwarded-*`, `Via` and `traceparent` added). Bodies keep the framing they came with, so
//! `Content-Length` and `Transfer-Encoding: chunked` pass through; only the rare client that
//! cannot take chunked gets a decoded, close-delimited body (see [`ClientBody`]).

use super::framing::{Chunked, Framing};
use super::headers::{parse_traceparent, TraceId};
use super::path;
pub use super::syntax::valid_authority;
pub use super::syntax::Sink;
use super::syntax::{http_accepts_target, parse_length, push_decimal, List};
use std::borrow::Cow;

/// Most header lines accepted in one head.
const MAX_HEADERS: usize = 128;

/// A request or response that cannot be accepted, with the status it earns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct HeadError {
    /// Status code for the client (4xx/5xx) or, for responses, 502.
    pub status: u16,
    /// Why, for the log.
    pub reason: &'static str,
}

const fn bad(reason: &'static str) -> HeadError {
    HeadError {
        status: 400,
        reason,
    }
}

/// The client's address as `X-Forwarded-For` text. IPv4 is written digit by digit: through
/// `Display` (`core::fmt`) it cost 1.3k instructions, once per connection — 5 % of an HTTP
/// request on a new connection.
pub fn ip_text(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if o >= 100 {
                    s.push(char::from(b'0' + o / 100));
                }
                if o >= 10 {
                    s.push(char::from(b'0' + o / 10 % 10));
                }
                s.push(char::from(b'0' + o % 10));
            }
            s
        }
        std::net::IpAddr::V6(_) => ip.to_string(),
    }
}

/// What the request parser needs to know about its listener.
#[derive(Debug, Clone, Copy)]
pub struct ReqOpts<'a> {
    /// The client's address as text, for `X-Forwarded-For` (formatted once per connection).
    pub client_ip: &'a str,
    /// Largest head accepted (431 above).
    pub max_header_bytes: usize,
    /// Longest request line accepted (414 above).
    pub max_uri_bytes: usize,
    /// `Upgrade` protocols that may start a tunnel (lower case).
    pub upgrades: &'a [String],
    /// Largest body accepted by `Content-Length` (413 above).
    pub max_body_bytes: Option<u64>,
    /// This hop's `Via` entry (`1.1 baton`, or `2.0 baton` for an h2c client's request).
    pub via: &'static str,
    /// The client came over TLS: `X-Forwarded-Proto: https`.
    pub https: bool,
}

/// A parsed and rewritten request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method as sent.
    pub method: String,
    /// The normalized path and query (or the CONNECT authority, or `*`).
    pub target: String,
    /// The host to route by and to send on: the absolute-form authority, else `Host`.
    pub host: Option<String>,
    /// The client spoke HTTP/1.0.
    pub http10: bool,
    /// The client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    /// An allowed `Upgrade` was asked for.
    pub upgrade: bool,
    /// The request body's framing.
    pub framing: Framing,
    /// Bytes of the head in the client's buffer.
    pub head_len: usize,
    /// The rewritten request line (`METHOD target HTTP/1.1\r\n`).
    pub line: Vec<u8>,
    /// The rewritten header lines after `Host`, ending with the empty line.
    pub rest: Vec<u8>,
    /// The trace id (kept from a valid `traceparent`, or new).
    pub trace: TraceId,
}

impl Request {
    /// Whether this is a CONNECT request.
    pub fn is_connect(&self) -> bool {
        self.method == "CONNECT"
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let s = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let e = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(s, |e| e + 1);
    &v[s..e]
}

fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(trim).filter(|t| !t.is_empty())
}

/// The header names the rewrite treats specially.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    Te,
    Upgrade,
    /// Any `Proxy-*`.
    Proxy,
    Traceparent,
    XForwardedFor,
    XForwardedProto,
    XForwardedHost,
    Other,
}

/// Which name `n` (a token, as httparse checked it) is, in any case. Length and first letter
/// decide first, so most names cost no comparison at all (a chain of `eq_ignore_ascii_case`
/// ran per header, in each of the two passes).
fn name_kind(n: &[u8]) -> Name {
    // Exact for tokens against lower-case letters and `-`: of the token bytes, only `X` and
    // `x` give `x` with bit 5 set, and only `-` gives `-`.
    let is = |s: &[u8]| n.len() == s.len() && n.iter().zip(s).all(|(&a, &b)| a | 0x20 == b);
    let Some(&first) = n.first() else {
        return Name::Other;
    };
    match (n.len(), first | 0x20) {
        (2, b't') if is(b"te") => Name::Te,
        (4, b'h') if is(b"host") => Name::Host,
        (7, b'u') if is(b"upgrade") => Name::Upgrade,
        (10, b'c') if is(b"connection") => Name::Connection,
        (10, b'k') if is(b"keep-alive") => Name::KeepAlive,
        (11, b't') if is(b"traceparent") => Name::Traceparent,
        (14, b'c') if is(b"content-length") => Name::ContentLength,
        (15, b'x') if is(b"x-forwarded-for") => Name::XForwardedFor,
        (16, b'x') if is(b"x-forwarded-host") => Name::XForwardedHost,
        (17, b't') if is(b"transfer-encoding") => Name::TransferEncoding,
        (17, b'x') if is(b"x-forwarded-proto") => Name::XForwardedProto,
        (l, b'p') if l >= 6 && n[..6].iter().zip(b"proxy-").all(|(&a, &b)| a | 0x20 == b) => {
            Name::Proxy
        }
        _ => Name::Other,
    }
}

impl Name {
    /// Hop-by-hop by itself (never forwarded as received).
    fn hop_by_hop(self) -> bool {
        matches!(
            self,
            Name::Connection | Name::KeepAlive | Name::Te | Name::Upgrade | Name::Proxy
        )
    }
}

/// Whether `name` is hop-by-hop by itself (never forwarded as received).
#[cfg(test)]
fn hop_by_hop(name: &str) -> bool {
    name_kind(name.as_bytes()).hop_by_hop()
}

/// Parses one request head at the front of `buf`: `Ok(None)` when it is not complete yet.
pub fn parse_request(buf: &[u8], o: &ReqOpts<'_>) -> Result<Option<Request>, HeadError> {
    // The request line alone past the URI limit earns 414, the head past its limit 431.
    // (A buffer within the limit cannot hold a longer line: no scan then.)
    if buf.len() > o.max_uri_bytes
        && buf
            .iter()
            .position(|&b| b == b'\n')
            .map_or(buf.len(), |e| e)
            > o.max_uri_bytes
    {
        return Err(HeadError {
            status: 414,
            reason: "request line too long",
        });
    }
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hdrs);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > o.max_header_bytes {
                return Err(HeadError {
                    status: 431,
                    reason: "request head too large",
                });
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError {
                status: 431,
                reason: "too many header fields",
            })
        }
        Err(_) => return Err(bad("malformed request head")),
    };
    if head_len > o.max_header_bytes {
        return Err(HeadError {
            status: 431,
            reason: "request head too large",
        });
    }
    let method = req.method.unwrap_or("GET");
    let raw_target_str = req.path.unwrap_or("/");
    let raw_target = raw_target_str.as_bytes();
    let http10 = req.version == Some(0);
    let headers = &*req.headers;

    // One pass to learn what the head says about itself.
    let mut host: Option<&[u8]> = None;
    let mut hosts = 0;
    let mut length: Option<u64> = None;
    let mut te = List::default();
    let mut conn_tokens = List::default();
    let mut upgrade_value: Option<&[u8]> = None;
    let mut traceparent_ok: Option<TraceId> = None;
    for h in headers {
        match name_kind(h.name.as_bytes()) {
            Name::Host => {
                hosts += 1;
                host = Some(trim(h.value));
            }
            Name::ContentLength => {
                for v in h.value.split(|&b| b == b',') {
                    let n = parse_length(trim(v)).ok_or(bad("invalid content-length"))?;
                    // Identical duplicates are one length (RFC 9110 §8.6); differing ones are
                    // refused.
                    if length.is_some_and(|l| l != n) {
                        return Err(bad("conflicting content-length"));
                    }
                    length = Some(n);
                }
            }
            Name::TransferEncoding => {
                h.value.split(|&b| b == b',').for_each(|t| te.push(trim(t)));
            }
            Name::Connection => tokens(h.value).for_each(|t| conn_tokens.push(t)),
            Name::Upgrade => upgrade_value = Some(trim(h.value)),
            Name::Traceparent if traceparent_ok.is_none() => {
                traceparent_ok = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(parse_traceparent)
                    .map(|id| TraceId::from_hex(id.as_bytes()));
            }
            _ => {}
        }
    }
    if hosts > 1 {
        return Err(bad("more than one host header"));
    }
    if hosts == 0 && !http10 {
        return Err(bad("missing host header"));
    }
    if let Some(h) = host {
        if !valid_authority(h) {
            return Err(bad("invalid host header"));
        }
    }

    // The request target's form decides the routing host and what the upstream receives.
    let is_connect = method == "CONNECT";
    let (target, authority): (Cow<'_, [u8]>, Option<&[u8]>) = if is_connect {
        if !valid_authority(raw_target) || raw_target.iter().rposition(|&b| b == b':').is_none() {
            return Err(bad("CONNECT needs host:port"));
        }
        (Cow::Borrowed(raw_target), Some(raw_target))
    } else if raw_target == b"*" {
        if method != "OPTIONS" {
            return Err(bad("* target outside OPTIONS"));
        }
        (Cow::Borrowed(raw_target), None)
    } else if raw_target.first() == Some(&b'/') {
        (
            path::normalize(raw_target).map_err(|_| bad("invalid path"))?,
            None,
        )
    } else {
        let lower = raw_target
            .get(..7)
            .map(|s| s.to_ascii_lowercase())
            .unwrap_or_default();
        if lower != b"http://" {
            return Err(bad("unsupported request target"));
        }
        let rest = &raw_target[7..];
        let end = rest
            .iter()
            .position(|&b| b == b'/' || b == b'?')
            .unwrap_or(rest.len());
        let auth = &rest[..end];
        if !valid_authority(auth) {
            return Err(bad("invalid authority"));
        }
        let mut p = rest[end..].to_vec();
        if p.first() != Some(&b'/') {
            p.insert(0, b'/');
        }
        (
            Cow::Owned(
                path::normalize(&p)
                    .map_err(|_| bad("invalid path"))?
                    .into_owned(),
            ),
            Some(auth),
        )
    };
    if target.contains(&b'#') {
        return Err(bad("fragment in request target"));
    }
    // Characters RFC 3986 does not allow in a path or query (`<`, `` ` ``, `"` in a query …),
    // which httparse lets through: refused, with the `http` crate's rules (the same byte
    // classes), so both views of a target agree.
    if !is_connect && &*target != b"*" && !http_accepts_target(&target) {
        return Err(bad("invalid character in request target"));
    }
    let route_host = authority.or(host);

    // Body framing (RFC 9112 §6.3): Transfer-Encoding wins over nothing, never coexists with
    // Content-Length, and must end in chunked.
    let framing = if !te.is_empty() {
        if length.is_some() {
            return Err(bad("content-length with transfer-encoding"));
        }
        if http10 {
            return Err(bad("transfer-encoding in HTTP/1.0"));
        }
        let last = te.last().unwrap_or_default();
        if !last.eq_ignore_ascii_case(b"chunked") {
            return Err(HeadError {
                status: 501,
                reason: "transfer-encoding does not end in chunked",
            });
        }
        if te
            .iter()
            .take(te.len() - 1)
            .any(|c| c.is_empty() || c.eq_ignore_ascii_case(b"chunked"))
        {
            return Err(bad("invalid transfer-encoding"));
        }
        Framing::Chunked(Chunked::default())
    } else {
        match length {
            Some(0) | None => Framing::Done,
            Some(n) => {
                if o.max_body_bytes.is_some_and(|max| n > max) {
                    return Err(HeadError {
                        status: 413,
                        reason: "request body too large",
                    });
                }
                Framing::Length(n)
            }
        }
    };

    let has = |t: &[u8]| conn_tokens.has(t);
    let keep_alive = if http10 {
        has(b"keep-alive")
    } else {
        !has(b"close")
    };
    let upgrade = !http10
        && !is_connect
        && has(b"upgrade")
        && upgrade_value.is_some_and(|v| {
            let mut any = false;
            let all = tokens(v).all(|t| {
                any = true;
                let name = t.split(|&b| b == b'/').next().unwrap_or_default();
                o.upgrades
                    .iter()
                    .any(|u| u.as_bytes().eq_ignore_ascii_case(name))
            });
            any && all
        });

    // The rewritten head: request line, then (at send time) Host, then the rest.
    let mut line = Vec::with_capacity(method.len() + target.len() + 12);
    line.extend_from_slice(method.as_bytes());
    line.push(b' ');
    line.extend_from_slice(&target);
    line.extend_from_slice(b" HTTP/1.1\r\n");
    let mut rest = Vec::with_capacity(head_len + 160);
    let mut xff: Vec<u8> = Vec::new();
    let listed = |n: &[u8]| conn_tokens.has(n);
    for h in headers {
        let n = h.name.as_bytes();
        let kind = name_kind(n);
        if matches!(
            kind,
            Name::Host | Name::ContentLength | Name::XForwardedProto | Name::XForwardedHost
        ) || kind.hop_by_hop()
            || listed(n)
            || (kind == Name::Traceparent && traceparent_ok.is_none())
        {
            continue;
        }
        if kind == Name::XForwardedFor {
            let v = trim(h.value);
            if !v.is_empty() {
                xff.extend_from_slice(v);
                xff.extend_from_slice(b", ");
            }
            continue;
        }
        rest.extend_from_slice(n);
        rest.extend_from_slice(b": ");
        rest.extend_from_slice(h.value);
        rest.extend_from_slice(b"\r\n");
    }
    if let Some(n) = length.filter(|_| te.is_empty()) {
        rest.extend_from_slice(b"content-length: ");
        push_decimal(&mut rest, n);
        rest.extend_from_slice(b"\r\n");
    }
    rest.extend_from_slice(b"x-forwarded-for: ");
    rest.extend_from_slice(&xff);
    rest.extend_from_slice(o.client_ip.as_bytes());
    rest.extend_from_slice(if o.https {
        b"\r\nx-forwarded-proto: https\r\n"
    } else {
        b"\r\nx-forwarded-proto: http\r\n"
    });
    if let Some(h) = route_host {
        rest.extend_from_slice(b"x-forwarded-host: ");
        rest.extend_from_slice(h);
        rest.extend_from_slice(b"\r\n");
    }
    rest.extend_from_slice(b"via: ");
    rest.extend_from_slice(o.via.as_bytes());
    rest.extend_from_slice(b"\r\n");
    let trace = match traceparent_ok {
        Some(t) => t,
        None => {
            let (t, value) = super::headers::new_traceparent();
            rest.extend_from_slice(b"traceparent: ");
            rest.extend_from_slice(&value);
            rest.extend_from_slice(b"\r\n");
            t
        }
    };
    if upgrade {
        if let Some(v) = upgrade_value {
            rest.extend_from_slice(b"connection: upgrade\r\nupgrade: ");
            rest.extend_from_slice(v);
            rest.extend_from_slice(b"\r\n");
        }
    }
    rest.extend_from_slice(b"\r\n");
    // Both are checked to be ASCII (or, for a target, UTF-8) above: no lossy conversion.
    let target = match target {
        // The target as sent (the usual case): httparse's text already.
        Cow::Borrowed(t) if t.len() == raw_target.len() => Some(raw_target_str.to_owned()),
        Cow::Borrowed(t) => std::str::from_utf8(t).map(str::to_owned).ok(),
        Cow::Owned(t) => String::from_utf8(t).ok(),
    }
    .ok_or(bad("invalid character in request target"))?;
    let host = match route_host {
        Some(h) => Some(
            std::str::from_utf8(h)
                .map_err(|_| bad("invalid host header"))?
                .to_owned(),
        ),
        None => None,
    };
    Ok(Some(Request {
        method: method.to_string(),
        target,
        host,
        http10,
        keep_alive,
        upgrade,
        framing,
        head_len,
        line,
        rest,
        trace,
    }))
}

/// How a response body reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientBody {
    /// Byte for byte, as the upstream framed it.
    Pass,
    /// Chunked from the upstream, decoded for an HTTP/1.0 client; the connection closes after.
    Decode,
    /// Close-delimited from the upstream, chunk-encoded so a 1.1 client keeps its connection.
    Encode,
}

/// What the response parser needs to know about the request.
#[derive(Debug, Clone, Copy)]
pub struct RespOpts {
    /// The request was HEAD (no body, whatever the headers say).
    pub head_request: bool,
    /// The client spoke HTTP/1.0.
    pub client_http10: bool,
    /// The client connection stays open after this exchange (if the response allows).
    pub keep_alive: bool,
    /// The request asked for an upgrade.
    pub upgrade: bool,
    /// This hop's `Via` entry (`1.1 baton`, or `2.0 baton` toward an h2c client).
    pub via: &'static str,
}

/// A parsed and rewritten response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Bytes of the head in the upstream's buffer.
    pub head_len: usize,
    /// The body's framing from the upstream.
    pub framing: Framing,
    /// How the body goes to the client.
    pub body: ClientBody,
    /// The client connection closes after this response.
    pub close_client: bool,
    /// The upstream connection can be reused after this response.
    pub reusable: bool,
    /// The rewritten head for the client (empty from [`parse_response_into`], which wrote it
    /// into the caller's buffer).
    pub out: Vec<u8>,
}

impl Response {
    /// An interim (1xx other than 101) response: no body, another head follows.
    pub fn interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

fn bad_gateway(reason: &'static str) -> HeadError {
    HeadError {
        status: 502,
        reason,
    }
}

/// Parses one response head at the front of `buf`: `Ok(None)` when it is not complete yet.
pub fn parse_response(buf: &[u8], max: usize, o: &RespOpts) -> Result<Option<Response>, HeadError> {
    let mut out = Vec::new();
    let r = parse_response_into(buf, max, o, &mut out)?;
    Ok(r.map(|r| Response { out, ..r }))
}

/// [`parse_response`] that appends the rewritten head to `out` (the client's buffer) instead of
/// a new `Response::out`, which stays empty: one allocation and one copy less per response.
/// `out` is left as it was unless a complete head is accepted.
pub fn parse_response_into(
    buf: &[u8],
    max: usize,
    o: &RespOpts,
    out: &mut impl Sink,
) -> Result<Option<Response>, HeadError> {
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut hdrs);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > max => {
            return Err(bad_gateway("response head too large"))
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > max => {
            return Err(bad_gateway("response head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(bad_gateway("malformed response head")),
    };
    let status = resp.code.unwrap_or(502);
    // RFC 9110 §15: outside 100..=599 a status is invalid, and a client should treat it as a
    // 5xx; a proxy that passed it on would hand its clients what they cannot interpret.
    if !(100..=599).contains(&status) {
        return Err(bad_gateway("invalid status code from upstream"));
    }
    let up_http10 = resp.version == Some(0);
    let reason = resp.reason.unwrap_or("");
    let headers = &*resp.headers;
    let mut length: Option<u64> = None;
    let mut te = List::default();
    let mut saw_te = false;
    let mut conn_tokens = List::default();
    for h in headers {
        match name_kind(h.name.as_bytes()) {
            Name::ContentLength => {
                for v in h.value.split(|&b| b == b',') {
                    match parse_length(trim(v)) {
                        Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                        _ => return Err(bad_gateway("invalid content-length from upstream")),
                    }
                }
            }
            Name::TransferEncoding => {
                // `identity` names no coding (RFC 7230 dropped it): it still frames the body
                // (not chunked, so until close) but is not passed on.
                h.value
                    .split(|&b| b == b',')
                    .map(trim)
                    .filter(|t| !t.eq_ignore_ascii_case(b"identity"))
                    .for_each(|t| te.push(t));
                saw_te = true;
            }
            Name::Connection => tokens(h.value).for_each(|t| conn_tokens.push(t)),
            _ => {}
        }
    }
    let has = |t: &[u8]| conn_tokens.has(t);
    let switching = status == 101;
    if switching && !o.upgrade {
        return Err(bad_gateway("101 to a request that asked no upgrade"));
    }
    let interim = (100..200).contains(&status) && !switching;
    let bodyless = o.head_request || interim || switching || status == 204 || status == 304;
    let chunked = te
        .last()
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
    // `chunked` must be the final coding, applied once (RFC 9112 §6.1): a body framed and
    // then coded again has no end a client could find.
    if te
        .iter()
        .take(te.len().saturating_sub(1))
        .any(|c| c.eq_ignore_ascii_case(b"chunked"))
    {
        return Err(bad_gateway("chunked before another transfer coding"));
    }
    let framing = if bodyless {
        Framing::Done
    } else if saw_te {
        // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3); one not ending in
        // chunked is read until close.
        if chunked {
            Framing::Chunked(Chunked::default())
        } else {
            Framing::UntilClose
        }
    } else {
        match length {
            Some(0) => Framing::Done,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let up_keep = if up_http10 {
        has(b"keep-alive")
    } else {
        !has(b"close")
    };
    let reusable = up_keep && !matches!(framing, Framing::UntilClose) && !switching;
    let body = match framing {
        Framing::Chunked(_) if o.client_http10 => ClientBody::Decode,
        Framing::UntilClose if !o.client_http10 => ClientBody::Encode,
        _ => ClientBody::Pass,
    };
    // A 1.0 client can keep its connection only with a length it can read.
    let close_client = !interim
        && !switching
        && (!o.keep_alive
            || (o.client_http10 && !matches!(framing, Framing::Length(_) | Framing::Done))
            || (matches!(framing, Framing::UntilClose) && o.client_http10));

    // No 1xx to an HTTP/1.0 client (RFC 9110 §15.2): it knows none and would take it for the
    // final response. The interim head is read and dropped; the final one follows.
    let parsed = Response {
        status,
        head_len,
        framing,
        body,
        close_client,
        reusable,
        out: Vec::new(),
    };
    if interim && o.client_http10 {
        return Ok(Some(parsed));
    }
    out.reserve(head_len + 64);
    out.add(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status));
    out.add(b" ");
    out.add(reason.as_bytes());
    out.add(b"\r\n");
    let listed = |n: &[u8]| conn_tokens.has(n);
    for h in headers {
        let n = h.name.as_bytes();
        let kind = name_kind(n);
        let framing_header = matches!(kind, Name::ContentLength | Name::TransferEncoding);
        let keep_upgrade = switching && kind == Name::Upgrade;
        if ((kind.hop_by_hop() || listed(n)) && !keep_upgrade) || framing_header {
            continue;
        }
        out.add(n);
        out.add(b": ");
        out.add(h.value);
        out.add(b"\r\n");
    }
    // Framing headers, as the client will see the body.
    match (framing, body) {
        (_, ClientBody::Encode) => {
            // The upstream's codings stay named (the bytes still carry them); chunked is added.
            out.add(b"transfer-encoding: ");
            for c in te.iter().filter(|c| !c.is_empty()) {
                out.add(c);
                out.add(b", ");
            }
            out.add(b"chunked\r\n");
        }
        (Framing::Chunked(_), ClientBody::Pass) => {
            for (i, c) in te.iter().enumerate() {
                out.add(if i == 0 {
                    b"transfer-encoding: "
                } else {
                    b", "
                });
                out.add(c);
            }
            out.add(b"\r\n");
        }
        (Framing::Length(n), _) => {
            out.add(b"content-length: ");
            push_decimal(out, n);
            out.add(b"\r\n");
        }
        (Framing::Done, _) if !interim && status != 204 && !switching => {
            // HEAD and 304 keep the length the upstream announced; others say 0.
            let n = if o.head_request || status == 304 {
                length
            } else {
                Some(0)
            };
            if let Some(n) = n {
                out.add(b"content-length: ");
                push_decimal(out, n);
                out.add(b"\r\n");
            }
        }
        _ => {}
    }
    if switching {
        out.add(b"connection: upgrade\r\n");
    } else if close_client && !interim {
        out.add(b"connection: close\r\n");
    } else if o.client_http10 && !interim {
        out.add(b"connection: keep-alive\r\n");
    }
    out.add(b"via: ");
    out.add(o.via.as_bytes());
    out.add(b"\r\n\r\n");
    Ok(Some(parsed))
}

/// A request head as the upstream gets it: the rewritten request line, `Host` (if any), the
/// rewritten header lines.
pub fn assemble(line: &[u8], host: Option<&str>, rest: &[u8]) -> bytes::BytesMut {
    let mut out = bytes::BytesMut::with_capacity(line.len() + rest.len() + 64);
    out.extend_from_slice(line);
    if let Some(h) = host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(rest);
    out
}

/// The `Allow` of baton's 405 (RFC 9110 §15.5.6 requires one): a listener without
/// `http.connect` forwards every method but CONNECT, so these are the standard methods it serves
/// (extension methods are forwarded too, but cannot be listed).
pub const ALLOW_WITHOUT_CONNECT: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH";

/// A complete response baton writes itself (errors): a short text body, and `connection:
/// close` when the client connection ends after it.
pub fn error_response(status: u16, close: bool) -> Vec<u8> {
    error_response_text(status, None, close)
}

/// [`error_response`] with its own body text.
pub fn error_response_text(status: u16, text: Option<&str>, close: bool) -> Vec<u8> {
    let (reason, default_text) = match status {
        400 => ("Bad Request", "bad request\n"),
        403 => ("Forbidden", "forbidden\n"),
        404 => ("Not Found", "no route\n"),
        405 => ("Method Not Allowed", "method not allowed\n"),
        408 => ("Request Timeout", "request timeout\n"),
        413 => ("Payload Too Large", "request body too large\n"),
        414 => ("URI Too Long", "request line too long\n"),
        431 => (
            "Request Header Fields Too Large",
            "request header fields too large\n",
        ),
        501 => ("Not Implemented", "not implemented\n"),
        503 => ("Service Unavailable", "no server available\n"),
        504 => ("Gateway Timeout", "upstream timeout\n"),
        500 => ("Internal Server Error", "internal error\n"),
        _ => ("Bad Gateway", "bad gateway\n"),
    };
    let text = text.unwrap_or(default_text);
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{}{}\r\n{text}",
            text.len(),
            // baton's only 405 is CONNECT on a listener that does not tunnel.
            if status == 405 {
                format!("allow: {ALLOW_WITHOUT_CONNECT}\r\n")
            } else {
                String::new()
            },
            if close { "connection: close\r\n" } else { "" }
        )
        .as_bytes(),
    );
    out
}

#[cfg(test)]
#[path = "head_tests.rs"]
mod tests;
