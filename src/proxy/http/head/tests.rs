//! Property tests of the request parser and the chunked decoder: random bytes and random
//! mutations of valid requests never panic, never leave a head waiting past its limit, and a
//! head that parses agrees with the `http` crate's view of its method, target, authority and
//! headers; the rewritten head parses again to the same request (normalization is a fixed
//! point).

use super::*;
use crate::proxy::http::syntax;
use proptest::prelude::*;

const MAX_HEAD: usize = 2048;
const UPGRADES: &[&str] = &["websocket"];

fn parse(buf: &[u8]) -> Result<Option<Request>, HeadError> {
    let upgrades: Vec<String> = UPGRADES.iter().map(|s| s.to_string()).collect();
    parse_request(
        buf,
        &ReqOpts {
            client_ip: "127.0.0.1",
            max_header_bytes: MAX_HEAD,
            max_uri_bytes: 1024,
            upgrades: &upgrades,
            max_body_bytes: None,
            via: "1.1 baton",
            https: false,
        },
    )
}

/// The headers of a complete head, through httparse and then the `http` crate's types
/// (which must accept every name and value baton accepted).
fn header_map(head: &[u8]) -> http::HeaderMap {
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hdrs);
    assert!(
        matches!(req.parse(head), Ok(httparse::Status::Complete(_))),
        "not a complete head: {:?}",
        String::from_utf8_lossy(head)
    );
    let mut map = http::HeaderMap::new();
    for h in req.headers.iter() {
        let name = http::HeaderName::from_bytes(h.name.as_bytes())
            .unwrap_or_else(|e| panic!("http refuses name {:?}: {e}", h.name));
        let value = http::HeaderValue::from_bytes(h.value)
            .unwrap_or_else(|e| panic!("http refuses value {:?}: {e}", h.value));
        map.append(name, value);
    }
    map
}

/// Headers the rewrite drops or replaces by design.
fn rewritten_by_baton(name: &str, listed: &[String]) -> bool {
    matches!(
        name,
        "host"
            | "content-length"
            | "x-forwarded-for"
            | "x-forwarded-proto"
            | "x-forwarded-host"
            | "traceparent"
    ) || hop_by_hop(name)
        || listed.iter().any(|l| l == name)
}

