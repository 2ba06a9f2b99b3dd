//! Between HTTP/1.1 bytes and hyper's messages, for the two bridges between protocols: an
//! HTTP/1.1 client of the engine whose route reaches an h2c upstream (`h1::h2up`), and an h2c
//! client whose route reaches an HTTP/1.1 upstream (`to_h1`). Heads go through the engine's own
//! parser and rewriter (`head`), so each rule is written once; here a head is only turned into
//! bytes or a `HeaderMap`, and a body's framed bytes into frames (data, then trailers) and back.

use super::body::BoxError;
use super::framing::{encode_chunk, Framing, FramingError};
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Headers that describe one HTTP/1.1 connection, never carried by HTTP/2 (RFC 9113 §8.2.2).
fn connection_specific(name: &[u8]) -> bool {
    [
        &b"connection"[..],
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"host",
    ]
    .iter()
    .any(|n| n.eq_ignore_ascii_case(name))
}

/// HTTP/1.1 header lines as a map for hyper, without the connection-specific ones (and `Host`,
/// which HTTP/2 carries as `:authority`). Lines that are not valid header names or values are
/// dropped (the engine's parser let them through, so they cannot be framing headers).
pub fn map_of(lines: &[httparse::Header<'_>]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(lines.len());
    for h in lines {
        if connection_specific(h.name.as_bytes()) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            map.append(n, v);
        }
    }
    map
}

/// Appends `map` as HTTP/1.1 header lines (no connection-specific ones: a message from hyper
/// has none that mean anything on the next hop).
pub fn write_lines(out: &mut Vec<u8>, map: &HeaderMap) {
    for (n, v) in map {
        if connection_specific(n.as_str().as_bytes()) {
            continue;
        }
        put_line(out, n.as_str().as_bytes(), v.as_bytes());
    }
}

