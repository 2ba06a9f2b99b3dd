//! The response head: parsed, its framing decided (for the client as for the pool), and
//! rewritten for the client in one pass.

use super::*;

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
