//! Byte-level syntax of request heads, each check one pass over its bytes with a class table:
//! request targets (exactly the bytes the `http` crate's `PathAndQuery` accepts, so baton's
//! view of a target and hyper's never differ), `Host` values and authorities, decimal numbers.
//! These run on every request; `PathAndQuery::try_from` copied the target into a new `Bytes`
//! to check it, and the authority check made five passes.

/// `http`'s `MAX_LEN` for a path and query.
const MAX_TARGET: usize = u16::MAX as usize - 1;

const PATH_OK: u8 = 1;
const QUERY_OK: u8 = 2;
const REG_NAME: u8 = 4;
const HEX: u8 = 8;

/// Per byte: may it stand in a path ([`PATH_OK`]) or a query ([`QUERY_OK`]) as `http` 1.x
/// scans them (WHATWG URL path and query states, plus `"`, `{`, `}` in paths); in an
/// authority's reg-name ([`REG_NAME`]: RFC 3986 unreserved and sub-delims; `%` is checked
/// apart, with the two hex digits that must follow it); is it a hex
/// digit ([`HEX`]). Bytes from 0x80 are allowed in a target if the whole target is UTF-8.
const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let mut c = 0;
        if matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7A | 0x7C | 0x7E)
            || matches!(b, b'"' | b'{' | b'}')
        {
            c |= PATH_OK;
        }
        if matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E) {
            c |= QUERY_OK;
        }
        if b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            )
        {
            c |= REG_NAME;
        }
        if b.is_ascii_hexdigit() {
            c |= HEX;
        }
        t[i] = c;
        i += 1;
    }
    t
};

fn class(b: u8) -> u8 {
    CLASS[usize::from(b)]
}

/// Whether `http::uri::PathAndQuery::try_from(std::str::from_utf8(t)?)` would succeed, without
/// building one: `*`, or a non-empty path (from `/`, `?` or `#`) and query of allowed bytes,
/// anything after a `#`, at most 65,534 bytes, all of it UTF-8.
pub fn http_accepts_target(t: &[u8]) -> bool {
    if t.is_empty() || t.len() > MAX_TARGET {
        return false;
    }
    if t == b"*" {
        return true;
    }
    if !matches!(t[0], b'/' | b'?' | b'#') {
        return false;
    }
    let mut want = PATH_OK;
    for &b in t {
        if b >= 0x80 {
            continue;
        }
        if class(b) & want != 0 {
            continue;
        }
        match b {
            b'?' if want == PATH_OK => want = QUERY_OK,
            b'#' => break,
            _ => return false,
        }
    }
    t.is_ascii() || std::str::from_utf8(t).is_ok()
}

/// Validates a `Host` value or an absolute-form authority: `host[:port]`, no userinfo; the
/// host a reg-name (or IPv4 address), whose `%` escapes have two hex digits, or an IP literal
/// in brackets; the port decimal, at most 65535.
pub fn valid_authority(v: &[u8]) -> bool {
    let port = if v.first() == Some(&b'[') {
        // Rare: a bracketed IP literal of hex digits, `:` and `.`.
        let Some(end) = v.iter().position(|&b| b == b']') else {
            return false;
        };
        let inner = &v[1..end];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|&b| class(b) & HEX != 0 || matches!(b, b':' | b'.'))
        {
            return false;
        }
        match &v[end + 1..] {
            [] => return true,
            [b':', p @ ..] => p,
            _ => return false,
        }
    } else {
        // One pass up to the port: a reg-name has no `:`, so the first one starts the port.
        let mut i = 0;
        while i < v.len() {
            let b = v[i];
            if class(b) & REG_NAME != 0 {
                i += 1;
                continue;
            }
            if b == b':' {
                break;
            }
            let hex = |j: usize| v.get(j).is_some_and(|&h| class(h) & HEX != 0);
            if b != b'%' || !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
        }
        if i == 0 {
            return false;
        }
        match v.get(i..) {
            Some([b':', p @ ..]) => p,
            _ => return true,
        }
    };
    valid_port(port)
}

/// 1 to 5 decimal digits, at most 65535.
fn valid_port(p: &[u8]) -> bool {
    !p.is_empty()
        && p.len() <= 5
        && p.iter()
            .try_fold(0u32, |n, &d| {
                d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
            })
            .is_some_and(|n| n <= 65535)
}

/// Whether a `TE` value lists `trailers` (RFC 9110 §10.1.4): a client that accepts trailer
/// fields. `trailers;q=0.5` counts: the token before any parameter decides.
pub fn te_lists_trailers(v: &[u8]) -> bool {
    v.split(|&b| b == b',').any(|t| {
        let name = t.split(|&b| b == b';').next().unwrap_or_default();
        name.trim_ascii().eq_ignore_ascii_case(b"trailers")
    })
}

