//! The request head: parsed, checked (Host, framing, target form, upgrade tokens) and
//! rewritten for the upstream in one pass.

use super::*;

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
    /// The client's `TE` lists `trailers` (it accepts trailer fields). `TE` itself is
    /// hop-by-hop and not in `rest`; an HTTP/2 upstream gets `te: trailers` from this, which
    /// gRPC servers require (they refuse a request without it).
    pub te_trailers: bool,
}

impl Request {
    /// Whether this is a CONNECT request.
    pub fn is_connect(&self) -> bool {
        self.method == "CONNECT"
    }
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
    let mut te_trailers = false;
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
            Name::Te => te_trailers |= te_lists_trailers(h.value),
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
            let (t, value) = crate::proxy::http::headers::new_traceparent();
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
        te_trailers,
    }))
}