/// Every check a parsed head must pass.
fn agrees(input: &[u8], req: &Request) {
    // Method: a valid token for `http`, kept as sent.
    let m = http::Method::from_bytes(req.method.as_bytes()).expect("http refuses the method");
    assert_eq!(m.as_str(), req.method);
    // Target: `*` only with OPTIONS; otherwise a path-and-query `http` accepts, already
    // normalized, and with no fragment.
    if req.target == "*" {
        assert_eq!(req.method, "OPTIONS");
    } else if !req.is_connect() {
        let pq = http::uri::PathAndQuery::try_from(req.target.as_str())
            .unwrap_or_else(|e| panic!("http refuses target {:?}: {e}", req.target));
        assert_eq!(pq.as_str(), req.target);
        assert!(pq.path().starts_with('/'));
        assert_eq!(
            path::normalize(req.target.as_bytes()).ok().as_deref(),
            Some(req.target.as_bytes()),
            "target not a fixed point of normalization"
        );
    }
    // Authority: `http` parses it the same way (host and port), and there is no userinfo.
    // The one difference on purpose: a reg-name may carry percent-encoded octets (RFC 3986
    // section 3.2.2, `a%41b`: docs/http.md), which `http` refuses in any host; with one, the
    // authority is checked against baton's own rule and the port split below.
    if let Some(h) = &req.host {
        assert!(!h.contains('@'));
        let parsed = if h.contains('%') {
            assert!(valid_authority(h.as_bytes()), "{h:?}");
            let bare: String = h.chars().filter(|&c| c != '%').collect();
            http::uri::Authority::try_from(bare.as_str()).map(|a| (a, bare))
        } else {
            http::uri::Authority::try_from(h.as_str()).map(|a| (a, h.clone()))
        };
        let (a, h) = parsed.unwrap_or_else(|e| panic!("http refuses authority {h:?}: {e}"));
        let h = &h;
        let (host, port) = if h.starts_with('[') {
            match h.rfind("]:") {
                Some(i) => (&h[..=i], Some(&h[i + 2..])),
                None => (h.as_str(), None),
            }
        } else {
            match h.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (h.as_str(), None),
            }
        };
        assert_eq!(a.host(), host, "host of {h:?}");
        assert_eq!(
            a.port_u16(),
            port.map(|p| p.parse::<u16>().expect("port in range"))
        );
    }
    // The rewritten head, as the upstream gets it, parses again to the same request.
    let mut out = req.line.clone();
    out.extend_from_slice(b"host: ");
    out.extend_from_slice(req.host.as_deref().unwrap_or("127.0.0.1:1").as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&req.rest);
    let again = parse(&out)
        .unwrap_or_else(|e| {
            panic!(
                "rewritten head refused ({e}): {:?}",
                String::from_utf8_lossy(&out)
            )
        })
        .expect("rewritten head incomplete");
    assert_eq!(again.method, req.method);
    assert_eq!(again.target, req.target);
    if req.host.is_some() {
        assert_eq!(again.host, req.host);
    }
    assert_eq!(again.framing, req.framing);
    assert_eq!(again.upgrade, req.upgrade);
    // Headers: every end-to-end header reaches the upstream with its values, in order.
    let before = header_map(&input[..req.head_len]);
    let after = header_map(&out);
    let listed: Vec<String> = before
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| String::from_utf8_lossy(trim(t)).to_ascii_lowercase())
        .collect();
    for name in before.keys() {
        if rewritten_by_baton(name.as_str(), &listed) {
            continue;
        }
        let want: Vec<_> = before.get_all(name).iter().collect();
        let got: Vec<_> = after.get_all(name).iter().collect();
        assert!(
            got.starts_with(&want),
            "{name}: sent {want:?}, forwarded {got:?}"
        );
    }
}

fn check(input: &[u8]) {
    match parse(input) {
        Ok(Some(req)) => {
            assert!(req.head_len <= input.len());
            agrees(input, &req);
        }
        // A head still incomplete is within its limit: nothing waits on an endless head.
        Ok(None) => assert!(
            input.len() <= MAX_HEAD,
            "{} bytes still partial",
            input.len()
        ),
        Err(e) => assert!(matches!(e.status, 400 | 413 | 414 | 431 | 501), "{e}"),
    }
}

fn valid_request() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        Just("GET"),
        Just("POST"),
        Just("PUT"),
        Just("HEAD"),
        Just("OPTIONS"),
        Just("DELETE"),
        Just("PATCH"),
    ];
    let segment = "([a-zA-Z0-9._~-]|%[0-9a-fA-F]{2}|\\.\\.?){0,6}";
    let path = prop::collection::vec(segment, 0..5).prop_map(|s| format!("/{}", s.join("/")));
    let query = prop::option::of("[a-z0-9=&/.%]{0,12}");
    let host = "[a-z]{1,8}\\.test(:[0-9]{1,4})?";
    let target = prop_oneof![
        4 => (path.clone(), query.clone()).prop_map(|(p, q)| match q {
            Some(q) => format!("{p}?{q}"),
            None => p,
        }),
        1 => (host, path).prop_map(|(h, p)| format!("http://{h}{p}")),
        1 => Just("*".to_string()),
    ];
    let header = (
        prop_oneof![
            12 => "[A-Za-z][A-Za-z0-9-]{0,10}",
            1 => Just("Connection".to_string()),
            1 => Just("Upgrade".to_string()),
            1 => Just("Via".to_string()),
            1 => Just("X-Forwarded-For".to_string()),
            1 => Just("Transfer-Encoding".to_string()),
            1 => Just("Content-Length".to_string()),
            1 => Just("Host".to_string()),
            1 => Just("TE".to_string()),
            1 => Just("Traceparent".to_string()),
        ],
        "[ -~]{0,16}",
    );
    let headers = prop::collection::vec(header, 0..6);
    let framing = prop_oneof![Just(0u8), Just(1u8), Just(2u8)];
    (
        method,
        target,
        "[a-z]{1,8}\\.test(:[0-9]{1,4})?",
        headers,
        framing,
        prop::bool::weighted(0.1),
    )
        .prop_map(|(m, t, host, headers, framing, http10)| {
            let mut s = format!(
                "{m} {t} HTTP/1.{}\r\nHost: {host}\r\n",
                if http10 { 0 } else { 1 }
            );
            for (n, v) in headers {
                s.push_str(&format!("{n}: {v}\r\n"));
            }
            match framing {
                1 => s.push_str("Content-Length: 5\r\n\r\nhello"),
                2 => s.push_str("Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
                _ => s.push_str("\r\n"),
            }
            s.into_bytes()
        })
}