/// Appends an HTTP/2 request's headers as HTTP/1.1 header lines, as [`write_lines`], except
/// that its `cookie` fields become one line, joined with "; ". HTTP/2 clients may send a
/// cookie list as one field per cookie, for better compression, and RFC 9113 §8.2.3 asks for
/// them to be joined that way before they go to an HTTP/1.1 hop, where a request carries one
/// `Cookie` line (RFC 6265 §5.4).
pub fn write_request_lines(out: &mut Vec<u8>, map: &HeaderMap) {
    let mut cookies = map.get_all(http::header::COOKIE).iter();
    for (n, v) in map {
        if n == http::header::COOKIE || connection_specific(n.as_str().as_bytes()) {
            continue;
        }
        put_line(out, n.as_str().as_bytes(), v.as_bytes());
    }
    if let Some(first) = cookies.next() {
        out.extend_from_slice(b"cookie: ");
        out.extend_from_slice(first.as_bytes());
        for c in cookies {
            out.extend_from_slice(b"; ");
            out.extend_from_slice(c.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
}

fn put_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A trailer section (`name: value` lines and the empty line) as a map.
fn trailers_of(section: &[u8]) -> HeaderMap {
    let mut hdrs = [httparse::EMPTY_HEADER; 64];
    match httparse::parse_headers(section, &mut hdrs) {
        Ok(httparse::Status::Complete((_, lines))) => map_of(lines),
        _ => HeaderMap::new(),
    }
}

/// Turns a framed HTTP/1.1 body, as its bytes arrive, into frames: data as it is decoded, then
/// the trailers of a chunked body.
#[derive(Debug)]
pub struct Unframe {
    /// What is left of the body.
    pub framing: Framing,
    trailers: BytesMut,
}

impl Unframe {
    /// A decoder for a body framed by `framing`.
    pub fn new(framing: Framing) -> Unframe {
        Unframe {
            framing,
            trailers: BytesMut::new(),
        }
    }

    /// Takes this body's bytes from the front of `buf`: the data decoded from them, and the
    /// trailers if the body ended with some. What follows the body stays in `buf`.
    pub fn take(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<(Option<Bytes>, Option<HeaderMap>), FramingError> {
        let mut data = BytesMut::new();
        let a = self
            .framing
            .advance_with(buf, Some(&mut data), Some(&mut self.trailers))?;
        let _ = buf.split_to(a.used);
        let data = (!data.is_empty()).then(|| data.freeze());
        let trailers = (a.done && self.trailers.len() > 2).then(|| trailers_of(&self.trailers));
        Ok((data, trailers))
    }
}

/// Appends one frame of a body to `out` as HTTP/1.1 bytes: as it is (`chunked == false`,
/// a body with a length) or as a chunk; trailers end a chunked body (and are dropped for a body
/// with a length, which cannot carry them).
pub fn put_frame(out: &mut BytesMut, frame: Frame<Bytes>, chunked: bool) {
    match frame.into_data() {
        Ok(d) if chunked => encode_chunk(out, &d),
        Ok(d) => out.put_slice(&d),
        Err(frame) => {
            if let (Ok(t), true) = (frame.into_trailers(), chunked) {
                let mut lines = Vec::new();
                write_lines(&mut lines, &t);
                out.put_slice(b"0\r\n");
                out.put_slice(&lines);
                out.put_slice(b"\r\n");
            }
        }
    }
}

/// A body fed by a channel: the task that reads the other side sends frames (or the error
/// that cut the body) as they arrive; the body ends when the sender is dropped.
#[derive(Debug)]
pub struct ChanBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    /// A body known to be empty (no frame will come).
    empty: bool,
}

/// The sending side of a [`ChanBody`].
pub type FrameTx = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

impl ChanBody {
    /// A body and its sender; at most `depth` frames wait in between (backpressure).
    pub fn channel(depth: usize) -> (FrameTx, ChanBody) {
        let (tx, rx) = mpsc::channel(depth);
        (tx, ChanBody { rx, empty: false })
    }

    /// A body with nothing in it.
    pub fn empty() -> ChanBody {
        let (_, rx) = mpsc::channel(1);
        ChanBody { rx, empty: true }
    }
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.empty {
            return Poll::Ready(None);
        }
        self.rx.poll_recv(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.empty
    }

    fn size_hint(&self) -> SizeHint {
        if self.empty {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::http::framing::Chunked;

    #[test]
    fn chunked_bytes_become_data_and_trailers_and_back() {
        let wire = b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\nx-n: 2\r\n\r\nNEXT";
        for step in 1..wire.len() {
            let mut u = Unframe::new(Framing::Chunked(Chunked::default()));
            let (mut data, mut trailers) = (Vec::new(), None);
            let mut buf = BytesMut::new();
            for piece in wire.chunks(step) {
                buf.extend_from_slice(piece);
                if u.framing.is_done() {
                    continue;
                }
                let (d, t) = u.take(&mut buf).expect("valid body");
                data.extend_from_slice(&d.unwrap_or_default());
                trailers = trailers.or(t);
            }
            assert_eq!(data, b"hello world", "step {step}");
            assert!(buf.ends_with(b"NEXT") && buf.len() == 4, "step {step}");
            let t = trailers.expect("trailers");
            assert_eq!(t["x-sum"], "42");
            assert_eq!(t["x-n"], "2");

            let mut out = BytesMut::new();
            put_frame(
                &mut out,
                Frame::data(Bytes::from_static(b"hello world")),
                true,
            );
            put_frame(&mut out, Frame::trailers(t), true);
            let mut back = Unframe::new(Framing::Chunked(Chunked::default()));
            let (d, t) = back.take(&mut out).expect("re-encoded body");
            assert_eq!(d.as_deref(), Some(&b"hello world"[..]));
            assert_eq!(t.expect("trailers again")["x-sum"], "42");
        }
    }

    #[test]
    fn cookie_fields_become_one_line_joined_with_semicolons() {
        let mut m = HeaderMap::new();
        m.append("cookie", HeaderValue::from_static("a=1"));
        m.append("x-a", HeaderValue::from_static("1"));
        m.append("cookie", HeaderValue::from_static("b=2"));
        m.append("cookie", HeaderValue::from_static("c=3"));
        let mut out = Vec::new();
        write_request_lines(&mut out, &m);
        assert_eq!(
            String::from_utf8(out).expect("ascii"),
            "x-a: 1\r\ncookie: a=1; b=2; c=3\r\n"
        );
        // One field stays as it is; none, no line.
        let mut one = HeaderMap::new();
        one.append("cookie", HeaderValue::from_static("a=1; b=2"));
        let mut out = Vec::new();
        write_request_lines(&mut out, &one);
        assert_eq!(out, b"cookie: a=1; b=2\r\n");
        let mut out = Vec::new();
        write_request_lines(&mut out, &HeaderMap::new());
        assert!(out.is_empty());
    }

    #[test]
    fn lengths_pass_and_connection_headers_go() {
        let mut u = Unframe::new(Framing::Length(3));
        let mut buf = BytesMut::from(&b"abcdef"[..]);
        let (d, t) = u.take(&mut buf).expect("length body");
        assert_eq!((d.as_deref(), t.is_none()), (Some(&b"abc"[..]), true));
        assert_eq!(&buf[..], b"def");
        let lines = [
            httparse::Header {
                name: "Connection",
                value: b"close",
            },
            httparse::Header {
                name: "X-A",
                value: b"1",
            },
            httparse::Header {
                name: "Transfer-Encoding",
                value: b"chunked",
            },
        ];
        let m = map_of(&lines);
        assert_eq!((m.len(), &m["x-a"]), (1, &HeaderValue::from_static("1")));
    }
}
