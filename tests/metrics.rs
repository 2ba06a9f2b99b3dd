//! /metrics against the real binary: every line is checked against the Prometheus text format
//! and naming conventions; per-server series, build info and the `process_*` family are there;
//! series that cannot move for a listener's or upstream's kind are not; per-server counters
//! continue across an upgrade.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
mod http_support;
use common::*;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::SocketAddr;

/// One `GET /metrics`; returns the body, or `None` if nothing answers (between two
/// generations during an upgrade).
fn try_scrape(addr: SocketAddr) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    Some(body.to_string())
}

fn scrape(addr: SocketAddr) -> String {
    try_scrape(addr).expect("no answer from /metrics")
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// Parses `k="v",k2="v2"`, checking each name and escape; returns the pairs.
fn labels(s: &str, line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (k, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad labels: {line}"));
        assert!(
            is_name(k) && !k.starts_with("__"),
            "bad label name {k:?}: {line}"
        );
        let mut v = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, ch) = chars
                .next()
                .unwrap_or_else(|| panic!("unterminated label: {line}"));
            match ch {
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('\\') => v.push('\\'),
                    Some('"') => v.push('"'),
                    Some('n') => v.push('\n'),
                    other => panic!("bad escape {other:?}: {line}"),
                },
                '"' => break i,
                c => v.push(c),
            }
        };
        out.push((k.to_string(), v));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    out
}

/// Checks every line of a scrape and returns the samples by `name{labels}` as written.
/// Format: `# HELP`, then `# TYPE`, then the family's samples, each family once. Conventions:
/// names are `baton_*` or `process_*`; counters end in `_total`, nothing else does; units are
/// base units (`_seconds`, `_bytes`); a histogram has `_bucket` with `le` (ending at `+Inf`),
/// `_sum` and `_count`; no series appears twice.
fn check(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut families: HashSet<String> = HashSet::new();
    let mut current: Option<(String, String)> = None;
    let mut help_for: Option<String> = None;
    for line in text.lines() {
        assert!(!line.is_empty(), "empty line in the scrape");
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(!help.trim().is_empty(), "empty help: {line}");
            assert!(families.insert(name.to_string()), "family twice: {name}");
            help_for = Some(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert_eq!(help_for.as_deref(), Some(name), "TYPE without HELP: {line}");
            assert!(matches!(kind, "counter" | "gauge" | "histogram"), "{line}");
            assert!(
                name.starts_with("baton_") || name.starts_with("process_"),
                "{name}: not baton_ or process_"
            );
            assert!(is_name(name), "{line}");
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name}: _total is for counters"
            );
            for unit in ["_milliseconds", "_ms", "_kilobytes", "_percent"] {
                assert!(!name.contains(unit), "{name}: use base units");
            }
            current = Some((name.to_string(), kind.to_string()));
            continue;
        }
        assert!(!line.starts_with('#'), "bad comment: {line}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, ls) = match series.split_once('{') {
            Some((n, rest)) => (n, labels(rest.strip_suffix('}').expect(line), line)),
            None => (series, Vec::new()),
        };
        let (family, kind) = current
            .as_ref()
            .unwrap_or_else(|| panic!("sample before TYPE: {line}"));
        if kind == "histogram" {
            let suffix = name
                .strip_prefix(family.as_str())
                .unwrap_or_else(|| panic!("{line}"));
            assert!(matches!(suffix, "_bucket" | "_sum" | "_count"), "{line}");
            assert_eq!(
                suffix == "_bucket",
                ls.iter().any(|(k, _)| k == "le"),
                "{line}"
            );
        } else {
            assert_eq!(name, family, "sample outside its family: {line}");
        }
        if kind == "counter" {
            assert!(v >= 0.0, "negative counter: {line}");
        }
        let keys: HashSet<&str> = ls.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys.len(), ls.len(), "label twice: {line}");
        assert!(
            samples.insert(series.to_string(), v).is_none(),
            "series twice: {line}"
        );
    }
    samples
}