/// A byte that makes parsers think: separators, controls, and any byte at all.
fn nasty_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => any::<u8>(),
        1 => prop::sample::select(b"\r\n :,;%/.?#@[]\t\0\x7f\x80\xff".to_vec()),
    ]
}

/// Replace, insert, delete, or truncate at a position.
fn mutate(mut v: Vec<u8>, edits: &[(u8, usize, u8)]) -> Vec<u8> {
    for &(kind, pos, b) in edits {
        if v.is_empty() {
            break;
        }
        let i = pos % v.len();
        match kind % 4 {
            0 => v[i] = b,
            1 => v.insert(i, b),
            2 => {
                v.remove(i);
            }
            _ => v.truncate(i),
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(nasty_byte(), 0..3000)) {
        check(&bytes);
    }

    #[test]
    fn valid_requests_agree_with_http(req in valid_request()) {
        check(&req);
    }

    #[test]
    fn mutated_requests_never_panic_and_agree(
        req in valid_request(),
        edits in prop::collection::vec((any::<u8>(), any::<usize>(), nasty_byte()), 1..5),
    ) {
        check(&mutate(req, &edits));
    }

    /// A chunked body fed in random pieces decodes the same as in one piece: same end,
    /// same data, same error.
    #[test]
    fn chunked_decoding_does_not_depend_on_splits(
        body in prop::collection::vec(nasty_byte(), 0..400),
        cuts in prop::collection::vec(1usize..40, 0..20),
    ) {
        let whole = decode(&body, &[]);
        let pieces = decode(&body, &cuts);
        prop_assert_eq!(whole, pieces);
    }

    /// Valid chunked encodings of random data decode back to it at any split.
    #[test]
    fn chunked_round_trip(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..50), 0..6),
        trailers in prop::collection::vec("[A-Za-z]{1,8}: [ -~]{0,10}", 0..3),
        cuts in prop::collection::vec(1usize..20, 0..20),
    ) {
        let mut wire = Vec::new();
        for c in &chunks {
            wire.extend_from_slice(format!("{:X};e=1\r\n", c.len()).as_bytes());
            wire.extend_from_slice(c);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n");
        for t in &trailers {
            wire.extend_from_slice(t.as_bytes());
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"\r\n");
        let end = wire.len();
        wire.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (used, data) = decode(&wire, &cuts).expect("valid encoding refused");
        prop_assert_eq!(used, Some(end));
        prop_assert_eq!(data, chunks.concat());
    }
}