/// A decimal length of 1 to 19 digits (so it fits a `u64`), nothing else.
pub fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// `n` in decimal, written into `digits` (no `to_string`: no allocation, no formatting
/// machinery).
pub fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &digits[i..]
}

/// Appends `n` in decimal.
pub fn push_decimal(out: &mut impl Sink, n: u64) {
    if n < 10 {
        out.add(&[b'0' + n as u8]);
    } else {
        out.add(decimal(n, &mut [0; 20]));
    }
}

/// A buffer a head is written into: a `Vec`, or a connection's `BytesMut` directly.
pub trait Sink {
    /// Appends `b`.
    fn add(&mut self, b: &[u8]);
    /// Makes room for `n` more bytes.
    fn reserve(&mut self, n: usize);
}

impl Sink for Vec<u8> {
    #[inline(always)]
    fn add(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
    fn reserve(&mut self, n: usize) {
        Vec::reserve(self, n);
    }
}

// `add` runs a dozen times per head, each a few instructions around a `memcpy`: a call
// around each (which the bench build without LTO made) cost more than the copy.
impl Sink for bytes::BytesMut {
    #[inline(always)]
    fn add(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
    fn reserve(&mut self, n: usize) {
        bytes::BytesMut::reserve(self, n);
    }
}

/// The elements of comma-separated header values (`Connection`, `Transfer-Encoding`), in
/// order: the first few inline, so the usual head allocates nothing for them.
#[derive(Default)]
pub struct List<'a> {
    first: [&'a [u8]; 4],
    n: usize,
    more: Vec<&'a [u8]>,
}

impl<'a> List<'a> {
    /// Adds one element.
    pub fn push(&mut self, v: &'a [u8]) {
        if self.n < self.first.len() {
            self.first[self.n] = v;
            self.n += 1;
        } else {
            self.more.push(v);
        }
    }

    /// The elements in order.
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.first[..self.n].iter().chain(self.more.iter()).copied()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.n + self.more.len()
    }

    /// The last one.
    pub fn last(&self) -> Option<&'a [u8]> {
        self.more
            .last()
            .or_else(|| self.first[..self.n].last())
            .copied()
    }

    /// Whether one equals `t`, ignoring ASCII case.
    pub fn has(&self, t: &[u8]) -> bool {
        let eq = |c: &&[u8]| c.eq_ignore_ascii_case(t);
        self.first[..self.n].iter().any(eq) || self.more.iter().any(eq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn te_values_that_list_trailers() {
        for yes in [
            &b"trailers"[..],
            b"Trailers",
            b"gzip, trailers",
            b" trailers;q=0.5 ",
            b"deflate,TRAILERS",
        ] {
            assert!(te_lists_trailers(yes), "{:?}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b""[..],
            b"gzip",
            b"trailer",
            b"trailersx",
            b"x-trailers",
            b"q=trailers",
        ] {
            assert!(!te_lists_trailers(no), "{:?}", String::from_utf8_lossy(no));
        }
    }

    #[test]
    fn authorities() {
        for ok in [
            "a",
            "127.0.0.1:18402",
            "example.com:0",
            "x:65535",
            "[::1]",
            "[::1]:80",
            "a%41b",
            "!$&'()*+,;=-._~:1",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "", ":80", "a:", "a:65536", "a:123456", "a:8x", "a:1:2", "u@h", "a%4", "a%4:80",
            "a%zz", "[]", "[::1", "[::1]x", "[::1]:", "[g::1]", "a b", "a/b",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn lists_keep_order_past_the_inline_ones() {
        let mut l = List::default();
        assert!(l.is_empty() && l.last().is_none());
        let items: [&[u8]; 6] = [b"a", b"B", b"c", b"d", b"e", b"f"];
        for (i, t) in items.iter().enumerate() {
            l.push(t);
            assert_eq!(l.len(), i + 1);
            assert_eq!(l.last(), Some(*t));
        }
        assert!(l.iter().eq(items.iter().copied()));
        assert!(l.has(b"b") && l.has(b"F") && !l.has(b"g"));
    }

    #[test]
    fn lengths_and_decimals() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(
            parse_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        assert_eq!(parse_length(b"10000000000000000000"), None);
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_length(b"+1"), None);
        for n in [0, 7, 10, 204, 65535, u64::MAX] {
            let mut out = b"x".to_vec();
            push_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}").as_bytes());
        }
    }
}
