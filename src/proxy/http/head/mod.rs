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
use super::syntax::{http_accepts_target, parse_length, push_decimal, te_lists_trailers, List};
use std::borrow::Cow;

mod request;
mod response;
pub use request::*;
pub use response::*;

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
mod tests;