/// The generator is not vacuous: most valid requests parse, so `agrees` really runs, and
/// mutations reach both outcomes.
#[test]
fn generated_requests_mostly_parse() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut parsed, mut refused) = (0, 0);
    let strategy = (
        valid_request(),
        prop::collection::vec((any::<u8>(), any::<usize>(), nasty_byte()), 1..5),
    );
    for _ in 0..400 {
        let (req, edits) = strategy.new_tree(&mut runner).expect("a value").current();
        if matches!(parse(&req), Ok(Some(_))) {
            parsed += 1;
        }
        if parse(&mutate(req, &edits)).is_err() {
            refused += 1;
        }
    }
    assert!(parsed > 200, "only {parsed} of 400 valid requests parsed");
    assert!(
        refused > 40,
        "only {refused} of 400 mutated requests refused"
    );
}

/// Decodes `body` as chunked in pieces of the sizes in `cuts` (then the rest): where the body
/// ended (if it did) and its data, or the error.
fn decode(
    body: &[u8],
    cuts: &[usize],
) -> Result<(Option<usize>, Vec<u8>), super::super::framing::FramingError> {
    let mut f = Framing::Chunked(Chunked::default());
    let mut data = bytes::BytesMut::new();
    let mut pos = 0;
    let mut sizes = cuts.iter().copied();
    while pos < body.len() {
        let end = sizes
            .next()
            .map_or(body.len(), |n| (pos + n).min(body.len()));
        let mut piece = &body[pos..end];
        while !piece.is_empty() {
            let a = f.advance(piece, Some(&mut data))?;
            pos += a.used;
            if a.done {
                return Ok((Some(pos), data.to_vec()));
            }
            piece = &piece[a.used..];
        }
    }
    Ok((None, data.to_vec()))
}

proptest! {
    /// The hand-written IPv4 text is `Display`'s, for every address.
    #[test]
    fn ip_text_is_display(a: u8, b: u8, c: u8, d: u8) {
        let ip = std::net::IpAddr::from([a, b, c, d]);
        prop_assert_eq!(ip_text(ip), ip.to_string());
    }
}

#[test]
fn ip_text_of_edges_and_v6() {
    for ip in [
        "0.0.0.0",
        "255.255.255.255",
        "10.0.100.9",
        "::1",
        "2001:db8::1",
    ] {
        let parsed: std::net::IpAddr = ip.parse().unwrap();
        assert_eq!(ip_text(parsed), ip);
    }
}

/// What the parser checked targets with before `syntax::http_accepts_target`.
fn http_crate_accepts(t: &[u8]) -> bool {
    std::str::from_utf8(t)
        .ok()
        .and_then(|t| http::uri::PathAndQuery::try_from(t).ok())
        .is_some()
}

/// `valid_authority` before it became one pass (`syntax.rs`), as the reference.
fn reference_authority(v: &[u8]) -> bool {
    if v.is_empty() || v.contains(&b'@') {
        return false;
    }
    let (host, port) = if v[0] == b'[' {
        let Some(end) = v.iter().position(|&b| b == b']') else {
            return false;
        };
        let inner = &v[1..end];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return false;
        }
        match &v[end + 1..] {
            [] => (&v[..=end], None),
            [b':', p @ ..] => (&v[..=end], Some(p)),
            _ => return false,
        }
    } else {
        match v.iter().rposition(|&b| b == b':') {
            Some(i) => (&v[..i], Some(&v[i + 1..])),
            None => (v, None),
        }
    };
    if host.is_empty() {
        return false;
    }
    let bad_escape = host.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !(host.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && host.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if bad_escape {
        return false;
    }
    let reg = |b: u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b);
    if host[0] != b'[' && !host.iter().all(|&b| reg(b)) {
        return false;
    }
    match port {
        None => true,
        Some(p) => {
            !p.is_empty()
                && p.len() <= 5
                && p.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(p)
                    .ok()
                    .and_then(|s| s.parse::<u32>().ok())
                    .is_some_and(|n| n <= 65535)
        }
    }
}

