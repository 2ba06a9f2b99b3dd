//! Cost of the HTTP/1.1 head code on typical heads: `parse_request` on wrk's request and on a
//! browser-like one (10 header lines), `parse_response` on nginx's keep-alive answer, and
//! `assemble` (the head an attempt writes upstream).
//!
//! `cargo bench --bench head` runs criterion. With `HEAD_BENCH_ITERS=N` (and optionally
//! `HEAD_BENCH_CASE=name`) it instead runs each case N times and exits, for
//! `valgrind --tool=callgrind` (instructions per call, independent of the machine's load) and
//! `valgrind --tool=memcheck` (allocations per call); see docs/BENCHMARKS.md, "Head parsing".
#![allow(clippy::unwrap_used)]

use baton::proxy::http::head::{self, ReqOpts, RespOpts};
use criterion::Criterion;
use std::hint::black_box;

const WRK: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:18402\r\n\r\n";

const BROWSER: &[u8] = b"GET /assets/app.js?v=3 HTTP/1.1\r\n\
Host: www.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: */*\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Referer: https://www.example.com/\r\n\
Connection: keep-alive\r\n\
Cookie: session=4f2a9c1e8b7d; theme=dark\r\n\
Sec-Fetch-Dest: script\r\n\
Sec-Fetch-Mode: no-cors\r\n\r\n";

const NGINX: &[u8] = b"HTTP/1.1 200 OK\r\n\
Server: nginx/1.22.1\r\n\
Date: Tue, 01 Dec 2026 12:00:00 GMT\r\n\
Content-Type: text/plain\r\n\
Content-Length: 3\r\n\
Connection: keep-alive\r\n\r\nok\n";

fn req_opts(upgrades: &[String]) -> ReqOpts<'_> {
    ReqOpts {
        client_ip: "127.0.0.1",
        max_header_bytes: 16 * 1024,
        max_uri_bytes: 8 * 1024,
        upgrades,
        max_body_bytes: None,
        via: "1.1 baton",
        https: false,
    }
}

const RESP: RespOpts = RespOpts {
    head_request: false,
    client_http10: false,
    keep_alive: true,
    upgrade: false,
    via: "1.1 baton",
};

fn request(buf: &[u8], o: &ReqOpts<'_>) -> head::Request {
    head::parse_request(black_box(buf), o).unwrap().unwrap()
}

/// The head an attempt writes to the upstream, with the upstream's address as Host.
fn assemble(req: &head::Request) -> bytes::BytesMut {
    head::assemble(&req.line, Some(black_box("127.0.0.1:18080")), &req.rest)
}

/// One call of a case, by name (the same names as the criterion benches).
fn run_case(name: &str, o: &ReqOpts<'_>, wrk: &head::Request) -> bool {
    match name {
        "parse_request/wrk" => drop(black_box(request(WRK, o))),
        "parse_request/browser" => drop(black_box(request(BROWSER, o))),
        "parse_response/nginx" => drop(black_box(
            head::parse_response(black_box(NGINX), 16 * 1024, &RESP)
                .unwrap()
                .unwrap(),
        )),
        // As the engine calls it: the head written into the client's (reused) buffer.
        "parse_response_into/nginx" => CLIENT_BUF.with_borrow_mut(|out| {
            out.clear();
            drop(black_box(
                head::parse_response_into(black_box(NGINX), 16 * 1024, &RESP, out)
                    .unwrap()
                    .unwrap(),
            ))
        }),
        "assemble/wrk" => drop(black_box(assemble(wrk))),
        _ => return false,
    }
    true
}

const CASES: [&str; 5] = [
    "parse_request/wrk",
    "parse_request/browser",
    "parse_response/nginx",
    "parse_response_into/nginx",
    "assemble/wrk",
];

thread_local! {
    /// A client buffer that lives across calls, like a connection's.
    static CLIENT_BUF: std::cell::RefCell<bytes::BytesMut> =
        std::cell::RefCell::new(bytes::BytesMut::with_capacity(4096));
}

fn main() {
    let upgrades = vec!["websocket".to_string()];
    let o = req_opts(&upgrades);
    let wrk = request(WRK, &o);
    if let Ok(n) = std::env::var("HEAD_BENCH_ITERS") {
        let n: u64 = n.parse().expect("HEAD_BENCH_ITERS is a count");
        let only = std::env::var("HEAD_BENCH_CASE").ok();
        for name in CASES {
            if only.as_deref().is_some_and(|c| c != name) {
                continue;
            }
            for _ in 0..n {
                assert!(run_case(name, &o, &wrk));
            }
        }
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    for name in CASES {
        c.bench_function(name, |b| b.iter(|| run_case(name, &o, &wrk)));
    }
    c.final_summary();
}