fn has_prefix(m: &HashMap<String, f64>, prefix: &str) -> bool {
    m.keys().any(|k| k.starts_with(prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_conventions_per_server_and_kind() {
    let tcp_be = echo_backend("E").await;
    let (http_be, _) = http_support::backend("A").await;
    let dead = dead_addr();
    // A fixed admin port: the successor binds the same one once its predecessor is gone.
    let admin = free_addr();
    let yaml = format!(
        "admin:\n  listen: {admin}\n\
         listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: pg\n\
         \x20 web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n\
         upstreams:\n  pg:\n    servers: [\"{tcp_be}\"]\n    eject_after: 0\n    retries: 0\n\
         \x20 app:\n    servers: [\"{http_be}\", \"{dead}\"]\n    health_check:\n      kind: tcp\n      interval: 100ms\n      fall: 1\n"
    );
    let b = Baton::start(&yaml);
    let web = b.addr("web");
    // The dead server fails its checks and is marked down.
    assert!(
        b.log
            .wait_for(&["server marked unhealthy", &dead.to_string()], WAIT)
            .is_some(),
        "dead server never marked down"
    );
    for _ in 0..3 {
        let r = http_support::raw(
            web,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    let (_tunnel, g) = greeting(b.addr("t"), 1).await;
    assert_eq!(g, "E");

    let app = format!("upstream=\"app\",server=\"{http_be}\"");
    let down = format!("upstream=\"app\",server=\"{dead}\"");
    let pg = format!("upstream=\"pg\",server=\"{tcp_be}\"");
    let mut m = HashMap::new();
    let ok = wait_until(WAIT, || {
        m = check(&scrape(admin));
        m.get(&format!(
            "baton_upstream_server_http_responses_total{{{app},class=\"2xx\"}}"
        )) == Some(&3.0)
            && m.get(&format!("baton_upstream_server_connections_active{{{pg}}}")) == Some(&1.0)
    })
    .await;
    assert!(ok, "per-server counts never showed: {m:?}");
    // Per server: up, active connections, requests by class, connect failures, ejections.
    assert_eq!(m[&format!("baton_upstream_server_up{{{app}}}")], 1.0);
    assert_eq!(m[&format!("baton_upstream_server_up{{{down}}}")], 0.0);
    assert_eq!(m[&format!("baton_upstream_server_up{{{pg}}}")], 1.0);
    assert_eq!(
        m[&format!("baton_upstream_server_connect_failures_total{{{pg}}}")],
        0.0
    );
    assert!(m.contains_key(&format!("baton_upstream_server_ejections_total{{{app}}}")));
    assert_eq!(
        m["baton_upstream_health_transitions_total{upstream=\"app\",to=\"down\"}"],
        1.0
    );
    // Build and process.
    let build = m
        .keys()
        .find(|k| k.starts_with("baton_build_info{"))
        .expect("build info");
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{build}"
    );
    assert!(build.contains("commit=\""), "{build}");
    for p in [
        "process_start_time_seconds",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
    ] {
        assert!(m.contains_key(p), "{p} missing");
    }
    assert!(m["process_open_fds"] > 5.0 && m["process_max_fds"] >= m["process_open_fds"]);
    assert!(m["process_resident_memory_bytes"] > 1e6);
    // No series that cannot move: no HTTP series for the TCP upstream, no ejection series where
    // ejection is off, no health transitions without checks, no retries with retries: 0.
    assert!(!has_prefix(
        &m,
        "baton_upstream_http_responses_total{upstream=\"pg\""
    ));
    assert!(!has_prefix(
        &m,
        "baton_http_request_duration_seconds_bucket{upstream=\"pg\""
    ));
    assert!(!has_prefix(
        &m,
        "baton_upstream_server_http_responses_total{upstream=\"pg\""
    ));
    assert!(!has_prefix(
        &m,
        "baton_upstream_server_ejections_total{upstream=\"pg\""
    ));
    assert!(!has_prefix(
        &m,
        "baton_upstream_health_transitions_total{upstream=\"pg\""
    ));
    assert!(!has_prefix(
        &m,
        "baton_upstream_retries_total{upstream=\"pg\""
    ));
    assert!(has_prefix(
        &m,
        "baton_upstream_retries_total{upstream=\"app\""
    ));
    assert!(
        !m.contains_key("baton_process_start_time_seconds"),
        "custom start time is gone"
    );

    // Per-server counters continue across an upgrade.
    let (ok, out) = b.cli_upgrade(&["--wait"]);
    assert!(ok, "{out}");
    let key = format!("baton_upstream_server_http_responses_total{{{app},class=\"2xx\"}}");
    let ok = wait_until(WAIT, || {
        let Some(s) = try_scrape(admin) else {
            return false;
        };
        m = check(&s);
        m.get("baton_generation") == Some(&2.0)
    })
    .await;
    assert!(ok, "the successor never answered /metrics");
    assert_eq!(m[&key], 3.0, "per-server count restarted");
    let r = http_support::raw(
        web,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(wait_until(WAIT, || check(&scrape(admin)).get(&key) == Some(&4.0)).await);
    if let Some(pid) = rustix::process::Pid::from_raw(b.serving_pid()) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_only_config_has_no_http_series() {
    let be = echo_backend("E").await;
    let b = Baton::start(&format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\nupstreams:\n  u:\n    servers: [\"{be}\"]\n"
    ));
    let m = check(&scrape(b.addr("admin")));
    for k in m.keys() {
        assert!(!k.contains("http"), "HTTP series in a TCP-only config: {k}");
    }
    assert!(m.contains_key(&format!(
        "baton_upstream_server_up{{upstream=\"u\",server=\"{be}\"}}"
    )));
}