/// Every byte, and every pair of bytes, in each place of a target: the byte-class table and
/// the `http` crate agree exactly (this covers each class, and UTF-8 sequences of two bytes).
#[test]
fn target_check_is_the_http_crates_on_every_byte_and_pair() {
    for b in 0..=255u8 {
        for pre in [&b""[..], b"/", b"/a", b"/?", b"/a?b", b"/#", b"?", b"#"] {
            for post in [&b""[..], b"x", b"\xa9"] {
                let t = [pre, &[b], post].concat();
                assert_eq!(
                    syntax::http_accepts_target(&t),
                    http_crate_accepts(&t),
                    "{t:?}"
                );
            }
        }
        for c in 0..=255u8 {
            for pre in [&b"/"[..], b"/?"] {
                let t = [pre, &[b, c]].concat();
                assert_eq!(
                    syntax::http_accepts_target(&t),
                    http_crate_accepts(&t),
                    "{t:?}"
                );
            }
        }
    }
    let long = [b"/".to_vec(), b"a".repeat(65_533)].concat();
    assert!(syntax::http_accepts_target(&long) && http_crate_accepts(&long));
    let longer = [long.clone(), b"a".to_vec()].concat();
    assert!(!syntax::http_accepts_target(&longer) && !http_crate_accepts(&longer));
}

/// Bytes that matter to targets and authorities, more often than uniform bytes would give them.
fn syntax_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => prop::sample::select(b"/?#%:@[].*09afAFz-_~!$&'()+,;= \"<>{}`|^\\".to_vec()),
        1 => any::<u8>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Random targets: the table accepts exactly what `PathAndQuery::try_from` accepts.
    #[test]
    fn target_check_is_the_http_crates(t in prop::collection::vec(syntax_byte(), 0..24)) {
        prop_assert_eq!(syntax::http_accepts_target(&t), http_crate_accepts(&t));
    }

    /// Random authorities: the one-pass check decides as the previous one did.
    #[test]
    fn authority_check_is_unchanged(v in prop::collection::vec(syntax_byte(), 0..16)) {
        prop_assert_eq!(valid_authority(&v), reference_authority(&v));
    }
}

/// `parse_response_into` appends exactly `parse_response`'s head to what the buffer held, and
/// leaves the buffer alone when the head is incomplete or refused.
#[test]
fn response_into_a_buffer_is_the_same_head() {
    let o = RespOpts {
        head_request: false,
        client_http10: false,
        keep_alive: true,
        upgrade: false,
        via: "1.1 baton",
    };
    for raw in [
        &b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"
            [..],
        b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    ] {
        let mut buf = bytes::BytesMut::from(&b"before"[..]);
        let into = parse_response_into(raw, 4096, &o, &mut buf);
        let plain = parse_response(raw, 4096, &o);
        match (into, plain) {
            (Ok(Some(a)), Ok(Some(b))) => {
                assert!(a.out.is_empty());
                assert_eq!(&buf[..6], b"before");
                assert_eq!(&buf[6..], &b.out[..], "{}", String::from_utf8_lossy(raw));
                assert_eq!(
                    Response {
                        out: b.out.clone(),
                        ..a
                    },
                    b
                );
            }
            (a, b) => {
                assert_eq!(a, b);
                assert_eq!(&buf[..], b"before", "{}", String::from_utf8_lossy(raw));
            }
        }
    }
}

#[test]
fn te_is_not_forwarded_but_its_trailers_token_is_kept() {
    for (head, want) in [
        (
            &b"POST / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n"[..],
            true,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTE: gzip\r\nte: trailers;q=1\r\n\r\n",
            true,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTE: gzip\r\n\r\n", false),
        (b"POST / HTTP/1.1\r\nHost: a\r\n\r\n", false),
    ] {
        let r = parse(head).unwrap().unwrap();
        assert_eq!(r.te_trailers, want, "{:?}", String::from_utf8_lossy(head));
        let rest = String::from_utf8_lossy(&r.rest).to_ascii_lowercase();
        assert!(
            !rest.contains("\nte:") && !rest.starts_with("te:"),
            "{rest}"
        );
    }
}
