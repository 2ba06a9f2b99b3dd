//! RFC 9110 / 9112 conformance of the HTTP/1.1 engine, request side, end to end: the real
//! binary between a raw client and a capturing backend. Each table row is raw bytes from a
//! client and either the status the client must get or the exact head lines the upstream must
//! receive. The response side is in `http_conformance_responses.rs`.
#![allow(clippy::unwrap_used)]
mod capture;
mod common;
use capture::*;
use common::Baton;
use std::net::SocketAddr;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_rules() {
    let (app, cap) = backend(ok).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let addr = b.addr("web");
    status_rows(
        addr,
        &cap,
        &[
            ("missing in 1.1", b"GET / HTTP/1.1\r\n\r\n", 400),
            (
                "two different",
                b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
                400,
            ),
            (
                "two identical",
                b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n\r\n",
                400,
            ),
            (
                "userinfo",
                b"GET / HTTP/1.1\r\nHost: user@a.test\r\n\r\n",
                400,
            ),
            (
                "userinfo with password",
                b"GET / HTTP/1.1\r\nHost: u:pw@a.test\r\n\r\n",
                400,
            ),
            (
                "port out of range",
                b"GET / HTTP/1.1\r\nHost: a.test:65536\r\n\r\n",
                400,
            ),
            (
                "port not digits",
                b"GET / HTTP/1.1\r\nHost: a.test:8x\r\n\r\n",
                400,
            ),
            (
                "space inside",
                b"GET / HTTP/1.1\r\nHost: a test\r\n\r\n",
                400,
            ),
            (
                "slash inside",
                b"GET / HTTP/1.1\r\nHost: a.test/x\r\n\r\n",
                400,
            ),
            ("empty", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 400),
            ("bad ipv6", b"GET / HTTP/1.1\r\nHost: [::g]\r\n\r\n", 400),
            (
                "1.1 absolute-form without Host",
                b"GET http://a.test/ HTTP/1.1\r\n\r\n",
                400,
            ),
            ("valid", b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", 200),
            (
                "valid with port",
                b"GET / HTTP/1.1\r\nHost: A.Test:8080\r\n\r\n",
                200,
            ),
            (
                "valid ipv6",
                b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
                200,
            ),
        ],
    )
    .await;
    // HTTP/1.0 needs no Host: the upstream gets the server's address as Host.
    cap.clear();
    let r = send_one(addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert_eq!(r.status, 200);
    let got = cap.one();
    assert_eq!(got.line(), "GET /old HTTP/1.1");
    assert_eq!(got.header("host"), Some(app.to_string().as_str()));
    assert!(got.header("x-forwarded-host").is_none(), "{:?}", got.head);
    // A valid Host goes to the upstream as sent, and the whole head is exactly this.
    cap.clear();
    send_one(
        addr,
        b"GET /a?b=1 HTTP/1.1\r\nHost: A.Test:8080\r\nX-Mine: 1\r\n\r\n",
    )
    .await;
    let mut want = lines(&["GET /a?b=1 HTTP/1.1", "host: A.Test:8080", "X-Mine: 1"]);
    want.extend(tail("A.Test:8080"));
    assert_eq!(cap.one().stable_head(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_target_forms() {
    let (app, app_cap) = backend(scripted).await;
    let (api, api_cap) = backend(scripted).await;
    let routes = "    routes:\n      - { host: \"api.test\", upstream: api }\n";
    let b = Baton::start(&conf(routes, &[("app", app), ("api", api)]));
    let addr = b.addr("web");
    // Absolute-form: the authority routes and is the Host the upstream gets.
    for (req, line) in [
        (
            &b"GET http://api.test/x?q=1 HTTP/1.1\r\nHost: other.test\r\n\r\n"[..],
            "GET /x?q=1 HTTP/1.1",
        ),
        (
            b"GET HTTP://api.test/x HTTP/1.1\r\nHost: other.test\r\n\r\n",
            "GET /x HTTP/1.1",
        ),
        (
            b"GET http://api.test HTTP/1.1\r\nHost: api.test\r\n\r\n",
            "GET / HTTP/1.1",
        ),
        (
            b"GET http://api.test/a/../b HTTP/1.1\r\nHost: api.test\r\n\r\n",
            "GET /b HTTP/1.1",
        ),
    ] {
        api_cap.clear();
        let r = send_one(addr, req).await;
        assert_eq!(r.status, 200, "{}", show(req));
        let got = api_cap.one();
        let mut want = vec![line.to_string(), "host: api.test".into()];
        want.extend(tail("api.test"));
        assert_eq!(got.stable_head(), want, "{}", show(req));
    }
    assert!(app_cap.reqs().is_empty(), "absolute-form routed by Host");
    api_cap.clear();
    status_rows(
        addr,
        &app_cap,
        &[
            (
                "https scheme",
                b"GET https://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n",
                400,
            ),
            (
                "ftp scheme",
                b"GET ftp://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n",
                400,
            ),
            (
                "userinfo in authority",
                b"GET http://u@api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n",
                400,
            ),
            (
                "bad port in authority",
                b"GET http://api.test:99999/ HTTP/1.1\r\nHost: api.test\r\n\r\n",
                400,
            ),
            (
                "authority-form with GET",
                b"GET api.test:80 HTTP/1.1\r\nHost: api.test\r\n\r\n",
                400,
            ),
            (
                "asterisk with GET",
                b"GET * HTTP/1.1\r\nHost: a.test\r\n\r\n",
                400,
            ),
            (
                "relative target",
                b"GET x/y HTTP/1.1\r\nHost: a.test\r\n\r\n",
                400,
            ),
            (
                "CONNECT is refused where the listener does not enable it",
                b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n",
                405,
            ),
            (
                "CONNECT without port",
                b"CONNECT api.test HTTP/1.1\r\nHost: api.test\r\n\r\n",
                400,
            ),
        ],
    )
    .await;
    assert!(api_cap.reqs().is_empty(), "refused requests reached api");
    // `*` with OPTIONS is forwarded as `*`.
    app_cap.clear();
    let r = send_one(addr, b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    assert_eq!(r.status, 200);
    assert_eq!(app_cap.one().line(), "OPTIONS * HTTP/1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_framing_refusals() {
    let (app, cap) = backend(ok).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    status_rows(
        b.addr("web"),
        &cap,
        &[
            ("CL with TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
            ("TE with CL", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n0\r\n\r\n", 400),
            ("TE gzip only", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            ("TE chunked, gzip", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 501),
            ("TE identity", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", 501),
            ("TE xchunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 501),
            ("TE chunked then gzip in two lines", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            ("TE chunked twice", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
            ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
            ("CL not a number", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n", 400),
            ("CL negative", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
            ("CL with sign", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello", 400),
            ("CL two numbers in one value", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5 5\r\n\r\nhello", 400),
            ("CL differing list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\nhello", 400),
            ("CL differing lines", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400),
            ("CL empty list member", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5,\r\n\r\nhello", 400),
            ("CL past u64", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
            ("space before colon", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\nhello", 400),
            ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n", 400),
            ("obs-fold in TE", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
            ("NUL in a value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\0b\r\n\r\n", 400),
            ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400),
            ("HTTP/2.0 in a request line", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cl_te_pipelined_behind_a_valid_request_is_refused() {
    let (app, cap) = backend(ok).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let addr = b.addr("web");
    for first in [
        &b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"POST /first HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /first HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        cap.clear();
        // One write, so both requests arrive in the same segment.
        let segment = [
            first,
            b"POST /smuggled HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ]
        .concat();
        let mut c = Client::connect(addr).await;
        c.send(&segment).await;
        assert_eq!(c.response(false).await.unwrap().status, 200);
        assert_eq!(c.response(false).await.unwrap().status, 400);
        assert!(c.until_closed().await.is_empty());
        let got = cap.reqs();
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].line().starts_with(&show(&first[..first.len().min(11)])));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_framing_forwarded_as_sent() {
    let (app, cap) = backend(scripted).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let addr = b.addr("web");
    // (name, request, the head lines the upstream gets before baton's own, the body it gets)
    type Row<'a> = (&'a str, &'a [u8], &'a [&'a str], &'a [u8]);
    let rows: [Row; 8] = [
        ("gzip, chunked passes with its codings", b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", &["POST /up HTTP/1.1", "host: a", "Transfer-Encoding: gzip, chunked"], b"3\r\nabc\r\n0\r\n\r\n"),
        ("chunked with extensions passes byte for byte", b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\n\r\n", &["POST /up HTTP/1.1", "host: a", "Transfer-Encoding: chunked"], b"3;x=y\r\nabc\r\n0\r\n\r\n"),
        ("identical CL lines are one", b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", &["POST /up HTTP/1.1", "host: a", "content-length: 5"], b"hello"),
        ("identical CL list is one", b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello", &["POST /up HTTP/1.1", "host: a", "content-length: 5"], b"hello"),
        ("body on GET", b"GET /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", &["GET /up HTTP/1.1", "host: a", "content-length: 5"], b"hello"),
        ("chunked body on GET", b"GET /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", &["GET /up HTTP/1.1", "host: a", "Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
        ("body on HEAD", b"HEAD /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", &["HEAD /up HTTP/1.1", "host: a", "content-length: 5"], b"hello"),
        ("zero length", b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", &["POST /up HTTP/1.1", "host: a", "content-length: 0"], b""),
    ];
    for (name, req, head, body) in rows {
        cap.clear();
        let mut c = Client::connect(addr).await;
        c.send(req).await;
        let head_req = req.starts_with(b"HEAD");
        let r = c.response(head_req).await.unwrap();
        assert_eq!(r.status, 200, "{}: {:?}", name, r.head);
        let got = cap.one();
        let mut want = lines(head);
        want.extend(tail("a"));
        assert_eq!(got.stable_head(), want, "{}", name);
        assert_eq!(show(&got.body), show(body), "{}", name);
        // The connection stays usable.
        c.send(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(c.response(false).await.unwrap().status, 200, "{}", name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_request_bodies_are_400_on_the_client_side() {
    let (app, cap) = backend(ok).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let addr = b.addr("web");
    let chunked = "POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
    let long_ext = format!("{chunked}1;{}\r\na\r\n0\r\n\r\n", "e".repeat(5000));
    let big_trailers = format!("{chunked}0\r\n{}\r\n", "X-T: abcdefgh\r\n".repeat(1200));
    let rows: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        (
            "invalid chunk size",
            format!("{chunked}zz\r\nhello\r\n0\r\n\r\n").into_bytes(),
            false,
            "invalid chunk size",
        ),
        (
            "chunk size past 64 bits",
            format!("{chunked}11111111111111111\r\n").into_bytes(),
            false,
            "invalid chunk size",
        ),
        (
            "no CRLF after chunk data",
            format!("{chunked}5\r\nhelloXX\r\n0\r\n\r\n").into_bytes(),
            false,
            "invalid chunked framing",
        ),
        (
            "oversized chunk extension",
            long_ext.into_bytes(),
            false,
            "chunk extension too long",
        ),
        (
            "oversized trailer section",
            big_trailers.into_bytes(),
            false,
            "trailer section too large",
        ),
        (
            "trailer name with a space",
            format!("{chunked}5\r\nhello\r\n0\r\nX Y: z\r\n\r\n").into_bytes(),
            false,
            "invalid chunked framing",
        ),
        (
            "trailer line without a colon",
            format!("{chunked}0\r\nGET /smuggled HTTP/1.1\r\n\r\n").into_bytes(),
            false,
            "invalid chunked framing",
        ),
        (
            "Content-Length as a trailer",
            format!("{chunked}5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n").into_bytes(),
            false,
            "forbidden trailer field",
        ),
        (
            "Transfer-Encoding as a trailer",
            format!("{chunked}0\r\nX-T: 1\r\ntransfer-encoding: chunked\r\n\r\n").into_bytes(),
            false,
            "forbidden trailer field",
        ),
        (
            "Host as a trailer",
            format!("{chunked}0\r\nHOST: b.test\r\n\r\n").into_bytes(),
            false,
            "forbidden trailer field",
        ),
        (
            "truncated chunked body",
            format!("{chunked}5\r\nhel").into_bytes(),
            true,
            "client closed mid-body",
        ),
        (
            "truncated CL body",
            b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc".to_vec(),
            true,
            "client closed mid-body",
        ),
    ];
    for (name, req, half_close, reason) in rows {
        let mut c = Client::connect(addr).await;
        c.send(&req).await;
        if half_close {
            tokio::io::AsyncWriteExt::shutdown(&mut c.s).await.unwrap();
        }
        let r = c
            .response(false)
            .await
            .unwrap_or_else(|| panic!("{name}: no response"));
        assert_eq!(r.status, 400, "{name}: {:?}", r.head);
        assert!(
            b.log
                .wait_for(
                    &["request failed", "status=400", "side=client", reason],
                    WAIT
                )
                .is_some(),
            "{name}: no client-side 400 in the log"
        );
    }
    assert!(
        cap.reqs().is_empty(),
        "a broken body reached the upstream whole"
    );
    assert_eq!(
        b.log.count("status=502"),
        0,
        "logged as an upstream failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_text_inside_a_body_is_body() {
    let (app, cap) = backend(ok).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let addr = b.addr("web");
    let data = b"content-length: 5\r\nhello\r\n";
    // The old engine's false 400: a chunked upload whose body holds header text.
    let chunked = [
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".as_slice(),
        format!("{:x}\r\n", data.len()).as_bytes(),
        data,
        b"\r\n0\r\n\r\n",
    ]
    .concat();
    let r = send_one(addr, &chunked).await;
    assert_eq!(r.status, 200, "{:?}", r.head);
    assert_eq!(dechunk(&cap.one().body), data);
    // A CL upload holding that text, then a chunked request on the same connection.
    cap.clear();
    let mut c = Client::connect(addr).await;
    let cl = [
        format!(
            "POST /cl HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            data.len()
        )
        .as_bytes(),
        data,
    ]
    .concat();
    c.send(&cl).await;
    assert_eq!(c.response(false).await.unwrap().status, 200);
    c.send(&chunked).await;
    assert_eq!(c.response(false).await.unwrap().status, 200);
    let got = cap.reqs();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].body, data);
    assert_eq!(dechunk(&got[1].body), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_matches_the_normalized_path() {
    let (app, app_cap) = backend(ok).await;
    let (internal, int_cap) = backend(ok).await;
    let routes = "    routes:\n      - { path_prefix: \"/internal\", upstream: internal }\n";
    let b = Baton::start(&conf(routes, &[("app", app), ("internal", internal)]));
    let addr = b.addr("web");
    // (path sent, upstream reached, path it receives)
    for (path, to_internal, want) in [
        ("/public/../internal", true, "/internal"),
        ("/%69nternal", true, "/internal"),
        ("//internal", true, "/internal"),
        ("/./internal/x", true, "/internal/x"),
        ("/public/%2e%2e/internal?a=/../b", true, "/internal?a=/../b"),
        ("/public/%2E%2E//internal/", true, "/internal/"),
        ("/%69%6E%74ernal/%7e", true, "/internal/~"),
        ("/public/x", false, "/public/x"),
        ("/internal/../public", false, "/public"),
        ("/a%2fb", false, "/a%2Fb"),
    ] {
        let (cap, other) = if to_internal {
            (&int_cap, &app_cap)
        } else {
            (&app_cap, &int_cap)
        };
        cap.clear();
        other.clear();
        let req = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(send_one(addr, req.as_bytes()).await.status, 200, "{path}");
        assert_eq!(cap.one().line(), format!("GET {want} HTTP/1.1"), "{path}");
        assert!(other.reqs().is_empty(), "{path} reached the other upstream");
    }
    status_rows(
        addr,
        &app_cap,
        &[("bad escape", b"GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n", 400)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uri_and_header_limits_414_431() {
    let (app, cap) = backend(ok).await;
    let yaml = format!(
        "listeners:\n  small:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n    http:\n      max_uri_bytes: 256\n      max_header_bytes: 4096\n  dflt:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\nupstreams:\n  app:\n    servers: [\"{app}\"]\n"
    );
    let b = Baton::start(&yaml);
    let small = b.addr("small");
    let dflt = b.addr("dflt");
    let get = |path: String, extra: String| {
        format!("GET {path} HTTP/1.1\r\nHost: a\r\n{extra}\r\n").into_bytes()
    };
    let p = |n: usize| format!("/{}", "a".repeat(n));
    let many: String = (0..200).map(|i| format!("X-{i}: 1\r\n")).collect();
    let big = format!("X-Big: {}\r\n", "b".repeat(5000));
    let rows: Vec<(&str, SocketAddr, Vec<u8>, u16)> = vec![
        (
            "uri under the limit",
            small,
            get(p(200), String::new()),
            200,
        ),
        (
            "uri over max_uri_bytes",
            small,
            get(p(300), String::new()),
            414,
        ),
        (
            "uri over the default 8192",
            dflt,
            get(p(9000), String::new()),
            414,
        ),
        (
            "uri under the default",
            dflt,
            get(p(8000), String::new()),
            200,
        ),
        (
            "head over max_header_bytes",
            small,
            get(p(1), big.clone()),
            431,
        ),
        ("too many header lines", dflt, get(p(1), many), 431),
        ("head under the default", dflt, get(p(1), big), 200),
    ];
    for (name, addr, req, want) in rows {
        cap.clear();
        let r = send_one(addr, &req).await;
        assert_eq!(r.status, want, "{name}: {:?}", r.head);
        if want != 200 {
            assert!(cap.reqs().is_empty(), "{name}: forwarded");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_body_gets_408_and_releases_the_upstream() {
    let (app, cap) = backend(ok).await;
    let b = Baton::start(&conf(
        "    http:\n      body_timeout: 1s\n",
        &[("app", app)],
    ));
    let mut c = Client::connect(b.addr("web")).await;
    c.send(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
        .await;
    let (mut rd, mut wr) = c.s.into_split();
    // One byte every 2 s, until the proxy stops taking them.
    let trickle = tokio::spawn(async move {
        for _ in 0..10 {
            if tokio::io::AsyncWriteExt::write_all(&mut wr, b"x")
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut out),
    )
    .await;
    let text = show(&out);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.ends_with("request body timeout\n"), "{text}");
    trickle.abort();
    assert!(
        common::wait_until(WAIT, || cap.accepted() == 1 && cap.closed() == 1).await,
        "upstream connection not released"
    );
    assert!(cap.reqs().is_empty());
    assert!(b
        .log
        .wait_for(&["request failed", "status=408", "body timeout"], WAIT)
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_authority_is_the_host() {
    use http_body_util::{BodyExt, Empty};
    type B = Empty<bytes::Bytes>;
    let (app, app_cap) = backend(ok).await;
    let (api, api_cap) = backend(ok).await;
    let routes = "    routes:\n      - { host: \"api.test\", upstream: api }\n";
    let b = Baton::start(&conf(routes, &[("app", app), ("api", api)]));
    let s = tokio::net::TcpStream::connect(b.addr("web")).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // (`:authority`, Host header, status, upstream reached)
    for (uri, host, want, reached) in [
        ("http://api.test/x", None, 200, Some("api")),
        ("http://api.test/x", Some("api.test"), 200, Some("api")),
        ("http://api.test/x", Some("API.test"), 200, Some("api")),
        ("http://api.test/x", Some("other.test"), 400, None),
        ("http://other.test/x", Some("api.test"), 400, None),
        ("http://u@api.test/x", None, 400, None),
        ("http://other.test/x", None, 200, Some("app")),
    ] {
        app_cap.clear();
        api_cap.clear();
        let mut req = hyper::Request::builder().uri(uri);
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let req = req.body(B::new()).unwrap();
        send.ready().await.unwrap();
        let resp = tokio::time::timeout(WAIT, send.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status().as_u16(), want, "{uri} host {host:?}");
        let _ = resp.into_body().collect().await;
        let (a, p) = (app_cap.reqs(), api_cap.reqs());
        match reached {
            None => assert!(a.is_empty() && p.is_empty(), "{uri} {host:?} forwarded"),
            Some(name) => {
                let got = if name == "api" { &p } else { &a };
                assert_eq!(got.len(), 1, "{uri} {host:?} did not reach {name}");
                let authority = uri.trim_start_matches("http://").split('/').next().unwrap();
                assert_eq!(got[0].header("host"), Some(host.unwrap_or(authority)));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_never_hangs_a_connection() {
    use rand::{Rng, SeedableRng};
    let (app, _cap) = backend(ok).await;
    let listener = "    http:\n      header_read_timeout: 1s\n      keepalive_timeout: 1s\n      body_timeout: 1s\n";
    let b = Baton::start(&conf(listener, &[("app", app)]));
    let addr = b.addr("web");
    let mut rng = rand::rngs::StdRng::seed_from_u64(9112);
    let valid =
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let mut inputs: Vec<Vec<u8>> = Vec::new();
    for i in 0..40 {
        if i % 2 == 0 {
            let n = rng.random_range(1..3000);
            inputs.push((0..n).map(|_| rng.random::<u8>()).collect());
        } else {
            // A valid request with a few bytes replaced, inserted or cut.
            let mut v = valid.to_vec();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..v.len());
                match rng.random_range(0..3) {
                    0 => v[at] = rng.random(),
                    1 => v.insert(at, rng.random()),
                    _ => v.truncate(at.max(1)),
                }
            }
            inputs.push(v);
        }
    }
    // Each connection ends (answered, refused or timed out) within the bound `until_closed`
    // enforces, and the process keeps serving.
    let tasks: Vec<_> = inputs
        .into_iter()
        .map(|input| {
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                let _ = tokio::io::AsyncWriteExt::write_all(&mut c.s, &input).await;
                c.until_closed().await;
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let r = send_one(addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let (app, cap) = backend(scripted).await;
    let b = Baton::start(&conf("", &[("app", app)]));
    let mut c = Client::connect(b.addr("web")).await;
    let segment = [
        &b"GET /echo/1 HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"POST /echo/2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
        b"POST /echo/3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
        b"GET /echo/4 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"GET /echo/never HTTP/1.1\r\nHost: a\r\n\r\n",
    ]
    .concat();
    c.send(&segment).await;
    for n in 1..=4 {
        let r = c.response(false).await.unwrap();
        assert_eq!(r.body_text(), format!("/echo/{n}"));
    }
    // `Connection: close` ends it: what came after is not served.
    assert!(c.until_closed().await.is_empty());
    let paths: Vec<String> = cap.reqs().iter().map(|g| g.line().to_string()).collect();
    assert_eq!(paths.len(), 4, "{paths:?}");
}
