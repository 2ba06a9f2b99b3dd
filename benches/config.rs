//! Micro-benchmarks of configuration parsing: the duration parser (called for every duration
//! key) and a whole config file parsed and validated (what `baton check`, start-up and every
//! reload pay), plus the balancer pick of a parsed upstream (on every new upstream connection).
#![allow(clippy::unwrap_used)]

use baton::config::{parse_duration, Config};
use baton::upstream::Upstream;
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

const CONFIG: &str = "\
runtime:
  drain_timeout: 30s
  upgrade_timeout: 10s
  worker_threads: 1
listeners:
  l4:
    listen: 127.0.0.1:15000
    protocol: tcp
    upstream: app
    idle_timeout: 1h
  web:
    listen: 127.0.0.1:8080
    protocol: http
    upstream: app
    http:
      keepalive_timeout: 75s
upstreams:
  app:
    servers:
      - 127.0.0.1:9001
      - 127.0.0.1:9002
      - { addr: 127.0.0.1:9003, weight: 3 }
    connect_timeout: 2s
    retries: 2
";

fn config(c: &mut Criterion) {
    let mut g = c.benchmark_group("config");
    for s in ["500ms", "30s", "1.5h", "0"] {
        g.bench_function(format!("parse_duration/{s}"), |b| {
            b.iter(|| parse_duration(black_box(s)).unwrap())
        });
    }
    g.bench_function("parse_duration/error", |b| {
        b.iter(|| parse_duration(black_box("12parsecs")).unwrap_err())
    });
    let path = Path::new("/etc/baton/config.yaml");
    g.bench_function("parse_and_validate", |b| {
        b.iter(|| Config::parse(path, black_box(CONFIG)).unwrap())
    });
    g.finish();

    let cfg = Config::parse(path, CONFIG).unwrap();
    let up = Upstream::new(&cfg.upstreams["app"]);
    let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
    c.bench_function("upstream/pick", |b| {
        b.iter(|| up.pick(black_box(client), &[]).map(|g| g.addr()))
    });
}

criterion_group!(benches, config);
criterion_main!(benches);
